//! The agent's handle on the kernel datapath's maps: installing a compiled policy as one atomic
//! generation swap, describing interfaces, reading counters, and the `TG_CHECK` result the
//! kernel's check program leaves for `tollgate check`.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap as _, Map, MapData, PerCpuArray,
};
use tollgate_common::{
    flow::v4_mapped,
    identity::{is_exact_identity, IdentityId, IDENTITY_FIRST_USER},
    interface::{INTERFACE_FLAG_ENFORCED, INTERFACE_FLAG_UPLINK},
    map_names, maps,
    rule::is_exact_rule,
    slot_of, FlowKey, FlowKeyV4, FlowValue, IdentityKeyV4, IdentityKeyV6, IdentityValue,
    InterfaceValue, LimitBucket, RuleKey, RuleValue, SlotConfig, ABI_VERSION, ACTIVE_ABI_INDEX,
    ACTIVE_GENERATION_INDEX, ACTIVE_NS_PER_JIFFY_INDEX, SLOT_COUNT,
};

use crate::{
    limits::{config_of, LimitInfo, LimitTable},
    paths::PinLayout,
    policy::{CompiledLimit, CompiledPolicy},
    wire::MapUsage,
};

/// The eBPF object built by `build.rs` (release profile).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate"));

/// After flipping generations, in-flight packets may still be reading the old slot. A TC
/// program runs for microseconds inside an RCU read section; waiting this long before the old
/// slot is cleared (at the next swap) is far beyond any such window.
pub const SLOT_GRACE: Duration = Duration::from_millis(50);

