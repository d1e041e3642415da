//! `tollgate agent`: wires the subsystems together. Takes the pin directory's lock, loads (or
//! adopts) the pinned datapath, installs the policy from `--policy`, describes and attaches to
//! the selected interfaces and keeps them in sync, reads flow events, and serves the control
//! socket. SIGTERM/SIGINT stop the process and leave the pinned datapath enforcing the last
//! policy.

use std::{
    collections::VecDeque,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use axum::http::StatusCode;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tollgate_common::{
    map_names,
    ratelimit::kind,
    slot_of,
    verdict::{COUNTER_EVENTS_LOST, COUNTER_EVENTS_SUPPRESSED, VERDICT_COUNT},
    FlowEvent, Verdict,
};

use crate::{
    api::{
        self, ApiError, CheckLimit, CheckRequest, CheckResponse, InterfaceStatus, LimitStatus,
        PolicyResponse, StatusResponse,
    },
    datapath::Datapath,
    host::host_addresses,
    linkwatch::LinkEvents,
    loader::{self, Attachment, InterfaceSelector, Loaded},
    paths::PinLayout,
    pinlock::PinLock,
    policy::{compile_policy, parse_policy_owned, ClockReading, Policy, PolicyNames, Protocol},
};

/// How often interfaces are rescanned for new or vanished matches, and links checked.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Generations whose names are kept for the events they may still have in the ring buffer.
/// Events are read within milliseconds of being written; eight swaps back is far beyond that.
const NAMED_GENERATIONS: usize = 8;
/// How long the names of a replaced generation are kept, for the same reason. A 100k-rule
/// generation's names take 6 MB: eight of them kept for good would be most of the agent's
/// memory.
const NAMES_KEPT_AFTER_REPLACED: Duration = Duration::from_secs(60);

pub struct AgentConfig {
    pub selector: InterfaceSelector,
    /// Interfaces (among those enforced) where traffic from `world` arrives with any source:
    /// no source validation there.
    pub uplinks: Option<InterfaceSelector>,
    pub policy_path: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    /// How maps are created when none are pinned yet.
    pub load: loader::LoadOptions,
}

impl AgentConfig {
    fn is_uplink(&self, ifname: &str) -> bool {
        self.uplinks.as_ref().is_some_and(|u| u.matches(ifname))
    }
}

/// What the agent keeps of the live policy once it is compiled and installed: what `status` and
/// `policy get` answer with. The validated rules are not kept (30 MB for 100k rules); the maps
/// and [`PolicyNames`] hold what enforcement and events need.
struct LivePolicy {
    name: String,
    rules: usize,
    identities: usize,
    /// The YAML as applied.
    source_text: String,
}

impl From<Policy> for LivePolicy {
    fn from(policy: Policy) -> Self {
        Self {
            name: policy.name,
            rules: policy.rules.len(),
            identities: policy.identities.len(),
            source_text: policy.source_text,
        }
    }
}

struct State {
    loaded: Loaded,
    datapath: Datapath,
    policy: LivePolicy,
    generation: u64,
    names: NamedGenerations,
    /// The enforced interfaces (name, ifindex), as described in `TG_INTERFACES`.
    interfaces: Vec<(String, u32)>,
    /// Uplinks (`--uplinks`) that are not enforced: described in `TG_INTERFACES` all the same,
    /// so that packets from them are checked as coming from an uplink where they leave.
    passive_uplinks: Vec<(String, u32)>,
    attachments: Vec<Attachment>,
    /// Links found unpinned or detached and attached again, since start.
    links_restored: u64,
    /// Selected interfaces the classifiers cannot enforce (L3 devices), already warned about.
    not_enforced: Vec<String>,
    events_read: u64,
}

impl State {
    fn live_names(&self) -> &PolicyNames {
        self.names.live()
    }

    fn names_of(&self, generation: u64) -> Option<&PolicyNames> {
        self.names.of(generation)
    }
}

/// Names of the live generation and of the ones before it, newest first, so an event is named
/// as the generation that produced it numbered things. At most [`NAMED_GENERATIONS`] are kept,
/// a replaced one for [`NAMES_KEPT_AFTER_REPLACED`]; a generation whose names equal those of
/// the one it replaced (the same policy applied again) shares them.
struct NamedGenerations(VecDeque<NamedGeneration>);

struct NamedGeneration {
    generation: u64,
    names: Arc<PolicyNames>,
    /// When the next generation went live.
    replaced: Option<Instant>,
}

impl NamedGenerations {
    fn new(generation: u64, names: Arc<PolicyNames>) -> Self {
        Self(VecDeque::from([NamedGeneration {
            generation,
            names,
            replaced: None,
        }]))
    }

    fn live(&self) -> &PolicyNames {
        &self
            .0
            .front()
            .expect("a policy is installed at start")
            .names
    }

    fn of(&self, generation: u64) -> Option<&PolicyNames> {
        self.0
            .iter()
            .find(|g| g.generation == generation)
            .map(|g| g.names.as_ref())
    }

    /// `generation` went live, replacing the live one.
    fn push(&mut self, generation: u64, names: Arc<PolicyNames>, now: Instant) {
        let names = match self.0.front_mut() {
            Some(live) => {
                live.replaced = Some(now);
                let same = live.names.rule_names == names.rule_names
                    && live.names.identity_names == names.identity_names
                    && live.names.bindings == names.bindings;
                if same {
                    Arc::clone(&live.names)
                } else {
                    names
                }
            }
            None => names,
        };
        self.0.push_front(NamedGeneration {
            generation,
            names,
            replaced: None,
        });
        self.0.truncate(NAMED_GENERATIONS);
        self.forget_expired(now);
    }

    /// Forgets generations replaced more than [`NAMES_KEPT_AFTER_REPLACED`] before `now`;
    /// tells whether there were any.
    fn forget_expired(&mut self, now: Instant) -> bool {
        let before = self.0.len();
        self.0.retain(|g| {
            g.replaced
                .is_none_or(|at| now.saturating_duration_since(at) < NAMES_KEPT_AFTER_REPLACED)
        });
        self.0.len() != before
    }
}

pub struct Agent {
    config: AgentConfig,
    state: Mutex<State>,
    /// Held for the agent's lifetime: no second agent or uninstall on this pin directory.
    _lock: PinLock,
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps consistent (each swap is one write), so
        // the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the pin directory, loads the datapath, describes the interfaces, installs the
    /// policy and attaches, in that order: by the time a program is attached to a new interface
    /// the policy and interface settings it reads are complete.
    pub fn start(config: AgentConfig) -> Result<Arc<Agent>> {
        let policy = crate::policy::load_policy_file(&config.policy_path)?;
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
        let (policy, names, generation) = install(&mut datapath, policy, &interfaces)?;
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
        Ok(Arc::new(Agent {
            config,
            state: Mutex::new(State {
                loaded,
                datapath,
                policy,
                generation,
                names: NamedGenerations::new(generation, names),
                interfaces,
                passive_uplinks,
                attachments,
                links_restored: 0,
                not_enforced,
                events_read: 0,
            }),
            _lock: lock,
        }))
    }

    pub fn apply_text(&self, text: String) -> Result<PolicyResponse, ApiError> {
        let policy = parse_policy_owned(text, "policy")
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        let response = {
            let mut st = self.lock();
            let interfaces = st.interfaces.clone();
            let (policy, names, generation) = install(&mut st.datapath, policy, &interfaces)
                .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
            tracing::info!(policy = %policy.name, generation, rules = policy.rules, "policy applied");
            st.policy = policy;
            st.generation = generation;
            st.names.push(generation, names, Instant::now());
            policy_response(&st)
        };
        release_freed_memory();
        Ok(response)
    }

    pub fn policy(&self) -> Result<PolicyResponse, ApiError> {
        Ok(policy_response(&self.lock()))
    }

    /// Decides a hypothetical new flow with the kernel's own code against the live maps (see
    /// `check.rs`).
    pub fn check(&self, req: &CheckRequest) -> Result<CheckResponse, ApiError> {
        let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
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
        let mut st = self.lock();
        let (ifindex, mark) = match &req.interface {
            None => (0, 0),
            Some(name) => {
                let ifindex = st
                    .interfaces
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, i)| *i)
                    .ok_or_else(|| {
                        bad(format!(
                            "interface {name:?} is not enforced by this agent (enforced: {})",
                            st.interfaces
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
        st.datapath.clear_check()?;
        st.loaded.run_check(&packet, ifindex, mark)?;
        let r = st.datapath.check_result()?;
        let verdict = Verdict::from_u32(r.verdict)
            .ok_or_else(|| anyhow!("the check program answered verdict {}", r.verdict))?;
        let names = st.names_of(r.generation);
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
        .map(|(id, applies_to)| match st.datapath.limit_info(id) {
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
        })
    }

    pub fn status(&self) -> Result<StatusResponse, ApiError> {
        let st = self.lock();
        let counters = st.datapath.counters()?;
        Ok(StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            interfaces_selector: self.config.selector.as_str().to_string(),
            attachments: st.attachments.clone(),
            policy_name: st.policy.name.clone(),
            generation: st.generation,
            rules: st.policy.rules,
            identities: st.policy.identities,
            map_usage: st.datapath.usage(slot_of(st.generation)),
            conntrack_entries: st.datapath.conntrack_entries(),
            maps: st.datapath.map_status(slot_of(st.generation)),
            limits: st
                .datapath
                .limit_status()
                .into_iter()
                .map(|(info, b)| LimitStatus {
                    owner: info.owner,
                    limit: info.description,
                    mode: if info.audit { "audit" } else { "enforce" }.to_owned(),
                    dropped_packets: b.dropped[kind::PACKETS],
                    dropped_bytes_limit: b.dropped[kind::BYTES],
                    refused_connections: b.dropped[kind::CONNECTIONS],
                    would_drop_packets: b.would_drop[kind::PACKETS],
                    would_drop_bytes_limit: b.would_drop[kind::BYTES],
                    would_refuse_connections: b.would_drop[kind::CONNECTIONS],
                })
                .collect(),
            verdicts: Verdict::ALL
                .iter()
                .map(|v| (v.name().to_string(), counters[*v as usize]))
                .collect(),
            events_lost: counters[COUNTER_EVENTS_LOST as usize],
            events_suppressed: counters[COUNTER_EVENTS_SUPPRESSED as usize],
            events_read: st.events_read,
            interfaces: st
                .interfaces
                .iter()
                .chain(&st.passive_uplinks)
                .map(|(name, ifindex)| {
                    let bound = st.live_names().bound_identity(name);
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
                            .then(|| st.live_names().identity_name(bound).to_owned()),
                    }
                })
                .collect(),
            links_restored: st.links_restored,
        })
    }

    /// Forgets the names of generations replaced long enough ago that none of their events can
    /// still be waiting, and gives their memory back.
    fn forget_replaced_names(&self) {
        if self.lock().names.forget_expired(Instant::now()) {
            release_freed_memory();
        }
    }

    /// Brings the enforced interfaces in line with what exists now: describes and attaches to
    /// new ones, attaches again where a link was lost, forgets vanished ones.
    fn rescan(&self) -> Result<()> {
        let (wanted, not_enforced) = enforceable_interfaces(&self.config.selector)?;
        let passive_uplinks = passive_uplinks(&self.config, &wanted)?;
        let mut st = self.lock();
        let newly: Vec<String> = not_enforced
            .iter()
            .filter(|n| !st.not_enforced.contains(n))
            .cloned()
            .collect();
        warn_not_enforced(&newly);
        st.not_enforced = not_enforced;
        for (_, ifindex) in &passive_uplinks {
            if !st.passive_uplinks.iter().any(|(_, i)| i == ifindex) {
                st.datapath
                    .write_interface(*ifindex, true, Some(false), [Some(0), Some(0)])?;
            }
        }
        let live_slot = slot_of(st.generation);
        for (name, ifindex) in &wanted {
            if st.interfaces.iter().any(|(n, i)| n == name && i == ifindex) {
                continue;
            }
            // New (or renamed, or a new interface on a reused ifindex): a fresh entry.
            let mut bound = [Some(0); 2];
            bound[live_slot as usize] = Some(st.live_names().bound_identity(name));
            st.datapath.write_interface(
                *ifindex,
                self.config.is_uplink(name),
                Some(false),
                bound,
            )?;
        }
        let reconciled = st.loaded.reconcile(&wanted)?;
        for (name, ifindex) in &wanted {
            if !st.interfaces.iter().any(|(n, i)| n == name && i == ifindex) {
                // Attached now: checked at its ingress from here on.
                st.datapath.write_interface(
                    *ifindex,
                    self.config.is_uplink(name),
                    Some(true),
                    [None, None],
                )?;
            }
        }
        forget_other_interfaces(&mut st.datapath, &wanted, &passive_uplinks);
        st.passive_uplinks = passive_uplinks;
        if !reconciled.restored.is_empty() {
            st.links_restored += reconciled.restored.len() as u64;
            tracing::warn!(
                links = ?reconciled.restored,
                "links were unpinned or detached behind the agent's back; attached again"
            );
        }
        if st.interfaces != wanted {
            tracing::info!(
                interfaces = ?wanted.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                "enforced interfaces changed"
            );
        }
        st.interfaces = wanted;
        st.attachments = reconciled.attachments;
        Ok(())
    }

    fn describe_event(&self, ev: &FlowEvent) -> String {
        let st = self.lock();
        let verdict = Verdict::from_u32(ev.verdict).map_or("unknown", |v| v.name());
        let addr = |a: [u8; 16]| -> IpAddr {
            let v6 = std::net::Ipv6Addr::from(a);
            match v6.to_ipv4_mapped() {
                Some(v4) if ev.family == 4 => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            }
        };
        let what = match ev.proto {
            tollgate_common::proto::ICMP | tollgate_common::proto::ICMPV6 => {
                format!("type {}", ev.sport)
            }
            _ => format!("port {}", ev.dport),
        };
        let (from, to, mut rule) = name_event(st.names_of(ev.generation), ev);
        if ev.verdict == Verdict::DropRateLimited as u32
            || ev.verdict == Verdict::AuditWouldDrop as u32
        {
            let kind = tollgate_common::ratelimit::kind::NAMES
                .get(usize::from(ev.limit_kind))
                .copied()
                .unwrap_or("unknown");
            rule = match st.datapath.limit_info(ev.limit_id) {
                Some(info) => format!(
                    "the {kind} limit of {} ({}; the flow's rule: {rule})",
                    info.owner, info.description
                ),
                None => format!(
                    "the {kind} limit #{} (the flow's rule: {rule})",
                    ev.limit_id
                ),
            };
        }
        // The sampler's count of this edge's events it held back before this one.
        let repeats = if ev.suppressed > 0 {
            format!(" (+{} like it suppressed)", ev.suppressed)
        } else {
            String::new()
        };
        format!(
            "{verdict} {} {} -> {} {what} ({from} -> {to}) by {rule} [if {} {}]{repeats}",
            proto_name(ev.proto),
            addr(ev.saddr),
            addr(ev.daddr),
            ev.ifindex,
            if ev.direction == tollgate_common::direction::INGRESS {
                "ingress"
            } else {
                "egress"
            },
        )
    }
}

/// (source identity, destination identity, rule) of an event, named as the generation that
/// produced it numbered them. An event of a generation this agent does not know (written before
/// it started, or more than `NAMED_GENERATIONS` swaps ago) says so instead of borrowing another
/// generation's names.
fn name_event(names: Option<&PolicyNames>, ev: &FlowEvent) -> (String, String, String) {
    let identity = |id: u32| match (id, names) {
        (tollgate_common::flow::EVENT_IDENTITY_UNRESOLVED, _) => "unresolved".to_owned(),
        (_, Some(n)) => n.identity_name(id).to_owned(),
        (_, None) => format!("identity #{id}"),
    };
    let rule = match (ev.verdict, names) {
        (v, _) if v == Verdict::DropSpoofed as u32 => "source validation".to_owned(),
        (_, Some(n)) => n.rule_name(ev.rule_id).to_owned(),
        (_, None) if ev.rule_id == tollgate_common::rule::RULE_ID_NONE => "default-deny".to_owned(),
        (_, None) => format!("rule #{}", ev.rule_id),
    };
    let (from, to, mut rule) = (identity(ev.src_identity), identity(ev.dst_identity), rule);
    if names.is_none() {
        rule.push_str(&format!(
            " (generation {}, not known to this agent: names unavailable)",
            ev.generation
        ));
    }
    (from, to, rule)
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
fn passive_uplinks(config: &AgentConfig, enforced: &[(String, u32)]) -> Result<Vec<(String, u32)>> {
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

fn proto_name(p: u8) -> String {
    match p {
        tollgate_common::proto::TCP => "tcp".into(),
        tollgate_common::proto::UDP => "udp".into(),
        tollgate_common::proto::ICMP => "icmp".into(),
        tollgate_common::proto::ICMPV6 => "icmpv6".into(),
        n => format!("proto-{n}"),
    }
}

fn policy_response(st: &State) -> PolicyResponse {
    PolicyResponse {
        name: st.policy.name.clone(),
        generation: st.generation,
        rules: st.policy.rules,
        text: st.policy.source_text.clone(),
    }
}

/// Compiles `policy` for the next generation and swaps it in; returns what is kept of the
/// policy and the names of what it installed (the map entries themselves are not kept). The
/// validated rules are dropped as soon as they are compiled, before the maps are written.
fn install(
    datapath: &mut Datapath,
    policy: Policy,
    interfaces: &[(String, u32)],
) -> Result<(LivePolicy, Arc<PolicyNames>, u64)> {
    let generation = datapath.next_generation()?;
    let compiled = compile_policy(
        &policy,
        slot_of(generation),
        &ClockReading::now(),
        &host_addresses()?,
    );
    let policy = LivePolicy::from(policy);
    datapath.install(&compiled, generation, interfaces)?;
    for limit in compiled.limits.iter().filter(|l| !l.used) {
        tracing::warn!(
            limit = %limit.owner,
            "this rate limit applies to no traffic: other rules decide all of its rule's traffic \
             (they last longer, or enforce where it audits); it has no bucket"
        );
    }
    Ok((policy, compiled.names, generation))
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

/// Removes the control socket file when dropped, so a failed start or a stop leaves none.
struct SocketFile<'a>(&'a Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<()> {
    let socket = config.socket.clone();
    // Bind first: a second agent on the same socket fails before touching any datapath.
    let listener = api::bind(&socket).await?;
    let _socket_file = SocketFile(&socket);
    let agent = tokio::task::block_in_place(|| Agent::start(config))?;

    let server = tokio::spawn(api::serve(
        listener,
        api::router(agent.clone()),
        socket.clone(),
    ));
    let events = tokio::spawn(read_events(agent.clone()));
    let rescan = {
        let agent = agent.clone();
        // Link notifications make a new interface enforced at once; the periodic rescan stays,
        // for what netlink does not announce (a link pin removed behind the agent's back) and
        // in case the socket cannot be had.
        let mut links = match LinkEvents::open() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no link notifications; rescanning every second only");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESCAN_INTERVAL);
            loop {
                let link_changed = async {
                    match links.as_mut() {
                        Some(l) => l.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {}
                    r = link_changed => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "link notifications failed; rescanning every second only");
                            links = None;
                        }
                    }
                }
                let a = agent.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || {
                    a.forget_replaced_names();
                    a.rescan()
                })
                .await
                .map_err(|e| anyhow!(e))
                .and_then(|r| r)
                {
                    tracing::warn!(error = %format!("{e:#}"), "interface rescan failed");
                }
            }
        })
    };
    tracing::info!(socket = %socket.display(), "agent ready");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping; the pinned datapath keeps enforcing the last policy");
    server.abort();
    events.abort();
    rescan.abort();
    Ok(())
}

/// Every event waiting in the ring buffer.
fn drain_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<FlowEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            // SAFETY: the kernel wrote a FlowEvent (repr(C), any bytes valid); read unaligned.
            let ev: FlowEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
            batch.push(ev);
        }
    }
    batch
}

