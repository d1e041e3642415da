//! The auth manager: the one owner of the node's proofs (`TG_AUTH`).
//!
//! It runs a handshake for a pair
//! - on demand: the datapath refused a flow of the pair for want of a proof (an event with
//!   `EVENT_FLAG_AUTH_REQUIRED`), so the client's SYN retry can pass;
//! - ahead of need: the policy requires the pair, this node hosts its source identity and the
//!   destination's node is known, so the first connection sees no refusal at all;
//! - before expiry: a proof this node started is renewed at two thirds of its life, and at once
//!   when this node's certificate for it was rotated.
//!
//! A proof lives until the earliest of the two certificates' expiry and `--auth-max-ttl`. It is
//! withdrawn, and every tracked flow decided again (a new generation), when the certificate this
//! node presented for it is gone or replaced by one of another SPIFFE ID, or when the peer's
//! certificate is no longer trusted by the bundle; it lapses by itself at its expiry, which the
//! kernel enforces with or without the agent.
//!
//! The listener's connections ask the manager ([`GrantRequest`]) before the server side of a
//! handshake writes anything, so every write to `TG_AUTH` happens here.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Semaphore},
};

use super::{
    handshake::{self, GrantRequest, HandshakeError},
    peers::{canonical, Peers},
    plan::{AuthPlan, PairEnd, PairPlan},
    proofs::{boot_ns, ProofMap},
    stats::{AuthStats, Reporter},
};
use crate::{
    cluster::PodNodes,
    events::{rfc3339, Input},
    identity::{
        server_config,
        source::{follow, DirectorySource, FileNames, Loaded, SvidSource},
        verify::SharedBundles,
        verify_svid, SpiffeId, Svid, SvidResolver, TrustBundles, Usage,
    },
    installer::{Installed, InstallerHandle},
    paths::PinLayout,
    wire::{ProofStatus, SvidStatus},
};

/// `--auth-max-ttl` by default: how long a proof may live even when both certificates last
/// longer, so that a withdrawn certificate the agents were not told of stops counting soon.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(600);
/// The whole of one handshake, connect to answer.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// How often the SVID files are read for changes.
pub const SVID_POLL: Duration = Duration::from_millis(500);
/// Handshakes served at once; a connection beyond them is closed at accept.
pub const MAX_SERVED: usize = 256;
/// Handshakes served at once for one peer address: a peer that opens connections and sends
/// nothing holds at most these, each for at most the handshake deadline, and never all of
/// `MAX_SERVED`.
pub const MAX_SERVED_PER_PEER: usize = 16;
/// Retry delays after a failed handshake: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often expiries, renewals and pre-authentication are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long an SVID missing from a reading with problems (a directory caught half-written) is
/// still used: long enough for a rotation to finish, short enough that a removed certificate
/// stops counting soon.
const SVID_GRACE: Duration = Duration::from_secs(30);
/// New generations asked for because of proofs, at most one per this (they are coalesced).
const REDECIDE_EVERY: Duration = Duration::from_secs(1);
/// A handshake whose proof would live less than this counts as failed (a peer answering with
/// an expiry in the past must not make the pair be proven again every tick).
const MIN_PROOF_LIFE: Duration = Duration::from_secs(1);

/// How the agent authenticates, from the command line.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `--auth-addr`: where this node's agent serves handshakes.
    pub listen: Option<SocketAddr>,
    /// `--svid-dir`.
    pub svid_dir: PathBuf,
    /// `--svid-files`; `None`: each directory's layout is recognised by its files.
    pub svid_files: Option<FileNames>,
    /// `--auth-max-ttl`.
    pub max_ttl: Duration,
    /// This node's name, told to peers for their audit records.
    pub node: String,
}

/// A pair the datapath asked a proof for, by identity names (as events name them), with the
/// refused flow's addresses (they tell which node's agent to authenticate with).
#[derive(Debug, Clone)]
pub struct Demand {
    pub from: String,
    pub to: String,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
}

/// Which side of its handshake this node was, for a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    /// This node connected (and renews the proof).
    Client,
    /// The peer connected to this node's listener.
    Server,
    /// Written by a previous agent and found pinned.
    Adopted,
}

impl Side {
    fn role(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
            Side::Adopted => "adopted",
        }
    }
}

/// Proofs are kept per pair, peer node (the address of the agent at the other end) and side:
/// the kernel admits the pair until the latest expiry among them (`Manager::sync_pair`). Two
/// nodes that each dial the other hold a client and a server proof with each other, and one
/// never replaces the other.
type ProofKey = (u64, IpAddr, Side);
/// Handshake attempts are kept per pair and peer node.
type PeerKey = (u64, IpAddr);
/// The peer of a proof adopted from the pins (which node it was with is not pinned), and the
/// key of a pair's attempts that found no peer to try.
const NO_PEER: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// What the rest of the agent holds of the auth subsystem.
#[derive(Clone)]
pub struct AuthHandle {
    pub stats: Arc<AuthStats>,
    pub demand: mpsc::Sender<Demand>,
}

