//! The map registry: every map of the datapath, stated once.
//!
//! Each [`MapSpec`] gives a map's pin name, kind, key and value size, capacity and creation
//! flags. The eBPF side sizes its map definitions from these entries (the name in its
//! `#[map(name = ...)]` attribute must be a literal there, so the loader compares the loaded
//! object against this table and refuses an object that disagrees); the agent's loader checks
//! pinned maps against it before adopting them; uninstall and `status` walk it.
//!
//! Sizes are the kernel's view: an LPM trie's key includes the 4-byte prefix length in front of
//! the key data, and a ring buffer has neither key nor value.

use crate::{
    verdict::COUNTER_SLOTS, AuthKey, AuthValue, CheckResult, FlowEvent, FlowKey, FlowKeyV4,
    FlowValue, IdentityKeyV4, IdentityKeyV6, IdentityValue, InterfaceValue, LimitBucket, RuleKey,
    RuleValue, SamplerSlot, SlotConfig, SAMPLER_SLOTS, SLOT_COUNT,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated when written. Policy maps use it (they are
/// written only by the agent, and a full preallocation of their capacity would cost memory for
/// policies nobody loads); LPM tries require it.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// The kind of a map, as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    PerCpuArray,
    Hash,
    LruHash,
    LpmTrie,
    RingBuf,
}

impl MapKind {
    /// `enum bpf_map_type` of the kind.
    pub const fn bpf_map_type(self) -> u32 {
        match self {
            MapKind::Hash => 1,
            MapKind::Array => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHash => 9,
            MapKind::LpmTrie => 11,
            MapKind::RingBuf => 27,
        }
    }
}

/// One map of the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The pin file name under `<bpffs>/maps/`, and the map's name in the object file.
    pub name: &'static str,
    pub kind: MapKind,
    /// Key size as the kernel sees it (LPM tries: 4 + key data).
    pub key_size: u32,
    pub value_size: u32,
    /// Capacity (ring buffer: bytes). For maps sized at load time (`sized_at_load`), the default.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
    /// The agent may create this map with another capacity (a command-line flag); an adopted
    /// pinned map keeps the capacity it was made with.
    pub sized_at_load: bool,
    /// What the map holds, for `status` and error messages.
    pub what: &'static str,
}

const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

/// An LPM trie's kernel key: the prefix length, then the key data.
const fn lpm<T>() -> u32 {
    4 + size::<T>()
}

const fn spec(
    name: &'static str,
    kind: MapKind,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    what: &'static str,
) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
        flags,
        sized_at_load: false,
        what,
    }
}

