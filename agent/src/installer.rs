//! The policy installer: the one writer of the policy maps, the interface map and the links.
//!
//! It runs on a thread of its own and takes [`Command`]s from a channel, one at a time: apply a
//! policy, answer a `check` (which runs the check program and reads its result map), rescan
//! the interfaces. After each change it publishes what it installed as an [`Installed`] through a
//! `tokio::sync::watch`: `status`, the event reader and the metrics read that, never the maps
//! the installer is writing, so no reader waits for a compile and swap, and no swap waits for a
//! reader.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tollgate_common::{
    identity::{
        IdentityId, IdentityKeyV4, IdentityKeyV6, IdentityValue, IDENTITY_AMBIGUOUS,
        IDENTITY_FIRST_USER, SLOT_PREFIX_BITS,
    },
    slot_of, Verdict,
};

use crate::{
    auth::plan::AuthPlan,
    cluster::{
        members::{Membership, StaticClaims},
        ClusterEvent, PodNodes, SharedStatus,
    },
    datapath::Datapath,
    error::Error,
    host::host_addresses,
    limits::LimitInfo,
    loader::{self, Attachment, InterfaceSelector, LoadOptions, Loaded},
    names::NamedGenerations,
    paths::PinLayout,
    persist::{hex, PolicyStore, SavedPolicy},
    pinlock::PinLock,
    policy::{compile_policy, parse_policy_owned, ClockReading, Policy, PolicyNames, Protocol},
    wire::{
        CheckLimit, CheckRequest, CheckResponse, InterfaceStatus, MapStatus, MapUsage, NamedReason,
        PolicyResponse,
    },
};

/// What the installer needs to know of the agent's configuration.
#[derive(Clone, Debug)]
pub struct InstallerConfig {
    pub selector: InterfaceSelector,
    /// Interfaces (among those enforced) where traffic from `world` arrives with any source:
    /// no source validation there.
    pub uplinks: Option<InterfaceSelector>,
    pub bpffs: std::path::PathBuf,
    /// How maps are created when none are pinned yet.
    pub load: LoadOptions,
}

impl InstallerConfig {
    fn is_uplink(&self, ifname: &str) -> bool {
        self.uplinks.as_ref().is_some_and(|u| u.matches(ifname))
    }
}

/// What the agent keeps of the live policy once it is compiled and installed: what `status` and
/// `policy get` answer with. The validated rules are not kept (30 MB for 100k rules); the maps
/// and [`PolicyNames`] hold what enforcement and events need.
#[derive(Debug)]
pub struct LivePolicy {
    pub name: String,
    pub rules: usize,
    pub identities: usize,
    /// The YAML as applied.
    pub source_text: String,
    /// SHA-256 of `source_text`, hex: what the audit log records of an applied policy.
    pub digest: String,
    /// The identity pairs its rules require authenticated.
    pub auth: Arc<AuthPlan>,
    /// Kubernetes mode before the first merged policy: the previous agent's pinned policy
    /// enforces, and what it requires (its auth plan) is not known yet.
    pub placeholder: bool,
}

impl From<Policy> for LivePolicy {
    fn from(policy: Policy) -> Self {
        let digest = hex(&Sha256::digest(policy.source_text.as_bytes()));
        let auth = Arc::new(AuthPlan::of(&policy));
        Self {
            auth,
            placeholder: false,
            name: policy.name,
            rules: policy.rules.len(),
            identities: policy.identities.len(),
            source_text: policy.source_text,
            digest,
        }
    }
}

impl LivePolicy {
    /// Kubernetes mode before the first sync: the previous agent's policy, of which this agent
    /// knows only that it is pinned.
    fn pinned() -> Self {
        Self {
            name: "(pinned; waiting for the API server)".to_owned(),
            rules: 0,
            identities: 0,
            source_text: String::new(),
            digest: String::new(),
            auth: Arc::default(),
            placeholder: true,
        }
    }
}

/// What the installer last installed and attached: published after every change.
#[derive(Clone)]
pub struct Installed {
    pub policy: Arc<LivePolicy>,
    pub generation: u64,
    /// Names of the live generation and the ones before it (for events still on their way).
    pub names: NamedGenerations,
    /// What each rate-limit bucket of the live policy (and the one before it) meters.
    pub limits: Arc<HashMap<u32, LimitInfo>>,
    /// The live policy's buckets, by id.
    pub live_limits: Arc<Vec<u32>>,
    pub interfaces: Vec<InterfaceStatus>,
    pub attachments: Vec<Attachment>,
    /// Links found unpinned or detached and attached again, since start.
    pub links_restored: u64,
    /// Policy-map entries of the live slot, counted after the install.
    pub map_usage: MapUsage,
    /// Every map's capacity, and the entries of the policy maps and the interface map.
    pub maps: Vec<MapStatus>,
}

impl Installed {
    pub fn live_names(&self) -> &PolicyNames {
        self.names.live()
    }
}

/// A request to the installer. Each carries the channel its answer goes back on.
pub enum Command {
    Apply {
        text: String,
        source: Source,
        reply: oneshot::Sender<Result<PolicyResponse, Error>>,
    },
    /// Kubernetes mode: pods and namespaces that changed.
    Cluster(Vec<ClusterEvent>),
    Check {
        request: CheckRequest,
        reply: oneshot::Sender<Result<CheckResponse, Error>>,
    },
    /// Bring the enforced interfaces in line with what exists now, and forget the names of
    /// generations replaced long ago.
    Rescan,
    /// Install the live policy again as a new generation, so that every tracked flow is
    /// decided again at its next packet: a proof of authentication was withdrawn before its
    /// expiry (the flows it admitted carry that expiry, not the withdrawal).
    Redecide { reason: String },
}

/// Requests queued for the installer beyond the one it is working on. `apply` and `check`
/// callers wait for their answer, so this is only reached by many concurrent callers; they
/// then wait for room (bounded by their own request timeouts).
const QUEUE: usize = 64;

/// The handle through which everything else talks to the installer. Cheap to clone.
#[derive(Clone)]
pub struct InstallerHandle {
    commands: mpsc::Sender<Command>,
    installed: watch::Receiver<Arc<Installed>>,
}

