//! A fake Kubernetes API server for the agent's Kubernetes mode: plain HTTP/1.1 on a listener
//! the test owns (so it may live in a network namespace), served by its own thread and tokio
//! runtime so that sync tests can use it, and controlled by sync methods while clients are
//! connected.
//!
//! What it imitates, closely enough for `kube`'s client and `kube::runtime::watcher`:
//! - three resources: core/v1 `pods` (namespaced; listed and watched across all namespaces at
//!   `/api/v1/pods` or in one at `/api/v1/namespaces/{ns}/pods`), core/v1 `namespaces`, and the
//!   cluster-scoped custom resource `tollgate.dev/v1alpha1` `policies`; GET of single objects;
//! - one global resourceVersion counter (like etcd's revision) stamped on every write, with
//!   `metadata.uid`, `creationTimestamp` and `generation` kept by the server;
//! - lists: `{kind: PodList, apiVersion, metadata: {resourceVersion, continue,
//!   remainingItemCount}, items}`, paged with `limit` + `continue` over a consistent snapshot (the
//!   first page's resourceVersion, rebuilt from the change history), `resourceVersion` with
//!   `resourceVersionMatch` `NotOlderThan` / `Exact` (410 Gone when the snapshot is older than
//!   the retained history, 504 "Too large resource version" when it is in the future). Items of
//!   built-in lists carry no `kind`/`apiVersion`, like the real server's; custom resources' do;
//! - watches (`watch=true|1`): a chunked stream of newline-delimited `{type, object}` events,
//!   starting after the given resourceVersion from a bounded history; with no resourceVersion
//!   (or "0") or `sendInitialEvents=true`, synthetic ADDED events for the current state first
//!   (the latter closed by a BOOKMARK annotated `k8s.io/initial-events-end`); BOOKMARKs every
//!   [`Options::bookmark_interval`] when `allowWatchBookmarks=true`, carrying only kind,
//!   apiVersion and `metadata.resourceVersion`; an ERROR event with a `Status` 410 `Expired`
//!   when the resourceVersion is older than the history; `timeoutSeconds` ends the stream. An
//!   object that starts or stops matching a watch's selectors arrives as ADDED or DELETED, like
//!   the real watch cache does;
//! - `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and `fieldSelector` (`=`,
//!   `==`, `!=` on `metadata.name`, `metadata.namespace`, and for pods `spec.nodeName`,
//!   `spec.serviceAccountName`, `spec.hostNetwork`, `spec.restartPolicy`, `spec.schedulerName`,
//!   `status.phase`, `status.podIP`, `status.nominatedNodeName`; `status.phase` for namespaces);
//! - bearer-token authentication (401 without the kubeconfig's token), 403 `Forbidden` with the
//!   real message shape per resource ([`FakeApiServer::set_forbidden`]), legacy discovery
//!   documents (`/api`, `/api/v1`, `/apis`, `/apis/tollgate.dev[/v1alpha1]`), `/version`,
//!   `/healthz`, `/readyz`, `/livez`;
//! - failures: [`FakeApiServer::compact`] (every resourceVersion handed out before is too old),
//!   [`FakeApiServer::drop_watches`] (watch connections cut mid-stream, like a load balancer
//!   reset), [`FakeApiServer::set_unavailable`] (every connection closed, new ones reset at once).
//!
//! What it does not do: writes over HTTP (POST/PUT/PATCH/DELETE answer 405; tests change state
//! with [`FakeApiServer::apply`] and [`FakeApiServer::delete`]), admission (a pod may name a
//! namespace that does not exist; deleting a namespace leaves its pods), graceful deletion
//! (delete is immediate, as with a zero grace period), TLS, protobuf, aggregated discovery,
//! server-side apply, `/status` and other subresources, the deprecated `/api/v1/watch/...` paths,
//! watching a single object by its path (use `fieldSelector=metadata.name=...`), set-based `<`/`>`
//! label operators, and the real server's wait-up-to-3-s for a future resourceVersion (it answers
//! 504 at once). An unavailable server resets connections (RST) rather than refusing them: the
//! listening socket stays open because it may belong to another network namespace. Unknown query
//! parameters and unsupported selectors answer 400 with a `Status` rather than being ignored.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    convert::Infallible,
    fmt::Write as _,
    io,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER},
    Method, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

/// The user a forbidden answer names: the agent's service account in `deploy/`.
pub const FORBIDDEN_USER: &str = "system:serviceaccount:tollgate-system:tollgate";

/// The resourceVersion of an empty server; real ones are large numbers, and starting above 1
/// catches clients that assume small ones.
const FIRST_RESOURCE_VERSION: u64 = 1000;
/// How long Drop waits for the server thread before leaving it behind.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the runtime's shutdown waits for its tasks.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(2);
/// After a failed accept (e.g. EMFILE), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// A connection must send a request's headers within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// History entries one watch stream turns into events per lock acquisition.
const MAX_FETCH: usize = 1000;
/// The largest `limit` a list honours; more is served as pages of this size.
const MAX_PAGE: u64 = 10_000;

/// Limits and timings of one server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Changes kept for watch resumption and consistent paging; older resourceVersions get 410.
    pub history_limit: usize,
    /// Between BOOKMARK events on a watch that asked for them.
    pub bookmark_interval: Duration,
    /// Open connections at most; more are reset at once.
    pub max_connections: usize,
    /// Requests kept in the log returned by [`FakeApiServer::requests`].
    pub request_log_limit: usize,
    /// A watch ends after `timeoutSeconds`, or after this if that is absent, 0 or larger.
    pub max_watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
            max_connections: 128,
            request_log_limit: 10_000,
            max_watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// One request the server answered (or refused with a status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded query pairs in the order sent.
    pub query: Vec<(String, String)>,
    /// `watch=true` or `watch=1` was in the query.
    pub watch: bool,
    /// The HTTP status answered (200 for a watch, also one that then sends a 410 ERROR event).
    pub status: u16,
}

impl Request {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A list: a GET of a collection, not a watch, answered with 200.
    pub fn is_list(&self) -> bool {
        self.method == "GET"
            && !self.watch
            && self.status == 200
            && matches!(route_path(&self.path), Some(Route::Collection(..)))
    }
}

