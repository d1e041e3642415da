//! The rate-limit rows of `cargo xtask bench` (a module of `datapath.rs`): what a bucket costs an
//! established packet, and how close to its configured rate a limit holds under BPF_PROG_TEST_RUN
//! driving it far above that rate.

use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions};
use tollgate_common::Verdict;

use super::{
    packet::{PacketSpec, ACK},
    Baselines, Bench, Measured, INGRESS, TC_ACT_OK,
};

/// How long each accuracy row drives its limit.
const DRIVE: Duration = Duration::from_secs(2);
/// Runs per BPF_PROG_TEST_RUN call in the packet and byte rows.
const BATCH: u32 = 200;

const SRC4: &str = "10.200.1.1";
const DST4: &str = "10.200.2.1";
const SRC6: &str = "fd00:200:1::1";
const DST6: &str = "fd00:200:2::1";

fn policy(rule_limit: &str, quota: &str) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: bench-limits }}
spec:
  identities:
    - {{ name: a, cidrs: ["10.200.1.0/24", "{SRC6}/128"] }}
    - {{ name: b, cidrs: ["{DST4}/32", "{DST6}/128"] }}
  rules:
    - name: a-to-b
      from: a
      to: b
      ports: [{{ port: 8080, protocol: TCP }}]
      {rule_limit}
  {quota}
"#
    )
}

/// One bucket's cost on the established path: (family, buckets, measured).
pub struct CostRow {
    pub family: &'static str,
    pub buckets: usize,
    pub m: Measured,
}

/// Both CPUs charging one bucket at once.
pub struct ContendedRow {
    pub what: &'static str,
    /// Per-run average over both CPUs' repeat loops.
    pub ns: f64,
    pub configured: f64,
    pub achieved: f64,
    pub offered: f64,
}

/// One accuracy row.
pub struct RateRow {
    pub kind: &'static str,
    pub configured: f64,
    pub unit: &'static str,
    pub burst: u64,
    pub offered: f64,
    pub achieved: f64,
}

pub struct Results {
    pub cost: Vec<CostRow>,
    pub rates: Vec<RateRow>,
    pub contended: Vec<ContendedRow>,
}

/// A limit no repeat loop reaches (10^9 packets/s, a second of burst): every packet takes the
/// path through the bucket and passes.
const HUGE: &str = "{ packetsPerSecond: 1000000000, burst: 1000000000 }";

