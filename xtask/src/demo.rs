//! `cargo xtask demo`: a node namespace with four workloads (frontend, orders, payments,
//! intruder), a real agent enforcing the embedded policy on their `tg-*` veths, real traffic,
//! and a table of what was allowed or denied and why. Everything created is removed on exit or
//! Ctrl-C (namespaces by name, the agent by pid, pins by directory).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use tollgate_testbed::{
    traffic::{ping, tcp_connect_from, tcp_echo_server, tcp_reachable},
    AgentProcess, Topology,
};

use crate::{
    build_agent_binary,
    interrupt::{self, check_interrupted},
};

const POLICY_TEMPLATE: &str = include_str!("demo-policy.yaml");
/// How long the just-in-time grant lives once the demo starts.
const GRANT_TTL: Duration = Duration::from_secs(20);

/// Sleeps up to `d`, waking early on Ctrl-C.
pub(crate) fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub(crate) enum Probe {
    Tcp(u16),
    Ping,
}

pub(crate) struct Flow {
    pub from: &'static str,
    pub to: &'static str,
    pub v6: bool,
    pub probe: Probe,
}

pub fn run() -> Result<()> {
    interrupt::catch_ctrl_c();
    let binary = build_agent_binary()?;

    let prefix = format!("tgdemo{}", std::process::id() % 100_000);
    println!("\n== Tollgate demo ==");
    println!("Building a node namespace ({prefix}-node) with four workloads behind tg-* veths...");
    let topo = Topology::new(&prefix, &["frontend", "orders", "payments", "intruder"])?;
    for w in &topo.workloads {
        println!(
            "  {:<9} {:<12} {:<16} node side: {}",
            w.name, w.v4, w.v6, w.host_if
        );
    }
    check_interrupted()?;

    let workdir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&workdir)?;
    let _workdir_guard = RemoveDir(workdir.clone());
    let expires = SystemTime::now() + GRANT_TTL;
    let policy_text = POLICY_TEMPLATE.replace(
        "GRANT_EXPIRES",
        &humantime::format_rfc3339_seconds(expires).to_string(),
    );
    let policy = workdir.join("policy.yaml");
    std::fs::write(&policy, &policy_text)?;

    for (w, port) in [
        ("orders", 8080),
        ("orders", 2222),
        ("orders", 5432),
        ("payments", 9090),
        ("frontend", 8080),
    ] {
        let wl = topo.workload(w);
        for addr in [IpAddr::V4(wl.v4), IpAddr::V6(wl.v6)] {
            tcp_echo_server(&wl.ns, addr, port, 1000)?;
        }
    }

    println!("\nStarting `tollgate agent --interfaces 'tg-*'` in the node namespace...");
    let bpffs = Path::new("/sys/fs/bpf").join(&prefix);
    let audit_log = workdir.join("audit.jsonl");
    let mut agent = AgentProcess::start_with_args(
        &binary,
        &topo.node,
        "tg-*",
        &policy,
        &workdir,
        &bpffs,
        &[
            "--audit-log",
            &audit_log.display().to_string(),
            "--audit-checkpoint-interval",
            "5s",
        ],
    )?;
    println!(
        "Policy (embedded, the grant expires in {} s):\n",
        GRANT_TTL.as_secs()
    );
    for line in policy_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        println!("    {line}");
    }

    let flows = [
        Flow {
            from: "frontend",
            to: "payments",
            v6: false,
            probe: Probe::Tcp(9090),
        },
        Flow {
            from: "frontend",
            to: "orders",
            v6: false,
            probe: Probe::Tcp(8080),
        },
        Flow {
            from: "frontend",
            to: "orders",
            v6: true,
            probe: Probe::Tcp(8080),
        },
        Flow {
            from: "frontend",
            to: "orders",
            v6: false,
            probe: Probe::Ping,
        },
        Flow {
            from: "frontend",
            to: "orders",
            v6: false,
            probe: Probe::Tcp(5432),
        },
        Flow {
            from: "orders",
            to: "payments",
            v6: false,
            probe: Probe::Tcp(9090),
        },
        Flow {
            from: "orders",
            to: "payments",
            v6: true,
            probe: Probe::Tcp(9090),
        },
        Flow {
            from: "orders",
            to: "frontend",
            v6: false,
            probe: Probe::Tcp(8080),
        },
        Flow {
            from: "intruder",
            to: "payments",
            v6: false,
            probe: Probe::Tcp(9090),
        },
        Flow {
            from: "intruder",
            to: "orders",
            v6: true,
            probe: Probe::Tcp(8080),
        },
        Flow {
            from: "intruder",
            to: "orders",
            v6: false,
            probe: Probe::Ping,
        },
    ];
    println!("\nDriving real traffic (TCP connect + echo, ping):\n");
    print_header();
    for f in &flows {
        check_interrupted()?;
        drive(&topo, &agent, f)?;
    }

    spoof_attempt(&topo, &agent)?;
    login_attempts(&topo, &agent)?;

    grant_expires(&topo, &agent, expires)?;

    println!("\n`tollgate status`:\n");
    let status = agent.cli(&["status"])?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    println!("\nDecisions the kernel reported (`tollgate flows --denied`):\n");
    // Events reach the agent within 100 ms; give the last ones that long.
    pause(Duration::from_millis(300))?;
    let flows = agent.cli(&["flows", "--denied"])?;
    for line in String::from_utf8_lossy(&flows.stdout).lines().take(24) {
        println!("  {line}");
    }
    println!("\nThe flow inventory (`tollgate flows --inventory`): every edge seen, denied ones marked:\n");
    let inventory = agent.cli(&["flows", "--inventory"])?;
    for line in String::from_utf8_lossy(&inventory.stdout).lines().take(24) {
        println!("  {line}");
    }
    println!("\nStopping the agent (the datapath keeps enforcing) and verifying its audit log:\n");
    agent.stop()?;
    let audit = std::fs::read_to_string(&audit_log).unwrap_or_default();
    if let Some(first_deny) = audit.lines().find(|l| l.contains("\"deny_default\"")) {
        println!("  one record: {first_deny}\n");
    }
    let verify = std::process::Command::new(&binary)
        .args(["audit", "verify"])
        .arg(&audit_log)
        .output()?;
    println!(
        "  $ tollgate audit verify {}\n  {}{}",
        audit_log.display(),
        String::from_utf8_lossy(&verify.stdout).trim(),
        String::from_utf8_lossy(&verify.stderr).trim()
    );
    println!("\nCleaning up: stopping the agent, removing its pins and the namespaces.");
    drop(agent);
    drop(topo);
    crate::demo_auth::run(&binary, &workdir)?;
    println!("Done.");
    Ok(())
}