/// Binds the listener (so a taken port fails the start) and starts the manager, the SVID
/// follower and the listener on the current runtime. `pod_nodes` (Kubernetes mode): where each
/// identity's pods run, which tells the manager where peers listen.
pub async fn start(
    settings: AuthSettings,
    layout: &PinLayout,
    installer: InstallerHandle,
    control: mpsc::UnboundedSender<Input>,
    pod_nodes: Option<watch::Receiver<Arc<PodNodes>>>,
) -> Result<AuthHandle> {
    let listener = match settings.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the auth listener to {addr}"))?,
        ),
        None => None,
    };
    let source: Arc<dyn SvidSource> = Arc::new(DirectorySource::new(
        settings.svid_dir.clone(),
        settings.svid_files.clone(),
    ));
    // The first reading before anything else: a directory that cannot be read is a
    // configuration error now.
    let first = tokio::task::spawn_blocking({
        let source = source.clone();
        move || source.load()
    })
    .await
    .context("reading the SVIDs")?
    .with_context(|| format!("reading SVIDs from {}", source.describe()))?;
    for problem in &first.problems {
        tracing::warn!(problem, "SVID source problem");
    }
    let (svid_tx, svid_rx) = watch::channel(Arc::new(first));
    tokio::spawn(follow(source.clone(), SVID_POLL, svid_tx));

    let stats = Arc::new(AuthStats::new(
        listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string()),
        source.describe(),
    ));
    let reporter = Arc::new(Reporter::new(Some(control)));
    let bundles: SharedBundles = Arc::new(RwLock::new(TrustBundles::new()));
    let resolver = Arc::new(SvidResolver::new(&[]));
    let (grants_tx, grants_rx) = mpsc::channel(MAX_SERVED);
    let (demand_tx, demand_rx) = mpsc::channel(1024);
    let proofs = ProofMap::open(layout)?;
    let mut manager = Manager {
        settings: settings.clone(),
        proof_map: proofs,
        installed: installer.watch(),
        installer,
        svid_rx,
        svids: BTreeMap::new(),
        bundles: bundles.clone(),
        resolver: resolver.clone(),
        plan: Arc::default(),
        proofs: HashMap::new(),
        written: HashMap::new(),
        attempts: HashMap::new(),
        nodes: pod_nodes.as_ref().map(|rx| rx.borrow().clone()),
        pod_nodes,
        adopted: false,
        outcomes: mpsc::channel(64),
        stats: stats.clone(),
        reporter: reporter.clone(),
        redecide: None,
        last_redecide: None,
        missing_since: HashMap::new(),
        origins: HashMap::new(),
        local_addr: settings.listen.map(|a| a.ip()),
    };
    manager.take_svids();
    manager.take_policy();
    if let Some(listener) = listener {
        tokio::spawn(serve(
            listener,
            handshake::acceptor(server_config(resolver, bundles)),
            grants_tx,
            settings.node.clone(),
            stats.clone(),
            reporter,
        ));
    }
    tokio::spawn(manager.run(demand_rx, grants_rx));
    Ok(AuthHandle {
        stats,
        demand: demand_tx,
    })
}

/// A proof this node holds, of a pair with one peer node.
#[derive(Debug, Clone)]
struct Proof {
    expires_at: SystemTime,
    /// The same instant on CLOCK_BOOTTIME, as written to `TG_AUTH` (the wall clock may step).
    expires_boot: u64,
    issued_at: SystemTime,
    /// The SPIFFE ID this node presented (`None`: adopted from the pins, unknown).
    local: Option<SpiffeId>,
    /// The leaf this node presented, to notice a rotation.
    local_leaf: Option<CertificateDer<'static>>,
    /// The peer's chain, checked again when the bundle changes (empty: adopted).
    peer_chain: Vec<CertificateDer<'static>>,
    peer_node: String,
    /// Whether the peer stood for the pair's destination (else its source).
    peer_is_dst: bool,
    /// Where this node connected to, and whether it presented the source's SVID (forward):
    /// a proof this node started, and renews.
    dialed: Option<(SocketAddr, bool)>,
    /// Renew now rather than at two thirds of the life (this node's certificate rotated).
    renew_now: bool,
}

impl Proof {
    fn renew_at(&self) -> SystemTime {
        let life = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life * 2 / 3
    }
}

/// Handshakes of one pair this node started or will start.
#[derive(Debug)]
struct Attempt {
    in_flight: bool,
    /// No handshake before this (a failure's back-off), unless a flow asks for one.
    next_try: Instant,
    delay: Duration,
    /// When a refused flow last asked for one (demands start one at most every
    /// `RETRY_FIRST`).
    last_demand: Option<Instant>,
    /// A refused flow asked while one was under way: if that one fails, try again at once.
    pending_demand: bool,
}

impl Attempt {
    /// No handshake yet: one may start at `now`.
    fn fresh(now: Instant) -> Self {
        Attempt {
            in_flight: false,
            next_try: now,
            delay: RETRY_FIRST,
            last_demand: None,
            pending_demand: false,
        }
    }
}

/// What a client handshake came to.
struct Outcome {
    key: PeerKey,
    /// Where it connected to, and which way.
    dialed: (SocketAddr, bool),
    local: Svid,
    result: Result<handshake::ClientProof, HandshakeError>,
}

