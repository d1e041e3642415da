//! Kubernetes mode against a fake API server that speaks the real list/watch protocol
//! (`tollgate_testbed::kubeapi`), with real traffic between workload namespaces standing in for
//! pods: identities by labels, a label change moving a pod and its flows, an address reused by
//! a pod of another identity, the API server refusing or going away, a restart while it is
//! away, invalid Policy objects. And file mode's ConfigMap swap and saved policy.
//!
//! The fake server listens inside the node namespace, where the agent runs; the agent gets a
//! kubeconfig for it.

mod support;

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::{
    cluster::{file_policy, pod_at, shop, start, start_with_args, PORT},
    env::{AgentEnv, BINARY},
};
use tollgate_testbed::{
    kubeapi,
    traffic::{echo_roundtrip, tcp_connect, tcp_echo_server, tcp_reachable},
    AgentProcess, Topology, TopologyOptions,
};

#[test]
fn pods_are_identities_by_labels_and_their_flows_follow_them() {
    let c = start(
        "tgk8s1",
        "k8s-labels",
        &["web", "db", "other"],
        |api, topo| {
            shop(api, topo);
            api.apply(pod_at(topo, "other", "other-1", &[("app", "other")]))
                .unwrap();
        },
    );
    c.wait_synced();
    let k = c.kube();
    assert_eq!(k["policies"], json!(["shop"]));
    assert_eq!(k["pods"], 3);
    assert_eq!(k["local_pods"], 3);
    // web and db, two addresses each; `other` matches no selector.
    assert_eq!(k["addresses"], 4);
    for v6 in [false, true] {
        assert!(c.reachable("web", "db", v6), "web -> db (v6 {v6})");
        assert!(!c.reachable("other", "db", v6), "other -> db (v6 {v6})");
        assert!(!c.reachable("db", "web", v6), "db -> web (v6 {v6})");
    }
    // Each pod's host-side interface is bound to its identity (source validation).
    assert_eq!(c.interface_binding("tg-web"), "web");
    assert_eq!(c.interface_binding("tg-db"), "db");
    assert_eq!(c.interface_binding("tg-other"), Value::Null);

    // In Kubernetes mode policy comes from the API server.
    let file = c.env.write_file(
        "p.yaml",
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: x}\nspec: {}\n",
    );
    let out = c
        .env
        .agent
        .cli(&["policy", "apply", "-f", file.to_str().unwrap()])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("managed through the API server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A label change moves `other` into `web`: it may now reach db.
    c.api
        .apply(pod_at(&c.env.topo, "other", "other-1", &[("app", "web")]))
        .unwrap();
    let lag = c.eventually(
        "other -> db allowed after relabel",
        Duration::from_secs(5),
        |c| c.reachable("other", "db", false),
    );
    eprintln!("relabel enforced after {lag:?} (probe included)");
    assert!(c.reachable("other", "db", true));

    // An established flow follows its pod: web -> db is open, then web's pod is relabelled out
    // of `web`, and the open connection stops passing.
    let mut open = tcp_connect(c.env.ns("web"), c.env.addr("db", false), PORT).unwrap();
    assert!(echo_roundtrip(&mut open, b"before"));
    c.api
        .apply(pod_at(&c.env.topo, "web", "web-1", &[("app", "other")]))
        .unwrap();
    let lag = c.eventually("web's flows revoked", Duration::from_secs(5), |c| {
        c.interface_binding("tg-web").is_null() && c.kube()["flows_revoked"].as_u64() >= Some(2)
    });
    eprintln!("established flow revoked after {lag:?}");
    assert!(
        !echo_roundtrip(&mut open, b"after"),
        "an established flow kept passing after its pod left the identity that admitted it"
    );
    assert!(!c.reachable("web", "db", false));

    // An address reused by a pod of another identity: `other` (now web) holds a connection to
    // db's address; db's pod goes and a pod of identity `web` gets db's addresses. The old
    // flow (admitted as web -> db) must not carry on to the new pod.
    let mut to_db = tcp_connect(c.env.ns("other"), c.env.addr("db", false), PORT).unwrap();
    assert!(echo_roundtrip(&mut to_db, b"db"));
    c.api.delete("Pod", Some("shop"), "db-1").unwrap();
    c.api
        .apply(pod_at(&c.env.topo, "db", "cache-1", &[("app", "web")]))
        .unwrap();
    c.eventually("db's addresses now web", Duration::from_secs(5), |c| {
        c.interface_binding("tg-db") == "web"
    });
    assert!(
        !echo_roundtrip(&mut to_db, b"reused"),
        "a flow admitted to the old pod's identity reached the new pod on the same address"
    );
    // web -> web has no rule.
    assert!(!c.reachable("other", "db", false));
    assert!(!c.reachable("other", "db", true));
}

