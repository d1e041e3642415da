//! Per-interface settings: `TG_INTERFACES` is a hash from ifindex to [`InterfaceValue`], written
//! by the agent before it attaches to an interface and on every policy swap.
//!
//! Source validation happens at ingress. On a workload-facing interface (the default, and what
//! an interface without an entry is treated as) a packet's source must route back out of the
//! interface it arrived on (strict reverse path, `bpf_fib_lookup`), and if the interface is bound
//! to an identity, the source must belong to that identity. An uplink
//! (`INTERFACE_FLAG_UPLINK`) carries traffic from `world` with any source and skips both checks.

use crate::{identity::IdentityId, SLOT_COUNT};

/// Traffic from `world` arrives here with any source address: no source validation.
pub const INTERFACE_FLAG_UPLINK: u32 = 1 << 0;

/// Value of `TG_INTERFACES` (key: ifindex as `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceValue {
    /// `INTERFACE_FLAG_*`.
    pub flags: u32,
    /// Reserved for per-interface settings (a later limit id); zero for now.
    pub _reserved: u32,
    /// The identity this interface is bound to in each policy slot (identity ids are numbered
    /// per generation), or 0 when unbound. Indexed by `slot_of(generation)`, so a swap rewrites
    /// the inactive slot's binding before flipping, like every other policy map.
    pub bound_identity: [IdentityId; SLOT_COUNT as usize],
}
const _: () = assert!(core::mem::size_of::<InterfaceValue>() == 16);

impl InterfaceValue {
    /// The identity bound for `slot`, 0 if none.
    #[inline(always)]
    pub fn bound_in(&self, slot: u32) -> IdentityId {
        // `slot` is `generation & 1`; the mask keeps the index provably in range.
        self.bound_identity[(slot & 1) as usize]
    }
}
