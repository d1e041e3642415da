//! Rate limits under real traffic, through a real agent: new connections from two processes at
//! once, a UDP flood, bulk TCP at MTU 9000 with segmentation offloads on (the datapath sees GSO
//! packets of many segments), an identity's quota beside an unlimited identity, a rule's limit
//! inside an identity's quota, and a policy apply that must not hand out a fresh burst.
//!
//! Each test offers several times the configured rate and counts what arrives at the server,
//! against what a token bucket lets through over the window the senders were sending: `burst`
//! at once, then the rate (`rate × window + burst`), within ±10%. The window comes from the
//! senders' own CLOCK_MONOTONIC timestamps and the counts from the receiving sockets, never
//! from how long the test's code took. Connection attempts each use a source port of their own
//! and are abandoned before the SYN's first retransmission, so every attempt is exactly one new
//! flow. Needs root; fails (never skips) without it.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    env::AgentEnv,
    load_process::{offer_load_if_asked, LoadProcess},
};
use tollgate_testbed::{
    offered::{
        monotonic_ns, offer_connections, offer_datagrams, send_bulk, AcceptCounter, BulkSink,
        ConnectionLoad, DatagramCounter, DatagramLoad, Offered,
    },
    traffic::tcp_connect,
    TopologyOptions,
};

