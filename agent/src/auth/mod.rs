//! Authentication of identity pairs (`authentication: mtls` rules): the agents of two nodes
//! run a mutual TLS 1.3 handshake presenting the SVIDs of the pair's identities, and on success
//! both write a proof to `TG_AUTH` that the kernel admits the pair's flows by, until the
//! earliest certificate expiry (and `--auth-max-ttl`).
//!
//! - `plan`: which pairs the live policy needs proven, and where their peers listen;
//! - `proofs`: the `TG_AUTH` map;
//! - `protocol`: the one request and answer exchanged over the TLS stream;
//! - `handshake`: both ends of one handshake;
//! - `manager`: the task that owns the proofs: handshakes on demand (the datapath refused a
//!   flow for want of a proof), ahead of need (pre-authentication) and before expiry
//!   (renewal), and lapses (expired, revoked or replaced certificates).

#![forbid(unsafe_code)]

pub mod proofs;
