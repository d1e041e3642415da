//! Real traffic through real agents. Each test builds its own node namespace with workload
//! namespaces behind veth pairs (`tg-<workload>` on the node side), starts `tollgate agent`
//! inside the node namespace with its own socket and pin directory, and drives TCP, UDP and
//! ICMP between workloads. Needs root; fails (never skips) without it.

mod support;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use support::env::{AgentEnv, BINARY};
use tollgate_testbed::{
    traffic::{
        echo_roundtrip, ping, tcp_connect, tcp_echo_server, tcp_reachable, udp_echo_server,
        udp_reachable,
    },
    AgentProcess, Topology, TopologyOptions,
};

/// frontend → orders: TCP 8080, UDP 9000-9010, ping (v4 and v6). Nothing else.
const SHOP: &str = r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: shop
spec:
  identities:
    - name: frontend
      cidrs: ["10.200.1.2/32", "fd00:200:1::2/128"]
    - name: orders
      cidrs: ["10.200.2.2/32", "fd00:200:2::2/128"]
  rules:
    - name: frontend-to-orders
      from: frontend
      to: orders
      ports:
        - { port: 8080, protocol: TCP }
        - { port: 9000, endPort: 9010, protocol: UDP }
        - { protocol: ICMP }
        - { protocol: ICMPv6 }
"#;

/// The shared fixture, with this file's helpers.
type Env = AgentEnv;

impl Env {
    fn new(short: &str, policy: &str) -> Env {
        AgentEnv::start(
            &format!("tg{}-{short}", std::process::id() % 100_000),
            &format!("ns-{short}"),
            &["frontend", "orders"],
            TopologyOptions::default(),
            policy,
        )
    }

    fn write_policy(&self, name: &str, text: &str) -> PathBuf {
        self.write_file(name, text)
    }

