//! The watchers: Pods, Namespaces and `tollgate.dev/v1alpha1` Policies, listed and watched with
//! `kube::runtime::watcher` (resourceVersion, bookmarks, relist after `410 Gone`, backoff).
//!
//! - Pods and Namespaces become [`ClusterEvent`]s for the installer. A (re)list is sent as one
//!   whole set once it is complete (`InitDone`), so a pod missing from a page never looks deleted.
//! - Policy objects are merged ([`super::merge`]) and the result installed as one generation. The
//!   first merged policy is installed only once Pods and Namespaces are listed too: installing
//!   it earlier would enforce selectors with no pods behind them, and cut the flows the pinned
//!   datapath kept.
//! - The API server unreachable, slow or refusing: the watchers retry with backoff; nothing is
//!   removed from the maps for want of an answer, so the datapath keeps enforcing what it last
//!   knew (or its pinned state, or default deny). It never falls back to allow.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{
        utils::Backoff,
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client,
};
use tokio::sync::watch as tokio_watch;

pub use super::SharedStatus;
use super::{
    merge::{merge, PolicyObject},
    ClusterEvent, PodFacts,
};
use crate::{
    installer::InstallerHandle,
    policy::selector::Labels,
    wire::{KubernetesStatus, NamedReason},
};

/// Where the API server is: `--kubeconfig`, else in-cluster configuration (or `KUBECONFIG`).
#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    /// `--trust-domain`: default SPIFFE IDs of mtls identities (see [`super::merge`]).
    pub trust_domain: Option<crate::identity::TrustDomain>,
}

/// Builds the client. A kubeconfig that cannot be read is an error now; a server that does not
/// answer is not (the watchers retry).
pub async fn client(settings: &KubeSettings) -> Result<Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a cluster (no service account token) and no \
             --kubeconfig or KUBECONFIG",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// The custom resource the agent reads.
pub fn policy_resource() -> ApiResource {
    ApiResource {
        group: "tollgate.dev".into(),
        version: "v1alpha1".into(),
        api_version: "tollgate.dev/v1alpha1".into(),
        kind: "Policy".into(),
        plural: "policies".into(),
    }
}

/// Retries quickly at first (a watch that merely ended), then every few seconds: 250 ms
/// doubling to 5 s, reset once a watch works again.
#[derive(Debug, Clone)]
struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            next: Duration::from_millis(250),
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        Some(now)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        *self = Retry::default();
    }
}

/// Which initial lists are complete.
#[derive(Debug, Clone, Copy, Default)]
struct Synced {
    pods: bool,
    namespaces: bool,
}

/// Runs the three watchers until the task is dropped; `trust_domain` is `--trust-domain`.
pub async fn run(
    client: Client,
    installer: InstallerHandle,
    status: SharedStatus,
    trust_domain: Option<crate::identity::TrustDomain>,
) {
    let (synced_tx, synced_rx) = tokio_watch::channel(Synced::default());
    let synced_tx = Arc::new(synced_tx);
    let pods = tokio::spawn(watch_pods(
        client.clone(),
        installer.clone(),
        status.clone(),
        synced_tx.clone(),
    ));
    let namespaces = tokio::spawn(watch_namespaces(
        client.clone(),
        installer.clone(),
        status.clone(),
        synced_tx,
    ));
    let probe = tokio::spawn(probe_failing(client.clone(), status.clone()));
    let policies = tokio::spawn(watch_policies(
        client,
        installer,
        status,
        synced_rx,
        trust_domain,
    ));
    let _ = tokio::join!(pods, namespaces, policies, probe);
}

/// How often a failing resource is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// A watch that resumes after an outage says nothing when nothing changed meanwhile (bookmarks
/// yield no event), so a resource whose watch failed is probed with a one-item list until it
/// answers again: then it counts as connected.
async fn probe_failing(client: Client, status: SharedStatus) {
    let pods: Api<Pod> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let policies: Api<DynamicObject> = Api::all_with(client, &policy_resource());
    let one = kube::api::ListParams::default().limit(1);
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let failing: Vec<String> = status.lock().expect("status lock").disconnected.clone();
        for resource in failing {
            let ok = match resource.as_str() {
                "pods" => pods.list_metadata(&one).await.is_ok(),
                "namespaces" => namespaces.list_metadata(&one).await.is_ok(),
                _ => policies.list_metadata(&one).await.is_ok(),
            };
            if ok {
                connected(&status, &resource);
            }
        }
    }
}

