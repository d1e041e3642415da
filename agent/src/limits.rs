//! Which `TG_LIMITS` bucket each rate limit of the live policy uses.
//!
//! A compiled policy names its limits by position; the loader gives each a bucket id. A limit
//! the live policy already has (same [`CompiledLimit::fingerprint`]: owner, numbers and mode)
//! keeps its bucket, and with it the state of its token buckets: re-applying a policy gives no
//! fresh burst. A new or changed limit gets a bucket of its own, written whole (full, counters
//! at zero) before any policy slot names it.
//!
//! A bucket the new policy no longer uses is not written at once: packets that read the old
//! generation just before the swap may still charge it, and established flows of the old
//! generation name it until their next packet re-decides them. It waits in quarantine until the
//! next install, which begins only after the slot grace (`datapath::SLOT_GRACE`) and by which
//! every flow carries the ids of a generation since; only then is it cleared and reused.
//!
//! A restarted agent rebuilds the table from the map: every bucket with a fingerprint is taken
//! as in use, so the first policy it applies finds the buckets of its unchanged limits, and the
//! rest go through quarantine like any other.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use tollgate_common::{maps, ratelimit::LimitId, LimitBucket, LimitRate};

use crate::policy::CompiledLimit;

/// What a bucket meters, for `status`, `check` and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitInfo {
    /// "rule login", "identity frontend".
    pub owner: String,
    /// The rates as written, defaults applied ("5 connections/min (burst 5)").
    pub description: String,
    pub audit: bool,
}

impl LimitInfo {
    pub fn of(limit: &CompiledLimit) -> Self {
        Self {
            owner: limit.owner.to_string(),
            description: limit.limit.describe(),
            audit: limit.flags & tollgate_common::ratelimit::LIMIT_FLAG_AUDIT != 0,
        }
    }
}

/// What the kernel reads of a bucket: its rates and flags. A bucket is only kept for a limit
/// whose configuration is the same, not merely its fingerprint (a 64-bit hash a crafted pair of
/// names could make collide).
pub type BucketConfig = ([LimitRate; tollgate_common::ratelimit::LIMIT_KINDS], u32);

pub fn config_of(b: &LimitBucket) -> BucketConfig {
    (b.rates, b.flags)
}

/// The buckets of the live policy, those waiting to be freed, and the free ones.
#[derive(Debug)]
pub struct LimitTable {
    /// Fingerprint → bucket, for the buckets the live policy uses.
    live: HashMap<u64, LimitId>,
    /// What each live bucket holds.
    configs: HashMap<LimitId, BucketConfig>,
    /// Bucket → what it meters (live and quarantined buckets; a restarted agent knows nothing
    /// of the buckets it found until a policy names them).
    info: HashMap<LimitId, LimitInfo>,
    /// Freed by the last swap: cleared and reused from the next install on.
    quarantined: Vec<LimitId>,
    /// Free ids, highest first (ids are handed out lowest first).
    free: Vec<LimitId>,
}

/// The buckets a policy will use: `ids[position]` for each of its limits, and which of them
/// are new (to be written before the swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitPlan {
    pub ids: Vec<LimitId>,
    /// (position, id) of the limits that get a fresh bucket.
    pub fresh: Vec<(usize, LimitId)>,
}

impl LimitPlan {
    /// The bucket id for a compiled entry's `limit_id` (a position + 1; 0 stays 0).
    pub fn bucket(&self, position_plus_one: u32) -> LimitId {
        match position_plus_one {
            0 => 0,
            p => self.ids.get(p as usize - 1).copied().unwrap_or(0),
        }
    }
}

impl LimitTable {
    /// Ids 1.. of a map with `capacity` slots; `in_use`: buckets already written (a
    /// fingerprint of 0 is a free bucket).
    pub fn new(capacity: u32, in_use: impl IntoIterator<Item = (LimitId, LimitBucket)>) -> Self {
        let mut live = HashMap::new();
        let mut configs = HashMap::new();
        let mut taken = vec![false; capacity as usize];
        let mut quarantined = Vec::new();
        for (id, bucket) in in_use {
            let fingerprint = bucket.fingerprint;
            if id == 0 || id >= capacity || fingerprint == 0 {
                continue;
            }
            taken[id as usize] = true;
            configs.insert(id, config_of(&bucket));
            // Two buckets of one fingerprint (a limit changed and changed back): the lower id
            // is kept, the other freed through quarantine.
            match live.get(&fingerprint) {
                Some(&other) if other < id => quarantined.push(id),
                Some(&other) => {
                    quarantined.push(other);
                    live.insert(fingerprint, id);
                }
                None => {
                    live.insert(fingerprint, id);
                }
            }
        }
        let free = (1..capacity)
            .rev()
            .filter(|&id| !taken[id as usize])
            .collect();
        Self {
            live,
            configs,
            info: HashMap::new(),
            quarantined,
            free,
        }
    }

