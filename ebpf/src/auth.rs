//! Authentication: the proofs of mutual-TLS handshakes between identity pairs, as the agent
//! wrote them (see `tollgate_common::auth` for the semantics and who writes what).
//!
//! Shared state: the agent replaces a whole entry with one map update (renewal, revocation) and
//! the datapath only reads entries, copying the value out, so a packet sees the old proof or
//! the new one, never half of each.

use aya_ebpf::{macros::map, maps::HashMap};
use tollgate_common::{maps, AuthKey, AuthValue};

/// Pair key (of two SPIFFE IDs) → until when the pair is authenticated.
#[map(name = "TG_AUTH")]
static AUTH: HashMap<AuthKey, AuthValue> =
    HashMap::pinned(maps::AUTH.max_entries, maps::AUTH.flags);

/// The proof of the pair with key `pair`, copied out of the map, if there is one.
#[inline(always)]
pub fn proof(pair: u64) -> Option<AuthValue> {
    let key = AuthKey { pair };
    // SAFETY: a map value valid for this program run (RCU), only read, and copied out at once.
    AUTH.get_ptr(&key).map(|v| unsafe { *v })
}
