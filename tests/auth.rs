//! mTLS identity binding across two nodes: node A (workloads `web` and `rogue`) and node B
//! (workload `db`), each in its own namespace with its own agent, joined by a link as by the
//! cluster network. The agents hold the SVIDs of their workloads (made with the development
//! CA), serve handshakes on their node address and enforce `web → db` and `rogue → db` on TCP
//! 5432 with `authentication: mtls`. Real traffic, IPv4 and IPv6, default offloads.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use std::sync::{Arc, RwLock};

use serde_json::json;
use tollgate_agent::{
    auth::handshake::{initiate_from, ClientProof, HandshakeError},
    identity::{
        ca::DevCa, source::FileNames, SpiffeId, Svid, TrustBundle, TrustBundles, TrustDomain,
    },
};
use tollgate_testbed::{
    kubeapi::{self, FakeApiServer},
    spoof::{send_tcp, TcpSegment},
    traffic::{tcp_bulk_echo, tcp_connect_from, tcp_echo_server},
    two_nodes::{mtls_policy, DB_ID, NODE_A_V4, NODE_B_V4, ROGUE_ID, UPLINK, WEB_ID},
    AgentProcess, NetNs, TopologyOptions, TwoNodes,
};

use tollgate_testbed::prometheus::{http_get, promtool_check_metrics};

use crate::support::{env::BINARY, require_root, test_pin_dir};

const PORT: u16 = 5432;
const AUTH_PORT: u16 = 7443;
/// How long a test waits for something the agents do by themselves (a handshake, a reload).
const SETTLE: Duration = Duration::from_secs(10);

fn policy() -> String {
    mtls_policy("auth", PORT, AUTH_PORT)
}

/// The two nodes, their agents, the CA and the SVID directories. Fields drop in order: agents
/// stop (and uninstall) first, then the namespaces go, then the files.
struct AuthEnv {
    agent_a: Option<AgentProcess>,
    agent_b: Option<AgentProcess>,
    /// Kubernetes mode: the API server both agents watch (in node A's namespace).
    api: Option<FakeApiServer>,
    nodes: TwoNodes,
    ca: DevCa,
    dir: tempfile::TempDir,
    name: String,
    /// rogue's SVID from the forging CA: certificate and key PEM.
    forged: (String, String),
    /// web's SVID as first issued: certificate and key PEM.
    web: (String, String),
}

impl AuthEnv {
    /// Namespaces and SVIDs; no agent yet. `web` and `db` get good SVIDs (an hour); `rogue` one
    /// from another CA with the same name (delivered with the real bundle, as a forger would).
    fn new(name: &str) -> AuthEnv {
        require_root();
        let nodes = TwoNodes::new(
            &format!("au-{name}"),
            &["web", "rogue"],
            &["db"],
            TopologyOptions::default(),
        )
        .expect("two nodes");
        let dir = tempfile::tempdir().expect("tempdir");
        let td = TrustDomain::parse("shop.test").unwrap();
        let ca = DevCa::init(td.clone(), Duration::from_secs(3600)).expect("CA");
        let env = AuthEnv {
            agent_a: None,
            agent_b: None,
            api: None,
            nodes,
            ca,
            dir,
            name: name.to_owned(),
            forged: (String::new(), String::new()),
            web: (String::new(), String::new()),
        };
        let mut env = env;
        env.web = env.issue(
            "a/web",
            WEB_ID,
            Duration::from_secs(3600),
            &FileNames::CSI_SPIFFE,
        );
        env.issue(
            "b/db",
            DB_ID,
            Duration::from_secs(3600),
            &FileNames::CSI_SPIFFE,
        );
        // A CA of the same name and another key: its SVID must be refused, not be mistaken
        // for the real CA's.
        let forger = DevCa::init(td, Duration::from_secs(3600)).expect("forger CA");
        let mut forged = forger
            .issue(
                &SpiffeId::parse(ROGUE_ID).unwrap(),
                Duration::from_secs(3600),
            )
            .expect("forged SVID");
        forged.bundle_pem = env.ca.bundle_pem().to_owned();
        forged
            .write(&env.svid_dir("a").join("rogue"), &FileNames::SPIFFE_HELPER)
            .expect("write forged SVID");
        env.forged = (forged.cert_pem, forged.key_pem);
        env
    }

    /// A hostile client on node A's side presents rogue's forged certificate straight to node
    /// B's auth listener (node A's agent itself refuses to use it). Returns the client's error.
    fn present_forged_certificate(&self) -> HandshakeError {
        let (cert, key) = self.forged.clone();
        self.present(cert, key, ROGUE_ID, None)
            .expect_err("a forged certificate was accepted")
    }