    /// The buckets for `limits` (a policy's, in position order; `configs`: what each one's
    /// bucket holds), without changing anything: an error, before any map is written, if there
    /// are not enough free buckets. An unused limit gets none (id 0).
    pub fn plan(&self, limits: &[CompiledLimit], configs: &[BucketConfig]) -> Result<LimitPlan> {
        let mut ids = Vec::with_capacity(limits.len());
        let mut fresh = Vec::new();
        let mut kept = HashSet::new();
        for (position, (limit, config)) in limits.iter().zip(configs).enumerate() {
            if !limit.used {
                ids.push(0);
                continue;
            }
            match self.live.get(&limit.fingerprint) {
                Some(&id) if self.configs.get(&id) == Some(config) && kept.insert(id) => {
                    ids.push(id)
                }
                _ => {
                    ids.push(0);
                    fresh.push((position, 0));
                }
            }
        }
        if fresh.len() > self.free.len() {
            bail!(
                "the policy has {} rate limits, {} of them new or changed, but {} has room for \
                 {} new ones now: it holds {} buckets, the live policy uses {}, and a changed \
                 limit needs a new bucket while the live policy still uses the old one (change \
                 fewer limits at once)",
                limits.iter().filter(|l| l.used).count(),
                fresh.len(),
                maps::LIMITS.name,
                self.free.len(),
                maps::LIMITS.max_entries - 1,
                self.live.len(),
            );
        }
        for ((position, id), &free) in fresh.iter_mut().zip(self.free.iter().rev()) {
            *id = free;
            ids[*position] = free;
        }
        Ok(LimitPlan { ids, fresh })
    }

    /// Records that the policy `plan` was made for is live: its buckets are the live ones, the
    /// previous policy's others go to quarantine.
    pub fn commit(&mut self, plan: &LimitPlan, limits: &[CompiledLimit], configs: &[BucketConfig]) {
        let fresh: HashSet<LimitId> = plan.fresh.iter().map(|&(_, id)| id).collect();
        self.free.retain(|id| !fresh.contains(id));
        let used: HashSet<LimitId> = plan.ids.iter().copied().collect();
        let mut live = HashMap::with_capacity(limits.len());
        for ((limit, &id), config) in limits.iter().zip(&plan.ids).zip(configs) {
            if id == 0 {
                continue;
            }
            live.insert(limit.fingerprint, id);
            self.configs.insert(id, *config);
            self.info.insert(id, LimitInfo::of(limit));
        }
        for (_, id) in std::mem::replace(&mut self.live, live) {
            if !used.contains(&id) {
                self.quarantined.push(id);
                self.configs.remove(&id);
            }
        }
    }

    /// Takes the quarantined buckets for the caller to clear (zero them in the map), after
    /// which they are free. Only to be called once the slot grace has passed since the swap
    /// that freed them.
    pub fn release_quarantined(&mut self) -> Vec<LimitId> {
        let released = std::mem::take(&mut self.quarantined);
        for id in &released {
            self.info.remove(id);
            self.free.push(*id);
        }
        // Highest first, so the lowest free id is handed out next.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        released
    }

    /// What bucket `id` meters, if the live policy (or the one before it) has it.
    pub fn info(&self, id: LimitId) -> Option<&LimitInfo> {
        self.info.get(&id)
    }

    /// What every known bucket meters, by id.
    pub fn infos(&self) -> HashMap<LimitId, LimitInfo> {
        self.info.clone()
    }

    /// The live policy's buckets, by id.
    pub fn live(&self) -> Vec<LimitId> {
        let mut ids: Vec<LimitId> = self.live.values().copied().collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_policy, ClockReading};

