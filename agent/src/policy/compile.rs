//! Compiles a validated [`Policy`] into the entries of the identity tries (`TG_IDENTITY_V4`,
//! `TG_IDENTITY_V6`) and the rule trie (`TG_RULES`) of one slot, plus the tables that turn the
//! ids in events back into names. This is where overlapping rules are resolved: the kernel's
//! longest-prefix match picks the most specific entry, so for each identity pair and protocol
//! the compiler splits the rules' port ranges into disjoint pieces and gives each piece to the
//! one rule that should decide it (latest expiry, then enforce before audit, then policy order).
//! A narrower grant can therefore never shadow a broader, longer-lived one. Runs in
//! O(n log n) in the number of rules and CIDRs.
//!
//! Rate limits compile to [`CompiledLimit`]s, one per rule `rateLimit` and per identity quota.
//! Entries refer to them by position (`limit_id` = index in [`CompiledPolicy::limits`] + 1, 0
//! for none); the loader turns positions into `TG_LIMITS` bucket ids, keeping the bucket of a
//! limit whose [`CompiledLimit::fingerprint`] the live policy already has.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    mem::MaybeUninit,
    net::IpAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use tollgate_common::{
    auth::NO_PAIR,
    identity::{
        is_exact_identity, IdentityId, IDENTITY_AMBIGUOUS, IDENTITY_FIRST_USER,
        IDENTITY_FLAG_NODE_ADDRESS, IDENTITY_HOST, IDENTITY_WORLD, SLOT_PREFIX_BITS,
    },
    ports::for_each_prefix,
    ratelimit::{self, LIMIT_FLAG_AUDIT, LIMIT_KINDS},
    rule::{
        is_exact_rule, RuleId, RULE_FLAG_ALLOW, RULE_FLAG_AUDIT, RULE_FLAG_AUTH_MTLS,
        RULE_FLAG_LOG, RULE_ID_NONE, RULE_PAIR_PREFIX_BITS, RULE_PROTO_PREFIX_BITS,
    },
    time::{wall_to_boot_ns, NEVER},
    IdentityKeyV4, IdentityKeyV6, IdentityValue, RuleKey, RuleValue, LOOKUP_IDENTITY_V4_CIDRS,
    LOOKUP_IDENTITY_V6_CIDRS, LOOKUP_RULE_PREFIXES, POLICY_FLAG_AUDIT,
};

use super::{validate::net_range, KindLimit, Mode, Policy, Protocol, RateLimit};

/// One simultaneous reading of the wall clock and the boot clock: policies state expiries in
/// wall-clock time, the kernel compares them with CLOCK_BOOTTIME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    pub realtime_ns: u64,
    pub boottime_ns: u64,
}

impl ClockReading {
    /// Reads CLOCK_REALTIME and CLOCK_BOOTTIME back to back.
    pub fn now() -> Self {
        Self {
            realtime_ns: read_clock(libc::CLOCK_REALTIME),
            boottime_ns: read_clock(libc::CLOCK_BOOTTIME),
        }
    }

    /// CLOCK_BOOTTIME nanoseconds of a wall-clock instant; never 0 (which means "never"), an
    /// instant before boot is 1 (already expired).
    pub fn boot_ns(&self, at: SystemTime) -> u64 {
        let unix_ns = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        wall_to_boot_ns(unix_ns, self.realtime_ns, self.boottime_ns)
    }
}

fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: clock_gettime writes a whole timespec to a valid pointer, and we only read it when
    // it reports success.
    let rc = unsafe { libc::clock_gettime(clock, ts.as_mut_ptr()) };
    // Both clocks exist on every kernel that can run the datapath (BOOTTIME since 2.6.39). A
    // made-up reading would shift every expiry, so there is no sensible fallback.
    assert_eq!(
        rc,
        0,
        "clock_gettime({clock}) failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: initialised by the successful call above.
    let ts = unsafe { ts.assume_init() };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Everything the loader writes into one slot, and the names events are reported with.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub slot: u32,
    /// `POLICY_FLAG_AUDIT` if the policy's mode is audit.
    pub flags: u32,
    /// (LPM prefix_len including the 32 slot bits, key, value).
    pub identities_v4: Vec<(u32, IdentityKeyV4, IdentityValue)>,
    pub identities_v6: Vec<(u32, IdentityKeyV6, IdentityValue)>,
    /// The value of declared identity `i` (id `IDENTITY_FIRST_USER + i`): what the addresses a
    /// selector gives it at run time are written with.
    pub identity_values: Vec<IdentityValue>,
    /// (LPM prefix_len, key, value). No two entries of one pair and protocol overlap.
    pub rules: Vec<(u32, RuleKey, RuleValue)>,
    /// The rate limits: rules' `rateLimit` in rule order, then `spec.rateLimits` in file order.
    /// `limit_id` N in the entries above is `limits[N - 1]`; 0 is none.
    pub limits: Vec<CompiledLimit>,
    /// What the numbers in the maps mean; kept after the entries are written, so that events
    /// and `check` name rules and identities as this generation numbered them.
    pub names: Arc<PolicyNames>,
}

impl CompiledPolicy {
    /// `LOOKUP_*`: which prefix tries this policy has entries in. Entries go to the exact maps
    /// or the tries by their prefix length (`is_exact_identity`, `is_exact_rule`), and the
    /// datapath skips a trie this says is empty.
    pub fn lookup_flags(&self) -> u32 {
        let mut flags = 0;
        if self
            .identities_v4
            .iter()
            .any(|(prefix, _, _)| !is_exact_identity(4, *prefix))
        {
            flags |= LOOKUP_IDENTITY_V4_CIDRS;
        }
        if self
            .identities_v6
            .iter()
            .any(|(prefix, _, _)| !is_exact_identity(6, *prefix))
        {
            flags |= LOOKUP_IDENTITY_V6_CIDRS;
        }
        if self
            .rules
            .iter()
            .any(|(prefix, _, _)| !is_exact_rule(*prefix))
        {
            flags |= LOOKUP_RULE_PREFIXES;
        }
        flags
    }

    /// The identity interface `name` is bound to, or 0 when it is not bound.
    pub fn bound_identity(&self, name: &str) -> IdentityId {
        self.names.bound_identity(name)
    }
}

/// Whose a rate limit is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitOwner {
    /// A rule's `rateLimit`, by rule name.
    Rule(String),
    /// A quota of `spec.rateLimits`, by identity name (a declared identity or `host`).
    Identity(String),
}

impl fmt::Display for LimitOwner {
    /// `rule login`, `identity frontend`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitOwner::Rule(name) => write!(f, "rule {name}"),
            LimitOwner::Identity(name) => write!(f, "identity {name}"),
        }
    }
}

/// One rate limit as the loader installs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLimit {
    pub owner: LimitOwner,
    /// As written, for display ([`RateLimit::describe`]).
    pub limit: RateLimit,
    /// Indexed by `ratelimit::kind::*`, defaults applied.
    pub kinds: [Option<KindLimit>; LIMIT_KINDS],
    /// `LIMIT_FLAG_AUDIT` or 0.
    pub flags: u32,
    /// `ratelimit::fingerprint` of a canonical text of the owner, the kinds and the flags:
    /// the same in every compile of the same limit, whatever else the policy holds, and
    /// different when any of them changes. A policy swap keeps the bucket (its token state) of
    /// a limit whose fingerprint the live policy has.
    pub fingerprint: u64,
    /// Some entry names it. A rule limit is unused when other rules decide all of its rule's
    /// traffic (see `rank`); an unused limit gets no bucket, and the agent warns of it.
    pub used: bool,
}

impl CompiledLimit {
    fn new(owner: LimitOwner, limit: &RateLimit, audit: bool) -> Self {
        let kinds = limit.kinds();
        let flags = if audit { LIMIT_FLAG_AUDIT } else { 0 };
        let fingerprint = ratelimit::fingerprint(Self::canonical(&owner, &kinds, flags).as_bytes());
        Self {
            owner,
            limit: limit.clone(),
            kinds,
            flags,
            fingerprint,
            used: true,
        }
    }

