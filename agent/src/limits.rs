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
use tollgate_common::{maps, ratelimit::LimitId};

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

/// The buckets of the live policy, those waiting to be freed, and the free ones.
#[derive(Debug)]
pub struct LimitTable {
    /// Fingerprint → bucket, for the buckets the live policy uses.
    live: HashMap<u64, LimitId>,
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
    /// Ids 1.. of a map with `capacity` slots; `in_use`: (id, fingerprint) of buckets already
    /// written (a fingerprint of 0 is a free bucket).
    pub fn new(capacity: u32, in_use: impl IntoIterator<Item = (LimitId, u64)>) -> Self {
        let mut live = HashMap::new();
        let mut taken = vec![false; capacity as usize];
        let mut quarantined = Vec::new();
        for (id, fingerprint) in in_use {
            if id == 0 || id >= capacity || fingerprint == 0 {
                continue;
            }
            taken[id as usize] = true;
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
            info: HashMap::new(),
            quarantined,
            free,
        }
    }

    /// The buckets for `limits` (a policy's, in position order), without changing anything:
    /// an error, before any map is written, if there are not enough free buckets.
    pub fn plan(&self, limits: &[CompiledLimit]) -> Result<LimitPlan> {
        let mut ids = Vec::with_capacity(limits.len());
        let mut fresh = Vec::new();
        let mut next_free = self.free.iter().rev();
        for (position, limit) in limits.iter().enumerate() {
            match self.live.get(&limit.fingerprint) {
                Some(&id) => ids.push(id),
                None => match next_free.next() {
                    Some(&id) => {
                        ids.push(id);
                        fresh.push((position, id));
                    }
                    None => bail!(
                        "the policy has {} rate limits, {} of them new or changed, but {} has \
                         room for {} more beside the {} the live policy uses and {} freed by \
                         the last swap",
                        limits.len(),
                        fresh.len() + 1,
                        maps::LIMITS.name,
                        self.free.len(),
                        self.live.len(),
                        self.quarantined.len()
                    ),
                },
            }
        }
        Ok(LimitPlan { ids, fresh })
    }

    /// Records that the policy `plan` was made for is live: its buckets are the live ones, the
    /// previous policy's others go to quarantine.
    pub fn commit(&mut self, plan: &LimitPlan, limits: &[CompiledLimit]) {
        let fresh: HashSet<LimitId> = plan.fresh.iter().map(|&(_, id)| id).collect();
        self.free.retain(|id| !fresh.contains(id));
        let used: HashSet<LimitId> = plan.ids.iter().copied().collect();
        let mut live = HashMap::with_capacity(limits.len());
        for (limit, &id) in limits.iter().zip(&plan.ids) {
            live.insert(limit.fingerprint, id);
            self.info.insert(id, LimitInfo::of(limit));
        }
        for (_, id) in std::mem::replace(&mut self.live, live) {
            if !used.contains(&id) {
                self.quarantined.push(id);
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
        let p1 = t.plan(&first).unwrap();
        assert_eq!(p1.ids, [1, 2]);
        assert_eq!(p1.fresh, [(0, 1), (1, 2)]);
        t.commit(&p1, &first);

        let same = limits(&policy(5, 100));
        let p2 = t.plan(&same).unwrap();
        assert_eq!(p2.ids, [1, 2]);
        assert!(p2.fresh.is_empty());
        t.commit(&p2, &same);
        assert!(t.release_quarantined().is_empty());

        let changed = limits(&policy(6, 100));
        let p3 = t.plan(&changed).unwrap();
        assert_eq!(p3.ids, [3, 2]);
        assert_eq!(p3.fresh, [(0, 3)]);
        t.commit(&p3, &changed);
        assert_eq!(t.info(3).unwrap().owner, "rule login");
        // Bucket 1 is quarantined, not reused by the very next plan...
        assert_eq!(t.release_quarantined(), [1]);
        // ...but after its release.
        let back = limits(&policy(7, 100));
        assert_eq!(t.plan(&back).unwrap().ids, [1, 2]);
    }

    #[test]
    fn a_restarted_agent_finds_its_buckets_by_fingerprint() {
        let first = limits(&policy(5, 100));
        let t = LimitTable::new(16, [(4, first[0].fingerprint), (9, first[1].fingerprint)]);
        let p = t.plan(&limits(&policy(5, 100))).unwrap();
        assert_eq!(p.ids, [4, 9]);
        assert!(p.fresh.is_empty());
    }

    #[test]
    fn too_many_limits_are_refused_before_anything_is_written() {
        let t = LimitTable::new(2, []);
        let e = t.plan(&limits(&policy(5, 100))).unwrap_err().to_string();
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
