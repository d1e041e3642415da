//! `cargo xtask bench --traffic`: real traffic through a router namespace, filtered by Tollgate
//! or by the classic Linux firewalls, each as a ratio to no filtering in the same run (issue 6,
//! item 6), and what Tollgate's programs cost per run on that traffic (item 3).
//!
//! Topology: the testbed's node namespace (`<prefix>-node`) is the router between a `client`
//! and a `server` namespace over veth pairs `tg-client` and `tg-server` (10.200.1.0/24,
//! 10.200.2.0/24 and fd00:200:1::/64, fd00:200:2::/64; MTU 1500, default offloads on). Every
//! configuration is measured on a fresh topology: nothing one filter leaves behind (a legacy
//! iptables table stays hooked until its namespace goes, conntrack entries, TIME_WAIT sockets)
//! can slow down the next. Configurations are interleaved round by round, in an order rotated
//! each round. Each is paired with a no-filter topology built next to it: every workload runs
//! on the two back to back, and the ratio is taken within the pair. On a shared machine the
//! background load changes from one minute to the next (a first version compared with one
//! baseline per round and saw ratios from 0.5 to 1.3 for the same configuration); a pair
//! measured seconds apart sees the same background.
//!
//! Workloads, each for a fixed time: new TCP connections per second (a few client threads open
//! and close connections back to back, the server closes each on accept), request/response
//! transactions per second (one byte each way on one connection, like netperf TCP_RR), bulk
//! TCP throughput (iperf3). Then, each round, for Tollgate only and in a pass of its own, each
//! workload again with BPF run-time statistics on, for nanoseconds per run of each attached
//! program.
//!
//! Cleanup: every namespace, agent, pin directory, iperf3 process and filter is removed in
//! Drop by the exact name or pid it was created with, also on error, panic or Ctrl-C.

mod filter;
mod hook_stats;
mod iperf;
mod report;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use filter::{Endpoints, Family, Filter, FilterInputs, InstalledFilter, IptablesBackend};
use report::{Results, Sample, Workload};
use tollgate_testbed::{
    load::{self, ClosedPortProbe},
    Topology,
};

use crate::{
    build_agent_binary,
    interrupt::{self, check_interrupted},
    workspace_root,
};

/// Concurrent clients of the connection-rate workload.
const CONNECTION_WORKERS: usize = 4;
/// Accepting threads of its server.
const CONNECTION_ACCEPTORS: usize = 2;
/// Slices per side of a pair for the in-process workloads.
const SLICES: usize = 4;
/// The CPU both ends of the request/response and bulk workloads run on: the first this process
/// may use. Left to the scheduler, the two ends land on the same or on different CPUs from run
/// to run, and in a VM the cross-CPU wakeup alone makes a 3-7x difference (measured: 55-60k
/// against 8-18k transactions/s), which would swamp any filter's cost. On one CPU, all the
/// work of the path (both TCP stacks, the router's forwarding and filter) counts against one
/// CPU's time.
fn pinned_cpu() -> usize {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the kernel writes at most the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
        return 0;
    }
    // SAFETY: CPU_ISSET reads one bit of a set we own; the index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .unwrap_or(0)
}
/// A port nobody listens on: a SYN to it is refused by the server's kernel unless a filter
/// drops it first, which shows whether the filter is in force.
const CLOSED_PORT: u16 = 7009;
/// How long the closed-port probe waits for a refusal.
const CLOSED_PORT_WAIT: Duration = Duration::from_millis(250);

/// Command-line options of `bench --traffic`.
#[derive(Clone, Debug, PartialEq)]
struct Options {
    rounds: usize,
    /// Measured time of each workload.
    seconds: u32,
    rules: Vec<usize>,
    family: Family,
    /// Filter kinds to compare with no filter: tollgate, iptables-nft, iptables-legacy,
    /// nftables.
    kinds: Vec<String>,
}