    fn configs(limits: &[CompiledLimit]) -> Vec<BucketConfig> {
        limits
            .iter()
            .map(|l| {
                let mut rates = [LimitRate::NONE; 3];
                for (k, kind) in l.kinds.iter().enumerate() {
                    if let Some(kind) = kind {
                        rates[k] = kind.limit_rate(k, 1).unwrap();
                    }
                }
                (rates, l.flags)
            })
            .collect()
    }

    fn limits(text: &str) -> Vec<CompiledLimit> {
        let p = parse_policy(text, "t.yaml").unwrap();
        let clock = ClockReading {
            realtime_ns: 0,
            boottime_ns: 0,
        };
        crate::policy::compile_policy(&p, 1, &clock, &[]).limits
    }

    fn policy(login_per_minute: u32, quota: u32) -> String {
        format!(
            "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: t }}
spec:
  identities:
    - {{ name: a, cidrs: [10.200.0.1/32] }}
    - {{ name: b, cidrs: [10.200.0.2/32] }}
  rules:
    - name: login
      from: a
      to: b
      ports: [{{ protocol: TCP, port: 22 }}]
      rateLimit: {{ connectionsPerMinute: {login_per_minute} }}
  rateLimits:
    - {{ identity: a, packetsPerSecond: {quota} }}
"
        )
    }

    #[test]
    fn an_unchanged_limit_keeps_its_bucket_and_a_changed_one_gets_a_fresh_one() {
        let mut t = LimitTable::new(16, []);
        let first = limits(&policy(5, 100));
        let p1 = t.plan(&first, &configs(&first)).unwrap();
        assert_eq!(p1.ids, [1, 2]);
        assert_eq!(p1.fresh, [(0, 1), (1, 2)]);
        t.commit(&p1, &first, &configs(&first));

        let same = limits(&policy(5, 100));
        let p2 = t.plan(&same, &configs(&same)).unwrap();
        assert_eq!(p2.ids, [1, 2]);
        assert!(p2.fresh.is_empty());
        t.commit(&p2, &same, &configs(&same));
        assert!(t.release_quarantined().is_empty());

        let changed = limits(&policy(6, 100));
        let p3 = t.plan(&changed, &configs(&changed)).unwrap();
        assert_eq!(p3.ids, [3, 2]);
        assert_eq!(p3.fresh, [(0, 3)]);
        t.commit(&p3, &changed, &configs(&changed));
        assert_eq!(t.info(3).unwrap().owner, "rule login");
        // Bucket 1 is quarantined, not reused by the very next plan...
        assert_eq!(t.release_quarantined(), [1]);
        // ...but after its release.
        let back = limits(&policy(7, 100));
        assert_eq!(t.plan(&back, &configs(&back)).unwrap().ids, [1, 2]);
    }

    #[test]
    fn a_restarted_agent_finds_its_buckets_by_fingerprint() {
        let first = limits(&policy(5, 100));
        let c = configs(&first);
        let bucket = |i: usize| LimitBucket {
            fingerprint: first[i].fingerprint,
            rates: c[i].0,
            flags: c[i].1,
            ..Default::default()
        };
        let t = LimitTable::new(16, [(4, bucket(0)), (9, bucket(1))]);
        let again = limits(&policy(5, 100));
        let p = t.plan(&again, &configs(&again)).unwrap();
        assert_eq!(p.ids, [4, 9]);
        assert!(p.fresh.is_empty());
        // A bucket whose fingerprint matches but whose rates differ (a collision, or a bucket
        // written by another build) is not taken over.
        let mut other = configs(&again);
        other[0].0[2].interval_ns += 1;
        let p = t.plan(&again, &other).unwrap();
        assert_eq!(p.fresh.len(), 1);
        assert_ne!(p.ids[0], 4);
    }

    #[test]
    fn too_many_limits_are_refused_before_anything_is_written() {
        let t = LimitTable::new(2, []);
        let l = limits(&policy(5, 100));
        let e = t.plan(&l, &configs(&l)).unwrap_err().to_string();
        assert!(e.contains("TG_LIMITS"), "{e}");
    }

    #[test]
    fn positions_translate_to_buckets() {
        let plan = LimitPlan {
            ids: vec![7, 3],
            fresh: vec![],
        };
        assert_eq!(plan.bucket(0), 0);
        assert_eq!(plan.bucket(1), 7);
        assert_eq!(plan.bucket(2), 3);
    }
}
