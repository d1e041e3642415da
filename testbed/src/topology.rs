//! A node namespace routing between workload namespaces, like a Kubernetes node with pods:
//! workload `i` has `eth0` = 10.200.<i>.2/24 and fd00:200:<i>::2/64; its peer in the node
//! namespace is `tg-<name>` with 10.200.<i>.1/24 and fd00:200:<i>::1/64. Options set the MTU of
//! both veth ends and can turn segmentation and checksum offloads off, so tests can drive the
//! datapath with GSO super-packets (the default, as on a real node) or with plain wire-sized
//! frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _, Result};

use crate::netns::NetNs;

pub struct Workload {
    pub name: String,
    pub ns: NetNs,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The node-side veth, where the agent enforces.
    pub host_if: String,
}

/// How the veth pairs are configured; `Default` is what a fresh veth gets (MTU 1500, offloads
/// on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopologyOptions {
    /// MTU of both ends of every veth pair.
    pub mtu: u32,
    /// Leave TSO/GSO/GRO, scatter-gather and checksum offloads on. Off, every skb the datapath
    /// sees is one linear wire-sized frame.
    pub offloads: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            mtu: 1500,
            offloads: true,
        }
    }
}

/// The `ethtool -K` arguments that turn off every offload that makes skbs larger than a frame
/// or non-linear.
const OFFLOADS_OFF: [&str; 12] = [
    "tso", "off", "gso", "off", "gro", "off", "sg", "off", "tx", "off", "rx", "off",
];

pub struct Topology {
    /// Dropped after the workloads (field order): their veth peers go with them.
    pub workloads: Vec<Workload>,
    pub node: NetNs,
    prefix: String,
    options: TopologyOptions,
    /// The subnet of the first workload (10.200.<first_subnet>.0/24).
    first_subnet: u8,
}

impl Topology {
    /// `prefix` makes namespace names unique per test (`<prefix>-node`, `<prefix>-<workload>`).
    /// Workload `i` (from 0) gets subnet `i + 1`.
    pub fn new(prefix: &str, workloads: &[&str]) -> Result<Self> {
        Self::with_options(prefix, workloads, TopologyOptions::default())
    }

    /// Like `new`, with the veth pairs configured by `options`.
    pub fn with_options(
        prefix: &str,
        workloads: &[&str],
        options: TopologyOptions,
    ) -> Result<Self> {
        Self::with_first_subnet(prefix, workloads, options, 1)
    }

    /// Like `with_options`, numbering the workloads' subnets from `first_subnet` (two nodes of
    /// one test must not share pod subnets).
    pub fn with_first_subnet(
        prefix: &str,
        workloads: &[&str],
        options: TopologyOptions,
        first_subnet: u8,
    ) -> Result<Self> {
        if first_subnet == 0 {
            bail!("subnet 0 is the nodes' own link");
        }
        let node = NetNs::new(&format!("{prefix}-node"))?;
        quiet_ipv6(&node)?;
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            node.exec_checked(&["sysctl", "-q", "-w", sysctl])?;
        }
        let mut topo = Topology {
            workloads: Vec::new(),
            node,
            prefix: prefix.to_string(),
            options,
            first_subnet,
        };
        for name in workloads {
            topo.add_workload(name)?;
        }
        Ok(topo)
    }

    /// Adds workload `name` behind a new veth `tg-<name>`, in the next subnet (`i + 1` for the
    /// `i`-th workload, counted from the first subnet). Works while an agent runs, as a pod
    /// created on a live node.
    pub fn add_workload(&mut self, name: &str) -> Result<&Workload> {
        let subnet = self.first_subnet + self.workloads.len() as u8;
        let host_if = format!("tg-{name}");
        if host_if.len() > 15 {
            bail!("interface name {host_if} longer than 15 characters");
        }
        let ns = NetNs::new(&format!("{}-{name}", self.prefix))?;
        quiet_ipv6(&ns)?;
        let node = self.node.name().to_string();
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
        let mtu = self.options.mtu.to_string();
        ipn(&["link", "set", &host_if, "mtu", &mtu])?;
        ipw(&["link", "set", "eth0", "mtu", &mtu])?;
        if !self.options.offloads {
            disable_offloads(&self.node, &host_if)?;
            disable_offloads(&ns, "eth0")?;
        }
        ipn(&["link", "set", &host_if, "up"])?;
        ipw(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ipw(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        ipw(&["link", "set", "eth0", "up"])?;
        ipw(&["route", "add", "default", "via", &gw4])?;
        ipw(&["-6", "route", "add", "default", "via", &gw6])?;
        self.workloads.push(Workload {
            name: name.to_string(),
            ns,
            v4,
            v6,
            host_if,
        });
        Ok(self.workloads.last().expect("just pushed"))
    }

    pub fn workload(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }
}

impl Workload {
    /// Adds `addr/prefix_len` to the workload's eth0 (without duplicate address detection), e.g.
    /// an address of its subnet that no identity claims. It goes away with the namespace.
    pub fn add_address(&self, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let cidr = format!("{addr}/{prefix_len}");
        let mut args = vec!["-n", self.ns.name(), "addr", "add", &cidr, "dev", "eth0"];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        crate::netns::ip(&args)
    }
}

fn disable_offloads(ns: &NetNs, interface: &str) -> Result<()> {
    ns.exec_checked(&[&["ethtool", "-K", interface][..], &OFFLOADS_OFF].concat())
        .context("turning offloads off (is ethtool installed?)")
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
