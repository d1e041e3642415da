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
    /// Whether the pod takes part at all: not host-network, not finished (phase `Succeeded` or
    /// `Failed`). A `Pending` pod with addresses takes part: its init containers use the network.
    pub eligible: bool,
}

impl PodFacts {
    pub fn key(&self) -> PodKey {
        (self.namespace.clone(), self.name.clone())
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
