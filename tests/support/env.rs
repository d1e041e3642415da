//! A node with workloads and a real agent enforcing on their `tg-*` interfaces: the fixture of
//! the namespace and traffic tests, which add their own helpers to it (inherent impls in each
//! test binary).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use tollgate_testbed::{AgentProcess, NetNs, Topology, TopologyOptions};

/// The `tollgate` binary of this build.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tollgate");

/// A topology, an agent enforcing on its `tg-*` interfaces, and a scratch directory. Fields drop
/// in order: the agent stops and uninstalls first, then namespaces go, then files.
pub struct AgentEnv {
    pub agent: AgentProcess,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
}

impl AgentEnv {
    /// Namespaces `<ns_prefix>-*` with `workloads`, pins under the tests' directory as
    /// `<pin_name>-<pid>`, the agent started with `policy`.
    pub fn start(
        ns_prefix: &str,
        pin_name: &str,
        workloads: &[&str],
        options: TopologyOptions,
        policy: &str,
    ) -> AgentEnv {
        Self::start_with_args(ns_prefix, pin_name, workloads, options, policy, &[])
    }

    /// Like `start`, with more `tollgate agent` arguments; `{dir}` in them stands for the
    /// scratch directory.
    pub fn start_with_args(
        ns_prefix: &str,
        pin_name: &str,
        workloads: &[&str],
        options: TopologyOptions,
        policy: &str,
        extra_args: &[&str],
    ) -> AgentEnv {
        super::require_root();
        let topo = Topology::with_options(ns_prefix, workloads, options).expect("topology");
        let dir = tempfile::tempdir().expect("tempdir");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        let extra: Vec<String> = extra_args
            .iter()
            .map(|a| a.replace("{dir}", &dir.path().display().to_string()))
            .collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let agent = AgentProcess::start_with_args(
            Path::new(BINARY),
            &topo.node,
            "tg-*",
            &policy_path,
            dir.path(),
            &super::test_pin_dir(pin_name),
            &extra,
        )
        .expect("agent starts");
        AgentEnv { agent, topo, dir }
    }

    pub fn addr(&self, workload: &str, v6: bool) -> IpAddr {
        let w = self.topo.workload(workload);
        if v6 {
            IpAddr::V6(w.v6)
        } else {
            IpAddr::V4(w.v4)
        }
    }

    pub fn ns(&self, workload: &str) -> &NetNs {
        &self.topo.workload(workload).ns
    }

    /// Writes `text` to `name` in the scratch directory.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `tollgate status --json`.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.agent.cli(&["status", "--json"]).unwrap();
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// A verdict counter from `status`; None if the agent does not know the verdict.
    pub fn verdict(&self, name: &str) -> Option<u64> {
        self.status_json()["verdicts"]
            .as_array()
            .expect("verdicts in status")
            .iter()
            .find(|v| v[0] == name)
            .map(|v| v[1].as_u64().unwrap())
    }

    pub fn verdict_count(&self, name: &str) -> u64 {
        self.verdict(name)
            .unwrap_or_else(|| panic!("status has no verdict {name}"))
    }
}
