//! The agent's handle on the kernel datapath's maps: installing a compiled policy as one atomic
//! generation swap, describing interfaces, reading counters, and the `TG_CHECK` result the
//! kernel's check program leaves for `tollgate check`.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray,
};
use tollgate_common::{
    capacity,
    flow::v4_mapped,
    identity::IdentityId,
    interface::{INTERFACE_FLAG_ENFORCED, INTERFACE_FLAG_UPLINK},
    map_names, slot_of,
    verdict::COUNTER_SLOTS,
    FlowKey, FlowValue, IdentityKeyV4, IdentityKeyV6, IdentityValue, InterfaceValue, RuleKey,
    RuleValue, SlotConfig, ABI_VERSION, ACTIVE_GENERATION_INDEX, SLOT_COUNT,
};

use crate::{paths::PinLayout, policy::CompiledPolicy};

/// The eBPF object built by `build.rs` (release profile).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate"));

/// After flipping generations, in-flight packets may still be reading the old slot. A TC
/// program runs for microseconds inside an RCU read section; waiting this long before the old
/// slot is cleared (at the next swap) is far beyond any such window.
pub const SLOT_GRACE: Duration = Duration::from_millis(50);

/// Expected shape of every map: (name, key size, value size, max entries). A pinned map that
/// differs was made by an incompatible build and must not be adopted.
pub fn expected_map_shapes() -> [(&'static str, u32, u32, u32); 10] {
    use std::mem::size_of;
    let lpm = |k: usize| (k + 4) as u32;
    [
        (map_names::ACTIVE, 4, 8, 1),
        (
            map_names::SLOT_CONFIG,
            4,
            size_of::<SlotConfig>() as u32,
            SLOT_COUNT,
        ),
        (
            map_names::IDENTITY_V4,
            lpm(size_of::<IdentityKeyV4>()),
            size_of::<IdentityValue>() as u32,
            capacity::IDENTITY_ENTRIES,
        ),
        (
            map_names::IDENTITY_V6,
            lpm(size_of::<IdentityKeyV6>()),
            size_of::<IdentityValue>() as u32,
            capacity::IDENTITY_ENTRIES,
        ),
        (
            map_names::RULES,
            lpm(size_of::<RuleKey>()),
            size_of::<RuleValue>() as u32,
            capacity::RULE_ENTRIES,
        ),
        (
            map_names::CONNTRACK,
            size_of::<FlowKey>() as u32,
            size_of::<FlowValue>() as u32,
            capacity::CONNTRACK_ENTRIES,
        ),
        (map_names::COUNTERS, 4, 8, COUNTER_SLOTS),
        (map_names::EVENTS, 0, 0, capacity::EVENTS_BYTES),
        (
            map_names::INTERFACES,
            4,
            size_of::<InterfaceValue>() as u32,
            capacity::INTERFACE_ENTRIES,
        ),
        (
            map_names::CHECK,
            4,
            size_of::<tollgate_common::CheckResult>() as u32,
            1,
        ),
    ]
}

/// Refuses pinned maps whose shape differs from what this build expects.
pub fn check_pinned_maps(layout: &PinLayout) -> Result<()> {
    for (name, key, value, max) in expected_map_shapes() {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let info = data.info()?;
        if (info.key_size(), info.value_size(), info.max_entries()) != (key, value, max) {
            bail!(
                "pinned map {} was created by an incompatible tollgate build (key {} value {} \
                 entries {}, expected {key} {value} {max}); run `tollgate agent --uninstall \
                 --bpffs {}` first",
                path.display(),
                info.key_size(),
                info.value_size(),
                info.max_entries(),
                layout.root.display()
            );
        }
    }
    Ok(())
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
    identity_v4: LpmTrie<MapData, IdentityKeyV4, IdentityValue>,
    identity_v6: LpmTrie<MapData, IdentityKeyV6, IdentityValue>,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, u64>,
    interfaces: HashMap<MapData, u32, InterfaceValue>,
    check: Array<MapData, tollgate_common::CheckResult>,
    /// When this process last flipped `TG_ACTIVE`; the slot it left must not be cleared before
    /// `SLOT_GRACE` has passed.
    last_flip: Option<std::time::Instant>,
}

/// Entries currently in each policy map, for status and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MapUsage {
    pub identities_v4: usize,
    pub identities_v6: usize,
    pub rules: usize,
}

