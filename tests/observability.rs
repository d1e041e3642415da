//! Seeing every decision, with real agents and real traffic: the audit log, `tollgate flows`
//! and its inventory, the Prometheus metrics (scraped by a real Prometheus server), `status`
//! with a full conntrack map, and a deny flood the agent cannot keep up with. Needs root; fails
//! (never skips) without it.

mod support;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::env::{AgentEnv, BINARY};
use tollgate_agent::datapath::Datapath;
use tollgate_common::{flow::v4_mapped, FlowKey, FlowValue};
use tollgate_testbed::{
    prometheus::{http_get, promtool_check_metrics, PrometheusServer},
    traffic::{tcp_echo_server, tcp_reachable},
    TopologyOptions,
};

/// The two workloads' identities and `rules`, as a policy named `name`.
fn policy(name: &str, rules: &str) -> String {
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: {name}
spec:
  identities:
    - name: frontend
      cidrs: ["10.200.1.2/32", "fd00:200:1::2/128"]
    - name: orders
      cidrs: ["10.200.2.2/32", "fd00:200:2::2/128"]
  rules:
{rules}"#
    )
}

/// frontend → orders: 8080 allowed and logged, 2222 allowed at two connections a minute, and
/// an audit-mode rule on 8081 that makes the rest of the pair's traffic would-denies. Nothing
/// from orders to frontend: default deny.
fn observed_policy() -> String {
    policy(
        "observed",
        r#"    - name: web
      from: frontend
      to: orders
      log: true
      ports:
        - { port: 8080, protocol: TCP }
    - name: login
      from: frontend
      to: orders
      ports:
        - { port: 2222, protocol: TCP }
      rateLimit: { connectionsPerMinute: 2 }
    - name: reports-trial
      from: frontend
      to: orders
      mode: audit
      ports:
        - { port: 8081, protocol: TCP }
"#,
    )
}

/// Deny-only but for frontend → orders TCP 8080: every UDP packet is denied.
fn deny_policy() -> String {
    policy(
        "deny",
        r#"    - name: web
      from: frontend
      to: orders
      ports:
        - { port: 8080, protocol: TCP }
"#,
    )
}

fn env(short: &str, policy: &str, extra: &[&str]) -> AgentEnv {
    AgentEnv::start_with_args(
        &format!("tg{}-{short}", std::process::id() % 100_000),
        &format!("obs-{short}"),
        &["frontend", "orders"],
        TopologyOptions::default(),
        policy,
        extra,
    )
}