/// Refuses pinned maps this build cannot use: made for another ABI version (`TG_ACTIVE[ACTIVE_ABI_INDEX]`), or of
/// another kind, key or value size, flags or capacity than the registry (`tollgate_common::maps`)
/// states. Maps sized at load (conntrack) keep whatever capacity they were made with.
pub fn check_pinned_maps(layout: &PinLayout) -> Result<()> {
    let way_out = |what: String| {
        anyhow!(
            "{what}; this agent speaks ABI version {ABI_VERSION}. Run `tollgate agent \
             --uninstall --bpffs {}` and start again (the datapath then enforces nothing until \
             the new agent has applied its policy, and tracked flows are forgotten)",
            layout.root.display()
        )
    };
    let pinned_any = maps::ALL.iter().any(|s| layout.map(s.name).exists());
    if !pinned_any {
        return Ok(());
    }
    for spec in &maps::ALL {
        let path = layout.map(spec.name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info()?;
        let kind = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let capacity_ok = spec.sized_at_load || info.max_entries() == spec.max_entries;
        if kind != spec.kind.bpf_map_type()
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
            || info.map_flags() != spec.flags
            || !capacity_ok
        {
            return Err(way_out(format!(
                "pinned map {} was created by an incompatible tollgate build (type {kind} key {} \
                 value {} flags {:#x} entries {}; expected type {} key {} value {} flags {:#x} \
                 entries {})",
                path.display(),
                info.key_size(),
                info.value_size(),
                info.map_flags(),
                info.max_entries(),
                spec.kind.bpf_map_type(),
                spec.key_size,
                spec.value_size,
                spec.flags,
                spec.max_entries,
            )));
        }
    }
    let active: Array<MapData, u64> = pinned(layout, map_names::ACTIVE)?.try_into()?;
    let abi = active.get(&ACTIVE_ABI_INDEX, 0)?;
    let generation = active.get(&ACTIVE_GENERATION_INDEX, 0)?;
    // 0 with no policy ever applied: made by this build, which crashed before stamping them.
    if abi != u64::from(ABI_VERSION) && !(abi == 0 && generation == 0) {
        return Err(way_out(format!(
            "the maps pinned under {} were made for ABI version {abi}",
            layout.maps().display()
        )));
    }
    Ok(())
}

/// Records this build's ABI version and the kernel's tick length in freshly created maps
/// (`TG_ACTIVE[ACTIVE_ABI_INDEX]` still zero), before any program is attached. Maps that
/// already carry a version were checked by `check_pinned_maps` and are left alone: in
/// particular their tick length, which is 0 if the creating agent could not measure it. Setting
/// it later would switch the datapath's idle clock under live flows, whose timestamps were taken
/// with the other clock, and every tracked flow would look idle at once (their replies then
/// denied as new flows). The tick cannot change while the maps exist (bpffs does not outlive a
/// boot).
pub fn stamp_datapath_globals(layout: &PinLayout) -> Result<()> {
    let mut active: Array<MapData, u64> = pinned(layout, map_names::ACTIVE)?.try_into()?;
    if active.get(&ACTIVE_ABI_INDEX, 0)? != 0 {
        return Ok(());
    }
    match crate::host::ns_per_jiffy() {
        Some(ns) => active.set(ACTIVE_NS_PER_JIFFY_INDEX, ns, 0)?,
        None => tracing::warn!(
            "could not measure the kernel tick (/proc/timer_list unreadable, or no common HZ \
             measured); the datapath tells idle time with the coarse clock, which costs more \
             per packet, for as long as these maps exist"
        ),
    }
    // Last: a crash before this line leaves the maps looking fresh to the next agent.
    active.set(ACTIVE_ABI_INDEX, u64::from(ABI_VERSION), 0)?;
    Ok(())
}

/// Checks a freshly loaded object's maps against the registry: the object has exactly the maps
/// the registry lists, and (all pinned by name) each has the registry's shape. An object and an
/// agent that disagree about a map are caught at load, not by a misread value.
pub fn check_object_maps<'a>(
    layout: &PinLayout,
    object_maps: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let mut seen = Vec::new();
    for name in object_maps {
        // The object's constants (tables the compiler placed in read-only data): per load and
        // never written, so not part of the pinned state. Writable global data would be state
        // lost on every restart, and is refused below like any unlisted map.
        if name.starts_with(".rodata") {
            continue;
        }
        if maps::by_name(name).is_none() {
            bail!("the eBPF object has a map {name} that tollgate_common::maps does not list");
        }
        seen.push(name.to_owned());
    }
    for spec in &maps::ALL {
        if !seen.iter().any(|n| n == spec.name) || !layout.map(spec.name).exists() {
            bail!(
                "the eBPF object lacks map {} (or it was not pinned)",
                spec.name
            );
        }
    }
    check_pinned_maps(layout)
}

fn pinned(layout: &PinLayout, name: &str) -> Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// Handles on the policy and state maps, opened from their pins.
pub struct Datapath {
    active: Array<MapData, u64>,
    slot_config: Array<MapData, SlotConfig>,
    addr_id_v4: HashMap<MapData, IdentityKeyV4, IdentityValue>,
    addr_id_v6: HashMap<MapData, IdentityKeyV6, IdentityValue>,
    identity_v4: LpmTrie<MapData, IdentityKeyV4, IdentityValue>,
    identity_v6: LpmTrie<MapData, IdentityKeyV6, IdentityValue>,
    rules_exact: HashMap<MapData, RuleKey, RuleValue>,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    conntrack_v4: HashMap<MapData, FlowKeyV4, FlowValue>,
    conntrack_v6: HashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, u64>,
    interfaces: HashMap<MapData, u32, InterfaceValue>,
    check: Array<MapData, tollgate_common::CheckResult>,
    limits: Array<MapData, LimitBucket>,
    /// Which bucket each limit of the live policy uses.
    limit_table: LimitTable,
    /// When this process last flipped `TG_ACTIVE`; the slot it left must not be cleared before
    /// `SLOT_GRACE` has passed.
    last_flip: Option<std::time::Instant>,
    layout: PinLayout,
    /// `CompiledPolicy::identity_values` of the live policy, quotas mapped to their buckets.
    identity_values: Vec<IdentityValue>,
}

