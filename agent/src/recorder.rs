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
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{Map, Value};

use crate::{
    audit::{AuditLog, Checkpoint},
    events::{Control, Sink},
    installer::PolicyChange,
    persist::hex,
    wire::{AuditStatus, FlowRecord},
};

pub struct RecorderConfig {
    pub checkpoint_interval: Duration,
    /// The file, or `stdout`, for `status`.
    pub destination: String,
    /// Where the head of the last checkpoint is kept across restarts (`<state dir>/audit-head.json`),
    /// so that a log that lost records while no agent ran says so (`history_missing`).
    pub head_file: Option<std::path::PathBuf>,
}

/// The chain's position at the last checkpoint, kept in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RememberedHead {
    seq: u64,
    head: String,
}

/// What `status` and the metrics show of the audit log.
#[derive(Debug)]
pub struct AuditStats {
    status: Mutex<AuditStatus>,
    /// Records the stdout sink dropped because its reader did not keep up.
    stdout_dropped: Arc<AtomicU64>,
}

impl AuditStats {
    pub fn status(&self) -> AuditStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.stdout_dropped = self.stdout_dropped.load(Ordering::Relaxed);
        s
    }

    fn update(&self, f: impl FnOnce(&mut AuditStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Records waiting for stdout: about a minute of a busy agent's records.
const STDOUT_QUEUE: usize = 4096;

/// The audit log's stdout sink, decoupled: records are queued for a thread that writes them,
/// and dropped (and counted) when the queue is full, so a log collector that stops reading
/// can never stall the event pipeline (and with it the audit file, flows and metrics).
pub struct QueuedStdout {
    queue: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl QueuedStdout {
    pub fn spawn() -> std::io::Result<Self> {
        let (queue, lines) = sync_channel::<Vec<u8>>(STDOUT_QUEUE);
        std::thread::Builder::new()
            .name("tollgate-audit-stdout".into())
            .spawn(move || {
                let mut out = std::io::stdout().lock();
                for line in lines {
                    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                        // Standard output is gone (closed pipe); the file log goes on.
                        return;
                    }
                }
            })?;
        Ok(Self {
            queue,
            dropped: Arc::default(),
        })
    }

    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Write for QueuedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.queue.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the recorder reads the losses it records (`records_lost`).
pub type LossCounter = Box<dyn Fn() -> u64 + Send>;

pub struct Recorder {
    log: AuditLog,
    /// The datapath's count of events that found no room on the ring buffer.
    events_lost: Option<LossCounter>,
    /// The losses last written into the log: (events lost, write errors, stdout drops).
    recorded_losses: (u64, u64, u64),
    config: RecorderConfig,
    stats: Arc<AuditStats>,
    last_checkpoint: Instant,
    /// Records written since the last checkpoint (none: no checkpoint is due).
    since_checkpoint: u64,
    last_warning: Option<Instant>,
}

impl Recorder {
    pub fn new(
        log: AuditLog,
        config: RecorderConfig,
        stdout_dropped: Option<Arc<AtomicU64>>,
    ) -> (Self, Arc<AuditStats>) {
        let (seq, head) = log.head();
        let stats = Arc::new(AuditStats {
            status: Mutex::new(AuditStatus {
                destination: config.destination.clone(),
                head_seq: seq,
                head: hex(&head),
                last_checkpoint: None,
                write_errors: 0,
                stdout_dropped: 0,
            }),
            stdout_dropped: stdout_dropped.unwrap_or_default(),
        });
        (
            Self {
                log,
                events_lost: None,
                recorded_losses: (0, 0, 0),
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

    /// The datapath's lost-event counter, from when the datapath is loaded. Its value then is
    /// the starting point: only losses from now on are recorded.
    pub fn set_events_lost(&mut self, counter: LossCounter) {
        self.recorded_losses.0 = counter();
        self.events_lost = Some(counter);
    }

    /// Writes a `records_lost` record when anything was lost since the last one: decisions
    /// that never reached the log (events the datapath could not queue, records that could not
    /// be written, stdout records dropped), so a gap is in the chain itself, not only in
    /// counters that restart with the agent.
    fn record_losses(&mut self) {
        let now = (
            self.events_lost.as_ref().map_or(0, |f| f()),
            self.stats.status().write_errors,
            self.stats.stdout_dropped.load(Ordering::Relaxed),
        );
        let before = self.recorded_losses;
        if now == before {
            return;
        }
        let fields = serde_json::json!({
            "events_lost": now.0.saturating_sub(before.0),
            "write_errors": now.1.saturating_sub(before.1),
            "stdout_dropped": now.2.saturating_sub(before.2),
            "reason": "decisions since the previous records_lost (or the agent's start) that are not in this log: events the datapath could not queue for the agent, records that could not be written here, records dropped on the way to stdout",
        });
        if let Value::Object(m) = fields {
            let errors_before = self.stats.status().write_errors;
            self.append("records_lost", m);
            if self.stats.status().write_errors == errors_before {
                // Written: what it reported is on record. (A failed write is itself counted
                // and reported by the next one.)
                self.recorded_losses = now;
            }
        }
    }

    /// Compares the log with the head remembered from the last run: a log that now ends before
    /// it (or at it with another hash) lost records while no agent was writing it (deleted,
    /// truncated, replaced). That is written into the chain as `history_missing`.
    pub fn check_remembered_head(&mut self) {
        let Some(path) = &self.config.head_file else {
            return;
        };
        let remembered: Option<RememberedHead> = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let Some(remembered) = remembered else {
            return;
        };
        let (seq, hash) = self.log.head();
        let found = hex(&hash);
        let missing = seq < remembered.seq || (seq == remembered.seq && found != remembered.head);
        if !missing {
            return;
        }
        tracing::warn!(
            remembered_seq = remembered.seq,
            found_seq = seq,
            "the audit log ends before where the last agent left it: records were removed or the log replaced while no agent wrote it"
        );
        let fields = serde_json::json!({
            "remembered_seq": remembered.seq,
            "remembered_head": remembered.head,
            "found_seq": seq,
            "found_head": found,
            "reason": "the log ends before the last checkpoint the previous agent made: records were removed, or the log replaced, while no agent wrote it",
        });
        if let Value::Object(m) = fields {
            self.append("history_missing", m);
        }
    }

    fn remember_head(&self, head_seq: u64, head: &str) {
        let Some(path) = &self.config.head_file else {
            return;
        };
        let remembered = RememberedHead {
            seq: head_seq,
            head: head.to_owned(),
        };
        let written = serde_json::to_vec(&remembered)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::statefile::write_atomically(path, &bytes));
        if let Err(e) = written {
            tracing::warn!(error = %format!("{e:#}"), "keeping the audit head in the state directory failed");
        }
    }

    fn checkpoint(&mut self) {
        self.record_losses();
        match self.log.checkpoint() {
            Ok(Checkpoint {
                head_seq,
                head,
                hmac,
            }) => {
                self.since_checkpoint = 0;
                let (seq, hash) = self.log.head();
                self.remember_head(seq, &hex(&hash));
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
            Control::Record { kind, fields } => (*kind, Value::Object(fields.clone())),
        };
        if let Value::Object(m) = fields {
            self.append(kind, m);
        }
    }

    fn tick(&mut self, now: Instant) {
        match self.log.reopen_if_replaced() {
            Ok(true) => tracing::warn!(
                "the audit log file was removed or replaced while the agent wrote it; opened it \
                 again, starting with a chain_break record"
            ),
            Ok(false) => {}
            Err(e) => {
                self.stats.update(|s| s.write_errors += 1);
                tracing::warn!(error = %e, "reopening the audit log failed");
            }
        }
        let lost_now = self.events_lost.as_ref().map_or(0, |f| f()) != self.recorded_losses.0
            || self.stats.status().write_errors != self.recorded_losses.1
            || self.stats.stdout_dropped.load(Ordering::Relaxed) != self.recorded_losses.2;
        if (self.since_checkpoint > 0 || lost_now)
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
