//! The audit sink: writes every aggregated decision and every control action (agent start and
//! stop, policy applied with its digest) to the hash-chained audit log (`audit`), and a
//! checkpoint (sequence number and head hash, HMAC-signed when a key is configured) every
//! [`RecorderConfig::checkpoint_interval`] and at stop. Each checkpoint also goes to the
//! agent's log and to the metrics, so that a system outside the node can hold it and later
//! prove the log was not truncated or rewritten behind it.
//!
//! A record that cannot be written is counted and logged (at most one warning per interval);
//! the agent keeps enforcing, and the chain continues from the last record written.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Map, Value};

use crate::{
    audit::{AuditLog, Checkpoint},
    events::{Control, Sink},
    installer::{hex, PolicyChange},
    wire::{AuditStatus, FlowRecord},
};

pub struct RecorderConfig {
    pub checkpoint_interval: Duration,
    /// The file, or `stdout`, for `status`.
    pub destination: String,
}

/// What `status` and the metrics show of the audit log.
#[derive(Debug)]
pub struct AuditStats {
    status: Mutex<AuditStatus>,
}

impl AuditStats {
    pub fn status(&self) -> AuditStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut AuditStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

pub struct Recorder {
    log: AuditLog,
    config: RecorderConfig,
    stats: Arc<AuditStats>,
    last_checkpoint: Instant,
    /// Records written since the last checkpoint (none: no checkpoint is due).
    since_checkpoint: u64,
    last_warning: Option<Instant>,
}

impl Recorder {
    pub fn new(log: AuditLog, config: RecorderConfig) -> (Self, Arc<AuditStats>) {
        let (seq, head) = log.head();
        let stats = Arc::new(AuditStats {
            status: Mutex::new(AuditStatus {
                destination: config.destination.clone(),
                head_seq: seq,
                head: hex(&head),
                last_checkpoint: None,
                write_errors: 0,
            }),
        });
        (
            Self {
                log,
                config,
                stats: stats.clone(),
                last_checkpoint: Instant::now(),
                since_checkpoint: 0,
                last_warning: None,
            },
            stats,
        )
    }

    fn append(&mut self, kind: &str, fields: Map<String, Value>) {
        match self.log.append(kind, fields) {
            Ok(a) => {
                self.since_checkpoint += 1;
                self.stats.update(|s| {
                    s.head_seq = a.seq;
                    s.head = hex(&a.hash);
                });
            }
            Err(e) => {
                self.stats.update(|s| s.write_errors += 1);
                let now = Instant::now();
                if self
                    .last_warning
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10))
                {
                    self.last_warning = Some(now);
                    tracing::warn!(error = %e, record = kind, "writing the audit log failed; the record is lost (counted in status and tollgate_audit_write_errors_total)");
                }
            }
        }
    }

    fn checkpoint(&mut self) {
        match self.log.checkpoint() {
            Ok(Checkpoint {
                head_seq,
                head,
                hmac,
            }) => {
                self.since_checkpoint = 0;
                let (seq, hash) = self.log.head();
                tracing::info!(
                    target: "tollgate::audit",
                    head_seq,
                    head = %head,
                    hmac = hmac.as_deref().unwrap_or("-"),
                    "audit checkpoint (verify with: tollgate audit verify FILE --checkpoint {head_seq}:{head})"
                );
                self.stats.update(|s| {
                    s.head_seq = seq;
                    s.head = hex(&hash);
                    s.last_checkpoint = Some(format!("{head_seq}:{head}"));
                });
            }
            Err(e) => {
                self.stats.update(|s| s.write_errors += 1);
                tracing::warn!(error = %e, "writing an audit checkpoint failed");
            }
        }
    }
}

/// A decision as an audit record's fields: everything of the record but its list position.
fn decision_fields(r: &FlowRecord) -> Map<String, Value> {
    let mut fields = match serde_json::to_value(r) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    fields.remove("seq");
    // The record's own `time` is when it is written; this is when the packet was decided.
    if let Some(t) = fields.remove("time") {
        fields.insert("decided_at".into(), t);
    }
    fields
}

impl Sink for Recorder {
    fn record(&mut self, r: &FlowRecord) {
        self.append("decision", decision_fields(r));
    }

    fn control(&mut self, c: &Control) {
        let (kind, fields) = match c {
            Control::AgentStart {
                version,
                bpffs,
                interfaces,
            } => (
                "agent_start",
                serde_json::json!({ "version": version, "bpffs": bpffs, "interfaces": interfaces }),
            ),
            Control::Policy(PolicyChange::Rejected { digest, reason }) => (
                "policy_rejected",
                serde_json::json!({ "digest": format!("sha256:{digest}"), "reason": reason }),
            ),
            Control::Policy(PolicyChange::Applied(a)) => (
                "policy_applied",
                serde_json::json!({
                    "policy": a.name,
                    "generation": a.generation,
                    "digest": format!("sha256:{}", a.digest),
                    "rules": a.rules,
                    "identities": a.identities,
                    "source": a.source,
                }),
            ),
            Control::AgentStop { reason } => {
                ("agent_stop", serde_json::json!({ "reason": reason }))
            }
        };
        if let Value::Object(m) = fields {
            self.append(kind, m);
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.since_checkpoint > 0
            && now.saturating_duration_since(self.last_checkpoint)
                >= self.config.checkpoint_interval
        {
            self.last_checkpoint = now;
            self.checkpoint();
        }
    }

    fn stop(&mut self) {
        self.checkpoint();
        if let Err(e) = self.log.flush() {
            tracing::warn!(error = %e, "flushing the audit log failed");
        }
    }
}