impl InstallerHandle {
    /// What is installed now.
    pub fn installed(&self) -> Arc<Installed> {
        self.installed.borrow().clone()
    }

    /// A receiver that sees every later install.
    pub fn watch(&self) -> watch::Receiver<Arc<Installed>> {
        self.installed.clone()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// `tollgate policy apply`.
    pub async fn apply(&self, text: String) -> Result<PolicyResponse, Error> {
        self.apply_from(text, Source::Api).await
    }

    /// The merged Policy objects (Kubernetes mode).
    pub async fn apply_from_cluster(&self, text: String) -> Result<PolicyResponse, Error> {
        self.apply_from(text, Source::Cluster).await
    }

    /// The `--policy` file, read again after it changed.
    pub async fn apply_from_file(&self, text: String) -> Result<PolicyResponse, Error> {
        self.apply_from(text, Source::File).await
    }

    async fn apply_from(&self, text: String, source: Source) -> Result<PolicyResponse, Error> {
        self.ask(|reply| Command::Apply {
            text,
            source,
            reply,
        })
        .await
    }

    /// Pods and namespaces that changed; waits for room in the queue, not for the install.
    pub async fn cluster(&self, events: Vec<ClusterEvent>) -> Result<(), ()> {
        self.commands
            .send(Command::Cluster(events))
            .await
            .map_err(|_| ())
    }

    pub async fn check(&self, request: CheckRequest) -> Result<CheckResponse, Error> {
        self.ask(|reply| Command::Check { request, reply }).await
    }

    /// Asks for every tracked flow to be decided again (see [`Command::Redecide`]); waits for
    /// room in the queue, not for the install.
    pub async fn redecide(&self, reason: String) {
        let _ = self.commands.send(Command::Redecide { reason }).await;
    }

    /// Asks for a rescan; a rescan already queued is enough.
    pub fn rescan(&self) {
        let _ = self.commands.try_send(Command::Rescan);
    }

    /// Whether the installer thread still takes commands.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }
}

fn stopped() -> Error {
    Error::Unavailable("the policy installer has stopped; see the agent's log".to_owned())
}

/// The installer's own state: everything it writes, and what it has written.
pub struct Installer {
    config: InstallerConfig,
    loaded: Loaded,
    datapath: Datapath,
    policy: Arc<LivePolicy>,
    generation: u64,
    names: NamedGenerations,
    /// The enforced interfaces (name, ifindex), as described in `TG_INTERFACES`.
    interfaces: Vec<(String, u32)>,
    /// Uplinks (`--uplinks`) that are not enforced: described in `TG_INTERFACES` all the same,
    /// so that packets from them are checked as coming from an uplink where they leave.
    passive_uplinks: Vec<(String, u32)>,
    attachments: Vec<Attachment>,
    links_restored: u64,
    /// Selected interfaces the classifiers cannot enforce (L3 devices), already warned about.
    not_enforced: Vec<String>,
    published: watch::Sender<Arc<Installed>>,
    /// Told of every policy that went live or was refused (the audit log records them).
    applied: Option<mpsc::UnboundedSender<PolicyChange>>,
    /// Kubernetes mode.
    cluster: Option<ClusterState>,
    /// File mode: where the policy in force is saved, and the digest of the `--policy` file
    /// as last read.
    store: Option<(PolicyStore, String)>,
    /// Held for the installer's lifetime: no second agent or uninstall on this pin directory.
    _lock: PinLock,
}

/// What the installer enforces at start.
pub enum Initial {
    /// File mode: this policy.
    Policy(Policy),
    /// Kubernetes mode: the pinned datapath's live policy stays until the cluster is synced; a
    /// datapath created now gets `fallback` (deny all).
    KeepPinned { fallback: Policy },
}

/// What became of a policy given to the installer, for the audit log.
#[derive(Debug, Clone)]
pub enum PolicyChange {
    Applied(Applied),
    /// `policy apply` refused it; the running policy stays in force.
    Rejected {
        /// SHA-256 of the text as received, hex.
        digest: String,
        reason: String,
    },
}

/// Where a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `tollgate policy apply`.
    Api,
    /// The `--policy` file, changed on disk.
    File,
    /// The Policy objects of the cluster, merged.
    Cluster,
    /// The live policy again, to decide every tracked flow again.
    Redecide,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
            Source::Cluster => "kubernetes",
            Source::Redecide => "redecide",
        }
    }
}

/// A policy that went live.
#[derive(Debug, Clone)]
pub struct Applied {
    pub name: String,
    pub generation: u64,
    pub digest: String,
    pub rules: usize,
    pub identities: usize,
    /// `start` (the policy file, or the deny-all policy of Kubernetes mode, at agent start),
    /// `api` (`tollgate policy apply`), `file` (the policy file changed) or `kubernetes` (the
    /// merged Policy objects).
    pub source: &'static str,
}

