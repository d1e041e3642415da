//! Regression tests from the attack round on Kubernetes mode and file-mode persistence: each
//! was a finding (a veth recreated under the same name coming back unbound, a skipped object
//! turning the default deny into audit, a finished pod blocking the new owner of its address, a
//! writer starving policy changes, a newcomer evicting an established object, a FIFO hanging
//! the file follower, a change during start missed, a failed save bringing back a superseded
//! policy). Each asserts the safe behaviour; the panic message says what was observed.
//!
//! Namespaces: `tgatk<N>-*`; pins under /sys/fs/bpf/tollgate-tests/atk-*; addresses in
//! 10.200.0.0/16 and fd00:200::/48. Everything is removed by Drop (agent by pid, namespaces by
//! name).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::{
    cluster::{file_policy, pod_at, pod_at_phase, shop, shop_spec, start, PORT},
    env::{AgentEnv, BINARY},
};
use tollgate_testbed::{
    kubeapi,
    traffic::{echo_roundtrip, tcp_connect_from, tcp_echo_server, tcp_reachable},
    AgentProcess, Topology, TopologyOptions,
};

fn ip(args: &[&str]) {
    tollgate_testbed::netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e:#}"));
}

/// A finished (Succeeded) pod still holds its address in the API (kubelet keeps status.podIPs
/// of terminal pods; Job pods and evicted pods linger for hours). The CNI has already handed the
/// address to a new pod. The finished pod takes no part ("eligible: false"), so it must not
/// make the new pod's address ambiguous.
#[test]
fn a_finished_pod_lingering_on_a_reused_address_does_not_block_the_new_pod() {
    let c = start("tgatk1", "atk-finished", &["web", "db"], |api, topo| {
        shop(api, topo);
        // A completed Job pod that had db's addresses before db-1 got them.
        api.apply(pod_at_phase(
            topo,
            "db",
            "job-1",
            &[("app", "batch")],
            "Succeeded",
        ))
        .unwrap();
    });
    c.wait_synced();
    let k = c.kube();
    eprintln!("status.kubernetes: {k}");
    let web_to_db = c.reachable("web", "db", false);
    assert!(
        k["conflicts"] == json!([]) && web_to_db,
        "OBSERVED: db-1's address is `ambiguous` (web->db reachable: {web_to_db}) because a \
         Succeeded pod (which takes no part) still lists the address; conflicts: {}",
        k["conflicts"]
    );
}

/// Same as above with a Failed (evicted) pod of the same identity: it once made the address
/// ambiguous, since the finished pod resolved to "no identity".
#[test]
fn an_evicted_pod_of_the_same_identity_does_not_block_its_replacement() {
    let c = start("tgatk2", "atk-evicted", &["web", "db"], |api, topo| {
        shop(api, topo);
        api.apply(pod_at_phase(
            topo,
            "db",
            "db-0-evicted",
            &[("app", "db")],
            "Failed",
        ))
        .unwrap();
    });
    c.wait_synced();
    let k = c.kube();
    let web_to_db = c.reachable("web", "db", false);
    assert!(
        web_to_db,
        "OBSERVED: a Failed (evicted) db pod on the reused address denies the running db pod; \
         conflicts: {}",
        k["conflicts"]
    );
}

