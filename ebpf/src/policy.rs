//! Policy: the live generation, identities of addresses and the rule between two identities.
//!
//! Every policy map holds two slots (the live policy and the one the agent builds beside it);
//! a packet reads the generation once (`live_generation`) and every lookup it makes stays in
//! that generation's slot, so it sees one policy whole.
//!
//! Lookup order (both kinds of map are filled by the agent's compiler, which decides where an
//! entry goes):
//! - identities: the exact map (`/32`, `/128`: pod addresses, node addresses) first, then the
//!   CIDR trie. The exact entry is always the longest prefix that could match, because
//!   validation refuses a single address of one identity inside another identity's CIDR.
//! - rules: the exact map (one destination port) first, then the prefix trie (port ranges, any
//!   port, any protocol, audit fallbacks). The compiler never lets two entries of one pair and
//!   protocol overlap, and an exact port is the longest prefix of all, so the exact hit is what
//!   the trie would have answered.
//!
//! A trie is only walked when the slot has entries in it (`SlotConfig::lookup_flags`), so a
//! policy of pod addresses and exact ports never pays for a trie walk.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
};
use tollgate_common::{
    auth::{authorize, requires_auth},
    decide,
    identity::{IDENTITY_WORLD, SLOT_PREFIX_BITS},
    maps, proto,
    rule::{RULE_FULL_PREFIX_BITS, RULE_ID_NONE},
    slot_of, Decision, IdentityKeyV4, IdentityKeyV6, IdentityValue, RuleKey, RuleValue, SlotConfig,
    Verdict, ACTIVE_GENERATION_INDEX, ACTIVE_NS_PER_JIFFY_INDEX, LOOKUP_IDENTITY_V4_CIDRS,
    LOOKUP_IDENTITY_V6_CIDRS, LOOKUP_RULE_PREFIXES,
};

use crate::context::PacketContext;

/// Datapath globals. `[ACTIVE_GENERATION_INDEX]` = the active policy generation (0: none
/// loaded, deny all IP); its lowest bit selects the slot every other policy map is read in, and
/// the agent writes it last, in one 8-byte update. `[ACTIVE_NS_PER_JIFFY_INDEX]` = the tick
/// length (see `clock_ns`).
#[map(name = "TG_ACTIVE")]
static ACTIVE: Array<u64> = Array::pinned(maps::ACTIVE.max_entries, maps::ACTIVE.flags);

/// `[slot]` = settings of the policy built in that slot (audit mode, which tries hold entries).
#[map(name = "TG_SLOT_CONFIG")]
static SLOT_CONFIG: Array<SlotConfig> =
    Array::pinned(maps::SLOT_CONFIG.max_entries, maps::SLOT_CONFIG.flags);

/// (slot, IPv4 address) → identity, for `/32` entries.
#[map(name = "TG_ADDR_ID_V4")]
static ADDR_ID_V4: HashMap<IdentityKeyV4, IdentityValue> = HashMap::pinned(
    maps::IDENTITY_V4_EXACT.max_entries,
    maps::IDENTITY_V4_EXACT.flags,
);

/// (slot, IPv6 address) → identity, for `/128` entries.
#[map(name = "TG_ADDR_ID_V6")]
static ADDR_ID_V6: HashMap<IdentityKeyV6, IdentityValue> = HashMap::pinned(
    maps::IDENTITY_V6_EXACT.max_entries,
    maps::IDENTITY_V6_EXACT.flags,
);

/// (slot, IPv4 prefix) → identity. Prefix length = 32 slot bits + CIDR length (< 32).
#[map(name = "TG_IDENTITY_V4")]
static IDENTITY_V4: LpmTrie<IdentityKeyV4, IdentityValue> =
    LpmTrie::pinned(maps::IDENTITY_V4.max_entries, maps::IDENTITY_V4.flags);

/// (slot, IPv6 prefix) → identity. Prefix length = 32 slot bits + CIDR length (< 128).
#[map(name = "TG_IDENTITY_V6")]
static IDENTITY_V6: LpmTrie<IdentityKeyV6, IdentityValue> =
    LpmTrie::pinned(maps::IDENTITY_V6.max_entries, maps::IDENTITY_V6.flags);

/// (slot, src identity, dst identity, protocol, dst port) → rule, for one exact port.
#[map(name = "TG_RULES_EXACT")]
static RULES_EXACT: HashMap<RuleKey, RuleValue> =
    HashMap::pinned(maps::RULES_EXACT.max_entries, maps::RULES_EXACT.flags);