/// A policy for `workloads` (identity = workload name; the `i`-th has subnet `i + 1`, as the
/// topology gives), with `rules` and `rate_limits` as YAML list items (indented for `spec:`).
fn policy(workloads: &[&str], rules: &str, rate_limits: &str) -> String {
    let mut text = String::from(
        "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: ratelimit
spec:
  identities:
",
    );
    for (i, name) in workloads.iter().enumerate() {
        let subnet = i + 1;
        text.push_str(&format!(
            "    - name: {name}
      cidrs: [\"10.200.{subnet}.2/32\", \"fd00:200:{subnet:x}::2/128\"]
"
        ));
    }
    text.push_str("  rules:\n");
    text.push_str(rules);
    if !rate_limits.is_empty() {
        text.push_str("  rateLimits:\n");
        text.push_str(rate_limits);
    }
    text
}

/// One item of `policy`'s `rules`: `from` → `to` on `ports` (a YAML list), limited by
/// `rate_limit` (a YAML mapping) unless that is empty.
fn rule(name: &str, from: &str, to: &str, ports: &str, rate_limit: &str) -> String {
    let mut text =
        format!("    - name: {name}\n      from: {from}\n      to: {to}\n      ports: {ports}\n");
    if !rate_limit.is_empty() {
        text.push_str(&format!("      rateLimit: {rate_limit}\n"));
    }
    text
}

/// One item of `policy`'s `rateLimits`: a quota of `identity` with `fields` (rates, bursts).
fn quota(identity: &str, fields: &str) -> String {
    format!("    - {{ identity: {identity}, {fields} }}\n")
}

const CLIENT_SERVER: &[&str] = &["client", "server"];

/// MTU 9000 and the veths' default offloads (TSO/GSO and scatter-gather on): the sender's stack
/// hands the datapath GSO packets of several 9000-byte segments.
const JUMBO: TopologyOptions = TopologyOptions {
    mtu: 9000,
    offloads: true,
};

/// How far a measured count or rate may be from what the limit allows.
const TOLERANCE: f64 = 0.10;

/// How long a connection attempt waits for its handshake: well under the SYN's first
/// retransmission (1 s), well over a handshake across veths (microseconds).
const GIVE_UP: Duration = Duration::from_millis(300);

/// The shared fixture, with this file's helpers.
type Env = AgentEnv;

impl Env {
    fn new(short: &str, workloads: &[&str], options: TopologyOptions, policy: &str) -> Env {
        // "tgrl": namespace names of their own, apart from the other test binaries'.
        AgentEnv::start(
            &format!("tgrl{}-{short}", std::process::id() % 100_000),
            &format!("ratelimit-{short}"),
            workloads,
            options,
            policy,
        )
    }

    fn socket_addr(&self, workload: &str, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr(workload, v6), port)
    }

    /// `tollgate policy apply -f` of `text`; panics if the agent refuses it.
    fn apply(&self, name: &str, text: &str) {
        let file = self.write_file(name, text);
        let out = self
            .agent
            .cli(&["policy", "apply", "-f", file.to_str().unwrap()])
            .unwrap();
        assert!(
            out.status.success(),
            "policy apply of {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `drop_rate_limited` from `status` (0 if the agent does not list it yet).
    fn rate_limited_drops(&self) -> u64 {
        self.verdict("drop_rate_limited").unwrap_or(0)
    }

    /// Prints what `status` says about limits, for the test log: its shape is not asserted.
    fn log_limit_status(&self) {
        let status = self.status_json();
        for key in ["limits", "rate_limits", "rateLimits"] {
            if !status[key].is_null() {
                eprintln!("status {key}: {}", status[key]);
            }
        }
    }

    /// Connects from `from` to `to` once (ephemeral port) and fails the test if it cannot: the
    /// path works before any limit is measured.
    fn assert_connects(&self, from: &str, to: SocketAddr) {
        tcp_connect(self.ns(from), to.ip(), to.port()).unwrap_or_else(|e| {
            panic!("{from} -> {to} must connect before the limit is hit: {e:#}")
        });
    }
}

/// Asserts `measured` is within `TOLERANCE` of `expected`.
fn assert_near(what: &str, measured: f64, expected: f64) {
    let error = (measured - expected) / expected;
    eprintln!(
        "{what}: measured {measured:.1}, expected {expected:.1} ({:+.1}%)",
        error * 100.0
    );
    assert!(
        error.abs() <= TOLERANCE,
        "{what}: measured {measured:.1}, expected {expected:.1} ± {:.0}% ({:+.1}%)",
        TOLERANCE * 100.0,
        error * 100.0
    );
}

/// Asserts the generators offered at least `factor` times `limit` per second over their
/// window: otherwise a count under the limit would prove nothing.
fn assert_offered_over(what: &str, offered: &Offered, limit: f64, factor: f64) {
    eprintln!(
        "{what}: offered {} in {:.3} s ({:.0}/s; {} completed at the sender)",
        offered.attempted,
        offered.window_secs(),
        offered.rate(),
        offered.completed
    );
    assert!(
        offered.rate() >= factor * limit,
        "{what}: offered only {:.0}/s, under {factor} × the limit of {limit}/s",
        offered.rate()
    );
}

/// What a token bucket of `rate` per second and `burst` lets through a sender that offers
/// more than `rate` over `window_secs`, starting full: `burst` at the start, then one unit each
/// `1 / rate` (whole units: a count of 2 a second over 4.99 s is 2 + 9, not 2 + 9.98).
fn bucket_allows(rate: f64, burst: f64, window_secs: f64) -> f64 {
    burst + (rate * window_secs).floor()
}

/// Connection attempts from `ns` to `to` on a thread that entered it.
fn offer_connections_from(env: &Env, from: &str, load: ConnectionLoad) -> Offered {
    env.ns(from)
        .run(move || offer_connections(&load))
        .unwrap()
        .unwrap()
}

/// The instant two generators should start together: soon enough not to stretch the test,
/// late enough that a process started now is ready.
fn start_soon() -> u64 {
    monotonic_ns() + 500_000_000
}

// ---- New connections -------------------------------------------------------------------------

/// 20 new connections a second with a burst of 5, on the one rule that lets client reach
/// server:8080.
const CONN_RATE: f64 = 20.0;
const CONN_BURST: f64 = 5.0;

#[test]
fn connections_per_second_limit_holds_from_two_processes() {
    offer_load_if_asked();
    let rules = rule(
        "client-to-server",
        "client",
        "server",
        "[{ protocol: TCP, port: 8080 }]",
        "{ connectionsPerSecond: 20, burst: 5 }",
    );
    let env = Env::new(
        "conn",
        CLIENT_SERVER,
        TopologyOptions::default(),
        &policy(CLIENT_SERVER, &rules, ""),
    );
    let to = env.socket_addr("server", false, 8080);
    let server = AcceptCounter::start(env.ns("server"), to).unwrap();
    env.assert_connects("client", to);
    // The probe took a token: let the bucket fill again (burst / rate) before measuring.
    std::thread::sleep(Duration::from_secs_f64(CONN_BURST / CONN_RATE + 0.5));
    let before = server.settled(Duration::from_millis(200), Duration::from_secs(2));
    let drops_before = env.rate_limited_drops();

    // Two processes, 90 attempts a second each (9 × the limit together) for 4 s.
    let start_at_ns = start_soon();
    let load = |ports| ConnectionLoad {
        to,
        per_second: 90,
        duration: Duration::from_secs(4),
        source_ports: ports,
        give_up_after: GIVE_UP,
        start_at_ns,
    };
    let test = "connections_per_second_limit_holds_from_two_processes";
    let first = LoadProcess::start(env.ns("client"), test, &load(20_000..22_000));
    let second = LoadProcess::start(env.ns("client"), test, &load(24_000..26_000));
    let offered = [
        first.wait(Duration::from_secs(15)),
        second.wait(Duration::from_secs(15)),
    ];
    let accepted = server.settled(Duration::from_millis(300), Duration::from_secs(3)) - before;

    for (i, o) in offered.iter().enumerate() {
        assert!(
            o.attempted >= 300,
            "load process {i} made only {} attempts",
            o.attempted
        );
    }
    let all = Offered::combined(&offered);
    assert_offered_over("two processes", &all, CONN_RATE, 5.0);
    assert_near(
        "connections accepted by the server",
        accepted as f64,
        bucket_allows(CONN_RATE, CONN_BURST, all.window_secs()),
    );
    assert!(
        env.rate_limited_drops() > drops_before,
        "drop_rate_limited did not grow"
    );
    env.log_limit_status();
}

// ---- Packets -----------------------------------------------------------------------------------

const UDP_PPS: f64 = 2000.0;
const UDP_BURST: f64 = 20.0;

#[test]
fn packets_per_second_limit_holds_for_udp() {
    let rules = rule(
        "client-to-server",
        "client",
        "server",
        "[{ protocol: UDP, port: 9000 }]",
        "{ packetsPerSecond: 2000, burst: 20 }",
    );
    let env = Env::new(
        "udp",
        CLIENT_SERVER,
        TopologyOptions::default(),
        &policy(CLIENT_SERVER, &rules, ""),
    );
    let to = env.socket_addr("server", false, 9000);
    let server = DatagramCounter::start(env.ns("server"), to).unwrap();
    // Neighbours resolved and the path open: 10 datagrams in 100 ms, well inside the burst.
    let probe = DatagramLoad {
        to,
        per_second: 100,
        duration: Duration::from_millis(100),
        payload: 64,
    };
    env.ns("client")
        .run(move || offer_datagrams(&probe))
        .unwrap()
        .unwrap();
    assert!(
        server.settled(Duration::from_millis(200), Duration::from_secs(2)) > 0,
        "client -> server:9000/udp must pass before the limit is hit"
    );
    // The bucket full again (burst / rate = 10 ms) long before this is over.
    std::thread::sleep(Duration::from_millis(200));
    let before = server.settled(Duration::from_millis(200), Duration::from_secs(2));
    let drops_before = env.rate_limited_drops();

    // 10,000 datagrams a second (5 × the limit) for 3 s, one flow.
    let load = DatagramLoad {
        to,
        per_second: 10_000,
        duration: Duration::from_secs(3),
        payload: 64,
    };
    let offered = env
        .ns("client")
        .run(move || offer_datagrams(&load))
        .unwrap()
        .unwrap();
    let received = server.settled(Duration::from_millis(300), Duration::from_secs(3)) - before;

    assert_offered_over("UDP sender", &offered, UDP_PPS, 4.0);
    assert_near(
        "datagrams received by the server",
        received as f64,
        bucket_allows(UDP_PPS, UDP_BURST, offered.window_secs()),
    );
    assert!(
        env.rate_limited_drops() > drops_before,
        "drop_rate_limited did not grow"
    );
    env.log_limit_status();
}

// ---- Bytes -------------------------------------------------------------------------------------

/// Bulk transfers run this long; goodput is taken after `STEADY_SKIP`, once TCP has spent the
/// burst and found the limit.
const BULK_TIME: Duration = Duration::from_secs(4);
const STEADY_SKIP: Duration = Duration::from_secs(1);

/// Asserts `dev` in `ns` has the segmentation offloads on that make GSO packets.
fn assert_offloads_on(ns: &tollgate_testbed::NetNs, dev: &str) {
    let out = ns.exec(&["ethtool", "-k", dev]).output().expect("ethtool");
    let text = String::from_utf8_lossy(&out.stdout);
    for feature in [
        "scatter-gather",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{feature}: on"))),
            "{dev} in {}: {feature} is not on:\n{text}",
            ns.name()
        );
    }
}

/// Bulk TCP from client to server:5201 for `BULK_TIME`; returns the steady goodput (bytes/s).
fn bulk_goodput(env: &Env, from: &str, sink: &BulkSink, to: SocketAddr) -> f64 {
    let sent = env
        .ns(from)
        .run(move || send_bulk(to, BULK_TIME))
        .unwrap()
        .unwrap();
    sink.steady_goodput(&sent, STEADY_SKIP).unwrap()
}

const BULK_BYTES_PER_SECOND: f64 = 20_000_000.0;

// The byte limits have a burst of one second's worth (the default, written out). When a policer
// drops a TCP sender's retransmissions, the sender stalls for a retransmission timeout (200 ms
// at least), and a bucket shallower than that loses the credit of every stall; BBR, this
// machine's default congestion control, then also takes the stalled rate for the policer's and
// keeps to it. Measured with BBR through this datapath (rule limit at 20 MB/s, quota at
// 10 MB/s): burstBytes 262144 gave 2-14% of the rate, 1000000 gave 30-55%, 4000000 91-95%,
// a second's worth 94-101%. A sender that cannot reach the rate tests TCP, not the limiter.

fn bytes_limit_holds_for_bulk_tcp(short: &str, v6: bool) {
    let rules = rule(
        "client-to-server",
        "client",
        "server",
        "[{ protocol: TCP, port: 5201 }]",
        "{ bytesPerSecond: 20000000, burstBytes: 20000000 }",
    );
    let env = Env::new(
        short,
        CLIENT_SERVER,
        JUMBO,
        &policy(CLIENT_SERVER, &rules, ""),
    );
    assert_offloads_on(env.ns("client"), "eth0");
    assert_offloads_on(&env.topo.node, "tg-client");
    let to = env.socket_addr("server", v6, 5201);
    let sink = BulkSink::start(env.ns("server"), to).unwrap();
    let drops_before = env.rate_limited_drops();
    let goodput = bulk_goodput(&env, "client", &sink, to);
    assert_near("bulk TCP goodput (bytes/s)", goodput, BULK_BYTES_PER_SECOND);
    assert!(
        env.rate_limited_drops() > drops_before,
        "drop_rate_limited did not grow"
    );
    env.log_limit_status();
}

#[test]
fn bytes_per_second_limit_holds_for_bulk_tcp_with_offloads_ipv4() {
    bytes_limit_holds_for_bulk_tcp("bytes4", false);
}

#[test]
fn bytes_per_second_limit_holds_for_bulk_tcp_with_offloads_ipv6() {
    bytes_limit_holds_for_bulk_tcp("bytes6", true);
}

// ---- Identities apart --------------------------------------------------------------------------

const QUOTA_BYTES_PER_SECOND: f64 = 10_000_000.0;

#[test]
fn a_limit_on_one_identity_does_not_slow_another() {
    let workloads = &["a", "b", "server"];
    let rules = rule(
        "a-to-server",
        "a",
        "server",
        "[{ protocol: TCP, port: 5201 }]",
        "",
    ) + &rule(
        "b-to-server",
        "b",
        "server",
        "[{ protocol: TCP, port: 5202 }]",
        "",
    );
    let quotas = quota("a", "bytesPerSecond: 10000000, burstBytes: 10000000");
    let env = Env::new(
        "apart",
        workloads,
        JUMBO,
        &policy(workloads, &rules, &quotas),
    );
    let (to_a, to_b) = (
        env.socket_addr("server", false, 5201),
        env.socket_addr("server", false, 5202),
    );
    let sink_a = BulkSink::start(env.ns("server"), to_a).unwrap();
    let sink_b = BulkSink::start(env.ns("server"), to_b).unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bulk_goodput(&env, "a", &sink_a, to_a));
        let b = s.spawn(|| bulk_goodput(&env, "b", &sink_b, to_b));
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("unlimited identity b: {b:.0} bytes/s");
    assert_near("identity a's goodput (bytes/s)", a, QUOTA_BYTES_PER_SECOND);
    assert!(
        b >= 5.0 * QUOTA_BYTES_PER_SECOND,
        "identity b reached only {b:.0} bytes/s next to a's quota of {QUOTA_BYTES_PER_SECOND}"
    );
    env.log_limit_status();
}

