//! Recent decisions and the flow inventory (`tollgate flows`).
//!
//! The agent keeps the most recent [`RECENT`] aggregated records, numbered, so `flows` can list
//! them and `flows --follow` can ask for everything after the last one it printed (a long poll:
//! the answer comes as soon as there is something new, or after the wait).
//!
//! The inventory is every distinct (source identity, destination identity, protocol, port,
//! verdict) the datapath decided, with first and last seen and a packet count: the "what would
//! break if we enforced" view. It is written to `inventory.json` in the state directory (to a
//! temporary file, synced, then renamed) every [`PERSIST_INTERVAL`] when it changed and at stop,
//! and read back at start, so it survives restarts.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    error::Error,
    events::{Control, Sink},
    wire::{FlowRecord, FlowsResponse, InventoryEdge},
};

/// Recent records kept.
pub const RECENT: usize = 10_000;
/// Edges the inventory keeps; beyond it, the edges seen longest ago make room.
pub const MAX_EDGES: usize = 100_000;
/// How often a changed inventory is written.
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(10);
/// The longest a `flows --follow` poll waits for something new.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// At most this many records per answer.
pub const MAX_PAGE: usize = 5_000;
/// Long polls waiting at once. Each holds a control connection (at most 128): beyond this,
/// polls are answered at once, so followers cannot take every connection from `status`.
pub const MAX_WAITERS: usize = 16;

const INVENTORY_FILE: &str = "inventory.json";
/// Bumped when the file's layout changes; a file of another version is set aside, not read.
const INVENTORY_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct EdgeKey {
    from_identity: String,
    to_identity: String,
    protocol: String,
    port: u16,
    verdict: String,
}

#[derive(Serialize, Deserialize)]
struct InventoryFile {
    version: u32,
    edges: Vec<InventoryEdge>,
}

struct Inner {
    recent: VecDeque<FlowRecord>,
    /// Seq of the last record added (0: none yet).
    last_seq: u64,
    inventory: BTreeMap<EdgeKey, InventoryEdge>,
    dirty: bool,
}

/// Shared between the event pipeline (the writer, through [`FlowsSink`]) and the API.
#[derive(Clone)]
pub struct Flows {
    inner: Arc<Mutex<Inner>>,
    /// The last seq, for long polls.
    latest: watch::Sender<u64>,
    /// Long polls waiting now.
    waiters: Arc<std::sync::atomic::AtomicUsize>,
    path: Option<PathBuf>,
    /// `<state dir>/lock`, held while the store lives.
    _state_lock: Option<Arc<std::fs::File>>,
}