/// Calico-style: a pod's host-side veth is named after the pod, so a sandbox re-creation
/// (runtime restart, node reboot) brings back a veth of the same name with a new ifindex. The
/// new ifindex must be bound to the pod's identity again.
///
/// Enforcement effect: `ext` is a CIDR identity (10.200.1.128/25) that may reach db; the web
/// pod's veth has a /24 route, so a source of 10.200.1.200 passes the reverse-path check from
/// tg-web, and only the binding (web) stops the web pod from posing as `ext`.
#[test]
fn a_recreated_pod_veth_is_bound_again_and_status_shows_what_is_written() {
    let c = start("tgatk3", "atk-rebind", &["web", "db"], |api, topo| {
        api.apply(kubeapi::namespace("shop", &[])).unwrap();
        api.apply(pod_at(topo, "web", "web-1", &[("app", "web")]))
            .unwrap();
        api.apply(pod_at(topo, "db", "db-1", &[("app", "db")]))
            .unwrap();
        api.apply(kubeapi::policy(
            "shop",
            json!({
                "identities": [
                    {"name": "web", "selector": {"namespace": "shop", "matchLabels": {"app": "web"}}},
                    {"name": "db", "selector": {"namespace": "shop", "matchLabels": {"app": "db"}}},
                    {"name": "ext", "cidrs": ["10.200.1.128/25"]}
                ],
                "rules": [
                    {"name": "web-to-db", "from": "web", "to": "db", "ports": [{"port": PORT, "protocol": "TCP"}]},
                    {"name": "ext-to-db", "from": "ext", "to": "db", "ports": [{"port": PORT, "protocol": "TCP"}]}
                ]
            }),
        ))
        .unwrap();
    });
    c.wait_synced();
    assert_eq!(c.interface_binding("tg-web"), "web");
    let web = c.env.topo.workload("web");
    let spoof: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 1, 200));
    web.add_address(spoof, 24).unwrap();
    let db = SocketAddr::new(c.env.addr("db", false), PORT);
    let try_spoof = || {
        tcp_connect_from(&web.ns, SocketAddr::new(spoof, 0), db)
            .map(|mut s| echo_roundtrip(&mut s, b"spoof"))
            .unwrap_or(false)
    };
    assert!(c.reachable("web", "db", false));
    assert!(
        !try_spoof(),
        "precondition: the binding stops web posing as ext"
    );

    // The sandbox is re-created: the veth goes and comes back with the same name.
    let node = c.env.topo.node.name().to_string();
    let wns = web.ns.name().to_string();
    ip(&["-n", &node, "link", "del", "tg-web"]);
    ip(&[
        "-n", &node, "link", "add", "tg-web", "type", "veth", "peer", "name", "eth0", "netns", &wns,
    ]);
    ip(&["-n", &node, "addr", "add", "10.200.1.1/24", "dev", "tg-web"]);
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        "fd00:200:1::1/64",
        "dev",
        "tg-web",
        "nodad",
    ]);
    ip(&["-n", &node, "link", "set", "tg-web", "up"]);
    ip(&["-n", &wns, "addr", "add", "10.200.1.2/24", "dev", "eth0"]);
    ip(&["-n", &wns, "addr", "add", "10.200.1.200/24", "dev", "eth0"]);
    ip(&[
        "-n",
        &wns,
        "addr",
        "add",
        "fd00:200:1::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    ip(&["-n", &wns, "link", "set", "eth0", "up"]);
    ip(&["-n", &wns, "route", "add", "default", "via", "10.200.1.1"]);
    ip(&[
        "-n",
        &wns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:200:1::1",
    ]);
    // kubelet reports the pod again (same address; an annotation-like label change makes an
    // event, which is what a status update after sandbox re-creation produces).
    c.api
        .apply(pod_at(
            &c.env.topo,
            "web",
            "web-1",
            &[("app", "web"), ("restarted", "1")],
        ))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    c.eventually(
        "web reaches db again after re-creation",
        Duration::from_secs(10),
        |c| c.reachable("web", "db", false),
    );
    let reported = c.interface_binding("tg-web");
    let spoofed = try_spoof();
    // What the kernel holds for the new ifindex (bpftool, for the report).
    let out = c
        .env
        .topo
        .node
        .exec(&["cat", "/sys/class/net/tg-web/ifindex"])
        .output()
        .unwrap();
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(c.env.agent.bpffs.join("maps").join("TG_INTERFACES"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    eprintln!(
        "new tg-web ifindex: {} status bound_identity: {reported}\nTG_INTERFACES: {dump}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        !spoofed,
        "OBSERVED: after the veth came back under the same name, the web pod posed as `ext` \
         (source 10.200.1.200) and reached db: the new ifindex is unbound, while `status` \
         reports tg-web bound_identity = {reported}"
    );
}

/// Merge: the default deny is audit only when every object says `mode: audit`. When the one
/// enforcing object becomes invalid (a typo) it is skipped, and it must still count as
/// enforcing: the remaining audit-only objects once flipped the cluster's default deny into
/// audit.
#[test]
fn a_typo_in_the_enforcing_object_never_flips_the_cluster_to_audit() {
    let c = start(
        "tgatk4",
        "atk-audit",
        &["web", "db", "other"],
        |api, topo| {
            shop(api, topo);
            api.apply(pod_at(topo, "other", "other-1", &[("app", "other")]))
                .unwrap();
            // A team trying a rule in audit mode.
            api.apply(kubeapi::policy(
                "trial",
                json!({"mode": "audit", "rules": []}),
            ))
            .unwrap();
        },
    );
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
    assert!(
        !c.reachable("other", "db", false),
        "precondition: enforcing"
    );
    // The enforcing object gets a typo.
    let mut bad = shop_spec();
    bad["rules"][0]["ports"][0]["port"] = json!(70000);
    c.api.apply(kubeapi::policy("shop", bad)).unwrap();
    c.eventually(
        "the typo'd object is skipped",
        Duration::from_secs(10),
        |c| {
            c.kube()["skipped"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let mode = c.env.agent.cli(&["policy", "get"]).unwrap();
    let text = String::from_utf8_lossy(&mode.stdout).to_string();
    let other_to_db = c.reachable("other", "db", false);
    let db_to_web = c.reachable("db", "web", false);
    assert!(
        !other_to_db && !db_to_web,
        "OBSERVED: one invalid object turned enforcement off cluster-wide (other->db {other_to_db}, \
         db->web {db_to_web}); merged policy:\n{text}"
    );
}

/// Policy events are gathered until 200 ms pass without one, for at most 1 s. A controller
/// that touches a Policy object more often than that (status/annotation writes, a GitOps tool
/// re-applying) once held every change back for as long as it kept doing so.
#[test]
fn a_chatty_writer_does_not_starve_policy_changes() {
    let c = start(
        "tgatk5",
        "atk-starve",
        &["web", "db", "other"],
        |api, topo| {
            shop(api, topo);
            api.apply(pod_at(topo, "other", "other-1", &[("app", "other")]))
                .unwrap();
            api.apply(kubeapi::policy("noisy", json!({}))).unwrap();
        },
    );
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
    // Revoke web -> db (an urgent change: a rule removed).
    let mut spec = shop_spec();
    spec["rules"] = json!([]);
    c.api.apply(kubeapi::policy("shop", spec)).unwrap();
    // Meanwhile something touches `noisy` every 100 ms for 6 s (bounded).
    let started = Instant::now();
    let mut still_allowed_at = None;
    for i in 0..60u32 {
        let mut o = kubeapi::policy("noisy", json!({}));
        o["metadata"]["labels"] = json!({"touch": i.to_string()});
        c.api.apply(o).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if i == 40 && c.reachable("web", "db", false) {
            still_allowed_at = Some(started.elapsed());
        }
    }
    assert!(
        still_allowed_at.is_none(),
        "OBSERVED: a removed rule still allowed web->db {:?} after the change, because another \
         object is written every 100 ms",
        still_allowed_at
    );
}

// ---------------------------------------------------------------------------------------------
// File mode

fn policy_name(env: &AgentEnv) -> Value {
    env.status_json()["policy_name"].clone()
}

fn file_env(prefix: &str, pin: &str, policy: &str) -> AgentEnv {
    let env = AgentEnv::start(
        prefix,
        pin,
        &["web", "db"],
        TopologyOptions::default(),
        policy,
    );
    for w in &env.topo.workloads {
        tcp_echo_server(&w.ns, IpAddr::V4(w.v4), PORT, 1000).unwrap();
    }
    env
}

/// Atomically replaces `path` by a new file with `text` (rename over it).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The --policy file is replaced by a FIFO for a moment (a mistaken `mkfifo`, a process
/// substitution path, or an attacker with write access to the config dir), then by a valid
/// policy. The follower must not hang on the FIFO.
#[test]
fn a_policy_file_briefly_a_fifo_neither_stops_the_follower_nor_hangs_stop() {
    let mut env = file_env("tgatk6", "atk-fifo", &file_policy("v1", false));
    let path = env.dir.path().join("policy.yaml");
    assert_eq!(policy_name(&env), "v1");
    let fifo = env.dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, &path).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    replace(&path, &file_policy("v2", true));
    let started = Instant::now();
    let mut applied = false;
    while started.elapsed() < Duration::from_secs(6) {
        if policy_name(&env) == "v2" {
            applied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    let stop = env.agent.stop();
    let stop_took = t.elapsed();
    eprintln!("stop: {stop:?} after {stop_took:?}");
    assert!(
        applied,
        "OBSERVED: after the --policy file was a FIFO for 2.5 s, a valid v2 put in its place was \
         not applied within 6 s (the follower is stuck in open() on the FIFO); stop: {stop:?} \
         after {stop_took:?}"
    );
    assert!(
        stop.is_ok(),
        "OBSERVED: the agent did not exit on SIGTERM: {stop:?}"
    );
}

/// The --policy file changes while the agent starts (after it read the file, before the
/// follower took its first look). The change must be applied.
#[test]
fn a_policy_file_change_during_start_is_applied() {
    support::require_root();
    let topo =
        Topology::with_options("tgatk7", &["web", "db"], TopologyOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, file_policy("v1", false)).unwrap();
    // inotify on the file: the agent's open of it is the moment to swap.
    // SAFETY: plain syscalls on owned descriptors.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let wd = unsafe { libc::inotify_add_watch(fd, cpath.as_ptr(), libc::IN_OPEN) };
    assert!(wd >= 0);
    let workdir = dir.path().to_path_buf();
    let node_ns_path = topo.node.name().to_string();
    let _ = node_ns_path;
    let pin = support::test_pin_dir("atk-startrace");
    let p2 = path.clone();
    let swapper = std::thread::spawn(move || {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        while started.elapsed() < Duration::from_secs(20) {
            // SAFETY: reading into an owned buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                replace(&p2, &file_policy("v2", true));
                unsafe { libc::close(fd) };
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        unsafe { libc::close(fd) };
        false
    });
    let agent = AgentProcess::start(Path::new(BINARY), &topo.node, "tg-*", &path, &workdir, &pin)
        .expect("agent starts");
    let env = AgentEnv { agent, topo, dir };
    assert!(
        swapper.join().unwrap(),
        "the agent never opened the policy file"
    );
    for w in &env.topo.workloads {
        tcp_echo_server(&w.ns, IpAddr::V4(w.v4), PORT, 1000).unwrap();
    }
    std::thread::sleep(Duration::from_secs(4));
    let name = policy_name(&env);
    let on_disk = std::fs::read_to_string(workdir.join("policy.yaml")).unwrap();
    assert!(
        name == "v2",
        "OBSERVED: the file on disk is v2 (`{}`) but the agent enforces {name} 4 s later, and \
         will until the file changes again",
        on_disk.lines().nth(2).unwrap_or("")
    );
}

/// Saving the policy in force fails (state dir full / read-only / a stray entry): the restart
/// must not go back to an older `policy apply` the operator had replaced.
#[test]
fn a_failed_save_never_makes_a_restart_enforce_a_superseded_policy() {
    let mut env = file_env("tgatk8", "atk-save", &file_policy("file-v1", false));
    let path = env.dir.path().join("policy.yaml");
    // apply p1 (allows web -> db) then p2 (revokes it).
    let p1 = env.write_file("p1.yaml", &file_policy("p1-allow", true));
    let out = env
        .agent
        .cli(&["policy", "apply", "-f", p1.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success());
    // Saving fails from now on (here: a directory where the temporary file goes; the same as
    // ENOSPC or EROFS on the state dir).
    let blocker = env.agent.state_dir.join("policy.tmp");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let p2 = env.write_file("p2.yaml", &file_policy("p2-revoke", false));
    let out = env
        .agent
        .cli(&["policy", "apply", "-f", p2.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "the apply itself succeeds");
    assert!(!tcp_reachable(env.ns("web"), env.addr("db", false), PORT));
    let log = env.agent.log_text();
    let warned = log.contains("could not save the policy in force");
    env.agent.stop().unwrap();
    env.agent.spawn(&env.topo.node, "tg-*", &path).unwrap();
    let name = policy_name(&env);
    let reach = tcp_reachable(env.ns("web"), env.addr("db", false), PORT);
    let _ = std::fs::remove_dir_all(&blocker);
    assert!(
        name != "p1-allow" && !reach,
        "OBSERVED: after the restart the agent enforces {name} (web->db reachable: {reach}), a \
         policy replaced before the restart; the warning at save time (logged: {warned}) said a \
         restart would go back to the --policy file"
    );
}

#[allow(dead_code)]
fn unused(_: PathBuf) {}

/// Objects merged last time win conflicts: a new object whose name sorts first and that
/// re-declares an identity of an established object is the one skipped. (By name alone, anyone
/// allowed to `create` Policy objects could knock out an object they cannot edit.)
#[test]
fn a_new_object_sorting_first_does_not_evict_an_established_one() {
    let c = start("tgatk9", "atk-evict", &["web", "db"], |api, topo| {
        shop(api, topo);
    });
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
    c.api
        .apply(kubeapi::policy(
            "00-newcomer",
            json!({"identities": [{"name": "db", "cidrs": ["10.200.250.0/24"]}]}),
        ))
        .unwrap();
    c.eventually("the newcomer skipped", Duration::from_secs(10), |c| {
        c.kube()["skipped"]
            .as_array()
            .is_some_and(|s| s.iter().any(|o| o["name"] == "00-newcomer"))
    });
    let k = c.kube();
    assert_eq!(k["policies"], json!(["shop"]), "OBSERVED: {k}");
    assert!(
        c.reachable("web", "db", false),
        "OBSERVED: creating `00-newcomer` evicted the established `shop` object; {k}"
    );
}

/// A namespace relabel with a namespaceSelector while the watches are down and history is
/// compacted is picked up by the relist; a pod claiming the node's own address gets no
/// identity.
#[test]
fn a_namespace_relabel_during_an_outage_is_relisted_and_a_pod_never_takes_a_node_address() {
    let c = start("tgatk10", "atk-nsrelist", &["web", "db"], |api, topo| {
        api.apply(kubeapi::namespace("shop", &[("team", "a")]))
            .unwrap();
        api.apply(pod_at(topo, "web", "web-1", &[("app", "web")]))
            .unwrap();
        api.apply(pod_at(topo, "db", "db-1", &[("app", "db")]))
            .unwrap();
        api.apply(kubeapi::policy(
            "shop",
            json!({
                "identities": [
                    {"name": "team-a", "selector": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "matchLabels": {"app": "web"}}},
                    {"name": "db", "selector": {"namespace": "shop", "matchLabels": {"app": "db"}}}
                ],
                "rules": [{"name": "a-to-db", "from": "team-a", "to": "db", "ports": [{"port": PORT, "protocol": "TCP"}]}]
            }),
        ))
        .unwrap();
        // A pod claiming the node's address on tg-db (10.200.2.1), selected into team-a.
        api.apply(kubeapi::pod(
            "shop",
            "liar",
            &[("app", "web")],
            "default",
            "node-b",
            &["10.200.2.1"],
            "Running",
            false,
        ))
        .unwrap();
    });
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
    let k = c.kube();
    assert!(
        k["conflicts"].to_string().contains("shop/liar"),
        "pod claiming a node address not reported: {k}"
    );
    c.api.set_unavailable(true);
    c.eventually("disconnected", Duration::from_secs(20), |c| {
        c.kube()["connected"] == false
    });
    c.api
        .apply(kubeapi::namespace("shop", &[("team", "b")]))
        .unwrap();
    c.api.compact();
    c.api.set_unavailable(false);
    c.eventually(
        "relabel enforced after relist",
        Duration::from_secs(25),
        |c| c.kube()["connected"] == true && !c.reachable("web", "db", false),
    );
}
