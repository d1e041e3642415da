//! What the auth subsystem has done, for `status`, the metrics and the audit log: one shared
//! record that the manager and the listener write and the control socket and `/metrics` read.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::{
    events::{Control, Input},
    wire::{AuthStatus, HandshakeCount, ProofStatus, SvidStatus},
};

/// Counters and the last published state.
#[derive(Debug, Default)]
pub struct AuthStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    listen: Option<String>,
    source: String,
    handshakes: BTreeMap<(&'static str, &'static str), u64>,
    lapses: BTreeMap<&'static str, u64>,
    svids: Vec<SvidStatus>,
    problems: Vec<String>,
    proofs: Vec<ProofStatus>,
}

impl AuthStats {
    pub fn new(listen: Option<String>, source: String) -> Self {
        Self {
            inner: Mutex::new(Inner {
                listen,
                source,
                ..Default::default()
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn count_handshake(&self, role: &'static str, result: &'static str) {
        self.with(|i| *i.handshakes.entry((role, result)).or_default() += 1);
    }

    pub fn count_lapse(&self, reason: &'static str) {
        self.with(|i| *i.lapses.entry(reason).or_default() += 1);
    }

    pub fn set_svids(&self, svids: Vec<SvidStatus>, problems: Vec<String>) {
        self.with(|i| {
            i.svids = svids;
            i.problems = problems;
        });
    }

    pub fn set_proofs(&self, proofs: Vec<ProofStatus>) {
        self.with(|i| i.proofs = proofs);
    }

    /// Handshakes by (role, result), for the metrics.
    pub fn handshakes(&self) -> Vec<((&'static str, &'static str), u64)> {
        self.with(|i| i.handshakes.iter().map(|(k, v)| (*k, *v)).collect())
    }

    pub fn lapses(&self) -> Vec<(&'static str, u64)> {
        self.with(|i| i.lapses.iter().map(|(k, v)| (*k, *v)).collect())
    }

    /// Live proofs and SVIDs held.
    pub fn counts(&self) -> (usize, usize) {
        self.with(|i| (i.proofs.len(), i.svids.len()))
    }

    pub fn status(&self) -> AuthStatus {
        self.with(|i| AuthStatus {
            listen: i.listen.clone(),
            source: i.source.clone(),
            svids: i.svids.clone(),
            problems: i.problems.clone(),
            proofs: i.proofs.clone(),
            handshakes: i
                .handshakes
                .iter()
                .map(|((role, result), count)| HandshakeCount {
                    role: (*role).to_owned(),
                    result: (*result).to_owned(),
                    count: *count,
                })
                .collect(),
            lapses: i
                .lapses
                .iter()
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
        })
    }
}

/// Audit records of failed handshakes a second, at most: a peer that fails on purpose must
/// not be able to fill the audit log. The ones held back are counted in the next record.
const FAILURE_RECORDS_PER_SECOND: u32 = 20;

/// Sends auth records to the event pipeline (the audit log's one writer), holding back failed
/// handshakes over [`FAILURE_RECORDS_PER_SECOND`].
pub struct Reporter {
    control: Option<mpsc::UnboundedSender<Input>>,
    window: Mutex<(Instant, u32, u64)>,
}

impl Reporter {
    pub fn new(control: Option<mpsc::UnboundedSender<Input>>) -> Self {
        Self {
            control,
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Records `kind` with `fields`; `failure` records are rate-limited.
    pub fn record(&self, kind: &'static str, fields: Value, failure: bool) {
        let Some(control) = &self.control else {
            return;
        };
        let Value::Object(mut fields) = fields else {
            return;
        };
        if failure {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
                *w = (now, 0, w.2);
            }
            if w.1 >= FAILURE_RECORDS_PER_SECOND {
                w.2 += 1;
                return;
            }
            w.1 += 1;
            if w.2 > 0 {
                fields.insert("held_back_before".to_owned(), Value::from(w.2));
                w.2 = 0;
            }
        }
        let _ = control.send(Input::Control(Control::Record {
            kind,
            fields: Map::from_iter(fields),
        }));
    }
}