    /// `tollgate policy apply -f`; returns (exit code, stderr).
    fn apply(&self, file: &Path) -> (i32, String) {
        let out = self
            .agent
            .cli(&["policy", "apply", "-f", file.to_str().unwrap()])
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `tollgate check` of TCP `from` -> `to`:8080, with `extra` arguments.
    fn check_tcp_8080(&self, from: &str, to: &str, extra: &[&str]) -> std::process::Output {
        let args = [
            &[
                "check",
                "--from",
                from,
                "--to",
                to,
                "--port",
                "8080",
                "--protocol",
                "tcp",
            ][..],
            extra,
        ]
        .concat();
        self.agent.cli(&args).unwrap()
    }
}

/// Does a TCP connection from frontend to orders' IPv4 address on `port` echo?
fn frontend_reaches_orders(env: &Env, port: u16) -> bool {
    tcp_reachable(env.ns("frontend"), env.addr("orders", false), port)
}

fn serve_tcp(env: &Env, workload: &str, v6: bool, ports: &[u16]) {
    for &p in ports {
        tcp_echo_server(env.ns(workload), env.addr(workload, v6), p, 64).expect("tcp server");
    }
}

fn serve_udp(env: &Env, workload: &str, v6: bool, ports: &[u16]) {
    for &p in ports {
        udp_echo_server(env.ns(workload), env.addr(workload, v6), p, 64).expect("udp server");
    }
}

fn tcp_allowed_only_on_its_port(v6: bool) {
    let env = Env::new(if v6 { "tcp6" } else { "tcp4" }, SHOP);
    serve_tcp(&env, "orders", v6, &[8080, 8081]);
    serve_tcp(&env, "frontend", v6, &[8080]);
    let orders = env.addr("orders", v6);
    let frontend = env.addr("frontend", v6);
    assert!(
        tcp_reachable(env.ns("frontend"), orders, 8080),
        "allowed port"
    );
    assert!(
        !tcp_reachable(env.ns("frontend"), orders, 8081),
        "other port"
    );
    assert!(
        !tcp_reachable(env.ns("orders"), frontend, 8080),
        "reverse direction"
    );
}

fn udp_allowed_only_on_its_ports(v6: bool) {
    let env = Env::new(if v6 { "udp6" } else { "udp4" }, SHOP);
    serve_udp(&env, "orders", v6, &[9000, 9010, 9011]);
    serve_udp(&env, "frontend", v6, &[9000]);
    let orders = env.addr("orders", v6);
    let frontend = env.addr("frontend", v6);
    assert!(
        udp_reachable(env.ns("frontend"), orders, 9000).unwrap(),
        "range start"
    );
    assert!(
        udp_reachable(env.ns("frontend"), orders, 9010).unwrap(),
        "range end"
    );
    assert!(
        !udp_reachable(env.ns("frontend"), orders, 9011).unwrap(),
        "past the range"
    );
    assert!(
        !udp_reachable(env.ns("orders"), frontend, 9000).unwrap(),
        "reverse direction"
    );
}

#[test]
fn tcp_is_allowed_on_the_allowed_port_only_ipv4() {
    tcp_allowed_only_on_its_port(false);
}

#[test]
fn tcp_is_allowed_on_the_allowed_port_only_ipv6() {
    tcp_allowed_only_on_its_port(true);
}

#[test]
fn udp_is_allowed_on_the_allowed_ports_only_ipv4() {
    udp_allowed_only_on_its_ports(false);
}

#[test]
fn udp_is_allowed_on_the_allowed_ports_only_ipv6() {
    udp_allowed_only_on_its_ports(true);
}

#[test]
fn ping_passes_by_rule_only() {
    let env = Env::new("ping", SHOP);
    for v6 in [false, true] {
        let orders = env.addr("orders", v6);
        let frontend = env.addr("frontend", v6);
        assert!(
            ping(env.ns("frontend"), orders).unwrap(),
            "ping allowed (v6={v6})"
        );
        assert!(
            !ping(env.ns("orders"), frontend).unwrap(),
            "ping denied (v6={v6})"
        );
    }
}

#[test]
fn removing_a_rule_stops_an_established_tcp_connection() {
    let env = Env::new("revoke", SHOP);
    serve_tcp(&env, "orders", false, &[8080]);
    let mut conn = tcp_connect(env.ns("frontend"), env.addr("orders", false), 8080).unwrap();
    assert!(
        echo_roundtrip(&mut conn, b"before"),
        "connection works before the change"
    );
    let without = env.write_policy(
        "without.yaml",
        &SHOP.replace("        - { port: 8080, protocol: TCP }\n", ""),
    );
    let (code, err) = env.apply(&without);
    assert_eq!(code, 0, "apply failed: {err}");
    assert!(
        !echo_roundtrip(&mut conn, b"after"),
        "established connection still passes data"
    );
    assert!(env.verdict_count("deny_revoked") >= 1);
}

#[test]
fn an_expired_rule_stops_traffic() {
    let env = Env::new("expiry", SHOP);
    // The expiring policy goes in once the agent is up (its start takes seconds on a loaded
    // machine): whole seconds in RFC 3339, 3 s from now, long enough to start a connection.
    let expires = SystemTime::now() + Duration::from_secs(3);
    let policy = SHOP.replace(
        "      from: frontend\n",
        &format!(
            "      from: frontend\n      expires: \"{}\"\n",
            humantime::format_rfc3339_seconds(expires)
        ),
    );
    let file = env.write_policy("expiring.yaml", &policy);
    assert_eq!(env.apply(&file).0, 0);
    serve_tcp(&env, "orders", false, &[8080]);
    let orders = env.addr("orders", false);
    let mut conn = tcp_connect(env.ns("frontend"), orders, 8080).unwrap();
    assert!(echo_roundtrip(&mut conn, b"before"), "works before expiry");
    let deadline = Instant::now() + Duration::from_secs(10);
    while SystemTime::now() < expires + Duration::from_millis(100) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !echo_roundtrip(&mut conn, b"after"),
        "established flow outlived its grant"
    );
    assert!(
        !tcp_reachable(env.ns("frontend"), orders, 8080),
        "new flow after expiry"
    );
}