/// What the server has done since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    /// Lists answered with 200.
    pub lists: u64,
    /// Watches answered with 200 (including those that then send a 410 ERROR event).
    pub watches: u64,
    /// Single-object GETs answered with 200.
    pub gets: u64,
    /// 410 answers: ERROR events on watches and 410 lists.
    pub expired: u64,
    /// 403 answers.
    pub forbidden: u64,
    /// 401 answers.
    pub unauthorized: u64,
    /// Other 4xx and 5xx answers (400, 404, 405, 504).
    pub errors: u64,
    /// ADDED, MODIFIED and DELETED events sent on watches.
    pub events: u64,
    /// BOOKMARK events sent.
    pub bookmarks: u64,
    /// Watch streams cut by [`FakeApiServer::drop_watches`].
    pub dropped_watches: u64,
    /// Watch streams open now.
    pub open_watches: u64,
    /// Connections served.
    pub connections: u64,
    /// Connections reset at once (unavailable, or over [`Options::max_connections`]).
    pub refused_connections: u64,
}

/// A fake kube-apiserver; see the module documentation. Stops on Drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Res {
    Pods,
    Namespaces,
    Policies,
}

impl Res {
    const ALL: [Res; 3] = [Res::Pods, Res::Namespaces, Res::Policies];

    fn plural(self) -> &'static str {
        match self {
            Res::Pods => "pods",
            Res::Namespaces => "namespaces",
            Res::Policies => "policies",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Res::Pods => "pod",
            Res::Namespaces => "namespace",
            Res::Policies => "policy",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::Policies => "Policy",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Res::Pods | Res::Namespaces => "",
            Res::Policies => "tollgate.dev",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Pods | Res::Namespaces => "v1",
            Res::Policies => "tollgate.dev/v1alpha1",
        }
    }

    fn namespaced(self) -> bool {
        self == Res::Pods
    }

    /// Built-in types' list items carry no kind/apiVersion on the wire; custom resources' do.
    fn builtin(self) -> bool {
        self != Res::Policies
    }

    /// By plural, singular or kind, in any case.
    fn lookup(name: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| {
            [r.plural(), r.singular(), r.kind()]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
        })
    }
}

/// (resource, namespace or "" for cluster-scoped, name); its order is etcd's key order.
type Key = (Res, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

struct Change {
    rv: u64,
    key: Key,
    kind: ChangeKind,
    /// The object after the change (for Deleted: the final object, at the deletion's RV).
    object: Value,
    /// The object before the change, for rebuilding older snapshots and selector transitions.
    prev: Option<Value>,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change with rv > `oldest`, in rv order.
    history: VecDeque<Change>,
    /// Watches and snapshots from an RV below this get 410.
    oldest: u64,
    /// The highest RV of a change no longer in the history: an open stream whose cursor is
    /// below it has missed events.
    discarded: u64,
    uids: u64,
    forbidden: BTreeSet<Res>,
    requests: VecDeque<Request>,
    counters: Counters,
}

impl Store {
    fn record(&mut self, change: Change, limit: usize) {
        self.history.push_back(change);
        while self.history.len() > limit.max(1) {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.rv;
                self.discarded = old.rv;
            }
        }
    }
}

