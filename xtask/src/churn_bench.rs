//! `cargo xtask bench` (churn part): Kubernetes mode at cluster speed. A real agent in
//! `--kubernetes` mode, a fake API server (`tollgate_testbed::kubeapi`) with 10,000 pods over
//! 100 nodes and a policy of 100 selector identities, then 100 pod changes per second (new pods,
//! deleted pods, relabelled pods) for 30 seconds.
//!
//! Lag is measured from the moment the change is in the API server (its watch event goes out)
//! to the moment the pinned identity map (`TG_ADDR_ID_V4`, read with `BPF_MAP_LOOKUP_ELEM`)
//! holds the new state, polled every 200 µs. The baseline, in the same run: the time the same
//! agent takes to install a whole new generation (one rule added to a Policy object), which is
//! what a pod change would cost if pod addresses went through the policy like CIDRs do.
//! Agent CPU (utime + stime) and RSS come from /proc.

use std::{
    ffi::CString,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use tollgate_testbed::{
    kubeapi::{self, FakeApiServer},
    AgentProcess, NetNs,
};

const PODS: usize = 10_000;
const NODES: usize = 100;
const IDENTITIES: usize = 100;
const NAMESPACES: usize = 10;
const RATE: u32 = 100;
const CHURN: Duration = Duration::from_secs(30);
/// How long one change may take to show before the bench gives up on it.
const CHANGE_LIMIT: Duration = Duration::from_secs(5);
/// Conntrack entries written before the churn (the IPv4 map holds 131,072).
const TRACKED_ENTRIES: usize = 120_000;
const FLOWS_PER_POD: usize = 12;

pub fn run() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the churn bench needs root (namespaces, BPF); run it as root");
    }
    let tollgate = crate::build_agent_binary()?;
    let prefix = format!("tgcb{}", std::process::id() % 100_000);
    let workdir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&workdir)?;
    let _workdir = RemoveDir(workdir.clone());
    let ns = NetNs::new(&format!("{prefix}-node"))?;
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0"))??;
    let api = FakeApiServer::start_with(
        listener,
        kubeapi::Options {
            history_limit: 20_000,
            ..Default::default()
        },
    )?;
    for n in 0..NAMESPACES {
        api.apply(kubeapi::namespace(&format!("ns-{n}"), &[]))?;
    }
    for i in 0..PODS {
        api.apply(pod(i, i % IDENTITIES, i))?;
    }
    api.apply(policy(0))?;
    let kubeconfig = workdir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/{prefix}"));
    let started = Instant::now();
    let mut agent = AgentProcess::start_with_args(
        &tollgate,
        &ns,
        "tgcb-none-*",
        &workdir.join("no-policy-file"),
        &workdir.join("agent"),
        &bpffs,
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().context("path")?,
            "--node-name",
            "node-0",
        ],
    )?;
    let pid = agent.pid().context("agent pid")?;
    wait_for(
        "the agent to sync 10,000 pods",
        Duration::from_secs(60),
        || Ok(status(&agent)?["kubernetes"]["synced"] == true),
    )?;
    let synced_after = started.elapsed();
    let maps = Maps::open(&bpffs)?;
    let rss_synced = rss_kb(pid)?;
    // Tracked flows, so that every deletion and relabel pays for its conntrack purge as on a
    // busy node: FLOWS_PER_POD entries from each of the first pods' addresses.
    let mut tracked = 0usize;
    for n in 0..PODS {
        for k in 0..FLOWS_PER_POD {
            if tracked >= TRACKED_ENTRIES {
                break;
            }
            maps.track(address(n), k as u16)?;
            tracked += 1;
        }
    }

    // Baseline: a new generation (one more rule) with every pod address in it.
    let mut swaps = Vec::new();
    for round in 1..=5 {
        let before = maps.generation()?;
        let t = Instant::now();
        api.apply(policy(round))?;
        wait_for("a new generation", Duration::from_secs(30), || {
            Ok(maps.generation()? > before)
        })?;
        swaps.push(t.elapsed());
    }

    // Churn: RATE changes per second, round robin over add, delete and relabel.
    let cpu_before = cpu_ticks(pid)?;
    // Open loop: changes go out at RATE whatever the agent does; a checker thread watches the
    // map for every outstanding change and records its lag.
    let slot = maps.slot()?;
    let maps = std::sync::Arc::new(maps);
    let outstanding: std::sync::Arc<std::sync::Mutex<Vec<Outstanding>>> = Default::default();
    let issuing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checker = {
        let (maps, outstanding, issuing) = (maps.clone(), outstanding.clone(), issuing.clone());
        std::thread::spawn(move || -> Result<(Vec<(Duration, usize)>, usize)> {
            let mut lags = Vec::new();
            let mut missed = 0;
            let deadline = Instant::now() + CHURN + CHANGE_LIMIT * 2;
            while Instant::now() < deadline {
                let done = !issuing.load(std::sync::atomic::Ordering::Relaxed);
                {
                    let mut list = outstanding.lock().expect("lock");
                    let mut keep = Vec::with_capacity(list.len());
                    for (addr, expect, at, kind) in list.drain(..) {
                        if maps.identity(slot, addr)? == expect {
                            lags.push((at.elapsed(), kind));
                        } else if at.elapsed() > CHANGE_LIMIT {
                            missed += 1;
                        } else {
                            keep.push((addr, expect, at, kind));
                        }
                    }
                    *list = keep;
                    if done && list.is_empty() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok((lags, missed))
        })
    };
    let churn_started = Instant::now();
    let mut next_new = PODS;
    let mut live: std::collections::VecDeque<usize> = (0..PODS).collect();
    let mut changes = 0u32;
    let interval = Duration::from_secs(1) / RATE;
    while churn_started.elapsed() < CHURN {
        let due = churn_started + interval * changes;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let kind = (changes % 3) as usize;
        let (addr, expect) = match kind {
            // A new pod, with a fresh address, in identity `n % IDENTITIES`.
            0 => {
                let n = next_new;
                next_new += 1;
                live.push_back(n);
                api.apply(pod(n, n % IDENTITIES, n))?;
                (address(n), Some(id_of(n % IDENTITIES)))
            }
            // The oldest pod goes.
            1 => {
                let n = live.pop_front().context("no pods left")?;
                api.delete("Pod", Some(&namespace_of(n)), &format!("pod-{n}"))?;
                (address(n), None)
            }
            // A pod from the middle (not changed lately) moves to the next identity.
            _ => {
                let n = live[live.len() / 2];
                let moved = (n + 1 + changes as usize) % IDENTITIES;
                api.apply(pod(n, moved, n))?;
                (address(n), Some(id_of(moved)))
            }
        };
        outstanding
            .lock()
            .expect("lock")
            .push((addr, expect, Instant::now(), kind));
        changes += 1;
    }
    issuing.store(false, std::sync::atomic::Ordering::Relaxed);
    let (results, missed) = checker
        .join()
        .map_err(|_| anyhow::anyhow!("the checker panicked"))??;
    // Adds and deletions show at once; a move's new identity waits for its old flows' purge.
    let mut lags: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    let mut by_kind: [Vec<Duration>; 3] = Default::default();
    for (d, kind) in &results {
        by_kind[*kind].push(*d);
    }
    for v in &mut by_kind {
        v.sort();
    }
    let churn_took = churn_started.elapsed();
    let cpu = cpu_ticks(pid)? - cpu_before;
    let rss_after = rss_kb(pid)?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_share = cpu as f64 / ticks / churn_took.as_secs_f64();
    agent.stop()?;
    drop(agent);

    lags.sort();
    swaps.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let swap_median = pct(&swaps, 0.5);
    let lag_median = pct(&lags, 0.5);
    println!();
    println!(
        "## Kubernetes churn ({PODS} pods on {NODES} nodes, {IDENTITIES} selector identities)"
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| initial sync (agent start to synced, 10k pods) | {:.2} s |",
        synced_after.as_secs_f64()
    );
    println!(
        "| pod changes applied | {} in {:.1} s ({:.0}/s), {missed} not seen within {CHANGE_LIMIT:?} |",
        lags.len(),
        churn_took.as_secs_f64(),
        f64::from(changes) / churn_took.as_secs_f64()
    );
    println!(
        "| lag, API event to map entry: median / p99 / max | {} / {} / {} |",
        ms(lag_median),
        ms(pct(&lags, 0.99)),
        ms(*lags.last().context("no lags")?)
    );
    for (kind, name) in [
        "new pod",
        "pod deleted",
        "pod relabelled to another identity",
    ]
    .iter()
    .enumerate()
    {
        let v = &by_kind[kind];
        if !v.is_empty() {
            println!(
                "| lag, {name} ({}): median / p99 | {} / {} |",
                v.len(),
                ms(pct(v, 0.5)),
                ms(pct(v, 0.99))
            );
        }
    }
    println!(
        "| baseline: a new generation with all pod addresses, median of {} | {} |",
        swaps.len(),
        ms(swap_median)
    );
    println!(
        "| pod change lag / generation swap (median) | {:.3} |",
        lag_median.as_secs_f64() / swap_median.as_secs_f64()
    );
    println!(
        "| agent CPU during churn ({tracked} tracked flow entries to purge from) | {:.1}% of one core |",
        cpu_share * 100.0
    );
    println!(
        "| agent RSS: synced / after churn | {:.1} MB / {:.1} MB |",
        rss_synced as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    if missed > 0 {
        bail!("{missed} pod changes did not reach the maps within {CHANGE_LIMIT:?}");
    }
    Ok(())
}

/// A change sent and not yet seen in the map: address, expected identity (None: no entry),
/// when it was sent, and its kind (0 new pod, 1 deleted, 2 relabelled).
type Outstanding = (Ipv4Addr, Option<u32>, Instant, usize);

fn namespace_of(n: usize) -> String {
    format!("ns-{}", n % NAMESPACES)
}

/// Pod `n`'s address: 10.200.0.0/16 holds 65k, enough for the run's pods.
fn address(n: usize) -> Ipv4Addr {
    let n = n as u32 + 1;
    Ipv4Addr::new(10, 200, (n >> 8) as u8, (n & 0xff) as u8)
}

/// Identity `k` is the k-th of the policy: id 256 + k.
fn id_of(k: usize) -> u32 {
    256 + k as u32
}

fn pod(n: usize, identity: usize, address_of: usize) -> Value {
    kubeapi::pod(
        &namespace_of(n),
        &format!("pod-{n}"),
        &[("app", &format!("app-{identity}"))],
        "default",
        &format!("node-{}", n % NODES),
        &[&address(address_of).to_string()],
        "Running",
        false,
    )
}

/// The policy: identity `app-k` selects label `app: app-k`; rules from each identity to the
/// next, plus `extra` more (so each round of the baseline makes a new generation).
fn policy(extra: usize) -> Value {
    let identities: Vec<Value> = (0..IDENTITIES)
        .map(|k| json!({"name": format!("app-{k}"), "selector": {"matchLabels": {"app": format!("app-{k}")}}}))
        .collect();
    let rules: Vec<Value> = (0..IDENTITIES + extra)
        .map(|k| {
            json!({"name": format!("r-{k}"), "from": format!("app-{}", k % IDENTITIES),
                   "to": format!("app-{}", (k + 1 + k / IDENTITIES) % IDENTITIES),
                   "ports": [{"port": 8000 + (k / IDENTITIES) as u16, "protocol": "TCP"}]})
        })
        .collect();
    kubeapi::policy("bench", json!({"identities": identities, "rules": rules}))
}

fn status(agent: &AgentProcess) -> Result<Value> {
    let out = agent.cli(&["status", "--json"])?;
    if !out.status.success() {
        bail!("status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("waited {limit:?} for {what}")
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS")?.parse()?)
}

/// The pinned maps the bench reads, by raw `bpf(2)`: the agent's own crate is not a dependency
/// of xtask.
struct Maps {
    active: std::os::fd::OwnedFd,
    addr_v4: std::os::fd::OwnedFd,
    conntrack_v4: std::os::fd::OwnedFd,
}

impl Maps {
    fn open(bpffs: &Path) -> Result<Self> {
        Ok(Maps {
            active: obj_get(&bpffs.join("maps/TG_ACTIVE"))?,
            addr_v4: obj_get(&bpffs.join("maps/TG_ADDR_ID_V4"))?,
            conntrack_v4: obj_get(&bpffs.join("maps/TG_CONNTRACK_V4"))?,
        })
    }

    fn generation(&self) -> Result<u64> {
        let mut value = 0u64;
        lookup(&self.active, &0u32.to_ne_bytes(), bytes_of_mut(&mut value))?;
        Ok(value)
    }

    fn slot(&self) -> Result<u32> {
        Ok((self.generation()? & 1) as u32)
    }

    /// Writes a conntrack entry (a TCP flow from `from`:`port` to 10.200.250.1:80), as a
    /// tracked flow would leave; its value is all zero (never current, only to be walked).
    fn track(&self, from: Ipv4Addr, port: u16) -> Result<()> {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&from.octets());
        key[4..8].copy_from_slice(&[10, 200, 250, 1]);
        key[8..10].copy_from_slice(&port.to_be_bytes());
        key[10..12].copy_from_slice(&80u16.to_be_bytes());
        key[12] = 6;
        let value = [0u8; 48];
        update(&self.conntrack_v4, &key, &value)
    }

    /// The identity of `addr`'s exact entry in `slot`, if it has one.
    fn identity(&self, slot: u32, addr: Ipv4Addr) -> Result<Option<u32>> {
        let mut key = [0u8; 8];
        key[..4].copy_from_slice(&slot.to_ne_bytes());
        key[4..].copy_from_slice(&addr.octets());
        let mut value = [0u8; 16];
        if !lookup(&self.addr_v4, &key, &mut value)? {
            return Ok(None);
        }
        Ok(Some(u32::from_ne_bytes(value[..4].try_into()?)))
    }
}

fn bytes_of_mut(v: &mut u64) -> &mut [u8] {
    // SAFETY: a u64 is 8 initialised bytes.
    unsafe { std::slice::from_raw_parts_mut((v as *mut u64).cast(), 8) }
}

fn obj_get(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
    }
    // Zeroed whole, padding included: the kernel refuses an attr with stray bytes past the
    // fields it knows.
    // SAFETY: an all-zero Attr is valid (integers only).
    let mut attr: Attr = unsafe { std::mem::zeroed() };
    attr.pathname = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the path string, which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7 as libc::c_long, // BPF_OBJ_GET
            &attr as *const Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening {}", path.display()));
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_MAP_LOOKUP_ELEM`; false when the key has no entry.
fn lookup(map: &std::os::fd::OwnedFd, key: &[u8], value: &mut [u8]) -> Result<bool> {
    match elem(1, map, key, value.as_mut_ptr() as u64) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
    }
}

/// `BPF_MAP_UPDATE_ELEM` (any).
fn update(map: &std::os::fd::OwnedFd, key: &[u8], value: &[u8]) -> Result<()> {
    elem(2, map, key, value.as_ptr() as u64).context("BPF_MAP_UPDATE_ELEM")
}

/// One element command (`BPF_MAP_LOOKUP_ELEM` = 1, `BPF_MAP_UPDATE_ELEM` = 2) on `map`: the
/// key is read, the value read or written at `value` (the caller's buffer of the map's value
/// size).
fn elem(cmd: i32, map: &std::os::fd::OwnedFd, key: &[u8], value: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value,
        flags: 0,
    };
    // SAFETY: the kernel reads key_size bytes at `key` and reads or writes value_size bytes at
    // `value`; both buffers are the map's sizes and outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            libc::c_long::from(cmd),
            &attr as *const Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