/// The metrics address of the agents that serve one (inside the node namespace).
const METRICS: &str = "127.0.0.1:19464";

/// `/metrics` of the agent, fetched from inside its namespace.
fn scrape(c: &support::cluster::Cluster) -> String {
    let addr: std::net::SocketAddr = METRICS.parse().unwrap();
    let (code, body) = c
        .env
        .topo
        .node
        .run(move || {
            tollgate_testbed::prometheus::http_get(addr, "/metrics", Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
    body
}

#[test]
fn pods_two_selectors_match_and_invalid_objects_are_reported_never_half_applied() {
    let c = start_with_args(
        "tgk8s2",
        "k8s-conflict",
        &["web", "db", "both"],
        &["--metrics-addr", METRICS],
        |api, topo| {
            shop(api, topo);
            // A second object whose identity may share pods with `web` (different labels).
            api.apply(kubeapi::policy(
            "tiers",
            json!({
                "identities": [{"name": "frontend", "selector": {"matchLabels": {"tier": "front"}}}],
                "rules": [{"name": "frontend-to-db", "from": "frontend", "to": "db",
                           "ports": [{"port": PORT, "protocol": "TCP"}]}]
            }),
        ))
        .unwrap();
            // An invalid object: nothing of it may go in, not even its valid rule.
            api.apply(kubeapi::policy(
            "zz-broken",
            json!({
                "rules": [
                    {"name": "both-to-db", "from": "web", "to": "db", "ports": [{"port": 9000, "protocol": "TCP"}]},
                    {"name": "bad", "from": "web", "to": "db", "ports": [{"port": 70000, "protocol": "TCP"}]}
                ]
            }),
        ))
        .unwrap();
            api.apply(pod_at(
                topo,
                "both",
                "both-1",
                &[("app", "web"), ("tier", "front")],
            ))
            .unwrap();
        },
    );
    c.wait_synced();
    let k = c.kube();
    assert_eq!(k["policies"], json!(["shop", "tiers"]));
    assert_eq!(k["skipped"][0]["name"], "zz-broken");
    let reason = k["skipped"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("spec.rules[1].ports[0].port"), "{reason}");
    let conflict = &k["conflicts"][0];
    assert_eq!(conflict["name"], "shop/both-1");
    assert!(
        conflict["reason"]
            .as_str()
            .unwrap()
            .contains("web and frontend"),
        "{conflict}"
    );
    // Status, log and metrics say so.
    let metrics = scrape(&c);
    for line in [
        "tollgate_kubernetes_synced 1",
        "tollgate_kubernetes_connected 1",
        "tollgate_kubernetes_pods 3",
        "tollgate_kubernetes_pod_conflicts 1",
        "tollgate_kubernetes_policy_objects{state=\"merged\"} 2",
        "tollgate_kubernetes_policy_objects{state=\"skipped\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    tollgate_testbed::prometheus::promtool_check_metrics(&metrics).expect("promtool check metrics");
    assert!(c.env.agent.log_text().contains("Policy object skipped"));
    // The pod both selectors match gets neither: denied, although each identity may reach db.
    assert!(!c.reachable("both", "db", false));
    assert!(c.reachable("web", "db", false));
    // The skipped object's valid rule is not in force.
    let text = c.env.agent.cli(&["policy", "get"]).unwrap();
    assert!(!String::from_utf8_lossy(&text.stdout).contains("both-to-db"));
    // A fixed object goes in.
    c.api
        .apply(kubeapi::policy(
            "zz-broken",
            json!({"rules": [{"name": "both-to-db", "from": "web", "to": "db",
                              "ports": [{"port": 9000, "protocol": "TCP"}]}]}),
        ))
        .unwrap();
    c.eventually("the fixed object merged", Duration::from_secs(5), |c| {
        c.kube()["policies"] == json!(["shop", "tiers", "zz-broken"])
    });
    // Resolving the conflict (the pod drops `tier`) gives the pod its identity.
    c.api
        .apply(pod_at(&c.env.topo, "both", "both-1", &[("app", "web")]))
        .unwrap();
    c.eventually("conflict resolved", Duration::from_secs(5), |c| {
        c.reachable("both", "db", false)
    });
    assert_eq!(c.kube()["conflicts"], json!([]));
}

#[test]
fn the_api_server_going_away_is_not_a_hole() {
    let c = start(
        "tgk8s3",
        "k8s-outage",
        &["web", "db", "other"],
        |api, topo| {
            shop(api, topo);
            api.apply(pod_at(topo, "other", "other-1", &[("app", "other")]))
                .unwrap();
        },
    );
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
    c.api.set_unavailable(true);
    c.eventually("the agent notices", Duration::from_secs(20), |c| {
        c.kube()["connected"] == false
    });
    // Changes the agent cannot see: the last known state holds, in both directions.
    c.api
        .apply(pod_at(&c.env.topo, "web", "web-1", &[("app", "other")]))
        .unwrap();
    c.api
        .apply(pod_at(&c.env.topo, "other", "other-1", &[("app", "web")]))
        .unwrap();
    c.api.compact();
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.reachable("web", "db", false), "lost the last known allow");
    assert!(!c.reachable("other", "db", false), "fell back to allow");
    assert!(!c.reachable("db", "web", false), "fell back to allow");
    assert_eq!(
        c.kube()["synced"],
        true,
        "once synced, an outage keeps enforcing"
    );
    let lists_before = c.api.requests().iter().filter(|r| r.is_list()).count();
    // Back: the watches resume from versions the server has forgotten (410) and relist.
    c.api.set_unavailable(false);
    c.eventually(
        "relisted and enforcing the new labels",
        Duration::from_secs(20),
        |c| c.kube()["connected"] == true && c.reachable("other", "db", false),
    );
    assert!(!c.reachable("web", "db", false));
    let lists_after = c.api.requests().iter().filter(|r| r.is_list()).count();
    assert!(lists_after > lists_before, "no relist after the outage");
    assert!(c.kube()["watch_errors"].as_u64().unwrap() > 0);
}

#[test]
fn a_refused_permission_is_named_and_a_restart_keeps_the_pinned_state() {
    let mut c = start("tgk8s4", "k8s-rbac", &["web", "db"], |api, topo| {
        shop(api, topo);
        api.set_forbidden("pods", true).unwrap();
    });
    // Without pods nothing is synced: a fresh datapath denies everything.
    c.eventually("the refusal is reported", Duration::from_secs(10), |c| {
        c.kube()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pods") && e.contains("get, list and watch"))
    });
    let k = c.kube();
    assert_eq!(k["synced"], false);
    assert!(
        k["last_error"].as_str().unwrap().contains("forbidden"),
        "{k}"
    );
    assert!(!c.reachable("web", "db", false));
    c.api.set_forbidden("pods", false).unwrap();
    c.wait_synced();
    assert!(c.reachable("web", "db", false));

    // Restart while the API server is away: the pinned policy keeps enforcing, unsynced.
    c.env.agent.stop().unwrap();
    c.api.set_unavailable(true);
    let topo = &c.env.topo;
    c.env
        .agent
        .spawn(&topo.node, "tg-*", &c.env.dir.path().join("no-policy-file"))
        .unwrap();
    let k = c.kube();
    assert_eq!(k["synced"], false);
    assert!(c.reachable("web", "db", false), "the pinned allow was lost");
    assert!(!c.reachable("db", "web", false), "the pinned deny was lost");
    c.api.set_unavailable(false);
    c.wait_synced();
    assert!(c.reachable("web", "db", false));
}

/// Kubelet's ConfigMap volume layout: `policy.yaml -> ..data/policy.yaml`, `..data ->
/// ..<timestamp>`; an update writes a new timestamped directory and renames a new `..data`
/// symlink over the old one.
struct ConfigMapVolume {
    dir: std::path::PathBuf,
    version: u32,
}

impl ConfigMapVolume {
    fn new(dir: &Path, policy: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = ConfigMapVolume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        v.update(policy);
        std::os::unix::fs::symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
        v
    }

    fn update(&mut self, policy: &str) {
        self.version += 1;
        let data = format!("..2026_11_24_10_00_0{}.{}", self.version, self.version);
        std::fs::create_dir(self.dir.join(&data)).unwrap();
        std::fs::write(self.dir.join(&data).join("policy.yaml"), policy).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("policy.yaml")
    }
}

#[test]
fn file_mode_follows_a_configmap_swap_and_keeps_policy_apply_across_restarts() {
    support::require_root();
    let topo =
        Topology::with_options("tgk8s5", &["web", "db"], TopologyOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut volume = ConfigMapVolume::new(&dir.path().join("config"), &file_policy("v1", false));
    for w in &topo.workloads {
        tcp_echo_server(&w.ns, IpAddr::V4(w.v4), PORT, 1000).unwrap();
    }
    let agent = AgentProcess::start(
        Path::new(BINARY),
        &topo.node,
        "tg-*",
        &volume.path(),
        dir.path(),
        &support::test_pin_dir("k8s-file"),
    )
    .unwrap();
    let mut env = AgentEnv { agent, topo, dir };
    let policy_name = |env: &AgentEnv| env.status_json()["policy_name"].clone();
    let wait_name = |env: &AgentEnv, name: &str| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if policy_name(env) == name {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("policy {name} not in force; log:\n{}", env.agent.log_text());
    };
    assert_eq!(policy_name(&env), "v1");
    assert!(!tcp_reachable(env.ns("web"), env.addr("db", false), PORT));

    // Kubelet swaps the volume: applied without a restart.
    volume.update(&file_policy("v2", true));
    let took = wait_name(&env, "v2");
    eprintln!("ConfigMap swap applied after {took:?}");
    assert!(tcp_reachable(env.ns("web"), env.addr("db", false), PORT));
    // An invalid version is refused; v2 stays.
    volume.update("apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: v3}\nspec: {rules: [{name: x}]}\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(policy_name(&env), "v2");
    assert!(env
        .agent
        .log_text()
        .contains("policy file changed but was refused"));

    // `policy apply` of v4 (deny), then a restart with the file unchanged: v4 stays in force.
    volume.update(&file_policy("v2", true));
    std::thread::sleep(Duration::from_secs(2));
    let v4 = env.write_file("v4.yaml", &file_policy("v4", false));
    let out = env
        .agent
        .cli(&["policy", "apply", "-f", v4.to_str().unwrap()])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.agent.stop().unwrap();
    env.agent
        .spawn(&env.topo.node, "tg-*", &volume.path())
        .unwrap();
    assert_eq!(
        policy_name(&env),
        "v4",
        "a restart went back to an older policy"
    );
    assert!(!tcp_reachable(env.ns("web"), env.addr("db", false), PORT));
    // The file changes while the agent is down: the file is newer and wins.
    env.agent.stop().unwrap();
    volume.update(&file_policy("v5", true));
    env.agent
        .spawn(&env.topo.node, "tg-*", &volume.path())
        .unwrap();
    assert_eq!(policy_name(&env), "v5");
    assert!(tcp_reachable(env.ns("web"), env.addr("db", false), PORT));

    // Selectors need Kubernetes mode: refused, naming the identity.
    let sel = env.write_file(
        "sel.yaml",
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {name: sel}\nspec:\n  identities:\n    - {name: web, selector: {matchLabels: {app: web}}}\n",
    );
    let out = env
        .agent
        .cli(&["policy", "apply", "-f", sel.to_str().unwrap()])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identities[0] (web)") && err.contains("--kubernetes"),
        "{err}"
    );
}