impl Datapath {
    /// Opens every map from `layout` (they must already be pinned, i.e. the object was loaded).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let limits: Array<MapData, LimitBucket> = pinned(layout, map_names::LIMITS)?.try_into()?;
        // The buckets a previous agent wrote are in use until a policy says otherwise.
        let limit_table = LimitTable::new(
            limits.len(),
            (1..limits.len()).filter_map(|id| {
                let b = limits.get(&id, 0).ok()?;
                (b.fingerprint != 0).then_some((id, b))
            }),
        );
        Ok(Self {
            active: pinned(layout, map_names::ACTIVE)?.try_into()?,
            slot_config: pinned(layout, map_names::SLOT_CONFIG)?.try_into()?,
            addr_id_v4: pinned(layout, map_names::IDENTITY_V4_EXACT)?.try_into()?,
            addr_id_v6: pinned(layout, map_names::IDENTITY_V6_EXACT)?.try_into()?,
            identity_v4: pinned(layout, map_names::IDENTITY_V4)?.try_into()?,
            identity_v6: pinned(layout, map_names::IDENTITY_V6)?.try_into()?,
            rules_exact: pinned(layout, map_names::RULES_EXACT)?.try_into()?,
            rules: pinned(layout, map_names::RULES)?.try_into()?,
            conntrack_v4: pinned(layout, map_names::CONNTRACK_V4)?.try_into()?,
            conntrack_v6: pinned(layout, map_names::CONNTRACK_V6)?.try_into()?,
            counters: pinned(layout, map_names::COUNTERS)?.try_into()?,
            interfaces: pinned(layout, map_names::INTERFACES)?.try_into()?,
            check: pinned(layout, map_names::CHECK)?.try_into()?,
            limits,
            limit_table,
            // Another process (a previous agent) may have flipped just now.
            last_flip: Some(std::time::Instant::now()),
            layout: layout.clone(),
            identity_values: Vec::new(),
        })
    }

    /// Opens the maps of a pin directory that exists, for tests and tools.
    pub fn open_dir(root: &Path) -> Result<Self> {
        Self::open(&PinLayout::new(root))
    }

    pub fn active_generation(&self) -> Result<u64> {
        Ok(self.active.get(&ACTIVE_GENERATION_INDEX, 0)?)
    }

    /// The generation the next `install` must be compiled for.
    pub fn next_generation(&self) -> Result<u64> {
        Ok(self.active_generation()? + 1)
    }

    /// Installs `policy` (compiled for `slot_of(generation)`) and makes it live with one write.
    ///
    /// The slot that is not live is cleared and refilled, its config written, and only then is
    /// `TG_ACTIVE` flipped: a packet reads the generation once and every lookup it makes stays
    /// in that generation's slot, so it sees either the old policy or the new one, whole.
    ///
    /// `interfaces` are the enforced interfaces (name, ifindex): each one's binding for the new
    /// slot is written before the flip as well.
    pub fn install(
        &mut self,
        policy: &CompiledPolicy,
        generation: u64,
        interfaces: &[(String, u32)],
    ) -> Result<()> {
        self.install_with(policy, generation, interfaces, &|name| {
            policy.bound_identity(name)
        })
    }

    /// [`Datapath::install`] with the bindings `bound` gives (Kubernetes mode adds each local
    /// pod's interface to the policy's own).
    pub fn install_with(
        &mut self,
        policy: &CompiledPolicy,
        generation: u64,
        interfaces: &[(String, u32)],
        bound: &dyn Fn(&str) -> IdentityId,
    ) -> Result<()> {
        let live = self.active_generation()?;
        if generation != live + 1 {
            bail!("generation {generation} does not follow the live generation {live}");
        }
        let slot = slot_of(generation);
        if policy.slot != slot {
            bail!(
                "policy compiled for slot {} but generation {generation} uses slot {slot}",
                policy.slot
            );
        }
        if let Some(flipped) = self.last_flip {
            if let Some(rest) = SLOT_GRACE.checked_sub(flipped.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        // One walk per map finds both the stale entries of this slot and how many the live
        // slot uses, so a policy too big for what is left is refused before anything changes.
        let (stale_x4, live_x4) = split_hash_by_slot(&self.addr_id_v4, slot);
        let (stale_x6, live_x6) = split_hash_by_slot(&self.addr_id_v6, slot);
        let (stale_v4, live_v4) = split_by_slot(&self.identity_v4, slot);
        let (stale_v6, live_v6) = split_by_slot(&self.identity_v6, slot);
        let (stale_rx, live_rx) = split_hash_by_slot(&self.rules_exact, slot);
        let (stale_rules, live_rules) = split_by_slot(&self.rules, slot);
        let count = |n: usize, exact: bool, v: &mut [usize; 2]| v[usize::from(!exact)] += n;
        let mut need_v4 = [0usize; 2];
        for (prefix, _, _) in &policy.identities_v4 {
            count(1, is_exact_identity(4, *prefix), &mut need_v4);
        }
        let mut need_v6 = [0usize; 2];
        for (prefix, _, _) in &policy.identities_v6 {
            count(1, is_exact_identity(6, *prefix), &mut need_v6);
        }
        let mut need_rules = [0usize; 2];
        for (prefix, _, _) in &policy.rules {
            count(1, is_exact_rule(*prefix), &mut need_rules);
        }
        // Buckets freed by the last swap are past the slot grace now: cleared, and free.
        for id in self.limit_table.release_quarantined() {
            self.limits
                .set(id, LimitBucket::default(), 0)
                .context("clearing a rate-limit bucket")?;
        }
        let tick_ns = self.tick_ns()?;
        let buckets: Vec<LimitBucket> = policy
            .limits
            .iter()
            .map(|limit| bucket(limit, tick_ns))
            .collect::<Result<_>>()?;
        let configs: Vec<_> = buckets.iter().map(config_of).collect();
        let plan = self.limit_table.plan(&policy.limits, &configs)?;
        let fresh: Vec<(u32, LimitBucket)> = plan
            .fresh
            .iter()
            .map(|&(position, id)| (id, buckets[position]))
            .collect();
        for (spec, needed, live) in [
            (&maps::IDENTITY_V4_EXACT, need_v4[0], live_x4),
            (&maps::IDENTITY_V4, need_v4[1], live_v4),
            (&maps::IDENTITY_V6_EXACT, need_v6[0], live_x6),
            (&maps::IDENTITY_V6, need_v6[1], live_v6),
            (&maps::RULES_EXACT, need_rules[0], live_rx),
            (&maps::RULES, need_rules[1], live_rules),
        ] {
            let capacity = spec.max_entries as usize;
            if needed + live > capacity {
                bail!(
                    "the policy needs {needed} entries in {} ({}), but the map holds {capacity} \
                     for both policy slots and the live policy uses {live}; at most {} fit",
                    spec.name,
                    spec.what,
                    capacity - live
                );
            }
        }
        for k in stale_x4 {
            let _ = self.addr_id_v4.remove(&k);
        }
        for k in stale_x6 {
            let _ = self.addr_id_v6.remove(&k);
        }
        for k in stale_v4 {
            let _ = self.identity_v4.remove(&k);
        }
        for k in stale_v6 {
            let _ = self.identity_v6.remove(&k);
        }
        for k in stale_rx {
            let _ = self.rules_exact.remove(&k);
        }
        for k in stale_rules {
            let _ = self.rules.remove(&k);
        }
        // New and changed limits get their buckets before any entry names them.
        for (id, b) in &fresh {
            self.limits
                .set(*id, b, 0)
                .context("writing a rate-limit bucket")?;
        }
        // Entries name limits by position; the maps by bucket.
        let identity = |v: &IdentityValue| IdentityValue {
            limit_id: plan.bucket(v.limit_id),
            ..*v
        };
        for (prefix, key, value) in &policy.identities_v4 {
            let value = identity(value);
            if is_exact_identity(4, *prefix) {
                self.addr_id_v4.insert(key, value, 0)
            } else {
                self.identity_v4.insert(&Key::new(*prefix, *key), value, 0)
            }
            .context("writing an IPv4 identity entry")?;
        }
        for (prefix, key, value) in &policy.identities_v6 {
            let value = identity(value);
            if is_exact_identity(6, *prefix) {
                self.addr_id_v6.insert(key, value, 0)
            } else {
                self.identity_v6.insert(&Key::new(*prefix, *key), value, 0)
            }
            .context("writing an IPv6 identity entry")?;
        }
        for (prefix, key, value) in &policy.rules {
            let value = RuleValue {
                limit_id: plan.bucket(value.limit_id),
                ..*value
            };
            if is_exact_rule(*prefix) {
                self.rules_exact.insert(key, value, 0)
            } else {
                self.rules.insert(&Key::new(*prefix, *key), value, 0)
            }
            .context("writing a rule entry")?;
        }
        for (name, ifindex) in interfaces {
            self.set_binding(*ifindex, slot, bound(name))?;
        }
        self.slot_config.set(
            slot,
            SlotConfig {
                generation,
                flags: policy.flags,
                lookup_flags: policy.lookup_flags(),
            },
            0,
        )?;
        self.active.set(ACTIVE_GENERATION_INDEX, generation, 0)?;
        self.last_flip = Some(std::time::Instant::now());
        self.limit_table.commit(&plan, &policy.limits, &configs);
        self.identity_values = policy.identity_values.iter().map(identity).collect();
        Ok(())
    }

    /// The value addresses of identity `id` are written with in the live policy (its quota's
    /// bucket included); `ambiguous` and unknown ids carry no quota.
    pub fn identity_value(&self, id: IdentityId) -> IdentityValue {
        id.checked_sub(IDENTITY_FIRST_USER)
            .and_then(|i| self.identity_values.get(i as usize))
            .copied()
            .unwrap_or(IdentityValue {
                id,
                ..Default::default()
            })
    }

    /// Writes (`Some`) or removes (`None`) the exact identity entry of one address in `slot`:
    /// a pod's address in Kubernetes mode, changed without a new generation.
    pub fn set_address(
        &mut self,
        slot: u32,
        addr: IpAddr,
        value: Option<IdentityValue>,
    ) -> Result<()> {
        match addr {
            IpAddr::V4(a) => {
                let key = IdentityKeyV4 {
                    slot,
                    addr: a.octets(),
                };
                match value {
                    Some(v) => self
                        .addr_id_v4
                        .insert(key, v, 0)
                        .context("writing a pod address")?,
                    None => {
                        let _ = self.addr_id_v4.remove(&key);
                    }
                }
            }
            IpAddr::V6(a) => {
                let key = IdentityKeyV6 {
                    slot,
                    addr: a.octets(),
                };
                match value {
                    Some(v) => self
                        .addr_id_v6
                        .insert(key, v, 0)
                        .context("writing a pod address")?,
                    None => {
                        let _ = self.addr_id_v6.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every tracked flow (both directions' entries) to or from one of `addrs`, so that
    /// no flow admitted under an address's old identity outlives the change. One batched walk
    /// per family; returns the entries removed.
    pub fn purge_flows(&mut self, addrs: &std::collections::HashSet<IpAddr>) -> Result<usize> {
        let v4: std::collections::HashSet<[u8; 4]> = addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a.octets()),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: std::collections::HashSet<[u8; 16]> = addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(a.octets()),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut removed = 0;
        if !v4.is_empty() {
            let mut doomed: Vec<FlowKeyV4> = Vec::new();
            crate::reader::walk_keys(
                self.conntrack_v4.map(),
                size_of::<FlowKeyV4>(),
                size_of::<FlowValue>(),
                |key| {
                    let (s, d) = (&key[0..4], &key[4..8]);
                    if v4.contains(s) || v4.contains(d) {
                        // SAFETY: `key` is one whole FlowKeyV4 as the kernel stored it.
                        doomed.push(unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) });
                    }
                },
            )?;
            for k in &doomed {
                if self.conntrack_v4.remove(k).is_ok() {
                    removed += 1;
                }
            }
        }
        if !v6.is_empty() {
            let mut doomed: Vec<FlowKey> = Vec::new();
            crate::reader::walk_keys(
                self.conntrack_v6.map(),
                size_of::<FlowKey>(),
                size_of::<FlowValue>(),
                |key| {
                    let (s, d) = (&key[0..16], &key[16..32]);
                    if v6.contains(s) || v6.contains(d) {
                        // SAFETY: `key` is one whole FlowKey as the kernel stored it.
                        doomed.push(unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) });
                    }
                },
            )?;
            for k in &doomed {
                if self.conntrack_v6.remove(k).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Sets an interface's binding in `slot` (a local pod's interface, in Kubernetes mode).
    pub fn bind_interface(&mut self, ifindex: u32, slot: u32, bound: IdentityId) -> Result<()> {
        self.set_binding(ifindex, slot, bound)
    }

    /// The resolution of the datapath's clock (`policy::clock_ns` in the kernel): the tick the
    /// agent recorded at map creation, or the coarse clock's resolution.
    fn tick_ns(&self) -> Result<u64> {
        let ns = self.active.get(&ACTIVE_NS_PER_JIFFY_INDEX, 0)?;
        if ns != 0 {
            return Ok(ns);
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes one timespec to a valid pointer.
        if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
            bail!(
                "reading the coarse clock's resolution: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok((ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// The buckets of the live policy's rate limits, with what they meter and what they
    /// dropped.
    pub fn limit_status(&self) -> Vec<(LimitInfo, LimitBucket)> {
        self.limit_table
            .live()
            .into_iter()
            .filter_map(|id| {
                let info = self.limit_table.info(id)?.clone();
                Some((info, self.limits.get(&id, 0).ok()?))
            })
            .collect()
    }

    /// What every bucket of the live policy (and of the one before it) meters, by id.
    pub fn limit_infos(&self) -> std::collections::HashMap<u32, LimitInfo> {
        self.limit_table.infos()
    }

    /// The live policy's buckets, by id.
    pub fn live_limits(&self) -> Vec<u32> {
        self.limit_table.live()
    }

    /// What bucket `id` meters, if the live policy (or the one before it) has it.
    pub fn limit_info(&self, id: u32) -> Option<&LimitInfo> {
        self.limit_table.info(id)
    }

    /// Describes an interface (before a program is attached to it, once it is, and whenever
    /// its settings change): uplink or workload-facing, whether Tollgate's ingress program runs
    /// there (`enforced`), and its binding per slot. `None` keeps that part as it is (not
    /// enforced and unbound for a new entry), so an adopting agent neither unbinds the live slot
    /// of the policy it has not replaced yet nor turns off, for a moment, the checks at ingress
    /// that `enforced` promises.
    pub fn write_interface(
        &mut self,
        ifindex: u32,
        uplink: bool,
        enforced: Option<bool>,
        bound: [Option<IdentityId>; SLOT_COUNT as usize],
    ) -> Result<()> {
        let mut value = self.interfaces.get(&ifindex, 0).unwrap_or_default();
        let enforced = enforced.unwrap_or(value.flags & INTERFACE_FLAG_ENFORCED != 0);
        value.flags = if uplink { INTERFACE_FLAG_UPLINK } else { 0 }
            | if enforced { INTERFACE_FLAG_ENFORCED } else { 0 };
        for (slot, b) in bound.into_iter().enumerate() {
            if let Some(b) = b {
                value.bound_identity[slot] = b;
            }
        }
        self.interfaces.insert(ifindex, value, 0).with_context(|| {
            format!(
                "describing interface {ifindex} in {}",
                map_names::INTERFACES
            )
        })
    }

    /// Sets an interface's binding in `slot`, keeping the rest of its entry. The kernel reads
    /// the whole value at once, so it sees the old entry or the new one.
    fn set_binding(&mut self, ifindex: u32, slot: u32, bound: IdentityId) -> Result<()> {
        let mut value = self.interfaces.get(&ifindex, 0).unwrap_or_default();
        value.bound_identity[(slot & 1) as usize] = bound;
        self.interfaces
            .insert(ifindex, value, 0)
            .with_context(|| format!("binding interface {ifindex} in {}", map_names::INTERFACES))
    }

    /// Forgets an interface that is no longer enforced (or no longer exists).
    pub fn forget_interface(&mut self, ifindex: u32) {
        let _ = self.interfaces.remove(&ifindex);
    }

    /// The ifindexes `TG_INTERFACES` describes.
    pub fn described_interfaces(&self) -> Vec<u32> {
        self.interfaces.keys().filter_map(|k| k.ok()).collect()
    }

    /// Packet counters summed over CPUs, indexed like `TG_COUNTERS`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        crate::reader::sum_counters(&self.counters)
    }

    /// Forgets every tracked flow: their next packets are decided as new flows. (Benchmarks use
    /// it to measure the new-flow path repeatedly.)
    pub fn clear_conntrack(&mut self) -> Result<()> {
        let keys: Vec<FlowKeyV4> = self.conntrack_v4.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.conntrack_v4.remove(&k);
        }
        let keys: Vec<FlowKey> = self.conntrack_v6.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.conntrack_v6.remove(&k);
        }
        Ok(())
    }

    /// The conntrack entry of `key` (IPv4 addresses IPv4-mapped), if any.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        if key.family == 4 {
            self.conntrack_v4.get(&key.to_v4(), 0).ok()
        } else {
            self.conntrack_v6.get(key, 0).ok()
        }
    }

    /// Overwrites a conntrack entry (tests age entries with it).
    pub fn set_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        if key.family == 4 {
            self.conntrack_v4.insert(key.to_v4(), value, 0)?;
        } else {
            self.conntrack_v6.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// Tracked flow entries (two per flow), both families. Walks the maps; for status, not for
    /// hot paths.
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack_v4.keys().filter(|k| k.is_ok()).count()
            + self.conntrack_v6.keys().filter(|k| k.is_ok()).count()
    }

    /// Policy entries of `slot`, both kinds of map together.
    pub fn usage(&self, slot: u32) -> MapUsage {
        MapUsage {
            identities_v4: keys_in_slot(&self.identity_v4, slot).len()
                + split_hash_by_slot(&self.addr_id_v4, slot).0.len(),
            identities_v6: keys_in_slot(&self.identity_v6, slot).len()
                + split_hash_by_slot(&self.addr_id_v6, slot).0.len(),
            rules: keys_in_slot(&self.rules, slot).len()
                + split_hash_by_slot(&self.rules_exact, slot).0.len(),
        }
    }

    /// Every map of the registry: its capacity as created and, for policy maps, the entries of
    /// `slot`. Walks the policy maps; for status, not for hot paths.
    pub fn map_status(&self, slot: u32) -> Vec<crate::wire::MapStatus> {
        maps::ALL
            .iter()
            .map(|spec| {
                let capacity = MapData::from_pin(self.layout.map(spec.name))
                    .and_then(|d| d.info())
                    .map_or(spec.max_entries, |i| i.max_entries());
                let entries = match spec.name {
                    n if n == map_names::IDENTITY_V4_EXACT => {
                        Some(split_hash_by_slot(&self.addr_id_v4, slot).0.len())
                    }
                    n if n == map_names::IDENTITY_V6_EXACT => {
                        Some(split_hash_by_slot(&self.addr_id_v6, slot).0.len())
                    }
                    n if n == map_names::IDENTITY_V4 => {
                        Some(keys_in_slot(&self.identity_v4, slot).len())
                    }
                    n if n == map_names::IDENTITY_V6 => {
                        Some(keys_in_slot(&self.identity_v6, slot).len())
                    }
                    n if n == map_names::RULES_EXACT => {
                        Some(split_hash_by_slot(&self.rules_exact, slot).0.len())
                    }
                    n if n == map_names::RULES => Some(keys_in_slot(&self.rules, slot).len()),
                    n if n == map_names::INTERFACES => Some(self.described_interfaces().len()),
                    n if n == map_names::LIMITS => Some(self.limit_table.live().len()),
                    _ => None,
                };
                crate::wire::MapStatus {
                    name: spec.name.to_owned(),
                    what: spec.what.to_owned(),
                    capacity,
                    entries,
                }
            })
            .collect()
    }

    /// Clears `TG_CHECK` before a check run, so a run that wrote nothing is noticed.
    pub fn clear_check(&mut self) -> Result<()> {
        let pending = tollgate_common::CheckResult {
            verdict: tollgate_common::CHECK_PENDING,
            ..Default::default()
        };
        Ok(self.check.set(0, pending, 0)?)
    }

    /// What the last check run decided.
    pub fn check_result(&self) -> Result<tollgate_common::CheckResult> {
        let r = self.check.get(&0, 0)?;
        if r.verdict == tollgate_common::CHECK_PENDING {
            bail!("the check program did not write a result");
        }
        Ok(r)
    }
}

/// Keys of the policy maps start with the slot they belong to.
trait SlotKey {
    fn slot(&self) -> u32;
}

impl SlotKey for IdentityKeyV4 {
    fn slot(&self) -> u32 {
        self.slot
    }
}

impl SlotKey for IdentityKeyV6 {
    fn slot(&self) -> u32 {
        self.slot
    }
}

impl SlotKey for RuleKey {
    fn slot(&self) -> u32 {
        self.slot
    }
}

/// Every key of `trie` in `slot`, and how many keys the other slot has. Collected first:
/// deleting while walking would skip keys.
fn split_by_slot<K: aya::Pod + SlotKey, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    slot: u32,
) -> (Vec<Key<K>>, usize) {
    let mut other = 0;
    let mine = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| {
            let in_slot = k.data().slot() == slot;
            other += usize::from(!in_slot);
            in_slot
        })
        .collect();
    (mine, other)
}