fn cli_json_lines(env: &AgentEnv, args: &[&str]) -> Vec<Value> {
    let out = env.agent.cli(args).unwrap();
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls `tollgate flows ... -o json` (bounded) until `done` holds for its records.
fn wait_for_flows(env: &AgentEnv, args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = cli_json_lines(env, args);
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "flows {args:?} never got there; last answer: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn has(records: &[Value], verdict: &str, rule: &str, dport: u64) -> bool {
    records
        .iter()
        .any(|r| r["verdict"] == verdict && r["rule"] == rule && r["dport"] == dport)
}

fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `tollgate audit verify` of `files`; (exit code, stdout, stderr).
fn verify(files: &[&Path], extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BINARY)
        .args(["audit", "verify"])
        .args(files)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn allowed_denied_audited_and_limited_traffic_is_logged_listed_and_counted() {
    let mut env = env(
        "decide",
        &observed_policy(),
        &[
            "--audit-log",
            "{dir}/audit.log",
            "--audit-checkpoint-interval",
            "1s",
        ],
    );
    let audit_log = env.dir.path().join("audit.log");
    let orders = env.addr("orders", false);
    let frontend = env.addr("frontend", false);
    for port in [8080, 8081, 9999, 2222] {
        tcp_echo_server(env.ns("orders"), orders, port, 64).unwrap();
    }
    tcp_echo_server(env.ns("frontend"), frontend, 7000, 64).unwrap();

    assert!(tcp_reachable(env.ns("frontend"), orders, 8080), "web");
    assert!(
        tcp_reachable(env.ns("frontend"), orders, 9999),
        "audited: passes"
    );
    assert!(
        !tcp_reachable(env.ns("orders"), frontend, 7000),
        "default deny"
    );
    let logins: Vec<bool> = (0..5)
        .map(|_| tcp_reachable(env.ns("frontend"), orders, 2222))
        .collect();
    assert_eq!(
        logins.iter().filter(|ok| **ok).count(),
        2,
        "two logins a minute: {logins:?}"
    );

    // `flows --denied` explains each deny and would-deny: rule, or default-deny, and limit.
    let denied = wait_for_flows(&env, &["flows", "--denied", "-o", "json"], |r| {
        has(r, "deny_default", "default-deny", 7000)
            && has(r, "audit_would_deny", "reports-trial", 9999)
            && r.iter().any(|x| x["verdict"] == "drop_rate_limited")
    });
    assert!(
        denied.iter().all(|r| r["outcome"] != "allow"),
        "{denied:#?}"
    );
    let d = denied
        .iter()
        .find(|r| r["verdict"] == "deny_default")
        .unwrap();
    assert_eq!(
        (d["from_identity"].as_str(), d["to_identity"].as_str()),
        (Some("orders"), Some("frontend"))
    );
    let limited = denied
        .iter()
        .find(|r| r["verdict"] == "drop_rate_limited")
        .unwrap();
    assert_eq!(limited["rule"], "login");
    assert!(
        limited["limit"]
            .as_str()
            .unwrap()
            .starts_with("connections limit of rule login"),
        "{limited}"
    );
    // The logged rule's new flow is listed too, but not under --denied.
    let all = wait_for_flows(&env, &["flows", "-o", "json"], |r| {
        has(r, "allow_new", "web", 8080)
    });
    assert!(!has(&denied, "allow_new", "web", 8080));
    assert!(all.iter().all(|r| r["seq"].as_u64().unwrap() > 0));
    // Text output names them as well.
    let text = env.agent.cli(&["flows", "--denied"]).unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("default-deny") && text.contains("reports-trial"),
        "{text}"
    );
    // Filters: by identity, and an unknown one is an error.
    let by_identity = cli_json_lines(&env, &["flows", "--identity", "orders", "-o", "json"]);
    assert!(!by_identity.is_empty());
    let nosuch = env
        .agent
        .cli(&["flows", "--identity", "nosuch", "-o", "json"])
        .unwrap();
    assert_eq!(nosuch.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nosuch.stderr).contains("no identity named \"nosuch\""));

    // `--follow` prints a new decision as it happens.
    let mut follower = Command::new(BINARY)
        .arg("--socket")
        .arg(&env.agent.socket)
        .args(["flows", "--follow", "--denied", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // A new edge (another port), so its first decision is not summed into an earlier one.
    assert!(!tcp_reachable(env.ns("orders"), frontend, 7001));
    let deadline = Instant::now() + Duration::from_secs(10);
    let followed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("--follow printed the new deny in time");
        let record: Value = serde_json::from_str(&line).unwrap();
        if record["dport"] == 7001 {
            break record;
        }
    };
    assert_eq!(followed["rule"], "default-deny");
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(follower.id() as i32, libc::SIGTERM) };
    follower.wait().unwrap();
    reader.join().unwrap();

    // The counters agree.
    assert!(env.verdict_count("deny_default") >= 1);
    assert!(env.verdict_count("audit_would_deny") >= 1);
    assert!(env.verdict_count("drop_rate_limited") >= 3);
    assert!(env.verdict_count("allow_new") >= 3, "web and two logins");

    // The inventory: one edge per (from, to, port, protocol, verdict), the denied and audited
    // ones marked in text.
    let inventory = cli_json_lines(&env, &["flows", "--inventory", "-o", "json"]);
    let edge = |verdict: &str, port: u64| {
        inventory
            .iter()
            .find(|e| e["verdict"] == verdict && e["port"] == port)
            .unwrap_or_else(|| panic!("no {verdict} edge on {port}: {inventory:#?}"))
    };
    assert_eq!(edge("deny_default", 7000)["outcome"], "deny");
    assert_eq!(edge("audit_would_deny", 9999)["outcome"], "audit");
    assert_eq!(edge("allow_new", 8080)["rule"], "web");
    assert!(edge("drop_rate_limited", 2222)["count"].as_u64().unwrap() >= 3);
    let text = env.agent.cli(&["flows", "--inventory"]).unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("would be denied if enforced"), "{text}");

    // Control actions: a policy the agent refuses and one it applies are both recorded.
    let refused = tokio::runtime::Runtime::new().unwrap().block_on(
        tollgate_agent::client::Client::new(&env.agent.socket, Duration::from_secs(10))
            .put_text::<Value>(tollgate_agent::wire::PATH_POLICY, "not: [a policy".into()),
    );
    assert!(refused.is_err(), "{refused:?}");
    let second = observed_policy().replace("connectionsPerMinute: 2", "connectionsPerMinute: 3");
    let second_path = env.write_file("second.yaml", &second);
    let out = env
        .agent
        .cli(&["policy", "apply", "-f", second_path.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stop: the audit log closes with a stop record and a checkpoint.
    env.agent.stop().unwrap();
    let records = audit_records(&audit_log);
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"agent_start"), "{kinds:?}");
    assert_eq!(&kinds[kinds.len() - 2..], ["agent_stop", "checkpoint"]);
    let applied = records
        .iter()
        .find(|r| r["type"] == "policy_applied")
        .unwrap();
    assert_eq!(applied["policy"], "observed");
    assert_eq!(applied["generation"], 1);
    assert_eq!(
        applied["digest"],
        format!("sha256:{}", sha256_hex(&observed_policy())),
        "the digest of the policy text as applied"
    );
    let rejected = records
        .iter()
        .find(|r| r["type"] == "policy_rejected")
        .expect("a policy_rejected record");
    assert_eq!(
        rejected["digest"],
        format!("sha256:{}", sha256_hex("not: [a policy"))
    );
    assert!(rejected["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let reapplied = records
        .iter()
        .find(|r| r["type"] == "policy_applied" && r["generation"] == 2)
        .expect("the second policy's record");
    assert_eq!(reapplied["source"], "api");
    assert_eq!(
        reapplied["digest"],
        format!("sha256:{}", sha256_hex(&second))
    );
    let decision = |verdict: &str, rule: &str| {
        records
            .iter()
            .find(|r| r["type"] == "decision" && r["verdict"] == verdict && r["rule"] == rule)
            .unwrap_or_else(|| panic!("no {verdict} record by {rule}"))
    };
    let deny = decision("deny_default", "default-deny");
    assert_eq!(deny["src"], frontend.to_string().replace("1.2", "2.2"));
    assert_eq!(deny["dst"], frontend.to_string());
    assert_eq!(deny["dport"], 7000);
    assert_eq!(deny["protocol"], "tcp");
    assert_eq!(deny["generation"], 1);
    assert!(deny["node"].as_str().is_some_and(|n| !n.is_empty()));
    decision("audit_would_deny", "reports-trial");
    decision("drop_rate_limited", "login");
    decision("allow_new", "web");
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // The log verifies, also against its last checkpoint; an edit does not.
    let last = records.last().unwrap();
    let checkpoint = format!(
        "{}:{}",
        last["head_seq"].as_u64().unwrap(),
        last["head"].as_str().unwrap()
    );
    let (code, out, err) = verify(&[&audit_log], &["--checkpoint", &checkpoint]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");
    let tampered = env.dir.path().join("tampered.log");
    let text = std::fs::read_to_string(&audit_log).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("\"default-deny\""))
        .unwrap();
    std::fs::write(
        &tampered,
        text.replacen("\"default-deny\"", "\"default-allow\"", 1),
    )
    .unwrap();
    let (code, _, err) = verify(&[&tampered], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("line {}", line + 1)), "{err}");

    // A restart keeps the inventory and continues the chain.
    let policy = env.dir.path().join("policy.yaml");
    env.agent
        .spawn(&env.topo.node, "tg-*", &policy)
        .expect("restart");
    let after = cli_json_lines(&env, &["flows", "--inventory", "-o", "json"]);
    assert!(
        after
            .iter()
            .any(|e| e["verdict"] == "deny_default" && e["port"] == 7000),
        "the inventory survives a restart: {after:#?}"
    );
    env.agent.stop().unwrap();
    let (code, out, err) = verify(&[&audit_log], &["--checkpoint", &checkpoint]);
    assert_eq!(code, 0, "{out}{err}");
    let kinds: Vec<String> = audit_records(&audit_log)
        .iter()
        .map(|r| r["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "agent_start").count(),
        2,
        "{kinds:?}"
    );

    // A log removed while no agent runs: the next agent says so in the new chain.
    let last_seq = audit_records(&audit_log).last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    std::fs::remove_file(&audit_log).unwrap();
    env.agent
        .spawn(&env.topo.node, "tg-*", &policy)
        .expect("restart");
    env.agent.stop().unwrap();
    let records = audit_records(&audit_log);
    let missing = records
        .iter()
        .find(|r| r["type"] == "history_missing")
        .unwrap_or_else(|| panic!("no history_missing record: {records:#?}"));
    assert_eq!(missing["remembered_seq"], last_seq);
    assert_eq!(missing["found_seq"], 0);
}

/// A metric's value in an exposition, by name and label subset.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_the_exposition_lints_clean() {
    let env = env(
        "prom",
        &observed_policy(),
        &[
            "--metrics-addr",
            "127.0.0.1:9464",
            "--audit-log",
            "{dir}/audit.log",
            "--audit-checkpoint-interval",
            "1s",
        ],
    );
    let frontend = env.addr("frontend", false);
    tcp_echo_server(env.ns("frontend"), frontend, 7000, 64).unwrap();
    for _ in 0..3 {
        assert!(!tcp_reachable(env.ns("orders"), frontend, 7000));
    }
    let denies = env.verdict_count("deny_default");
    let workdir = env.dir.path().join("prometheus");
    std::fs::create_dir_all(&workdir).unwrap();
    let agent_addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    // Prometheus, the scrapes and the queries all run in the node namespace, where the agent
    // listens.
    let (exposition, health, ready, samples) = env
        .topo
        .node
        .run(move || {
            let prom = PrometheusServer::start(&workdir, &[agent_addr], Duration::from_secs(1))
                .expect("prometheus starts");
            let samples = prom
                .wait_for(
                    "tollgate_verdicts_total{verdict=\"deny_default\"}",
                    Duration::from_secs(30),
                    |s| s.first().is_some_and(|s| s.value >= denies as f64),
                )
                .expect("prometheus has the verdict counter");
            let (code, exposition) =
                http_get(agent_addr, "/metrics", Duration::from_secs(5)).unwrap();
            assert_eq!(code, 200);
            let health = http_get(agent_addr, "/healthz", Duration::from_secs(5)).unwrap();
            let ready = http_get(agent_addr, "/readyz", Duration::from_secs(5)).unwrap();
            // 100 idle connections (more than the endpoint serves at once) do not keep a
            // scrape out: it takes the place of the oldest idle one.
            let idle: Vec<std::net::TcpStream> = (0..100)
                .filter_map(|_| std::net::TcpStream::connect(agent_addr).ok())
                .collect();
            assert!(idle.len() >= 32, "{} idle connections", idle.len());
            let (code, _) = http_get(agent_addr, "/metrics", Duration::from_secs(5))
                .expect("a scrape is served beside idle connections");
            assert_eq!(code, 200);
            drop(idle);
            (exposition, health, ready, samples)
        })
        .unwrap();
    assert_eq!(samples[0].labels["job"], "tollgate");
    promtool_check_metrics(&exposition).expect("promtool check metrics");
    // An agent in file mode exports nothing of Kubernetes mode.
    assert!(
        !exposition.contains("tollgate_kubernetes_"),
        "file mode exports Kubernetes metrics"
    );
    assert_eq!(health.0, 200, "{}", health.1);
    assert_eq!(ready.0, 200, "{}", ready.1);

    // What DESIGN.md asks for, named as documented.
    assert!(metric(
        &exposition,
        "tollgate_verdicts_total",
        &[("verdict", "deny_default")]
    )
    .is_some_and(|v| v >= denies as f64));
    assert!(metric(
        &exposition,
        "tollgate_drops_total",
        &[("reason", "deny_default")]
    )
    .is_some());
    assert!(metric(
        &exposition,
        "tollgate_rule_decisions_total",
        &[("rule", "default-deny"), ("verdict", "deny_default")]
    )
    .is_some_and(|v| v >= 1.0));
    assert_eq!(
        metric(
            &exposition,
            "tollgate_ratelimit_drops_total",
            &[
                ("owner", "rule"),
                ("name", "login"),
                ("kind", "connections")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&exposition, "tollgate_policy_generation", &[]),
        Some(1.0)
    );
    assert_eq!(metric(&exposition, "tollgate_policy_rules", &[]), Some(3.0));
    assert!(metric(
        &exposition,
        "tollgate_map_capacity",
        &[("map", "TG_CONNTRACK_V4")]
    )
    .is_some_and(|v| v > 0.0));
    assert!(metric(
        &exposition,
        "tollgate_map_entries",
        &[("map", "TG_CONNTRACK_V4")]
    )
    .is_some());
    assert!(metric(
        &exposition,
        "tollgate_map_entries",
        &[("map", "TG_RULES_EXACT")]
    )
    .is_some());
    assert_eq!(
        metric(&exposition, "tollgate_events_lost_total", &[]),
        Some(0.0)
    );
    assert!(metric(
        &exposition,
        "tollgate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))]
    )
    .is_some());
    assert!(metric(&exposition, "process_resident_memory_bytes", &[]).is_some());
    assert!(metric(&exposition, "tollgate_audit_head_seq", &[]).is_some_and(|v| v >= 1.0));
    assert_eq!(metric(&exposition, "tollgate_ready", &[]), Some(1.0));
    // Bounded labels: names, never addresses.
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        for addr in ["10.200.", "fd00:200:"] {
            assert!(!line.contains(addr), "an address in a label: {line}");
        }
    }
}

