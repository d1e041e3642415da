//! Read-only handles on the datapath's state maps, for `status` and the metrics: packet
//! counters, rate-limit buckets and conntrack fill. They are opened from the pins on their own,
//! apart from the installer's handles, so a reader never waits for a swap.
//!
//! Counting conntrack entries is the one expensive read: an LRU hash has no entry count a
//! user can read, so it is walked. [`Reader::conntrack_entries`] walks with
//! `BPF_MAP_LOOKUP_BATCH`, thousands of entries per system call (200k entries in a few tens of
//! milliseconds, against more than a second one key at a time), and the agent does it on a
//! timer ([`FillSampler`]), so `status` and a scrape read the last count instead of walking.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, PerCpuArray};
use tokio::sync::watch;
use tollgate_common::{map_names, maps, verdict::COUNTER_SLOTS, LimitBucket};

use crate::paths::PinLayout;

pub struct Reader {
    counters: PerCpuArray<MapData, u64>,
    limits: Array<MapData, LimitBucket>,
    conntrack: [(MapData, u32, u32, &'static str); 2],
}

impl Reader {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let open = |name: &str| {
            let path = layout.map(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        let map = |name: &str| -> Result<aya::maps::Map> {
            Ok(aya::maps::Map::from_map_data(open(name)?)?)
        };
        Ok(Self {
            counters: map(map_names::COUNTERS)?.try_into()?,
            limits: map(map_names::LIMITS)?.try_into()?,
            conntrack: [
                (
                    open(map_names::CONNTRACK_V4)?,
                    maps::CONNTRACK_V4.key_size,
                    maps::CONNTRACK_V4.value_size,
                    map_names::CONNTRACK_V4,
                ),
                (
                    open(map_names::CONNTRACK_V6)?,
                    maps::CONNTRACK_V6.key_size,
                    maps::CONNTRACK_V6.value_size,
                    map_names::CONNTRACK_V6,
                ),
            ],
        })
    }

    /// Packet counters summed over CPUs, indexed like `TG_COUNTERS`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        sum_counters(&self.counters)
    }

    /// Bucket `id` of `TG_LIMITS`.
    pub fn bucket(&self, id: u32) -> Option<LimitBucket> {
        self.limits.get(&id, 0).ok()
    }

    /// Entries of each conntrack map (IPv4, IPv6), counted with batched lookups.
    pub fn conntrack_entries(&self) -> Result<[(&'static str, usize); 2]> {
        let mut out = [("", 0); 2];
        for (i, (map, key_size, value_size, name)) in self.conntrack.iter().enumerate() {
            out[i] = (
                name,
                count_entries(map, *key_size as usize, *value_size as usize)
                    .with_context(|| format!("counting the entries of {name}"))?,
            );
        }
        Ok(out)
    }
}

/// `TG_COUNTERS` summed over CPUs.
pub fn sum_counters(counters: &PerCpuArray<MapData, u64>) -> Result<Vec<u64>> {
    (0..COUNTER_SLOTS)
        .map(|i| {
            let per_cpu = counters.get(&i, 0)?;
            Ok(per_cpu.iter().sum())
        })
        .collect()
}

/// Entries fetched per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: u32 = 4096;

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Counts a hash map's entries with `BPF_MAP_LOOKUP_BATCH` (hash maps keep a bucket cursor, a
/// u32, between calls). Entries added or removed during the walk may or may not be counted.
fn count_entries(map: &MapData, key_size: usize, value_size: usize) -> std::io::Result<usize> {
    let mut total = 0usize;
    walk_keys(map, key_size, value_size, |_| total += 1)?;
    Ok(total)
}

/// Calls `each` with every key of a hash map (`key_size` bytes), fetched thousands at a time
/// with `BPF_MAP_LOOKUP_BATCH`. Entries added or removed during the walk may or may not be
/// seen.
pub fn walk_keys(
    map: &MapData,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u8; key_size * BATCH as usize];
    let mut values = vec![0u8; value_size * BATCH as usize];
    let mut cursor = [0u64; 2];
    let mut first = true;
    let mut batch = BATCH;
    // Bounded: each call moves the cursor on by at least one bucket, and a map has at most a
    // few million buckets; the bound only guards against a kernel that would not.
    for _ in 0..1_000_000 {
        if batch as usize * key_size > keys.len() {
            keys.resize(batch as usize * key_size, 0);
            values.resize(batch as usize * value_size, 0);
        }
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor.as_mut_ptr() as u64 + 8,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_LOOKUP_BATCH writes at most `count` keys and values into buffers of
        // that many entries of the map's key and value sizes, and the cursor (4 bytes for hash
        // maps) into the second word of `cursor`; every pointer outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                libc::c_long::from(24i32), // BPF_MAP_LOOKUP_BATCH
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        let done = match err.as_ref().and_then(|e| e.raw_os_error()) {
            None => false,
            // The walk is over; `count` holds what the last call found.
            Some(libc::ENOENT) => true,
            // One bucket holds more entries than `batch`: ask for more at once.
            Some(libc::ENOSPC) => {
                batch = batch.saturating_mul(2);
                continue;
            }
            Some(_) => return Err(err.expect("an error")),
        };
        for key in keys[..attr.count as usize * key_size].chunks_exact(key_size) {
            each(key);
        }
        if done {
            return Ok(());
        }
        cursor[0] = cursor[1];
        first = false;
    }
    Err(std::io::Error::other("the walk did not end"))
}

/// A count of the conntrack maps, taken at `at`.
#[derive(Clone, Debug, Default)]
pub struct Fill {
    pub conntrack: Vec<(&'static str, usize)>,
    /// When the count was taken (None: not yet).
    pub at: Option<SystemTime>,
}

impl Fill {
    pub fn conntrack_total(&self) -> usize {
        self.conntrack.iter().map(|(_, n)| n).sum()
    }
}

/// How often the conntrack maps are counted.
pub const FILL_INTERVAL: Duration = Duration::from_secs(5);

/// Counts the conntrack maps every [`FILL_INTERVAL`] and publishes the count.
pub struct FillSampler;

impl FillSampler {
    /// Takes a first count now (so `status` has one from the start), then one per interval on
    /// a blocking thread. The task ends when every receiver is gone.
    pub fn spawn(reader: Arc<Reader>) -> watch::Receiver<Arc<Fill>> {
        let first = Arc::new(sample(&reader));
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FILL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let r = reader.clone();
                let Ok(fill) = tokio::task::spawn_blocking(move || sample(&r)).await else {
                    return;
                };
                if tx.send(Arc::new(fill)).is_err() {
                    return;
                }
            }
        });
        rx
    }
}

fn sample(reader: &Reader) -> Fill {
    match reader.conntrack_entries() {
        Ok(counts) => Fill {
            conntrack: counts.to_vec(),
            at: Some(SystemTime::now()),
        },
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "counting conntrack entries failed");
            Fill::default()
        }
    }
}