/// Every key of hash map `map` in `slot`, and how many keys the other slot has.
fn split_hash_by_slot<K: aya::Pod + SlotKey, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    slot: u32,
) -> (Vec<K>, usize) {
    let mut other = 0;
    let mine = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| {
            let in_slot = k.slot() == slot;
            other += usize::from(!in_slot);
            in_slot
        })
        .collect();
    (mine, other)
}

/// Every key of `trie` in `slot`. Collected first: deleting while walking would skip keys.
fn keys_in_slot<K: aya::Pod + SlotKey, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
    slot: u32,
) -> Vec<Key<K>> {
    trie.keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.data().slot() == slot)
        .collect()
}

/// CLOCK_BOOTTIME in nanoseconds, the clock the kernel programs compare expiries against.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME exists on every supported kernel.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Maps an address to the IPv4-mapped form the conntrack map uses.
pub fn flow_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The bucket of a new or changed limit: its rates on the datapath's clock of `tick_ns`
/// resolution, full, counters at zero.
fn bucket(limit: &CompiledLimit, tick_ns: u64) -> Result<LimitBucket> {
    let mut b = LimitBucket {
        fingerprint: limit.fingerprint,
        flags: limit.flags,
        ..LimitBucket::default()
    };
    for (k, kind) in limit.kinds.iter().enumerate() {
        if let Some(kind) = kind {
            b.rates[k] = kind.limit_rate(k, tick_ns).map_err(|e| {
                anyhow!("{}: {e:?} (validation should have refused it)", limit.owner)
            })?;
        }
    }
    Ok(b)
}