// ---- A rule's limit inside an identity's quota -------------------------------------------------

const LOGIN_RATE: f64 = 2.0;
const LOGIN_BURST: f64 = 2.0;
const QUOTA_CONN_RATE: f64 = 50.0;
const QUOTA_CONN_BURST: f64 = 10.0;

#[test]
fn a_login_port_rule_limit_is_stricter_than_the_identity_quota() {
    let rules = rule(
        "login",
        "client",
        "server",
        "[{ protocol: TCP, port: 2222 }]",
        "{ connectionsPerSecond: 2, burst: 2 }",
    ) + &rule(
        "web",
        "client",
        "server",
        "[{ protocol: TCP, port: 8080 }]",
        "",
    );
    let quotas = quota("client", "connectionsPerSecond: 50, burst: 10");
    let env = Env::new(
        "login",
        CLIENT_SERVER,
        TopologyOptions::default(),
        &policy(CLIENT_SERVER, &rules, &quotas),
    );
    let (login, web) = (
        env.socket_addr("server", false, 2222),
        env.socket_addr("server", false, 8080),
    );
    let login_server = AcceptCounter::start(env.ns("server"), login).unwrap();
    let web_server = AcceptCounter::start(env.ns("server"), web).unwrap();
    env.assert_connects("client", login);
    env.assert_connects("client", web);
    // Both buckets full again (the login bucket takes burst / rate = 1 s).
    std::thread::sleep(Duration::from_secs_f64(LOGIN_BURST / LOGIN_RATE + 0.5));
    let quiet = (Duration::from_millis(200), Duration::from_secs(2));
    let (login_before, web_before) = (
        login_server.settled(quiet.0, quiet.1),
        web_server.settled(quiet.0, quiet.1),
    );

    // The same 100 attempts a second at each port for 5 s.
    let start_at_ns = start_soon();
    let load = |to, ports| ConnectionLoad {
        to,
        per_second: 100,
        duration: Duration::from_secs(5),
        source_ports: ports,
        give_up_after: GIVE_UP,
        start_at_ns,
    };
    let (login_load, web_load) = (load(login, 20_000..21_000), load(web, 24_000..25_000));
    let (to_login, to_web) = std::thread::scope(|s| {
        let l = s.spawn(|| offer_connections_from(&env, "client", login_load));
        let w = s.spawn(|| offer_connections_from(&env, "client", web_load));
        (l.join().unwrap(), w.join().unwrap())
    });
    let quiet = (Duration::from_millis(300), Duration::from_secs(3));
    let login_accepted = login_server.settled(quiet.0, quiet.1) - login_before;
    let web_accepted = web_server.settled(quiet.0, quiet.1) - web_before;

    assert_offered_over("login port", &to_login, LOGIN_RATE, 5.0);
    let both = Offered::combined(&[to_login, to_web]);
    assert_offered_over("both ports", &both, QUOTA_CONN_RATE, 2.0);
    assert_near(
        "login connections accepted",
        login_accepted as f64,
        bucket_allows(LOGIN_RATE, LOGIN_BURST, to_login.window_secs()),
    );
    // The quota meters all of the client's new connections, the login ones included.
    assert_near(
        "connections accepted at both ports (the client's quota)",
        (login_accepted + web_accepted) as f64,
        bucket_allows(QUOTA_CONN_RATE, QUOTA_CONN_BURST, both.window_secs()),
    );
    assert!(
        web_accepted >= 10 * login_accepted,
        "the web port ({web_accepted}) should admit far more than the login port ({login_accepted})"
    );
    env.log_limit_status();
}