impl Installer {
    /// Locks the pin directory, loads the datapath, describes the interfaces, installs
    /// `policy` and attaches, in that order: by the time a program is attached to a new
    /// interface the policy and interface settings it reads are complete.
    pub fn start(
        config: InstallerConfig,
        initial: Initial,
        applied: Option<mpsc::UnboundedSender<PolicyChange>>,
        mut cluster: Option<ClusterState>,
    ) -> Result<Installer> {
        let layout = PinLayout::new(&config.bpffs);
        // Refuse maps this build cannot adopt before creating anything under --bpffs (checked
        // again under the lock, at load).
        crate::datapath::check_pinned_maps(&layout)?;
        loader::ensure_bpffs(&layout)?;
        let lock = PinLock::acquire(&layout.root)?;
        let adopting = loader::is_installed(&layout);
        let mut loaded = loader::load_with(&layout, &config.load)?;
        let mut datapath = Datapath::open(&layout)?;
        let (interfaces, not_enforced) = enforceable_interfaces(&config.selector)?;
        warn_not_enforced(&not_enforced);
        let passive_uplinks = passive_uplinks(&config, &interfaces)?;
        // Bindings are left as they are: the next install writes its slot's, and the live slot
        // belongs to the policy the previous agent installed. So is `enforced`: a link adopted
        // from the previous agent has been checking at ingress all along.
        for (name, ifindex) in &interfaces {
            datapath.write_interface(*ifindex, config.is_uplink(name), None, [None, None])?;
        }
        for (_, ifindex) in &passive_uplinks {
            datapath.write_interface(*ifindex, true, Some(false), [None, None])?;
        }
        let live = datapath.active_generation()?;
        let (policy, names, generation, installed) = match initial {
            Initial::KeepPinned { .. } if adopting && live > 0 => {
                tracing::info!(
                    generation = live,
                    "keeping the pinned policy until the cluster is synced"
                );
                (
                    LivePolicy::pinned(),
                    Arc::new(PolicyNames::default()),
                    live,
                    false,
                )
            }
            Initial::Policy(policy) | Initial::KeepPinned { fallback: policy } => {
                let (p, n, g) = install(
                    &mut datapath,
                    policy,
                    &interfaces,
                    cluster.as_mut(),
                    &|name| config.is_uplink(name),
                )?;
                (p, n, g, true)
            }
        };
        release_freed_memory();
        let reconciled = loaded.reconcile(&interfaces)?;
        // Attached (or adopted): checked at their ingress from now on.
        for (name, ifindex) in &interfaces {
            datapath.write_interface(*ifindex, config.is_uplink(name), Some(true), [None, None])?;
        }
        forget_other_interfaces(&mut datapath, &interfaces, &passive_uplinks);
        let attachments = reconciled.attachments;
        tracing::info!(
            policy = %policy.name,
            generation,
            rules = policy.rules,
            attachments = attachments.len(),
            adopted = attachments.iter().filter(|a| a.adopted).count(),
            "datapath {}",
            if adopting { "adopted" } else { "installed" }
        );
        let names = NamedGenerations::new(generation, names);
        let policy = Arc::new(policy);
        let mut installer = Installer {
            published: watch::channel(Arc::new(Installed {
                policy: policy.clone(),
                generation,
                names: names.clone(),
                limits: Arc::default(),
                live_limits: Arc::default(),
                interfaces: Vec::new(),
                attachments: Vec::new(),
                links_restored: 0,
                map_usage: MapUsage::default(),
                maps: Vec::new(),
            }))
            .0,
            config,
            loaded,
            datapath,
            policy,
            generation,
            names,
            interfaces,
            passive_uplinks,
            attachments,
            links_restored: 0,
            not_enforced,
            applied,
            cluster,
            store: None,
            _lock: lock,
        };
        installer.publish();
        if installed {
            installer.tell_applied("start");
        }
        Ok(installer)
    }

    /// File mode: saves the policy in force to `store` now and after every change, with the
    /// digest of the `--policy` file as read at start (see `persist`).
    pub fn save_policies(&mut self, store: PolicyStore, file_digest: String, source: &str) {
        self.store = Some((store, file_digest));
        self.save_policy(source);
    }

    fn save_policy(&self, source: &str) {
        let Some((store, file_digest)) = &self.store else {
            return;
        };
        let saved = SavedPolicy {
            text: self.policy.source_text.clone(),
            source: source.to_owned(),
            file_digest: file_digest.clone(),
            saved_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        if let Err(e) = store.save(&saved) {
            // What is saved is older than what is in force now: it must not come back at a
            // restart. Without it the --policy file decides.
            match std::fs::remove_file(store.path()) {
                Ok(()) => tracing::warn!(
                    error = %format!("{e:#}"),
                    path = %store.path().display(),
                    "could not save the policy in force; the older saved policy was removed, so a restart enforces the --policy file"
                ),
                Err(r) if r.kind() == std::io::ErrorKind::NotFound => tracing::warn!(
                    error = %format!("{e:#}"),
                    path = %store.path().display(),
                    "could not save the policy in force; a restart enforces the --policy file"
                ),
                Err(r) => tracing::error!(
                    error = %format!("{e:#}"),
                    remove_error = %r,
                    path = %store.path().display(),
                    "could not save the policy in force, nor remove the older saved one: a restart would enforce that older policy while the --policy file is unchanged; fix the state directory"
                ),
            }
        }
    }

    /// Runs the installer on a thread of its own until every handle is dropped.
    pub fn spawn(self) -> Result<(InstallerHandle, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let handle = InstallerHandle {
            commands: tx,
            installed: self.published.subscribe(),
        };
        let mut installer = self;
        // A clock for waiting on the channel with a deadline (revoked flows to remove).
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .context("starting the installer's clock")?;
        let thread = std::thread::Builder::new()
            .name("tollgate-installer".into())
            .spawn(move || loop {
                let command = match installer.next_deadline() {
                    None => rx.blocking_recv(),
                    Some(wait) => match clock
                        .block_on(async { tokio::time::timeout(wait, rx.recv()).await })
                    {
                        Ok(command) => command,
                        Err(_) => {
                            installer.flush_revoked(false);
                            continue;
                        }
                    },
                };
                let Some(command) = command else { return };
                installer.handle(command);
            })
            .context("starting the installer thread")?;
        Ok((handle, thread))
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Apply {
                text,
                source,
                reply,
            } => {
                let _ = reply.send(self.apply(text, source));
            }
            Command::Cluster(events) => self.cluster_events(events),
            Command::Check { request, reply } => {
                let _ = reply.send(self.check(&request));
            }
            Command::Redecide { reason } => self.redecide(&reason),
            Command::Rescan => {
                if self.names.forget_expired(Instant::now()) {
                    release_freed_memory();
                    self.publish();
                }
                if let Err(e) = self.rescan() {
                    tracing::warn!(error = %format!("{e:#}"), "interface rescan failed");
                }
                if let Some(c) = self.cluster.as_mut() {
                    c.bindings = pod_bindings(&c.members, &c.node);
                }
                if self.sync_bindings() {
                    self.publish();
                }
                self.retry_unwritten();
                self.flush_revoked(true);
            }
        }
    }

