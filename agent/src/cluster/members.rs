//! Pod addresses → identities, under the installed policy's selectors. Pure: the installer
//! feeds it cluster events and writes the [`Change`]s it returns.
//!
//! An address gets a *dynamic* entry in the exact identity map when a pod holding it is
//! selected:
//! - by exactly one identity's selector: that identity;
//! - by two or more (selectors that may overlap, and this pod has the labels of both): the
//!   reserved identity `ambiguous`, which no rule names, so the pod's traffic is denied both ways
//!   and the conflict is reported. It never gets the more permissive of the two;
//! - when two pods hold one address (an address reused while the old pod object is not deleted
//!   yet) and they do not resolve to the same identity: `ambiguous` as well;
//! - when the address lies in a CIDR of another identity: `ambiguous`.
//!
//! An address no selector takes in has no dynamic entry: the policy's CIDRs (or `world`) decide
//! it, as in file mode.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use tollgate_common::identity::{
    is_exact_identity, IdentityId, IdentityKeyV4, IdentityKeyV6, IdentityValue, IDENTITY_AMBIGUOUS,
    IDENTITY_FIRST_USER, SLOT_PREFIX_BITS,
};

use super::{ClusterEvent, PodFacts, PodKey};
use crate::policy::selector::{Labels, PodView, Selector};

/// What the policy's own entries claim: (family, address bits kept) → masked address → id.
#[derive(Debug, Default, Clone)]
pub struct StaticClaims {
    /// Prefix lengths present per family (4, 6), longest first.
    lengths: [Vec<u8>; 2],
    entries: HashMap<(u8, u8, u128), IdentityId>,
    /// The exact (/32, /128) entries, whose value is restored when a dynamic entry goes.
    exact: HashMap<IpAddr, IdentityValue>,
}

fn family_index(addr: &IpAddr) -> usize {
    usize::from(addr.is_ipv6())
}

fn bits(addr: &IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(*a)), 32),
        IpAddr::V6(a) => (u128::from(*a), 128),
    }
}

fn masked(value: u128, width: u8, len: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let shift = u32::from(width - len);
    (value >> shift) << shift
}

impl StaticClaims {
    /// From a compiled policy's identity entries (prefix lengths include the slot bits).
    pub fn new(
        v4: &[(u32, IdentityKeyV4, IdentityValue)],
        v6: &[(u32, IdentityKeyV6, IdentityValue)],
    ) -> Self {
        let mut claims = StaticClaims::default();
        let mut lengths: [BTreeSet<u8>; 2] = Default::default();
        for (prefix, key, value) in v4 {
            let len = (prefix - SLOT_PREFIX_BITS) as u8;
            let addr = IpAddr::from(key.addr);
            claims.insert(addr, len, *value, is_exact_identity(4, *prefix));
            lengths[0].insert(len);
        }
        for (prefix, key, value) in v6 {
            let len = (prefix - SLOT_PREFIX_BITS) as u8;
            let addr = IpAddr::from(key.addr);
            claims.insert(addr, len, *value, is_exact_identity(6, *prefix));
            lengths[1].insert(len);
        }
        for (i, set) in lengths.into_iter().enumerate() {
            claims.lengths[i] = set.into_iter().rev().collect();
        }
        claims
    }

    fn insert(&mut self, addr: IpAddr, len: u8, value: IdentityValue, exact: bool) {
        let (v, width) = bits(&addr);
        self.entries
            .insert((width, len, masked(v, width, len)), value.id);
        if exact {
            self.exact.insert(addr, value);
        }
    }

    /// The identity the policy's own entries give `addr` (longest prefix), if any.
    pub fn claim(&self, addr: &IpAddr) -> Option<IdentityId> {
        let (v, width) = bits(addr);
        self.lengths[family_index(addr)]
            .iter()
            .find_map(|&len| self.entries.get(&(width, len, masked(v, width, len))))
            .copied()
    }

