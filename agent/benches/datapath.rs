//! `cargo xtask bench`: nanoseconds per packet through BPF_PROG_TEST_RUN, as ratios to an empty
//! classifier measured in the same run, with 10 and 100,000 rules; and the time to compile and
//! swap 100,000 rules. Needs root. Results go to stdout; docs/benchmarks.md records them.
//!
//! Conntrack and token state persist across `repeat`, so each path is measured on purpose:
//! - established: one packet admits the flow, then `repeat` runs hit the conntrack entry;
//! - new flow, denied: conntrack miss + two identity lookups + rule lookup + deny + event,
//!   repeatable because a denied flow is never tracked (the event ring is drained between
//!   rounds so every run pays for its event);
//! - new flow, allowed: the full admission path including two conntrack inserts, measured one
//!   run at a time with the flow forgotten in between, against the baseline measured the same
//!   way (single runs include the test runner's fixed per-call cost, which lowers that ratio).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tollgate_agent::{
    datapath::Datapath,
    loader::{self, Loaded},
    paths::PinLayout,
    policy::{compile_policy, parse_policy, ClockReading},
};
use tollgate_common::{map_names, program_names, slot_of};

const REPEAT: u32 = 10_000;
const ROUNDS: usize = 15;
const SINGLE_SAMPLES: usize = 3_000;

struct Bench {
    loaded: Loaded,
    datapath: Datapath,
    layout: PinLayout,
    events: RingBuf<MapData>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = loader::uninstall(&self.layout);
    }
}

fn identity_addr(i: usize) -> String {
    format!("10.200.{}.{}", i / 200, i % 200 + 1)
}

/// 1000 identities; rule 0 is the measured pair id0 → id1 TCP 8080; the others connect
/// distinct pairs so every rule is its own map entry.
fn policy_yaml(rules: usize) -> String {
    let mut y = String::from(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: { name: bench }\nspec:\n  identities:\n",
    );
    for i in 0..1000 {
        let _ = writeln!(
            y,
            "    - {{ name: id{i}, cidrs: [\"{}/32\"] }}",
            identity_addr(i)
        );
    }
    y.push_str("  rules:\n    - { name: measured, from: id0, to: id1, ports: [{ port: 8080, protocol: TCP }] }\n");
    let mut k = 0usize;
    let mut written = 1;
    while written < rules {
        let (src, dst) = (k % 1000, 2 + k / 1000);
        k += 1;
        let _ = writeln!(
            y,
            "    - {{ name: r{k}, from: id{src}, to: id{dst}, ports: [{{ port: 8080, protocol: TCP }}] }}"
        );
        written += 1;
    }
    y
}

/// An Ethernet/IPv4/TCP SYN.
fn tcp_packet(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let s: std::net::Ipv4Addr = src.parse().unwrap();
    let d: std::net::Ipv4Addr = dst.parse().unwrap();
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 48, 0x12, 0x34, 0, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(b"tollgate");
    p
}

impl Bench {
    fn new() -> Bench {
        assert_eq!(unsafe { libc::geteuid() }, 0, "the benchmark needs root");
        let layout = PinLayout::new(format!("/sys/fs/bpf/tollgate-bench-{}", std::process::id()));
        let _ = loader::uninstall(&layout);
        let mut loaded = loader::load(&layout).expect("load datapath");
        let baseline: &mut SchedClassifier = loaded
            .ebpf
            .program_mut(program_names::TC_BASELINE)
            .unwrap()
            .try_into()
            .unwrap();
        baseline.load().expect("load baseline");
        let mut datapath = Datapath::open(&layout).unwrap();
        // The runner delivers on `lo`; as an uplink it skips source validation, so these rows
        // measure the same path as before it existed (the reverse-path lookup is measured with
        // real traffic).
        datapath
            .write_interface(1, true, Some(true), [Some(0), Some(0)])
            .unwrap();
        let events = RingBuf::try_from(
            Map::from_map_data(MapData::from_pin(layout.map(map_names::EVENTS)).unwrap()).unwrap(),
        )
        .unwrap();
        Bench {
            loaded,
            datapath,
            layout,
            events,
        }
    }

    fn program(&self, name: &str) -> &SchedClassifier {
        self.loaded.ebpf.program(name).unwrap().try_into().unwrap()
    }