    /// The text the fingerprint hashes, count/period in ns/burst per kind:
    /// `v1;rule login;flags=0;packets=-;bytes=-;connections=5/60000000000/5`. Numbers as the kernel will use them, so
    /// `connectionsPerMinute: 60` and `connectionsPerSecond: 1` differ (their default bursts
    /// do too). Owner names are DNS labels, so no name can forge a separator.
    fn canonical(
        owner: &LimitOwner,
        kinds: &[Option<KindLimit>; LIMIT_KINDS],
        flags: u32,
    ) -> String {
        let mut text = format!("v1;{owner};flags={flags}");
        for (k, kind) in kinds.iter().enumerate() {
            let name = ratelimit::kind::NAMES[k];
            match kind {
                Some(l) => {
                    text.push_str(&format!(";{name}={}/{}/{}", l.count, l.period_ns, l.burst))
                }
                None => text.push_str(&format!(";{name}=-")),
            }
        }
        text
    }
}

/// The limits of `policy` in [`CompiledPolicy::limits`] order, and the `limit_id` (position +
/// 1, or 0) each rule, each declared identity (by index) and `host` carry.
struct Limits {
    limits: Vec<CompiledLimit>,
    by_rule: Vec<u32>,
    by_identity: Vec<u32>,
    host: u32,
}

fn compile_limits(policy: &Policy) -> Limits {
    let policy_audit = policy.mode == Mode::Audit;
    let mut limits = Vec::new();
    let mut by_rule = vec![0; policy.rules.len()];
    for (i, rule) in policy.rules.iter().enumerate() {
        if let Some(limit) = &rule.rate_limit {
            let audit = policy_audit || rule.mode == Some(Mode::Audit);
            limits.push(CompiledLimit::new(
                LimitOwner::Rule(rule.name.clone()),
                limit,
                audit,
            ));
            by_rule[i] = limits.len() as u32;
        }
    }
    let index: HashMap<&str, usize> = policy
        .identities
        .iter()
        .enumerate()
        .map(|(i, identity)| (identity.name.as_str(), i))
        .collect();
    let mut by_identity = vec![0; policy.identities.len()];
    let mut host = 0;
    for quota in &policy.rate_limits {
        let audit = policy_audit || quota.mode == Some(Mode::Audit);
        let slot = match quota.identity.as_str() {
            "host" => &mut host,
            name => match index.get(name) {
                Some(&i) => &mut by_identity[i],
                // Validation rejects quotas of unknown identities and of `world`.
                None => {
                    debug_assert!(false, "quota of unknown identity {name}");
                    continue;
                }
            },
        };
        limits.push(CompiledLimit::new(
            LimitOwner::Identity(quota.identity.clone()),
            &quota.limit,
            audit,
        ));
        *slot = limits.len() as u32;
    }
    Limits {
        limits,
        by_rule,
        by_identity,
        host,
    }
}

/// The names behind one generation's numbers.
#[derive(Debug, Clone, Default)]
pub struct PolicyNames {
    /// Rule id N (1-based) is `rule_names[N - 1]`.
    pub rule_names: Vec<String>,
    /// Every identity id, host and world included, sorted by id.
    pub identity_names: Vec<(u32, String)>,
    /// Interface name → the identity it is bound to, sorted by name.
    pub bindings: Vec<(String, IdentityId)>,
}

impl PolicyNames {
    /// 0 is `default-deny`; an id this policy does not have is `unknown`.
    pub fn rule_name(&self, id: u32) -> &str {
        if id == RULE_ID_NONE {
            return "default-deny";
        }
        self.rule_names
            .get(id as usize - 1)
            .map_or("unknown", String::as_str)
    }

    /// An id this policy does not have is `unknown`.
    pub fn identity_name(&self, id: u32) -> &str {
        match self.identity_names.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(i) => &self.identity_names[i].1,
            Err(_) => "unknown",
        }
    }

    /// The identity interface `name` is bound to, or 0 when it is not bound.
    pub fn bound_identity(&self, name: &str) -> IdentityId {
        self.bindings
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .map_or(0, |i| self.bindings[i].1)
    }
}