/// Datapath globals, `u64` each: `[ACTIVE_GENERATION_INDEX]` the active policy generation (0:
/// none loaded), `[ACTIVE_ABI_INDEX]` the ABI version the pinned maps were made for,
/// `[ACTIVE_NS_PER_JIFFY_INDEX]` the kernel tick in nanoseconds.
pub const ACTIVE: MapSpec = spec(
    "TG_ACTIVE",
    MapKind::Array,
    4,
    8,
    crate::ACTIVE_ENTRIES,
    0,
    "policy generation, ABI version, tick length",
);
/// `[slot]` = [`SlotConfig`].
pub const SLOT_CONFIG: MapSpec = spec(
    "TG_SLOT_CONFIG",
    MapKind::Array,
    4,
    size::<SlotConfig>(),
    SLOT_COUNT,
    0,
    "per-slot policy settings",
);
/// (slot, IPv4 address) → identity, for single addresses (/32): one hash lookup.
pub const IDENTITY_V4_EXACT: MapSpec = spec(
    "TG_ADDR_ID_V4",
    MapKind::Hash,
    size::<IdentityKeyV4>(),
    size::<IdentityValue>(),
    capacity::IDENTITY_EXACT_ENTRIES,
    BPF_F_NO_PREALLOC,
    "IPv4 identity addresses (/32)",
);
/// (slot, IPv6 address) → identity, for single addresses (/128).
pub const IDENTITY_V6_EXACT: MapSpec = spec(
    "TG_ADDR_ID_V6",
    MapKind::Hash,
    size::<IdentityKeyV6>(),
    size::<IdentityValue>(),
    capacity::IDENTITY_EXACT_ENTRIES,
    BPF_F_NO_PREALLOC,
    "IPv6 identity addresses (/128)",
);
/// (slot, IPv4 prefix) → identity, for CIDRs shorter than /32.
pub const IDENTITY_V4: MapSpec = spec(
    "TG_IDENTITY_V4",
    MapKind::LpmTrie,
    lpm::<IdentityKeyV4>(),
    size::<IdentityValue>(),
    capacity::IDENTITY_ENTRIES,
    BPF_F_NO_PREALLOC,
    "IPv4 identity CIDRs",
);
/// (slot, IPv6 prefix) → identity, for CIDRs shorter than /128.
pub const IDENTITY_V6: MapSpec = spec(
    "TG_IDENTITY_V6",
    MapKind::LpmTrie,
    lpm::<IdentityKeyV6>(),
    size::<IdentityValue>(),
    capacity::IDENTITY_ENTRIES,
    BPF_F_NO_PREALLOC,
    "IPv6 identity CIDRs",
);
/// (slot, src, dst, protocol, exact port) → rule.
pub const RULES_EXACT: MapSpec = spec(
    "TG_RULES_EXACT",
    MapKind::Hash,
    size::<RuleKey>(),
    size::<RuleValue>(),
    capacity::RULE_EXACT_ENTRIES,
    BPF_F_NO_PREALLOC,
    "rules on exact ports",
);
/// (slot, src, dst, protocol, port prefix) → rule: port ranges, any port, any protocol.
pub const RULES: MapSpec = spec(
    "TG_RULES",
    MapKind::LpmTrie,
    lpm::<RuleKey>(),
    size::<RuleValue>(),
    capacity::RULE_ENTRIES,
    BPF_F_NO_PREALLOC,
    "rules on port ranges and any port",
);
/// IPv4 5-tuple → tracked flow.
pub const CONNTRACK_V4: MapSpec = MapSpec {
    sized_at_load: true,
    ..spec(
        "TG_CONNTRACK_V4",
        MapKind::LruHash,
        size::<FlowKeyV4>(),
        size::<FlowValue>(),
        capacity::CONNTRACK_ENTRIES,
        0,
        "tracked IPv4 flows (two entries per flow)",
    )
};
/// IPv6 5-tuple → tracked flow.
pub const CONNTRACK_V6: MapSpec = MapSpec {
    sized_at_load: true,
    ..spec(
        "TG_CONNTRACK_V6",
        MapKind::LruHash,
        size::<FlowKey>(),
        size::<FlowValue>(),
        capacity::CONNTRACK_ENTRIES,
        0,
        "tracked IPv6 flows (two entries per flow)",
    )
};
/// Per-CPU packet counters.
pub const COUNTERS: MapSpec = spec(
    "TG_COUNTERS",
    MapKind::PerCpuArray,
    4,
    8,
    COUNTER_SLOTS,
    0,
    "packet counters per verdict",
);
/// Flow events for the agent.
pub const EVENTS: MapSpec = spec(
    "TG_EVENTS",
    MapKind::RingBuf,
    0,
    0,
    capacity::EVENTS_BYTES,
    0,
    "flow event ring buffer (bytes)",
);
/// Per-CPU deny-event sampler (see [`crate::sample`]).
pub const EVENT_SAMPLER: MapSpec = spec(
    "TG_EVT_SAMPLER",
    MapKind::PerCpuArray,
    4,
    size::<SamplerSlot>(),
    SAMPLER_SLOTS,
    0,
    "deny-event sampler slots",
);
/// `[0]` (per CPU) = the event being reported: written by the classifier, read by the global
/// function that samples and sends it (which can take only scalar arguments).
pub const EVENT_DRAFT: MapSpec = spec(
    "TG_EVT_DRAFT",
    MapKind::PerCpuArray,
    4,
    size::<FlowEvent>(),
    1,
    0,
    "event being reported (scratch)",
);
/// ifindex → interface settings.
pub const INTERFACES: MapSpec = spec(
    "TG_INTERFACES",
    MapKind::Hash,
    4,
    size::<InterfaceValue>(),
    capacity::INTERFACE_ENTRIES,
    0,
    "described interfaces",
);
/// `[0]` = the last `tollgate check` result.
pub const CHECK: MapSpec = spec(
    "TG_CHECK",
    MapKind::Array,
    4,
    size::<CheckResult>(),
    1,
    0,
    "result of the last check",
);

/// `[limit id]` = [`LimitBucket`]: the rate limits' configuration and token buckets. Index 0
/// is never used (0 is "no limit").
pub const LIMITS: MapSpec = spec(
    "TG_LIMITS",
    MapKind::Array,
    4,
    size::<LimitBucket>(),
    capacity::LIMIT_ENTRIES,
    0,
    "rate-limit buckets",
);