/// Waits for oncall-debug-grant (frontend -> payments tcp/9090), which expires at `expires`,
/// to lapse, and shows the kernel refusing it.
pub(crate) fn grant_expires(
    topo: &Topology,
    agent: &AgentProcess,
    expires: SystemTime,
) -> Result<()> {
    let wait = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(1);
    println!(
        "\nWaiting {} s for oncall-debug-grant to expire (the kernel enforces the expiry itself)...\n",
        wait.as_secs()
    );
    pause(wait)?;
    print_header();
    drive(
        topo,
        agent,
        &Flow {
            from: "frontend",
            to: "payments",
            v6: false,
            probe: Probe::Tcp(9090),
        },
    )?;
    Ok(())
}

/// The intruder puts frontend's address on its own interface and connects to orders:8080,
/// which frontend may reach. Source validation drops it at tg-intruder.
pub(crate) fn spoof_attempt(topo: &Topology, agent: &AgentProcess) -> Result<()> {
    let intruder = topo.workload("intruder");
    let frontend = topo.workload("frontend");
    let orders = topo.workload("orders");
    println!(
        "\nThe intruder takes frontend's address ({}) and connects to orders tcp/8080 as frontend:\n",
        frontend.v4
    );
    print_header();
    intruder.add_address(IpAddr::V4(frontend.v4), 32)?;
    let before = verdict_count(agent, "drop_spoofed")?;
    let passed = tcp_connect_from(
        &intruder.ns,
        SocketAddr::new(IpAddr::V4(frontend.v4), 0),
        SocketAddr::new(IpAddr::V4(orders.v4), 8080),
    )
    .is_ok();
    let dropped = verdict_count(agent, "drop_spoofed")? - before;
    let why = check_tcp(
        agent,
        frontend.v4.into(),
        orders.v4.into(),
        8080,
        &["--interface", &intruder.host_if],
    )?;
    let why = first_line(&why)
        .rsplit(": ")
        .next()
        .unwrap_or("")
        .to_owned();
    println!(
        "  {:<40} {:<8} {why} on {} ({dropped} SYNs counted drop_spoofed)",
        "intruder as frontend -> orders tcp/8080",
        if passed { "allowed" } else { "DENIED" },
        intruder.host_if,
    );
    Ok(())
}