struct Shared {
    options: Options,
    addr: SocketAddr,
    token: String,
    seed: u64,
    store: Mutex<Store>,
    /// The current RV, sent on every change so watch streams wake up.
    changed: watch::Sender<u64>,
    /// Bumped by `drop_watches`.
    drop_generation: watch::Sender<u64>,
    /// Bumped by `set_unavailable(true)`: every connection closes.
    conn_generation: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    unavailable: AtomicBool,
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FakeApiServer {
    /// Serves on `listener` with [`Options::default`].
    pub fn start(listener: TcpListener) -> Result<FakeApiServer> {
        Self::start_with(listener, Options::default())
    }

    /// Serves on `listener` from a new thread with its own tokio runtime.
    pub fn start_with(listener: TcpListener, options: Options) -> Result<FakeApiServer> {
        let addr = listener.local_addr().context("the listener's address")?;
        listener
            .set_nonblocking(true)
            .context("making the listener non-blocking")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the fake API server's runtime")?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).context("registering the listener")?
        };
        let seed = seed(addr);
        let shared = Arc::new(Shared {
            options,
            addr,
            token: format!("fake-{:016x}", splitmix64(seed ^ 0x0074_6f6b_656e)),
            seed,
            store: Mutex::new(Store {
                rv: FIRST_RESOURCE_VERSION,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: FIRST_RESOURCE_VERSION,
                discarded: 0,
                uids: 0,
                forbidden: BTreeSet::new(),
                requests: VecDeque::new(),
                counters: Counters::default(),
            }),
            changed: watch::Sender::new(FIRST_RESOURCE_VERSION),
            drop_generation: watch::Sender::new(0),
            conn_generation: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            unavailable: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-kubeapi-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(accept_loop(thread_shared, listener));
                runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
            })
            .context("spawning the fake API server's thread")?;
        Ok(FakeApiServer {
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The bearer token every request must carry (the kubeconfig's).
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Writes a kubeconfig with one cluster (this server), one token user and one current
    /// context, namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n\
             \x20 cluster:\n\
             \x20   server: {url}\n\
             users:\n\
             - name: tollgate\n\
             \x20 user:\n\
             \x20   token: {token}\n\
             contexts:\n\
             - name: fake\n\
             \x20 context:\n\
             \x20   cluster: fake\n\
             \x20   user: tollgate\n\
             \x20   namespace: default\n\
             current-context: fake\n",
            url = self.url(),
            token = self.shared.token,
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces an object by kind, namespace and name (a pod without a namespace goes
    /// to `default`), bumps the resourceVersion and sends ADDED or MODIFIED to matching watches.
    /// Returns the object as stored. The server keeps `uid` and `creationTimestamp` across
    /// replaces and bumps `generation` when `spec` changes; a namespace gets the
    /// `kubernetes.io/metadata.name` label, like the real server adds.
    pub fn apply(&self, object: Value) -> Result<Value> {
        let Value::Object(mut obj) = object else {
            bail!("an object must be a JSON object");
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .context("the object has no apiVersion")?;
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .context("the object has no kind")?;
        let res = Res::ALL
            .into_iter()
            .find(|r| r.kind() == kind && r.api_version() == api_version)
            .with_context(|| format!("the fake API server does not serve {api_version} {kind}"))?;
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(meta) = meta else {
            bail!("metadata is not an object");
        };
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .context("the object has no usable metadata.name")?
            .to_owned();
        let namespace = if res.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_owned();
            if ns.contains('/') {
                bail!("metadata.namespace {ns:?} is not a name");
            }
            meta.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        if res == Res::Namespaces {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(labels) = labels {
                labels.insert(
                    "kubernetes.io/metadata.name".into(),
                    Value::String(name.clone()),
                );
            }
        }

        let mut store = self.shared.lock();
        let key = (res, namespace, name);
        let prev = store.objects.get(&key).cloned();
        store.rv += 1;
        let rv = store.rv;
        match &prev {
            Some(prev) => {
                let prev_meta = &prev["metadata"];
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), prev_meta[field].clone());
                }
            }
            None => {
                store.uids += 1;
                let uid = uuid(self.shared.seed, store.uids);
                meta.insert("uid".into(), Value::String(uid));
                meta.insert(
                    "creationTimestamp".into(),
                    Value::String(rfc3339(SystemTime::now())),
                );
            }
        }
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        let mut value = Value::Object(obj);
        let generation = prev.as_ref().map_or(1, |prev| {
            let spec_changed = prev.get("spec") != value.get("spec");
            prev["metadata"]["generation"].as_u64().unwrap_or(1) + u64::from(spec_changed)
        });
        value["metadata"]["generation"] = json!(generation);
        store.objects.insert(key.clone(), value.clone());
        let kind = if prev.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        let change = Change {
            rv,
            key,
            kind,
            object: value.clone(),
            prev,
        };
        store.record(change, self.shared.options.history_limit);
        drop(store);
        self.shared.changed.send_replace(rv);
        Ok(value)
    }

    /// Deletes an object at once (no graceful deletion) and sends DELETED with the final object
    /// (at the deletion's resourceVersion). `kind` is a kind, plural or singular (`Pod`, `pods`,
    /// `pod`); `namespace` is ignored for cluster-scoped resources. Ok(None) when absent.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Option<Value>> {
        let res = Res::lookup(kind).with_context(|| format!("no resource {kind:?}"))?;
        let key = key(res, namespace, name);
        let mut store = self.shared.lock();
        let Some(prev) = store.objects.remove(&key) else {
            return Ok(None);
        };
        store.rv += 1;
        let rv = store.rv;
        let mut last = prev.clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let change = Change {
            rv,
            key,
            kind: ChangeKind::Deleted,
            object: last.clone(),
            prev: Some(prev),
        };
        store.record(change, self.shared.options.history_limit);
        drop(store);
        self.shared.changed.send_replace(rv);
        Ok(Some(last))
    }

    /// The stored object, if any (`kind` as for [`Self::delete`]).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = Res::lookup(kind)?;
        self.shared
            .lock()
            .objects
            .get(&key(res, namespace, name))
            .cloned()
    }

    /// Forgets the whole history and advances the resourceVersion by one (no object changes):
    /// every resourceVersion handed out before is now too old, so a watch resumed from one gets
    /// a 410 ERROR event and a continue token from before gets 410. Watch streams already open
    /// and caught up carry on, as they do across an etcd compaction.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        let last = store.history.back().map_or(0, |c| c.rv);
        store.discarded = store.discarded.max(last);
        store.history.clear();
        store.rv += 1;
        store.oldest = store.rv;
        let rv = store.rv;
        drop(store);
        self.shared.changed.send_replace(rv);
    }

    /// Ends every open watch stream abruptly: the connection is closed mid-body, without the
    /// terminating chunk, like a load balancer resetting it.
    pub fn drop_watches(&self) {
        self.shared.drop_generation.send_modify(|g| *g += 1);
    }

    /// Answers every request for `resource` (plural, singular or kind) with 403 Forbidden while
    /// set. Streams already open are not affected.
    pub fn set_forbidden(&self, resource: &str, forbidden: bool) -> Result<()> {
        let res = Res::lookup(resource).with_context(|| format!("no resource {resource:?}"))?;
        let mut store = self.shared.lock();
        if forbidden {
            store.forbidden.insert(res);
        } else {
            store.forbidden.remove(&res);
        }
        Ok(())
    }

    /// While set, the server is gone: every open connection is closed and new ones are reset as
    /// soon as they are accepted. `false` serves again on the same address; the stored objects
    /// and history are kept.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.shared.conn_generation.send_modify(|g| *g += 1);
        }
    }

    /// The requests answered so far (the last [`Options::request_log_limit`]).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Empties the request log (the counters are kept).
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn key(res: Res, namespace: Option<&str>, name: &str) -> Key {
    let ns = if res.namespaced() {
        namespace.unwrap_or("default")
    } else {
        ""
    };
    (res, ns.to_owned(), name.to_owned())
}

/// A pod as the API server would hold it once scheduled: one container, `spec.nodeName` and
/// `status.podIP(s)` only when given, `spec.hostNetwork` only when true (the server omits false).
#[allow(clippy::too_many_arguments)]
pub fn pod(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    service_account: &str,
    node_name: &str,
    pod_ips: &[&str],
    phase: &str,
    host_network: bool,
) -> Value {
    let mut spec = json!({
        "containers": [{"name": "main", "image": "registry.example/app:1"}],
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "serviceAccountName": service_account,
        "serviceAccount": service_account,
    });
    if !node_name.is_empty() {
        spec["nodeName"] = json!(node_name);
    }
    if host_network {
        spec["hostNetwork"] = json!(true);
    }
    let mut status = json!({ "phase": phase });
    if let Some(first) = pod_ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = Value::Array(pod_ips.iter().map(|ip| json!({ "ip": ip })).collect());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "namespace": namespace, "name": name, "labels": label_map(labels) },
        "spec": spec,
        "status": status,
    })
}

/// An active namespace.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": label_map(labels) },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

/// A `tollgate.dev/v1alpha1` Policy (cluster-scoped).
pub fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "Policy",
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn label_map(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect(),
    )
}

// ---- connections ----

