//! `cargo xtask bench`: the datapath through BPF_PROG_TEST_RUN as ratios to an empty classifier
//! measured in the same run, the policy pipeline (parse, compile, swap), the verifier's cost of
//! each program and the memory of a real agent. Needs root. Results go to stdout (progress to
//! stderr); docs/benchmarks.md records them.
//!
//! The machine is small and shared: every row is a median (single runs: an interquartile mean,
//! see `interquartile_mean`), the empty classifier (`tollgate_baseline`) runs interleaved with
//! every row, and ratios are to all its runs of this invocation pooled (see `Baselines`).
//!
//! Paths (conntrack and sampler state persist across `repeat`, so each is set up on purpose):
//! - established: SYN, SYN-ACK, then `repeat` runs of the ACK of the answered flow (the data
//!   segment fast path: one conntrack hit, no TCP state change);
//! - new flow denied, event sampled: the same SYN to a port no rule allows, `repeat` times.
//!   Denied flows are never tracked, so every run is a conntrack miss, both identity lookups,
//!   the rule lookup and the deny; the sampler lets one event per edge and second out and
//!   counts the rest, so this is the steady state of a SYN retry storm;
//! - new flow denied, event sent: the same, one run at a time with the sampler slots the
//!   packet touches cleared before each run, so every run reserves and submits its event;
//! - new flow allowed: the full admission including two conntrack inserts, one run at a time
//!   with the flows forgotten before each run.
//!
//! Single runs include the test runner's fixed per-call cost, so they are compared with the
//! baseline measured in single runs too (which lowers those ratios against a repeat loop's).
//!
//! Each path is measured for IPv4 and IPv6, with identities given as single addresses (/32 and
//! /128: the exact-match maps) or as CIDRs (/28 and /64: the LPM tries), rules on an exact port
//! (exact rule map) or on a port range (rule trie), with 10 and 100,000 rules, and with 100,000
//! identities. Addresses come from 10.200.0.0/16 and fd00:200::/48.
//!
//! Then: the floors (`tollgate_floor_parse`, `tollgate_floor_lookup`: what of the established
//! path is the header parse and one hash lookup), the verifier's instruction count and load
//! time per program, the policy pipeline's times, and the RSS and peak of a real
//! `tollgate agent` (the binary cargo builds for this benchmark, `CARGO_BIN_EXE_tollgate`) and
//! of `tollgate policy validate` with 10, 10k and 100k rules. Last, the same floors on real
//! traffic: one TCP connection doing request/response through a router namespace, with the
//! empty program, each floor and the classifiers attached in turn to the router's veths and
//! their cost per run read from the kernel's run-time statistics, so the gap between the
//! runner's hot-cache figures and real traffic is measured, not guessed.

#[path = "../../tests/support/packet.rs"]
#[allow(
    dead_code,
    reason = "the kernel tests use the rest of the packet builder"
)]
mod packet;
#[path = "parts/ratelimit.rs"]
mod ratelimit;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    EbpfLoader,
};
use tollgate_agent::{
    datapath::{Datapath, OBJECT, SLOT_GRACE},
    loader::{self, Loaded},
    paths::PinLayout,
    policy::{compile_policy, parse_policy, ClockReading},
};
use tollgate_common::{
    map_names, program_names, slot_of, verdict::COUNTER_EVENTS_SUPPRESSED, SamplerSlot, Verdict,
};
use tollgate_testbed::{AgentProcess, NetNs};

use packet::{PacketSpec, ACK};

const REPEAT: u32 = 10_000;
const ROUNDS: usize = 15;
const SINGLE_SAMPLES: usize = 2_000;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Identities of the small policies, and rules of the two scales.
const IDENTITIES: usize = 1_000;
const SCALES: [usize; 2] = [10, 100_000];
/// The large-identity case: every identity has a /128; the first `V4_IDENTITIES` also a /32
/// (10.200.0.0/16 holds 65,536 addresses).
const MANY_IDENTITIES: usize = 100_000;
const V4_IDENTITIES: usize = 60_000;
/// Rule counts the agent's memory is measured with.
const MEMORY_RULES: [usize; 3] = [10, 10_000, 100_000];

const INGRESS: &str = program_names::TC_INGRESS;
const BASELINE: &str = program_names::TC_BASELINE;
const AGENT_BINARY: &str = env!("CARGO_BIN_EXE_tollgate");

// ---------------------------------------------------------------------------------------------
// Policies

/// One policy shape: how identities and rules are written, and how many there are.
#[derive(Clone, Copy, Debug)]
struct Shape {
    identities: usize,
    /// Identities as /28 and /64 CIDRs (LPM tries) instead of /32 and /128 (exact maps).
    cidr: bool,
    /// Rules on the aligned port range 8080-8087 (rule trie) instead of port 8080 (exact map).
    range: bool,
    rules: usize,
}

impl Shape {
    /// Dense numbering (the 100k-identity case): consecutive addresses, exact entries only.
    fn dense(&self) -> bool {
        self.identities > 4_096
    }

    /// Identity `i`'s IPv4 address and the CIDR that names it, if it has one.
    fn v4(&self, i: usize) -> Option<(Ipv4Addr, String)> {
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
        if self.dense() {
            assert!(!self.cidr, "the dense layout has single addresses only");
            let addr = Ipv4Addr::from(base + i as u32 + 1);
            return (i < V4_IDENTITIES).then(|| (addr, format!("{addr}/32")));
        }
        // A /28 each: 1000 of them fill 10.200.0.0 - 10.200.62.127.
        let net = base + 16 * i as u32;
        assert!(net < base + 65_536);
        let addr = Ipv4Addr::from(net + 1);
        let cidr = if self.cidr {
            format!("{}/28", Ipv4Addr::from(net))
        } else {
            format!("{addr}/32")
        };
        Some((addr, cidr))
    }