struct Manager {
    settings: AuthSettings,
    proof_map: ProofMap,
    installed: watch::Receiver<Arc<Installed>>,
    installer: InstallerHandle,
    svid_rx: watch::Receiver<Arc<Loaded>>,
    /// The usable SVIDs, by SPIFFE ID.
    svids: BTreeMap<SpiffeId, Svid>,
    bundles: SharedBundles,
    resolver: Arc<SvidResolver>,
    plan: Arc<AuthPlan>,
    proofs: HashMap<ProofKey, Proof>,
    /// What `TG_AUTH` holds for each pair (CLOCK_BOOTTIME expiry).
    written: HashMap<u64, u64>,
    attempts: HashMap<PeerKey, Attempt>,
    /// Kubernetes mode: where each identity's pods run (the receiver, and the latest value).
    pod_nodes: Option<watch::Receiver<Arc<PodNodes>>>,
    nodes: Option<Arc<PodNodes>>,
    /// Whether the pinned proofs were adopted (with the first real policy).
    adopted: bool,
    outcomes: (mpsc::Sender<Outcome>, mpsc::Receiver<Outcome>),
    stats: Arc<AuthStats>,
    reporter: Arc<Reporter>,
    /// Why every tracked flow must be decided again: a proof was withdrawn, or renewed with
    /// an earlier expiry than its flows carry. Asked for at most every `REDECIDE_EVERY`.
    redecide: Option<&'static str>,
    last_redecide: Option<Instant>,
    /// SVIDs missing from the latest reading but still used (see `SVID_GRACE`), since when.
    missing_since: HashMap<SpiffeId, Instant>,
    /// The directory each SVID in use came from.
    origins: HashMap<SpiffeId, PathBuf>,
    /// The address this node's agent connects from (its `--auth-addr`).
    local_addr: Option<std::net::IpAddr>,
}