    fn tell_applied(&self, source: &'static str) {
        if let Some(tx) = &self.applied {
            let _ = tx.send(PolicyChange::Applied(Applied {
                name: self.policy.name.clone(),
                generation: self.generation,
                digest: self.policy.digest.clone(),
                rules: self.policy.rules,
                identities: self.policy.identities,
                source,
            }));
        }
    }

    /// Publishes what is installed now. Counts the policy maps' entries of the live slot (a
    /// walk of the policy maps: done here, after a change, rather than on every `status`).
    fn publish(&mut self) {
        let slot = slot_of(self.generation);
        let live_names = self.names.live();
        let interfaces = self
            .interfaces
            .iter()
            .chain(&self.passive_uplinks)
            .map(|(name, ifindex)| {
                // What was written, where Kubernetes mode writes bindings itself.
                let bound = self
                    .cluster
                    .as_ref()
                    .filter(|c| c.active)
                    .and_then(|c| c.written.get(ifindex).copied())
                    .unwrap_or_else(|| live_names.bound_identity(name));
                InterfaceStatus {
                    name: name.clone(),
                    ifindex: *ifindex,
                    role: if self.config.is_uplink(name) {
                        "uplink"
                    } else {
                        "workload"
                    }
                    .to_owned(),
                    bound_identity: (bound != 0)
                        .then(|| live_names.identity_name(bound).to_owned()),
                }
            })
            .collect();
        let installed = Installed {
            policy: self.policy.clone(),
            generation: self.generation,
            names: self.names.clone(),
            limits: Arc::new(self.datapath.limit_infos()),
            live_limits: Arc::new(self.datapath.live_limits()),
            interfaces,
            attachments: self.attachments.clone(),
            links_restored: self.links_restored,
            map_usage: self.datapath.usage(slot),
            maps: self.datapath.map_status(slot),
        };
        self.published.send_replace(Arc::new(installed));
    }

    fn apply(&mut self, text: String, source: Source) -> Result<PolicyResponse, Error> {
        if self.cluster.is_some() && source == Source::Api {
            return Err(Error::BadRequest(
                "this agent runs in Kubernetes mode: policy is managed through the API server \
                 (kubectl apply -f a tollgate.dev/v1alpha1 Policy object); `tollgate policy get` \
                 shows the merged policy in force"
                    .to_owned(),
            ));
        }
        let digest = hex(&Sha256::digest(text.as_bytes()));
        let result = self.try_apply(text, source);
        if let (Err(e), Some(tx)) = (&result, &self.applied) {
            let _ = tx.send(PolicyChange::Rejected {
                digest,
                reason: shortened(&e.to_string(), MAX_REASON_BYTES),
            });
        }
        result
    }