    /// web's real certificate presented to node B's listener from 10.200.0.4, an address
    /// added to node A for it that is not web's node address: the client's error.
    fn present_web_from_elsewhere(&self) -> HandshakeError {
        tollgate_testbed::netns::ip(&[
            "-n",
            self.nodes.a.node.name(),
            "addr",
            "add",
            "10.200.0.4/24",
            "dev",
            UPLINK,
        ])
        .unwrap();
        let (cert, key) = self.web.clone();
        self.present(cert, key, WEB_ID, Some("10.200.0.4".parse().unwrap()))
            .expect_err("a copied certificate proved the pair from elsewhere")
    }

    /// A client on node A's side (from address `from`, if given) presents the SVID `cert`,
    /// `key` of `id` to node B's auth listener and asks for `id → db` proven.
    fn present(
        &self,
        cert: String,
        key: String,
        id: &str,
        from: Option<IpAddr>,
    ) -> Result<ClientProof, HandshakeError> {
        let bundle = self.ca.bundle_pem().to_owned();
        let id = id.to_owned();
        self.nodes
            .a
            .node
            .run(move || {
                let svid = Svid::from_pem(cert.as_bytes(), key.as_bytes()).expect("forged SVID");
                let td = TrustDomain::parse("shop.test").unwrap();
                let mut bundles = TrustBundles::new();
                bundles.add(TrustBundle::from_pem(td, bundle.as_bytes()).unwrap());
                let bundles = Arc::new(RwLock::new(bundles));
                let to: SocketAddr = format!("{NODE_B_V4}:{AUTH_PORT}").parse().unwrap();
                let (client, db) = (
                    SpiffeId::parse(&id).unwrap(),
                    SpiffeId::parse(DB_ID).unwrap(),
                );
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(initiate_from(
                        from,
                        to,
                        &svid,
                        &db,
                        (&client, &db),
                        "attacker",
                        bundles,
                        Duration::from_secs(5),
                    ))
            })
            .expect("run in node A")
    }