impl Flows {
    /// A store whose inventory lives in `state_dir` (read now if it is there), or only in
    /// memory.
    pub fn open(state_dir: Option<&Path>) -> Result<Self> {
        // The state directory is this agent's alone: a second agent sharing it would overwrite
        // the first's inventory with its own.
        let state_lock = match state_dir.map(lock_state_dir).transpose() {
            Ok(lock) => lock,
            Err(StateDirError::InUse(e)) => return Err(e),
            Err(StateDirError::Unusable(e)) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "the state directory cannot be used (read-only?); the flow inventory is kept in memory only"
                );
                return Self::open(None);
            }
        };
        let mut path = state_dir.map(|d| d.join(INVENTORY_FILE));
        let inventory = match &path {
            Some(p) => match load_inventory(p) {
                Ok(inventory) => inventory,
                Err(e) => {
                    // The inventory is a convenience; enforcement must not wait for it. What
                    // could not be read is left where it is, untouched, and not overwritten.
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "the flow inventory cannot be read or set aside; keeping it in memory only until the next start"
                    );
                    path = None;
                    BTreeMap::new()
                }
            },
            None => BTreeMap::new(),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                recent: VecDeque::new(),
                last_seq: 0,
                inventory,
                dirty: false,
            })),
            latest: watch::channel(0).0,
            waiters: Arc::default(),
            path,
            _state_lock: state_lock.map(Arc::new),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_recent(&self, record: &FlowRecord) {
        let seq = {
            let mut inner = self.lock();
            inner.last_seq += 1;
            let seq = inner.last_seq;
            if inner.recent.len() == RECENT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(FlowRecord {
                seq,
                ..record.clone()
            });
            seq
        };
        self.latest.send_replace(seq);
    }

    fn add_to_inventory(&self, r: &FlowRecord) {
        let key = EdgeKey {
            from_identity: r.from_identity.clone(),
            to_identity: r.to_identity.clone(),
            protocol: r.protocol.clone(),
            port: match r.protocol.as_str() {
                "tcp" | "udp" => r.dport,
                _ => 0,
            },
            verdict: r.verdict.clone(),
        };
        let mut inner = self.lock();
        inner.dirty = true;
        if let Some(edge) = inner.inventory.get_mut(&key) {
            edge.count += r.count;
            edge.rule.clone_from(&r.rule);
            if r.time > edge.last_seen {
                edge.last_seen.clone_from(&r.time);
            }
            return;
        }
        if inner.inventory.len() >= MAX_EDGES {
            evict_oldest(&mut inner.inventory);
        }
        inner.inventory.insert(
            key.clone(),
            InventoryEdge {
                from_identity: key.from_identity,
                to_identity: key.to_identity,
                protocol: key.protocol,
                port: key.port,
                verdict: key.verdict,
                outcome: r.outcome.clone(),
                rule: r.rule.clone(),
                first_seen: r.time.clone(),
                last_seen: r.time.clone(),
                count: r.count,
            },
        );
    }

    /// Records after `after` that pass `filter`, waiting up to `wait` for the first one when
    /// there is none yet.
    pub async fn after(
        &self,
        after: u64,
        wait: Duration,
        limit: usize,
        filter: impl Fn(&FlowRecord) -> bool,
    ) -> FlowsResponse {
        let mut latest = self.latest.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let _waiting = Waiting::enter(&self.waiters);
        let may_wait = _waiting.is_some();
        loop {
            let answer = self.collect(after, limit, &filter);
            if !answer.records.is_empty() || wait.is_zero() || !may_wait {
                return answer;
            }
            let after = answer.last_seq;
            tokio::select! {
                r = latest.wait_for(|seq| *seq > after) => if r.is_err() { return answer },
                _ = tokio::time::sleep_until(deadline) => return self.collect(after, limit, &filter),
            }
        }
    }

    fn collect(
        &self,
        after: u64,
        limit: usize,
        filter: &impl Fn(&FlowRecord) -> bool,
    ) -> FlowsResponse {
        let inner = self.lock();
        let limit = limit.clamp(1, MAX_PAGE);
        let first_kept = inner.recent.front().map_or(inner.last_seq + 1, |r| r.seq);
        // A cursor from before a restart (beyond what this agent has numbered) starts over.
        let restarted = after > inner.last_seq;
        let after = if restarted { 0 } else { after };
        let gap = restarted || (after > 0 && after + 1 < first_kept);
        if after == 0 {
            // A first look: the most recent records.
            let mut records: Vec<FlowRecord> = inner
                .recent
                .iter()
                .rev()
                .filter(|r| filter(r))
                .take(limit)
                .cloned()
                .collect();
            records.reverse();
            return FlowsResponse {
                last_seq: inner.last_seq,
                records,
                gap,
            };
        }
        // Following: the oldest records after the cursor, so a follower that fell behind
        // reads on from where it was (or is told of a gap) rather than skipping ahead.
        let start = (after + 1).saturating_sub(first_kept) as usize;
        let mut records = Vec::new();
        let mut last_seq = inner.last_seq;
        for r in inner.recent.iter().skip(start) {
            if !filter(r) {
                continue;
            }
            records.push(r.clone());
            if records.len() == limit {
                last_seq = r.seq;
                break;
            }
        }
        FlowsResponse {
            last_seq,
            records,
            gap,
        }
    }

    /// The inventory, sorted by (from, to, protocol, port, verdict).
    pub fn inventory(&self) -> Vec<InventoryEdge> {
        self.lock().inventory.values().cloned().collect()
    }

    pub fn inventory_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes the inventory if it changed since the last write.
    pub fn persist(&self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            InventoryFile {
                version: INVENTORY_VERSION,
                edges: inner.inventory.values().cloned().collect(),
            }
        };
        let result = crate::statefile::write_atomically(
            path,
            &serde_json::to_vec(&file).map_err(anyhow::Error::from)?,
        );
        if result.is_err() {
            self.lock().dirty = true;
        }
        Ok(result?)
    }
}

/// Edges dropped at once when the inventory is full: finding the oldest is a sort of the whole
/// inventory, so it is done once per this many new edges rather than for each (a flood of new
/// edges made the event reader fall behind, and lose events, with one scan per edge).
const EVICT_AT_ONCE: usize = MAX_EDGES / 100;