    /// The live policy again, as the next generation (see [`Command::Redecide`]).
    fn redecide(&mut self, reason: &str) {
        let text = self.policy.source_text.clone();
        let failed = if text.is_empty() {
            // Kubernetes mode before the first sync: the pinned policy is not known here.
            Some("the live policy is not known to this agent yet".to_owned())
        } else {
            match self.try_apply(text, Source::Redecide) {
                Ok(r) => {
                    tracing::info!(
                        generation = r.generation,
                        reason,
                        "tracked flows are decided again"
                    );
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(why) = failed {
            // Fail closed: without a new generation, forget every tracked flow instead, so each
            // one's next packet is decided (and a flow that relied on the withdrawn proof is
            // refused) all the same.
            tracing::warn!(error = %why, reason, "no new generation; forgetting every tracked flow instead");
            if let Err(e) = self.datapath.clear_conntrack() {
                tracing::error!(error = %format!("{e:#}"), "clearing the conntrack maps failed");
            }
        }
    }

    fn try_apply(&mut self, text: String, source: Source) -> Result<PolicyResponse, Error> {
        let policy =
            parse_policy_owned(text, "policy").map_err(|e| Error::InvalidPolicy(e.to_string()))?;
        if self.cluster.is_none() {
            refuse_selectors(&policy)?;
        }
        let interfaces = self.interfaces.clone();
        let config = &self.config;
        let (policy, names, generation) = install(
            &mut self.datapath,
            policy,
            &interfaces,
            self.cluster.as_mut(),
            &|name| config.is_uplink(name),
        )
        .map_err(Error::NotInstalled)?;
        tracing::info!(policy = %policy.name, generation, rules = policy.rules, "policy applied");
        self.policy = Arc::new(policy);
        self.generation = generation;
        self.names.push(generation, names, Instant::now());
        if source == Source::File {
            if let Some((_, file_digest)) = &mut self.store {
                *file_digest = self.policy.digest.clone();
            }
        }
        self.save_policy(source.name());
        self.publish();
        self.tell_applied(source.name());
        release_freed_memory();
        Ok(PolicyResponse {
            name: self.policy.name.clone(),
            generation,
            rules: self.policy.rules,
            text: self.policy.source_text.clone(),
        })
    }

    /// Kubernetes mode: pods and namespaces changed. Entries of the live slot are rewritten
    /// address by address (no new generation, no rule map touched). An address that loses an
    /// identity loses its entry first; its tracked flows are removed before it gets another.
    fn cluster_events(&mut self, events: Vec<ClusterEvent>) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let changes = c.members.apply(events);
        let slot = slot_of(self.generation);
        let mut failed = None;
        for ch in changes.iter().filter(|ch| ch.before.is_some()) {
            if let Err(e) =
                self.datapath
                    .set_address(slot, ch.addr, c.members.statics().exact(&ch.addr))
            {
                failed = Some(e);
            }
            if ch.revokes() {
                c.revoked.insert(ch.addr);
                c.revoked_since.get_or_insert_with(Instant::now);
            }
        }
        // An address another pod now holds (reused) loses its old flows before anything else:
        // they must never reach the new pod.
        if changes
            .iter()
            .any(|ch| ch.after.is_some() && ch.new_holders && c.revoked.contains(&ch.addr))
        {
            flush_revoked(&mut self.datapath, c);
        }
        // The same pod in another identity (relabelled) gets it at once; its flows of the old
        // identity go with the purge that is due (within REVOKE_BATCH), so a burst of relabels
        // costs one walk.
        for ch in &changes {
            c.unwritten.remove(&ch.addr);
            if let Some(id) = ch.after {
                let value = self.datapath.identity_value(id);
                if let Err(e) = self.datapath.set_address(slot, ch.addr, Some(value)) {
                    c.unwritten.insert(ch.addr);
                    failed = Some(e);
                }
            }
        }
        c.bindings = pod_bindings(&c.members, &c.node);
        let rebound = self.sync_bindings();
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if let Some(e) = failed {
            tracing::error!(error = %format!("{e:#}"), "writing pod addresses failed (retried every second; see `tollgate status`)");
        }
        for ch in &changes {
            if ch.after == Some(IDENTITY_AMBIGUOUS) {
                tracing::warn!(address = %ch.addr, "pod address gets no identity (conflict; see `tollgate status`)");
            }
        }
        {
            let mut s = c.status.lock().expect("status lock");
            s.pod_changes += changes.len() as u64;
        }
        c.report();
        let due = c
            .revoked_since
            .is_some_and(|since| since.elapsed() >= REVOKE_BATCH);
        if due {
            flush_revoked(&mut self.datapath, c);
        }
        if rebound {
            self.publish();
        }
    }

    /// Kubernetes mode, once active: writes the binding each enforced workload interface should
    /// have in the live slot where it differs from what was written (by ifindex, so a veth
    /// recreated under the same name is bound again). Returns whether anything changed.
    fn sync_bindings(&mut self) -> bool {
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        if !c.active {
            return false;
        }
        let slot = slot_of(self.generation);
        let live = self.names.live();
        let mut changed = false;
        let mut written = HashMap::with_capacity(self.interfaces.len());
        for (name, ifindex) in &self.interfaces {
            let policy = live.bound_identity(name);
            let want = if self.config.is_uplink(name) {
                policy
            } else {
                desired_binding(policy, c.bindings.get(name))
            };
            if c.written.get(ifindex) != Some(&want) {
                match self.datapath.bind_interface(*ifindex, slot, want) {
                    Ok(()) => changed = true,
                    Err(e) => {
                        tracing::error!(interface = %name, error = %format!("{e:#}"), "binding a pod interface failed");
                        continue;
                    }
                }
            }
            written.insert(*ifindex, want);
        }
        c.written = written;
        changed
    }

    /// Kubernetes mode: writes again the pod addresses whose write failed.
    fn retry_unwritten(&mut self) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.unwritten.is_empty() {
            return;
        }
        let slot = slot_of(self.generation);
        let pending: Vec<IpAddr> = c.unwritten.iter().copied().collect();
        for addr in pending {
            let Some(&id) = c.members.assigned().get(&addr) else {
                c.unwritten.remove(&addr);
                continue;
            };
            let value = self.datapath.identity_value(id);
            if self.datapath.set_address(slot, addr, Some(value)).is_ok() {
                c.unwritten.remove(&addr);
            }
        }
        c.report();
    }

    /// How long until revoked addresses are due to lose their flows, if any wait.
    fn next_deadline(&self) -> Option<Duration> {
        let since = self.cluster.as_ref()?.revoked_since?;
        Some(REVOKE_BATCH.saturating_sub(since.elapsed()))
    }

    /// Removes the tracked flows of revoked addresses: now when `force`, else once the oldest
    /// has waited `REVOKE_BATCH`.
    fn flush_revoked(&mut self, force: bool) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.revoked.is_empty() {
            return;
        }
        if force || c.revoked_since.is_some_and(|s| s.elapsed() >= REVOKE_BATCH) {
            flush_revoked(&mut self.datapath, c);
        }
    }

