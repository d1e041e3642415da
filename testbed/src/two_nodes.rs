//! Two nodes, each a [`Topology`] with its own workloads, joined by a veth pair `up0` as if by
//! the cluster network: node A is 10.200.0.1 / fd00:200::1, node B 10.200.0.2 / fd00:200::2,
//! and each routes the other's workload subnets over it. Node A's workloads are numbered from
//! subnet 1, node B's from subnet 101, so every pod address is unique.

use std::net::IpAddr;

use anyhow::Result;

use crate::{netns::ip, Topology, TopologyOptions};

/// The name of the link between the nodes, on both sides.
pub const UPLINK: &str = "up0";
pub const NODE_A_V4: &str = "10.200.0.1";
pub const NODE_B_V4: &str = "10.200.0.2";
pub const NODE_A_V6: &str = "fd00:200::1";
pub const NODE_B_V6: &str = "fd00:200::2";
/// The subnet number of node B's first workload.
pub const NODE_B_FIRST_SUBNET: u8 = 101;

/// The SPIFFE IDs of the workloads of [`mtls_policy`].
pub const WEB_ID: &str = "spiffe://shop.test/ns/shop/sa/web";
pub const ROGUE_ID: &str = "spiffe://shop.test/ns/shop/sa/rogue";
pub const DB_ID: &str = "spiffe://shop.test/ns/shop/sa/db";

/// The policy of the authentication tests and demo, for `TwoNodes` with `web` and `rogue` on
/// node A and `db` on node B: `web → db` and `rogue → db` on TCP `port` need
/// `authentication: mtls`; each node's agent serves handshakes on its address and `auth_port`.
pub fn mtls_policy(name: &str, port: u16, auth_port: u16) -> String {
    format!(
        r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: {name} }}
spec:
  identities:
    - name: web
      spiffeId: {WEB_ID}
      authAddress: "{NODE_A_V4}:{auth_port}"
      cidrs: ["10.200.1.2/32", "fd00:200:1::2/128"]
      interfaces: [tg-web]
    - name: rogue
      spiffeId: {ROGUE_ID}
      authAddress: "{NODE_A_V4}:{auth_port}"
      cidrs: ["10.200.2.2/32", "fd00:200:2::2/128"]
      interfaces: [tg-rogue]
    - name: db
      spiffeId: {DB_ID}
      authAddress: "{NODE_B_V4}:{auth_port}"
      cidrs: ["10.200.101.2/32", "fd00:200:65::2/128"]
      interfaces: [tg-db]
  rules:
    - name: web-to-db
      from: web
      to: db
      ports: [{{ protocol: TCP, port: {port} }}]
      authentication: mtls
    - name: rogue-to-db
      from: rogue
      to: db
      ports: [{{ protocol: TCP, port: {port} }}]
      authentication: mtls
"#
    )
}

pub struct TwoNodes {
    /// Dropped first (field order): the link goes with either namespace.
    pub a: Topology,
    pub b: Topology,
}

impl TwoNodes {
    /// Namespaces `<prefix>-a-*` and `<prefix>-b-*`.
    pub fn new(
        prefix: &str,
        on_a: &[&str],
        on_b: &[&str],
        options: TopologyOptions,
    ) -> Result<Self> {
        let a = Topology::with_first_subnet(&format!("{prefix}-a"), on_a, options, 1)?;
        let b = Topology::with_first_subnet(
            &format!("{prefix}-b"),
            on_b,
            options,
            NODE_B_FIRST_SUBNET,
        )?;
        let (na, nb) = (a.node.name().to_owned(), b.node.name().to_owned());
        ip(&[
            "-n", &na, "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK, "netns", &nb,
        ])?;
        let mtu = options.mtu.to_string();
        for (ns, v4, v6) in [(&na, NODE_A_V4, NODE_A_V6), (&nb, NODE_B_V4, NODE_B_V6)] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", UPLINK])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                UPLINK,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", UPLINK, "mtu", &mtu, "up"])?;
        }
        for (ns, topo, via4, via6) in [
            (&na, &b, NODE_B_V4, NODE_B_V6),
            (&nb, &a, NODE_A_V4, NODE_A_V6),
        ] {
            for w in &topo.workloads {
                let net4 = format!("{}/24", subnet_v4(w.v4.into()));
                ip(&["-n", ns, "route", "add", &net4, "via", via4])?;
                let net6 = format!("{}/64", subnet_v6(w.v6.into()));
                ip(&["-n", ns, "-6", "route", "add", &net6, "via", via6])?;
            }
        }
        Ok(TwoNodes { a, b })
    }
}

fn subnet_v4(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.0", o[0], o[1], o[2])
        }
        IpAddr::V6(_) => unreachable!("an IPv4 address"),
    }
}

fn subnet_v6(addr: IpAddr) -> String {
    match addr {
        IpAddr::V6(a) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}:{:x}::", s[0], s[1], s[2], s[3])
        }
        IpAddr::V4(_) => unreachable!("an IPv6 address"),
    }
}