/// Compiles for `slot`. `host_addrs` are the addresses configured on the node; each one that no
/// declared identity's CIDR covers becomes a /32 or /128 `host` entry (a declared identity
/// wins: a node address inside `10.0.0.0/8` of identity `lan` stays `lan`).
pub fn compile_policy(
    policy: &Policy,
    slot: u32,
    clock: &ClockReading,
    host_addrs: &[IpAddr],
) -> CompiledPolicy {
    let mut ids: HashMap<&str, IdentityId> = HashMap::with_capacity(policy.identities.len() + 2);
    let mut identity_names = Vec::with_capacity(policy.identities.len() + 2);
    identity_names.push((IDENTITY_HOST, "host".to_owned()));
    identity_names.push((IDENTITY_WORLD, "world".to_owned()));
    identity_names.push((IDENTITY_AMBIGUOUS, "ambiguous".to_owned()));
    for (i, identity) in policy.identities.iter().enumerate() {
        let id = IDENTITY_FIRST_USER + i as u32;
        ids.insert(&identity.name, id);
        identity_names.push((id, identity.name.clone()));
    }
    // After the declared ones, so the reserved names always mean the reserved ids.
    ids.insert("host", IDENTITY_HOST);
    ids.insert("world", IDENTITY_WORLD);

    let limits = compile_limits(policy);
    let (identities_v4, identities_v6) = identity_entries(policy, slot, host_addrs, &limits);
    let mut bindings: Vec<(String, IdentityId)> = policy
        .identities
        .iter()
        .enumerate()
        .flat_map(|(i, identity)| {
            let id = IDENTITY_FIRST_USER + i as u32;
            identity
                .interfaces
                .iter()
                .map(move |name| (name.clone(), id))
        })
        .collect();
    bindings.sort();
    let rules = rule_entries(policy, slot, clock, &ids, &limits.by_rule);
    let identity_values: Vec<IdentityValue> = (0..policy.identities.len())
        .map(|i| IdentityValue {
            id: IDENTITY_FIRST_USER + i as u32,
            flags: 0,
            limit_id: limits.by_identity[i],
            ..Default::default()
        })
        .collect();
    // A selector's pods get entries at run time, carrying the identity's quota.
    let selected = policy
        .identities
        .iter()
        .zip(&identity_values)
        .filter(|(identity, _)| identity.selector.is_some())
        .map(|(_, v)| v.limit_id);
    let mut compiled_limits = limits.limits;
    let mut used = vec![false; compiled_limits.len()];
    let positions = rules
        .iter()
        .map(|(_, _, v)| v.limit_id)
        .chain(identities_v4.iter().map(|(_, _, v)| v.limit_id))
        .chain(identities_v6.iter().map(|(_, _, v)| v.limit_id))
        .chain(selected);
    for position in positions.filter(|&p| p != 0) {
        used[position as usize - 1] = true;
    }
    for (limit, used) in compiled_limits.iter_mut().zip(used) {
        limit.used = used;
    }
    CompiledPolicy {
        slot,
        flags: match policy.mode {
            Mode::Audit => POLICY_FLAG_AUDIT,
            Mode::Enforce => 0,
        },
        identities_v4,
        identities_v6,
        identity_values,
        rules,
        limits: compiled_limits,
        names: Arc::new(PolicyNames {
            rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
            identity_names,
            bindings,
        }),
    }
}

type IdentityEntriesV4 = Vec<(u32, IdentityKeyV4, IdentityValue)>;
type IdentityEntriesV6 = Vec<(u32, IdentityKeyV6, IdentityValue)>;