/// Records a watch error: logged, kept for `status`, and the watch counted as disconnected. A
/// refusal (403) says which permission is missing.
fn record_error(status: &SharedStatus, resource: &str, error: &watcher::Error) {
    let text = error.to_string();
    let message = if text.contains("403") || text.to_ascii_lowercase().contains("forbidden") {
        format!(
            "{resource}: the API server refused: {text}; the agent's service account needs get, \
             list and watch on {resource} (see deploy/ ClusterRole tollgate)"
        )
    } else {
        format!("{resource}: {text}; retrying, enforcing the last known state meanwhile")
    };
    tracing::warn!(resource, error = %message, "Kubernetes watch failed");
    let mut s = status.lock().expect("status lock");
    if !s.disconnected.iter().any(|r| r == resource) {
        s.disconnected.push(resource.to_owned());
    }
    s.connected = false;
    s.watch_errors += 1;
    set_last_error(&mut s, message);
}

/// The last error `status` shows, stamped now.
fn set_last_error(s: &mut KubernetesStatus, message: String) {
    s.last_error = Some(message);
    s.last_error_at =
        Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
}

/// `resource` answered: its watch is connected.
fn connected(status: &SharedStatus, resource: &str) {
    let mut s = status.lock().expect("status lock");
    s.disconnected.retain(|r| r != resource);
    s.connected = s.disconnected.is_empty();
}

/// Events ready right now, up to a bound, so that a burst goes to the installer as one command.
const BATCH: usize = 256;

async fn watch_pods(
    client: Client,
    installer: InstallerHandle,
    status: SharedStatus,
    synced: Arc<tokio_watch::Sender<Synced>>,
) {
    let api: Api<Pod> = Api::all(client);
    let mut stream = watcher(api).backoff(Retry::default()).boxed();
    let mut listing: Option<Vec<PodFacts>> = None;
    loop {
        let Some(first) = stream.next().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match stream.next().now_or_never() {
                Some(Some(item)) => batch.push(item),
                _ => break,
            }
        }
        let mut events = Vec::new();
        for item in batch {
            match item {
                Ok(Event::Init) => listing = Some(Vec::new()),
                Ok(Event::InitApply(pod)) => {
                    if let (Some(list), Some(facts)) = (listing.as_mut(), pod_facts(&pod)) {
                        list.push(facts);
                    }
                }
                Ok(Event::InitDone) => {
                    connected(&status, "pods");
                    if let Some(list) = listing.take() {
                        events.push(ClusterEvent::Pods(list));
                    }
                }
                Ok(Event::Apply(pod)) => {
                    connected(&status, "pods");
                    if let Some(facts) = pod_facts(&pod) {
                        events.push(ClusterEvent::Pod(facts));
                    }
                }
                Ok(Event::Delete(pod)) => {
                    connected(&status, "pods");
                    if let (Some(ns), Some(name)) =
                        (pod.metadata.namespace.clone(), pod.metadata.name.clone())
                    {
                        events.push(ClusterEvent::PodGone((ns, name)));
                    }
                }
                Err(e) => record_error(&status, "pods", &e),
            }
        }
        let relisted = events.iter().any(|e| matches!(e, ClusterEvent::Pods(_)));
        if !events.is_empty() && installer.cluster(events).await.is_err() {
            return;
        }
        if relisted {
            status.lock().expect("status lock").pods_synced = true;
            synced.send_modify(|s| s.pods = true);
        }
    }
}

async fn watch_namespaces(
    client: Client,
    installer: InstallerHandle,
    status: SharedStatus,
    synced: Arc<tokio_watch::Sender<Synced>>,
) {
    let api: Api<Namespace> = Api::all(client);
    let mut stream = watcher(api).backoff(Retry::default()).boxed();
    let mut listing: Option<Vec<(String, Labels)>> = None;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(Event::InitApply(ns)) => {
                if let (Some(list), Some(name)) = (listing.as_mut(), ns.metadata.name.clone()) {
                    list.push((name, labels_of(&ns.metadata)));
                }
                None
            }
            Ok(Event::InitDone) => {
                connected(&status, "namespaces");
                listing.take().map(ClusterEvent::Namespaces)
            }
            Ok(Event::Apply(ns)) => {
                connected(&status, "namespaces");
                ns.metadata
                    .name
                    .clone()
                    .map(|name| ClusterEvent::Namespace {
                        labels: labels_of(&ns.metadata),
                        name,
                    })
            }
            Ok(Event::Delete(ns)) => {
                connected(&status, "namespaces");
                ns.metadata.name.clone().map(ClusterEvent::NamespaceGone)
            }
            Err(e) => {
                record_error(&status, "namespaces", &e);
                None
            }
        };
        let Some(event) = event else { continue };
        let relisted = matches!(event, ClusterEvent::Namespaces(_));
        if installer.cluster(vec![event]).await.is_err() {
            return;
        }
        if relisted {
            status.lock().expect("status lock").namespaces_synced = true;
            synced.send_modify(|s| s.namespaces = true);
        }
    }
}