#[test]
fn status_answers_within_100ms_with_200k_conntrack_entries() {
    let env = env("ctfull", &deny_policy(), &["--conntrack-entries", "262144"]);
    // 200k entries written straight into the pinned IPv4 map (two per flow as the datapath
    // makes them; here each is a flow of its own).
    let mut datapath = Datapath::open_dir(&env.agent.bpffs).unwrap();
    let value = FlowValue {
        generation: 1,
        ..Default::default()
    };
    for i in 0..200_000u32 {
        let key = FlowKey {
            saddr: v4_mapped([10, 200, 0x80 | (i >> 16) as u8, (i >> 8) as u8]),
            daddr: v4_mapped([10, 200, 2, 2]),
            sport: (i as u16).to_be(),
            dport: 8080u16.to_be(),
            proto: 6,
            family: 4,
            _pad: [0; 2],
        };
        datapath.set_flow(&key, &value).unwrap();
    }
    // The count is refreshed every few seconds; wait (bounded) until it has seen them.
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.status_json()["conntrack_entries"].as_u64().unwrap() < 200_000 {
        assert!(Instant::now() < deadline, "the count never reached 200k");
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let status = env.status_json();
        times.push(start.elapsed());
        assert!(status["conntrack_entries"].as_u64().unwrap() >= 200_000);
    }
    eprintln!("status with 200k conntrack entries: {times:?} (CLI process included)");
    assert!(
        times.iter().all(|t| *t < Duration::from_millis(100)),
        "status took {times:?}"
    );
}