/// Frontend tries orders' login port (tcp/2222) eight times in a row; its rule allows 5 new
/// connections a minute, so the kernel refuses the last three SYNs.
pub(crate) fn login_attempts(topo: &Topology, agent: &AgentProcess) -> Result<()> {
    let frontend = topo.workload("frontend");
    let orders = topo.workload("orders");
    println!(
        "\nfrontend tries orders' login port tcp/2222 eight times in a row (rule orders-login: \
         5 new connections a minute):\n"
    );
    let out = check_tcp(agent, frontend.v4.into(), orders.v4.into(), 2222, &[])?;
    for line in out.lines() {
        println!("  tollgate check: {}", line.trim());
    }
    println!();
    let before = verdict_count(agent, "drop_rate_limited")?;
    for attempt in 1..=8 {
        check_interrupted()?;
        let passed = tcp_reachable(&frontend.ns, IpAddr::V4(orders.v4), 2222);
        println!(
            "  attempt {attempt}: {}",
            if passed {
                "connected"
            } else {
                "REFUSED (SYN dropped by the rate limit; no conntrack entry)"
            }
        );
    }
    let refused = verdict_count(agent, "drop_rate_limited")? - before;
    println!("  ({refused} SYNs counted drop_rate_limited, client retries included)");
    Ok(())
}

/// `tollgate check` of TCP `from` -> `to`:`port` with `extra` arguments: its output.
fn check_tcp(
    agent: &AgentProcess,
    from: IpAddr,
    to: IpAddr,
    port: u16,
    extra: &[&str],
) -> Result<String> {
    let (from, to, port) = (from.to_string(), to.to_string(), port.to_string());
    let mut args = vec![
        "check",
        "--from",
        &from,
        "--to",
        &to,
        "--port",
        &port,
        "--protocol",
        "tcp",
    ];
    args.extend_from_slice(extra);
    let out = agent.cli(&args).context("tollgate check")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first line of a command's output, trimmed (`check` adds one line per rate limit).
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}

fn verdict_count(agent: &AgentProcess, verdict: &str) -> Result<u64> {
    let out = agent.cli(&["status", "--json"])?;
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("tollgate status --json")?;
    status["verdicts"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v[0] == verdict))
        .and_then(|v| v[1].as_u64())
        .with_context(|| format!("no verdict {verdict} in status"))
}

pub(crate) fn print_header() {
    println!("  {:<40} {:<8} WHY (tollgate check)", "FLOW", "RESULT");
}

pub(crate) fn drive(topo: &Topology, agent: &AgentProcess, f: &Flow) -> Result<()> {
    let from = topo.workload(f.from);
    let to = topo.workload(f.to);
    let (src, dst): (IpAddr, IpAddr) = if f.v6 {
        (from.v6.into(), to.v6.into())
    } else {
        (from.v4.into(), to.v4.into())
    };
    let (label, passed, check_args) = match f.probe {
        Probe::Tcp(port) => (
            format!(
                "{} -> {} tcp/{port}{}",
                f.from,
                f.to,
                if f.v6 { " (v6)" } else { "" }
            ),
            tcp_reachable(&from.ns, dst, port),
            vec![
                "--port".to_string(),
                port.to_string(),
                "--protocol".into(),
                "tcp".into(),
            ],
        ),
        Probe::Ping => (
            format!(
                "{} -> {} ping{}",
                f.from,
                f.to,
                if f.v6 { " (v6)" } else { "" }
            ),
            ping(&from.ns, dst)?,
            vec![
                "--protocol".to_string(),
                if f.v6 { "icmpv6" } else { "icmp" }.to_string(),
            ],
        ),
    };
    let mut args = vec![
        "check".to_string(),
        "--from".into(),
        src.to_string(),
        "--to".into(),
        dst.to_string(),
    ];
    args.extend(check_args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent.cli(&args).context("tollgate check")?;
    let why = String::from_utf8_lossy(&out.stdout);
    let why = first_line(&why);
    let why = why.rsplit(": ").next().unwrap_or(why);
    println!(
        "  {label:<40} {:<8} {why}",
        if passed { "allowed" } else { "DENIED" }
    );
    Ok(())
}

/// Removes the demo's scratch directory (socket, log, policy) by its exact path.
pub(crate) struct RemoveDir(pub std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