const KINDS: [&str; 4] = ["tollgate", "iptables-nft", "iptables-legacy", "nftables"];

const USAGE: &str = "usage: cargo xtask bench --traffic [--rounds N (5)] [--seconds S (1)] \
    [--rules 10,10k,100k] [--filters tollgate,iptables-nft,iptables-legacy,nftables] [--ipv6]";

impl Default for Options {
    fn default() -> Self {
        Self {
            rounds: 5,
            seconds: 1,
            rules: vec![10, 10_000, 100_000],
            family: Family::V4,
            kinds: KINDS.iter().map(|k| k.to_string()).collect(),
        }
    }
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{arg} needs a value; {USAGE}"))
            };
            match arg.as_str() {
                "--rounds" => {
                    o.rounds = value()?.parse().context("--rounds")?;
                    if o.rounds == 0 {
                        bail!("--rounds must be at least 1");
                    }
                }
                "--seconds" => {
                    o.seconds = value()?.parse().context("--seconds")?;
                    if o.seconds == 0 {
                        bail!("--seconds must be at least 1");
                    }
                }
                "--rules" => {
                    o.rules = value()?
                        .split(',')
                        .map(filter::parse_count)
                        .collect::<Result<_>>()?;
                }
                "--filters" => {
                    o.kinds = value()?.split(',').map(str::to_string).collect();
                    if let Some(k) = o.kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
                        bail!("unknown filter {k:?} (known: {})", KINDS.join(", "));
                    }
                }
                "--ipv6" => o.family = Family::V6,
                "--help" | "-h" => bail!("{USAGE}"),
                _ => bail!("unknown argument {arg:?}; {USAGE}"),
            }
        }
        Ok(o)
    }

    /// No filter first, then each kind at each size. iptables-legacy is left out (with a
    /// note) when its tools are missing: some distributions ship only the nft backend.
    fn configurations(&self) -> (Vec<Filter>, Vec<String>) {
        let mut filters = vec![Filter::None];
        let mut notes = Vec::new();
        for kind in &self.kinds {
            for &rules in &self.rules {
                let f = match kind.as_str() {
                    "tollgate" => Filter::Tollgate { rules },
                    "iptables-nft" => Filter::Iptables {
                        backend: IptablesBackend::Nft,
                        rules,
                    },
                    "iptables-legacy" => Filter::Iptables {
                        backend: IptablesBackend::Legacy,
                        rules,
                    },
                    _ => Filter::Nftables { elements: rules },
                };
                match filter::check_tools(f, self.family) {
                    Ok(()) => filters.push(f),
                    Err(e) => {
                        let note = format!("{kind} left out: {e:#}");
                        if !notes.contains(&note) {
                            notes.push(note);
                        }
                    }
                }
            }
        }
        (filters, notes)
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let options = Options::parse(args)?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench --traffic needs root (namespaces, BPF, iptables); run it as root");
    }
    for (tool, package) in [
        ("iperf3", "iperf3"),
        ("bpftool", "bpftool"),
        ("ip", "iproute2"),
    ] {
        filter::require_tool(tool, package)?;
    }
    let (filters, notes) = options.configurations();
    for note in &notes {
        eprintln!("note: {note}");
    }
    if options.rounds < 5 {
        eprintln!(
            "note: {} rounds; issue 6 asks for at least 5 for the recorded figures",
            options.rounds
        );
    }

    let tollgate = build_agent_binary()?;

    interrupt::catch_ctrl_c();
    let started = Instant::now();
    let load_before = load_average();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if load_before
        .parse::<f64>()
        .is_ok_and(|l| l > cpus as f64 / 2.0)
    {
        eprintln!(
            "warning: the machine is busy (load average {load_before} on {cpus} CPUs); the \
             ratios will be noisy. For figures to record, run on an otherwise idle machine."
        );
    }
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let prefix = format!("tgtb{}", std::process::id() % 100_000);
    let workdir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&workdir)?;
    let _workdir = RemoveDir(workdir.clone());
    let bench = Bench {
        options: options.clone(),
        prefix,
        tollgate,
        workdir,
        agents_started: std::cell::Cell::new(0),
        cpu: pinned_cpu(),
    };
    let cpu = bench.cpu;
    let result = bench.measure_all(&filters);
    let results = match result {
        Ok(r) => r,
        // What failed first (an iperf3 killed by the same Ctrl-C, say) is no news.
        Err(_) if interrupt::interrupted() => {
            bail!("interrupted; everything the bench created was removed")
        }
        Err(e) => return Err(e),
    };

    let seconds = options.seconds;
    println!("\n== Tollgate traffic bench ({date}) ==");
    println!("machine: {}", machine());
    println!("commit:  {}", commit());
    println!(
        "topology: client -- router -- server namespaces, veth pairs (MTU 1500, default offloads \
         on), {}, router forwarding; filters in the router on tg-client and tg-server",
        options.family.name()
    );
    println!(
        "method: {} rounds, configurations interleaved (order rotated each round); each on a \
         fresh topology next to a fresh no-filter one; connections and request/response \
         alternate between the two in {SLICES} slices per side (ABBA), bulk runs once on each \
         (order alternating); median = median over the rounds; ratio = median over the rounds \
         of filter / no filter within the pair, with its range",
        options.rounds
    );
    println!(
        "load average (1 min) at start and end: {load_before} / {} (other work on the machine \
         adds noise)",
        load_average()
    );
    println!(
        "N = rules (Tollgate, iptables: the one allowing the measured flows last in iptables) or \
         set elements (nftables: three of them, one per measured port, allow)"
    );
    for note in &notes {
        println!("note: {note}");
    }
    print!(
        "{}",
        results.render(&|w| match w {
            Workload::NewConnections => format!(
                "{CONNECTION_WORKERS} client threads, {seconds} s per side; connect, server \
                 closes, close"
            ),
            Workload::RequestResponse => format!(
                "1 byte each way on one TCP connection, {seconds} s per side, both ends on CPU \
                 {cpu}"
            ),
            Workload::Bulk => {
                format!("iperf3, one TCP stream, {seconds} s per side, both ends on CPU {cpu}")
            }
        })
    );
    println!(
        "\nbench --traffic took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Bench {
    options: Options,
    prefix: String,
    tollgate: PathBuf,
    workdir: PathBuf,
    /// Gives each agent its own pin directory name.
    agents_started: std::cell::Cell<usize>,
    cpu: usize,
}