    fn run(&self, name: &str, packet: &[u8], repeat: u32) -> (u32, Duration) {
        let r = self
            .program(name)
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        (r.return_value, r.duration)
    }

    fn drain_events(&mut self) {
        while let Some(item) = self.events.next() {
            drop(item);
        }
    }

    /// Median over rounds of the kernel's per-run average for `repeat` runs.
    fn repeated(&mut self, name: &str, packet: &[u8], expect: u32) -> f64 {
        let mut samples: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                self.drain_events();
                let (ret, d) = self.run(name, packet, REPEAT);
                assert_eq!(ret, expect, "unexpected verdict while measuring {name}");
                d.as_nanos() as f64
            })
            .collect();
        median(&mut samples)
    }

    /// Median of single runs; `forget` runs before each one.
    fn single(&mut self, name: &str, packet: &[u8], expect: u32, forget: bool) -> f64 {
        let mut samples = Vec::with_capacity(SINGLE_SAMPLES);
        for _ in 0..SINGLE_SAMPLES {
            if forget {
                self.datapath.clear_conntrack().unwrap();
            }
            let (ret, d) = self.run(name, packet, 1);
            assert_eq!(ret, expect);
            samples.push(d.as_nanos() as f64);
        }
        median(&mut samples)
    }

    fn apply(&mut self, yaml: &str) -> (Duration, Duration, Duration, usize) {
        let t = Instant::now();
        let policy = parse_policy(yaml, "bench.yaml").expect("bench policy");
        let parse = t.elapsed();
        let generation = self.datapath.next_generation().unwrap();
        let t = Instant::now();
        let compiled = compile_policy(&policy, slot_of(generation), &ClockReading::now(), &[]);
        let compile = t.elapsed();
        let t = Instant::now();
        self.datapath.install(&compiled, generation, &[]).unwrap();
        let swap = t.elapsed();
        (parse, compile, swap, compiled.rules.len())
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let mut b = Bench::new();
    let allowed = tcp_packet(&identity_addr(0), &identity_addr(1), 40000, 8080);
    let denied = tcp_packet(&identity_addr(0), &identity_addr(1), 40000, 9999);
    let (ingress, baseline) = (program_names::TC_INGRESS, program_names::TC_BASELINE);

    println!("Tollgate datapath benchmark (BPF_PROG_TEST_RUN, median of {ROUNDS} rounds x {REPEAT} runs)");
    let base = b.repeated(baseline, &allowed, 0);
    let base_single = b.single(baseline, &allowed, 0, false);
    println!(
        "  empty classifier (baseline):      {base:6.1} ns   (single runs: {base_single:.1} ns)"
    );
    println!();
    println!(
        "  {:<8} {:<34} {:>9} {:>8}",
        "rules", "path", "ns/pkt", "x empty"
    );
    for rules in [10usize, 100_000] {
        let (parse, compile, swap, entries) = b.apply(&policy_yaml(rules));
        b.datapath.clear_conntrack().unwrap();
        // Admit the flow once, then measure the established path.
        assert_eq!(b.run(ingress, &allowed, 1).0, 0);
        let est = b.repeated(ingress, &allowed, 0);
        let deny = b.repeated(ingress, &denied, 2);
        let new_single = b.single(ingress, &allowed, 0, true);
        for (path, ns, basis) in [
            ("established flow", est, base),
            ("new flow, denied (+event)", deny, base),
            (
                "new flow, allowed (+2 CT inserts)*",
                new_single,
                base_single,
            ),
        ] {
            println!("  {rules:<8} {path:<34} {ns:9.1} {:8.2}", ns / basis);
        }
        if rules == 100_000 {
            println!();
            println!(
                "  policy of {rules} rules ({entries} map entries): parse {:.0} ms, compile {:.0} ms, swap {:.0} ms; compile+swap {:.0} ms",
                parse.as_secs_f64() * 1e3,
                compile.as_secs_f64() * 1e3,
                swap.as_secs_f64() * 1e3,
                (compile + swap).as_secs_f64() * 1e3,
            );
        }
    }
    println!();
    println!("  * single runs, ratio to the baseline measured in single runs as well");
}
