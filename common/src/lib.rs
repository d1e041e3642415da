//! The kernel/userspace contract of Tollgate.
//!
//! Everything the eBPF programs and the agent must agree on lives here: map and program names,
//! the `#[repr(C)]` keys and values of every map (explicit padding, size asserted at compile
//! time), and the pure decision logic both sides run, so that `tollgate check` answers with the
//! same code the kernel executes. The crate is `no_std`; the `user` feature adds `aya::Pod`
//! impls for the agent.

#![no_std]

pub mod auth;
pub mod decision;
pub mod flow;
pub mod identity;
pub mod interface;
pub mod maps;
pub mod ports;
pub mod ratelimit;
pub mod rule;
pub mod sampler;
pub mod tcp;
pub mod time;
pub mod verdict;

pub use auth::{AuthKey, AuthValue};
pub use decision::{decide, Decision};
pub use flow::{FlowEvent, FlowKey, FlowKeyV4, FlowValue};
pub use identity::{IdentityKeyV4, IdentityKeyV6, IdentityValue};
pub use interface::InterfaceValue;
pub use maps::capacity;
pub use ratelimit::{LimitBucket, LimitRate};
pub use rule::{RuleKey, RuleValue};
pub use sampler::{sample, SamplerSlot, SAMPLER_SLOTS};
pub use verdict::Verdict;

/// Bumped whenever a map layout or a map's meaning changes. It is written to
/// `TG_ACTIVE[ACTIVE_ABI_INDEX]` when the maps are created; a starting agent refuses to adopt pinned maps of another ABI version
/// instead of misreading them (the way out: `tollgate agent --uninstall`, then start).
///
/// 3: exact-match identity and rule maps beside the LPM tries, conntrack split by address
/// family, the ABI version in `TG_ACTIVE`, the deny-event sampler, `SlotConfig::lookup_flags`.
/// 4: rate limits: `TG_LIMITS`, limit ids in identity entries and conntrack entries, the
/// rate-limit verdicts and counters, limits in `CheckResult` and `FlowEvent`.
/// 5: authentication: `TG_AUTH`, `RuleValue::auth_pair`, the `DenyAuthRequired` verdict (which moves the counters after
/// the verdicts), `CheckResult::auth_state`, `FlowEvent::flags`.
pub const ABI_VERSION: u32 = 5;

/// Names of the maps as they appear in the object file and as pin file names under
/// `<bpffs>/maps/`, taken from the registry in [`maps`].
pub mod map_names {
    use crate::maps;

    pub const ACTIVE: &str = maps::ACTIVE.name;
    pub const SLOT_CONFIG: &str = maps::SLOT_CONFIG.name;
    pub const IDENTITY_V4_EXACT: &str = maps::IDENTITY_V4_EXACT.name;
    pub const IDENTITY_V6_EXACT: &str = maps::IDENTITY_V6_EXACT.name;
    pub const IDENTITY_V4: &str = maps::IDENTITY_V4.name;
    pub const IDENTITY_V6: &str = maps::IDENTITY_V6.name;
    pub const RULES_EXACT: &str = maps::RULES_EXACT.name;
    pub const RULES: &str = maps::RULES.name;
    pub const CONNTRACK_V4: &str = maps::CONNTRACK_V4.name;
    pub const CONNTRACK_V6: &str = maps::CONNTRACK_V6.name;
    pub const COUNTERS: &str = maps::COUNTERS.name;
    pub const EVENTS: &str = maps::EVENTS.name;
    pub const EVENT_SAMPLER: &str = maps::EVENT_SAMPLER.name;
    pub const EVENT_DRAFT: &str = maps::EVENT_DRAFT.name;
    pub const INTERFACES: &str = maps::INTERFACES.name;
    pub const CHECK: &str = maps::CHECK.name;
    pub const LIMITS: &str = maps::LIMITS.name;
    pub const AUTH: &str = maps::AUTH.name;
}

/// Program (function) names in the object file.
pub mod program_names {
    pub const TC_INGRESS: &str = "tollgate_ingress";
    pub const TC_EGRESS: &str = "tollgate_egress";
    /// A classifier that only returns `TC_ACT_OK`: the baseline of `cargo xtask bench`. The
    /// agent never loads it.
    pub const TC_BASELINE: &str = "tollgate_baseline";
    /// Benchmark floors (`cargo xtask bench`): the header parse alone, and the parse plus one
    /// conntrack lookup. Never loaded by the agent.
    pub const FLOOR_PARSE: &str = "tollgate_floor_parse";
    pub const FLOOR_LOOKUP: &str = "tollgate_floor_lookup";
    /// `tollgate check`: never attached; the agent runs it with BPF_PROG_TEST_RUN on a packet it
    /// crafts, and it writes the decision to `TG_CHECK`.
    pub const TC_CHECK: &str = "tollgate_check";
}

/// Key of the single entry in `TG_ACTIVE`, which holds the active policy generation as a `u64`.
/// Generation 0 means "no policy loaded": every IP packet is denied.
pub const ACTIVE_GENERATION_INDEX: u32 = 0;