pub fn run(b: &mut Bench) -> Results {
    let mut cost = Vec::new();
    for (buckets, rule, quota) in [
        (0, String::new(), String::new()),
        (1, format!("rateLimit: {HUGE}"), String::new()),
        (
            2,
            format!("rateLimit: {HUGE}"),
            "rateLimits: [{ identity: a, packetsPerSecond: 1000000000, burst: 1000000000 }]"
                .to_owned(),
        ),
    ] {
        b.apply(&policy(&rule, &quota));
        for (family, src, dst) in [("IPv4", SRC4, DST4), ("IPv6", SRC6, DST6)] {
            let ack = establish(b, src, dst, 40_000);
            let m = b.repeated(INGRESS, &ack, TC_ACT_OK, Some(Verdict::AllowEstablished));
            cost.push(CostRow { family, buckets, m });
        }
        b.datapath.clear_conntrack().unwrap();
    }

    let mut rates = Vec::new();
    // Packets: an established ACK, driven in batches.
    for rate in [1_000u64, 10_000, 100_000] {
        let burst = rate / 100;
        b.apply(&policy(
            &format!("rateLimit: {{ packetsPerSecond: {rate}, burst: {burst} }}"),
            "",
        ));
        let ack = establish(b, SRC4, DST4, 41_000);
        let (passed, offered, secs) = drive_established(b, &ack);
        rates.push(RateRow {
            kind: "packets",
            configured: rate as f64,
            unit: "packets/s",
            burst,
            offered: offered as f64 / secs,
            achieved: (passed.saturating_sub(burst)) as f64 / secs,
        });
    }
    // Bytes: 1000-byte frames.
    let mut big = PacketSpec::tcp(SRC4, 42_000, DST4, 8080).flags(ACK);
    big.payload = vec![0; 1000 - 54];
    let frame = big.build();
    assert_eq!(frame.len(), 1000);
    for rate in [1_000_000u64, 10_000_000, 100_000_000] {
        let burst = rate / 100;
        b.apply(&policy(
            &format!("rateLimit: {{ bytesPerSecond: {rate}, burstBytes: {burst} }}"),
            "",
        ));
        establish(b, SRC4, DST4, 42_000);
        let (passed, offered, secs) = drive_established(b, &frame);
        rates.push(RateRow {
            kind: "bytes",
            configured: rate as f64,
            unit: "bytes/s",
            burst,
            offered: (offered * 1000) as f64 / secs,
            achieved: (passed * 1000).saturating_sub(burst) as f64 / secs,
        });
    }
    // Connections: a SYN of a new flow every run.
    for rate in [100u64, 1_000, 10_000] {
        let burst = (rate / 100).max(1);
        b.apply(&policy(
            &format!("rateLimit: {{ connectionsPerSecond: {rate}, burst: {burst} }}"),
            "",
        ));
        b.datapath.clear_conntrack().unwrap();
        let before = b.counter(Verdict::AllowNew as u32);
        let start = Instant::now();
        let mut offered = 0u64;
        while start.elapsed() < DRIVE {
            // Distinct flows: source port and the low bits of the source port's neighbour.
            let port = 1024 + (offered % 60_000) as u16;
            let src = format!("10.200.1.{}", 1 + (offered / 60_000) % 200);
            let syn = PacketSpec::tcp(&src, port, DST4, 8080).build();
            b.run(INGRESS, &syn, 1);
            offered += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let passed = b.counter(Verdict::AllowNew as u32) - before;
        rates.push(RateRow {
            kind: "connections",
            configured: rate as f64,
            unit: "connections/s",
            burst,
            offered: offered as f64 / secs,
            achieved: passed.saturating_sub(burst) as f64 / secs,
        });
        b.datapath.clear_conntrack().unwrap();
    }
    // Both CPUs at once on one bucket: the compare-and-swap's cost when the other CPU is
    // charging the same bucket, and whether the rate still holds.
    let mut contended = Vec::new();
    for (what, limit, configured) in [
        (
            "one bucket, never empty (10^9 packets/s)",
            HUGE.to_owned(),
            1e9,
        ),
        (
            "one bucket at 100000 packets/s",
            "{ packetsPerSecond: 100000, burst: 1000 }".to_owned(),
            100_000.0,
        ),
    ] {
        b.apply(&policy(&format!("rateLimit: {limit}"), ""));
        let ack = establish(b, SRC4, DST4, 43_000);
        let before = b.counter(Verdict::AllowEstablished as u32);
        let (ns, offered, secs) = both_cpus(b, &ack);
        let passed = b.counter(Verdict::AllowEstablished as u32) - before;
        let burst = if configured < 1e9 { 1000 } else { 0 };
        contended.push(ContendedRow {
            what,
            ns,
            configured,
            achieved: passed.saturating_sub(burst) as f64 / secs,
            offered: offered as f64 / secs,
        });
    }
    b.datapath.clear_conntrack().unwrap();
    Results {
        cost,
        rates,
        contended,
    }
}

/// Drives `packet` from two threads, one pinned to each of the first two CPUs, for `DRIVE`:
/// (per-run ns averaged over both, runs offered, seconds).
fn both_cpus(b: &Bench, packet: &[u8]) -> (f64, u64, f64) {
    let prog = b.program(INGRESS);
    let start = Instant::now();
    let per_cpu: Vec<(Duration, u64)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|cpu| {
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    let mut took = Duration::ZERO;
                    let mut runs = 0u64;
                    while start.elapsed() < DRIVE {
                        let r = prog
                            .test_run(TestRunOptions {
                                data_in: Some(packet),
                                repeat: BATCH,
                                ..Default::default()
                            })
                            .expect("BPF_PROG_TEST_RUN");
                        took += r.duration * BATCH;
                        runs += u64::from(BATCH);
                    }
                    (took, runs)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let runs: u64 = per_cpu.iter().map(|(_, r)| r).sum();
    let took: f64 = per_cpu.iter().map(|(d, _)| d.as_nanos() as f64).sum();
    (took / runs as f64, runs, secs)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) sets the calling thread's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Admits the flow src:sport → dst:8080 (SYN, SYN-ACK) and returns its ACK.
fn establish(b: &mut Bench, src: &str, dst: &str, sport: u16) -> Vec<u8> {
    b.datapath.clear_conntrack().unwrap();
    let syn = PacketSpec::tcp(src, sport, dst, 8080);
    b.run_expect(INGRESS, &syn.build(), TC_ACT_OK);
    b.run_expect(INGRESS, &syn.reply().build(), TC_ACT_OK);
    syn.flags(ACK).build()
}

/// Drives `packet` (of an established flow) for `DRIVE`: (passed, offered, seconds).
fn drive_established(b: &mut Bench, packet: &[u8]) -> (u64, u64, f64) {
    let passed_before = b.counter(Verdict::AllowEstablished as u32);
    let start = Instant::now();
    let mut offered = 0u64;
    while start.elapsed() < DRIVE {
        b.run(INGRESS, packet, BATCH);
        offered += u64::from(BATCH);
    }
    let secs = start.elapsed().as_secs_f64();
    let passed = b.counter(Verdict::AllowEstablished as u32) - passed_before;
    (passed, offered, secs)
}

pub fn print(r: &Results, base: &Baselines) {
    println!(
        "Rate limits: the established path through buckets (ACK of an answered flow, repeat loop)"
    );
    println!(
        "  {:<6} {:>8} {:>9} {:>8} {:>22}",
        "family", "buckets", "ns/pkt", "x empty", "added x empty (target 0.5/bucket)"
    );
    for row in &r.cost {
        let none = r
            .cost
            .iter()
            .find(|o| o.family == row.family && o.buckets == 0)
            .unwrap();
        let added = if row.buckets == 0 {
            String::new()
        } else {
            format!(
                "{:.2} ({:.2}/bucket)",
                (row.m.ns - none.m.ns) / base.repeat,
                (row.m.ns - none.m.ns) / base.repeat / row.buckets as f64
            )
        };
        println!(
            "  {:<6} {:>8} {:>9.1} {:>8.2} {:>22}",
            row.family,
            row.buckets,
            row.m.ns,
            row.m.ratio(base),
            added
        );
    }
    println!(
        "  (1 bucket: a rule limit of packets; 2: the rule limit and the source identity's quota)"
    );
    println!();
    println!(
        "Rate limits: achieved / configured, driven far above the rate for {} s each (BPF_PROG_TEST_RUN; achieved excludes the burst)",
        DRIVE.as_secs()
    );
    println!(
        "  {:<12} {:>16} {:>10} {:>16} {:>16} {:>9}",
        "kind", "configured", "burst", "offered", "achieved", "ratio"
    );
    for row in &r.rates {
        println!(
            "  {:<12} {:>16} {:>10} {:>16.0} {:>16.0} {:>9.4}",
            row.kind,
            format!("{} {}", row.configured, row.unit),
            row.burst,
            row.offered,
            row.achieved,
            row.achieved / row.configured
        );
    }
    println!("  (target: within 5% of the configured rate)");
    println!();
    println!(
        "Rate limits: both CPUs charging one bucket at once ({} s, a thread pinned to each CPU, repeat loops of {BATCH})",
        DRIVE.as_secs()
    );
    println!(
        "  {:<42} {:>9} {:>16} {:>16} {:>9}",
        "", "ns/pkt", "offered/s", "achieved/s", "ratio"
    );
    for row in &r.contended {
        let ratio = if row.configured < 1e9 {
            format!("{:.4}", row.achieved / row.configured)
        } else {
            "-".to_owned()
        };
        println!(
            "  {:<42} {:>9.1} {:>16.0} {:>16.0} {:>9}",
            row.what, row.ns, row.offered, row.achieved, ratio
        );
    }
    println!(
        "  (a compare-and-swap per packet per kind: exact under contention; ns here is per CPU)"
    );
    println!();
}