    /// Decides a hypothetical new flow with the kernel's own code against the live maps (see
    /// `check.rs`).
    fn check(&mut self, req: &CheckRequest) -> Result<CheckResponse, Error> {
        let bad = |m: String| Error::BadRequest(m);
        let proto = Protocol::parse(&req.protocol)
            .filter(|p| *p != Protocol::Any)
            .ok_or_else(|| {
                bad(format!(
                    "unknown protocol {:?} (expected tcp, udp, icmp or icmpv6)",
                    req.protocol
                ))
            })?;
        if req.from.is_ipv4() != req.to.is_ipv4() {
            return Err(bad(format!(
                "--from {} and --to {} are of different address families; no packet has both \
                 (an IPv4-mapped address such as ::ffff:10.0.0.1 is IPv6 on the wire)",
                req.from, req.to
            )));
        }
        match (proto, req.from.is_ipv4()) {
            (Protocol::Icmp, false) => return Err(bad("icmp is IPv4; use icmpv6".into())),
            (Protocol::IcmpV6, true) => return Err(bad("icmpv6 is IPv6; use icmp".into())),
            _ => {}
        }
        let (ifindex, mark) = match &req.interface {
            None => (0, 0),
            Some(name) => {
                let ifindex = self
                    .interfaces
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, i)| *i)
                    .ok_or_else(|| {
                        bad(format!(
                            "interface {name:?} is not enforced by this agent (enforced: {})",
                            self.interfaces
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                (ifindex, tollgate_common::CHECK_MARK_VALIDATE_SOURCE)
            }
        };
        let packet = crate::check::probe_packet(req.from, req.to, proto.number(), req.port);
        self.datapath.clear_check()?;
        self.loaded.run_check(&packet, ifindex, mark)?;
        let r = self.datapath.check_result()?;
        let verdict = Verdict::from_u32(r.verdict)
            .ok_or_else(|| anyhow!("the check program answered verdict {}", r.verdict))?;
        let names = self.names.of(r.generation);
        let name = |id: u32| match (id, names) {
            (tollgate_common::flow::EVENT_IDENTITY_UNRESOLVED, _) => "unresolved".to_owned(),
            (_, Some(n)) => n.identity_name(id).to_owned(),
            (_, None) => format!("identity #{id}"),
        };
        let rule = match (verdict, names) {
            (Verdict::DropSpoofed, _) => "source validation".to_owned(),
            (Verdict::DenyNoPolicy, _) => "no policy loaded".to_owned(),
            (_, Some(n)) => n.rule_name(r.rule_id).to_owned(),
            (_, None) => format!("rule #{}", r.rule_id),
        };
        let from_identity = name(r.src_identity);
        let to_identity = name(r.dst_identity);
        let limits = [
            (
                r.rule_limit,
                "new connections and packets, both ways".to_owned(),
            ),
            (
                r.src_limit,
                format!("new connections and packets from {from_identity}"),
            ),
            (r.dst_limit, format!("replies from {to_identity}")),
        ]
        .into_iter()
        .filter(|(id, _)| *id != 0 && verdict.passes())
        .map(|(id, applies_to)| match self.datapath.limit_info(id) {
            Some(info) => CheckLimit {
                owner: info.owner.clone(),
                applies_to,
                limit: info.description.clone(),
                mode: if info.audit { "audit" } else { "enforce" }.to_owned(),
            },
            None => CheckLimit {
                owner: format!("limit #{id}"),
                applies_to,
                limit: "unknown to this agent".to_owned(),
                mode: "unknown".to_owned(),
            },
        })
        .collect();
        Ok(CheckResponse {
            verdict: verdict.name().to_string(),
            allowed: verdict.passes(),
            rule,
            from_identity,
            to_identity,
            generation: r.generation,
            limits,
            authentication: (r.auth_state != tollgate_common::auth::state::NOT_REQUIRED)
                .then(|| tollgate_common::auth::state::name(r.auth_state).to_owned()),
        })
    }

    /// Brings the enforced interfaces in line with what exists now: describes and attaches to
    /// new ones, attaches again where a link was lost, forgets vanished ones.
    fn rescan(&mut self) -> Result<()> {
        let (wanted, not_enforced) = enforceable_interfaces(&self.config.selector)?;
        let passive_uplinks = passive_uplinks(&self.config, &wanted)?;
        let newly: Vec<String> = not_enforced
            .iter()
            .filter(|n| !self.not_enforced.contains(n))
            .cloned()
            .collect();
        warn_not_enforced(&newly);
        self.not_enforced = not_enforced;
        for (_, ifindex) in &passive_uplinks {
            if !self.passive_uplinks.iter().any(|(_, i)| i == ifindex) {
                self.datapath
                    .write_interface(*ifindex, true, Some(false), [Some(0), Some(0)])?;
            }
        }
        let live_slot = slot_of(self.generation);
        for (name, ifindex) in &wanted {
            if self
                .interfaces
                .iter()
                .any(|(n, i)| n == name && i == ifindex)
            {
                continue;
            }
            // New (or renamed, or a new interface on a reused ifindex): a fresh entry.
            let mut bound = [Some(0); 2];
            let policy = self.names.live().bound_identity(name);
            bound[live_slot as usize] = Some(match &self.cluster {
                // A new pod's interface is pending until its pod is known (see
                // `desired_binding`); routes are read afresh for it.
                Some(c) if c.active && !self.config.is_uplink(name) => {
                    let bindings = pod_bindings(&c.members, &c.node);
                    desired_binding(policy, bindings.get(name))
                }
                _ => policy,
            });
            self.datapath.write_interface(
                *ifindex,
                self.config.is_uplink(name),
                Some(false),
                bound,
            )?;
        }
        let reconciled = self.loaded.reconcile(&wanted)?;
        for (name, ifindex) in &wanted {
            if !self
                .interfaces
                .iter()
                .any(|(n, i)| n == name && i == ifindex)
            {
                // Attached now: checked at its ingress from here on.
                self.datapath.write_interface(
                    *ifindex,
                    self.config.is_uplink(name),
                    Some(true),
                    [None, None],
                )?;
            }
        }
        forget_other_interfaces(&mut self.datapath, &wanted, &passive_uplinks);
        let changed = self.interfaces != wanted
            || self.passive_uplinks != passive_uplinks
            || !reconciled.restored.is_empty()
            || !same_attachments(&self.attachments, &reconciled.attachments);
        self.passive_uplinks = passive_uplinks;
        if !reconciled.restored.is_empty() {
            self.links_restored += reconciled.restored.len() as u64;
            tracing::warn!(
                links = ?reconciled.restored,
                "links were unpinned or detached behind the agent's back; attached again"
            );
        }
        if self.interfaces != wanted {
            tracing::info!(
                interfaces = ?wanted.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                "enforced interfaces changed"
            );
        }
        self.interfaces = wanted;
        self.attachments = reconciled.attachments;
        if changed {
            self.publish();
        }
        Ok(())
    }
}

fn same_attachments(a: &[Attachment], b: &[Attachment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.interface == y.interface
                && x.ifindex == y.ifindex
                && x.direction == y.direction
                && x.adopted == y.adopted
        })
}

/// The interfaces of this network namespace that `selector` selects, as (name, ifindex).
fn selected_interfaces(selector: &InterfaceSelector) -> Result<Vec<(String, u32)>> {
    Ok(loader::interfaces()?
        .into_iter()
        .filter(|(name, _)| selector.matches(name))
        .collect())
}

/// Interfaces as (name, ifindex).
type Interfaces = Vec<(String, u32)>;

/// The selected interfaces the classifiers can enforce (Ethernet-like), and the names of those
/// they cannot (L3 devices: tun, WireGuard, GRE), which are left alone.
fn enforceable_interfaces(selector: &InterfaceSelector) -> Result<(Interfaces, Vec<String>)> {
    let (enforceable, l3): (Vec<_>, Vec<_>) = selected_interfaces(selector)?
        .into_iter()
        .partition(|(name, _)| loader::is_ethernet(name));
    Ok((enforceable, l3.into_iter().map(|(name, _)| name).collect()))
}

fn warn_not_enforced(names: &[String]) {
    if !names.is_empty() {
        tracing::warn!(
            interfaces = ?names,
            "not enforcing interfaces without Ethernet framing (L3 devices are not supported yet); packets from them are checked where they leave toward a pod"
        );
    }
}

/// Interfaces `--uplinks` selects that `--interfaces` does not.
fn passive_uplinks(
    config: &InstallerConfig,
    enforced: &[(String, u32)],
) -> Result<Vec<(String, u32)>> {
    let Some(uplinks) = &config.uplinks else {
        return Ok(Vec::new());
    };
    Ok(selected_interfaces(uplinks)?
        .into_iter()
        .filter(|(_, i)| !enforced.iter().any(|(_, e)| e == i))
        .collect())
}

/// Removes `TG_INTERFACES` entries of interfaces no longer enforced or uplinks.
fn forget_other_interfaces(
    datapath: &mut Datapath,
    enforced: &[(String, u32)],
    passive_uplinks: &[(String, u32)],
) {
    for ifindex in datapath.described_interfaces() {
        if !enforced
            .iter()
            .chain(passive_uplinks)
            .any(|(_, i)| *i == ifindex)
        {
            datapath.forget_interface(ifindex);
        }
    }
}

/// Compiles `policy` for the next generation and swaps it in; returns what is kept of the
/// policy and the names of what it installed (the map entries themselves are not kept). The
/// validated rules are dropped as soon as they are compiled, before the maps are written.
///
/// In Kubernetes mode (`cluster`) the new slot gets every pod address its selectors take in and
/// every local pod's interface binding as well; the membership switches to the new selectors
/// only once the install succeeded.
fn install(
    datapath: &mut Datapath,
    policy: Policy,
    interfaces: &[(String, u32)],
    cluster: Option<&mut ClusterState>,
    uplink: &dyn Fn(&str) -> bool,
) -> Result<(LivePolicy, Arc<PolicyNames>, u64)> {
    let generation = datapath.next_generation()?;
    let slot = slot_of(generation);
    let mut compiled = compile_policy(&policy, slot, &ClockReading::now(), &host_addresses()?);
    let selectors: Vec<(String, Option<crate::policy::selector::Selector>)> = policy
        .identities
        .iter()
        .map(|i| (i.name.clone(), i.selector.clone()))
        .collect();
    let policy = LivePolicy::from(policy);
    match cluster {
        None => datapath.install(&compiled, generation, interfaces)?,
        Some(c) => {
            let mut members = c.members.clone();
            members.set_policy(
                &selectors,
                StaticClaims::new(&compiled.identities_v4, &compiled.identities_v6),
            );
            let value = |id: IdentityId| {
                id.checked_sub(IDENTITY_FIRST_USER)
                    .and_then(|i| compiled.identity_values.get(i as usize))
                    .copied()
                    .unwrap_or(IdentityValue {
                        id,
                        ..Default::default()
                    })
            };
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for (addr, id) in members.assigned() {
                match addr {
                    IpAddr::V4(a) => v4.push((
                        SLOT_PREFIX_BITS + 32,
                        IdentityKeyV4 {
                            slot,
                            addr: a.octets(),
                        },
                        value(*id),
                    )),
                    IpAddr::V6(a) => v6.push((
                        SLOT_PREFIX_BITS + 128,
                        IdentityKeyV6 {
                            slot,
                            addr: a.octets(),
                        },
                        value(*id),
                    )),
                }
            }
            compiled.identities_v4.extend(v4);
            compiled.identities_v6.extend(v6);
            let bindings = pod_bindings(&members, &c.node);
            let bound = |name: &str| {
                if uplink(name) {
                    compiled.bound_identity(name)
                } else {
                    desired_binding(compiled.bound_identity(name), bindings.get(name))
                }
            };
            datapath.install_with(&compiled, generation, interfaces, &bound)?;
            c.written = interfaces
                .iter()
                .map(|(name, ifindex)| (*ifindex, bound(name)))
                .collect();
            c.members = members;
            c.bindings = bindings;
            c.active = true;
            c.unwritten.clear();
            // Every tracked flow is decided again under the new generation, whose slot has
            // every address as the membership wants it.
            c.revoked.clear();
            c.revoked_since = None;
            c.report();
        }
    }
    for limit in compiled.limits.iter().filter(|l| !l.used) {
        tracing::warn!(
            limit = %limit.owner,
            "this rate limit applies to no traffic: other rules decide all of its rule's traffic \
             (they last longer, or enforce where it audits); it has no bucket"
        );
    }
    Ok((policy, compiled.names, generation))
}

/// A policy with selectors needs Kubernetes mode: refused in file mode, naming the identities.
pub fn refuse_selectors(policy: &Policy) -> Result<(), Error> {
    let with: Vec<String> = policy
        .identities
        .iter()
        .enumerate()
        .filter(|(_, i)| i.selector.is_some())
        .map(|(n, i)| format!("identities[{n}] ({})", i.name))
        .collect();
    if with.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidPolicy(format!(
        "{}: a selector takes its addresses from pods, which only `tollgate agent --kubernetes` \
         watches; in file mode give the identity cidrs",
        with.join(", ")
    )))
}

