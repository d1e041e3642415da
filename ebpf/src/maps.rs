//! Every map of the datapath. Layouts are defined in `tollgate_common`; this file only states
//! each map's kind, capacity and key invariants. All maps are pinned by name so a restarting
//! agent (and the pinned programs while no agent runs) keep using the same state.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, LruHashMap, PerCpuArray, RingBuf},
};
use tollgate_common::{
    capacity, verdict::COUNTER_SLOTS, CheckResult, FlowKey, FlowValue, IdentityKeyV4,
    IdentityKeyV6, IdentityValue, RuleKey, RuleValue, SlotConfig, SLOT_COUNT,
};

/// `[0]` = the active policy generation (0: none loaded, deny all IP). Its lowest bit selects the
/// slot every other policy map is read in. The agent writes it last, in one 8-byte update.
#[map(name = "TG_ACTIVE")]
pub static ACTIVE: Array<u64> = Array::pinned(1, 0);

/// `[slot]` = settings of the policy built in that slot (audit mode, ...).
#[map(name = "TG_SLOT_CONFIG")]
pub static SLOT_CONFIG: Array<SlotConfig> = Array::pinned(SLOT_COUNT, 0);

/// (slot, IPv4 address) → identity. Prefix length = 32 slot bits + CIDR length.
#[map(name = "TG_IDENTITY_V4")]
pub static IDENTITY_V4: LpmTrie<IdentityKeyV4, IdentityValue> =
    LpmTrie::pinned(capacity::IDENTITY_ENTRIES, 0);

/// (slot, IPv6 address) → identity. Prefix length = 32 slot bits + CIDR length.
#[map(name = "TG_IDENTITY_V6")]
pub static IDENTITY_V6: LpmTrie<IdentityKeyV6, IdentityValue> =
    LpmTrie::pinned(capacity::IDENTITY_ENTRIES, 0);

/// (slot, src identity, dst identity, protocol, dst port) → rule. Longest prefix decides; the
/// compiler guarantees port intervals of one pair and protocol never overlap. See
/// `tollgate_common::rule` for the prefix table.
#[map(name = "TG_RULES")]
pub static RULES: LpmTrie<RuleKey, RuleValue> = LpmTrie::pinned(capacity::RULE_ENTRIES, 0);

/// 5-tuple as on the wire → admitted flow. Two entries per flow (original and reply).
#[map(name = "TG_CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::pinned(capacity::CONNTRACK_ENTRIES, 0);

/// Per-CPU packet counters: `[verdict as u32]`, then `COUNTER_EVENTS_LOST`.
#[map(name = "TG_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// `FlowEvent`s for denies, would-denies and revoked flows.
#[map(name = "TG_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// `[0]` = what the last `tollgate_check` run decided (see `tollgate_common::CheckResult`).
#[map(name = "TG_CHECK")]
pub static CHECK: Array<CheckResult> = Array::pinned(1, 0);