type Body = UnsyncBoxBody<Bytes, io::Error>;

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            _ = shutdown.changed() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let over =
            shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.options.max_connections;
        let slot = ConnectionSlot(shared.clone());
        if over || shared.unavailable.load(Ordering::SeqCst) {
            shared.lock().counters.refused_connections += 1;
            reset(stream);
            continue;
        }
        shared.lock().counters.connections += 1;
        tokio::spawn(serve_connection(shared.clone(), stream, slot));
    }
}

/// Counts an open connection until dropped.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes with RST rather than FIN, so the client sees "connection reset" at once.
fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    _slot: ConnectionSlot,
) {
    let mut generation = shared.conn_generation.subscribe();
    generation.borrow_and_update();
    let mut shutdown = shared.shutdown.subscribe();
    if *shutdown.borrow_and_update() {
        return;
    }
    let service_shared = shared.clone();
    let service = hyper::service::service_fn(move |request| {
        let shared = service_shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &request)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    // Dropping the connection closes the socket, also in the middle of a response.
    tokio::select! {
        _ = connection => {}
        _ = generation.changed() => {}
        _ = shutdown.changed() => {}
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(code: StatusCode, value: &Value) -> hyper::Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut response = hyper::Response::new(full(body));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // The real server turns a Status's retryAfterSeconds into this header; kube's default retry
    // layer honours it on 429, 503 and 504.
    if let Some(secs) = value["details"]["retryAfterSeconds"].as_u64() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

// ---- requests ----

enum Reply {
    Json(StatusCode, Value),
    Text(&'static str),
    Watch(Box<WatchStream>),
}

impl Reply {
    fn error(error: ApiError) -> Reply {
        Reply::Json(error.code, error.body)
    }

    fn status(&self) -> StatusCode {
        match self {
            Reply::Json(code, _) => *code,
            Reply::Text(_) | Reply::Watch(_) => StatusCode::OK,
        }
    }
}

fn handle(shared: &Arc<Shared>, request: &hyper::Request<Incoming>) -> hyper::Response<Body> {
    let path = request.uri().path().to_owned();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let watch = query
        .iter()
        .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.strip_prefix("Bearer ") == Some(shared.token.as_str()));
    let reply = if authorized {
        respond(shared, request.method(), &path, &query)
    } else {
        Reply::error(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            None,
        ))
    };
    let status = reply.status();
    {
        let mut store = shared.lock();
        let counters = &mut store.counters;
        counters.requests += 1;
        match status.as_u16() {
            401 => counters.unauthorized += 1,
            403 => counters.forbidden += 1,
            410 => counters.expired += 1,
            400..=599 => counters.errors += 1,
            _ => {}
        }
        store.requests.push_back(Request {
            method: request.method().to_string(),
            path,
            query,
            watch,
            status: status.as_u16(),
        });
        while store.requests.len() > shared.options.request_log_limit {
            store.requests.pop_front();
        }
    }
    match reply {
        Reply::Json(code, value) => json_response(code, &value),
        Reply::Text(text) => {
            let mut response = hyper::Response::new(full(text));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
        Reply::Watch(stream) => {
            let events = futures_util::stream::unfold(stream, |mut stream| async move {
                let item = stream.next().await?;
                Some((item.map(Frame::data), stream))
            });
            let mut response = hyper::Response::new(StreamBody::new(events).boxed_unsync());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
    }
}

enum Route<'a> {
    Text(&'static str),
    Discovery(Value),
    Collection(Res, Option<&'a str>),
    Object(Res, Option<&'a str>, &'a str),
}

fn route_path(path: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    Some(match segments.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => Route::Text("ok"),
        ["version"] => Route::Discovery(json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-tollgate-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["api"] => Route::Discovery(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        })),
        ["api", "v1"] => Route::Discovery(resource_list("v1", &[Res::Pods, Res::Namespaces])),
        ["apis"] => Route::Discovery(json!({
            "kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group()],
        })),
        ["apis", "tollgate.dev"] => Route::Discovery(api_group()),
        ["apis", "tollgate.dev", "v1alpha1"] => {
            Route::Discovery(resource_list("tollgate.dev/v1alpha1", &[Res::Policies]))
        }
        ["api", "v1", "pods"] => Route::Collection(Res::Pods, None),
        ["api", "v1", "namespaces"] => Route::Collection(Res::Namespaces, None),
        ["api", "v1", "namespaces", name] => Route::Object(Res::Namespaces, None, name),
        ["api", "v1", "namespaces", ns, "pods"] => Route::Collection(Res::Pods, Some(ns)),
        ["api", "v1", "namespaces", ns, "pods", name] => Route::Object(Res::Pods, Some(ns), name),
        ["apis", "tollgate.dev", "v1alpha1", "policies"] => Route::Collection(Res::Policies, None),
        ["apis", "tollgate.dev", "v1alpha1", "policies", name] => {
            Route::Object(Res::Policies, None, name)
        }
        _ => return None,
    })
}

fn api_group() -> Value {
    let version = json!({"groupVersion": "tollgate.dev/v1alpha1", "version": "v1alpha1"});
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": "tollgate.dev",
        "versions": [version.clone()], "preferredVersion": version,
    })
}

fn resource_list(group_version: &str, resources: &[Res]) -> Value {
    let resources: Vec<Value> = resources
        .iter()
        .map(|r| {
            json!({
                "name": r.plural(), "singularName": r.singular(), "namespaced": r.namespaced(),
                "kind": r.kind(), "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
        "resources": resources,
    })
}

fn respond(shared: &Arc<Shared>, method: &Method, path: &str, query: &[(String, String)]) -> Reply {
    let Some(route) = route_path(path) else {
        return Reply::error(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ));
    };
    if method != Method::GET {
        return Reply::error(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            Some(json!({})),
        ));
    }
    let result = match route {
        Route::Text(text) => return Reply::Text(text),
        Route::Discovery(value) => return Reply::Json(StatusCode::OK, value),
        Route::Collection(res, namespace) => collection(shared, res, namespace, query),
        Route::Object(res, namespace, name) => object(shared, res, namespace, name, query),
    };
    result.unwrap_or_else(Reply::error)
}

fn object(
    shared: &Arc<Shared>,
    res: Res,
    namespace: Option<&str>,
    name: &str,
    query: &[(String, String)],
) -> Result<Reply, ApiError> {
    if let Some((k, _)) = query.iter().find(|(k, _)| k != "resourceVersion") {
        return Err(ApiError::bad_request(format!(
            "query parameter {k:?} is not supported on a single object by the fake API server \
             (watch one object with fieldSelector=metadata.name=...)"
        )));
    }
    let mut store = shared.lock();
    if store.forbidden.contains(&res) {
        return Err(ApiError::forbidden(res, "get", namespace, Some(name)));
    }
    let object = store.objects.get(&key(res, namespace, name)).cloned();
    let object = object.ok_or_else(|| ApiError::not_found(res, name))?;
    store.counters.gets += 1;
    Ok(Reply::Json(StatusCode::OK, object))
}

fn collection(
    shared: &Arc<Shared>,
    res: Res,
    namespace: Option<&str>,
    query: &[(String, String)],
) -> Result<Reply, ApiError> {
    let params = Params::parse(query)?;
    let filter = Filter {
        namespace: namespace.map(str::to_owned),
        labels: match &params.label_selector {
            Some(s) => parse_label_selector(s).map_err(ApiError::bad_request)?,
            None => Vec::new(),
        },
        fields: match &params.field_selector {
            Some(s) => parse_field_selector(s, res).map_err(ApiError::bad_request)?,
            None => Vec::new(),
        },
    };
    let mut store = shared.lock();
    if store.forbidden.contains(&res) {
        let verb = if params.watch { "watch" } else { "list" };
        return Err(ApiError::forbidden(res, verb, namespace, None));
    }
    if params.watch {
        let stream = start_watch(shared, &mut store, res, filter, &params)?;
        store.counters.watches += 1;
        store.counters.open_watches += 1;
        Ok(Reply::Watch(Box::new(stream)))
    } else {
        let list = list(&store, res, &filter, &params)?;
        store.counters.lists += 1;
        Ok(Reply::Json(StatusCode::OK, list))
    }
}

// ---- errors ----

struct ApiError {
    code: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(
        code: StatusCode,
        reason: &str,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Self {
        ApiError {
            code,
            body: status_object(code.as_u16(), reason, message.into(), details),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message, None)
    }

    fn not_found(res: Res, name: &str) -> Self {
        let mut details = json!({ "name": name, "kind": res.plural() });
        if !res.group().is_empty() {
            details["group"] = json!(res.group());
        }
        let resource = qualified(res);
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{resource} {name:?} not found"),
            Some(details),
        )
    }

    fn forbidden(res: Res, verb: &str, namespace: Option<&str>, name: Option<&str>) -> Self {
        let resource = qualified(res);
        let subject = match name {
            Some(name) => format!("{resource} {name:?}"),
            None => resource,
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_owned(),
        };
        let message = format!(
            "{subject} is forbidden: User {FORBIDDEN_USER:?} cannot {verb} resource {:?} in API \
             group {:?} {scope}",
            res.plural(),
            res.group(),
        );
        let mut details = json!({ "kind": res.plural() });
        if let Some(name) = name {
            details["name"] = json!(name);
        }
        if !res.group().is_empty() {
            details["group"] = json!(res.group());
        }
        ApiError::new(StatusCode::FORBIDDEN, "Forbidden", message, Some(details))
    }

    fn gone(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::GONE, "Expired", message, None)
    }

    fn too_large(rv: u64, current: u64) -> Self {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            format!("Too large resource version: {rv}, current: {current}"),
            Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
        )
    }
}