/// How often the event reader collects events the datapath did not wake it for.
const EVENT_POLL: Duration = Duration::from_millis(100);

/// Reads `FlowEvent`s from the ring buffer and logs them with rule and identity names.
async fn read_events(agent: Arc<Agent>) {
    if let Err(e) = read_events_inner(agent).await {
        tracing::error!(error = %format!("{e:#}"), "event reader stopped");
    }
}

async fn read_events_inner(agent: Arc<Agent>) -> Result<()> {
    let layout = PinLayout::new(&agent.config.bpffs);
    let path = layout.map(map_names::EVENTS);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let ring = aya::maps::RingBuf::try_from(aya::maps::Map::from_map_data(data)?)?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until dropped, which
    // happens only when the AsyncFd is dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    loop {
        // The datapath wakes the reader only when 64 KiB are waiting (a wakeup per event was
        // dear on the packet path); otherwise events are collected every 100 ms.
        let batch = match tokio::time::timeout(EVENT_POLL, fd.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                let batch = drain_events(guard.get_inner_mut());
                guard.clear_ready();
                batch
            }
            Err(_) => drain_events(fd.get_mut()),
        };
        for ev in &batch {
            if ev.verdict >= VERDICT_COUNT {
                continue;
            }
            tracing::info!(target: "tollgate::flow", "{}", agent.describe_event(ev));
        }
        agent.lock().events_read += batch.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use tollgate_common::flow::EVENT_IDENTITY_UNRESOLVED;

    use super::*;

    fn names() -> PolicyNames {
        PolicyNames {
            rule_names: vec!["frontend-to-orders".into()],
            identity_names: vec![(256, "frontend".into()), (257, "orders".into())],
            bindings: Vec::new(),
        }
    }

    fn event(verdict: Verdict, src: u32, dst: u32, rule: u32) -> FlowEvent {
        FlowEvent {
            verdict: verdict as u32,
            src_identity: src,
            dst_identity: dst,
            rule_id: rule,
            generation: 3,
            ..Default::default()
        }
    }

    #[test]
    fn replaced_generations_keep_their_names_for_a_while() {
        let start = Instant::now();
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        let other = PolicyNames {
            rule_names: vec!["other".into()],
            ..names()
        };
        named.push(2, Arc::new(other), start);
        assert_eq!(named.of(1).unwrap().rule_name(1), "frontend-to-orders");
        assert_eq!(named.live().rule_name(1), "other");
        assert!(!named.forget_expired(start + NAMES_KEPT_AFTER_REPLACED / 2));
        assert!(named.forget_expired(start + NAMES_KEPT_AFTER_REPLACED));
        assert!(named.of(1).is_none());
        assert_eq!(named.of(2).unwrap().rule_name(1), "other");
    }

    #[test]
    fn at_most_eight_generations_are_named() {
        let now = Instant::now();
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        for generation in 2..=10 {
            named.push(generation, Arc::new(names()), now);
        }
        assert_eq!(named.0.len(), NAMED_GENERATIONS);
        assert!(named.of(2).is_none() && named.of(3).is_some());
    }

    #[test]
    fn equal_names_are_shared_between_generations() {
        let mut named = NamedGenerations::new(1, Arc::new(names()));
        named.push(2, Arc::new(names()), Instant::now());
        assert!(Arc::ptr_eq(&named.0[0].names, &named.0[1].names));
    }

    #[test]
    fn events_are_named_by_their_generations_names() {
        let n = names();
        assert_eq!(
            name_event(Some(&n), &event(Verdict::DenyExpired, 256, 257, 1)),
            (
                "frontend".to_owned(),
                "orders".to_owned(),
                "frontend-to-orders".to_owned()
            )
        );
    }

    #[test]
    fn events_of_an_unknown_generation_say_so_instead_of_guessing() {
        let (from, to, rule) = name_event(None, &event(Verdict::DenyRevoked, 256, 257, 1));
        assert_eq!(
            (from.as_str(), to.as_str()),
            ("identity #256", "identity #257")
        );
        assert!(
            rule.starts_with("rule #1 (generation 3, not known"),
            "{rule}"
        );
    }

    #[test]
    fn spoofed_events_name_source_validation_and_unresolved_identities() {
        let n = names();
        let ev = event(
            Verdict::DropSpoofed,
            EVENT_IDENTITY_UNRESOLVED,
            EVENT_IDENTITY_UNRESOLVED,
            0,
        );
        assert_eq!(
            name_event(Some(&n), &ev),
            (
                "unresolved".to_owned(),
                "unresolved".to_owned(),
                "source validation".to_owned()
            )
        );
    }
}
