//! Chains the verifier has accepted, so that a peer presenting the same certificates again
//! (every renewal, every pair its SVID is an end of) costs a hash instead of a path validation:
//! about a fifth of a server's CPU per mutual handshake (docs/benchmarks.md).
//!
//! A cache belongs to one set of trust anchors (one [`TrustBundles`](super::TrustBundles)
//! value: adding a bundle starts a new cache, and a new reading of the SVID directories is a new
//! value), and is keyed by the exact DER of every presented certificate and the key usage
//! checked: the chain's signatures and the SVID rules depend on nothing else. Only accepted
//! chains are kept, and a hit still checks the time against the validity of every certificate
//! of the chain (outside it, the full validation runs and names the error). The handshake's
//! CertificateVerify, the proof that the peer holds the certificate's key, is never cached.

use std::{collections::HashMap, fmt, sync::Mutex, time::SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use sha2::{Digest as _, Sha256};

use super::{verify::VerifiedSvid, SpiffeId, Usage};

/// Chains kept at most; when full, the cache starts again empty (only chains that passed
/// validation get in, so filling it takes valid certificates).
pub(crate) const CAPACITY: usize = 4096;

/// What is kept of an accepted chain.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub id: SpiffeId,
    /// The leaf's expiry (what the full validation returns).
    pub leaf_not_after: SystemTime,
    /// The latest `notBefore` and the earliest `notAfter` of the presented certificates, in
    /// seconds since the epoch.
    pub valid_from: i64,
    pub valid_until: i64,
}

/// The accepted chains of one set of trust anchors.
#[derive(Default)]
pub struct ChainCache {
    entries: Mutex<HashMap<[u8; 32], Accepted>>,
}

impl fmt::Debug for ChainCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainCache")
            .field("entries", &self.len())
            .finish()
    }
}

impl ChainCache {
    /// The key of a presented chain checked for `usage`: SHA-256 over the usage and each
    /// certificate's length and DER, in order.
    pub(crate) fn key(chain: &[CertificateDer<'_>], usage: Usage) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([match usage {
            Usage::ClientAuth => 1u8,
            Usage::ServerAuth => 2u8,
        }]);
        for cert in chain {
            h.update((cert.len() as u64).to_be_bytes());
            h.update(cert.as_ref());
        }
        h.finalize().into()
    }

    /// The accepted chain under `key`, if every certificate of it is valid at `now`.
    pub(crate) fn get(&self, key: &[u8; 32], now: UnixTime) -> Option<VerifiedSvid> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let a = entries.get(key)?;
        (a.valid_from <= now && now <= a.valid_until).then(|| VerifiedSvid {
            id: a.id.clone(),
            not_after: a.leaf_not_after,
        })
    }

    pub(crate) fn put(&self, key: [u8; 32], accepted: Accepted) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(key, accepted);
    }

    /// Chains held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no chain is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