/// Key of the entry in `TG_ACTIVE` that holds the `ABI_VERSION` the maps were created for (0:
/// not written yet), written once by the agent that creates them.
pub const ACTIVE_ABI_INDEX: u32 = 1;

/// Key of the entry in `TG_ACTIVE` that holds the length of a jiffy in nanoseconds (the
/// kernel's tick, 1 s / CONFIG_HZ), written by the agent when it creates the maps. The datapath
/// tells idle time by `jiffies × this`: reading jiffies is one load, where the coarse clock
/// helper cost about 19 ns a packet here. 0: not known, the datapath uses the coarse clock.
pub const ACTIVE_NS_PER_JIFFY_INDEX: u32 = 2;

/// Entries of `TG_ACTIVE`.
pub const ACTIVE_ENTRIES: u32 = 3;

/// Two slots: the live policy and the one being built beside it. A generation's slot is its
/// lowest bit, so flipping `TG_ACTIVE` to the next generation switches slot with one 8-byte
/// write and no packet ever sees a mix of two policies.
pub const SLOT_COUNT: u32 = 2;

#[inline(always)]
pub const fn slot_of(generation: u64) -> u32 {
    (generation & 1) as u32
}

/// Per-slot settings, `TG_SLOT_CONFIG[slot]`, written before the slot becomes active.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// The generation this slot was built for (a consistency check for the datapath).
    pub generation: u64,
    /// `POLICY_FLAG_*`.
    pub flags: u32,
    /// `LOOKUP_*`: which prefix maps hold entries of this slot. A lookup that misses the exact
    /// map skips a trie this slot has nothing in.
    pub lookup_flags: u32,
}
const _: () = assert!(core::mem::size_of::<SlotConfig>() == 16);

/// The policy's `mode: audit`: a default deny becomes a would-deny (counted, reported, passed).
pub const POLICY_FLAG_AUDIT: u32 = 1 << 0;

/// `SlotConfig::lookup_flags`: the slot has IPv4 identity CIDRs in `TG_IDENTITY_V4`.
pub const LOOKUP_IDENTITY_V4_CIDRS: u32 = 1 << 0;
/// The slot has IPv6 identity CIDRs in `TG_IDENTITY_V6`.
pub const LOOKUP_IDENTITY_V6_CIDRS: u32 = 1 << 1;
/// The slot has rules on port prefixes (ranges, any port, any protocol) in `TG_RULES`.
pub const LOOKUP_RULE_PREFIXES: u32 = 1 << 2;

/// What `tollgate_check` decided, in `TG_CHECK[0]`. The agent runs one check at a time and
/// clears the entry to `CHECK_PENDING` first, so a run that wrote nothing is noticed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// `Verdict` as u32.
    pub verdict: u32,
    /// The deciding rule (0: default deny, or none for verdicts decided before the rules).
    pub rule_id: u32,
    /// 0 when the check stopped before resolving identities.
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The generation whose slot was read.
    pub generation: u64,
    /// CLOCK_BOOTTIME expiry the decision carries (0: never).
    pub expires_ns: u64,
    /// The rate limits an admitted flow would be metered by (`TG_LIMITS` ids, 0: none): the
    /// deciding rule's, the source identity's quota (the flow's packets), the destination
    /// identity's quota (its replies).
    pub rule_limit: u32,
    pub src_limit: u32,
    pub dst_limit: u32,
    /// `auth::state::*`: whether the deciding rule requires authentication and whether a valid
    /// entry admits the pair.
    pub auth_state: u32,
}
const _: () = assert!(core::mem::size_of::<CheckResult>() == 48);

/// `CheckResult::verdict` before the check program has run.
pub const CHECK_PENDING: u32 = u32::MAX;

/// `skb->mark` bit for `tollgate_check`: validate the source as on ingress of the packet's
/// interface (set when `check --interface` is given). The check program is never attached, so
/// no real packet's mark reaches it.
pub const CHECK_MARK_VALIDATE_SOURCE: u32 = 1 << 0;

/// IP protocol numbers the datapath understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Direction of the hook a packet was seen at, as recorded in events.
pub mod direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// Implements `aya::Pod` for the userspace side. Every type listed is `#[repr(C)]` with explicit
/// padding and a size assertion, so any byte pattern is a valid value.
#[cfg(feature = "user")]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $(
            // SAFETY: repr(C), no implicit padding (asserted next to each type), only integers.
            unsafe impl aya::Pod for $t {}
        )* };
    }
    pod!(
        SlotConfig,
        IdentityKeyV4,
        IdentityKeyV6,
        IdentityValue,
        RuleKey,
        RuleValue,
        FlowKey,
        FlowKeyV4,
        FlowValue,
        FlowEvent,
        InterfaceValue,
        CheckResult,
        SamplerSlot,
        LimitBucket,
        AuthKey,
        AuthValue,
    );
}