// ---- Policy applies and bucket state -----------------------------------------------------------

/// Attempts one connection from each of `ports` to `to`, 20 a second (a limit of a token per
/// 30 s gets nothing back meanwhile), each given up after `GIVE_UP`; returns how many more the
/// server then accepted.
fn connects(env: &Env, server: &AcceptCounter, to: SocketAddr, ports: std::ops::Range<u16>) -> u64 {
    let before = server.settled(Duration::from_millis(100), Duration::from_secs(1));
    let n = ports.len() as u64;
    let load = ConnectionLoad {
        to,
        per_second: 20,
        // Half an interval short of n intervals: exactly n attempts, at 0, 50 ms, ...
        duration: Duration::from_millis(50 * n - 25),
        source_ports: ports,
        give_up_after: GIVE_UP,
        start_at_ns: 0,
    };
    let offered = offer_connections_from(env, "client", load);
    assert_eq!(offered.attempted, n, "attempts made");
    server.settled(Duration::from_millis(200), Duration::from_secs(2)) - before
}

#[test]
fn applying_an_unchanged_limit_gives_no_fresh_burst() {
    let limited = |rate_limit| {
        rule(
            "client-to-server",
            "client",
            "server",
            "[{ protocol: TCP, port: 8080 }]",
            rate_limit,
        )
    };
    let unrelated = rule(
        "server-to-client",
        "server",
        "client",
        "[{ protocol: TCP, port: 9999 }]",
        "",
    );
    // A token every 30 s: nothing refills while the test runs.
    let exhaustible = limited("{ connectionsPerMinute: 2, burst: 5 }");
    let original = policy(CLIENT_SERVER, &exhaustible, "");
    let env = Env::new(
        "apply",
        CLIENT_SERVER,
        TopologyOptions::default(),
        &original,
    );
    let to = env.socket_addr("server", false, 8080);
    let server = AcceptCounter::start(env.ns("server"), to).unwrap();

    let exhausted_at = Instant::now();
    let admitted = connects(&env, &server, to, 20_000..20_008);
    assert_eq!(
        admitted, 5,
        "a full bucket of burst 5 admits exactly 5 of 8"
    );

    env.apply("same.yaml", &original);
    let after_same = connects(&env, &server, to, 20_100..20_103);
    // The unrelated rule goes first, so the limited rule's position changes too.
    let with_unrelated = policy(CLIENT_SERVER, &format!("{unrelated}{exhaustible}"), "");
    env.apply("unrelated.yaml", &with_unrelated);
    let after_unrelated = connects(&env, &server, to, 20_200..20_203);
    let elapsed = exhausted_at.elapsed();
    assert!(
        elapsed < Duration::from_secs(25),
        "the refused attempts took {elapsed:?}: a token may have come back (one per 30 s)"
    );
    assert_eq!(
        after_same, 0,
        "applying the same policy gave the exhausted limit a fresh burst"
    );
    assert_eq!(
        after_unrelated, 0,
        "applying an unrelated change gave the exhausted limit a fresh burst"
    );

    let changed = limited("{ connectionsPerMinute: 2, burst: 4 }");
    env.apply(
        "changed.yaml",
        &policy(CLIENT_SERVER, &format!("{unrelated}{changed}"), ""),
    );
    let after_change = connects(&env, &server, to, 20_300..20_306);
    assert_eq!(
        after_change, 4,
        "a changed limit (burst 4) starts with a full bucket: 4 of 6 admitted"
    );
    env.log_limit_status();
}