/// `pods` or `policies.tollgate.dev`, as the real server names resources in messages.
fn qualified(res: Res) -> String {
    if res.group().is_empty() {
        res.plural().to_owned()
    } else {
        format!("{}.{}", res.plural(), res.group())
    }
}

fn status_object(code: u16, reason: &str, message: String, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

// ---- query parameters ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VersionMatch {
    NotOlderThan,
    Exact,
}

#[derive(Default)]
struct Params {
    watch: bool,
    /// None when absent or empty; Some(0) for "0".
    resource_version: Option<u64>,
    version_match: Option<VersionMatch>,
    limit: Option<u64>,
    continue_token: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    timeout_seconds: Option<u64>,
    bookmarks: bool,
    send_initial_events: Option<bool>,
}

fn parse_bool(name: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" | "" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "invalid value for {name}: {value:?} (want true or false)"
        ))),
    }
}

fn parse_u64(name: &str, value: &str) -> Result<u64, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid value for {name}: {value:?}")))
}

impl Params {
    fn parse(query: &[(String, String)]) -> Result<Params, ApiError> {
        let mut p = Params::default();
        let mut seen = BTreeSet::new();
        for (name, value) in query {
            // Like Go's url.Values.Get: the first value counts.
            if !seen.insert(name.as_str()) {
                continue;
            }
            match name.as_str() {
                "watch" => p.watch = parse_bool(name, value)?,
                "resourceVersion" => {
                    if !value.is_empty() {
                        p.resource_version = Some(value.parse().map_err(|_| {
                            ApiError::bad_request(format!(
                                "resourceVersion: Invalid value: {value:?}: must be a decimal number"
                            ))
                        })?);
                    }
                }
                "resourceVersionMatch" => {
                    p.version_match = match value.as_str() {
                        "" => None,
                        "NotOlderThan" => Some(VersionMatch::NotOlderThan),
                        "Exact" => Some(VersionMatch::Exact),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "resourceVersionMatch: Unsupported value: {value:?}: supported \
                                 values: \"Exact\", \"NotOlderThan\""
                            )))
                        }
                    }
                }
                "limit" => p.limit = Some(parse_u64(name, value)?).filter(|l| *l > 0),
                "continue" => p.continue_token = Some(value.clone()).filter(|c| !c.is_empty()),
                "labelSelector" => p.label_selector = Some(value.clone()),
                "fieldSelector" => p.field_selector = Some(value.clone()),
                "timeoutSeconds" => p.timeout_seconds = Some(parse_u64(name, value)?),
                "allowWatchBookmarks" => p.bookmarks = parse_bool(name, value)?,
                "sendInitialEvents" => p.send_initial_events = Some(parse_bool(name, value)?),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "query parameter {name:?} is not supported by the fake API server"
                    )))
                }
            }
        }
        let has_rv = query
            .iter()
            .any(|(k, v)| k == "resourceVersion" && !v.is_empty());
        if p.version_match.is_some() && !has_rv && p.send_initial_events != Some(true) {
            return Err(ApiError::bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if p.version_match == Some(VersionMatch::Exact) && p.resource_version == Some(0) {
            return Err(ApiError::bad_request(
                "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
        if p.continue_token.is_some() && (has_rv || p.version_match.is_some()) {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        if p.watch {
            if p.send_initial_events == Some(true) {
                if p.version_match != Some(VersionMatch::NotOlderThan) {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch: Forbidden: sendInitialEvents requires setting \
                         resourceVersionMatch to NotOlderThan",
                    ));
                }
                if !p.bookmarks {
                    return Err(ApiError::bad_request(
                        "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting \
                         allowWatchBookmarks to true",
                    ));
                }
            } else if p.version_match.is_some() {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for \
                     watch unless sendInitialEvents is provided",
                ));
            }
            if p.continue_token.is_some() {
                return Err(ApiError::bad_request(
                    "continue: Forbidden: continue is not supported on watch",
                ));
            }
        } else if p.send_initial_events.is_some() {
            return Err(ApiError::bad_request(
                "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list",
            ));
        }
        Ok(p)
    }
}