impl Manager {
    async fn run(
        mut self,
        mut demand: mpsc::Receiver<Demand>,
        mut grants: mpsc::Receiver<GrantRequest>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = self.svid_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.take_svids();
                }
                changed = self.installed.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.take_policy();
                }
                Some(changed) = async {
                    match self.pod_nodes.as_mut() {
                        Some(rx) => Some(rx.changed().await),
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        // The installer is gone: the agent is stopping.
                        return;
                    }
                    self.take_nodes();
                }
                Some(d) = demand.recv() => self.on_demand(d),
                Some(g) = grants.recv() => self.on_grant(g),
                Some(o) = self.outcomes.1.recv() => self.on_outcome(o),
                _ = tick.tick() => self.on_tick(),
            }
            let due = self
                .last_redecide
                .is_none_or(|t| t.elapsed() >= REDECIDE_EVERY);
            if let (Some(reason), true) = (self.redecide, due) {
                self.redecide = None;
                self.last_redecide = Some(Instant::now());
                self.installer.redecide(reason.to_owned()).await;
            }
        }
    }

    /// Takes the latest SVID reading; a proof whose certificate is gone or no longer trusted
    /// is withdrawn, and every tracked flow decided again.
    fn take_svids(&mut self) {
        let loaded = self.svid_rx.borrow_and_update().clone();
        let mut svids: BTreeMap<SpiffeId, Svid> = loaded
            .svids
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        let now = Instant::now();
        // A directory caught mid-rotation (certificate and key of two generations) gives no
        // SVID in this reading: what it held before is kept for a short while, until it reads
        // whole. An SVID whose directory is gone, or now holds another SPIFFE ID, is not.
        for (id, svid) in &self.svids {
            let Some(dir) = self.origins.get(id) else {
                continue;
            };
            if svids.contains_key(id) || !loaded.broken.contains(dir) {
                continue;
            }
            let since = *self.missing_since.entry(id.clone()).or_insert(now);
            if svid.not_after > SystemTime::now()
                && now.saturating_duration_since(since) < SVID_GRACE
            {
                svids.insert(id.clone(), svid.clone());
            }
        }
        self.missing_since
            .retain(|id, _| !loaded.origins.contains_key(id) && svids.contains_key(id));
        for (id, dir) in &loaded.origins {
            self.origins.insert(id.clone(), dir.clone());
        }
        self.origins.retain(|id, _| svids.contains_key(id));
        *self.bundles.write().unwrap_or_else(|p| p.into_inner()) = loaded.bundles.clone();
        let list: Vec<Svid> = svids.values().cloned().collect();
        self.resolver.replace(&list);
        self.stats.set_svids(
            svids
                .values()
                .map(|s| SvidStatus {
                    spiffe_id: s.id.to_string(),
                    not_after: rfc3339(s.not_after),
                })
                .collect(),
            loaded.problems.clone(),
        );
        self.svids = svids;

        let mut withdrawn = Vec::new();
        let bundles = self
            .bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (key, proof) in self.proofs.iter_mut() {
            if let Some(local) = &proof.local {
                match self.svids.get(local) {
                    None => {
                        withdrawn.push((
                            *key,
                            "certificate_withdrawn",
                            format!("this node no longer holds a certificate for {local}"),
                        ));
                        continue;
                    }
                    Some(svid) if Some(&svid.chain[0]) != proof.local_leaf.as_ref() => {
                        // Rotated: same SPIFFE ID, new certificate. The proof stays; it is
                        // renewed with the new certificate now (by the side that renews it).
                        proof.renew_now = true;
                    }
                    Some(_) => {}
                }
            }
            if !proof.peer_chain.is_empty() {
                let usage = if key.2 == Side::Client {
                    Usage::ServerAuth
                } else {
                    Usage::ClientAuth
                };
                if let Err(e) = verify_svid(&proof.peer_chain, &bundles, UnixTime::now(), usage) {
                    withdrawn.push((
                        *key,
                        "peer_untrusted",
                        format!("the peer's certificate is no longer accepted: {e}"),
                    ));
                }
            }
        }
        for (key, reason, why) in &withdrawn {
            self.lapse(*key, reason, why);
        }
        if !withdrawn.is_empty() {
            self.redecide = Some("a proof of authentication was withdrawn");
            self.publish();
        }
    }

    /// Takes the live policy's plan: proofs of pairs it no longer needs are withdrawn (their
    /// rules are gone, so no flow needs them).
    ///
    /// The proofs a previous agent pinned are adopted with the first real policy: a Kubernetes
    /// agent keeps the pinned policy until it has merged the cluster's, and its plan is not
    /// known before (adopting then would drop every pinned proof, and the first generation
    /// would cut the established flows that rely on them).
    fn take_policy(&mut self) {
        let policy = self.installed.borrow_and_update().policy.clone();
        if policy.placeholder {
            return;
        }
        let plan = policy.auth.clone();
        if !self.adopted {
            self.adopted = true;
            self.plan = plan;
            self.adopt_pinned();
            return;
        }
        if Arc::ptr_eq(&plan, &self.plan) {
            return;
        }
        self.plan = plan;
        let gone: Vec<ProofKey> = self
            .proofs
            .keys()
            .filter(|k| self.plan.by_key(k.0).is_none())
            .copied()
            .collect();
        for key in gone {
            self.lapse(key, "policy", "the policy no longer requires this pair");
        }
        self.attempts.retain(|k, _| self.plan.by_key(k.0).is_some());
        self.publish();
    }

    /// Takes where the pods of each identity run now (Kubernetes mode). Pairs toward a node
    /// that newly runs a destination's pods are authenticated with it at the next tick.
    fn take_nodes(&mut self) {
        if let Some(rx) = self.pod_nodes.as_mut() {
            self.nodes = Some(rx.borrow_and_update().clone());
        }
    }

    /// Proofs a previous agent wrote: kept while the policy needs them (the kernel admits by
    /// them already) until this node has proven the pair with its peers itself.
    fn adopt_pinned(&mut self) {
        let now_boot = crate::datapath::boottime_ns();
        let now = SystemTime::now();
        // Flows admitted under an entry that is removed or shortened here carry its expiry.
        let mut cut = false;
        for (pair, expires_boot) in self.proof_map.entries() {
            if expires_boot <= now_boot {
                self.proof_map.remove(pair);
                continue;
            }
            let Some(plan) = self.plan.by_key(pair) else {
                self.proof_map.remove(pair);
                cut = true;
                continue;
            };
            let held = |id: &SpiffeId| self.svids.contains_key(id);
            if !held(&plan.src.spiffe_id) && !held(&plan.dst.spiffe_id) {
                // This node holds neither end's certificate any more: nothing backs the proof.
                self.proof_map.remove(pair);
                cut = true;
                continue;
            }
            // At most `--auth-max-ttl` of this agent, whatever an earlier one wrote.
            let left = Duration::from_nanos(expires_boot - now_boot).min(self.settings.max_ttl);
            cut |= left < Duration::from_nanos(expires_boot - now_boot);
            let expires_boot = now_boot + left.as_nanos() as u64;
            let expires_at = now + left;
            let local = self.svids.get(&plan.src.spiffe_id).map(|s| s.id.clone());
            self.proofs.insert(
                (pair, NO_PEER, Side::Adopted),
                Proof {
                    expires_at,
                    expires_boot,
                    // Renewed at two thirds of at most the longest life a proof may have.
                    issued_at: expires_at
                        .checked_sub(self.settings.max_ttl)
                        .unwrap_or(now)
                        .min(now),
                    local,
                    local_leaf: None,
                    peer_chain: Vec::new(),
                    peer_node: String::new(),
                    peer_is_dst: true,
                    dialed: None,
                    renew_now: false,
                },
            );
            self.sync_logged(pair);
        }
        if cut {
            self.redecide = Some("proofs a previous agent pinned were withdrawn or shortened");
        }
        self.publish();
    }

    fn on_demand(&mut self, d: Demand) {
        let Some(plan) = self.plan.by_names(&d.from, &d.to).cloned() else {
            return;
        };
        let now_boot = crate::datapath::boottime_ns();
        if self.pair_expiry(plan.key).is_some_and(|e| e > now_boot) {
            // The kernel has no valid proof but this node has one: the entry was lost
            // (removed behind the agent's back). Write it again, exactly as it was.
            self.written.remove(&plan.key);
            self.sync_logged(plan.key);
            return;
        }
        match self.route(&plan, d.src, d.dst) {
            Ok((forward, targets)) => {
                for to in targets {
                    self.start(&plan, to, forward, true);
                }
            }
            Err(why) => {
                if self.gate((plan.key, NO_PEER), true) {
                    self.failed(
                        &plan,
                        (plan.key, NO_PEER),
                        "client",
                        &HandshakeError::NoSvid(why),
                    );
                }
            }
        }
    }

    /// Which way a flow of `plan` between `src` and `dst` (its addresses, when known) is
    /// authenticated, and with which agents: the source's node presents the source's SVID to
    /// the destination's nodes; a destination's node whose flows were refused (the source's
    /// agent did not reach it) goes the other way round. `Ok((forward, listeners))`.
    fn route(
        &self,
        plan: &PairPlan,
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
    ) -> Result<(bool, Vec<SocketAddr>), String> {
        let src_held = self.usable(&plan.src.spiffe_id).is_some();
        let dst_held = self.usable(&plan.dst.spiffe_id).is_some();
        if src_held {
            let to = self.listeners(&plan.dst, dst);
            if !to.is_empty() {
                return Ok((true, to));
            }
        }
        if dst_held {
            let to = self.listeners(&plan.src, src);
            if !to.is_empty() {
                return Ok((false, to));
            }
        }
        Err(if !src_held && !dst_held {
            format!(
                "this node holds no valid certificate for {} or {}",
                plan.src.spiffe_id, plan.dst.spiffe_id
            )
        } else {
            format!(
                "where the peer of {} → {} listens is not known: no authAddress in the policy, \
                 and in Kubernetes mode no pod of it with a status.hostIP (or no --auth-addr \
                 here to take the port from)",
                plan.src.identity, plan.dst.identity
            )
        })
    }

    fn listeners(&self, end: &PairEnd, addr: Option<IpAddr>) -> Vec<SocketAddr> {
        Peers::new(self.nodes.as_deref(), self.settings.listen).listeners(end, addr)
    }

    fn check_origin(&self, end: &PairEnd, peer: IpAddr) -> Result<(), String> {
        Peers::new(self.nodes.as_deref(), self.settings.listen).check_origin(end, peer)
    }

    /// The SVID of `id` this node holds, if it is valid now.
    fn usable(&self, id: &SpiffeId) -> Option<&Svid> {
        let wall = SystemTime::now();
        self.svids
            .get(id)
            .filter(|s| s.not_before <= wall && wall < s.not_after)
    }

    /// Whether a handshake for `key` may start now (and if so, it counts as started): not
    /// while one is under way or a failure's back-off runs. A flow waiting for it (`demanded`)
    /// cuts the back-off short: its client retries in a second, and a peer that has come back
    /// should be tried by then. Demands are sampled per edge in the kernel, and handshakes
    /// start at most every `RETRY_FIRST` per key.
    fn gate(&mut self, key: PeerKey, demanded: bool) -> bool {
        let now = Instant::now();
        let attempt = self
            .attempts
            .entry(key)
            .or_insert_with(|| Attempt::fresh(now));
        if attempt.in_flight {
            attempt.pending_demand |= demanded;
            return false;
        }
        let waiting = if demanded {
            attempt
                .last_demand
                .is_some_and(|t| now.saturating_duration_since(t) < RETRY_FIRST)
        } else {
            attempt.next_try > now
        };
        if waiting {
            return false;
        }
        if demanded {
            attempt.last_demand = Some(now);
        }
        true
    }

    /// Starts a client handshake for `plan` with the agent at `to`, presenting the source's
    /// SVID (`forward`) or the destination's, unless one is under way or waiting out a
    /// failure's back-off (see `gate`).
    fn start(&mut self, plan: &PairPlan, to: SocketAddr, forward: bool, demanded: bool) {
        let key = (plan.key, canonical(to.ip()));
        if !self.gate(key, demanded) {
            return;
        }
        let (ours, peer) = if forward {
            (&plan.src.spiffe_id, &plan.dst.spiffe_id)
        } else {
            (&plan.dst.spiffe_id, &plan.src.spiffe_id)
        };
        let Some(local) = self.usable(ours).cloned() else {
            let why = format!("this node holds no valid certificate for {ours}");
            self.failed(plan, key, "client", &HandshakeError::NoSvid(why));
            return;
        };
        let peer = peer.clone();
        let attempt = self.attempts.get_mut(&key).expect("gate inserted it");
        attempt.in_flight = true;
        let tx = self.outcomes.0.clone();
        let bundles = self.bundles.clone();
        let node = self.settings.node.clone();
        let from = self.local_addr;
        let (src, dst) = (plan.src.spiffe_id.clone(), plan.dst.spiffe_id.clone());
        tokio::spawn(async move {
            let result = handshake::initiate_from(
                from,
                to,
                &local,
                &peer,
                (&src, &dst),
                &node,
                bundles,
                HANDSHAKE_DEADLINE,
            )
            .await;
            let _ = tx
                .send(Outcome {
                    key,
                    dialed: (to, forward),
                    local,
                    result,
                })
                .await;
        });
    }

    fn on_outcome(&mut self, o: Outcome) {
        let pending_demand = match self.attempts.get_mut(&o.key) {
            Some(a) => {
                a.in_flight = false;
                std::mem::take(&mut a.pending_demand)
            }
            None => false,
        };
        let Some(plan) = self.plan.by_key(o.key.0).cloned() else {
            return;
        };
        let failed = o.result.is_err();
        let (to, forward) = o.dialed;
        self.take_outcome(&plan, o);
        if failed && pending_demand {
            // A flow is waiting and asked while this one was under way (a try ahead of need,
            // say, that found the peer not ready yet): its retry should not wait for a back-off.
            self.start(&plan, to, forward, true);
        }
    }

    fn take_outcome(&mut self, plan: &PairPlan, o: Outcome) {
        let plan = plan.clone();
        let key = o.key;
        match o.result {
            Ok(_)
                if self.svids.get(&o.local.id).map(|s| &s.chain[0]) != Some(&o.local.chain[0]) =>
            {
                // The certificate this handshake presented was withdrawn or replaced meanwhile.
                self.failed(
                    &plan,
                    key,
                    "client",
                    &HandshakeError::NoSvid(format!(
                        "the certificate of {} changed during the handshake",
                        o.local.id
                    )),
                );
            }
            Ok(proof) => {
                let mut expires_at = self.expiry(&o.local, proof.peer.not_after);
                if let Some(ms) = proof.answer.expires_unix_ms {
                    expires_at = expires_at.min(UNIX_EPOCH + Duration::from_millis(ms));
                }
                if expires_at < SystemTime::now() + MIN_PROOF_LIFE {
                    self.failed(
                        &plan,
                        key,
                        "client",
                        &HandshakeError::Protocol(format!(
                            "the proof would expire at {}, too soon",
                            rfc3339(expires_at)
                        )),
                    );
                    return;
                }
                let peer_node = proof.answer.node.clone();
                if let Err(e) = self.admit(
                    &plan,
                    (key.1, o.dialed.1),
                    expires_at,
                    &o.local,
                    proof.peer_chain,
                    &peer_node,
                    Some(o.dialed),
                ) {
                    tracing::error!(error = %format!("{e:#}"), "writing a proof failed");
                    self.failed(
                        &plan,
                        key,
                        "client",
                        &HandshakeError::Protocol(format!("{e:#}")),
                    );
                    return;
                }
                if let Some(a) = self.attempts.get_mut(&key) {
                    a.delay = RETRY_FIRST;
                    a.next_try = Instant::now();
                }
            }
            Err(e) => self.failed(&plan, key, "client", &e),
        }
    }

    /// A proof's expiry: the earlier certificate's, and `--auth-max-ttl` from now.
    fn expiry(&self, local: &Svid, peer_not_after: SystemTime) -> SystemTime {
        local
            .not_after
            .min(peer_not_after)
            .min(SystemTime::now() + self.settings.max_ttl)
    }

    /// The latest expiry (CLOCK_BOOTTIME) of the proofs of `pair` this node holds.
    fn pair_expiry(&self, pair: u64) -> Option<u64> {
        self.proofs
            .iter()
            .filter(|(k, _)| k.0 == pair)
            .map(|(_, p)| p.expires_boot)
            .max()
    }

    /// Makes `TG_AUTH` admit `pair` until the latest expiry of its proofs (removed without
    /// any). When that is earlier than what the kernel had, flows admitted under the old entry
    /// carry its later expiry: every tracked flow is decided again, or they would outlive the
    /// certificates the new entry ends with.
    fn sync_pair(&mut self, pair: u64) -> Result<()> {
        let want = self.pair_expiry(pair);
        let had = self.written.get(&pair).copied();
        if want == had {
            return Ok(());
        }
        match want {
            Some(expires_boot) => {
                self.proof_map.write(pair, expires_boot)?;
                self.written.insert(pair, expires_boot);
            }
            None => {
                self.proof_map.remove(pair);
                self.written.remove(&pair);
            }
        }
        // (An entry that had expired already cut its flows by itself.)
        let now = crate::datapath::boottime_ns();
        if had.is_some_and(|h| h > now && want.is_none_or(|w| w < h)) {
            self.redecide = Some("a proof ended or was renewed with an earlier expiry");
        }
        Ok(())
    }

    fn sync_logged(&mut self, pair: u64) {
        if let Err(e) = self.sync_pair(pair) {
            tracing::error!(error = %format!("{e:#}"), "writing a proof failed");
        }
    }

    /// Keeps the proof of a handshake with a peer node, makes the kernel admit the pair by it
    /// and records the handshake. `dialed`: where this node connected to, and which way (a
    /// proof this node started, and renews).
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        plan: &PairPlan,
        (peer, peer_is_dst): (IpAddr, bool),
        expires_at: SystemTime,
        local: &Svid,
        peer_chain: Vec<CertificateDer<'static>>,
        peer_node: &str,
        dialed: Option<(SocketAddr, bool)>,
    ) -> Result<()> {
        let side = if dialed.is_some() {
            Side::Client
        } else {
            Side::Server
        };
        let role = side.role();
        let key = (plan.key, peer, side);
        let expires_boot = boot_ns(expires_at);
        let peer_node: String = peer_node.chars().take(64).collect();
        let peer_node = peer_node.as_str();
        let before = self.proofs.insert(
            key,
            Proof {
                expires_at,
                expires_boot,
                issued_at: SystemTime::now(),
                local: Some(local.id.clone()),
                local_leaf: Some(local.chain[0].clone()),
                peer_chain,
                peer_node: peer_node.to_owned(),
                peer_is_dst,
                dialed,
                renew_now: false,
            },
        );
        // A proof of this agent's own supersedes the one adopted from the pins.
        let adopted = self.proofs.remove(&(plan.key, NO_PEER, Side::Adopted));
        if let Err(e) = self.sync_pair(plan.key) {
            self.proofs.remove(&key);
            if let Some(p) = before {
                self.proofs.insert(key, p);
            }
            if let Some(a) = adopted {
                self.proofs.insert((plan.key, NO_PEER, Side::Adopted), a);
            }
            return Err(e);
        }
        self.stats.count_handshake(role, "ok");
        tracing::info!(
            from = %plan.src.identity,
            to = %plan.dst.identity,
            role,
            peer_node,
            expires = %rfc3339(expires_at),
            "pair authenticated"
        );
        self.reporter.record(
            "auth_handshake",
            json!({
                "result": "ok",
                "role": role,
                "from": plan.src.identity,
                "to": plan.dst.identity,
                "from_spiffe_id": plan.src.spiffe_id.to_string(),
                "to_spiffe_id": plan.dst.spiffe_id.to_string(),
                "peer_node": peer_node,
                "expires": rfc3339(expires_at),
            }),
            false,
        );
        self.publish();
        Ok(())
    }

    fn failed(&mut self, plan: &PairPlan, key: PeerKey, role: &'static str, e: &HandshakeError) {
        self.stats.count_handshake(role, e.result());
        let now = Instant::now();
        let attempt = self
            .attempts
            .entry(key)
            .or_insert_with(|| Attempt::fresh(now));
        attempt.next_try = now + attempt.delay;
        attempt.delay = (attempt.delay * 2).min(RETRY_MAX);
        tracing::warn!(
            from = %plan.src.identity,
            to = %plan.dst.identity,
            role,
            error = %e,
            retry_in = ?attempt.next_try.saturating_duration_since(now),
            "authentication handshake failed"
        );
        self.reporter.record(
            "auth_handshake",
            json!({
                "result": e.result(),
                "role": role,
                "from": plan.src.identity,
                "to": plan.dst.identity,
                "reason": e.to_string(),
            }),
            true,
        );
    }

    /// Serves a listener connection's question (see [`GrantRequest`]).
    fn on_grant(&mut self, g: GrantRequest) {
        let answer = self.grant(&g);
        if let Err(why) = &answer {
            self.stats.count_handshake("server", "refused");
            tracing::warn!(peer = %g.peer_addr, client = %g.client.id, reason = %why, "authentication refused");
            self.reporter.record(
                "auth_handshake",
                json!({
                    "result": "refused",
                    "role": "server",
                    "client_spiffe_id": g.client.id.to_string(),
                    "peer": g.peer_addr.to_string(),
                    "reason": why,
                }),
                true,
            );
        }
        let _ = g.reply.send(answer);
    }

    fn grant(&mut self, g: &GrantRequest) -> Result<SystemTime, String> {
        let (src, dst) = match (
            SpiffeId::parse(&g.request.src),
            SpiffeId::parse(&g.request.dst),
        ) {
            (Ok(s), Ok(d)) => (s, d),
            _ => return Err("the pair's SPIFFE IDs do not parse".to_owned()),
        };
        let plan = self.plan.by_ids(&src, &dst).cloned().ok_or_else(|| {
            format!("no rule of this node's policy requires {src} → {dst} authenticated")
        })?;
        let (ours, theirs_end) = if g.client.id == src {
            (&dst, &plan.src)
        } else if g.client.id == dst {
            (&src, &plan.dst)
        } else {
            return Err(format!(
                "the client presented {}, which is neither end of {src} → {dst}",
                g.client.id
            ));
        };
        // The handshake must come from the node hosting the client's identity: a certificate
        // copied elsewhere proves nothing for this pair.
        self.check_origin(theirs_end, g.peer_addr.ip())?;
        let local = self
            .svids
            .get(ours)
            .cloned()
            .ok_or_else(|| format!("this node holds no certificate for {ours}"))?;
        // The client asked (by SNI) for the certificate of `ours`, and the resolver presented
        // that one: anything else and the client verified another identity than the pair's.
        if g.sni.as_deref() != Some(crate::identity::sni_name(ours).as_str()) {
            return Err(format!(
                "the handshake did not ask for {ours}'s certificate"
            ));
        }
        let now = SystemTime::now();
        if now >= local.not_after || now < local.not_before {
            return Err(format!(
                "this node's certificate for {ours} is not valid now"
            ));
        }
        let expires_at = self.expiry(&local, g.client.not_after);
        self.admit(
            &plan,
            (canonical(g.peer_addr.ip()), g.client.id == dst),
            expires_at,
            &local,
            g.client_chain.clone(),
            &g.request.node,
            None,
        )
        .map_err(|e| format!("writing the proof failed: {e:#}"))?;
        Ok(expires_at)
    }

    fn on_tick(&mut self) {
        let now = SystemTime::now();
        let now_boot = crate::datapath::boottime_ns();
        let expired: Vec<ProofKey> = self
            .proofs
            .iter()
            .filter(|(_, p)| p.expires_boot <= now_boot)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            // The kernel stopped admitting by it already; this forgets it.
            self.lapse(
                key,
                "expired",
                "the proof reached its expiry without being renewed",
            );
        }
        let plan = self.plan.clone();
        // Attempts with peers that are still dialled (pods move between nodes: the others are
        // forgotten rather than kept for ever).
        let mut dialled: std::collections::HashSet<PeerKey> = std::collections::HashSet::new();
        let local = self.local_addr;
        for pair in &plan.pairs {
            self.sync_logged(pair.key);
            let dst_listeners = self.listeners(&pair.dst, None);
            let src_listeners = self.listeners(&pair.src, None);
            dialled.extend(
                dst_listeners
                    .iter()
                    .chain(&src_listeners)
                    .map(|a| (pair.key, canonical(a.ip()))),
            );
            // A proof with a node that no longer hosts the peer's end (its pods moved away, or
            // the policy moved its authAddress) ends now, whichever side started it; the
            // others are renewed, by the side that started them, at two thirds of their life.
            let mut renew: Vec<(SocketAddr, bool)> = Vec::new();
            let mut retire: Vec<ProofKey> = Vec::new();
            for (key, p) in self.proofs.iter().filter(|(k, _)| k.0 == pair.key) {
                if key.2 == Side::Adopted {
                    continue;
                }
                let end = if p.peer_is_dst { &pair.dst } else { &pair.src };
                if self.check_origin(end, key.1).is_err() {
                    retire.push(*key);
                    continue;
                }
                if let Some((to, forward)) = p.dialed {
                    if p.renew_now || now >= p.renew_at() {
                        renew.push((to, forward));
                    }
                }
            }
            for key in retire {
                self.lapse(
                    key,
                    "peer_gone",
                    "the peer's node no longer hosts the pair's identity",
                );
            }
            for (to, forward) in renew {
                self.start(pair, to, forward, false);
            }
            // Ahead of need: this node hosts the source (holds its SVID and, where that is
            // known, runs its pods), and knows where the destination is. A proof adopted from
            // the pins stands in for all of them until its renewal time.
            if !self.svids.contains_key(&pair.src.spiffe_id)
                || local.is_some_and(|ip| self.check_origin(&pair.src, ip).is_err())
            {
                continue;
            }
            let adopted_until = self
                .proofs
                .get(&(pair.key, NO_PEER, Side::Adopted))
                .map(|p| p.renew_at());
            if adopted_until.is_some_and(|t| now < t) {
                continue;
            }
            for to in dst_listeners {
                if !self
                    .proofs
                    .contains_key(&(pair.key, canonical(to.ip()), Side::Client))
                {
                    self.start(pair, to, true, false);
                }
            }
        }
        self.attempts.retain(|key, a| {
            a.in_flight
                || key.1 == NO_PEER
                || dialled.contains(key)
                || self.proofs.contains_key(&(key.0, key.1, Side::Client))
        });
        self.publish();
    }

    /// Forgets a proof: out of the table and, unless another peer's proof of the pair stands,
    /// out of `TG_AUTH`; counted and recorded.
    fn lapse(&mut self, key: ProofKey, reason: &'static str, why: &str) {
        let Some(proof) = self.proofs.remove(&key) else {
            return;
        };
        self.sync_logged(key.0);
        self.stats.count_lapse(reason);
        let (from, to) = self
            .plan
            .by_key(key.0)
            .map(|p| (p.src.identity.clone(), p.dst.identity.clone()))
            .unwrap_or_default();
        tracing::info!(%from, %to, reason, why, peer_node = %proof.peer_node, "proof of authentication ended");
        self.reporter.record(
            "auth_lapse",
            json!({
                "reason": reason,
                "detail": why,
                "from": from,
                "to": to,
                "peer_node": proof.peer_node,
                "expires": rfc3339(proof.expires_at),
            }),
            false,
        );
    }

    /// Publishes the proofs for `status`.
    fn publish(&self) {
        let mut proofs: Vec<ProofStatus> = self
            .proofs
            .iter()
            .filter_map(|((pair, _, side), p)| {
                let plan = self.plan.by_key(*pair)?;
                Some(ProofStatus {
                    from_identity: plan.src.identity.clone(),
                    to_identity: plan.dst.identity.clone(),
                    from_spiffe_id: plan.src.spiffe_id.to_string(),
                    to_spiffe_id: plan.dst.spiffe_id.to_string(),
                    expires: rfc3339(p.expires_at),
                    role: side.role().to_owned(),
                    peer_node: p.peer_node.clone(),
                })
            })
            .collect();
        proofs.sort_by(|a, b| {
            (&a.from_identity, &a.to_identity, &a.peer_node).cmp(&(
                &b.from_identity,
                &b.to_identity,
                &b.peer_node,
            ))
        });
        self.stats.set_proofs(proofs);
    }
}