impl Bench {
    fn measure_all(&self, filters: &[Filter]) -> Result<Results> {
        let (v4, v6) = endpoints();
        let inputs = self.inputs();
        for &f in filters {
            inputs.write_rule_file(f, v4, v6)?;
        }
        let rounds = self.options.rounds;
        let mut results = Results::new(filters.to_vec());
        let measured = &filters[1..];
        for round in 0..rounds {
            for k in 0..measured.len() {
                // Rotated so that no configuration always follows the same one.
                let c = 1 + (k + round) % measured.len();
                check_interrupted()?;
                let (base, sample) = self
                    .measure_pair(filters[c], round + k)
                    .with_context(|| format!("round {}: {}", round + 1, filters[c].label()))?;
                let ratios: Vec<String> = Workload::ALL
                    .iter()
                    .map(|w| {
                        let i = w.index();
                        format!(
                            "{} {:.3} ({} / {})",
                            w.short(),
                            sample.values[i] / base.values[i],
                            w.format(sample.values[i]),
                            w.format(base.values[i])
                        )
                    })
                    .collect();
                eprintln!(
                    "round {}/{rounds} {:<22} {}; load {:.2} s",
                    round + 1,
                    filters[c].label(),
                    ratios.join(", "),
                    sample.load_time.as_secs_f64()
                );
                results.add_pair(c, base, sample);
            }
            for &f in filters {
                let Filter::Tollgate { rules } = f else {
                    continue;
                };
                check_interrupted()?;
                for (workload, programs) in self
                    .measure_hook_costs(f)
                    .with_context(|| format!("round {}: hook costs of {}", round + 1, f.label()))?
                {
                    results.add_hook_costs(rules, workload, programs);
                }
            }
        }
        Ok(results)
    }