/// (slot, src identity, dst identity, protocol, dst port prefix) → rule: port ranges as aligned
/// prefixes, any port of a protocol, any protocol. See `tollgate_common::rule` for the prefix
/// table.
#[map(name = "TG_RULES")]
static RULES: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::pinned(maps::RULES.max_entries, maps::RULES.flags);

/// CLOCK_BOOTTIME, the clock rule expiries are stated in.
#[inline(always)]
pub fn boot_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The clock of idle tracking and event sampling, in nanoseconds: jiffies (one load: the
/// verifier inlines the helper) times the tick length the agent measured when it created the
/// maps, or the coarse monotonic clock (a helper call, about 19 ns a packet in this VM) if that
/// is unknown. Both advance one tick at a time; only differences of this clock are compared.
#[inline(always)]
pub fn clock_ns() -> u64 {
    match ACTIVE.get(ACTIVE_NS_PER_JIFFY_INDEX) {
        // SAFETY: helpers without arguments or side effects.
        Some(ns) if *ns != 0 => unsafe { bpf_jiffies64() }.wrapping_mul(*ns),
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// The live policy generation; `None` until a policy is loaded (generation 0).
#[inline(always)]
pub fn live_generation() -> Option<u64> {
    match ACTIVE.get(ACTIVE_GENERATION_INDEX) {
        Some(g) if *g != 0 => Some(*g),
        _ => None,
    }
}

/// `LOOKUP_*` flags of `slot`'s policy (which tries hold entries).
#[inline(always)]
fn slot_config(slot: u32) -> (u32, u32) {
    match SLOT_CONFIG.get(slot) {
        Some(c) => (c.flags, c.lookup_flags),
        None => (0, 0),
    }
}

/// What the identity and rule lookups found for a flow.
pub struct Evaluation {
    pub decision: Decision,
    pub src_id: u32,
    pub dst_id: u32,
    /// The packet's sender is one of the node's own addresses.
    pub sender_is_node: bool,
    /// Rate limits (`TG_LIMITS` ids, 0: none): the deciding rule's, if it allows, and the
    /// quotas of the flow's source and destination identities.
    pub rule_limit: u32,
    pub src_limit: u32,
    pub dst_limit: u32,
    /// The deciding rule allows and asks for its new flows to be reported (`log: true`).
    pub log: bool,
    /// `auth::state::*` of the decision.
    pub auth_state: u32,
}

impl Evaluation {
    pub const EMPTY: Evaluation = Evaluation {
        decision: Decision {
            verdict: Verdict::DenyDefault,
            rule_id: RULE_ID_NONE,
            expires_ns: 0,
        },
        src_id: IDENTITY_WORLD,
        dst_id: IDENTITY_WORLD,
        sender_is_node: false,
        rule_limit: 0,
        src_limit: 0,
        dst_limit: 0,
        log: false,
        auth_state: 0,
    };
}

/// Resolves both identities of the flow (in its original direction; `reply`: the packet travels
/// the reply way, so its sender is the flow's destination) and the rule between them in the
/// live slot, then decides, into `out`.
///
/// A BPF-to-BPF call of its own: the lookup keys, inlined at every caller, made the classifier's
/// frame so large that the call chain passed the 512-byte stack. The result goes to a
/// caller-owned struct because BPF calls cannot return aggregates.
#[inline(never)]
pub fn evaluate(pc: &PacketContext, reply: bool, out: &mut Evaluation) {
    let pkt = &pc.pkt;
    let (src, dst, dport_be) = if reply {
        (&pkt.daddr, &pkt.saddr, pkt.sport)
    } else {
        (&pkt.saddr, &pkt.daddr, pkt.dport)
    };
    let slot = slot_of(pc.generation);
    let (policy_flags, lookup_flags) = slot_config(slot);
    let src = identity_lookup(pkt.family, slot, lookup_flags, src);
    let dst = identity_lookup(pkt.family, slot, lookup_flags, dst);
    let src_id = src.id_or_world();
    let dst_id = dst.id_or_world();
    let sender = if reply { dst } else { src };
    let port = match pkt.proto {
        proto::TCP | proto::UDP => u16::from_be(dport_be),
        _ => 0,
    };
    let rule_key = RuleKey::new(slot, src_id, dst_id, pkt.proto, port);
    // Copied out of the map: a pointer that may come from either of two maps doubles the
    // verifier's states for everything after it.
    let mut rule = RuleValue::default();
    let found = match RULES_EXACT.get_ptr(&rule_key) {
        // SAFETY: a policy map value, valid for this program run (RCU) and only read. The agent
        // never updates an entry of a live slot in place, it fills the other slot.
        Some(v) => {
            rule = unsafe { *v };
            true
        }
        None if lookup_flags & LOOKUP_RULE_PREFIXES != 0 => {
            match RULES.get(&Key::new(RULE_FULL_PREFIX_BITS, rule_key)) {
                Some(v) => {
                    rule = *v;
                    true
                }
                None => false,
            }
        }
        None => false,
    };
    let entry = if found { Some(&rule) } else { None };
    let needs_auth = found && requires_auth(rule.flags);
    // CLOCK_BOOTTIME is read only when the rule can expire or needs a proof that can.
    let now = if found && (rule.expires_ns != 0 || needs_auth) {
        boot_ns()
    } else {
        0
    };
    let decision = decide(entry, policy_flags, now);
    let proof = if needs_auth && decision.verdict == Verdict::AllowNew {
        crate::auth::proof(rule.auth_pair)
    } else {
        None
    };
    let (decision, auth_state) = authorize(decision, rule.flags, policy_flags, proof.as_ref(), now);
    out.decision = decision;
    out.auth_state = auth_state;
    out.src_id = src_id;
    out.dst_id = dst_id;
    out.sender_is_node = sender.is_node_address();
    out.rule_limit = if out.decision.verdict == Verdict::AllowNew {
        rule.limit_id
    } else {
        0
    };
    out.log = out.decision.verdict == Verdict::AllowNew
        && rule.flags & tollgate_common::rule::RULE_FLAG_LOG != 0;
    out.src_limit = src.limit_id;
    out.dst_limit = dst.limit_id;
}

/// An identity entry copied out of its map, `id` 0 when no entry covers the address. Scalars,
/// not a pointer: a pointer that may come from either of two maps multiplies the verifier's
/// states for everything after it.
#[derive(Clone, Copy)]
struct Found {
    id: u32,
    flags: u32,
    limit_id: u32,
}

impl Found {
    const NONE: Found = Found {
        id: 0,
        flags: 0,
        limit_id: 0,
    };

    #[inline(always)]
    fn id_or_world(self) -> u32 {
        if self.id == 0 {
            IDENTITY_WORLD
        } else {
            self.id
        }
    }

    #[inline(always)]
    fn is_node_address(self) -> bool {
        self.id != 0
            && IdentityValue {
                id: self.id,
                flags: self.flags,
                limit_id: self.limit_id,
                _pad: 0,
            }
            .is_node_address()
    }
}

/// The identity of `addr` in `slot` (`world` if none), for callers outside `evaluate`.
#[inline(always)]
pub fn identity_of(family: u8, generation: u64, addr: &[u8; 16]) -> u32 {
    let slot = slot_of(generation);
    let (_, lookup_flags) = slot_config(slot);
    identity_lookup(family, slot, lookup_flags, addr).id_or_world()
}

/// Whether `addr` is one of the node's own addresses in `generation`'s policy.
#[inline(always)]
pub fn is_node_address(family: u8, generation: u64, addr: &[u8; 16]) -> bool {
    let slot = slot_of(generation);
    let (_, lookup_flags) = slot_config(slot);
    identity_lookup(family, slot, lookup_flags, addr).is_node_address()
}

/// The identity entry covering `addr` in `slot`, if any: the exact map, then the trie if the
/// slot has CIDRs of this family.
#[inline(always)]
fn identity_lookup(family: u8, slot: u32, lookup_flags: u32, addr: &[u8; 16]) -> Found {
    let entry = if family == 4 {
        let key = IdentityKeyV4 {
            slot,
            addr: [addr[12], addr[13], addr[14], addr[15]],
        };
        match ADDR_ID_V4.get_ptr(&key) {
            Some(v) => v,
            None if lookup_flags & LOOKUP_IDENTITY_V4_CIDRS != 0 => {
                match IDENTITY_V4.get(&Key::new(SLOT_PREFIX_BITS + 32, key)) {
                    Some(v) => v as *const IdentityValue,
                    None => return Found::NONE,
                }
            }
            None => return Found::NONE,
        }
    } else {
        let key = IdentityKeyV6 { slot, addr: *addr };
        match ADDR_ID_V6.get_ptr(&key) {
            Some(v) => v,
            None if lookup_flags & LOOKUP_IDENTITY_V6_CIDRS != 0 => {
                match IDENTITY_V6.get(&Key::new(SLOT_PREFIX_BITS + 128, key)) {
                    Some(v) => v as *const IdentityValue,
                    None => return Found::NONE,
                }
            }
            None => return Found::NONE,
        }
    };
    // SAFETY: a policy map value, valid for this program run (RCU) and only read; the agent
    // never updates an entry of a live slot in place.
    let v = unsafe { *entry };
    Found {
        id: v.id,
        flags: v.flags,
        limit_id: v.limit_id,
    }
}