    /// Identity `i`'s IPv6 address and the CIDR that names it.
    fn v6(&self, i: usize) -> (Ipv6Addr, String) {
        let (g3, g4) = if self.dense() {
            ((i >> 16) as u16, (i & 0xffff) as u16)
        } else {
            (i as u16, 0)
        };
        let addr = Ipv6Addr::new(0xfd00, 0x200, 0, g3, g4, 0, 0, 1);
        let cidr = if self.cidr {
            format!("{}/64", Ipv6Addr::new(0xfd00, 0x200, 0, g3, 0, 0, 0, 0))
        } else {
            format!("{addr}/128")
        };
        (addr, cidr)
    }

    fn ports(&self) -> &'static str {
        if self.range {
            "[{ port: 8080, endPort: 8087, protocol: TCP }]"
        } else {
            "[{ port: 8080, protocol: TCP }]"
        }
    }

    /// Rule 0 is the measured pair id0 → id1 on port 8080 (inside the range); the others
    /// connect distinct pairs (id s → id s+1+q), so every rule is its own map entry.
    fn yaml(&self) -> String {
        let mut y = String::with_capacity(100 * (self.identities + self.rules));
        y.push_str("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: { name: bench }\nspec:\n  identities:\n");
        for i in 0..self.identities {
            let v6 = self.v6(i).1;
            match self.v4(i) {
                Some((_, v4)) => {
                    let _ = writeln!(y, "    - {{ name: id{i}, cidrs: [\"{v4}\", \"{v6}\"] }}");
                }
                None => {
                    let _ = writeln!(y, "    - {{ name: id{i}, cidrs: [\"{v6}\"] }}");
                }
            }
        }
        let ports = self.ports();
        let _ = writeln!(
            y,
            "  rules:\n    - {{ name: measured, from: id0, to: id1, ports: {ports} }}"
        );
        let n = self.identities;
        assert!(self.rules <= n * (n - 2), "not enough identity pairs");
        for k in 1..self.rules {
            let (src, dst) = (k % n, (k % n + 1 + k / n) % n);
            let _ = writeln!(
                y,
                "    - {{ name: r{k}, from: id{src}, to: id{dst}, ports: {ports} }}"
            );
        }
        y
    }

    fn identity_label(&self, family: Family) -> String {
        let count = count_label(self.identities);
        let prefix = match (family, self.cidr) {
            (Family::V4, false) => "/32",
            (Family::V4, true) => "/28",
            (Family::V6, false) => "/128",
            (Family::V6, true) => "/64",
        };
        format!("{count} x {prefix}")
    }

    fn label(&self) -> String {
        format!(
            "{} ids {}, {} rules on {}",
            count_label(self.identities),
            if self.cidr { "/28+/64" } else { "/32+/128" },
            count_label(self.rules),
            if self.range {
                "a port range"
            } else {
                "one port"
            }
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The measured flow of `shape` in `family`: id0 → id1.
struct Flow {
    /// SYN to port 8080 (allowed), its SYN-ACK, the ACK after it.
    syn: Vec<u8>,
    syn_ack: Vec<u8>,
    ack: Vec<u8>,
    /// SYN to port 9999 (no rule: default deny).
    denied: Vec<u8>,
}

impl Flow {
    fn new(shape: &Shape, family: Family) -> Flow {
        let (src, dst) = match family {
            Family::V4 => (
                shape.v4(0).unwrap().0.to_string(),
                shape.v4(1).unwrap().0.to_string(),
            ),
            Family::V6 => (shape.v6(0).0.to_string(), shape.v6(1).0.to_string()),
        };
        let syn = PacketSpec::tcp(&src, 40_000, &dst, 8080);
        Flow {
            syn: syn.build(),
            syn_ack: syn.reply().build(),
            ack: syn.flags(ACK).build(),
            denied: PacketSpec::tcp(&src, 40_000, &dst, 9999).build(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The datapath under BPF_PROG_TEST_RUN

/// A measured program, and the baseline of the same rounds (its spread across rows shows the
/// noise; ratios are to the baseline pooled over the whole run, see [`Baselines`]).
#[derive(Clone, Copy, Debug)]
struct Measured {
    ns: f64,
    row_base: f64,
    /// Measured in single runs (compared with single baseline runs).
    single: bool,
}

impl Measured {
    fn ratio(&self, b: &Baselines) -> f64 {
        self.ns / if self.single { b.single } else { b.repeat }
    }
}

/// The empty classifier over every round of the run: the median of the repeat loops' per-run
/// averages and the interquartile mean of the single runs. Pooled rather than per row: the
/// baseline of one row's rounds strays by several percent (single runs by up to ±15%) without
/// the row moving with it, so a per-row ratio would add that noise to every comparison.
struct Baselines {
    repeat: f64,
    single: f64,
}

/// What runs before each single run.
enum Prepare<'a> {
    /// Forget every tracked flow.
    ForgetFlows,
    /// Clear these sampler slots (on every CPU) so the event goes out.
    ClearSampler(&'a [u32]),
}

/// Events are read off the ring every this many single runs: the reader stays behind, as
/// under load, so a submit does not wake it (see `WAKEUP_EVERY_RUN`).
const DRAIN_EVERY: usize = 1_000;
/// Reading the ring after every run instead: the reader is always caught up. Before the
/// datapath submitted with `BPF_RB_NO_WAKEUP` (waking the agent only when 64 KiB wait), each
/// such submit woke the reader, about 6 µs a denied packet; this row shows that it no longer does.
const WAKEUP_EVERY_RUN: usize = 1;

struct Bench {
    loaded: Loaded,
    datapath: Datapath,
    layout: PinLayout,
    events: RingBuf<MapData>,
    sampler: PerCpuArray<MapData, SamplerSlot>,
    /// `loader::load` (maps created and pinned, ingress, egress and check verified).
    load_time: Duration,
    /// Events that left the ring buffer while measuring the sampled rows.
    sampled_events: u64,
    /// Every baseline sample: per-run averages of repeat loops, and single runs.
    base_repeat: Vec<f64>,
    base_single: Vec<f64>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = loader::uninstall(&self.layout);
    }
}

impl Bench {
    fn new() -> Bench {
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the benchmark needs root");
        let layout = PinLayout::new(format!("/sys/fs/bpf/tollgate-bench-{}", std::process::id()));
        let _ = loader::uninstall(&layout);
        let t = Instant::now();
        let mut loaded = loader::load(&layout).expect("load datapath");
        let load_time = t.elapsed();
        // Not loaded by the agent: the baseline and the floors.
        for name in [
            BASELINE,
            program_names::FLOOR_PARSE,
            program_names::FLOOR_LOOKUP,
        ] {
            let prog: &mut SchedClassifier = loaded
                .ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} missing from the object"))
                .try_into()
                .unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
        }
        let mut datapath = Datapath::open(&layout).unwrap();
        // The runner delivers on `lo`, described as an enforced uplink: a new flow's source is
        // checked as an uplink's (one FIB lookup, refusing the node's workloads), as a
        // workload-facing interface's would be (one FIB lookup, strict); an established packet
        // validated at this origin skips it.
        datapath
            .write_interface(1, true, Some(true), [Some(0), Some(0)])
            .unwrap();
        let open =
            |name: &str| Map::from_map_data(MapData::from_pin(layout.map(name)).unwrap()).unwrap();
        let events = RingBuf::try_from(open(map_names::EVENTS)).unwrap();
        let sampler = PerCpuArray::try_from(open(map_names::EVENT_SAMPLER)).unwrap();
        Bench {
            loaded,
            datapath,
            layout,
            events,
            sampler,
            load_time,
            sampled_events: 0,
            base_repeat: Vec::new(),
            base_single: Vec::new(),
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

    fn run_expect(&self, name: &str, packet: &[u8], expect: u32) {
        let (ret, _) = self.run(name, packet, 1);
        assert_eq!(ret, expect, "{name}: unexpected verdict");
    }

    fn drain_events(&mut self) -> u64 {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            drop(item);
            n += 1;
        }
        n
    }

    fn counter(&self, index: u32) -> u64 {
        self.datapath.counters().unwrap()[index as usize]
    }

    /// Median over rounds of the kernel's per-run average for `repeat` runs, each round the
    /// baseline first. `verdict`: the counter every run of `name` must bump (proves the path).
    fn repeated(
        &mut self,
        name: &str,
        packet: &[u8],
        expect: u32,
        verdict: Option<Verdict>,
    ) -> Measured {
        let before = verdict.map(|v| self.counter(v as u32));
        let mut ns = Vec::with_capacity(ROUNDS);
        let mut base = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            self.sampled_events += self.drain_events();
            let (ret, d) = self.run(BASELINE, packet, REPEAT);
            assert_eq!(ret, TC_ACT_OK);
            base.push(d.as_nanos() as f64);
            let (ret, d) = self.run(name, packet, REPEAT);
            assert_eq!(ret, expect, "unexpected verdict while measuring {name}");
            ns.push(d.as_nanos() as f64);
        }
        self.sampled_events += self.drain_events();
        if let (Some(v), Some(before)) = (verdict, before) {
            let runs = self.counter(v as u32) - before;
            assert!(
                runs >= (ROUNDS as u64) * u64::from(REPEAT),
                "{name}: only {runs} runs ended as {v:?}"
            );
        }
        let row_base = median(&mut base.clone());
        self.base_repeat.extend(base);
        Measured {
            ns: median(&mut ns),
            row_base,
            single: false,
        }
    }

    /// Single runs, each after `prepare`, interleaved with single baseline runs; the
    /// interquartile mean of each.
    /// Returns the measurement and the number of events the runs put on the ring buffer.
    fn single(
        &mut self,
        name: &str,
        packet: &[u8],
        expect: u32,
        prepare: Prepare,
        drain_every: usize,
    ) -> (Measured, u64) {
        let mut ns = Vec::with_capacity(SINGLE_SAMPLES);
        let mut base = Vec::with_capacity(SINGLE_SAMPLES);
        let mut events = 0;
        self.drain_events();
        for i in 0..SINGLE_SAMPLES {
            match prepare {
                Prepare::ForgetFlows => self.datapath.clear_conntrack().unwrap(),
                Prepare::ClearSampler(slots) => self.clear_sampler(slots),
            }
            let (ret, d) = self.run(BASELINE, packet, 1);
            assert_eq!(ret, TC_ACT_OK);
            base.push(d.as_nanos() as f64);
            let (ret, d) = self.run(name, packet, 1);
            assert_eq!(ret, expect, "unexpected verdict while measuring {name}");
            ns.push(d.as_nanos() as f64);
            if (i + 1) % drain_every == 0 {
                events += self.drain_events();
            }
        }
        events += self.drain_events();
        let row_base = interquartile_mean(&mut base.clone());
        self.base_single.extend(base);
        (
            Measured {
                ns: interquartile_mean(&mut ns),
                row_base,
                single: true,
            },
            events,
        )
    }

    fn clear_sampler(&mut self, slots: &[u32]) {
        let cpus = aya::util::nr_cpus().expect("possible CPUs");
        for &slot in slots {
            let zero = PerCpuValues::try_from(vec![SamplerSlot::default(); cpus]).unwrap();
            self.sampler.set(slot, zero, 0).unwrap();
        }
    }

    /// The sampler slots a denied `packet` touches (its edge's slot and the budget slot),
    /// found by clearing all of them, running it once and looking which changed.
    fn sampler_slots_of(&mut self, packet: &[u8]) -> Vec<u32> {
        let all: Vec<u32> = (0..self.sampler.len()).collect();
        self.clear_sampler(&all);
        self.run_expect(INGRESS, packet, TC_ACT_SHOT);
        self.drain_events();
        let touched: Vec<u32> = self
            .sampler
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                v.as_ref()
                    .unwrap()
                    .iter()
                    .any(|s| *s != SamplerSlot::default())
            })
            .map(|(i, _)| i as u32)
            .collect();
        assert!(
            !touched.is_empty(),
            "the denied packet touched no sampler slot"
        );
        touched
    }

    /// Parses, compiles and installs `yaml` as the next generation.
    fn apply(&mut self, yaml: &str) -> Applied {
        let t = Instant::now();
        let policy = parse_policy(yaml, "bench.yaml").expect("bench policy");
        let parse = t.elapsed();
        let generation = self.datapath.next_generation().unwrap();
        // Not timed: `install` waits until the previous flip is this old.
        std::thread::sleep(SLOT_GRACE);
        let t = Instant::now();
        let compiled = compile_policy(&policy, slot_of(generation), &ClockReading::now(), &[]);
        let compile = t.elapsed();
        let t = Instant::now();
        self.datapath.install(&compiled, generation, &[]).unwrap();
        let swap = t.elapsed();
        Applied {
            bytes: yaml.len(),
            parse,
            compile,
            swap,
            entries: [
                compiled.identities_v4.len(),
                compiled.identities_v6.len(),
                compiled.rules.len(),
            ],
        }
    }

    /// Every path of `shape` in `family`, and the floors if asked.
    /// Every path of `shape` in `family`; the floors and the reader-wakeup row if `extras`.
    fn measure(&mut self, shape: &Shape, family: Family, extras: bool, out: &mut Results) {
        let flow = Flow::new(shape, family);
        let row = |out: &mut Results, path: PathKind, m: Measured| {
            out.rows.push(Row {
                path,
                family,
                shape: *shape,
                m,
            })
        };
        // Admit the flow and answer it, then measure the ACK of the established flow.
        self.datapath.clear_conntrack().unwrap();
        self.run_expect(INGRESS, &flow.syn, TC_ACT_OK);
        self.run_expect(INGRESS, &flow.syn_ack, TC_ACT_OK);
        self.run_expect(INGRESS, &flow.ack, TC_ACT_OK);
        let established = self.repeated(
            INGRESS,
            &flow.ack,
            TC_ACT_OK,
            Some(Verdict::AllowEstablished),
        );
        row(out, PathKind::Established, established);
        if extras {
            for (name, floor) in [
                (program_names::FLOOR_PARSE, Floor::Parse),
                (program_names::FLOOR_LOOKUP, Floor::Lookup),
            ] {
                // The lookup floor answers TC_ACT_OK only when it found the flow.
                let m = self.repeated(name, &flow.ack, TC_ACT_OK, None);
                out.floors.push((floor, family, m));
            }
            out.floors.push((Floor::Established, family, established));
        }
        let suppressed = self.counter(COUNTER_EVENTS_SUPPRESSED);
        let denied = self.repeated(
            INGRESS,
            &flow.denied,
            TC_ACT_SHOT,
            Some(Verdict::DenyDefault),
        );
        row(out, PathKind::DeniedSampled, denied);
        out.suppressed += self.counter(COUNTER_EVENTS_SUPPRESSED) - suppressed;
        let slots = self.sampler_slots_of(&flow.denied);
        let sent = |b: &mut Bench, drain_every| {
            let (m, events) = b.single(
                INGRESS,
                &flow.denied,
                TC_ACT_SHOT,
                Prepare::ClearSampler(&slots),
                drain_every,
            );
            assert_eq!(
                events, SINGLE_SAMPLES as u64,
                "every denied run with the sampler cleared must send its event"
            );
            m
        };
        let m = sent(self, DRAIN_EVERY);
        row(out, PathKind::DeniedEvent, m);
        if extras {
            let m = sent(self, WAKEUP_EVERY_RUN);
            out.wakeup.push((family, m));
        }
        let (m, _) = self.single(
            INGRESS,
            &flow.syn,
            TC_ACT_OK,
            Prepare::ForgetFlows,
            DRAIN_EVERY,
        );
        row(out, PathKind::Allowed, m);
        // Leave nothing behind for the next shape.
        self.datapath.clear_conntrack().unwrap();
    }

    /// Verified instructions and load time of each program, from a second copy of the object
    /// loaded against the same pinned maps (the first copy's programs were loaded together).
    fn verifier_stats(&self) -> Vec<(&'static str, Option<u32>, Duration)> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.layout.maps())
            .load(OBJECT)
            .expect("loading the object a second time");
        [
            program_names::TC_INGRESS,
            program_names::TC_EGRESS,
            program_names::TC_CHECK,
            program_names::FLOOR_PARSE,
            program_names::FLOOR_LOOKUP,
            BASELINE,
        ]
        .into_iter()
        .map(|name| {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            let t = Instant::now();
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
            let took = t.elapsed();
            let insns = prog.info().unwrap().verified_instruction_count();
            (name, insns, took)
        })
        .collect()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The mean of the middle half. For single runs: the runner's clock steps by about 10 ns
/// there, so a median jumps between steps (70 or 80 ns for the baseline, ±13% on a ratio).
fn interquartile_mean(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let middle = &v[v.len() / 4..v.len() * 3 / 4];
    middle.iter().sum::<f64>() / middle.len() as f64
}

struct Applied {
    bytes: usize,
    parse: Duration,
    compile: Duration,
    swap: Duration,
    /// IPv4 identity, IPv6 identity and rule entries.
    entries: [usize; 3],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PathKind {
    Established,
    DeniedSampled,
    DeniedEvent,
    Allowed,
}

impl PathKind {
    const ALL: [PathKind; 4] = [
        PathKind::Established,
        PathKind::DeniedSampled,
        PathKind::DeniedEvent,
        PathKind::Allowed,
    ];

    fn title(self) -> &'static str {
        match self {
            PathKind::Established => {
                "established flow: ACK of an answered TCP flow (one conntrack hit), repeat loop"
            }
            PathKind::DeniedSampled => {
                "new flow, denied, event sampled (SYN storm: 1 event/s per edge, the rest \
                 counted), repeat loop"
            }
            PathKind::DeniedEvent => {
                "new flow, denied, event sent every run (sampler cleared between runs; the \
                 reader drains the ring every 1000 runs, so no wakeups), single runs*"
            }
            PathKind::Allowed => {
                "new flow, allowed (+2 conntrack inserts; flows forgotten between runs), \
                 single runs*"
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    Parse,
    Lookup,
    Established,
}

struct Row {
    path: PathKind,
    family: Family,
    shape: Shape,
    m: Measured,
}

#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    floors: Vec<(Floor, Family, Measured)>,
    applied: Vec<(Shape, Applied)>,
    /// Events the kernel held back during the sampled rows.
    suppressed: u64,
    /// The event-sent row with the reader woken by every event.
    wakeup: Vec<(Family, Measured)>,
}

// ---------------------------------------------------------------------------------------------
// A real agent's memory

struct Memory {
    rules: usize,
    ready: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    /// `tollgate policy validate -f` of the same file: peak RSS (KiB), wall time, and the
    /// launcher's peak (the floor of that measurement).
    validate_kb: u64,
    validate: Duration,
    validate_floor_kb: u64,
}

/// Set (to a policy file) when this binary runs as the launcher of `policy validate`.
const VALIDATE_LAUNCHER: &str = "TOLLGATE_BENCH_VALIDATE";

/// `tollgate policy validate -f policy`: peak RSS in KiB and wall time.
///
/// The peak comes from wait4's rusage, which on Linux includes the memory of whatever process
/// the child was forked from (exec keeps the high-water mark of the image it replaces). Forked
/// from this benchmark it would report the benchmark's own 100+ MB, so the benchmark runs
/// itself again as a small launcher (`VALIDATE_LAUNCHER`) that forks the CLI, and reports the
/// launcher's own peak as the floor of the measurement. Bounded: killed by pid after 60 s.
fn validate_peak(policy: &Path) -> (u64, Duration, u64) {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let mut launcher = std::process::Command::new(exe)
        .env(VALIDATE_LAUNCHER, policy)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the validate launcher");
    let deadline = Instant::now() + Duration::from_secs(60);
    while launcher.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = launcher.kill();
            let _ = launcher.wait();
            panic!("policy validate launcher took over 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = launcher.wait_with_output().unwrap();
    assert!(out.status.success(), "policy validate launcher failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    (v[0], Duration::from_nanos(v[1]), v[2])
}

/// The launcher: runs `tollgate policy validate -f <file>`, reaps it with wait4 and prints its
/// peak RSS (KiB), its wall time (ns) and the launcher's own peak (KiB).
fn validate_launcher(policy: &str) -> ! {
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let t = Instant::now();
    #[allow(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, for its rusage"
    )]
    let child = std::process::Command::new(AGENT_BINARY)
        .args(["policy", "validate", "-f", policy])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running tollgate policy validate");
    let pid = child.id() as libc::pid_t;
    let deadline = t + Duration::from_secs(50);
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for (and reaps) our own child by its pid; valid out-pointers.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            println!("{} {} {own}", usage.ru_maxrss, t.elapsed().as_nanos());
            std::process::exit(if ok { 0 } else { 1 });
        }
        if rc != 0 || Instant::now() > deadline {
            // SAFETY: signalling our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// RSS and peak of a real agent per rule count, each started in a namespace of its own name
/// with one veth pair to enforce on, stopped by pid and uninstalled from its exact pin directory
/// (`AgentProcess`'s Drop); the namespace goes last, and the veths with it.
fn agent_memory() -> Vec<Memory> {
    let pid = std::process::id();
    let ns = NetNs::new(&format!("tgbench{pid}")).expect("namespace");
    ns.exec_checked(&[
        "ip", "link", "add", "tgb0", "type", "veth", "peer", "name", "tgb0p",
    ])
    .expect("veth pair");
    ns.exec_checked(&["ip", "link", "set", "tgb0", "up"])
        .expect("veth up");
    ns.exec_checked(&["ip", "link", "set", "tgb0p", "up"])
        .expect("veth peer up");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    for rules in MEMORY_RULES {
        eprintln!("  agent with {rules} rules ...");
        let policy = dir.path().join(format!("policy-{rules}.yaml"));
        let shape = Shape {
            identities: IDENTITIES,
            cidr: false,
            range: false,
            rules,
        };
        std::fs::write(&policy, shape.yaml()).unwrap();
        let (validate_kb, validate, validate_floor_kb) = validate_peak(&policy);
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/tollgate-bench-agent-{pid}-{rules}"));
        let t = Instant::now();
        // Drop stops it by pid and uninstalls exactly `bpffs`.
        let agent = AgentProcess::start(
            Path::new(AGENT_BINARY),
            &ns,
            "tgb0",
            &policy,
            &dir.path().join(format!("agent-{rules}")),
            &bpffs,
        )
        .expect("agent starts");
        let ready = t.elapsed();
        // Let the start-up settle (first rescan, event reader) before reading.
        std::thread::sleep(Duration::from_millis(500));
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap()))
            .expect("/proc/<pid>/status");
        let kb = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{field} missing from /proc/<pid>/status"))
        };
        out.push(Memory {
            rules,
            ready,
            rss_kb: kb("VmRSS:"),
            hwm_kb: kb("VmHWM:"),
            validate_kb,
            validate,
            validate_floor_kb,
        });
        drop(agent);
    }
    drop(ns);
    out
}

/// What one program costs per run on real traffic (BPF run-time statistics).
struct HookCost {
    program: &'static str,
    /// Median over rounds of ns per run at the router's ingress hooks (both veths).
    ingress_ns: f64,
    /// For the classifiers: the egress program's ns per run.
    egress_ns: Option<f64>,
}

/// Rounds of the real-traffic floors (each program measured once per round, interleaved).
const TRAFFIC_ROUNDS: usize = 5;
/// Request/response time per program and round.
const TRAFFIC_SLICE: Duration = Duration::from_millis(700);
/// The echo server's port in the real-traffic floors.
const ECHO_PORT: u16 = 7100;

/// Moves the calling thread into `ns` until dropped (setns is per thread), then back: aya
/// attaches by interface name in the caller's namespace.
struct InNamespace(std::fs::File);

impl InNamespace {
    fn enter(ns: &NetNs) -> Self {
        use std::os::fd::AsRawFd as _;
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = std::fs::File::open(ns.path()).expect("target netns");
        // SAFETY: setns on valid namespace descriptors; affects only this thread.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        Self(home)
    }
}

impl Drop for InNamespace {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: as in `enter`, back to the thread's own namespace.
        unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// The runner's figures hide memory: it runs one packet 10,000 times with every cache line
/// hot. This runs one TCP connection doing request/response through a router namespace and
/// attaches, in turn, the empty program, the two floors and the classifiers (the real
/// datapath, with a policy admitting the connection) to the router's veths, reading each
/// program's cost per run from the kernel's run-time statistics (on only while measuring). The
/// connection is opened with the classifiers attached, so it is tracked and the lookup floor
/// finds it, as the established path does.
fn real_traffic_floors() -> Vec<HookCost> {
    use aya::programs::{tc::TcAttachOptions, LinkOrder, TcAttachType};
    use std::io::{Read as _, Write as _};
    use tollgate_testbed::{load::ByteEchoServer, Topology};

    let pid = std::process::id();
    let topo = Topology::new(&format!("tgfl{pid}"), &["client", "server"]).expect("topology");
    let (client, server) = (topo.workload("client"), topo.workload("server"));
    let layout = PinLayout::new(format!("/sys/fs/bpf/tollgate-bench-floors-{pid}"));
    let _ = loader::uninstall(&layout);
    let mut loaded = loader::load(&layout).expect("load datapath");
    for name in [
        BASELINE,
        program_names::FLOOR_PARSE,
        program_names::FLOOR_LOOKUP,
    ] {
        let prog: &mut SchedClassifier = loaded.ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().expect("load floor program");
    }
    let mut datapath = Datapath::open(&layout).unwrap();
    let yaml = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: floors }}\nspec:\n  \
         identities:\n    - {{ name: client, cidrs: [\"{}/32\"] }}\n    - {{ name: server, cidrs: \
         [\"{}/32\"] }}\n  rules:\n    - {{ name: rr, from: client, to: server, ports: \
         [{{ port: {ECHO_PORT}, protocol: TCP }}] }}\n",
        client.v4, server.v4
    );
    let policy = parse_policy(&yaml, "floors.yaml").unwrap();
    let generation = datapath.next_generation().unwrap();
    let compiled = compile_policy(&policy, slot_of(generation), &ClockReading::now(), &[]);
    datapath.install(&compiled, generation, &[]).unwrap();
    let veths = [client.host_if.clone(), server.host_if.clone()];
    {
        let _inside = InNamespace::enter(&topo.node);
        for name in &veths {
            let cname = std::ffi::CString::new(name.as_str()).unwrap();
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert_ne!(ifindex, 0, "{name} in the node namespace");
            datapath
                .write_interface(ifindex, false, Some(true), [None, None])
                .unwrap();
        }
    }
    let _server = ByteEchoServer::start(
        &server.ns,
        std::net::SocketAddr::new(server.v4.into(), ECHO_PORT),
        None,
    )
    .expect("echo server");

    // Attaches `programs` (name, hook) to both veths; dropping the links detaches them.
    let attach = |loaded: &mut Loaded, programs: &[(&str, TcAttachType)]| {
        let _inside = InNamespace::enter(&topo.node);
        let mut links = Vec::new();
        for (name, hook) in programs {
            let prog: &mut SchedClassifier =
                loaded.ebpf.program_mut(name).unwrap().try_into().unwrap();
            for veth in &veths {
                let id = prog
                    .attach_with_options(
                        veth,
                        *hook,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .expect("attach");
                links.push(prog.take_link(id).unwrap());
            }
        }
        links
    };
    let classifiers = [
        (INGRESS, TcAttachType::Ingress),
        (program_names::TC_EGRESS, TcAttachType::Egress),
    ];
    // Open the connection through the classifiers, so it is tracked.
    let links = attach(&mut loaded, &classifiers);
    let to = std::net::SocketAddr::new(server.v4.into(), ECHO_PORT);
    let mut stream = client
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .expect("enter client namespace")
        .expect("connect through the classifiers");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut rr = |d: Duration| {
        let end = Instant::now() + d;
        let mut byte = [b'x'];
        while Instant::now() < end {
            stream.write_all(&byte).expect("request");
            stream.read_exact(&mut byte).expect("response");
        }
    };
    rr(Duration::from_millis(100));
    drop(links);

    let variants: [(&'static str, &[(&str, TcAttachType)]); 4] = [
        (
            "empty classifier (tollgate_baseline)",
            &[(BASELINE, TcAttachType::Ingress)],
        ),
        (
            "parse only (tollgate_floor_parse)",
            &[(program_names::FLOOR_PARSE, TcAttachType::Ingress)],
        ),
        (
            "parse + conntrack lookup (tollgate_floor_lookup)",
            &[(program_names::FLOOR_LOOKUP, TcAttachType::Ingress)],
        ),
        ("tollgate_ingress / tollgate_egress", &classifiers),
    ];
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); variants.len()];
    for _ in 0..TRAFFIC_ROUNDS {
        for (i, (_, programs)) in variants.iter().enumerate() {
            let links = attach(&mut loaded, programs);
            let counters = |loaded: &Loaded, name: &str| {
                let prog: &SchedClassifier = loaded.ebpf.program(name).unwrap().try_into().unwrap();
                let info = prog.info().unwrap();
                (info.run_time().as_nanos() as f64, info.run_count() as f64)
            };
            let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
            let before: Vec<_> = programs.iter().map(|(n, _)| counters(&loaded, n)).collect();
            rr(TRAFFIC_SLICE);
            let after: Vec<_> = programs.iter().map(|(n, _)| counters(&loaded, n)).collect();
            drop(stats);
            drop(links);
            let per_run =
                |k: usize| (after[k].0 - before[k].0) / (after[k].1 - before[k].1).max(1.0);
            samples[i].0.push(per_run(0));
            if programs.len() > 1 {
                samples[i].1.push(per_run(1));
            }
        }
    }
    drop(stream);
    drop(loaded);
    let _ = loader::uninstall(&layout);
    variants
        .iter()
        .zip(samples.iter_mut())
        .map(|((program, _), (ingress, egress))| HookCost {
            program,
            ingress_ns: median(ingress),
            egress_ns: (!egress.is_empty()).then(|| median(egress)),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Report

fn count_label(n: usize) -> String {
    if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

fn print_paths(results: &Results, b: &Baselines) {
    let header = format!(
        "  {:<6} {:<12} {:<6} {:>6} {:>9} {:>8} {:>12}",
        "family", "identities", "ports", "rules", "ns/pkt", "x empty", "vs 10 rules"
    );
    for path in PathKind::ALL {
        println!("{}", path.title());
        println!("{header}");
        let mut rows: Vec<&Row> = results.rows.iter().filter(|r| r.path == path).collect();
        rows.sort_by_key(|r| {
            (
                r.family,
                r.shape.identities > IDENTITIES,
                r.shape.range,
                r.shape.cidr,
                r.shape.rules,
            )
        });
        for r in rows {
            // Flatness: against the 10-rule row of the same family and shape (for the 100k
            // identities, the 1k-identity row with single addresses and exact ports).
            let reference = results.rows.iter().find(|o| {
                o.path == path
                    && o.family == r.family
                    && o.shape.cidr == r.shape.cidr
                    && o.shape.range == r.shape.range
                    && o.shape.identities == IDENTITIES
                    && o.shape.rules == SCALES[0]
            });
            let flat = match reference {
                Some(o) if !std::ptr::eq(o, r) => {
                    format!("{:+.0}%", (r.m.ns / o.m.ns - 1.0) * 100.0)
                }
                _ => String::new(),
            };
            println!(
                "  {:<6} {:<12} {:<6} {:>6} {:>9.1} {:>8.2} {:>12}",
                r.family.name(),
                r.shape.identity_label(r.family),
                if r.shape.range { "range" } else { "exact" },
                count_label(r.shape.rules),
                r.m.ns,
                r.m.ratio(b),
                flat,
            );
        }
        println!();
    }
}

fn print_floors(results: &Results, b: &Baselines) {
    println!("Floors: what of the established path is the header parse and one hash lookup");
    println!("(ACK of the established flow; 1000 x /32,/128 identities, 10 exact-port rules)");
    println!(
        "  {:<50} {:>9} {:>8} {:>9} {:>8}",
        "program", "IPv4 ns", "x empty", "IPv6 ns", "x empty"
    );
    for (floor, name) in [
        (Floor::Parse, "parse only (tollgate_floor_parse)"),
        (
            Floor::Lookup,
            "parse + conntrack lookup (tollgate_floor_lookup)",
        ),
        (Floor::Established, "established path (tollgate_ingress)"),
    ] {
        let get = |family: Family| {
            results
                .floors
                .iter()
                .find(|(f, fam, _)| *f == floor && *fam == family)
                .map(|(_, _, m)| *m)
                .unwrap()
        };
        let (v4, v6) = (get(Family::V4), get(Family::V6));
        println!(
            "  {name:<50} {:>9.1} {:>8.2} {:>9.1} {:>8.2}",
            v4.ns,
            v4.ratio(b),
            v6.ns,
            v6.ratio(b)
        );
    }
    let get = |floor: Floor, family: Family| {
        results
            .floors
            .iter()
            .find(|(f, fam, _)| *f == floor && *fam == family)
            .map(|(_, _, m)| m.ns)
            .unwrap()
    };
    let lookup = |family| get(Floor::Lookup, family) - get(Floor::Parse, family);
    println!(
        "  one conntrack hash lookup alone (lookup floor - parse floor): {:.0} ns IPv4 (16-byte \
         key), {:.0} ns IPv6 (40-byte key)",
        lookup(Family::V4),
        lookup(Family::V6)
    );
    println!();
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    if let Ok(policy) = std::env::var(VALIDATE_LAUNCHER) {
        validate_launcher(&policy);
    }
    let started = Instant::now();
    let mut results = Results::default();
    let mut shapes = Vec::new();
    for rules in SCALES {
        for (cidr, range) in [(false, false), (true, false), (false, true), (true, true)] {
            shapes.push(Shape {
                identities: IDENTITIES,
                cidr,
                range,
                rules,
            });
        }
    }
    shapes.push(Shape {
        identities: MANY_IDENTITIES,
        cidr: false,
        range: false,
        rules: SCALES[1],
    });

    let mut b = Bench::new();
    for (i, shape) in shapes.iter().enumerate() {
        eprintln!("  {} ...", shape.label());
        let applied = b.apply(&shape.yaml());
        results.applied.push((*shape, applied));
        for family in [Family::V4, Family::V6] {
            b.measure(shape, family, i == 0, &mut results);
        }
    }
    eprintln!("  rate limits ...");
    let limits = ratelimit::run(&mut b);
    let verifier = b.verifier_stats();
    let load_time = b.load_time;
    let sampled_events = b.sampled_events;
    let baselines = Baselines {
        repeat: median(&mut b.base_repeat),
        single: interquartile_mean(&mut b.base_single),
    };
    drop(b);
    eprintln!("  agent memory ...");
    let memory = agent_memory();
    eprintln!("  real-traffic floors ...");
    let hooks = real_traffic_floors();

    // How far the baseline of single rows' rounds strayed: the noise floor of a comparison.
    let spread = |single: bool| {
        let v: Vec<f64> = results
            .rows
            .iter()
            .filter(|r| r.m.single == single)
            .map(|r| r.m.row_base)
            .collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        (lo, hi)
    };
    let (blo, bhi) = spread(false);
    let (slo, shi) = spread(true);

    println!();
    println!(
        "Tollgate datapath benchmark (BPF_PROG_TEST_RUN on `lo`, an uplink: a new flow pays the uplink reverse-path lookup, established packets none)"
    );
    println!(
        "  repeat loops: median of {ROUNDS} rounds x {REPEAT} runs; single runs: interquartile \
         mean of {SINGLE_SAMPLES} (the runner's clock steps ~10 ns in single runs); the empty \
         classifier runs interleaved with every row, and ratios are to all its runs pooled"
    );
    println!(
        "  empty classifier (tollgate_baseline): {:.1} ns in repeat loops (rows' rounds \
         {blo:.0}-{bhi:.0}), {:.1} ns in single runs (rows' runs {slo:.1}-{shi:.1})",
        baselines.repeat, baselines.single
    );
    println!(
        "  identities: 1000 (addresses 10.200.0.0/16, fd00:200::/48) as /32+/128 (exact maps) \
         or /28+/64 (LPM tries); 100k: all /128, the first {V4_IDENTITIES} also /32"
    );
    println!(
        "  ports: exact = one port (exact rule map), range = 8080-8087 (rule trie); \
         rules connect distinct identity pairs"
    );
    println!();
    print_paths(&results, &baselines);
    println!(
        "  * single runs include the runner's fixed per-call cost; ratio to the baseline in \
         single runs. vs 10 rules: ns against the same family and shape with 10 rules (for \
         100k identities: 1k x /32 or /128, exact ports, 10 rules)"
    );
    for (family, m) in &results.wakeup {
        println!(
            "  event sent with the reader caught up (ring drained after every run; no wakeup below 64 KiB), {}, \
             {} exact 10 rules: {:.1} ns, {:.2} x empty",
            family.name(),
            shapes[0].identity_label(*family),
            m.ns,
            m.ratio(&baselines)
        );
    }
    println!(
        "  sampled rows: {sampled_events} events went out, {} were suppressed and counted \
         (COUNTER_EVENTS_SUPPRESSED)",
        results.suppressed
    );
    println!();
    print_floors(&results, &baselines);
    ratelimit::print(&limits, &baselines);

    println!("Verifier (a second load of the object against the same maps)");
    println!(
        "  {:<24} {:>20} {:>10}",
        "program", "verified insns", "load ms"
    );
    for (name, insns, took) in &verifier {
        println!(
            "  {name:<24} {:>20} {:>10.1}",
            insns.map_or("n/a".to_string(), |n| n.to_string()),
            took.as_secs_f64() * 1e3
        );
    }
    println!(
        "  loader::load (create + pin maps, verify ingress, egress, check): {:.0} ms",
        load_time.as_secs_f64() * 1e3
    );
    println!();

    println!("Policy pipeline (parse_policy, compile_policy, Datapath::install)");
    println!(
        "  {:<54} {:>7} {:>8} {:>8} {:>8} {:>9}  entries v4/v6/rules",
        "policy", "MB", "parse ms", "comp. ms", "swap ms", "c+s ms"
    );
    for (shape, a) in &results.applied {
        println!(
            "  {:<54} {:>7.1} {:>8.0} {:>8.0} {:>8.0} {:>9.0}  {}/{}/{}",
            shape.label(),
            a.bytes as f64 / 1e6,
            a.parse.as_secs_f64() * 1e3,
            a.compile.as_secs_f64() * 1e3,
            a.swap.as_secs_f64() * 1e3,
            (a.compile + a.swap).as_secs_f64() * 1e3,
            a.entries[0],
            a.entries[1],
            a.entries[2],
        );
    }
    println!("  (swap also clears the stale slot, which holds the policy from two applies before)");
    println!();

    println!(
        "Agent memory (`tollgate agent`, 1000 x /32+/128 identities, exact-port rules, one veth)"
    );
    println!(
        "  {:<8} {:>10} {:>10} {:>10}   {:>24}",
        "rules", "VmRSS MB", "VmHWM MB", "ready s", "policy validate: peak MB, s"
    );
    for m in &memory {
        println!(
            "  {:<8} {:>10.1} {:>10.1} {:>10.1}   {:>18.1} {:>6.2}",
            m.rules,
            m.rss_kb as f64 / 1024.0,
            m.hwm_kb as f64 / 1024.0,
            m.ready.as_secs_f64(),
            m.validate_kb as f64 / 1024.0,
            m.validate.as_secs_f64()
        );
    }
    println!(
        "  (VmRSS/VmHWM from /proc/<pid>/status 0.5 s after the agent answered `status`; \
         validate's peak from wait4's ru_maxrss, floor {:.1} MB: the launcher it was forked from)",
        memory
            .iter()
            .map(|m| m.validate_floor_kb)
            .max()
            .unwrap_or(0) as f64
            / 1024.0
    );
    println!();
    println!(
        "Real traffic: cost per run at the router's hooks, one TCP connection doing 1-byte \
         request/response (BPF run-time statistics, on only while measuring; median of \
         {TRAFFIC_ROUNDS} rounds, programs interleaved)"
    );
    println!(
        "  {:<52} {:>10} {:>9} {:>10}",
        "program", "ingress ns", "x empty", "egress ns"
    );
    let empty = hooks[0].ingress_ns;
    for h in &hooks {
        println!(
            "  {:<52} {:>10.1} {:>9.2} {:>10}",
            h.program,
            h.ingress_ns,
            h.ingress_ns / empty,
            h.egress_ns.map_or(String::new(), |e| format!("{e:.1}"))
        );
    }
    println!(
        "  (every run here pays the statistics' clock reads, the empty classifier included; the \
         floors run at ingress only)"
    );
    println!();
    println!("  total {:.0} s", started.elapsed().as_secs_f64());
}