/// Makes room in a full inventory: the [`EVICT_AT_ONCE`] edges seen longest ago go.
fn evict_oldest(inventory: &mut BTreeMap<EdgeKey, InventoryEdge>) {
    let mut by_age: Vec<(&str, &EdgeKey)> = inventory
        .iter()
        .map(|(k, e)| (e.last_seen.as_str(), k))
        .collect();
    let n = EVICT_AT_ONCE.min(by_age.len());
    if n == 0 {
        return;
    }
    by_age.select_nth_unstable(n - 1);
    let old: Vec<EdgeKey> = by_age[..n].iter().map(|(_, k)| (*k).clone()).collect();
    for k in old {
        inventory.remove(&k);
    }
}

/// One of at most [`MAX_WAITERS`] long polls, counted while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let before = count.fetch_add(1, Ordering::Relaxed);
        if before >= MAX_WAITERS {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The largest inventory file read: 100,000 edges take about 25 MB.
const MAX_INVENTORY_BYTES: u64 = 64 << 20;

/// Why the state directory could not be locked.
enum StateDirError {
    /// Another agent holds it: refuse to start.
    InUse(anyhow::Error),
    /// It cannot be created, written or locked (read-only file system, permissions): run
    /// without it.
    Unusable(anyhow::Error),
}

/// Locks `<dir>/lock` (created owner-only with the directory), or says who holds it.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, StateDirError> {
    lock_state_dir_inner(dir).map_err(|e| match e.downcast_ref::<InUse>() {
        Some(_) => StateDirError::InUse(e),
        None => StateDirError::Unusable(e),
    })
}

/// The state directory is another agent's.
#[derive(Debug, thiserror::Error)]
#[error("held by another agent")]
struct InUse;

fn lock_state_dir_inner(dir: &Path) -> Result<std::fs::File> {
    use std::os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(anyhow::Error::new(InUse).context(format!(
            "the state directory {} is in use by another agent (it holds {}); give each agent its own --state-dir",
            dir.display(),
            path.display()
        )));
    }
    Ok(file)
}

/// Reads the inventory: a regular file of at most [`MAX_INVENTORY_BYTES`], opened without
/// following a symlink or blocking on a FIFO; the [`MAX_EDGES`] most recently seen edges of it
/// are kept. Anything else is set aside, never read or overwritten. An error: it could not be
/// read nor set aside.
fn load_inventory(path: &Path) -> Result<BTreeMap<EdgeKey, InventoryEdge>> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        // A symlink (ELOOP) and everything else that cannot be opened go aside.
        Err(e) => return set_aside(path, &format!("cannot be opened: {e}")),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        return set_aside(path, "not a regular file");
    }
    if meta.len() > MAX_INVENTORY_BYTES {
        return set_aside(
            path,
            &format!(
                "{} bytes, more than the {MAX_INVENTORY_BYTES} read",
                meta.len()
            ),
        );
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(MAX_INVENTORY_BYTES)
        .read_to_end(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_slice::<InventoryFile>(&text) {
        Ok(file) if file.version == INVENTORY_VERSION => {
            let mut edges = file.edges;
            if edges.len() > MAX_EDGES {
                edges.sort_unstable_by(|a, b| b.last_seen.cmp(&a.last_seen));
                edges.truncate(MAX_EDGES);
            }
            Ok(edges
                .into_iter()
                .map(|e| {
                    (
                        EdgeKey {
                            from_identity: e.from_identity.clone(),
                            to_identity: e.to_identity.clone(),
                            protocol: e.protocol.clone(),
                            port: e.port,
                            verdict: e.verdict.clone(),
                        },
                        e,
                    )
                })
                .collect())
        }
        Ok(f) => set_aside(
            path,
            &format!(
                "version {} (this agent reads {INVENTORY_VERSION})",
                f.version
            ),
        ),
        Err(e) => set_aside(path, &e.to_string()),
    }
}

/// Renames an inventory that cannot be used out of the way (never deletes or overwrites it).
fn set_aside(path: &Path, reason: &str) -> Result<BTreeMap<EdgeKey, InventoryEdge>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let aside = path.with_extension(format!(
        "json.unreadable-{}.{:09}",
        now.as_secs(),
        now.subsec_nanos()
    ));
    std::fs::rename(path, &aside)
        .with_context(|| format!("setting {} aside ({reason})", path.display()))?;
    tracing::warn!(
        file = %aside.display(),
        %reason,
        "the flow inventory could not be used; set aside, starting a new one"
    );
    Ok(BTreeMap::new())
}