/// How long policy events are gathered before one merge: a `kubectl apply -f dir/` of many
/// objects becomes one generation, not one per object.
const POLICY_SETTLE: Duration = Duration::from_millis(200);
/// The longest policy events are gathered before a merge.
const POLICY_GATHER: Duration = Duration::from_secs(1);

async fn watch_policies(
    client: Client,
    installer: InstallerHandle,
    status: SharedStatus,
    mut synced: tokio_watch::Receiver<Synced>,
    trust_domain: Option<crate::identity::TrustDomain>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &policy_resource());
    let mut stream = watcher(api).backoff(Retry::default()).boxed();
    let mut objects: BTreeMap<String, PolicyObject> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, PolicyObject>> = None;
    let mut listed = false;
    let mut last_applied: Option<String> = None;
    let mut established: Vec<String> = Vec::new();
    loop {
        let Some(first) = stream.next().await else {
            return;
        };
        let mut changed = false;
        let mut item = Some(first);
        let gathering = tokio::time::Instant::now();
        // Gather what follows within POLICY_SETTLE of the last event, for at most
        // POLICY_GATHER in all: a writer that never pauses must not hold changes back.
        while let Some(event) = item.take() {
            match event {
                Ok(Event::Init) => listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(o)) => {
                    if let (Some(list), Some(p)) = (listing.as_mut(), policy_object(&o)) {
                        list.insert(p.name.clone(), p);
                    }
                }
                Ok(Event::InitDone) => {
                    connected(&status, "policies.tollgate.dev");
                    if let Some(list) = listing.take() {
                        objects = list;
                        listed = true;
                        changed = true;
                    }
                }
                Ok(Event::Apply(o)) => {
                    connected(&status, "policies.tollgate.dev");
                    if let Some(p) = policy_object(&o) {
                        // A write that leaves the spec as it was (labels, annotations) changes
                        // nothing enforced.
                        if objects.get(&p.name).is_none_or(|old| old.spec != p.spec) {
                            changed = true;
                        }
                        objects.insert(p.name.clone(), p);
                    }
                }
                Ok(Event::Delete(o)) => {
                    connected(&status, "policies.tollgate.dev");
                    if let Some(name) = &o.metadata.name {
                        changed |= objects.remove(name).is_some();
                    }
                }
                Err(e) => record_error(&status, "policies.tollgate.dev", &e),
            }
            let left = POLICY_GATHER.saturating_sub(gathering.elapsed());
            if left.is_zero() {
                break;
            }
            if let Ok(Some(next)) =
                tokio::time::timeout(POLICY_SETTLE.min(left), stream.next()).await
            {
                item = Some(next);
            }
        }
        if !changed || !listed {
            continue;
        }
        status.lock().expect("status lock").policies_synced = true;
        // Pods and namespaces first: the merged policy's selectors need them.
        if synced.wait_for(|s| s.pods && s.namespaces).await.is_err() {
            return;
        }
        let list: Vec<PolicyObject> = objects.values().cloned().collect();
        // Merging parses and validates the whole policy (once per skipped object): off the
        // runtime's workers.
        let prefer = established.clone();
        let td = trust_domain.clone();
        let Ok(merged) =
            tokio::task::spawn_blocking(move || merge(&list, &prefer, td.as_ref())).await
        else {
            return;
        };
        for s in &merged.skipped {
            tracing::warn!(policy = %s.name, reason = %s.reason, "Policy object skipped");
        }
        let skipped: Vec<NamedReason> = merged
            .skipped
            .iter()
            .map(|s| NamedReason {
                name: s.name.clone(),
                reason: s.reason.clone(),
            })
            .collect();
        if last_applied.as_deref() == Some(merged.text.as_str()) {
            let mut st = status.lock().expect("status lock");
            st.skipped = skipped;
            continue;
        }
        match installer.apply_from_cluster(merged.text.clone()).await {
            Ok(r) => {
                tracing::info!(
                    generation = r.generation,
                    objects = ?merged.accepted,
                    skipped = merged.skipped.len(),
                    "policy objects merged and installed"
                );
                last_applied = Some(merged.text);
                established = merged.accepted.clone();
                let mut st = status.lock().expect("status lock");
                st.policies = merged.accepted;
                st.skipped = skipped;
                st.synced = true;
            }
            Err(crate::error::Error::Unavailable(_)) => return,
            Err(e) => {
                let message = format!("installing the merged policy failed: {e}");
                tracing::error!(error = %message, "the previous policy stays in force");
                let mut st = status.lock().expect("status lock");
                set_last_error(&mut st, message);
                st.skipped = skipped;
            }
        }
    }
}

