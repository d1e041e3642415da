//! The demo's second part: mTLS identity binding between two nodes. Node A hosts `web` and
//! `rogue`, node B hosts `db`; each node has its own agent with the SVIDs of its workloads
//! (from `tollgate ca`), serving handshakes on its node address. The rules `web → db` and
//! `rogue → db` require `authentication: mtls`. Shown: the pair proven ahead of need, a
//! workload whose certificate comes from a forged CA refused, and a lapse when web's
//! certificate expires, cutting its open connection.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tollgate_testbed::{
    traffic::tcp_echo_server,
    two_nodes::{mtls_policy, DB_ID, NODE_A_V4, NODE_B_V4, ROGUE_ID, UPLINK, WEB_ID},
    AgentProcess, NetNs, TopologyOptions, TwoNodes,
};

use crate::{demo::pause, interrupt::check_interrupted};

const PORT: u16 = 5432;
const AUTH_PORT: u16 = 7443;

/// Runs `tollgate <args>`; its standard output whatever its exit status (`check` exits 3 for
/// a deny).
fn tollgate_output(binary: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(binary).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `tollgate <args>`; its standard output, or the error with its standard error.
fn tollgate(binary: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(binary).args(args).output()?;
    if !out.status.success() {
        bail!(
            "tollgate {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn run(binary: &Path, workdir: &Path) -> Result<()> {
    let prefix = format!("tgauth{}", std::process::id() % 100_000);
    println!("\n== Part 2: mTLS identity binding between two nodes ==");
    println!(
        "Node A ({NODE_A_V4}) hosts web and rogue, node B ({NODE_B_V4}) hosts db; each node has its own agent."
    );
    let nodes = TwoNodes::new(
        &prefix,
        &["web", "rogue"],
        &["db"],
        TopologyOptions::default(),
    )?;
    check_interrupted()?;

    let dir = workdir.join("auth");
    let ca = dir.join("ca");
    let (ca_s, a_s, b_s) = (
        ca.display().to_string(),
        dir.join("node-a").display().to_string(),
        dir.join("node-b").display().to_string(),
    );
    println!("\nA development CA and an SVID for each workload, on its node:\n");
    for args in [
        vec!["ca", "init", "--dir", &ca_s, "--trust-domain", "shop.test"],
        vec![
            "ca",
            "issue",
            "--dir",
            &ca_s,
            "--spiffe-id",
            WEB_ID,
            "--ttl",
            "1h",
            "--out",
            &format!("{a_s}/web"),
        ],
        vec![
            "ca",
            "issue",
            "--dir",
            &ca_s,
            "--spiffe-id",
            DB_ID,
            "--ttl",
            "1h",
            "--out",
            &format!("{b_s}/db"),
        ],
    ] {
        println!("  $ tollgate {}", args.join(" "));
        println!("    {}", tollgate(binary, &args)?);
    }
    // rogue's certificate comes from a CA of the same name with another key, delivered with
    // the real bundle, as a forger would.
    let forger = dir.join("forger").display().to_string();
    tollgate(
        binary,
        &[
            "ca",
            "init",
            "--dir",
            &forger,
            "--trust-domain",
            "shop.test",
        ],
    )?;
    let rogue_dir = format!("{a_s}/rogue");
    tollgate(
        binary,
        &[
            "ca",
            "issue",
            "--dir",
            &forger,
            "--spiffe-id",
            ROGUE_ID,
            "--out",
            &rogue_dir,
            "--layout",
            "spiffe-helper",
        ],
    )?;
    std::fs::copy(
        ca.join("ca.crt"),
        Path::new(&rogue_dir).join("svid_bundle.pem"),
    )?;
    println!("  (rogue's SVID is from a forged CA that copied the real one's name, filed with the real bundle)");

    let policy_path = dir.join("policy.yaml");
    std::fs::write(&policy_path, mtls_policy("demo-auth", PORT, AUTH_PORT))?;
    let start = |node: &str, ns: &NetNs, addr: &str, svids: &str| {
        AgentProcess::start_with_args(
            binary,
            ns,
            "tg-*",
            &policy_path,
            &dir.join(format!("agent-{node}")),
            &Path::new("/sys/fs/bpf").join(format!("{prefix}-{node}")),
            &[
                "--uplinks",
                UPLINK,
                "--svid-dir",
                svids,
                "--auth-addr",
                &format!("{addr}:{AUTH_PORT}"),
                "--node-name",
                &format!("node-{node}"),
            ],
        )
    };
    println!(
        "\nStarting an agent on each node: `tollgate agent --interfaces 'tg-*' --uplinks {UPLINK} --svid-dir DIR --auth-addr NODE:{AUTH_PORT}`"
    );
    let agent_b = start("b", &nodes.b.node, NODE_B_V4, &b_s)?;
    let agent_a = start("a", &nodes.a.node, NODE_A_V4, &a_s)?;
    let db = nodes.b.workload("db");
    tcp_echo_server(&db.ns, IpAddr::V4(db.v4), PORT, 100)?;
    tcp_echo_server(&db.ns, IpAddr::V6(db.v6), PORT, 100)?;

    // The pair web -> db is proven ahead of need: node A hosts web and knows db's node.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status(&agent_a)?.contains("proof web -> db") {
        if Instant::now() > deadline {
            bail!("web -> db was not authenticated:\n{}", agent_a.log_text());
        }
        pause(Duration::from_millis(200))?;
    }
    println!("\nBefore any traffic, the agents proved web -> db to each other (`tollgate status`, auth part):\n");
    for (node, agent) in [("A", &agent_a), ("B", &agent_b)] {
        println!("  node {node}:");
        for line in status(agent)?
            .lines()
            .skip_while(|l| !l.starts_with("auth"))
            .take_while(|l| l.starts_with("auth") || l.starts_with("  "))
        {
            println!("    {line}");
        }
    }

    println!("\nConnecting to db tcp/{PORT}:\n");
    let web = nodes.a.workload("web");
    let rogue = nodes.a.workload("rogue");
    let mut kept = None;
    for (who, ns, v6) in [
        ("web", &web.ns, false),
        ("web", &web.ns, true),
        ("rogue", &rogue.ns, false),
    ] {
        check_interrupted()?;
        let to = if v6 {
            IpAddr::V6(db.v6)
        } else {
            IpAddr::V4(db.v4)
        };
        let started = Instant::now();
        let stream = connect(ns, to, Duration::from_secs(3));
        let took = started.elapsed();
        let from = if who == "web" { web } else { rogue };
        let from_addr = if v6 {
            IpAddr::V6(from.v6)
        } else {
            IpAddr::V4(from.v4)
        };
        let check = tollgate_output(
            binary,
            &[
                "--socket",
                &agent_a.socket.display().to_string(),
                "check",
                "--from",
                &from_addr.to_string(),
                "--to",
                &to.to_string(),
                "--port",
                &PORT.to_string(),
                "--protocol",
                "tcp",
            ],
        )
        .unwrap_or_else(|e| e.to_string());
        let label = format!("{who} -> db tcp/{PORT}{}", if v6 { " (v6)" } else { "" });
        match stream {
            Ok(s) => {
                println!("  {label:<28} allowed in {took:.1?}");
                if who == "web" && !v6 {
                    kept = Some(s);
                }
            }
            Err(_) => println!("  {label:<28} DENIED (no connection in {took:.1?})"),
        }
        for line in check.lines().skip(1) {
            println!("  {:<28} {}", "", line.trim());
        }
    }
    for line in status(&agent_a)?
        .lines()
        .filter(|l| l.contains("PROBLEM") || l.contains("handshakes:"))
    {
        println!("  node A {}", line.trim());
    }
    println!(
        "  (node A will not present rogue's forged SVID: it does not chain to the trust bundle)"
    );

    println!("\nweb's certificate is replaced by one that expires in 6 s (`tollgate ca issue --ttl 6s`); its open connection keeps echoing until then:\n");
    tollgate(
        binary,
        &[
            "ca",
            "issue",
            "--dir",
            &ca_s,
            "--spiffe-id",
            WEB_ID,
            "--ttl",
            "6s",
            "--out",
            &format!("{a_s}/web"),
        ],
    )?;
    let mut stream = kept.context("web's connection")?;
    let started = Instant::now();
    let mut last_ok = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(15) {
        check_interrupted()?;
        if !roundtrip(&mut stream) {
            break;
        }
        last_ok = started.elapsed();
        pause(Duration::from_millis(250))?;
    }
    println!(
        "  the connection echoed for {:.1} s, then the kernel cut it (proof lapsed with the certificate)",
        last_ok.as_secs_f64()
    );
    let again = connect(&web.ns, IpAddr::V4(db.v4), Duration::from_secs(3)).is_ok();
    println!(
        "  a new connection from web: {}",
        if again {
            "allowed (unexpected)"
        } else {
            "DENIED: web has no valid certificate left"
        }
    );
    for line in status(&agent_a)?
        .lines()
        .filter(|l| l.contains("lapses") || l.contains("handshakes:"))
    {
        println!("  node A {}", line.trim());
    }
    println!("\nCleaning up part 2: both agents, their pins and the namespaces.");
    drop(agent_a);
    drop(agent_b);
    drop(nodes);
    Ok(())
}

fn status(agent: &AgentProcess) -> Result<String> {
    let out = agent.cli(&["status"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn connect(ns: &NetNs, to: IpAddr, timeout: Duration) -> Result<TcpStream> {
    let s = ns.run(move || TcpStream::connect_timeout(&SocketAddr::new(to, PORT), timeout))??;
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    s.set_write_timeout(Some(Duration::from_millis(1500)))?;
    Ok(s)
}

fn roundtrip(s: &mut TcpStream) -> bool {
    let msg = b"authenticated";
    let mut got = [0u8; 13];
    s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && &got == msg
}
