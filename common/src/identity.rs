//! Identity resolution: `TG_IDENTITY_V4` / `TG_IDENTITY_V6` are LPM tries from address to
//! numeric identity.
//!
//! The key data starts with the policy slot (exactly 32 bits, always part of the prefix), then
//! the address in network byte order, so a key's `prefix_len` is `32 + cidr_len`. Both slots live
//! in one trie; a lookup never crosses into the other slot. An address no entry covers is
//! [`IDENTITY_WORLD`].

pub type IdentityId = u32;

/// Never assigned; a zero id in a map value is a bug.
pub const IDENTITY_UNKNOWN: IdentityId = 0;
/// The node itself: addresses configured on the agent's network namespace that no declared
/// identity claims.
pub const IDENTITY_HOST: IdentityId = 1;
/// Any address no identity claims.
pub const IDENTITY_WORLD: IdentityId = 2;
/// Kubernetes mode: an address whose pods the policy cannot give one identity (two selectors
/// match the pod, two pods of different identities hold the address, or it lies in another
/// identity's CIDR). No rule names it, so its traffic is denied both ways.
pub const IDENTITY_AMBIGUOUS: IdentityId = 3;
/// Declared identities are numbered from here, in policy order, per generation.
pub const IDENTITY_FIRST_USER: IdentityId = 256;

/// Bits of the slot prefix in front of the address.
pub const SLOT_PREFIX_BITS: u32 = 32;

/// Where an identity entry of `prefix_len` (slot bits included) lives: a single address goes to
/// the exact map (`TG_ADDR_ID_V4`/`_V6`), which the datapath reads before the CIDR trie. Sound
/// because validation refuses a single address of one identity inside another's CIDR, so the
/// exact entry is always the longest match.
pub const fn is_exact_identity(family: u8, prefix_len: u32) -> bool {
    prefix_len == SLOT_PREFIX_BITS + if family == 4 { 32 } else { 128 }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKeyV4 {
    pub slot: u32,
    /// Network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<IdentityKeyV4>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKeyV6 {
    pub slot: u32,
    /// Network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IdentityKeyV6>() == 20);

/// The entry is an address of the node itself, inside a declared identity's CIDR (which keeps
/// its identity): like `host`, it may not arrive from an uplink.
pub const IDENTITY_FLAG_NODE_ADDRESS: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub id: IdentityId,
    /// `IDENTITY_FLAG_*`.
    pub flags: u32,
    /// The identity's quota (`spec.rateLimits`): a `TG_LIMITS` id, 0 for none. Every entry of
    /// one identity carries the same id.
    pub limit_id: u32,
    pub _pad: u32,
}

impl IdentityValue {
    /// Is the address this entry covers one of the node's own?
    #[inline(always)]
    pub fn is_node_address(&self) -> bool {
        self.id == IDENTITY_HOST || self.flags & IDENTITY_FLAG_NODE_ADDRESS != 0
    }
}
const _: () = assert!(core::mem::size_of::<IdentityValue>() == 16);