/// The watcher with the agent's settings: bookmarks on (the default), whole lists.
fn watcher<K>(api: Api<K>) -> impl futures_util::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Labels {
    meta.labels
        .as_ref()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// What the agent needs of a Pod; `None` for an object without namespace or name.
pub fn pod_facts(pod: &Pod) -> Option<PodFacts> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let mut texts: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
        .unwrap_or_default();
    if texts.is_empty() {
        if let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) {
            texts.push(ip);
        }
    }
    // Kubernetes gives a pod at most one address per family; anything beyond is not trusted.
    let mut ips: Vec<IpAddr> = Vec::new();
    let pod_name = || format!("{namespace}/{name}");
    for text in texts {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => tracing::warn!(
                pod = %pod_name(),
                address = text,
                "IPv4-mapped pod address: no IPv4 packet carries it; left out"
            ),
            Ok(ip) if ips.iter().any(|a| a.is_ipv4() == ip.is_ipv4()) => {
                if !ips.contains(&ip) {
                    tracing::warn!(
                        pod = %pod_name(),
                        address = text,
                        "a second pod address of one family; left out"
                    )
                }
            }
            Ok(ip) => ips.push(ip),
            Err(_) => tracing::warn!(
                pod = %pod_name(),
                address = text,
                "pod address does not parse; left out"
            ),
        }
    }
    let host_ip = status
        .and_then(|s| s.host_ip.as_deref())
        .and_then(|text| match text.parse::<IpAddr>() {
            // As the node's agent connects from it: an IPv4 node as IPv4.
            Ok(ip) => Some(ip.to_canonical()),
            Err(_) => {
                tracing::warn!(pod = %pod_name(), address = text, "hostIP does not parse; left out");
                None
            }
        });
    let finished = matches!(phase, "Succeeded" | "Failed");
    Some(PodFacts {
        labels: labels_of(&pod.metadata),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        node_name: spec.and_then(|s| s.node_name.clone()),
        eligible: !host_network && !finished && !ips.is_empty(),
        ips,
        host_ip,
        namespace,
        name,
    })
}

/// A Policy object, or `None` without a name.
fn policy_object(o: &DynamicObject) -> Option<PolicyObject> {
    Some(PolicyObject {
        name: o.metadata.name.clone()?,
        resource_version: o.metadata.resource_version.clone().unwrap_or_default(),
        spec: o
            .data
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_facts_read_what_selectors_need() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "web-1", "labels": {"app": "web"}},
            "spec": {"containers": [], "serviceAccountName": "web", "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": "10.200.1.2", "hostIP": "10.200.0.1",
                        "podIPs": [{"ip": "10.200.1.2"}, {"ip": "fd00:200::2"}, {"ip": "junk"},
                                   {"ip": "10.200.1.3"}, {"ip": "::ffff:10.200.1.4"}]}
        }))
        .unwrap();
        let f = pod_facts(&pod).unwrap();
        assert_eq!(f.ips.len(), 2);
        assert!(f.eligible);
        assert_eq!(f.service_account, "web");
        assert_eq!(f.node_name.as_deref(), Some("node-a"));
        assert_eq!(f.host_ip, Some("10.200.0.1".parse().unwrap()));
        assert_eq!(f.labels.get("app").map(String::as_str), Some("web"));
        for (patch, eligible) in [
            (
                serde_json::json!({"spec": {"containers": [], "hostNetwork": true}}),
                false,
            ),
            (
                serde_json::json!({"status": {"phase": "Succeeded", "podIP": "10.200.1.2"}}),
                false,
            ),
            (serde_json::json!({"status": {"phase": "Pending"}}), false),
            (
                serde_json::json!({"status": {"phase": "Pending", "podIP": "10.200.1.2"}}),
                true,
            ),
        ] {
            let mut value = serde_json::json!({"metadata": {"namespace": "a", "name": "b"},
                "spec": {"containers": []}, "status": {"phase": "Running", "podIP": "10.200.1.2"}});
            for (k, v) in patch.as_object().unwrap() {
                value[k] = v.clone();
            }
            let pod: Pod = serde_json::from_value(value).unwrap();
            assert_eq!(pod_facts(&pod).unwrap().eligible, eligible, "{patch}");
        }
    }

    #[test]
    fn retry_backs_off_to_five_seconds_and_resets() {
        let mut r = Retry::default();
        let first: Vec<Duration> = r.by_ref().take(7).collect();
        assert_eq!(first[0], Duration::from_millis(250));
        assert_eq!(first[6], Duration::from_secs(5));
        r.reset();
        assert_eq!(r.next(), Some(Duration::from_millis(250)));
    }
}