// ---- selectors ----

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

struct FieldRequirement {
    field: String,
    value: String,
    equals: bool,
}

struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

impl Filter {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        if self.namespace.as_deref().is_some_and(|ns| ns != key.1) {
            return false;
        }
        let labels = object["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::DoesNotExist(k) => label(k).is_none(),
        });
        labels_match
            && self
                .fields
                .iter()
                .all(|req| (field_value(object, &req.field) == req.value) == req.equals)
    }
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Splits on commas outside parentheses.
fn split_requirements(selector: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?,
            ',' if depth == 0 => {
                parts.push(selector[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    parts.push(selector[start..].trim());
    Ok(parts)
}

fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let error = |part: &str, why: &str| format!("unable to parse requirement: {part:?}: {why}");
    let key = |part: &str, k: &str| -> Result<String, String> {
        if valid_label_key(k) {
            Ok(k.to_owned())
        } else {
            Err(error(part, &format!("invalid label key {k:?}")))
        }
    };
    let value = |part: &str, v: &str| -> Result<String, String> {
        if valid_label_value(v) {
            Ok(v.to_owned())
        } else {
            Err(error(part, &format!("invalid label value {v:?}")))
        }
    };
    let mut requirements = Vec::new();
    for part in split_requirements(selector)? {
        if part.is_empty() {
            return Err(error(part, "empty requirement"));
        }
        if part.contains('<') || part.contains('>') {
            return Err(error(part, "the fake API server does not support < and >"));
        }
        let requirement = if let Some(k) = part.strip_prefix('!') {
            LabelRequirement::DoesNotExist(key(part, k.trim())?)
        } else if let Some(open) = part.find('(') {
            let inner = part[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| error(part, "expected ')' at the end"))?;
            let words: Vec<&str> = part[..open].split_whitespace().collect();
            let [k, op] = words.as_slice() else {
                return Err(error(part, "expected `key in (...)` or `key notin (...)`"));
            };
            let values = inner
                .split(',')
                .map(|v| value(part, v.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            if values.iter().all(String::is_empty) {
                return Err(error(
                    part,
                    "for 'in', 'notin' operators, values set can't be empty",
                ));
            }
            match *op {
                "in" => LabelRequirement::In(key(part, k)?, values),
                "notin" => LabelRequirement::NotIn(key(part, k)?, values),
                _ => return Err(error(part, &format!("unknown operator {op:?}"))),
            }
        } else if let Some((k, v)) = part.split_once("!=") {
            LabelRequirement::NotEquals(key(part, k.trim())?, value(part, v.trim())?)
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            LabelRequirement::Equals(key(part, k.trim())?, value(part, v.trim())?)
        } else {
            LabelRequirement::Exists(key(part, part)?)
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

fn supported_fields(res: Res) -> &'static [&'static str] {
    match res {
        Res::Pods => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "spec.restartPolicy",
            "spec.schedulerName",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        Res::Namespaces => &["metadata.name", "status.phase"],
        Res::Policies => &["metadata.name"],
    }
}

fn parse_field_selector(selector: &str, res: Res) -> Result<Vec<FieldRequirement>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut requirements = Vec::new();
    for part in selector.split(',') {
        let (field, value, equals) = if let Some((f, v)) = part.split_once("!=") {
            (f, v, false)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, v, true)
        } else {
            return Err(format!(
                "invalid selector: {selector:?}; can't understand {part:?}"
            ));
        };
        let field = field.trim();
        if !supported_fields(res).contains(&field) {
            return Err(format!("field label not supported: {field}"));
        }
        requirements.push(FieldRequirement {
            field: field.to_owned(),
            value: value.trim().to_owned(),
            equals,
        });
    }
    Ok(requirements)
}

/// A field's value as the real server's field sets give it: absent strings are "", booleans
/// "true"/"false".
fn field_value(object: &Value, field: &str) -> String {
    let mut value = object;
    for part in field.split('.') {
        value = &value[part];
    }
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Null if field == "spec.hostNetwork" => "false".to_owned(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

// ---- lists ----

/// The objects of one resource at `rv` (>= the store's `oldest`), rebuilt by undoing the
/// history's later changes.
fn snapshot(store: &Store, res: Res, rv: u64) -> BTreeMap<(String, String), Value> {
    let mut objects: BTreeMap<(String, String), Value> = store
        .objects
        .range((res, String::new(), String::new())..)
        .take_while(|((r, _, _), _)| *r == res)
        .map(|((_, ns, name), v)| ((ns.clone(), name.clone()), v.clone()))
        .collect();
    for change in store.history.iter().rev().take_while(|c| c.rv > rv) {
        if change.key.0 != res {
            continue;
        }
        let key = (change.key.1.clone(), change.key.2.clone());
        match (&change.kind, &change.prev) {
            (ChangeKind::Added, _) | (_, None) => {
                objects.remove(&key);
            }
            (ChangeKind::Modified | ChangeKind::Deleted, Some(prev)) => {
                objects.insert(key, prev.clone());
            }
        }
    }
    objects
}

fn encode_continue(res: Res, rv: u64, namespace: &str, name: &str) -> String {
    let token = json!({ "v": "tollgate.fake/v1", "r": res.plural(), "rv": rv, "ns": namespace, "name": name });
    let mut hex = String::new();
    for byte in token.to_string().bytes() {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

fn decode_continue(res: Res, token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) || token.len() > 4096 {
        return None;
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    if value["r"] != res.plural() {
        return None;
    }
    Some((
        value["rv"].as_u64()?,
        value["ns"].as_str()?.to_owned(),
        value["name"].as_str()?.to_owned(),
    ))
}

fn list(store: &Store, res: Res, filter: &Filter, params: &Params) -> Result<Value, ApiError> {
    let current = store.rv;
    let (rv, start_after) = if let Some(token) = &params.continue_token {
        let (rv, ns, name) = decode_continue(res, token)
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        if rv < store.oldest {
            return Err(ApiError::gone(
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter, or use the \
                 continue token in this response to retrieve the remainder of the results. \
                 Continuing with the provided token results in an inconsistent list - objects \
                 that were created, modified, or deleted between the time the first chunk was \
                 returned and now may show up in the list.",
            ));
        }
        if rv > current {
            return Err(ApiError::bad_request("continue key is not valid"));
        }
        (rv, Some((ns, name)))
    } else {
        match (params.resource_version, params.version_match) {
            (None, _) | (Some(0), _) => (current, None),
            (Some(rv), _) if rv > current => return Err(ApiError::too_large(rv, current)),
            (Some(_), None | Some(VersionMatch::NotOlderThan)) => (current, None),
            (Some(rv), Some(VersionMatch::Exact)) => {
                if rv < store.oldest {
                    return Err(ApiError::gone(format!(
                        "The resourceVersion for the provided list is too old. (requested \
                         {rv}, oldest available {})",
                        store.oldest
                    )));
                }
                (rv, None)
            }
        }
    };
    let objects = snapshot(store, res, rv);
    let limit = params
        .limit
        .map_or(usize::MAX, |l| l.min(MAX_PAGE) as usize);
    let mut matching = objects
        .iter()
        .filter(|((ns, name), _)| {
            start_after
                .as_ref()
                .is_none_or(|(sns, sname)| (ns, name) > (sns, sname))
        })
        .filter(|((ns, name), object)| filter.matches(&(res, ns.clone(), name.clone()), object));
    let mut items = Vec::new();
    let mut last = None;
    for ((ns, name), object) in matching.by_ref().take(limit) {
        let mut item = object.clone();
        if res.builtin() {
            if let Some(item) = item.as_object_mut() {
                item.remove("kind");
                item.remove("apiVersion");
            }
        }
        items.push(item);
        last = Some((ns, name));
    }
    let remaining = matching.count();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if remaining > 0 {
        if let Some((ns, name)) = last {
            metadata["continue"] = json!(encode_continue(res, rv, ns, name));
            if filter.labels.is_empty() && filter.fields.is_empty() {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
    }
    Ok(json!({
        "kind": format!("{}List", res.kind()),
        "apiVersion": res.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

// ---- watches ----

struct WatchStream {
    shared: Arc<Shared>,
    res: Res,
    filter: Filter,
    /// Every change up to here has been considered.
    cursor: u64,
    pending: VecDeque<Bytes>,
    /// End the stream once `pending` is sent.
    finishing: bool,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    next_bookmark: tokio::time::Instant,
    changed: watch::Receiver<u64>,
    dropped: watch::Receiver<u64>,
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn start_watch(
    shared: &Arc<Shared>,
    store: &mut Store,
    res: Res,
    filter: Filter,
    params: &Params,
) -> Result<WatchStream, ApiError> {
    let current = store.rv;
    let timeout = match params.timeout_seconds {
        Some(secs) if secs > 0 => Duration::from_secs(secs).min(shared.options.max_watch_timeout),
        _ => shared.options.max_watch_timeout,
    };
    let now = tokio::time::Instant::now();
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    let mut dropped = shared.drop_generation.subscribe();
    dropped.borrow_and_update();
    let mut stream = WatchStream {
        shared: shared.clone(),
        res,
        filter,
        cursor: current,
        pending: VecDeque::new(),
        finishing: false,
        bookmarks: params.bookmarks,
        deadline: now + timeout,
        next_bookmark: now + shared.options.bookmark_interval,
        changed,
        dropped,
    };
    let initial_events = match (params.resource_version, params.send_initial_events) {
        (_, Some(true)) => true,
        (None | Some(0), send) => send != Some(false),
        (Some(_), _) => false,
    };
    match params.resource_version {
        Some(rv) if rv > current => return Err(ApiError::too_large(rv, current)),
        Some(rv) if rv != 0 && !initial_events => {
            if rv < store.oldest {
                let status = status_object(
                    410,
                    "Expired",
                    format!("too old resource version: {rv} ({})", store.oldest),
                    None,
                );
                stream.pending.push_back(event_line("ERROR", &status));
                stream.finishing = true;
                store.counters.expired += 1;
            } else {
                stream.cursor = rv;
            }
        }
        _ => {}
    }
    if initial_events {
        for ((ns, name), object) in snapshot(store, res, current) {
            if stream.filter.matches(&(res, ns, name), &object) {
                stream.pending.push_back(event_line("ADDED", &object));
                store.counters.events += 1;
            }
        }
        if params.send_initial_events == Some(true) {
            let mut bookmark = stream.bookmark_object(current);
            bookmark["metadata"]["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
            stream.pending.push_back(event_line("BOOKMARK", &bookmark));
            store.counters.bookmarks += 1;
        }
    }
    Ok(stream)
}

impl WatchStream {
    fn bookmark_object(&self, rv: u64) -> Value {
        json!({
            "kind": self.res.kind(),
            "apiVersion": self.res.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
        })
    }

    /// The event a change means for this watch, if any: objects that start or stop matching
    /// the selectors arrive as ADDED or DELETED.
    fn event_for(&self, change: &Change) -> Option<Bytes> {
        if change.key.0 != self.res {
            return None;
        }
        let now = self.filter.matches(&change.key, &change.object);
        let before = change
            .prev
            .as_ref()
            .is_some_and(|prev| self.filter.matches(&change.key, prev));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Deleted, true, _) => "DELETED",
            (ChangeKind::Deleted, false, _) => return None,
            (_, true, true) => "MODIFIED",
            (_, false, true) => "ADDED",
            (_, true, false) => "DELETED",
            (_, false, false) => return None,
        };
        Some(event_line(kind, &change.object))
    }

    /// Turns the history after the cursor into events, or into a 410 ERROR if some of it is
    /// gone.
    fn fetch(&mut self) {
        if self.finishing {
            return;
        }
        let mut store = self.shared.lock();
        if self.cursor < store.discarded {
            let status = status_object(
                410,
                "Expired",
                format!(
                    "too old resource version: {} ({})",
                    self.cursor, store.oldest
                ),
                None,
            );
            self.pending.push_back(event_line("ERROR", &status));
            self.finishing = true;
            store.counters.expired += 1;
            return;
        }
        let start = store.history.partition_point(|c| c.rv <= self.cursor);
        let mut events = 0;
        let mut seen = 0;
        for change in store.history.range(start..).take(MAX_FETCH) {
            seen += 1;
            self.cursor = change.rv;
            if let Some(line) = self.event_for(change) {
                self.pending.push_back(line);
                events += 1;
            }
        }
        if start + seen == store.history.len() {
            self.cursor = self.cursor.max(store.rv);
        }
        store.counters.events += events;
    }

    /// The next chunk, None at the end, or an error to cut the connection.
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            // A server that went away says nothing more, even if its connection task has not
            // closed this stream yet.
            if self.shared.unavailable.load(Ordering::SeqCst) {
                self.pending.clear();
                self.finishing = true;
                return Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the server is unavailable",
                )));
            }
            if let Some(line) = self.pending.pop_front() {
                return Some(Ok(line));
            }
            if self.finishing {
                return None;
            }
            self.changed.borrow_and_update();
            self.fetch();
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.finishing = true;
                }
                _ = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.next_bookmark = tokio::time::Instant::now() + self.shared.options.bookmark_interval;
                    self.fetch();
                    if !self.finishing {
                        let bookmark = self.bookmark_object(self.cursor);
                        self.pending.push_back(event_line("BOOKMARK", &bookmark));
                        self.shared.lock().counters.bookmarks += 1;
                    }
                }
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        self.finishing = true;
                    }
                }
                _ = self.dropped.changed() => {
                    self.finishing = true;
                    self.pending.clear();
                    self.shared.lock().counters.dropped_watches += 1;
                    return Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "watch dropped by the test",
                    )));
                }
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut store = self.shared.lock();
        store.counters.open_watches = store.counters.open_watches.saturating_sub(1);
    }
}

// ---- identities and time ----

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn seed(addr: SocketAddr) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(addr.port()))
}

/// A version-4-shaped UUID, unique per server and counter.
fn uuid(seed: u64, counter: u64) -> String {
    let high = splitmix64(seed ^ counter.wrapping_mul(0x1000_0000_01b3));
    let low = splitmix64(high ^ counter);
    let high = (high & !0xf000) | 0x4000;
    let low = (low & !(0xc << 60)) | (0x8 << 60);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        high >> 32,
        (high >> 16) & 0xffff,
        high & 0xffff,
        low >> 48,
        low & 0xffff_ffff_ffff
    )
}