/// Feeds the store from the event pipeline.
pub struct FlowsSink {
    flows: Flows,
    last_persist: Instant,
}

impl FlowsSink {
    pub fn new(flows: Flows) -> Self {
        Self {
            flows,
            last_persist: Instant::now(),
        }
    }

    fn persist(&mut self) {
        if let Err(e) = self.flows.persist() {
            tracing::warn!(error = %e, "writing the flow inventory failed; retrying later");
        }
    }
}

impl Sink for FlowsSink {
    fn decision(&mut self, r: &FlowRecord) {
        self.flows.add_to_inventory(r);
    }

    fn record(&mut self, r: &FlowRecord) {
        self.flows.add_recent(r);
    }

    fn control(&mut self, _c: &Control) {}

    fn tick(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_persist) >= PERSIST_INTERVAL {
            self.last_persist = now;
            self.persist();
        }
    }

    fn stop(&mut self) {
        self.persist();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: &str, from: &str, dport: u16, time: &str) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: time.into(),
            verdict: verdict.into(),
            outcome: if verdict.starts_with("deny") {
                "deny"
            } else {
                "allow"
            }
            .into(),
            rule: "default-deny".into(),
            limit: None,
            from_identity: from.into(),
            to_identity: "orders".into(),
            src: "10.200.0.1".parse().unwrap(),
            dst: "10.200.1.2".parse().unwrap(),
            sport: 40000,
            dport,
            protocol: "tcp".into(),
            generation: 1,
            ifindex: 3,
            direction: "ingress".into(),
            count: 2,
            repeated: false,
            auth_required: false,
        }
    }

    #[tokio::test]
    async fn recent_records_are_numbered_and_followed_by_cursor() {
        let flows = Flows::open(None).unwrap();
        let mut sink = FlowsSink::new(flows.clone());
        sink.record(&record("deny_default", "world", 80, "t1"));
        sink.record(&record("allow_new", "frontend", 80, "t2"));
        let all = flows.after(0, Duration::ZERO, 100, |_| true).await;
        assert_eq!(
            all.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        let denied = flows
            .after(0, Duration::ZERO, 100, |r| r.outcome == "deny")
            .await;
        assert_eq!(denied.records.len(), 1);
        assert_eq!(denied.last_seq, 2);
        // A follower waiting after seq 2 gets the next record as soon as it comes.
        let waiter = {
            let flows = flows.clone();
            tokio::spawn(async move { flows.after(2, Duration::from_secs(5), 100, |_| true).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.record(&record("deny_default", "world", 443, "t3"));
        let got = waiter.await.unwrap();
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].seq, 3);
        // Nothing new: the wait ends empty.
        let none = flows
            .after(3, Duration::from_millis(50), 100, |_| true)
            .await;
        assert!(none.records.is_empty() && !none.gap);
        // A cursor from before a restart starts over, and says so.
        let restarted = flows.after(99, Duration::ZERO, 100, |_| true).await;
        assert!(restarted.gap);
        assert_eq!(restarted.records.len(), 3);
    }

    #[tokio::test]
    async fn at_most_max_waiters_polls_wait_and_the_rest_are_answered_at_once() {
        let flows = Flows::open(None).unwrap();
        let waiting: Vec<_> = (0..MAX_WAITERS)
            .map(|_| {
                let flows = flows.clone();
                tokio::spawn(
                    async move { flows.after(0, Duration::from_secs(5), 10, |_| true).await },
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = std::time::Instant::now();
        let r = flows.after(0, Duration::from_secs(5), 10, |_| true).await;
        assert!(r.records.is_empty());
        assert!(start.elapsed() < Duration::from_secs(1), "answered at once");
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn only_the_most_recent_records_are_kept_and_a_gap_is_reported() {
        let flows = Flows::open(None).unwrap();
        let mut sink = FlowsSink::new(flows.clone());
        for i in 0..RECENT + 10 {
            sink.record(&record("deny_default", "world", (i % 60000) as u16, "t"));
        }
        // A follower behind what is kept reads on from the oldest kept record, told of the gap.
        let r = flows.after(5, Duration::ZERO, 10, |_| true).await;
        assert!(r.gap);
        assert_eq!(r.records[0].seq, 11);
        assert_eq!(
            r.last_seq, 20,
            "the next page starts after the last one returned"
        );
        // A follower within what is kept pages on without skipping.
        let r = flows.after(50, Duration::ZERO, 3, |_| true).await;
        assert!(!r.gap);
        assert_eq!(
            r.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [51, 52, 53]
        );
        assert_eq!(r.last_seq, 53);
        // A first look shows the most recent.
        let r = flows.after(0, Duration::ZERO, 2, |_| true).await;
        assert_eq!(
            r.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [(RECENT + 9) as u64, (RECENT + 10) as u64]
        );
    }

    #[test]
    fn a_full_inventory_makes_room_in_batches_oldest_first() {
        let flows = Flows::open(None).unwrap();
        let mut sink = FlowsSink::new(flows.clone());
        let start = std::time::Instant::now();
        for i in 0..MAX_EDGES + 5_000 {
            let time = format!(
                "2026-11-24T10:{:02}:{:02}.{:03}Z",
                i / 60_000,
                (i / 1000) % 60,
                i % 1000
            );
            sink.decision(&record("deny_default", &format!("id-{i}"), 80, &time));
        }
        let edges = flows.inventory();
        assert!(edges.len() <= MAX_EDGES && edges.len() > MAX_EDGES - 2 * EVICT_AT_ONCE);
        assert!(
            edges.iter().all(|e| e.from_identity != "id-0"),
            "the oldest went"
        );
        assert!(edges
            .iter()
            .any(|e| e.from_identity == format!("id-{}", MAX_EDGES + 4_999)));
        eprintln!(
            "105k new edges into a full inventory: {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_inventory_counts_edges_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let flows = Flows::open(Some(dir.path())).unwrap();
        let mut sink = FlowsSink::new(flows.clone());
        sink.decision(&record(
            "deny_default",
            "world",
            80,
            "2026-11-24T10:00:00.000Z",
        ));
        sink.decision(&record(
            "deny_default",
            "world",
            80,
            "2026-11-24T10:00:05.000Z",
        ));
        sink.decision(&record(
            "allow_new",
            "frontend",
            80,
            "2026-11-24T10:00:01.000Z",
        ));
        sink.stop();
        drop((sink, flows));
        let reopened = Flows::open(Some(dir.path())).unwrap();
        let edges = reopened.inventory();
        assert_eq!(edges.len(), 2);
        let denied = edges.iter().find(|e| e.verdict == "deny_default").unwrap();
        assert_eq!(denied.count, 4);
        assert_eq!(denied.first_seen, "2026-11-24T10:00:00.000Z");
        assert_eq!(denied.last_seen, "2026-11-24T10:00:05.000Z");
    }

    #[test]
    fn a_state_directory_that_cannot_be_made_leaves_the_inventory_in_memory() {
        // Nothing can be created under /proc, not even by root.
        let flows = Flows::open(Some(Path::new("/proc/self/tollgate-state"))).unwrap();
        assert!(flows.inventory_path().is_none());
        flows.persist().unwrap();
    }

    #[test]
    fn a_second_store_on_the_same_state_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Flows::open(Some(dir.path())).unwrap();
        let e = Flows::open(Some(dir.path())).err().expect("refused");
        assert!(
            format!("{e:#}").contains("in use by another agent"),
            "{e:#}"
        );
        drop(first);
        Flows::open(Some(dir.path())).expect("free once the first is gone");
    }

    #[test]
    fn inventories_that_are_not_plain_small_files_are_set_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = dir.path().join(INVENTORY_FILE);
        // A symlink (to something that would never end), a FIFO, a directory.
        std::os::unix::fs::symlink("/dev/zero", &inventory).unwrap();
        drop(Flows::open(Some(dir.path())).unwrap());
        assert!(!inventory.exists() && std::fs::symlink_metadata(&inventory).is_err());
        let fifo = std::ffi::CString::new(inventory.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path in our own temporary directory.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        drop(Flows::open(Some(dir.path())).unwrap());
        std::fs::create_dir(&inventory).unwrap();
        drop(Flows::open(Some(dir.path())).unwrap());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("unreadable"))
            .count();
        assert_eq!(aside, 3, "each set aside, none deleted or overwritten");
    }

    #[test]
    fn a_symlink_planted_as_the_temporary_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("inventory.tmp")).unwrap();
        crate::statefile::write_atomically(&dir.path().join(INVENTORY_FILE), b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(dir.path().join(INVENTORY_FILE)).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn an_unreadable_inventory_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(INVENTORY_FILE), b"{ not json").unwrap();
        let flows = Flows::open(Some(dir.path())).unwrap();
        assert!(flows.inventory().is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("unreadable"))
            .collect();
        assert_eq!(aside.len(), 1);
    }
}