    /// The policy's own exact entry for `addr`, to restore when a dynamic one goes.
    pub fn exact(&self, addr: &IpAddr) -> Option<IdentityValue> {
        self.exact.get(addr).copied()
    }
}

/// One address whose dynamic entry changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub addr: IpAddr,
    pub before: Option<IdentityId>,
    pub after: Option<IdentityId>,
    /// Other pods hold the address than when it last resolved (a pod gone, an address reused):
    /// flows of the old holders must not reach the new ones.
    pub new_holders: bool,
}

impl Change {
    /// The address carried another identity before: flows tracked under it must not outlive
    /// the change.
    pub fn revokes(&self) -> bool {
        self.before.is_some() && self.before != self.after
    }
}

/// A pod the agent could not give one identity, for `status`, the log and a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub pod: PodKey,
    pub reason: String,
}

/// Pods, namespaces and what their addresses resolve to.
#[derive(Debug, Default, Clone)]
pub struct Membership {
    pods: HashMap<PodKey, PodFacts>,
    namespaces: HashMap<String, Labels>,
    /// Selector of declared identity `i` (id `IDENTITY_FIRST_USER + i`).
    selectors: Vec<(usize, Selector)>,
    names: Vec<String>,
    statics: StaticClaims,
    /// Pods holding each address (normally one).
    holders: HashMap<IpAddr, BTreeSet<PodKey>>,
    /// The dynamic entries as they should be in the live slot.
    assigned: HashMap<IpAddr, IdentityId>,
    /// The pods holding each assigned address when it last resolved.
    resolved_holders: HashMap<IpAddr, BTreeSet<PodKey>>,
    conflicts: BTreeMap<PodKey, String>,
}