/// Removes every tracked flow of the revoked addresses.
fn flush_revoked(datapath: &mut Datapath, c: &mut ClusterState) {
    let addrs = std::mem::take(&mut c.revoked);
    c.revoked_since = None;
    match datapath.purge_flows(&addrs) {
        Ok(n) => {
            if n > 0 {
                tracing::info!(
                    addresses = addrs.len(),
                    entries = n,
                    "flows of revoked pod addresses removed"
                );
            }
            c.status.lock().expect("status lock").flows_revoked += n as u64;
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "removing the flows of revoked pod addresses failed")
        }
    }
}

/// Kubernetes mode: the pods, what their addresses resolve to, and the local pods' bindings.
pub struct ClusterState {
    /// This node, as pods name it in `spec.nodeName`.
    pub node: String,
    pub members: Membership,
    /// Interface name → what local pods sit behind it (from their routes).
    pub bindings: HashMap<String, PodBinding>,
    /// The binding written in the live slot, per enforced interface (ifindex).
    pub written: HashMap<u32, IdentityId>,
    /// Once this agent installed a policy: before that, the pinned live slot (addresses and
    /// bindings) is the previous agent's and is left alone.
    pub active: bool,
    /// Addresses whose entry could not be written (a full map), retried every second.
    pub unwritten: HashSet<IpAddr>,
    /// Addresses whose identity was revoked, whose tracked flows are still to be removed, and
    /// since when.
    pub revoked: HashSet<IpAddr>,
    pub revoked_since: Option<Instant>,
    pub status: SharedStatus,
    /// Where each identity's pods run, for the auth manager; sent when it changes.
    pub pod_nodes: tokio::sync::watch::Sender<Arc<PodNodes>>,
}

