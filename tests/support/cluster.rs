//! Kubernetes mode in a namespace: a topology whose workloads stand in for pods, a fake API
//! server (`tollgate_testbed::kubeapi`, the real list/watch protocol) listening inside the node
//! namespace, and an agent in `--kubernetes` mode with a kubeconfig for it. Shared by the
//! Kubernetes tests and their attack-round regressions.

use std::{
    net::{IpAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tollgate_testbed::{
    kubeapi::{self, FakeApiServer},
    traffic::{tcp_echo_server, tcp_reachable},
    AgentProcess, Topology, TopologyOptions,
};

use super::env::{AgentEnv, BINARY};

/// The node the agent runs on, as pods name it.
pub const NODE: &str = "node-a";
/// Every workload runs a TCP echo server here (IPv4 and IPv6).
pub const PORT: u16 = 8080;

/// The agent and its topology (dropped first: the agent stops and uninstalls), then the API
/// server.
pub struct Cluster {
    pub env: AgentEnv,
    pub api: FakeApiServer,
}

/// Topology `prefix` with `workloads`, a fake API server in the node namespace that `setup`
/// fills, and an agent in Kubernetes mode enforcing on the `tg-*` interfaces.
pub fn start(
    prefix: &str,
    pin: &str,
    workloads: &[&str],
    setup: impl FnOnce(&FakeApiServer, &Topology),
) -> Cluster {
    start_with_args(prefix, pin, workloads, &[], setup)
}

/// Like `start`, with more `tollgate agent` arguments.
pub fn start_with_args(
    prefix: &str,
    pin: &str,
    workloads: &[&str],
    extra_args: &[&str],
    setup: impl FnOnce(&FakeApiServer, &Topology),
) -> Cluster {
    super::require_root();
    let topo = Topology::with_options(prefix, workloads, TopologyOptions::default()).unwrap();
    let listener = topo
        .node
        .run(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = FakeApiServer::start(listener).unwrap();
    setup(&api, &topo);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    for w in &topo.workloads {
        tcp_echo_server(&w.ns, IpAddr::V4(w.v4), PORT, 1000).unwrap();
        tcp_echo_server(&w.ns, IpAddr::V6(w.v6), PORT, 1000).unwrap();
    }
    let agent = AgentProcess::start_with_args(
        Path::new(BINARY),
        &topo.node,
        "tg-*",
        &dir.path().join("no-policy-file"),
        dir.path(),
        &super::test_pin_dir(pin),
        &[
            &[
                "--kubernetes",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--node-name",
                NODE,
            ],
            extra_args,
        ]
        .concat(),
    )
    .expect("agent starts");
    Cluster {
        env: AgentEnv { agent, topo, dir },
        api,
    }
}

/// A pod on this node in namespace `shop` at workload `w`'s addresses, in `phase`.
pub fn pod_at_phase(
    topo: &Topology,
    w: &str,
    name: &str,
    labels: &[(&str, &str)],
    phase: &str,
) -> Value {
    let w = topo.workload(w);
    kubeapi::pod(
        "shop",
        name,
        labels,
        "default",
        NODE,
        &[&w.v4.to_string(), &w.v6.to_string()],
        phase,
        false,
    )
}

/// A running pod on this node in namespace `shop` at workload `w`'s addresses.
pub fn pod_at(topo: &Topology, w: &str, name: &str, labels: &[(&str, &str)]) -> Value {
    pod_at_phase(topo, w, name, labels, "Running")
}

/// Identities `web` and `db` by label in namespace `shop`; `web` may reach `db` on PORT.
pub fn shop_spec() -> Value {
    json!({
        "identities": [
            {"name": "web", "selector": {"namespace": "shop", "matchLabels": {"app": "web"}}},
            {"name": "db", "selector": {"namespace": "shop", "matchLabels": {"app": "db"}}}
        ],
        "rules": [
            {"name": "web-to-db", "from": "web", "to": "db",
             "ports": [{"port": PORT, "protocol": "TCP"}]}
        ]
    })
}

/// Namespace `shop`, pods `web-1` and `db-1` at workloads `web` and `db`, Policy `shop`.
pub fn shop(api: &FakeApiServer, topo: &Topology) {
    api.apply(kubeapi::namespace("shop", &[("team", "a")]))
        .unwrap();
    api.apply(pod_at(topo, "web", "web-1", &[("app", "web")]))
        .unwrap();
    api.apply(pod_at(topo, "db", "db-1", &[("app", "db")]))
        .unwrap();
    api.apply(kubeapi::policy("shop", shop_spec())).unwrap();
}

impl Cluster {
    /// The `kubernetes` part of `status --json`.
    pub fn kube(&self) -> Value {
        self.env.status_json()["kubernetes"].clone()
    }

    /// Polls `cond` every 50 ms for up to `limit`; returns how long it took, or panics with
    /// `what`, the status and the agent's log.
    pub fn eventually(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let started = Instant::now();
        while started.elapsed() < limit {
            if cond(self) {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{what}: not within {limit:?}\nstatus: {}\nlog:\n{}",
            self.kube(),
            self.env.agent.log_text()
        );
    }

    pub fn wait_synced(&self) {
        self.eventually("synced", Duration::from_secs(15), |c| {
            c.kube()["synced"] == true
        });
    }

    /// Does a TCP echo from workload `from` to `to`:PORT come back?
    pub fn reachable(&self, from: &str, to: &str, v6: bool) -> bool {
        tcp_reachable(self.env.ns(from), self.env.addr(to, v6), PORT)
    }

    /// The identity `status` says interface `ifname` is bound to (null: none).
    pub fn interface_binding(&self, ifname: &str) -> Value {
        self.env.status_json()["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == ifname)
            .map(|i| i["bound_identity"].clone())
            .unwrap_or(Value::Null)
    }
}

/// File mode's policy `name`: identities `web` and `db` by the topology's first two subnets,
/// with the rule `web` -> `db` on PORT when `allow`.
pub fn file_policy(name: &str, allow: bool) -> String {
    let rules = if allow {
        format!(
            "  rules:\n    - {{ name: web-to-db, from: web, to: db, ports: [{{ port: {PORT}, protocol: TCP }}] }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: {name} }}\nspec:\n  \
         identities:\n    - {{ name: web, cidrs: [10.200.1.0/24] }}\n    - {{ name: db, cidrs: \
         [10.200.2.0/24] }}\n{rules}"
    )
}