impl Membership {
    /// Takes the selectors (by identity index) and static claims of a newly installed policy
    /// and recomputes every address. Returns the assignment to write into the new slot.
    pub fn set_policy(
        &mut self,
        identities: &[(String, Option<Selector>)],
        statics: StaticClaims,
    ) -> &HashMap<IpAddr, IdentityId> {
        self.selectors = identities
            .iter()
            .enumerate()
            .filter_map(|(i, (_, s))| s.clone().map(|s| (i, s)))
            .collect();
        self.names = identities.iter().map(|(n, _)| n.clone()).collect();
        self.statics = statics;
        self.conflicts.clear();
        let addrs: Vec<IpAddr> = self.holders.keys().copied().collect();
        let mut assigned = HashMap::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(id) = self.resolve(&addr) {
                assigned.insert(addr, id);
            }
        }
        self.assigned = assigned;
        self.resolved_holders = self.holders.clone();
        &self.assigned
    }

    /// Whether the installed policy selects pods at all.
    pub fn has_selectors(&self) -> bool {
        !self.selectors.is_empty()
    }

    pub fn assigned(&self) -> &HashMap<IpAddr, IdentityId> {
        &self.assigned
    }

    pub fn statics(&self) -> &StaticClaims {
        &self.statics
    }

    pub fn conflicts(&self) -> impl Iterator<Item = Conflict> + '_ {
        self.conflicts.iter().map(|(pod, reason)| Conflict {
            pod: pod.clone(),
            reason: reason.clone(),
        })
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn pod(&self, key: &PodKey) -> Option<&PodFacts> {
        self.pods.get(key)
    }

    /// Local pods (on `node`) that take part, with the identity their addresses resolve to.
    pub fn local_pods<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = (&'a PodFacts, Option<IdentityId>)> + 'a {
        self.pods
            .values()
            .filter(move |p| p.eligible && p.node_name.as_deref() == Some(node))
            .map(|p| {
                let id = p.ips.first().and_then(|a| self.assigned.get(a)).copied();
                (p, id)
            })
    }

    /// Where the pods of each identity run: every pod that takes part, has a node address and
    /// an address that resolves to a declared identity.
    pub fn pod_nodes(&self) -> super::PodNodes {
        let mut nodes = super::PodNodes::default();
        for pod in self.pods.values().filter(|p| p.eligible) {
            let Some(host) = pod.host_ip else { continue };
            for ip in &pod.ips {
                let Some(name) = self
                    .assigned
                    .get(ip)
                    .and_then(|id| id.checked_sub(IDENTITY_FIRST_USER))
                    .and_then(|i| self.names.get(i as usize))
                else {
                    continue;
                };
                nodes.by_address.insert(*ip, host);
                nodes
                    .by_identity
                    .entry(name.clone())
                    .or_default()
                    .insert(host);
            }
        }
        nodes
    }

    /// Applies events and returns how the dynamic entries change, in address order.
    pub fn apply(&mut self, events: Vec<ClusterEvent>) -> Vec<Change> {
        let mut touched: HashSet<IpAddr> = HashSet::new();
        for event in events {
            match event {
                ClusterEvent::Pod(pod) => self.upsert_pod(pod, &mut touched),
                ClusterEvent::PodGone(key) => self.remove_pod(&key, &mut touched),
                ClusterEvent::Pods(pods) => {
                    let keep: HashSet<PodKey> = pods.iter().map(PodFacts::key).collect();
                    let gone: Vec<PodKey> = self
                        .pods
                        .keys()
                        .filter(|k| !keep.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.remove_pod(&key, &mut touched);
                    }
                    for pod in pods {
                        self.upsert_pod(pod, &mut touched);
                    }
                }
                ClusterEvent::Namespace { name, labels } => {
                    if self.namespaces.get(&name) != Some(&labels) {
                        self.namespaces.insert(name.clone(), labels);
                        self.touch_namespace(&name, &mut touched);
                    }
                }
                ClusterEvent::NamespaceGone(name) => {
                    if self.namespaces.remove(&name).is_some() {
                        self.touch_namespace(&name, &mut touched);
                    }
                }
                ClusterEvent::Namespaces(list) => {
                    let fresh: HashMap<String, Labels> = list.into_iter().collect();
                    let changed: Vec<String> = self
                        .namespaces
                        .iter()
                        .filter(|(n, l)| fresh.get(*n) != Some(*l))
                        .map(|(n, _)| n.clone())
                        .chain(
                            fresh
                                .keys()
                                .filter(|n| !self.namespaces.contains_key(*n))
                                .cloned(),
                        )
                        .collect();
                    self.namespaces = fresh;
                    for name in changed {
                        self.touch_namespace(&name, &mut touched);
                    }
                }
            }
        }
        let mut touched: Vec<IpAddr> = touched.into_iter().collect();
        touched.sort();
        let mut changes = Vec::new();
        for addr in touched {
            let after = self.resolve(&addr);
            let before = match after {
                Some(id) => self.assigned.insert(addr, id),
                None => self.assigned.remove(&addr),
            };
            let holders = self.holders.get(&addr).cloned().unwrap_or_default();
            let new_holders = self
                .resolved_holders
                .get(&addr)
                .is_none_or(|h| *h != holders);
            if holders.is_empty() {
                self.resolved_holders.remove(&addr);
            } else {
                self.resolved_holders.insert(addr, holders);
            }
            if before != after {
                changes.push(Change {
                    addr,
                    before,
                    after,
                    new_holders,
                });
            }
        }
        changes
    }

    fn upsert_pod(&mut self, pod: PodFacts, touched: &mut HashSet<IpAddr>) {
        let key = pod.key();
        if self.pods.get(&key) == Some(&pod) {
            return;
        }
        self.remove_pod(&key, touched);
        // Only pods that take part hold their addresses: a finished pod keeps its podIPs in the
        // API for hours while the CNI hands the address to a new pod.
        if pod.eligible {
            for ip in &pod.ips {
                self.holders.entry(*ip).or_default().insert(key.clone());
                touched.insert(*ip);
            }
        }
        self.pods.insert(key, pod);
    }

    fn remove_pod(&mut self, key: &PodKey, touched: &mut HashSet<IpAddr>) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        self.conflicts.remove(key);
        if !old.eligible {
            return;
        }
        for ip in &old.ips {
            if let Some(holders) = self.holders.get_mut(ip) {
                holders.remove(key);
                if holders.is_empty() {
                    self.holders.remove(ip);
                }
            }
            touched.insert(*ip);
        }
    }

    /// A namespace's labels changed: its pods may move, if any selector reads namespace labels.
    fn touch_namespace(&mut self, name: &str, touched: &mut HashSet<IpAddr>) {
        if !self
            .selectors
            .iter()
            .any(|(_, s)| s.reads_namespace_labels())
        {
            return;
        }
        for pod in self
            .pods
            .values()
            .filter(|p| p.namespace == name && p.eligible)
        {
            touched.extend(pod.ips.iter().copied());
        }
    }

    /// The identity `pod` is selected into: `None` (no selector, or not taking part), one
    /// identity, or `ambiguous` (recorded as a conflict).
    fn identity_of(&mut self, key: &PodKey) -> Option<IdentityId> {
        let pod = self.pods.get(key)?;
        if !pod.eligible {
            return None;
        }
        let view = PodView {
            namespace: &pod.namespace,
            labels: &pod.labels,
            service_account: &pod.service_account,
            namespace_labels: self.namespaces.get(&pod.namespace),
        };
        let matched: Vec<usize> = self
            .selectors
            .iter()
            .filter(|(_, s)| s.matches(&view))
            .map(|(i, _)| *i)
            .collect();
        match matched.as_slice() {
            [] => {
                self.conflicts.remove(key);
                None
            }
            [i] => {
                self.conflicts.remove(key);
                Some(IDENTITY_FIRST_USER + *i as u32)
            }
            several => {
                let names: Vec<&str> = several.iter().map(|i| self.names[*i].as_str()).collect();
                self.conflicts.insert(
                    key.clone(),
                    format!(
                        "selected by identities {}; a pod may belong to one identity only, so it \
                         gets neither (its traffic is denied)",
                        names.join(" and ")
                    ),
                );
                Some(IDENTITY_AMBIGUOUS)
            }
        }
    }

    /// What `addr` should resolve to through its dynamic entry (`None`: no dynamic entry).
    fn resolve(&mut self, addr: &IpAddr) -> Option<IdentityId> {
        let holders: Vec<PodKey> = self.holders.get(addr)?.iter().cloned().collect();
        let ids: BTreeSet<Option<IdentityId>> =
            holders.iter().map(|k| self.identity_of(k)).collect();
        let id = match ids.len() {
            1 => ids.into_iter().next().flatten()?,
            _ => {
                for k in &holders {
                    self.conflicts.insert(
                        k.clone(),
                        format!(
                            "address {addr} is held by {} pods that resolve to different \
                             identities; it gets neither until one is gone",
                            holders.len()
                        ),
                    );
                }
                IDENTITY_AMBIGUOUS
            }
        };
        // The node's own addresses are never a pod's: they keep `host` (or their identity).
        if self
            .statics
            .exact(addr)
            .is_some_and(|v| v.is_node_address())
        {
            for k in &holders {
                self.conflicts.insert(
                    k.clone(),
                    format!("address {addr} is one of the node's own; it stays the node's"),
                );
            }
            return None;
        }
        match self.statics.claim(addr) {
            Some(claimed) if claimed != id && id != IDENTITY_AMBIGUOUS => {
                for k in &holders {
                    let name = |id: IdentityId| {
                        id.checked_sub(IDENTITY_FIRST_USER)
                            .and_then(|i| self.names.get(i as usize))
                            .map_or_else(|| format!("#{id}"), Clone::clone)
                    };
                    let reason = format!(
                        "address {addr} is selected into {} but lies in a CIDR of {}; it gets \
                         neither",
                        name(id),
                        name(claimed)
                    );
                    self.conflicts.insert(k.clone(), reason);
                }
                Some(IDENTITY_AMBIGUOUS)
            }
            _ => Some(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::selector::{LabelSelector, NamespaceMatch, Op, Requirement};

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ips: &[&str]) -> PodFacts {
        PodFacts {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: "default".into(),
            node_name: Some("node-a".into()),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            host_ip: Some("10.200.0.1".parse().unwrap()),
            eligible: true,
        }
    }

    fn app(ns: &str, value: &str) -> Selector {
        Selector {
            namespace: NamespaceMatch::Named(ns.into()),
            pods: LabelSelector {
                requirements: vec![Requirement {
                    key: "app".into(),
                    op: Op::In([value.to_string()].into()),
                }],
            },
            service_account: None,
        }
    }

    fn membership() -> Membership {
        let mut m = Membership::default();
        m.set_policy(
            &[
                ("web".into(), Some(app("shop", "web"))),
                ("db".into(), Some(app("shop", "db"))),
                ("static".into(), None),
            ],
            StaticClaims::default(),
        );
        m
    }

    const WEB: IdentityId = IDENTITY_FIRST_USER;
    const DB: IdentityId = IDENTITY_FIRST_USER + 1;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pod_nodes_follow_the_pods_of_each_identity() {
        let mut m = membership();
        let mut on_b = pod("shop", "web-2", &[("app", "web")], &["10.200.101.2"]);
        on_b.host_ip = Some(ip("10.200.0.2"));
        let mut unknown = pod("shop", "web-3", &[("app", "web")], &["10.200.101.3"]);
        unknown.host_ip = None;
        m.apply(vec![
            ClusterEvent::Pod(pod("shop", "web-1", &[("app", "web")], &["10.200.1.2"])),
            ClusterEvent::Pod(on_b),
            ClusterEvent::Pod(unknown),
            ClusterEvent::Pod(pod("shop", "db-1", &[("app", "db")], &["10.200.1.3"])),
            // No identity: not a node of anything.
            ClusterEvent::Pod(pod("shop", "x", &[("app", "x")], &["10.200.1.9"])),
        ]);
        let nodes = m.pod_nodes();
        let web: Vec<IpAddr> = nodes.nodes_of("web").collect();
        assert_eq!(web, [ip("10.200.0.1"), ip("10.200.0.2")]);
        assert!(nodes.hosts("db", ip("10.200.0.1")));
        assert!(!nodes.hosts("db", ip("10.200.0.2")));
        assert_eq!(
            nodes.by_address.get(&ip("10.200.101.2")),
            Some(&ip("10.200.0.2"))
        );
        assert_eq!(nodes.by_address.get(&ip("10.200.1.9")), None);
        assert_eq!(nodes.by_address.get(&ip("10.200.101.3")), None);
        // A pod that finishes no longer counts its node.
        let mut done = pod("shop", "db-1", &[("app", "db")], &["10.200.1.3"]);
        done.eligible = false;
        m.apply(vec![ClusterEvent::Pod(done)]);
        assert_eq!(m.pod_nodes().nodes_of("db").count(), 0);
    }

    #[test]
    fn pods_come_and_go() {
        let mut m = membership();
        let changes = m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "web-1",
            &[("app", "web")],
            &["10.200.1.2", "fd00:200::2"],
        ))]);
        assert_eq!(changes.len(), 2);
        assert!(changes
            .iter()
            .all(|c| c.after == Some(WEB) && c.before.is_none()));
        // Unrelated pods and other namespaces get nothing.
        let none = m.apply(vec![
            ClusterEvent::Pod(pod("shop", "x", &[("app", "other")], &["10.200.1.3"])),
            ClusterEvent::Pod(pod("dev", "w", &[("app", "web")], &["10.200.1.4"])),
        ]);
        assert!(none.is_empty());
        let gone = m.apply(vec![ClusterEvent::PodGone(("shop".into(), "web-1".into()))]);
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|c| c.revokes() && c.after.is_none()));
        assert!(m.assigned().is_empty());
    }

    #[test]
    fn a_label_change_moves_a_pod_and_revokes_its_old_identity() {
        let mut m = membership();
        m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "p",
            &[("app", "web")],
            &["10.200.1.2"],
        ))]);
        let moved = m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "p",
            &[("app", "db")],
            &["10.200.1.2"],
        ))]);
        assert_eq!(
            moved,
            vec![Change {
                addr: ip("10.200.1.2"),
                before: Some(WEB),
                after: Some(DB),
                new_holders: false,
            }]
        );
        assert!(moved[0].revokes());
    }

    #[test]
    fn an_address_reused_while_the_old_pod_lingers_is_ambiguous_until_it_goes() {
        let mut m = membership();
        m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "old",
            &[("app", "web")],
            &["10.200.1.2"],
        ))]);
        let both = m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "new",
            &[("app", "db")],
            &["10.200.1.2"],
        ))]);
        assert_eq!(both[0].after, Some(IDENTITY_AMBIGUOUS));
        assert_eq!(m.conflicts().count(), 2);
        assert!(both[0].new_holders);
        let settled = m.apply(vec![ClusterEvent::PodGone(("shop".into(), "old".into()))]);
        assert_eq!(settled[0].after, Some(DB));
        assert!(settled[0].new_holders);
        assert_eq!(m.conflicts().count(), 0);
    }

    #[test]
    fn a_pod_two_selectors_match_gets_neither() {
        let mut m = Membership::default();
        let tier = Selector {
            namespace: NamespaceMatch::Any,
            pods: LabelSelector {
                requirements: vec![Requirement {
                    key: "tier".into(),
                    op: Op::Exists,
                }],
            },
            service_account: None,
        };
        m.set_policy(
            &[
                ("web".into(), Some(app("shop", "web"))),
                ("tiered".into(), Some(tier)),
            ],
            StaticClaims::default(),
        );
        let c = m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "p",
            &[("app", "web"), ("tier", "x")],
            &["10.200.1.2"],
        ))]);
        assert_eq!(c[0].after, Some(IDENTITY_AMBIGUOUS));
        let conflict = m.conflicts().next().unwrap();
        assert!(
            conflict.reason.contains("web and tiered"),
            "{}",
            conflict.reason
        );
    }

    #[test]
    fn finished_and_host_network_pods_take_no_part() {
        let mut m = membership();
        let mut p = pod("shop", "p", &[("app", "web")], &["10.200.1.2"]);
        p.eligible = false;
        assert!(m.apply(vec![ClusterEvent::Pod(p.clone())]).is_empty());
        p.eligible = true;
        assert_eq!(m.apply(vec![ClusterEvent::Pod(p.clone())]).len(), 1);
        p.eligible = false;
        let c = m.apply(vec![ClusterEvent::Pod(p)]);
        assert!(c[0].revokes() && c[0].after.is_none());
    }

    #[test]
    fn a_finished_pod_still_listing_an_address_does_not_hold_it() {
        let mut m = membership();
        let mut done = pod("shop", "job-1", &[("app", "web")], &["10.200.1.2"]);
        done.eligible = false;
        let c = m.apply(vec![
            ClusterEvent::Pod(done),
            ClusterEvent::Pod(pod("shop", "db-1", &[("app", "db")], &["10.200.1.2"])),
        ]);
        assert_eq!(c[0].after, Some(DB));
        assert_eq!(m.conflicts().count(), 0);
    }

    #[test]
    fn a_relist_removes_pods_it_does_not_mention() {
        let mut m = membership();
        m.apply(vec![
            ClusterEvent::Pod(pod("shop", "a", &[("app", "web")], &["10.200.1.2"])),
            ClusterEvent::Pod(pod("shop", "b", &[("app", "web")], &["10.200.1.3"])),
        ]);
        let c = m.apply(vec![ClusterEvent::Pods(vec![pod(
            "shop",
            "b",
            &[("app", "web")],
            &["10.200.1.3"],
        )])]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].addr, ip("10.200.1.2"));
        assert_eq!(m.pod_count(), 1);
    }

    #[test]
    fn namespace_labels_move_pods() {
        let mut m = Membership::default();
        let team = Selector {
            namespace: NamespaceMatch::Labels(LabelSelector {
                requirements: vec![Requirement {
                    key: "team".into(),
                    op: Op::In(["a".to_string()].into()),
                }],
            }),
            pods: LabelSelector::default(),
            service_account: None,
        };
        m.set_policy(&[("team-a".into(), Some(team))], StaticClaims::default());
        assert!(m
            .apply(vec![ClusterEvent::Pod(pod("x", "p", &[], &["10.200.1.2"]))])
            .is_empty());
        let labels: Labels = [("team".to_string(), "a".to_string())].into();
        let c = m.apply(vec![ClusterEvent::Namespace {
            name: "x".into(),
            labels,
        }]);
        assert_eq!(c[0].after, Some(IDENTITY_FIRST_USER));
        let c = m.apply(vec![ClusterEvent::NamespaceGone("x".into())]);
        assert!(c[0].revokes());
    }

    #[test]
    fn an_address_in_another_identitys_cidr_is_ambiguous() {
        let mut m = Membership::default();
        let cidr_owner = IdentityValue {
            id: IDENTITY_FIRST_USER + 1,
            ..Default::default()
        };
        let statics = StaticClaims::new(
            &[(
                SLOT_PREFIX_BITS + 24,
                IdentityKeyV4 {
                    slot: 0,
                    addr: [10, 200, 9, 0],
                },
                cidr_owner,
            )],
            &[],
        );
        assert_eq!(statics.claim(&ip("10.200.9.7")), Some(cidr_owner.id));
        assert_eq!(statics.claim(&ip("10.200.8.7")), None);
        m.set_policy(
            &[
                ("web".into(), Some(app("shop", "web"))),
                ("nets".into(), None),
            ],
            statics,
        );
        let c = m.apply(vec![
            ClusterEvent::Pod(pod("shop", "in", &[("app", "web")], &["10.200.9.7"])),
            ClusterEvent::Pod(pod("shop", "out", &[("app", "web")], &["10.200.8.7"])),
        ]);
        assert_eq!(c[0].after, Some(WEB));
        assert_eq!(c[1].after, Some(IDENTITY_AMBIGUOUS));
        assert!(m.conflicts().any(|c| c.reason.contains("CIDR of nets")));
    }

    #[test]
    fn a_node_address_is_never_a_pods() {
        let mut m = Membership::default();
        let host = IdentityValue {
            id: tollgate_common::identity::IDENTITY_HOST,
            ..Default::default()
        };
        let statics = StaticClaims::new(
            &[(
                SLOT_PREFIX_BITS + 32,
                IdentityKeyV4 {
                    slot: 0,
                    addr: [10, 200, 0, 1],
                },
                host,
            )],
            &[],
        );
        m.set_policy(&[("web".into(), Some(app("shop", "web")))], statics);
        let c = m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "liar",
            &[("app", "web")],
            &["10.200.0.1"],
        ))]);
        assert!(c.is_empty());
        assert!(m.conflicts().any(|c| c.reason.contains("node's own")));
    }

    #[test]
    fn a_new_policy_recomputes_every_address() {
        let mut m = membership();
        m.apply(vec![ClusterEvent::Pod(pod(
            "shop",
            "p",
            &[("app", "web")],
            &["10.200.1.2"],
        ))]);
        let assigned = m.set_policy(
            &[("db-only".into(), Some(app("shop", "db")))],
            StaticClaims::default(),
        );
        assert!(assigned.is_empty());
    }
}
