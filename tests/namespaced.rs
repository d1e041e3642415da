//! Real traffic through real agents. Each test builds its own node namespace with workload
//! namespaces behind veth pairs (`tg-<workload>` on the node side), starts `tollgate agent`
//! inside the node namespace with its own socket and pin directory, and drives TCP, UDP and
//! ICMP between workloads. Needs root; fails (never skips) without it.

mod support;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use tollgate_testbed::{
    traffic::{
        echo_roundtrip, ping, tcp_connect, tcp_echo_server, tcp_reachable, udp_echo_server,
        udp_reachable,
    },
    AgentProcess, Topology,
};

const BINARY: &str = env!("CARGO_BIN_EXE_tollgate");

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

/// A topology, an agent enforcing on its `tg-*` interfaces, and a scratch directory. Fields drop
/// in order: the agent stops and uninstalls first, then namespaces go, then files.
struct Env {
    agent: AgentProcess,
    topo: Topology,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(short: &str, policy: &str) -> Env {
        support::require_root();
        let prefix = format!("tg{}-{short}", std::process::id() % 100_000);
        let topo = Topology::new(&prefix, &["frontend", "orders"]).expect("topology");
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        let bpffs = support::test_pin_dir(&format!("ns-{short}"));
        let agent = AgentProcess::start(
            Path::new(BINARY),
            &topo.node,
            "tg-*",
            &policy_path,
            dir.path(),
            &bpffs,
        )
        .expect("agent starts");
        Env { agent, topo, dir }
    }

    fn addr(&self, workload: &str, v6: bool) -> IpAddr {
        let w = self.topo.workload(workload);
        if v6 {
            IpAddr::V6(w.v6)
        } else {
            IpAddr::V4(w.v4)
        }
    }

    fn ns(&self, workload: &str) -> &tollgate_testbed::NetNs {
        &self.topo.workload(workload).ns
    }

    fn write_policy(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
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

    fn status_json(&self) -> serde_json::Value {
        let out = self.agent.cli(&["status", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn verdict_count(&self, name: &str) -> u64 {
        let s = self.status_json();
        s["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v[0] == name)
            .map(|v| v[1].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no verdict {name}"))
    }
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
    // Whole seconds in RFC 3339: expire 3 s from now, long enough to start a connection.
    let expires = SystemTime::now() + Duration::from_secs(3);
    let policy = SHOP.replace(
        "      from: frontend\n",
        &format!(
            "      from: frontend\n      expires: \"{}\"\n",
            humantime::format_rfc3339_seconds(expires)
        ),
    );
    let env = Env::new("expiry", &policy);
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
    assert!(tcp_reachable(
        env.ns("frontend"),
        env.addr("orders", false),
        8081
    ));
    assert!(env.verdict_count("audit_would_deny") > before);
}

#[test]
fn two_agents_enforce_their_own_policies_side_by_side() {
    let a = Env::new("twoa", SHOP);
    let b = Env::new("twob", &SHOP.replace("port: 8080", "port: 8081"));
    serve_tcp(&a, "orders", false, &[8080, 8081]);
    serve_tcp(&b, "orders", false, &[8080, 8081]);
    assert!(tcp_reachable(
        a.ns("frontend"),
        a.addr("orders", false),
        8080
    ));
    assert!(!tcp_reachable(
        a.ns("frontend"),
        a.addr("orders", false),
        8081
    ));
    assert!(tcp_reachable(
        b.ns("frontend"),
        b.addr("orders", false),
        8081
    ));
    assert!(!tcp_reachable(
        b.ns("frontend"),
        b.addr("orders", false),
        8080
    ));
}

#[test]
fn check_names_the_deciding_rule_and_exits_3_on_deny() {
    let env = Env::new("check", SHOP);
    let allow = env
        .agent
        .cli(&[
            "check",
            "--from",
            "10.200.1.2",
            "--to",
            "10.200.2.2",
            "--port",
            "8080",
            "--protocol",
            "tcp",
        ])
        .unwrap();
    assert_eq!(allow.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&allow.stdout).contains("frontend-to-orders"));
    let deny = env
        .agent
        .cli(&[
            "check",
            "--from",
            "10.200.2.2",
            "--to",
            "10.200.1.2",
            "--port",
            "8080",
            "--protocol",
            "tcp",
        ])
        .unwrap();
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