impl ClusterState {
    pub fn new(node: String, status: SharedStatus) -> Self {
        ClusterState {
            pod_nodes: tokio::sync::watch::channel(Arc::default()).0,
            node,
            members: Membership::default(),
            bindings: HashMap::new(),
            written: HashMap::new(),
            active: false,
            unwritten: HashSet::new(),
            revoked: HashSet::new(),
            revoked_since: None,
            status,
        }
    }

    /// Refreshes the membership part of `status`, and where each identity's pods run.
    fn report(&self) {
        let nodes = self.members.pod_nodes();
        self.pod_nodes.send_if_modified(|old| {
            if **old == nodes {
                return false;
            }
            *old = Arc::new(nodes);
            true
        });
        let mut s = self.status.lock().expect("status lock");
        s.pods = self.members.pod_count();
        s.local_pods = self.members.local_pods(&self.node).count();
        s.addresses =
            self.members.assigned().len() - self.unwritten.len().min(self.members.assigned().len());
        s.addresses_not_written = self.unwritten.len();
        s.conflict_count = self.members.conflicts().count();
        s.conflicts = self
            .members
            .conflicts()
            .take(MAX_CONFLICTS_SHOWN)
            .map(|c| NamedReason {
                name: format!("{}/{}", c.pod.0, c.pod.1),
                reason: c.reason,
            })
            .collect();
    }
}

/// Conflicts listed in `status` (all are logged).
const MAX_CONFLICTS_SHOWN: usize = 100;

/// How long revoked addresses may wait for their flows to be removed, so that a burst of pod
/// deletions and relabels costs one walk of the conntrack maps. An address another pod now
/// holds (reused) has its flows removed at once, before the new pod's identity is written.
const REVOKE_BATCH: Duration = Duration::from_millis(250);

/// What sits behind a device, from the local pods' routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodBinding {
    /// One local pod, of this identity.
    Pod(IdentityId),
    /// One local pod that no selector takes in: nothing to bind it to.
    NoIdentity,
    /// Several local pods (a bridge): binding it to one pod's identity would drop the others'.
    Shared,
}

/// Local pods' interfaces: the device of the most specific direct route to each pod's first
/// address, and what sits behind it.
fn pod_bindings(members: &Membership, node: &str) -> HashMap<String, PodBinding> {
    let mut by_device: HashMap<String, PodBinding> = HashMap::new();
    let mut routes = None;
    for (pod, id) in members.local_pods(node) {
        let routes = routes.get_or_insert_with(crate::cluster::routes::RouteTables::read);
        let Some(device) = pod.ips.iter().find_map(|a| routes.device(*a)) else {
            continue;
        };
        let this = id.map_or(PodBinding::NoIdentity, PodBinding::Pod);
        by_device
            .entry(device)
            .and_modify(|b| *b = PodBinding::Shared)
            .or_insert(this);
    }
    by_device
}

/// The binding of a workload interface in Kubernetes mode: its pod's identity (which must agree
/// with a binding the policy gives it with `interfaces:`), the policy's binding where no single
/// identified pod sits behind it, and `ambiguous` (pending) where no known pod does: a new
/// pod's interface passes nothing until the agent knows the pod, so an address reused before
/// the old pod's deletion arrived never passes as the old pod's identity.
fn desired_binding(policy: IdentityId, pod: Option<&PodBinding>) -> IdentityId {
    match pod {
        Some(PodBinding::Pod(p)) if policy == 0 || policy == *p => *p,
        Some(PodBinding::Pod(_)) => IDENTITY_AMBIGUOUS,
        Some(PodBinding::NoIdentity | PodBinding::Shared) => policy,
        None if policy != 0 => policy,
        None => IDENTITY_AMBIGUOUS,
    }
}

/// Allocations from this size up get a mapping of their own, unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OWN_MAPPING_BYTES: libc::c_int = 256 * 1024;

/// Makes large buffers (a policy's text, its JSON answer, compiled entry tables) mappings of
/// their own, returned to the kernel as soon as they are freed. glibc otherwise raises its
/// threshold to the size of the largest such buffer freed so far (up to 32 MB) and serves the
/// next ones from its heap, where they stay: 25 MB after one 100k-rule `policy apply`. Call it
/// before the runtime starts its threads.
pub fn map_large_buffers_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets one of glibc's allocation thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES);
    }
}

/// Hands the memory freed by a parse, compile and swap back to the kernel. glibc keeps freed
/// heap memory for reuse and returns only what lies at the top of a heap, so the agent would
/// otherwise keep the high-water mark of its largest policy load (at 10k rules, 16 MB of a
/// 32 MB RSS). Runs after a policy is installed, which is rare; costs a few milliseconds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's own heaps; no pointer the
    // program holds is affected.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The longest refusal reason kept for the audit log: an error quotes the value it refuses, and
/// a 2 MB policy name would otherwise make a record past the audit log's 1 MiB limit.
const MAX_REASON_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes (at a character boundary), saying how much was cut.
fn shortened(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &text[..end], text.len() - end)
}

/// How long a rescan may be outstanding before the next tick asks again.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary_saying_how_much() {
        assert_eq!(shortened("short", 10), "short");
        let long = "é".repeat(3000);
        let cut = shortened(&long, 4095);
        assert!(cut.starts_with(&"é".repeat(2047)));
        assert!(
            cut.ends_with("... (1906 more bytes)"),
            "{}",
            &cut[cut.len() - 30..]
        );
    }
}