    fn inputs(&self) -> FilterInputs<'_> {
        FilterInputs {
            family: self.options.family,
            workdir: &self.workdir,
            tollgate: &self.tollgate,
        }
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.options.seconds.into())
    }

    /// `filter` and no filter, each on a fresh topology of its own, both present for the whole
    /// measurement, so a change in what else the machine does shifts both alike. The two
    /// in-process workloads alternate between the rigs in `SLICES` slices per side in ABBA
    /// order (a linear drift cancels); iperf3 cannot run shorter than a second, so bulk runs
    /// once per side, the order alternating with `parity`. Returns (no filter, filter).
    fn measure_pair(&self, filter: Filter, parity: usize) -> Result<(Sample, Sample)> {
        let base = Rig::new(self, Filter::None, &format!("{}b", self.prefix))?;
        let filtered = Rig::new(self, filter, &format!("{}f", self.prefix))?;
        let rigs = [&base, &filtered];
        let mut samples = [Sample::default(), Sample::default()];
        samples[1].load_time = filtered.filter.load_time;
        let first = parity % 2;
        for workload in [Workload::NewConnections, Workload::RequestResponse] {
            let _servers = [
                base.start_server(workload)?,
                filtered.start_server(workload)?,
            ];
            let mut rates = [load::Rate::default(), load::Rate::default()];
            for slice in 0..2 * SLICES {
                check_interrupted()?;
                // A B B A A B B A ...
                let side = first ^ usize::from(matches!(slice % 4, 1 | 2));
                let rate = rigs[side]
                    .run_client(workload, self.duration() / SLICES as u32)
                    .with_context(|| {
                        format!("{} ({})", workload.short(), rigs[side].filter_kind.label())
                    })?;
                rates[side].completed += rate.completed;
                rates[side].failed += rate.failed;
                rates[side].elapsed += rate.elapsed;
            }
            for (sample, rate) in samples.iter_mut().zip(rates) {
                if rate.completed == 0 {
                    bail!(
                        "{}: nothing completed ({} attempts failed)",
                        workload.short(),
                        rate.failed
                    );
                }
                sample.values[workload.index()] = rate.per_second();
                sample.failed_connections += rate.failed;
            }
        }
        for k in 0..2 {
            let side = first ^ k;
            check_interrupted()?;
            samples[side].values[Workload::Bulk.index()] = rigs[side]
                .bulk(self.options.seconds)
                .with_context(|| format!("bulk TCP ({})", rigs[side].filter_kind.label()))?;
        }
        let [base_sample, sample] = samples;
        Ok((base_sample, sample))
    }

    /// Each workload once more through `filter` (a Tollgate configuration) with BPF run-time
    /// statistics on around it: the counters each attached program accumulated.
    #[expect(
        clippy::type_complexity,
        reason = "a plain list of per-workload counters"
    )]
    fn measure_hook_costs(
        &self,
        filter: Filter,
    ) -> Result<Vec<(Workload, Vec<(String, hook_stats::ProgramCounters)>)>> {
        let rig = Rig::new(self, filter, &format!("{}f", self.prefix))?;
        let agent = rig
            .filter
            .agent()
            .context("hook costs are measured for Tollgate only")?;
        let programs = hook_stats::pinned_programs(&agent.bpffs)?;
        let mut costs = Vec::new();
        for workload in Workload::ALL {
            check_interrupted()?;
            let server = rig.start_server(workload)?;
            let stats = hook_stats::StatsEnabled::new()?;
            let before = hook_stats::snapshot(&programs)?;
            match workload {
                Workload::Bulk => rig.bulk(self.options.seconds).map(drop),
                _ => rig.run_client(workload, self.duration()).map(drop),
            }
            .with_context(|| workload.short())?;
            let after = hook_stats::snapshot(&programs)?;
            drop(stats);
            drop(server);
            costs.push((
                workload,
                programs
                    .iter()
                    .zip(after.iter().zip(&before))
                    .map(|((name, _), (a, b))| (name.clone(), a.since(*b)))
                    .collect(),
            ));
        }
        Ok(costs)
    }
}

