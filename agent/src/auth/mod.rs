//! Authentication of identity pairs (`authentication: mtls` rules): the agents of two nodes
//! run a mutual TLS 1.3 handshake presenting the SVIDs of the pair's identities, and on success
//! both write a proof to `TG_AUTH` that the kernel admits the pair's flows by, until the
//! earliest certificate expiry (and `--auth-max-ttl`).
//!
//! - `plan`: which pairs the live policy needs proven;
//! - `peers`: where their peers listen, and where a handshake may come from;
//! - `proofs`: the `TG_AUTH` map;
//! - `protocol`: the one request and answer exchanged over the TLS stream;
//! - `handshake`: both ends of one handshake;
//! - `manager`: the task that owns the proofs: handshakes on demand (the datapath refused a
//!   flow for want of a proof), ahead of need (pre-authentication) and before expiry
//!   (renewal), and lapses (expired, revoked or replaced certificates).

#![forbid(unsafe_code)]

pub mod handshake;
pub mod manager;
pub mod peers;
pub mod plan;
pub mod proofs;
pub mod protocol;
pub mod stats;

use tokio::sync::mpsc;

use crate::{events::Sink, wire::FlowRecord};

/// The event pipeline's sink that tells the manager which pairs the datapath refused for want
/// of a proof. Never blocks the pipeline: when the manager is behind, a demand is dropped (the
/// client's next retry asks again).
pub struct AuthSink {
    demand: mpsc::Sender<manager::Demand>,
}

impl AuthSink {
    pub fn new(demand: mpsc::Sender<manager::Demand>) -> Self {
        Self { demand }
    }
}

impl Sink for AuthSink {
    fn decision(&mut self, record: &FlowRecord) {
        if record.auth_required {
            let _ = self.demand.try_send(manager::Demand {
                from: record.from_identity.clone(),
                to: record.to_identity.clone(),
                src: Some(record.src),
                dst: Some(record.dst),
            });
        }
    }
}