/// The auth listener: each connection is served on a task of its own, at most [`MAX_SERVED`]
/// at once (a connection beyond them is closed at accept), each within the handshake deadline.
/// Public for the handshake benchmark, which runs it with a stand-in for the manager.
pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    grants: mpsc::Sender<GrantRequest>,
    node: String,
    stats: Arc<AuthStats>,
    reporter: Arc<Reporter>,
) {
    let permits = Arc::new(Semaphore::new(MAX_SERVED));
    let per_peer: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "auth listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.count_handshake("server", "busy");
            continue;
        };
        let Some(peer_slot) = PeerSlot::take(&per_peer, peer_block(peer.ip())) else {
            stats.count_handshake("server", "busy");
            continue;
        };
        let (acceptor, grants, node) = (acceptor.clone(), grants.clone(), node.clone());
        let (stats, reporter) = (stats.clone(), reporter.clone());
        tokio::spawn(async move {
            let result = handshake::serve_connection(
                stream,
                peer,
                acceptor,
                grants,
                node,
                HANDSHAKE_DEADLINE,
            )
            .await;
            drop(permit);
            drop(peer_slot);
            // Successes and refusals by policy are counted by the manager; what failed before
            // it was asked is counted here.
            if let Err(e) = result {
                if !matches!(e, HandshakeError::Refused(_)) {
                    stats.count_handshake("server", e.result());
                    tracing::debug!(%peer, error = %e, "auth handshake failed");
                    reporter.record(
                        "auth_handshake",
                        json!({
                            "result": e.result(),
                            "role": "server",
                            "peer": peer.to_string(),
                            "reason": e.to_string(),
                        }),
                        true,
                    );
                }
            }
        });
    }
}

/// One of a peer address's `MAX_SERVED_PER_PEER` connections, given back when dropped.
struct PeerSlot {
    table: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    peer: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        table: &Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
        peer: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(peer).or_default();
        if *n >= MAX_SERVED_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: table.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.peer);
            }
        }
    }
}

/// The address a peer is counted under: itself for IPv4, its /64 for IPv6 (one host may own a
/// whole /64).
fn peer_block(ip: std::net::IpAddr) -> std::net::IpAddr {
    match canonical(ip) {
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}
