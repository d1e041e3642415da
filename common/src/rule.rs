//! Rules: `TG_RULES` is an LPM trie keyed by (slot, source identity, destination identity,
//! protocol, destination port).
//!
//! Lookup order falls out of longest-prefix match over the key bits:
//!
//! | prefix_len | matches                                                  |
//! |------------|----------------------------------------------------------|
//! | 96 + 8 + 16 | exact port                                              |
//! | 96 + 8 + n  | a port range, expanded into aligned port prefixes        |
//! | 96 + 8      | any port of one protocol (also ICMP, which has no ports) |
//! | 96          | any protocol between the pair (`protocol: ANY`, and the audit fallback) |
//!
//! The compiler never emits two entries whose port intervals overlap for the same pair and
//! protocol (it splits and merges intervals first), so the most specific entry is always the
//! one rule that decides.

use crate::identity::IdentityId;

/// Bits of slot + source + destination identity: the part every rule key matches exactly.
pub const RULE_PAIR_PREFIX_BITS: u32 = 96;
/// `RULE_PAIR_PREFIX_BITS` + the protocol byte.
pub const RULE_PROTO_PREFIX_BITS: u32 = RULE_PAIR_PREFIX_BITS + 8;
/// A fully specified key (exact port).
pub const RULE_FULL_PREFIX_BITS: u32 = RULE_PROTO_PREFIX_BITS + 16;

/// Where a rule entry of `prefix_len` lives: an exact port goes to `TG_RULES_EXACT`, which the
/// datapath reads before the prefix trie. Sound because the compiler never lets two entries of
/// one pair and protocol overlap and an exact port is the longest prefix there is: a hit in the
/// exact map is what the trie would have answered.
pub const fn is_exact_rule(prefix_len: u32) -> bool {
    prefix_len == RULE_FULL_PREFIX_BITS
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub slot: u32,
    /// Identities are stored big-endian so the LPM bit order is the numeric order (only exact
    /// matches are made on them, but this keeps dumps readable).
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    /// Destination port, network byte order, so a port prefix is a bit prefix.
    pub port: [u8; 2],
    /// Never part of a prefix (the longest prefix ends before it); always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 16);

impl RuleKey {
    #[inline(always)]
    pub const fn new(slot: u32, src: IdentityId, dst: IdentityId, proto: u8, port: u16) -> Self {
        Self {
            slot,
            src: src.to_be_bytes(),
            dst: dst.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
            _pad: 0,
        }
    }
}

/// The entry grants the traffic it matches (subject to expiry). Without it the entry is an
/// audit fallback: no rule allows the traffic, but a rule in audit mode covers the identity
/// pair, so the deny is a would-deny naming that rule.
pub const RULE_FLAG_ALLOW: u32 = 1 << 0;
/// The rule is in `mode: audit`: its denies are would-denies.
pub const RULE_FLAG_AUDIT: u32 = 1 << 1;
/// The rule requires mutual-TLS authentication of the pair (`authentication: mtls`; see
/// `auth`).
pub const RULE_FLAG_AUTH_MTLS: u32 = 1 << 2;
/// The rule's `log: true`: each new flow it admits is reported as an event.
pub const RULE_FLAG_LOG: u32 = 1 << 3;

/// Rule ids index the agent's table of rule names; 0 means "no rule" (`default-deny`).
pub type RuleId = u32;
pub const RULE_ID_NONE: RuleId = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    pub rule_id: RuleId,
    /// `RULE_FLAG_*`.
    pub flags: u32,
    /// CLOCK_BOOTTIME nanoseconds after which the rule no longer allows; 0 = never expires.
    pub expires_ns: u64,
    /// The rule's `rateLimit`: a `TG_LIMITS` id, 0 for none. Only allowing entries carry it
    /// (an audit fallback admits nothing of its own).
    pub limit_id: u32,
    pub _reserved: u32,
    /// For a rule with `RULE_FLAG_AUTH_MTLS`: the `TG_AUTH` key of its identity pair (see
    /// `auth`); 0 otherwise.
    pub auth_pair: u64,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 32);