/// Sends `count` UDP datagrams from `ns` to `to` at about `per_second`, each to another
/// destination port (so each is an edge of its own for the sampler).
fn udp_flood(
    ns: &tollgate_testbed::NetNs,
    to: IpAddr,
    count: u32,
    per_second: u32,
    cpu: usize,
) -> u32 {
    ns.run(move || {
        // SAFETY: a cpu_set_t on the stack, filled by the libc macros; pins this thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let sock = UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).unwrap();
        let start = Instant::now();
        let mut sent = 0;
        for i in 0..count {
            let port = 10_000 + (i % 50_000) as u16;
            if sock.send_to(b"flood", (to, port)).is_ok() {
                sent += 1;
            }
            if i % 100 == 99 {
                let due = Duration::from_secs_f64(f64::from(i + 1) / f64::from(per_second));
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        sent
    })
    .unwrap()
}

/// Packets of the verdicts that put events on the ring buffer in this policy (no audit, no
/// logged rules), and what became of their events.
fn evented(status: &Value) -> (u64, u64) {
    let v = |name: &str| {
        status["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v[0] == name)
            .unwrap()[1]
            .as_u64()
            .unwrap()
    };
    let packets = v("deny_default")
        + v("deny_expired")
        + v("deny_revoked")
        + v("drop_spoofed")
        + v("drop_rate_limited");
    let fates = status["events_read"].as_u64().unwrap()
        + status["events_lost"].as_u64().unwrap()
        + status["events_suppressed"].as_u64().unwrap();
    (packets, fates)
}

#[test]
fn a_deny_flood_the_agent_cannot_keep_up_with_is_counted_exactly_and_the_chain_holds() {
    let mut env = env(
        "flood",
        &deny_policy(),
        &[
            "--metrics-addr",
            "127.0.0.1:9464",
            "--audit-log",
            "{dir}/audit.log",
            "--audit-checkpoint-interval",
            "1s",
        ],
    );
    let orders = env.addr("orders", false);
    let pid = env.agent.pid().unwrap() as i32;
    // Stopped, the agent reads nothing: the 1 MiB ring buffer (about 10,900 events) fills, and
    // the datapath counts what it could not put there.
    // SAFETY: signalling our own child by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Two senders, one per CPU, 8 s at 10k datagrams/s each: the sampler lets through at most
    // 1,000 events per CPU and second, about 16,000 here, and the ring holds about 10,900.
    let frontend = env.ns("frontend");
    let sent: u32 = std::thread::scope(|s| {
        let senders: Vec<_> = (0..2)
            .map(|cpu| s.spawn(move || udp_flood(frontend, orders, 80_000, 10_000, cpu)))
            .collect();
        senders.into_iter().map(|t| t.join().unwrap()).sum()
    });
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // Responsive at once, while it catches up.
    let start = Instant::now();
    let out = env
        .agent
        .cli(&["--timeout", "5s", "status", "--json"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("status right after the flood: {:?}", start.elapsed());
    // Quiet again: every event read; the kernel's counters and the agent's account agree.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let a = env.status_json();
        std::thread::sleep(Duration::from_millis(500));
        let b = env.status_json();
        if a["events_read"] == b["events_read"] && evented(&b).0 == evented(&b).1 {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {:?} {:?}",
            evented(&a),
            evented(&b)
        );
    };
    let (packets, fates) = evented(&status);
    let lost = status["events_lost"].as_u64().unwrap();
    eprintln!(
        "flood: {sent} sent, {packets} denied; events read {}, lost {lost}, suppressed {}",
        status["events_read"], status["events_suppressed"]
    );
    assert!(
        packets >= u64::from(sent),
        "every datagram denied and counted"
    );
    assert_eq!(packets, fates, "read + lost + suppressed = evented packets");
    assert!(
        lost > 0,
        "the ring buffer overflowed while the agent was stopped"
    );
    // The metrics say the same.
    let (_, exposition) = env
        .topo
        .node
        .run(|| {
            http_get(
                "127.0.0.1:9464".parse().unwrap(),
                "/metrics",
                Duration::from_secs(5),
            )
            .unwrap()
        })
        .unwrap();
    assert_eq!(
        metric(&exposition, "tollgate_events_lost_total", &[]),
        Some(lost as f64)
    );
    // The audit log stayed bounded and valid: aggregated per edge, a chain end to end.
    env.agent.stop().unwrap();
    let audit_log = env.dir.path().join("audit.log");
    let records = audit_records(&audit_log);
    let decisions = records.iter().filter(|r| r["type"] == "decision").count();
    assert!(
        (decisions as u64) < packets / 2,
        "{decisions} records for {packets} packets"
    );
    let (code, out, err) = verify(&[&audit_log], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // The loss is in the chain itself, not only in counters that restart with the agent.
    let recorded_lost: u64 = records
        .iter()
        .filter(|r| r["type"] == "records_lost")
        .map(|r| r["events_lost"].as_u64().unwrap())
        .sum();
    assert_eq!(
        recorded_lost, lost,
        "records_lost records account for every lost event"
    );
}

/// The alert rules shipped in deploy/prometheus lint clean and fire (and stay quiet) as their
/// unit tests say, on Prometheus's own rule engine.
#[test]
fn the_shipped_alert_rules_lint_and_pass_their_unit_tests() {
    support::require_root();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool is installed by `cargo xtask setup`");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