impl Datapath {
    /// Opens every map from `layout` (they must already be pinned, i.e. the object was loaded).
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            active: pinned(layout, map_names::ACTIVE)?.try_into()?,
            slot_config: pinned(layout, map_names::SLOT_CONFIG)?.try_into()?,
            identity_v4: pinned(layout, map_names::IDENTITY_V4)?.try_into()?,
            identity_v6: pinned(layout, map_names::IDENTITY_V6)?.try_into()?,
            rules: pinned(layout, map_names::RULES)?.try_into()?,
            conntrack: pinned(layout, map_names::CONNTRACK)?.try_into()?,
            counters: pinned(layout, map_names::COUNTERS)?.try_into()?,
            interfaces: pinned(layout, map_names::INTERFACES)?.try_into()?,
            check: pinned(layout, map_names::CHECK)?.try_into()?,
            // Another process (a previous agent) may have flipped just now.
            last_flip: Some(std::time::Instant::now()),
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
        let (stale_v4, live_v4) = split_by_slot(&self.identity_v4, slot);
        let (stale_v6, live_v6) = split_by_slot(&self.identity_v6, slot);
        let (stale_rules, live_rules) = split_by_slot(&self.rules, slot);
        for (what, needed, live, capacity) in [
            (
                "IPv4 identity",
                policy.identities_v4.len(),
                live_v4,
                capacity::IDENTITY_ENTRIES,
            ),
            (
                "IPv6 identity",
                policy.identities_v6.len(),
                live_v6,
                capacity::IDENTITY_ENTRIES,
            ),
            (
                "rule",
                policy.rules.len(),
                live_rules,
                capacity::RULE_ENTRIES,
            ),
        ] {
            if needed + live > capacity as usize {
                bail!(
                    "the policy needs {needed} {what} entries, but the map holds {capacity} for \
                     both policy slots and the live policy uses {live}; at most {} fit",
                    capacity as usize - live
                );
            }
        }
        for k in stale_v4 {
            let _ = self.identity_v4.remove(&k);
        }
        for k in stale_v6 {
            let _ = self.identity_v6.remove(&k);
        }
        for k in stale_rules {
            let _ = self.rules.remove(&k);
        }
        for (prefix, key, value) in &policy.identities_v4 {
            self.identity_v4
                .insert(&Key::new(*prefix, *key), value, 0)
                .context("writing an IPv4 identity entry")?;
        }
        for (prefix, key, value) in &policy.identities_v6 {
            self.identity_v6
                .insert(&Key::new(*prefix, *key), value, 0)
                .context("writing an IPv6 identity entry")?;
        }
        for (prefix, key, value) in &policy.rules {
            self.rules
                .insert(&Key::new(*prefix, *key), value, 0)
                .map_err(|e| {
                    anyhow!(
                        "writing a rule entry ({e}); the rule map holds {} entries for both slots",
                        capacity::RULE_ENTRIES
                    )
                })?;
        }
        for (name, ifindex) in interfaces {
            self.set_binding(*ifindex, slot, policy.bound_identity(name))?;
        }
        self.slot_config.set(
            slot,
            SlotConfig {
                generation,
                flags: policy.flags,
                abi_version: ABI_VERSION,
            },
            0,
        )?;
        self.active.set(ACTIVE_GENERATION_INDEX, generation, 0)?;
        self.last_flip = Some(std::time::Instant::now());
        Ok(())
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
        (0..COUNTER_SLOTS)
            .map(|i| {
                let per_cpu = self.counters.get(&i, 0)?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }

    /// Forgets every tracked flow: their next packets are decided as new flows. (Benchmarks use
    /// it to measure the new-flow path repeatedly.)
    pub fn clear_conntrack(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = self.conntrack.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.conntrack.remove(&k);
        }
        Ok(())
    }

    /// The conntrack entry of `key`, if any.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.conntrack.get(key, 0).ok()
    }

    /// Overwrites a conntrack entry (tests age entries with it).
    pub fn set_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        Ok(self.conntrack.insert(key, value, 0)?)
    }

    /// Tracked flow entries (two per flow). Walks the map; for status, not for hot paths.
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    pub fn usage(&self, slot: u32) -> MapUsage {
        MapUsage {
            identities_v4: keys_in_slot(&self.identity_v4, slot).len(),
            identities_v6: keys_in_slot(&self.identity_v6, slot).len(),
            rules: keys_in_slot(&self.rules, slot).len(),
        }
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