#[test]
fn an_invalid_policy_is_rejected_and_the_previous_one_keeps_enforcing() {
    let env = Env::new("invalid", SHOP);
    serve_tcp(&env, "orders", false, &[8080, 8081]);
    let bad = env.write_policy("bad.yaml", &SHOP.replace("to: orders", "to: ordrs"));
    let (code, err) = env.apply(&bad);
    assert_eq!(code, 1, "invalid policy must fail");
    assert!(
        err.contains("bad.yaml:") && err.contains("unknown identity \"ordrs\""),
        "message: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    let orders = env.addr("orders", false);
    assert!(
        tcp_reachable(env.ns("frontend"), orders, 8080),
        "old rule still allows"
    );
    assert!(
        !tcp_reachable(env.ns("frontend"), orders, 8081),
        "old policy still denies"
    );
    let got = env.agent.cli(&["policy", "get"]).unwrap();
    assert!(String::from_utf8_lossy(&got.stdout).contains("generation 1"));
}

#[test]
fn audit_mode_passes_traffic_and_counts_would_deny() {
    let env = Env::new("audit", &SHOP.replace("spec:\n", "spec:\n  mode: audit\n"));
    serve_tcp(&env, "orders", false, &[8081]);
    let before = env.verdict_count("audit_would_deny");
    assert!(frontend_reaches_orders(&env, 8081));
    assert!(env.verdict_count("audit_would_deny") > before);
}

#[test]
fn two_agents_enforce_their_own_policies_side_by_side() {
    let a = Env::new("twoa", SHOP);
    let b = Env::new("twob", &SHOP.replace("port: 8080", "port: 8081"));
    serve_tcp(&a, "orders", false, &[8080, 8081]);
    serve_tcp(&b, "orders", false, &[8080, 8081]);
    assert!(frontend_reaches_orders(&a, 8080));
    assert!(!frontend_reaches_orders(&a, 8081));
    assert!(frontend_reaches_orders(&b, 8081));
    assert!(!frontend_reaches_orders(&b, 8080));
}

#[test]
fn check_names_the_deciding_rule_and_exits_3_on_deny() {
    let env = Env::new("check", SHOP);
    let allow = env.check_tcp_8080("10.200.1.2", "10.200.2.2", &[]);
    assert_eq!(allow.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&allow.stdout).contains("frontend-to-orders"));
    let deny = env.check_tcp_8080("10.200.2.2", "10.200.1.2", &[]);
    assert_eq!(deny.status.code(), Some(3));
    let out = String::from_utf8_lossy(&deny.stdout);
    assert!(
        out.contains("default-deny") && out.contains("orders") && out.contains("frontend"),
        "{out}"
    );
}