/// Pair key of (source SPIFFE ID, destination SPIFFE ID) → proof of a mutual-TLS handshake
/// between the pair, until when it holds (see `auth`).
pub const AUTH: MapSpec = spec(
    "TG_AUTH",
    MapKind::Hash,
    size::<AuthKey>(),
    size::<AuthValue>(),
    capacity::AUTH_ENTRIES,
    BPF_F_NO_PREALLOC,
    "authenticated identity pairs",
);

/// Every map the agent pins, checks, adopts and removes on uninstall.
pub const ALL: [MapSpec; 18] = [
    ACTIVE,
    SLOT_CONFIG,
    IDENTITY_V4_EXACT,
    IDENTITY_V6_EXACT,
    IDENTITY_V4,
    IDENTITY_V6,
    RULES_EXACT,
    RULES,
    CONNTRACK_V4,
    CONNTRACK_V6,
    COUNTERS,
    EVENTS,
    EVENT_SAMPLER,
    EVENT_DRAFT,
    INTERFACES,
    CHECK,
    LIMITS,
    AUTH,
];

/// The registry entry named `name`.
pub fn by_name(name: &str) -> Option<&'static MapSpec> {
    ALL.iter().find(|s| s.name.as_bytes() == name.as_bytes())
}

/// Map capacities: the one place they are stated.
pub mod capacity {
    /// Identity CIDR entries per address family (LPM), both slots together.
    pub const IDENTITY_ENTRIES: u32 = 131_072;
    /// Single-address identity entries per address family (exact), both slots together: 100k
    /// pod addresses in each slot during a swap, with room to spare.
    pub const IDENTITY_EXACT_ENTRIES: u32 = 262_144;
    /// Rule entries on exact ports, both slots together.
    pub const RULE_EXACT_ENTRIES: u32 = 524_288;
    /// Rule entries on port prefixes (ranges, any port), both slots together.
    pub const RULE_ENTRIES: u32 = 524_288;
    /// Tracked flow entries per address family by default (two per flow; LRU, the least
    /// recently used are evicted first). `tollgate agent --conntrack-entries` changes it.
    pub const CONNTRACK_ENTRIES: u32 = 131_072;
    /// The smallest and largest `--conntrack-entries` accepted.
    pub const CONNTRACK_MIN: u32 = 1_024;
    /// 4 Mi entries of the IPv6 map preallocate about 600 MB of kernel memory.
    pub const CONNTRACK_MAX: u32 = 4_194_304;
    /// Ring buffer for flow events, in bytes (a power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Interfaces with settings (enforced interfaces of the node).
    pub const INTERFACE_ENTRIES: u32 = 16_384;
    /// Rate-limit buckets (ids 1..), both policy slots together: a limit that did not change
    /// keeps its bucket across a swap, a changed one needs a second bucket until the next.
    /// 184 bytes each, preallocated: 3 MB.
    pub const LIMIT_ENTRIES: u32 = 16_384;
    /// Authenticated identity pairs.
    pub const AUTH_ENTRIES: u32 = 65_536;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_the_kernel_limit() {
        let specs = &ALL;
        for (i, a) in specs.iter().enumerate() {
            // BPF_OBJ_NAME_LEN is 16 including the NUL.
            assert!(a.name.len() <= 15, "{} is too long for a map name", a.name);
            for b in &specs[i + 1..] {
                assert_ne!(a.name, b.name);
            }
        }
    }

    #[test]
    fn lookups_find_every_map() {
        for s in &ALL {
            assert_eq!(by_name(s.name), Some(s));
        }
        assert_eq!(by_name("TG_NOPE"), None);
    }

    #[test]
    fn lpm_keys_carry_the_prefix_length() {
        assert_eq!(IDENTITY_V4.key_size, 4 + 8);
        assert_eq!(IDENTITY_V6.key_size, 4 + 20);
        assert_eq!(RULES.key_size, 4 + 16);
        assert_eq!(RULES_EXACT.key_size, 16);
    }

    #[test]
    fn only_conntrack_is_sized_at_load() {
        let sized: usize = ALL.iter().filter(|s| s.sized_at_load).count();
        assert_eq!(sized, 2);
        assert_eq!(CONNTRACK_V4.key_size, 16);
        assert_eq!(CONNTRACK_V6.key_size, 40);
    }
}