/// `2025-01-31T12:00:00Z`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_600 + 3661); // 2000-02-29 13:01:01
        assert_eq!(rfc3339(leap), "2000-02-29T13:01:01Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // 2025-12-31 23:59:59
        assert_eq!(rfc3339(later), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn uids_look_like_uuids_and_differ() {
        let (a, b) = (uuid(7, 1), uuid(7, 2));
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        let object = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let key = (Res::Pods, "ns".to_owned(), "p".to_owned());
        let matches = |selector: &str| {
            let filter = Filter {
                namespace: None,
                labels: parse_label_selector(selector).unwrap(),
                fields: Vec::new(),
            };
            filter.matches(&key, &object)
        };
        assert!(matches(""));
        assert!(matches("app=web"));
        assert!(matches("app==web,tier"));
        assert!(matches("app in (db, web),!canary"));
        assert!(matches("canary notin (yes)"));
        assert!(matches("app!=db"));
        assert!(!matches("app=db"));
        assert!(!matches("app notin (web)"));
        assert!(!matches("!tier"));
        for bad in [
            "app in (",
            "app=web,",
            "a b",
            "app in ()",
            "x>1",
            "!",
            "app=w b",
        ] {
            assert!(parse_label_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors_use_the_real_field_sets() {
        let host = pod("ns", "p", &[], "sa", "node-a", &[], "Running", true);
        let plain = pod("ns", "q", &[], "sa", "", &[], "Pending", false);
        let key = (Res::Pods, "ns".to_owned(), "p".to_owned());
        let matches = |selector: &str, object: &Value| {
            let filter = Filter {
                namespace: None,
                labels: Vec::new(),
                fields: parse_field_selector(selector, Res::Pods).unwrap(),
            };
            filter.matches(&key, object)
        };
        assert!(matches("spec.nodeName=node-a,spec.hostNetwork=true", &host));
        assert!(matches("spec.nodeName=,spec.hostNetwork=false", &plain));
        assert!(matches("status.phase!=Running", &plain));
        assert!(!matches("metadata.name==p", &plain));
        assert!(parse_field_selector("spec.containers=x", Res::Pods).is_err());
        assert!(parse_field_selector("spec.nodeName=x", Res::Namespaces).is_err());
    }

    #[test]
    fn continue_tokens_round_trip_and_are_per_resource() {
        let token = encode_continue(Res::Pods, 1234, "ns", "p");
        assert_eq!(
            decode_continue(Res::Pods, &token),
            Some((1234, "ns".to_owned(), "p".to_owned()))
        );
        assert_eq!(decode_continue(Res::Namespaces, &token), None);
        assert_eq!(decode_continue(Res::Pods, "zz"), None);
        assert_eq!(decode_continue(Res::Pods, "é"), None);
    }
}
