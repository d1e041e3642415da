//! Where the agent at the other end of a pair listens, and where a handshake for an identity
//! may come from: the policy's `authAddress` (file mode), else the nodes running the
//! identity's pods by their `status.hostIP` (Kubernetes mode), on this agent's own port (a
//! DaemonSet listens on one port on every node).

use std::net::{IpAddr, SocketAddr};

use super::plan::PairEnd;
use crate::cluster::PodNodes;

/// The peer directory at one moment.
pub struct Peers<'a> {
    /// Kubernetes mode: where each identity's pods run.
    nodes: Option<&'a PodNodes>,
    /// This agent's `--auth-addr` (its port is every agent's).
    listen: Option<SocketAddr>,
}

impl<'a> Peers<'a> {
    pub fn new(nodes: Option<&'a PodNodes>, listen: Option<SocketAddr>) -> Self {
        Peers { nodes, listen }
    }

    /// Where the agents hosting `end`'s identity serve handshakes: its `authAddress`; else, in
    /// Kubernetes mode, every node running its pods, or only the one running the pod at
    /// `addr` when that pod is one of them.
    pub fn listeners(&self, end: &PairEnd, addr: Option<IpAddr>) -> Vec<SocketAddr> {
        if let Some(a) = end.auth_address {
            return vec![a];
        }
        let (Some(nodes), Some(port)) = (self.nodes, self.listen.map(|l| l.port())) else {
            return Vec::new();
        };
        if let Some(&host) = addr.and_then(|a| nodes.by_address.get(&canonical(a))) {
            if nodes.hosts(&end.identity, host) {
                return vec![SocketAddr::new(host, port)];
            }
        }
        nodes
            .nodes_of(&end.identity)
            .map(|host| SocketAddr::new(host, port))
            .collect()
    }

    /// Whether a handshake for `end`'s identity may come from `peer`: the policy's
    /// `authAddress` for it, else in Kubernetes mode a node running one of its pods (in file
    /// mode without `authAddress`, anywhere). A certificate copied to another host proves
    /// nothing for the pair.
    pub fn check_origin(&self, end: &PairEnd, peer: IpAddr) -> Result<(), String> {
        let peer = canonical(peer);
        if let Some(expected) = end.auth_address {
            if peer != canonical(expected.ip()) {
                return Err(format!(
                    "{} is hosted at {} by the policy, but the handshake came from {peer}",
                    end.identity,
                    expected.ip()
                ));
            }
            return Ok(());
        }
        match self.nodes {
            Some(nodes) if !nodes.hosts(&end.identity, peer) => Err(format!(
                "no pod of {} runs on the node at {peer} (by the pods' status.hostIP)",
                end.identity
            )),
            _ => Ok(()),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    fn end(identity: &str, auth_address: Option<&str>) -> PairEnd {
        PairEnd {
            identity: identity.into(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://t.test/{identity}")).unwrap(),
            auth_address: auth_address.map(|a| a.parse().unwrap()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// db runs on nodes .2 and .3 (pod 10.200.102.2 on .3); web on .1.
    fn nodes() -> PodNodes {
        let mut n = PodNodes::default();
        for (identity, pod, host) in [
            ("db", "10.200.101.2", "10.200.0.2"),
            ("db", "10.200.102.2", "10.200.0.3"),
            ("web", "10.200.1.2", "10.200.0.1"),
        ] {
            n.by_identity
                .entry(identity.into())
                .or_default()
                .insert(ip(host));
            n.by_address.insert(ip(pod), ip(host));
        }
        n
    }

    const LISTEN: &str = "10.200.0.1:7443";

    #[test]
    fn file_mode_uses_auth_address_or_nothing() {
        let peers = Peers::new(None, Some(LISTEN.parse().unwrap()));
        let db = end("db", Some("10.200.0.2:7000"));
        assert_eq!(
            peers.listeners(&db, None),
            ["10.200.0.2:7000".parse().unwrap()]
        );
        assert!(peers.listeners(&end("web", None), None).is_empty());
        assert!(peers.check_origin(&db, ip("10.200.0.2")).is_ok());
        assert!(peers.check_origin(&db, ip("::ffff:10.200.0.2")).is_ok());
        let err = peers.check_origin(&db, ip("10.200.0.9")).unwrap_err();
        assert!(err.contains("came from 10.200.0.9"), "{err}");
        // No authAddress in file mode: nothing to check against.
        assert!(peers
            .check_origin(&end("web", None), ip("10.200.0.9"))
            .is_ok());
    }

    #[test]
    fn kubernetes_mode_uses_the_nodes_running_the_pods_on_this_agents_port() {
        let n = nodes();
        let peers = Peers::new(Some(&n), Some(LISTEN.parse().unwrap()));
        let db = end("db", None);
        let all: Vec<SocketAddr> = vec![
            "10.200.0.2:7443".parse().unwrap(),
            "10.200.0.3:7443".parse().unwrap(),
        ];
        assert_eq!(peers.listeners(&db, None), all);
        // A flow's destination pod names its node.
        assert_eq!(
            peers.listeners(&db, Some(ip("10.200.102.2"))),
            ["10.200.0.3:7443".parse().unwrap()]
        );
        // An address that is not one of db's pods (web's, or unknown) does not narrow it.
        assert_eq!(peers.listeners(&db, Some(ip("10.200.1.2"))), all);
        assert_eq!(peers.listeners(&db, Some(ip("10.200.9.9"))), all);
        // An explicit authAddress wins.
        assert_eq!(
            peers.listeners(&end("db", Some("10.200.0.7:1")), None),
            ["10.200.0.7:1".parse().unwrap()]
        );
        assert!(peers.listeners(&end("cache", None), None).is_empty());
        // Without --auth-addr there is no port to dial.
        assert!(Peers::new(Some(&n), None).listeners(&db, None).is_empty());

        assert!(peers.check_origin(&db, ip("10.200.0.3")).is_ok());
        let err = peers.check_origin(&db, ip("10.200.0.1")).unwrap_err();
        assert!(
            err.contains("no pod of db runs on the node at 10.200.0.1"),
            "{err}"
        );
        assert!(peers
            .check_origin(&end("cache", None), ip("10.200.0.1"))
            .is_err());
    }
}