/// One topology (client -- router -- server) with one filter installed in the router and
/// checked to be in force: the measured flow passes, a SYN no rule allows does not.
struct Rig {
    // Fields drop in order: the filter's removal runs commands in the router namespace, so it
    // goes before the topology.
    filter: InstalledFilter,
    topo: Topology,
    filter_kind: Filter,
    server_ip: IpAddr,
    /// See `pinned_cpu`.
    cpu: usize,
}

impl Rig {
    fn new(bench: &Bench, filter: Filter, prefix: &str) -> Result<Rig> {
        let topo = Topology::new(prefix, &["client", "server"])?;
        let (client, server) = (topo.workload("client"), topo.workload("server"));
        let server_ip: IpAddr = match bench.options.family {
            Family::V4 => server.v4.into(),
            Family::V6 => server.v6.into(),
        };
        let n = bench.agents_started.get();
        bench.agents_started.set(n + 1);
        let bpffs = Path::new("/sys/fs/bpf").join(format!("{}-{n}", bench.prefix));
        let installed = InstalledFilter::install(
            filter,
            &topo.node,
            &format!("{},{}", client.host_if, server.host_if),
            &bench.inputs(),
            &bpffs,
        )?;
        let rig = Rig {
            filter: installed,
            topo,
            filter_kind: filter,
            server_ip,
            cpu: bench.cpu,
        };
        check_interrupted()?;
        rig.check_in_force()
            .with_context(|| format!("checking {}", filter.label()))?;
        Ok(rig)
    }

    fn check_in_force(&self) -> Result<()> {
        let (client, server) = (self.topo.workload("client"), self.topo.workload("server"));
        let conn_addr = SocketAddr::new(self.server_ip, filter::CONNECTION_PORT);
        let _server = load::AcceptCloseServer::start(&server.ns, conn_addr, 1)?;
        load::accept_close_reachable(&client.ns, conn_addr)
            .context("the filter does not let the measured flow through")?;
        let probe = load::probe_closed_port(
            &client.ns,
            SocketAddr::new(self.server_ip, CLOSED_PORT),
            CLOSED_PORT_WAIT,
        )?;
        let expected = match self.filter_kind {
            Filter::None => ClosedPortProbe::Refused,
            _ => ClosedPortProbe::Dropped,
        };
        if probe != expected {
            bail!(
                "a SYN to port {CLOSED_PORT} (no rule allows it, nothing listens) was {probe:?}, \
                 expected {expected:?}: the filter is not in force as configured"
            );
        }
        Ok(())
    }

    /// The server of an in-process workload (none for bulk: iperf3 brings its own).
    fn start_server(&self, workload: Workload) -> Result<Option<WorkloadServer>> {
        let server = self.topo.workload("server");
        Ok(match workload {
            Workload::NewConnections => {
                Some(WorkloadServer::AcceptClose(load::AcceptCloseServer::start(
                    &server.ns,
                    SocketAddr::new(self.server_ip, filter::CONNECTION_PORT),
                    CONNECTION_ACCEPTORS,
                )?))
            }
            Workload::RequestResponse => {
                Some(WorkloadServer::ByteEcho(load::ByteEchoServer::start(
                    &server.ns,
                    SocketAddr::new(self.server_ip, filter::REQUEST_RESPONSE_PORT),
                    Some(self.cpu),
                )?))
            }
            Workload::Bulk => None,
        })
    }

