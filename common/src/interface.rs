//! Per-interface settings: `TG_INTERFACES` is a hash from ifindex to [`InterfaceValue`], written
//! by the agent before it attaches to an interface and on every policy swap.
//!
//! A packet's source is validated against the interface it entered the node by (see
//! `ebpf/src/source.rs`): on a workload-facing interface (the default, and what an interface
//! without an entry is treated as) it must route back out of that interface (strict reverse
//! path, `bpf_fib_lookup`), and if the interface is bound to an identity, belong to that
//! identity. An uplink (`INTERFACE_FLAG_UPLINK`) carries traffic from `world` with any source
//! but the node's own and its workloads'.

use crate::{identity::IdentityId, SLOT_COUNT};

/// Traffic from `world` arrives here with any source address (only the node's own and its
/// workloads' addresses are refused).
pub const INTERFACE_FLAG_UPLINK: u32 = 1 << 0;
/// Tollgate's ingress program is attached here: packets from this interface were validated at
/// its ingress, before any NAT of the node rewrote them, and are not checked again where they
/// leave (where a DNAT reply or a masqueraded packet would no longer look like it came from
/// here).
pub const INTERFACE_FLAG_ENFORCED: u32 = 1 << 1;

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