#[test]
fn the_datapath_keeps_enforcing_while_the_agent_is_down_and_a_restart_adopts_it() {
    let mut env = Env::new("restart", SHOP);
    serve_tcp(&env, "orders", false, &[8080, 8081]);
    let orders = env.addr("orders", false);
    let mut conn = tcp_connect(env.ns("frontend"), orders, 8080).unwrap();
    env.agent.stop().unwrap();
    assert!(
        echo_roundtrip(&mut conn, b"agent down"),
        "established flow survives the stop"
    );
    assert!(
        tcp_reachable(env.ns("frontend"), orders, 8080),
        "allowed while down"
    );
    assert!(
        !tcp_reachable(env.ns("frontend"), orders, 8081),
        "denied while down"
    );
    let policy = env.dir.path().join("policy.yaml");
    env.agent.spawn(&env.topo.node, "tg-*", &policy).unwrap();
    let status = env.status_json();
    let attachments = status["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 4, "two interfaces, two directions");
    assert!(attachments.iter().all(|a| a["adopted"] == true), "{status}");
    assert!(
        echo_roundtrip(&mut conn, b"after restart"),
        "established flow survives restart"
    );
    assert!(!tcp_reachable(env.ns("frontend"), orders, 8081));
}

#[test]
fn uninstall_detaches_everything() {
    let mut env = Env::new("uninstall", SHOP);
    serve_tcp(&env, "orders", false, &[8081]);
    let orders = env.addr("orders", false);
    assert!(!tcp_reachable(env.ns("frontend"), orders, 8081));
    env.agent.stop().unwrap();
    env.agent.uninstall().unwrap();
    assert!(!env.agent.bpffs.exists(), "pin directory removed");
    assert!(
        tcp_reachable(env.ns("frontend"), orders, 8081),
        "nothing enforces any more"
    );
}

#[test]
fn the_control_socket_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = Env::new("socket", SHOP);
    let mode = std::fs::metadata(&env.agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Runs the `tollgate` binary inside the node namespace with a deadline; returns (exit code,
/// stderr).
fn run_bounded(env: &Env, args: &[&str]) -> (i32, String) {
    let mut child = env
        .topo
        .node
        .command_inside(BINARY)
        .unwrap()
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate {args:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_agent_on_the_same_pin_directory_is_refused() {
    let env = Env::new("second", SHOP);
    let socket = env.dir.path().join("second.sock");
    let policy = env.dir.path().join("policy.yaml");
    let (code, err) = run_bounded(
        &env,
        &[
            "agent",
            "--interfaces",
            "tg-*",
            "--policy",
            policy.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--bpffs",
            env.agent.bpffs.to_str().unwrap(),
            "--state-dir",
            env.dir.path().join("second-state").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "second agent must fail: {err}");
    let pid = env.agent.pid().unwrap();
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(!socket.exists(), "the refused agent left its socket file");
    // The first agent is untouched and still enforcing.
    serve_tcp(&env, "orders", false, &[8080, 8081]);
    assert!(frontend_reaches_orders(&env, 8080));
    assert!(!frontend_reaches_orders(&env, 8081));
    assert_eq!(env.status_json()["generation"], 1);
}

#[test]
fn uninstall_is_refused_while_an_agent_runs() {
    let env = Env::new("uninst-held", SHOP);
    let (code, err) = run_bounded(
        &env,
        &[
            "agent",
            "--uninstall",
            "--bpffs",
            env.agent.bpffs.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("pid {}", env.agent.pid().unwrap())),
        "{err}"
    );
    serve_tcp(&env, "orders", false, &[8081]);
    assert!(
        !tcp_reachable(env.ns("frontend"), env.addr("orders", false), 8081),
        "enforcement must survive a refused uninstall"
    );
    let status = env.status_json();
    assert_eq!(status["attachments"].as_array().unwrap().len(), 4);
}

#[test]
fn events_of_a_generation_the_agent_does_not_know_are_not_given_its_names() {
    let mut env = Env::new("evnames", SHOP);
    env.agent.stop().unwrap();
    // Denied while no agent runs: the events wait in the ring buffer, numbered by generation 1.
    assert!(!tcp_reachable(
        env.ns("orders"),
        env.addr("frontend", false),
        8080
    ));
    // The restarted agent numbers identities the other way round (orders first).
    let swapped = SHOP.replace(
        "    - name: frontend\n      cidrs: [\"10.200.1.2/32\", \"fd00:200:1::2/128\"]\n    - name: orders\n      cidrs: [\"10.200.2.2/32\", \"fd00:200:2::2/128\"]\n",
        "    - name: orders\n      cidrs: [\"10.200.2.2/32\", \"fd00:200:2::2/128\"]\n    - name: frontend\n      cidrs: [\"10.200.1.2/32\", \"fd00:200:1::2/128\"]\n",
    );
    assert_ne!(swapped, SHOP);
    let policy = env.write_policy("policy.yaml", &swapped);
    env.agent.spawn(&env.topo.node, "tg-*", &policy).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let log = env.agent.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("tollgate::flow") && l.contains("10.200.2.2 -> 10.200.1.2"))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no event logged:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(line.contains("not known to this agent"), "{line}");
    assert!(
        !line.contains("(orders -> frontend)") && !line.contains("(frontend -> orders)"),
        "an old event was named with the new numbering: {line}"
    );
    // Events of the live generation are named.
    assert!(!tcp_reachable(
        env.ns("orders"),
        env.addr("frontend", false),
        8081
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env
        .agent
        .log_text()
        .lines()
        .any(|l| l.contains("port 8081") && l.contains("(orders -> frontend) by default-deny"))
    {
        assert!(Instant::now() < deadline, "{}", env.agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn check_answers_what_the_kernel_would_for_mapped_and_mixed_addresses() {
    let env = Env::new("check-fam", SHOP);
    let check = |from: &str, to: &str| env.check_tcp_8080(from, to, &[]);
    // ::ffff:10.200.1.2 is an IPv6 source on the wire: not frontend, so world, so denied.
    let mapped = check("::ffff:10.200.1.2", "fd00:200:2::2");
    assert_eq!(mapped.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&mapped.stdout).contains("(world)"));
    let mixed = check("10.200.1.2", "fd00:200:2::2");
    assert_eq!(mixed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("different address families"));
}

#[test]
fn check_with_an_interface_validates_the_source_as_the_datapath_does() {
    let env = Env::new("check-if", SHOP);
    let check = |interface: &str| {
        env.check_tcp_8080("10.200.1.2", "10.200.2.2", &["--interface", interface])
    };
    let home = check("tg-frontend");
    assert_eq!(home.status.code(), Some(0), "{:?}", home);
    let elsewhere = check("tg-orders");
    assert_eq!(elsewhere.status.code(), Some(3));
    let out = String::from_utf8_lossy(&elsewhere.stdout);
    assert!(
        out.contains("spoofed source") && out.contains("source validation"),
        "{out}"
    );
    let unknown = check("eth9");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not enforced"));
}

#[test]
fn a_link_removed_behind_the_agents_back_is_attached_again() {
    let env = Env::new("relink", SHOP);
    let links = env.agent.bpffs.join("links");
    let pin = std::fs::read_dir(&links)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_string_lossy().contains("tg-frontend") && p.to_string_lossy().ends_with("ingress")
        })
        .expect("tg-frontend ingress link pin");
    // Unpinning drops the last reference: the kernel detaches the program.
    std::fs::remove_file(&pin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = env.status_json();
        if status["links_restored"].as_u64() >= Some(1) && pin.exists() {
            break;
        }
        assert!(Instant::now() < deadline, "link not restored: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.agent.log_text().contains("attached again"));
    // The new pin is a live link on tg-frontend (pin name: ifname@ifindex@direction).
    let ifindex: u32 = pin
        .file_name()
        .unwrap()
        .to_string_lossy()
        .split('@')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        tollgate_agent::loader::link_attached_to(&pin),
        Some(ifindex)
    );
    let text = env.agent.cli(&["status"]).unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("1 restored"));
}

/// The control socket of an agent that cannot have more than 1,024 descriptors, with 1,100
/// idle connections open on it: `status` still answers within 2 s, and the agent does not
/// flood its log with accept errors. The connection cap alone would keep it far from 1,024,
/// so the running agent's limit is then lowered to 16 above what it holds: accept really
/// runs out of descriptors (EMFILE) and must recover.
#[test]
fn status_answers_with_1100_idle_connections_at_a_1024_descriptor_limit() {
    support::require_root();
    const IDLE: usize = 1_100;
    // This test process holds the idle connections itself.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        assert!(rl.rlim_max as usize > IDLE + 200, "hard fd limit too low");
        rl.rlim_cur = rl.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
    let prefix = format!("tg{}-fdlimit", std::process::id() % 100_000);
    let topo = Topology::new(&prefix, &["frontend", "orders"]).expect("topology");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, SHOP).unwrap();
    let agent = AgentProcess::start_with_nofile_limit(
        Path::new(BINARY),
        &topo.node,
        "tg-*",
        &policy,
        dir.path(),
        &support::test_pin_dir("ns-fdlimit"),
        Some(1024),
    )
    .expect("agent starts");
    let pid = agent.pid().unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let tight = libc::rlimit {
        rlim_cur: open + 16,
        rlim_max: open + 16,
    };
    // SAFETY: prlimit on our own child's pid with a valid rlimit; no old value requested.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &tight,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle = runtime.block_on(async {
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            let conn = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::UnixStream::connect(&agent.socket),
            )
            .await
            .expect("connect within 5 s")
            .expect("connect");
            idle.push(conn);
        }
        idle
    });
    let status = agent.cli(&["--timeout", "2s", "status"]).unwrap();
    assert!(
        status.status.success(),
        "status with {IDLE} idle connections: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    drop(idle);
    let log = agent.log_text();
    assert!(
        log.contains("accept on the control socket failed"),
        "the agent never ran out of descriptors; the test did not test EMFILE:\n{log}"
    );
    let accept_warnings = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("accept on the control socket failed"))
        .count();
    assert!(
        accept_warnings <= 10,
        "{accept_warnings} accept warnings logged"
    );
}

#[test]
fn an_l3_device_matching_the_interfaces_is_left_alone_with_a_warning() {
    support::require_root();
    let prefix = format!("tg{}-l3dev", std::process::id() % 100_000);
    let topo = Topology::new(&prefix, &["frontend", "orders"]).expect("topology");
    // A tun device, no Ethernet header: the classifiers would misread every packet on it.
    topo.node
        .exec_checked(&["ip", "tuntap", "add", "dev", "tg-tun0", "mode", "tun"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, SHOP).unwrap();
    let agent = AgentProcess::start(
        Path::new(BINARY),
        &topo.node,
        "tg-*",
        &policy,
        dir.path(),
        &support::test_pin_dir("ns-l3dev"),
    )
    .expect("agent starts");
    let out = agent.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["interface"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"tg-tun0"), "{names:?}");
    assert_eq!(names.len(), 4, "both veths, both directions: {names:?}");
    assert!(agent.log_text().contains("without Ethernet framing"));
}

/// frontend → orders: TCP 8080 (no limit) and the login port 2222, 3 new connections a minute.
const LOGIN: &str = r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: login
spec:
  identities:
    - name: frontend
      cidrs: ["10.200.1.2/32", "fd00:200:1::2/128"]
    - name: orders
      cidrs: ["10.200.2.2/32", "fd00:200:2::2/128"]
  rules:
    - name: frontend-to-orders
      from: frontend
      to: orders
      ports: [{ port: 8080, protocol: TCP }]
    - name: login
      from: frontend
      to: orders
      ports: [{ port: 2222, protocol: TCP }]
      rateLimit: { connectionsPerMinute: 3 }
"#;

/// How many of `attempts` connections from frontend to orders:`port` (IPv4) echo.
fn connections(env: &Env, port: u16, attempts: usize) -> usize {
    (0..attempts)
        .filter(|_| tcp_reachable(env.ns("frontend"), env.addr("orders", false), port))
        .count()
}

#[test]
fn status_counts_refused_connections_per_limit_and_check_names_the_limit() {
    let env = Env::new("rl-status", LOGIN);
    serve_tcp(&env, "orders", false, &[8080, 2222]);
    assert_eq!(
        connections(&env, 2222, 5),
        3,
        "the burst of 3, then refused"
    );
    assert_eq!(
        connections(&env, 8080, 5),
        5,
        "the unlimited rule is not slowed"
    );
    let status = env.status_json();
    let limits = status["limits"].as_array().expect("limits in status");
    assert_eq!(limits.len(), 1, "{status}");
    assert_eq!(limits[0]["owner"], "rule login");
    assert_eq!(limits[0]["mode"], "enforce");
    // Two refused attempts, each a SYN and its retries within the probe's timeout.
    assert!(
        limits[0]["refused_connections"].as_u64().unwrap() >= 2,
        "{status}"
    );
    let verdicts = status["verdicts"].as_array().unwrap();
    let limited = verdicts
        .iter()
        .find(|v| v[0] == "drop_rate_limited")
        .unwrap();
    assert!(limited[1].as_u64().unwrap() >= 2);
    let text = String::from_utf8_lossy(&env.agent.cli(&["status"]).unwrap().stdout).into_owned();
    assert!(text.contains("rule login"), "{text}");

    let out = env
        .agent
        .cli(&[
            "check",
            "--from",
            "10.200.1.2",
            "--to",
            "10.200.2.2",
            "--port",
            "2222",
            "--protocol",
            "tcp",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rate limit: rule login meters new connections and packets")
            && text.contains("3 connections/min (burst 3)"),
        "{text}"
    );
    let out = env.check_tcp_8080("10.200.1.2", "10.200.2.2", &[]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("rate limit"),
        "no limit on 8080"
    );
    // The agent logged the refusals, naming the limit.
    let log = env.agent.log_text();
    assert!(
        log.contains("drop_rate_limited") && log.contains("the connections limit of rule login"),
        "{log}"
    );
}

#[test]
fn a_restarted_agent_keeps_the_buckets_no_fresh_burst() {
    let mut env = Env::new("rl-restart", LOGIN);
    serve_tcp(&env, "orders", false, &[2222]);
    assert_eq!(connections(&env, 2222, 4), 3);
    env.agent.stop().unwrap();
    // While the agent is down the kernel keeps limiting.
    assert_eq!(
        connections(&env, 2222, 1),
        0,
        "limited while the agent is down"
    );
    let policy = env.dir.path().join("policy.yaml");
    env.agent.spawn(&env.topo.node, "tg-*", &policy).unwrap();
    env.status_json();
    assert_eq!(
        connections(&env, 2222, 2),
        0,
        "the restarted agent applied the same limit: its bucket, not a fresh one"
    );
    // A changed limit starts full.
    let changed = env.write_policy(
        "changed.yaml",
        &LOGIN.replace("connectionsPerMinute: 3", "connectionsPerMinute: 2"),
    );
    assert_eq!(env.apply(&changed).0, 0);
    assert_eq!(connections(&env, 2222, 3), 2);
}