    fn svid_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node)
    }

    /// Issues an SVID for `id` into `<dir>/<at>`, replacing what is there; its certificate and
    /// key PEM.
    fn issue(&self, at: &str, id: &str, ttl: Duration, names: &FileNames) -> (String, String) {
        let issued = self
            .ca
            .issue(&SpiffeId::parse(id).unwrap(), ttl)
            .expect("issue SVID");
        issued
            .write(&self.dir.path().join(at), names)
            .expect("write SVID");
        (issued.cert_pem, issued.key_pem)
    }

    fn start_agent(&mut self, node: &str) {
        self.start_agent_with(node, &[]);
    }

    /// Starts node `node`'s agent with more arguments (`{dir}`: the scratch directory).
    fn start_agent_with(&mut self, node: &str, more: &[&str]) {
        let (ns, addr) = match node {
            "a" => (&self.nodes.a.node, NODE_A_V4),
            _ => (&self.nodes.b.node, NODE_B_V4),
        };
        let policy_path = self.dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy()).unwrap();
        let workdir = self.dir.path().join(format!("agent-{node}"));
        let svids = self.svid_dir(node).display().to_string();
        let listen = format!("{addr}:{AUTH_PORT}");
        let node_name = format!("node-{node}");
        let dir = self.dir.path().display().to_string();
        let more: Vec<String> = more.iter().map(|a| a.replace("{dir}", &dir)).collect();
        let mut args = vec![
            "--uplinks",
            UPLINK,
            "--svid-dir",
            &svids,
            "--auth-addr",
            &listen,
            "--node-name",
            &node_name,
        ];
        args.extend(more.iter().map(String::as_str));
        let agent = AgentProcess::start_with_args(
            Path::new(BINARY),
            ns,
            "tg-*",
            &policy_path,
            &workdir,
            &test_pin_dir(&format!("auth-{}-{node}", self.name)),
            &args,
        )
        .expect("agent starts");
        match node {
            "a" => self.agent_a = Some(agent),
            _ => self.agent_b = Some(agent),
        }
    }

    fn agent(&self, node: &str) -> &AgentProcess {
        match node {
            "a" => self.agent_a.as_ref(),
            _ => self.agent_b.as_ref(),
        }
        .expect("agent started")
    }

    fn status(&self, node: &str) -> serde_json::Value {
        let out = self.agent(node).cli(&["status", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn verdict(&self, node: &str, name: &str) -> u64 {
        self.status(node)["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v[0] == name)
            .and_then(|v| v[1].as_u64())
            .unwrap_or_else(|| panic!("no verdict {name}"))
    }

    /// Handshakes of `role` with `result` counted by the agent of `node`.
    fn handshakes(&self, node: &str, role: &str, result: &str) -> u64 {
        self.status(node)["auth"]["handshakes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["role"] == role && h["result"] == result)
            .filter_map(|h| h["count"].as_u64())
            .sum()
    }

    fn has_proof(&self, node: &str, from: &str, to: &str) -> bool {
        self.status(node)["auth"]["proofs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["from_identity"] == from && p["to_identity"] == to)
    }

    /// Waits (bounded) until `f` holds; false if it never did.
    fn wait_for(&self, what: impl Fn(&Self) -> bool) -> bool {
        self.wait_up_to(SETTLE, what)
    }

    /// Waits up to `timeout` until `f` holds; false if it never did.
    fn wait_up_to(&self, timeout: Duration, what: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if what(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn ns(&self, workload: &str) -> &NetNs {
        match workload {
            "db" => &self.nodes.b.workload("db").ns,
            w => &self.nodes.a.workload(w).ns,
        }
    }

    fn addr(&self, workload: &str, v6: bool) -> IpAddr {
        let w = match workload {
            "db" => self.nodes.b.workload("db"),
            w => self.nodes.a.workload(w),
        };
        if v6 {
            IpAddr::V6(w.v6)
        } else {
            IpAddr::V4(w.v4)
        }
    }

    /// Kubernetes mode: an API server in node A's namespace (reached by node B's agent over
    /// the link) holding namespace `shop`, pods `web-1` and `rogue-1` on node-a and `db-1` on
    /// node-b (their workloads' addresses, `status.hostIP` their node's address), and a Policy
    /// whose identities select by service account and carry neither `spiffeId` nor
    /// `authAddress`. Both agents run with `--trust-domain shop.test`, node B's first.
    fn kubernetes(name: &str, before_agents: impl FnOnce(&mut AuthEnv)) -> AuthEnv {
        let mut env = AuthEnv::new(name);
        let listener = env
            .nodes
            .a
            .node
            .run(|| std::net::TcpListener::bind((NODE_A_V4, 0)))
            .expect("run in node A")
            .expect("bind the API server");
        let api = FakeApiServer::start(listener).expect("API server");
        api.apply(kubeapi::namespace("shop", &[("team", "a")]))
            .unwrap();
        for (pod, account, node, host) in [
            ("web-1", "web", "a", NODE_A_V4),
            ("rogue-1", "rogue", "a", NODE_A_V4),
            ("db-1", "db", "b", NODE_B_V4),
        ] {
            let (v4, v6) = (env.addr(account, false), env.addr(account, true));
            let mut object = kubeapi::pod(
                "shop",
                pod,
                &[("app", account)],
                account,
                &format!("node-{node}"),
                &[&v4.to_string(), &v6.to_string()],
                "Running",
                false,
            );
            object["status"]["hostIP"] = json!(host);
            api.apply(object).unwrap();
        }
        let identity = |name: &str| json!({"name": name, "selector": {"namespace": "shop", "serviceAccount": name}});
        let rule = |from: &str| {
            json!({"name": format!("{from}-to-db"), "from": from, "to": "db",
                   "authentication": "mtls", "ports": [{"protocol": "TCP", "port": PORT}]})
        };
        api.apply(kubeapi::policy(
            "shop",
            json!({
                "identities": [identity("web"), identity("rogue"), identity("db")],
                "rules": [rule("web"), rule("rogue")],
            }),
        ))
        .unwrap();
        let kubeconfig = env.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        env.api = Some(api);
        before_agents(&mut env);
        let kubeconfig = kubeconfig.display().to_string();
        let args = [
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--trust-domain",
            "shop.test",
        ];
        env.start_agent_with("b", &args);
        env.start_agent_with("a", &args);
        env
    }

    /// Both agents running, `web → db` proven, an echo server on db for `connections`.
    fn authenticated(name: &str, connections: usize) -> AuthEnv {
        Self::authenticated_with(name, connections, &[])
    }

    /// Like `authenticated`, node B's agent started with more arguments.
    fn authenticated_with(name: &str, connections: usize, b_args: &[&str]) -> AuthEnv {
        let mut env = AuthEnv::new(name);
        env.start_agent_with("b", b_args);
        env.start_agent("a");
        assert!(
            env.wait_for(|e| e.has_proof("a", "web", "db") && e.has_proof("b", "web", "db")),
            "web -> db was not pre-authenticated; node A: {:#?}\nlog A:\n{}\nlog B:\n{}",
            env.status("a")["auth"],
            env.agent("a").log_text(),
            env.agent("b").log_text()
        );
        for v6 in [false, true] {
            tcp_echo_server(env.ns("db"), env.addr("db", v6), PORT, connections).unwrap();
        }
        env
    }
}

/// Connects from `ns` to `to:port` waiting up to `timeout` (TCP retries its SYN after 1 s,
/// then 3 s): the stream and how long the connect took.
fn connect_timed(
    ns: &NetNs,
    to: IpAddr,
    timeout: Duration,
) -> (std::io::Result<TcpStream>, Duration) {
    let started = Instant::now();
    let result = ns
        .run(move || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&SocketAddr::new(to, PORT), timeout)?;
            s.set_read_timeout(Some(Duration::from_millis(1500)))?;
            s.set_write_timeout(Some(Duration::from_millis(1500)))?;
            Ok(s)
        })
        .expect("run in namespace");
    (result, started.elapsed())
}

fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).is_ok() && got == msg
}

#[test]
fn pre_authenticated_pair_connects_on_its_first_syn_and_carries_megabytes() {
    let env = AuthEnv::authenticated("pre", 16);
    for v6 in [false, true] {
        let (stream, took) =
            connect_timed(env.ns("web"), env.addr("db", v6), Duration::from_secs(5));
        let mut stream = stream.unwrap_or_else(|e| panic!("web -> db (v6 {v6}): {e}"));
        eprintln!("pre-authenticated pair, v6 {v6}: connected in {took:?}");
        // The SYN retry comes after a second: no retry means no refusal.
        assert!(took < Duration::from_millis(900), "connect took {took:?}");
        assert!(roundtrip(&mut stream, b"authenticated"));
        tcp_bulk_echo(env.ns("web"), env.addr("db", v6), PORT, 4 << 20)
            .unwrap_or_else(|e| panic!("4 MiB each way (v6 {v6}): {e:#}"));
    }
    assert_eq!(env.verdict("a", "deny_auth_required"), 0);
    assert_eq!(env.verdict("b", "deny_auth_required"), 0);
    assert!(env.handshakes("a", "client", "ok") >= 1);
    assert!(env.handshakes("b", "server", "ok") >= 1);
    // `check` on node A says the rule needs authentication and the pair has a proof.
    let out = env
        .agent("a")
        .cli(&[
            "check",
            "--from",
            "10.200.1.2",
            "--to",
            "10.200.101.2",
            "--port",
            "5432",
            "--protocol",
            "tcp",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("mtls required; a valid proof admits the pair"),
        "{text}"
    );
}

#[test]
fn pair_not_authenticated_ahead_passes_on_the_first_syn_retry() {
    let mut env = AuthEnv::new("demand");
    // Node B holds no SVID for db yet: node A's handshakes ahead of need fail and back off.
    let db_dir = env.svid_dir("b").join("db");
    let parked = env.dir.path().join("db-parked");
    std::fs::rename(&db_dir, &parked).unwrap();
    env.start_agent("b");
    env.start_agent("a");
    assert!(env.wait_for(|e| e.handshakes("a", "client", "ok") == 0
        && e.status("a")["auth"]["handshakes"]
            .as_array()
            .is_some_and(|h| !h.is_empty())));
    // Past the first back-offs (0.5 s, 1 s, 2 s), so the next try ahead of need is seconds
    // away; then db's SVID arrives and a client connects at once.
    std::thread::sleep(Duration::from_secs(4));
    std::fs::rename(&parked, &db_dir).unwrap();
    assert!(env.wait_for(|e| e.status("b")["auth"]["svids"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["spiffe_id"] == DB_ID))));
    tcp_echo_server(env.ns("db"), env.addr("db", false), PORT, 4).unwrap();
    let (stream, took) =
        connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(5));
    let mut stream =
        stream.unwrap_or_else(|e| panic!("web -> db: {e}\nlog A:\n{}", env.agent("a").log_text()));
    eprintln!(
        "pair authenticated on demand: connected in {took:?}, {} SYN(s) refused at node A",
        env.verdict("a", "deny_auth_required")
    );
    // At most one SYN retry: the first SYN refused, its retry (1 s later) admitted. (Kernels
    // since 6.7 retry a SYN every second at first, so a second retry would come at 2 s.)
    assert!(took < Duration::from_millis(1800), "connect took {took:?}");
    assert_eq!(
        env.verdict("a", "deny_auth_required"),
        1,
        "more than one SYN refused"
    );
    assert!(roundtrip(&mut stream, b"on demand"));
    assert!(env.has_proof("a", "web", "db"));
}

#[test]
fn workload_whose_svid_is_not_from_the_trusted_ca_is_refused() {
    let env = AuthEnv::authenticated("rogue", 4);
    for v6 in [false, true] {
        let (r, _) = connect_timed(env.ns("rogue"), env.addr("db", v6), Duration::from_secs(3));
        assert!(r.is_err(), "rogue reached db (v6 {v6})");
    }
    assert!(!env.has_proof("a", "rogue", "db"));
    assert!(!env.has_proof("b", "rogue", "db"));
    // Node A does not even use the forged SVID: it does not chain to the trust bundle.
    let a = env.status("a");
    assert!(
        a["auth"]["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.contains("does not chain")))),
        "{:#?}",
        a["auth"]
    );
    assert!(env.handshakes("a", "client", "no_svid") >= 1);
    assert!(env.verdict("a", "deny_auth_required") >= 1);
    // Presented to node B's listener directly, it is refused for what it is.
    env.present_forged_certificate();
    assert!(
        env.wait_for(|e| e.handshakes("b", "server", "untrusted_signature") >= 1),
        "node B: {:#?}",
        env.status("b")["auth"]
    );
    assert!(!env.has_proof("b", "rogue", "db"));
    // web, next door, is unaffected.
    let (r, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    assert!(r.is_ok());
}

#[test]
fn spoofed_source_never_rides_on_another_identitys_proof() {
    let env = AuthEnv::authenticated("spoof", 4);
    let before = env.verdict("a", "drop_spoofed");
    let admitted_at_b = env.verdict("b", "allow_new");
    for v6 in [false, true] {
        // rogue sends as web, whose pair with db is authenticated.
        let seg = TcpSegment::syn(
            SocketAddr::new(env.addr("web", v6), 40123),
            SocketAddr::new(env.addr("db", v6), PORT),
        );
        for _ in 0..5 {
            send_tcp(env.ns("rogue"), &seg).unwrap();
        }
    }
    assert!(
        env.wait_for(|e| e.verdict("a", "drop_spoofed") >= before + 10),
        "spoofed SYNs not all dropped at node A"
    );
    // None of them reached node B's datapath as a new flow of web.
    assert_eq!(env.verdict("b", "allow_new"), admitted_at_b);
    assert!(env.has_proof("a", "web", "db"));
}

#[test]
fn rotated_svid_keeps_traffic_flowing_and_renews_the_proof() {
    let env = AuthEnv::authenticated("rotate", 4);
    let (stream, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    let mut stream = stream.expect("web -> db");
    let handshakes = env.handshakes("a", "client", "ok");
    // A new key and certificate, same SPIFFE ID, written as a rotation would.
    env.issue(
        "a/web",
        WEB_ID,
        Duration::from_secs(3600),
        &FileNames::CSI_SPIFFE,
    );
    let until = Instant::now() + Duration::from_secs(4);
    let mut sent = 0;
    while Instant::now() < until {
        assert!(
            roundtrip(&mut stream, b"still flowing"),
            "roundtrip {sent} failed during rotation"
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        env.wait_for(|e| e.handshakes("a", "client", "ok") > handshakes),
        "the proof was not renewed with the new certificate"
    );
    let (r, took) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    assert!(
        r.is_ok() && took < Duration::from_millis(900),
        "new connection after rotation: {took:?}"
    );
    assert_eq!(env.verdict("a", "deny_revoked"), 0);
}

#[test]
fn expired_svid_stops_new_and_established_flows() {
    let env = AuthEnv::authenticated("expire", 4);
    let handshakes = env.handshakes("a", "client", "ok");
    // web's certificate is replaced by one that lives 5 s: the proof renewed with it can live
    // no longer.
    env.issue(
        "a/web",
        WEB_ID,
        Duration::from_secs(5),
        &FileNames::CSI_SPIFFE,
    );
    assert!(env.wait_for(|e| e.handshakes("a", "client", "ok") > handshakes));
    let (stream, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    let mut stream = stream.expect("web -> db");
    assert!(roundtrip(&mut stream, b"before expiry"));
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut cut = false;
    while Instant::now() < deadline {
        if !roundtrip(&mut stream, b"tick") {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut, "the established flow outlived the certificate");
    assert!(env.verdict("a", "deny_revoked") >= 1);
    let (r, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    assert!(r.is_err(), "a new flow passed with an expired certificate");
    assert!(!env.has_proof("a", "web", "db"));
    assert!(env.wait_for(|e| e.status("a")["auth"]["lapses"]
        .as_array()
        .is_some_and(|l| l.iter().any(|l| l[0] == "expired"))));
}

#[test]
fn svid_replaced_by_another_spiffe_id_cuts_established_flows() {
    let env = AuthEnv::authenticated("replace", 4);
    let (stream, _) = connect_timed(env.ns("web"), env.addr("db", true), Duration::from_secs(3));
    let mut stream = stream.expect("web -> db");
    assert!(roundtrip(&mut stream, b"before"));
    env.issue(
        "a/web",
        "spiffe://shop.test/ns/shop/sa/someone-else",
        Duration::from_secs(3600),
        &FileNames::CSI_SPIFFE,
    );
    assert!(
        env.wait_for(|e| !e.has_proof("a", "web", "db")),
        "the proof outlived the certificate it was made with"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cut = false;
    while Instant::now() < deadline {
        if !roundtrip(&mut stream, b"tick") {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "the established flow kept passing");
}

#[test]
fn handshakes_and_lapses_are_metrics_and_audit_records() {
    let metrics: SocketAddr = format!("{NODE_B_V4}:9464").parse().unwrap();
    let env = AuthEnv::authenticated_with(
        "records",
        4,
        &[
            "--metrics-addr",
            &metrics.to_string(),
            "--audit-log",
            "{dir}/audit-b.jsonl",
        ],
    );
    // A forged certificate gives node B a refused handshake too.
    env.present_forged_certificate();
    assert!(env.wait_for(|e| e.handshakes("b", "server", "untrusted_signature") >= 1));
    let exposition = env
        .nodes
        .b
        .node
        .run(move || http_get(metrics, "/metrics", Duration::from_secs(5)))
        .unwrap()
        .expect("scrape node B");
    assert_eq!(exposition.0, 200);
    let text = exposition.1;
    for needle in [
        "tollgate_auth_handshakes_total{result=\"ok\",role=\"server\"} 1",
        "tollgate_auth_handshakes_total{result=\"untrusted_signature\",role=\"server\"}",
        "tollgate_auth_proofs 1",
        "tollgate_auth_svids 1",
        "tollgate_verdicts_total{verdict=\"deny_auth_required\"}",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    promtool_check_metrics(&text).expect("promtool check metrics");
    // The audit log has both handshakes, and its chain holds.
    let log = env.dir.path().join("audit-b.jsonl");
    assert!(env.wait_for(|_| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("\"type\":\"auth_handshake\"")
            && text.contains("\"result\":\"ok\"")
            && text.contains("\"result\":\"untrusted_signature\"")
    }));
    let out = std::process::Command::new(BINARY)
        .args(["audit", "verify"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hostile_clients_on_the_auth_listener_do_not_stop_handshakes() {
    let env = AuthEnv::authenticated("hostile", 4);
    // A workload cannot even reach the listener: the node is `host`, and no rule allows it.
    let listener: SocketAddr = format!("{NODE_B_V4}:{AUTH_PORT}").parse().unwrap();
    let reached = env
        .ns("web")
        .run(move || TcpStream::connect_timeout(&listener, Duration::from_millis(1500)).is_ok())
        .unwrap();
    assert!(!reached, "a workload reached node B's auth listener");
    // From another address of node A's side of the link: idle connections, and garbage.
    let attacker = IpAddr::V4("10.200.0.3".parse().unwrap());
    tollgate_testbed::netns::ip(&[
        "-n",
        env.nodes.a.node.name(),
        "addr",
        "add",
        "10.200.0.3/24",
        "dev",
        UPLINK,
    ])
    .unwrap();
    let mut held = Vec::new();
    for i in 0..60 {
        if let Ok(mut s) =
            tcp_connect_from(&env.nodes.a.node, SocketAddr::new(attacker, 0), listener)
        {
            if i % 3 == 0 {
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n\x16\x03\x01\xff\xff garbage");
            }
            held.push(s);
        }
    }
    assert!(!held.is_empty());
    // Meanwhile a real handshake: web's certificate rotates, and node A renews the proof.
    let handshakes = env.handshakes("b", "server", "ok");
    env.issue(
        "a/web",
        WEB_ID,
        Duration::from_secs(3600),
        &FileNames::CSI_SPIFFE,
    );
    assert!(
        env.wait_for(|e| e.handshakes("b", "server", "ok") > handshakes),
        "no handshake got through; node B: {:#?}",
        env.status("b")["auth"]
    );
    drop(held);
    let (r, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(3));
    assert!(r.is_ok());
    // The attacker's connections were capped and ended; node B is still serving.
    assert!(env.handshakes("b", "server", "busy") >= 1);
    assert!(env.has_proof("b", "web", "db"));
}

#[test]
fn a_valid_certificate_presented_from_another_address_is_refused() {
    let env = AuthEnv::authenticated("elsewhere", 4);
    // web's real SVID, copied to another address than its node's (authAddress 10.200.0.1).
    let err = env.present_web_from_elsewhere();
    assert!(
        matches!(&err, HandshakeError::Refused(why) if why.contains("came from 10.200.0.4")),
        "{err}"
    );
    // From its node's address, the same certificate is accepted.
    let (cert, key) = env.web.clone();
    env.present(cert, key, WEB_ID, Some(NODE_A_V4.parse().unwrap()))
        .expect("from web's node");
}

/// Kubernetes mode: the policy names no SPIFFE ID and no node address. The agents take each
/// identity's SPIFFE ID from its selector's namespace and service account (`--trust-domain`)
/// and each peer from the pods' `status.hostIP`: node A proves `web → db` with node B ahead
/// of need, the first SYN passes, and rogue (no valid SVID) is refused. Node B accepts web's
/// certificate only from a node that runs a web pod.
#[test]
fn kubernetes_mode_finds_peer_nodes_by_host_ip_and_spiffe_ids_by_service_account() {
    let env = AuthEnv::kubernetes("k8s", |_| {});
    // Pods and the policy first come over the watch: a little longer than a file.
    assert!(
        env.wait_up_to(2 * SETTLE, |e| e.has_proof("a", "web", "db")
            && e.has_proof("b", "web", "db")),
        "web -> db was not pre-authenticated; node A: {:#?}\nlog A:\n{}\nlog B:\n{}",
        env.status("a")["auth"],
        env.agent("a").log_text(),
        env.agent("b").log_text()
    );
    let proofs = env.status("a")["auth"]["proofs"].clone();
    let proof = proofs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["from_identity"] == "web")
        .unwrap();
    assert_eq!(proof["from_spiffe_id"], WEB_ID, "{proofs:#}");
    assert_eq!(proof["to_spiffe_id"], DB_ID, "{proofs:#}");
    assert_eq!(proof["peer_node"], "node-b", "{proofs:#}");
    // The merged policy says which SPIFFE IDs it requires.
    let out = env.agent("a").cli(&["policy", "get"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(WEB_ID) && text.contains(DB_ID), "{text}");

    for v6 in [false, true] {
        tcp_echo_server(env.ns("db"), env.addr("db", v6), PORT, 8).unwrap();
        let (stream, took) =
            connect_timed(env.ns("web"), env.addr("db", v6), Duration::from_secs(5));
        let mut stream = stream.unwrap_or_else(|e| panic!("web -> db (v6 {v6}): {e}"));
        eprintln!("Kubernetes mode, pre-authenticated, v6 {v6}: connected in {took:?}");
        assert!(took < Duration::from_millis(900), "connect took {took:?}");
        assert!(roundtrip(&mut stream, b"authenticated"));
        tcp_bulk_echo(env.ns("web"), env.addr("db", v6), PORT, 2 << 20)
            .unwrap_or_else(|e| panic!("2 MiB each way (v6 {v6}): {e:#}"));
    }
    assert_eq!(env.verdict("a", "deny_auth_required"), 0);

    // rogue's only SVID is forged: node A refuses its flows and has nothing to prove it with.
    let (refused, _) = connect_timed(
        env.ns("rogue"),
        env.addr("db", false),
        Duration::from_secs(3),
    );
    assert!(refused.is_err(), "rogue reached db");
    assert!(env.verdict("a", "deny_auth_required") >= 1);
    assert!(!env.has_proof("a", "rogue", "db") && !env.has_proof("b", "rogue", "db"));

    // web's real certificate, presented from an address of node A that no pod names as its
    // host, is refused; from the node's hostIP it is accepted.
    let err = env.present_web_from_elsewhere();
    assert!(
        matches!(&err, HandshakeError::Refused(why)
            if why.contains("no pod of web runs on the node at 10.200.0.4")),
        "{err}"
    );
    let (cert, key) = env.web.clone();
    env.present(cert, key, WEB_ID, Some(NODE_A_V4.parse().unwrap()))
        .expect("from web's node");

    // Node A's agent restarts with a web -> db connection open. It keeps the pinned policy
    // until it has merged the cluster's, and adopts the pinned proofs with it: the new
    // generation finds them, so the connection carries on and no handshake is needed.
    let (stream, _) = connect_timed(env.ns("web"), env.addr("db", false), Duration::from_secs(5));
    let mut stream = stream.expect("web -> db before the restart (the echo server takes 8)");
    assert!(roundtrip(&mut stream, b"before"));
    let generation = env.status("a")["generation"].as_u64().unwrap();
    let revoked = env.verdict("a", "deny_revoked");
    let mut env = env;
    let agent = env.agent_a.as_mut().unwrap();
    agent.stop().unwrap();
    let policy_path = env.dir.path().join("policy.yaml");
    agent
        .spawn(&env.nodes.a.node, "tg-*", &policy_path)
        .expect("agent restarts");
    assert!(
        env.wait_for(|e| {
            let st = e.status("a");
            st["policy_name"] == "kubernetes" && st["generation"].as_u64() > Some(generation)
        }),
        "the restarted agent installed no merged policy; log A:\n{}",
        env.agent("a").log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        roundtrip(&mut stream, b"after the restart"),
        "the connection was cut"
    );
    assert_eq!(env.verdict("a", "deny_revoked"), revoked);
    let proofs = env.status("a")["auth"]["proofs"].clone();
    assert!(
        proofs
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["role"] == "adopted"),
        "{proofs:#}"
    );
    assert_eq!(env.handshakes("a", "client", "ok"), 0, "{proofs:#}");
}

/// Kubernetes mode on demand: node B has no SVID for db at first, so node A's handshakes
/// ahead of need fail and back off. Once it has one, the refused SYN tells node A which node
/// runs the destination pod (by its address), and the SYN retry passes (IPv6 this time). When
/// the API server moves db's pod to another node, the proof with node B ends and so does the
/// connection; moved back, the pair is proven again.
#[test]
fn kubernetes_mode_authenticates_on_demand_with_the_destination_pods_node() {
    let env = AuthEnv::kubernetes("k8sdemand", |env| {
        let db_dir = env.svid_dir("b").join("db");
        std::fs::rename(db_dir, env.dir.path().join("db-parked")).unwrap();
    });
    assert!(
        env.wait_for(|e| e.status("a")["auth"]["handshakes"]
            .as_array()
            .is_some_and(|h| h
                .iter()
                .any(|h| h["role"] == "client" && h["result"] != "ok"))),
        "no failed handshake ahead of need; log A:\n{}",
        env.agent("a").log_text()
    );
    // Past the first back-offs, so the next try ahead of need is seconds away.
    std::thread::sleep(Duration::from_secs(4));
    std::fs::rename(
        env.dir.path().join("db-parked"),
        env.svid_dir("b").join("db"),
    )
    .unwrap();
    assert!(env.wait_for(|e| e.status("b")["auth"]["svids"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["spiffe_id"] == DB_ID))));
    tcp_echo_server(env.ns("db"), env.addr("db", true), PORT, 4).unwrap();
    let (stream, took) = connect_timed(env.ns("web"), env.addr("db", true), Duration::from_secs(5));
    let mut stream =
        stream.unwrap_or_else(|e| panic!("web -> db: {e}\nlog A:\n{}", env.agent("a").log_text()));
    eprintln!(
        "Kubernetes mode on demand: connected in {took:?}, {} SYN(s) refused at node A",
        env.verdict("a", "deny_auth_required")
    );
    // At most one SYN retry (see pair_not_authenticated_ahead_passes_on_the_first_syn_retry).
    assert!(took < Duration::from_millis(1800), "connect took {took:?}");
    assert!(env.verdict("a", "deny_auth_required") <= 1);
    assert!(roundtrip(&mut stream, b"on demand"));
    assert!(env.has_proof("a", "web", "db") && env.has_proof("b", "web", "db"));

    // The API server now reports db's pod on another node (10.200.0.9, no agent there): node
    // A's proof with node B no longer stands for db and ends at once (`peer_gone`); with no
    // other proof the pair is unproven, and the open connection stops.
    let api = env.api.as_ref().unwrap();
    let mut moved = api.get("Pod", Some("shop"), "db-1").expect("db-1");
    moved["status"]["hostIP"] = json!("10.200.0.9");
    api.apply(moved.clone()).unwrap();
    assert!(
        env.wait_for(|e| !e.has_proof("a", "web", "db")),
        "node A still holds a proof with node B: {:#}",
        env.status("a")["auth"]
    );
    let lapses = env.status("a")["auth"]["lapses"].clone();
    assert!(
        lapses
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l[0] == "peer_gone" && l[1].as_u64() >= Some(1)),
        "{lapses:#}"
    );
    // New generations for withdrawn proofs come at most once a second.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !roundtrip(&mut stream, b"after the move"),
        "the connection outlived its proof"
    );
    drop(stream);
    // Back on node B: proven again ahead of need, and a new connection passes.
    moved["status"]["hostIP"] = json!(NODE_B_V4);
    api.apply(moved).unwrap();
    assert!(env.wait_for(|e| e.has_proof("a", "web", "db")));
    let (stream, _) = connect_timed(env.ns("web"), env.addr("db", true), Duration::from_secs(5));
    let mut stream = stream.expect("web -> db once db's node is known again");
    assert!(roundtrip(&mut stream, b"back"));
}
