//! Kubernetes mode (`tollgate agent --kubernetes`): identities from pods, policy from `Policy`
//! custom resources.
//!
//! - [`watch`] lists and watches Pods, Namespaces and `tollgate.dev/v1alpha1` Policies with the
//!   `kube` crate and turns what it sees into [`ClusterEvent`]s and merged policies for the
//!   installer, the one writer of the maps.
//! - [`merge`] merges every Policy object into one policy (an invalid object is skipped whole).
//! - [`members`] decides, pod by pod, which identity each pod address belongs to under the
//!   installed policy's selectors, and what changes in the maps when a pod or namespace does.
//! - [`routes`] finds a local pod's host-side interface, to bind it to the pod's identity.

pub mod members;
pub mod merge;
pub mod routes;
pub mod watch;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{policy::selector::Labels, wire::KubernetesStatus};

/// Status shared by the watchers (sync, errors, policy objects) and the installer (pods,
/// conflicts): what `status`, `/readyz` and the metrics read.
pub type SharedStatus = Arc<Mutex<KubernetesStatus>>;

/// A pod, by namespace and name.
pub type PodKey = (String, String);

/// What the agent needs of a Pod object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub service_account: String,
    /// `spec.nodeName`: the pod is local when it is this agent's node.
    pub node_name: Option<String>,
    /// `status.podIPs`, parsed; addresses that do not parse are left out (and logged).
    pub ips: Vec<IpAddr>,
    /// `status.hostIP`: the address of the pod's node, where its node's agent serves
    /// handshakes (`None` until the kubelet reports it, or if it does not parse).
    pub host_ip: Option<IpAddr>,
    /// Whether the pod takes part at all: not host-network, not finished (phase `Succeeded` or
    /// `Failed`). A `Pending` pod with addresses takes part: its init containers use the network.
    pub eligible: bool,
}

impl PodFacts {
    pub fn key(&self) -> PodKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Where the pods of each identity run, by node address (`status.hostIP`): the agents a pair
/// is authenticated with in Kubernetes mode. Published by the installer as pods come and go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNodes {
    /// Identity name → the addresses of the nodes running its pods.
    pub by_identity: HashMap<String, BTreeSet<IpAddr>>,
    /// Pod address → its node's address, for addresses that resolve to an identity.
    pub by_address: HashMap<IpAddr, IpAddr>,
}

impl PodNodes {
    /// The nodes running pods of `identity`.
    pub fn nodes_of(&self, identity: &str) -> impl Iterator<Item = IpAddr> + '_ {
        self.by_identity
            .get(identity)
            .into_iter()
            .flatten()
            .copied()
    }

    /// Whether a pod of `identity` runs on the node at `host`.
    pub fn hosts(&self, identity: &str, host: IpAddr) -> bool {
        self.by_identity
            .get(identity)
            .is_some_and(|nodes| nodes.contains(&host))
    }
}

/// A change the watchers saw, in the order they saw it.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// A pod appeared or changed.
    Pod(PodFacts),
    /// A pod is gone.
    PodGone(PodKey),
    /// Every pod there is, after a (re)list: pods not in it are gone.
    Pods(Vec<PodFacts>),
    Namespace {
        name: String,
        labels: Labels,
    },
    NamespaceGone(String),
    /// Every namespace there is, after a (re)list.
    Namespaces(Vec<(String, Labels)>),
}