    /// The client of an in-process workload for `duration`, against `start_server`'s server.
    fn run_client(&self, workload: Workload, duration: Duration) -> Result<load::Rate> {
        let client = self.topo.workload("client");
        match workload {
            Workload::NewConnections => load::connection_rate(
                &client.ns,
                SocketAddr::new(self.server_ip, filter::CONNECTION_PORT),
                CONNECTION_WORKERS,
                duration,
            ),
            Workload::RequestResponse => load::request_response_rate(
                &client.ns,
                SocketAddr::new(self.server_ip, filter::REQUEST_RESPONSE_PORT),
                duration,
                Some(self.cpu),
            ),
            Workload::Bulk => bail!("bulk runs through iperf3"),
        }
    }

    /// iperf3 for whole `seconds`: bits per second.
    fn bulk(&self, seconds: u32) -> Result<f64> {
        let (client, server) = (self.topo.workload("client"), self.topo.workload("server"));
        iperf::throughput(
            &server.ns,
            &client.ns,
            self.server_ip,
            filter::BULK_PORT,
            seconds,
            self.cpu,
        )
    }
}

/// A running workload server; stops when dropped.
enum WorkloadServer {
    AcceptClose(#[expect(dead_code, reason = "held for its Drop")] load::AcceptCloseServer),
    ByteEcho(#[expect(dead_code, reason = "held for its Drop")] load::ByteEchoServer),
}

/// The client and server addresses the testbed gives workloads 1 and 2.
fn endpoints() -> (Endpoints, Endpoints) {
    (
        Endpoints {
            client: IpAddr::from([10, 200, 1, 2]),
            server: IpAddr::from([10, 200, 2, 2]),
        },
        Endpoints {
            client: "fd00:200:1::2".parse().expect("valid address"),
            server: "fd00:200:2::2".parse().expect("valid address"),
        },
    )
}

/// Kernel, architecture and CPUs.
fn machine() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let jit = match read("/proc/sys/net/core/bpf_jit_enable").as_str() {
        "1" | "2" => "on",
        "0" => "off",
        _ => "unknown",
    };
    format!(
        "Linux {} {}, {cpus} CPUs ({model}), BPF JIT {jit}",
        read("/proc/sys/kernel/osrelease"),
        std::env::consts::ARCH
    )
}

/// The 1-minute load average: how busy the machine was with other work.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn commit() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Removes the bench's scratch directory (rule files, agent sockets and logs) by its exact
/// path.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn defaults_are_five_rounds_three_sizes_all_filters() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!(o.rounds, 5);
        assert_eq!(o.rules, [10, 10_000, 100_000]);
        assert_eq!(o.kinds.len(), 4);
        assert_eq!(o.family, Family::V4);
    }

    #[test]
    fn options_parse() {
        let o = Options::parse(&args(
            "--rounds 2 --seconds 1 --rules 10,10k --filters tollgate --ipv6",
        ))
        .unwrap();
        assert_eq!(o.rounds, 2);
        assert_eq!(o.seconds, 1);
        assert_eq!(o.rules, [10, 10_000]);
        assert_eq!(o.kinds, ["tollgate"]);
        assert_eq!(o.family, Family::V6);
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            "--rounds 0",
            "--rounds",
            "--filters ipchains",
            "--rules ten",
            "--fast",
        ] {
            assert!(Options::parse(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_filter_comes_first_then_each_kind_at_each_size() {
        let o = Options::parse(&args("--rules 10,10k --filters tollgate")).unwrap();
        let (filters, _) = o.configurations();
        assert_eq!(
            filters,
            [
                Filter::None,
                Filter::Tollgate { rules: 10 },
                Filter::Tollgate { rules: 10_000 }
            ]
        );
    }
}