/// Every entry of an identity with a quota carries its `limit_id`: its CIDRs and the node
/// addresses it claims, and for `host` the node addresses nobody claims.
fn identity_entries(
    policy: &Policy,
    slot: u32,
    host_addrs: &[IpAddr],
    limits: &Limits,
) -> (IdentityEntriesV4, IdentityEntriesV6) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    // An identity may list a CIDR twice; one entry is enough.
    let mut seen: HashSet<IpNet> = HashSet::new();
    let mut covered_v4 = Vec::new();
    let mut covered_v6 = Vec::new();
    for (i, identity) in policy.identities.iter().enumerate() {
        let value = IdentityValue {
            id: IDENTITY_FIRST_USER + i as u32,
            flags: 0,
            limit_id: limits.by_identity[i],
            ..Default::default()
        };
        for net in &identity.cidrs {
            if !seen.insert(*net) {
                continue;
            }
            let prefix_len = SLOT_PREFIX_BITS + u32::from(net.prefix_len());
            match net {
                IpNet::V4(n) => {
                    let key = IdentityKeyV4 {
                        slot,
                        addr: n.network().octets(),
                    };
                    v4.push((prefix_len, key, value));
                    covered_v4.push(net_range(net));
                }
                IpNet::V6(n) => {
                    let key = IdentityKeyV6 {
                        slot,
                        addr: n.network().octets(),
                    };
                    v6.push((prefix_len, key, value));
                    covered_v6.push(net_range(net));
                }
            }
        }
    }

    let covered_v4 = merge_ranges(covered_v4);
    let covered_v6 = merge_ranges(covered_v6);
    let host = IdentityValue {
        id: IDENTITY_HOST,
        flags: 0,
        limit_id: limits.host,
        ..Default::default()
    };
    let mut seen_host: HashSet<IpAddr> = HashSet::new();
    for addr in host_addrs {
        if !seen_host.insert(*addr) {
            continue;
        }
        let covered = match addr {
            IpAddr::V4(a) => is_covered(&covered_v4, u32::from(*a).into()),
            IpAddr::V6(a) => is_covered(&covered_v6, u128::from(*a)),
        };
        // A node address nobody claims is `host`. One a declared identity claims keeps that
        // identity, but gets an entry of its own marked as the node's: the datapath refuses it
        // from an uplink, as it refuses `host`.
        let value = if covered {
            match claiming_identity(policy, *addr) {
                Some(id) => IdentityValue {
                    id,
                    flags: IDENTITY_FLAG_NODE_ADDRESS,
                    limit_id: limits.by_identity[(id - IDENTITY_FIRST_USER) as usize],
                    ..Default::default()
                },
                None => continue,
            }
        } else {
            host
        };
        match addr {
            IpAddr::V4(a) => {
                let key = IdentityKeyV4 {
                    slot,
                    addr: a.octets(),
                };
                upsert(&mut v4, (SLOT_PREFIX_BITS + 32, key, value));
            }
            IpAddr::V6(a) => {
                let key = IdentityKeyV6 {
                    slot,
                    addr: a.octets(),
                };
                upsert(&mut v6, (SLOT_PREFIX_BITS + 128, key, value));
            }
        }
    }
    (v4, v6)
}

/// The declared identity whose CIDR contains `addr` (at most one, by validation).
fn claiming_identity(policy: &Policy, addr: IpAddr) -> Option<IdentityId> {
    policy
        .identities
        .iter()
        .position(|i| i.cidrs.iter().any(|net| net.contains(&addr)))
        .map(|i| IDENTITY_FIRST_USER + i as u32)
}

/// Adds `entry`, or, where an entry with the same key and prefix exists (an identity that
/// lists the node's address itself), marks that one with `entry`'s flags.
fn upsert<K: PartialEq>(
    entries: &mut Vec<(u32, K, IdentityValue)>,
    entry: (u32, K, IdentityValue),
) {
    match entries
        .iter_mut()
        .find(|(prefix, key, _)| *prefix == entry.0 && *key == entry.1)
    {
        Some(existing) => existing.2.flags |= entry.2.flags,
        None => entries.push(entry),
    }
}

