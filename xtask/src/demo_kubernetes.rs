//! `cargo xtask demo --kubernetes`: the demo's story with identities chosen by selectors. A
//! fake API server (the testbed's, speaking the real list/watch protocol) serves labelled pods
//! and a `Policy` object; the agent runs with `--kubernetes` and follows them. The reader sees
//! pods become identities by their labels, a label change move a pod and cut its open flow, an
//! invalid Policy object skipped with its reason, and enforcement holding while the API server
//! is away. Everything is removed on exit or Ctrl-C.

use std::{
    net::{IpAddr, TcpListener},
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use tollgate_testbed::{
    kubeapi::{self, FakeApiServer},
    traffic::{echo_roundtrip, tcp_connect, tcp_echo_server},
    AgentProcess, Topology,
};

use crate::{
    build_agent_binary,
    demo::{
        drive, grant_expires, login_attempts, print_header, spoof_attempt, Flow, Probe, RemoveDir,
    },
    interrupt::{self, check_interrupted},
};

const NODE: &str = "demo-node";
const GRANT_TTL: Duration = Duration::from_secs(20);

/// Workload, namespace, pod name, labels, service account.
type DemoPod = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

const PODS: [DemoPod; 4] = [
    (
        "frontend",
        "shop",
        "frontend-7f9c4",
        &[("app", "frontend")],
        "frontend",
    ),
    (
        "orders",
        "shop",
        "orders-5d8b2",
        &[("app", "orders")],
        "orders",
    ),
    (
        "payments",
        "shop",
        "payments-6c4a1",
        &[("app", "payments")],
        "payments",
    ),
    (
        "intruder",
        "sandbox",
        "debug-tools-1",
        &[("app", "debug-tools")],
        "default",
    ),
];

fn pod(topo: &Topology, i: usize, labels: &[(&str, &str)]) -> Value {
    let (w, ns, name, _, sa) = PODS[i];
    let w = topo.workload(w);
    kubeapi::pod(
        ns,
        name,
        labels,
        sa,
        NODE,
        &[&w.v4.to_string(), &w.v6.to_string()],
        "Running",
        false,
    )
}

fn policy(expires: SystemTime) -> Value {
    let shop = |app: &str| json!({"namespace": "shop", "matchLabels": {"app": app}, "serviceAccount": app});
    kubeapi::policy(
        "shop",
        json!({
            "identities": [
                {"name": "frontend", "selector": shop("frontend")},
                {"name": "orders", "selector": shop("orders")},
                {"name": "payments", "selector": shop("payments")},
                {"name": "sandbox", "selector": {"namespace": "sandbox"}}
            ],
            "rules": [
                {"name": "frontend-to-orders", "from": "frontend", "to": "orders",
                 "ports": [{"port": 8080, "protocol": "TCP"}, {"protocol": "ICMP"}, {"protocol": "ICMPv6"}]},
                {"name": "orders-login", "from": "frontend", "to": "orders",
                 "ports": [{"port": 2222, "protocol": "TCP"}], "rateLimit": {"connectionsPerMinute": 5}},
                {"name": "orders-to-payments", "from": "orders", "to": "payments",
                 "ports": [{"port": 9090, "protocol": "TCP"}]},
                {"name": "oncall-debug-grant", "from": "frontend", "to": "payments",
                 "expires": humantime::format_rfc3339_seconds(expires).to_string(),
                 "ports": [{"port": 9090, "protocol": "TCP"}]}
            ]
        }),
    )
}

fn kube_status(agent: &AgentProcess) -> Result<Value> {
    let out = agent.cli(&["status", "--json"])?;
    let status: Value = serde_json::from_slice(&out.stdout).context("tollgate status --json")?;
    Ok(status["kubernetes"].clone())
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        check_interrupted()?;
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{what} did not happen within {limit:?}")
}

fn print_status(agent: &AgentProcess) -> Result<()> {
    let status = agent.cli(&["status"])?;
    let text = String::from_utf8_lossy(&status.stdout);
    let mut in_section = false;
    for line in text.lines() {
        if line.starts_with("policy ") {
            println!("    {line}");
        }
        if line.starts_with("kubernetes") {
            in_section = true;
        } else if !line.starts_with("  ") {
            in_section = false;
        }
        if in_section {
            println!("    {line}");
        }
    }
    Ok(())
}

pub fn run() -> Result<()> {
    interrupt::catch_ctrl_c();
    let binary = build_agent_binary()?;
    let prefix = format!("tgkdemo{}", std::process::id() % 100_000);
    println!("\n== Tollgate demo: Kubernetes mode ==");
    println!("A node namespace ({prefix}-node) with four pods behind tg-* veths, and a fake API server in it.");
    let topo = Topology::new(&prefix, &["frontend", "orders", "payments", "intruder"])?;
    let listener = topo.node.run(|| TcpListener::bind("127.0.0.1:0"))??;
    let api = FakeApiServer::start(listener)?;
    api.apply(kubeapi::namespace("shop", &[("team", "shop")]))?;
    api.apply(kubeapi::namespace("sandbox", &[]))?;
    println!("\n  $ kubectl get pods -A -o wide --show-labels   (as the fake API server has them)");
    println!(
        "  {:<9} {:<16} {:<12} {:<16} LABELS / SERVICE ACCOUNT",
        "NAMESPACE", "NAME", "IP", "IPv6"
    );
    for (i, (w, ns, name, labels, sa)) in PODS.iter().enumerate() {
        api.apply(pod(&topo, i, labels))?;
        let wl = topo.workload(w);
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  {ns:<9} {name:<16} {:<12} {:<16} {} / sa {sa}",
            wl.v4,
            wl.v6,
            labels.join(",")
        );
    }
    let expires = SystemTime::now() + GRANT_TTL;
    let shop = policy(expires);
    api.apply(shop.clone())?;
    // An object with a mistake: skipped whole, with its reason, the rest enforced.
    api.apply(kubeapi::policy(
        "typo",
        json!({"rules": [{"name": "orders-to-db", "from": "orders", "to": "databse",
                          "ports": [{"port": 5432, "protocol": "TCP"}]}]}),
    ))?;
    println!("\nPolicy objects (tollgate.dev/v1alpha1): `shop` selects identities by namespace, label and service account:\n");
    for line in serde_yaml_like(&shop["spec"]).lines() {
        println!("    {line}");
    }
    println!("  and `typo`, whose rule names an identity that does not exist.");

    for (w, port) in [
        ("orders", 8080),
        ("orders", 2222),
        ("payments", 9090),
        ("frontend", 8080),
    ] {
        let wl = topo.workload(w);
        for addr in [IpAddr::V4(wl.v4), IpAddr::V6(wl.v6)] {
            tcp_echo_server(&wl.ns, addr, port, 1000)?;
        }
    }
    let workdir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&workdir)?;
    let _workdir_guard = RemoveDir(workdir.clone());
    let kubeconfig = workdir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    println!("\nStarting `tollgate agent --kubernetes --kubeconfig ... --node-name {NODE} --interfaces 'tg-*'`...");
    let bpffs = Path::new("/sys/fs/bpf").join(&prefix);
    let agent = AgentProcess::start_with_args(
        &binary,
        &topo.node,
        "tg-*",
        &workdir.join("no-policy-file"),
        &workdir,
        &bpffs,
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--node-name",
            NODE,
        ],
    )?;
    wait_until("the sync", Duration::from_secs(20), || {
        Ok(kube_status(&agent)?["synced"] == true)
    })?;
    println!("\n  $ tollgate status   (Kubernetes part)");
    print_status(&agent)?;

    let flows = [
        ("frontend", "payments", 9090),
        ("frontend", "orders", 8080),
        ("orders", "payments", 9090),
        ("orders", "frontend", 8080),
        ("intruder", "payments", 9090),
        ("intruder", "orders", 8080),
    ];
    println!("\nDriving real traffic between the pods:\n");
    print_header();
    for (from, to, port) in flows {
        check_interrupted()?;
        for v6 in [false, true] {
            drive(
                &topo,
                &agent,
                &Flow {
                    from,
                    to,
                    v6,
                    probe: Probe::Tcp(port),
                },
            )?;
        }
    }
    drive(
        &topo,
        &agent,
        &Flow {
            from: "frontend",
            to: "orders",
            v6: false,
            probe: Probe::Ping,
        },
    )?;
    spoof_attempt(&topo, &agent)?;
    login_attempts(&topo, &agent)?;

    println!("\nA label change moves a pod: orders holds an open connection to payments, then");
    println!("  $ kubectl label pod -n shop payments-6c4a1 app=quarantine --overwrite\n");
    let orders = topo.workload("orders");
    let payments = topo.workload("payments");
    let mut open = tcp_connect(&orders.ns, IpAddr::V4(payments.v4), 9090)?;
    println!(
        "  open connection orders -> payments: echo {}",
        if echo_roundtrip(&mut open, b"hello") {
            "ok"
        } else {
            "FAILED"
        }
    );
    api.apply(pod(&topo, 2, &[("app", "quarantine")]))?;
    wait_until("the relabel", Duration::from_secs(10), || {
        Ok(kube_status(&agent)?["flows_revoked"].as_u64().unwrap_or(0) > 0)
    })?;
    println!(
        "  the same connection after the relabel: echo {}",
        if echo_roundtrip(&mut open, b"again") {
            "ok (UNEXPECTED)"
        } else {
            "no answer: its flow was revoked"
        }
    );
    print_header();
    drive(
        &topo,
        &agent,
        &Flow {
            from: "orders",
            to: "payments",
            v6: false,
            probe: Probe::Tcp(9090),
        },
    )?;
    api.apply(pod(&topo, 2, PODS[2].3))?;

    println!(
        "\nThe API server goes away. The agent keeps enforcing what it last knew (never allow):\n"
    );
    api.set_unavailable(true);
    wait_until("the outage is noticed", Duration::from_secs(20), || {
        Ok(kube_status(&agent)?["connected"] == false)
    })?;
    print_status(&agent)?;
    println!();
    print_header();
    for (from, to, port) in [("orders", "payments", 9090), ("intruder", "orders", 8080)] {
        drive(
            &topo,
            &agent,
            &Flow {
                from,
                to,
                v6: false,
                probe: Probe::Tcp(port),
            },
        )?;
    }
    api.set_unavailable(false);
    wait_until("reconnection", Duration::from_secs(20), || {
        Ok(kube_status(&agent)?["connected"] == true)
    })?;
    println!("\nThe API server is back; the watches resumed.");

    grant_expires(&topo, &agent, expires)?;

    println!(
        "\nCleaning up: stopping the agent, removing its pins, the namespaces and the API server."
    );
    drop(agent);
    drop(api);
    drop(topo);
    println!("Done.");
    Ok(())
}

/// A compact YAML-like rendering of a JSON value for the reader (flow style for short maps).
fn serde_yaml_like(v: &Value) -> String {
    fn render(v: &Value, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        Value::Array(items) => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            for item in items {
                                out.push_str(&format!("{pad}  - {item}\n"));
                            }
                        }
                        Value::Object(_) => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            render(v, indent + 2, out);
                        }
                        _ => out.push_str(&format!("{pad}{k}: {v}\n")),
                    }
                }
            }
            other => out.push_str(&format!("{pad}{other}\n")),
        }
    }
    let mut out = String::new();
    render(v, 0, &mut out);
    out
}
