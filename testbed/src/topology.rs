//! A node namespace routing between workload namespaces, like a Kubernetes node with pods:
//! workload `i` has `eth0` = 10.200.<i>.2/24 and fd00:200:<i>::2/64; its peer in the node
//! namespace is `tg-<name>` with 10.200.<i>.1/24 and fd00:200:<i>::1/64.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};

use crate::netns::NetNs;

pub struct Workload {
    pub name: String,
    pub ns: NetNs,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The node-side veth, where the agent enforces.
    pub host_if: String,
}

pub struct Topology {
    /// Dropped after the workloads (field order): their veth peers go with them.
    pub workloads: Vec<Workload>,
    pub node: NetNs,
}

impl Topology {
    /// `prefix` makes namespace names unique per test (`<prefix>-node`, `<prefix>-<workload>`).
    /// Workload `i` (from 0) gets subnet `i + 1`.
    pub fn new(prefix: &str, workloads: &[&str]) -> Result<Self> {
        let node = NetNs::new(&format!("{prefix}-node"))?;
        quiet_ipv6(&node)?;
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            node.exec_checked(&["sysctl", "-q", "-w", sysctl])?;
        }
        let mut topo = Topology {
            workloads: Vec::new(),
            node,
        };
        for (i, name) in workloads.iter().enumerate() {
            let subnet = (i + 1) as u8;
            let host_if = format!("tg-{name}");
            if host_if.len() > 15 {
                bail!("interface name {host_if} longer than 15 characters");
            }
            let ns = NetNs::new(&format!("{prefix}-{name}"))?;
            quiet_ipv6(&ns)?;
            let node = topo.node.name().to_string();
            crate::netns::ip(&[
                "-n",
                &node,
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            let v4 = Ipv4Addr::new(10, 200, subnet, 2);
            let v6: Ipv6Addr = format!("fd00:200:{subnet:x}::2").parse()?;
            let gw4 = format!("10.200.{subnet}.1");
            let gw6 = format!("fd00:200:{subnet:x}::1");
            let n = &["-n", node.as_str()];
            let w = &["-n", ns.name()];
            let ipn = |args: &[&str]| crate::netns::ip(&[n.as_slice(), args].concat());
            let ipw = |args: &[&str]| crate::netns::ip(&[w.as_slice(), args].concat());
            ipn(&["addr", "add", &format!("{gw4}/24"), "dev", &host_if])?;
            ipn(&[
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                &host_if,
                "nodad",
            ])?;
            ipn(&["link", "set", &host_if, "up"])?;
            ipw(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ipw(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ipw(&["link", "set", "eth0", "up"])?;
            ipw(&["route", "add", "default", "via", &gw4])?;
            ipw(&["-6", "route", "add", "default", "via", &gw6])?;
            topo.workloads.push(Workload {
                name: name.to_string(),
                ns,
                v4,
                v6,
                host_if,
            });
        }
        Ok(topo)
    }

    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }
}

/// No duplicate address detection in a fresh namespace: link-local addresses would otherwise
/// stay tentative for about a second after link up, delaying neighbour resolution past a
/// probe's timeout.
fn quiet_ipv6(ns: &NetNs) -> Result<()> {
    for sysctl in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ] {
        ns.exec_checked(&["sysctl", "-q", "-w", sysctl])?;
    }
    Ok(())
}