/// Sorted, disjoint, non-adjacent-merged union of inclusive ranges.
fn merge_ranges(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn is_covered(merged: &[(u128, u128)], addr: u128) -> bool {
    let after = merged.partition_point(|&(start, _)| start <= addr);
    after > 0 && merged[after - 1].1 >= addr
}

/// Which rule decides where several cover the same traffic; lower wins. In order: latest expiry
/// (a rule that never expires is latest of all), so a short grant never hides a standing rule;
/// then enforce before audit, so an audit rule never weakens an enforced one; then a rule with a
/// `rateLimit` before one without, so a limit is never lifted by a rule that merely allows the
/// same traffic as long; then a rule that requires authentication before one without, for the
/// same reason; then policy order, so the result is deterministic.
type Rank = (u128, bool, bool, bool, usize);

fn rank(policy: &Policy, index: usize) -> Rank {
    let rule = &policy.rules[index];
    let expiry_order = match rule.expires {
        None => 0,
        Some(t) => u128::MAX - t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    };
    (
        expiry_order,
        rule.mode == Some(Mode::Audit),
        rule.rate_limit.is_none(),
        rule.authentication.is_none(),
        index,
    )
}

/// The protocols that have their own entries, in output order.
const CONCRETE_PROTOCOLS: [Protocol; 4] = [
    Protocol::Icmp,
    Protocol::Tcp,
    Protocol::Udp,
    Protocol::IcmpV6,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortInterval {
    first: u16,
    last: u16,
    rule: usize,
}

fn rule_entries(
    policy: &Policy,
    slot: u32,
    clock: &ClockReading,
    ids: &HashMap<&str, IdentityId>,
    limit_ids: &[u32],
) -> Vec<(u32, RuleKey, RuleValue)> {
    let ranks: Vec<Rank> = (0..policy.rules.len()).map(|i| rank(policy, i)).collect();
    let expiries: Vec<u64> = policy
        .rules
        .iter()
        .map(|r| r.expires.map_or(NEVER, |t| clock.boot_ns(t)))
        .collect();
    let pair_keys: Vec<u64> = {
        let spiffe: HashMap<&str, &str> = policy
            .identities
            .iter()
            .filter_map(|i| Some((i.name.as_str(), i.spiffe_id.as_deref()?)))
            .collect();
        policy
            .rules
            .iter()
            .map(|r| {
                match (
                    r.authentication,
                    spiffe.get(r.from.as_str()),
                    spiffe.get(r.to.as_str()),
                ) {
                    (Some(_), Some(src), Some(dst)) => auth_pair_key(src, dst),
                    // Validation refuses authentication without both SPIFFE IDs.
                    _ => NO_PAIR,
                }
            })
            .collect()
    };
    let allow = |rule: usize| RuleValue {
        rule_id: rule as RuleId + 1,
        flags: RULE_FLAG_ALLOW
            | match policy.rules[rule].mode {
                Some(Mode::Audit) => RULE_FLAG_AUDIT,
                _ => 0,
            }
            | if policy.rules[rule].log.unwrap_or(policy.log) {
                RULE_FLAG_LOG
            } else {
                0
            }
            | match policy.rules[rule].authentication {
                Some(_) => RULE_FLAG_AUTH_MTLS,
                None => 0,
            },
        expires_ns: expiries[rule],
        limit_id: limit_ids[rule],
        _reserved: 0,
        auth_pair: pair_keys[rule],
    };

    // Group rules by identity pair by sorting, not hashing: the output comes out in pair order
    // and the same policy always compiles to the same entries.
    let mut pairs: Vec<(IdentityId, IdentityId, usize)> = Vec::with_capacity(policy.rules.len());
    for (i, rule) in policy.rules.iter().enumerate() {
        match (ids.get(rule.from.as_str()), ids.get(rule.to.as_str())) {
            (Some(&src), Some(&dst)) => pairs.push((src, dst, i)),
            // Validation rejects unknown names; a rule that names nobody allows nothing.
            _ => debug_assert!(false, "rule {} names an unknown identity", rule.name),
        }
    }
    pairs.sort_unstable();

    let mut entries = Vec::with_capacity(policy.rules.len());
    let mut by_protocol: [Vec<PortInterval>; CONCRETE_PROTOCOLS.len()] = Default::default();
    let mut any_rules: Vec<usize> = Vec::new();
    let mut sweep = PortSweep::default();
    for group in pairs.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let (src, dst) = (group[0].0, group[0].1);
        by_protocol.iter_mut().for_each(Vec::clear);
        any_rules.clear();
        let mut best_audit: Option<usize> = None;
        for &(_, _, rule) in group {
            if policy.rules[rule].mode == Some(Mode::Audit)
                && best_audit.is_none_or(|b| ranks[rule] < ranks[b])
            {
                best_audit = Some(rule);
            }
            for spec in &policy.rules[rule].ports {
                match CONCRETE_PROTOCOLS.iter().position(|p| *p == spec.protocol) {
                    Some(p) => {
                        let (first, last) = spec.port_range();
                        by_protocol[p].push(PortInterval { first, last, rule });
                    }
                    None => any_rules.push(rule),
                }
            }
        }
        any_rules.sort_unstable();
        any_rules.dedup();

        for (protocol, intervals) in CONCRETE_PROTOCOLS.iter().zip(&mut by_protocol) {
            if intervals.is_empty() {
                continue;
            }
            // A protocol entry is more specific than the pair-wide ANY entry, so ANY rules must
            // compete for this protocol's ports too or a weaker rule here would shadow them.
            intervals.extend(any_rules.iter().map(|&rule| PortInterval {
                first: 0,
                last: u16::MAX,
                rule,
            }));
            for decided in sweep.decide(intervals, &ranks) {
                for_each_prefix(decided.first, decided.last, |prefix| {
                    entries.push((
                        RULE_PROTO_PREFIX_BITS + u32::from(prefix.prefix_len),
                        RuleKey::new(slot, src, dst, protocol.number(), prefix.port),
                        allow(decided.rule),
                    ));
                });
            }
        }

        let pair_key = RuleKey::new(slot, src, dst, 0, 0);
        if let Some(&best_any) = any_rules.iter().min_by_key(|&&r| ranks[r]) {
            entries.push((RULE_PAIR_PREFIX_BITS, pair_key, allow(best_any)));
        } else if let Some(audit) = best_audit {
            // Traffic of this pair that no rule allows matches this instead of nothing, so its
            // deny is a would-deny naming the audit rule (see `decide`). It admits nothing, so
            // it carries no limit.
            let fallback = RuleValue {
                rule_id: audit as RuleId + 1,
                flags: RULE_FLAG_AUDIT,
                expires_ns: expiries[audit],
                limit_id: 0,
                _reserved: 0,
                auth_pair: NO_PAIR,
            };
            entries.push((RULE_PAIR_PREFIX_BITS, pair_key, fallback));
        }
    }
    entries
}

/// The `TG_AUTH` key of the identity pair (source SPIFFE ID, destination SPIFFE ID): the first
/// 8 bytes of SHA-256 over both, length-prefixed so no two pairs write the same bytes; never
/// `NO_PAIR`. See `tollgate_common::auth`.
pub fn auth_pair_key(src: &str, dst: &str) -> u64 {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for id in [src, dst] {
        hash.update((id.len() as u64).to_be_bytes());
        hash.update(id.as_bytes());
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    match u64::from_be_bytes(first) {
        NO_PAIR => 1,
        key => key,
    }
}

/// Scratch space for splitting overlapping port intervals, reused across pairs.
#[derive(Default)]
struct PortSweep {
    /// (position, is_start, rule); an interval [a, b] starts at a and ends at b + 1.
    events: Vec<(u32, bool, usize)>,
    /// Rules covering the current position, best first, with how many of their intervals do.
    active: BTreeMap<Rank, u32>,
    decided: Vec<PortInterval>,
}

impl PortSweep {
    /// Splits `intervals` into disjoint intervals, each given to the best-ranked rule covering
    /// it, adjacent pieces of one rule merged.
    fn decide(&mut self, intervals: &[PortInterval], ranks: &[Rank]) -> &[PortInterval] {
        self.decided.clear();
        if let [only] = intervals {
            // The common case (one exact port per pair and protocol) skips the sweep.
            self.decided.push(*only);
            return &self.decided;
        }
        self.events.clear();
        for i in intervals {
            self.events.push((u32::from(i.first), true, i.rule));
            self.events.push((u32::from(i.last) + 1, false, i.rule));
        }
        self.events.sort_unstable();
        self.active.clear();
        let mut at = 0;
        while at < self.events.len() {
            let position = self.events[at].0;
            while at < self.events.len() && self.events[at].0 == position {
                let (_, is_start, rule) = self.events[at];
                let count = self.active.entry(ranks[rule]).or_insert(0);
                if is_start {
                    *count += 1;
                } else {
                    *count -= 1;
                    if *count == 0 {
                        self.active.remove(&ranks[rule]);
                    }
                }
                at += 1;
            }
            let (Some(&(next, _, _)), Some((&(_, _, _, _, rule), _))) =
                (self.events.get(at), self.active.first_key_value())
            else {
                continue;
            };
            // The piece [position, next - 1]; positions below `next` fit in a port.
            let (first, last) = (position as u16, (next - 1) as u16);
            match self.decided.last_mut() {
                Some(prev) if prev.rule == rule && u32::from(prev.last) + 1 == position => {
                    prev.last = last;
                }
                _ => self.decided.push(PortInterval { first, last, rule }),
            }
        }
        &self.decided
    }
}
