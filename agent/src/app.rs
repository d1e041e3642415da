//! `tollgate agent`: wires the subsystems together. Loads (or adopts) the pinned datapath,
//! installs the policy from `--policy`, attaches to the selected interfaces and keeps them in
//! sync, reads flow events, and serves the control socket. SIGTERM/SIGINT stop the process and
//! leave the pinned datapath enforcing the last policy.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use axum::http::StatusCode;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tollgate_common::{
    map_names, slot_of,
    verdict::{COUNTER_EVENTS_LOST, VERDICT_COUNT},
    FlowEvent, Verdict,
};

use crate::{
    api::{self, ApiError, CheckRequest, CheckResponse, PolicyResponse, StatusResponse},
    datapath::Datapath,
    host::host_addresses,
    loader::{self, Attachment, InterfaceSelector, Loaded},
    paths::PinLayout,
    policy::{compile_policy, parse_policy, ClockReading, CompiledPolicy, Policy, Protocol},
};

/// How often interfaces are rescanned for new or vanished matches.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

pub struct AgentConfig {
    pub selector: InterfaceSelector,
    pub policy_path: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
}

struct State {
    loaded: Loaded,
    datapath: Datapath,
    policy: Policy,
    compiled: CompiledPolicy,
    generation: u64,
    attachments: Vec<Attachment>,
    events_read: u64,
}

pub struct Agent {
    config: AgentConfig,
    state: Mutex<State>,
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps consistent (each swap is one write), so
        // the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the datapath, installs the policy and attaches, in that order: by the time a
    /// program is attached to a new interface the policy it reads is complete.
    pub fn start(config: AgentConfig) -> Result<Arc<Agent>> {
        let policy = crate::policy::load_policy_file(&config.policy_path)?;
        let layout = PinLayout::new(&config.bpffs);
        let adopting = loader::is_installed(&layout);
        let mut loaded = loader::load(&layout)?;
        let mut datapath = Datapath::open(&layout)?;
        let (compiled, generation) = install(&mut datapath, &policy)?;
        let attachments = loaded.reconcile(&config.selector)?;
        tracing::info!(
            policy = %policy.name,
            generation,
            rules = policy.rules.len(),
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
                compiled,
                generation,
                attachments,
                events_read: 0,
            }),
        }))
    }

    pub fn apply_text(&self, text: &str) -> Result<PolicyResponse, ApiError> {
        let policy = parse_policy(text, "policy")
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        let mut st = self.lock();
        let (compiled, generation) = install(&mut st.datapath, &policy)?;
        tracing::info!(policy = %policy.name, generation, rules = policy.rules.len(), "policy applied");
        st.policy = policy;
        st.compiled = compiled;
        st.generation = generation;
        Ok(policy_response(&st))
    }

    pub fn policy(&self) -> Result<PolicyResponse, ApiError> {
        Ok(policy_response(&self.lock()))
    }

    pub fn check(&self, req: &CheckRequest) -> Result<CheckResponse, ApiError> {
        let proto = Protocol::parse(&req.protocol)
            .filter(|p| *p != Protocol::Any)
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown protocol {:?} (expected tcp, udp, icmp or icmpv6)",
                        req.protocol
                    ),
                )
            })?;
        let st = self.lock();
        let r = st
            .datapath
            .check(req.from, req.to, proto.number(), req.port)?;
        Ok(CheckResponse {
            verdict: r.decision.verdict.name().to_string(),
            allowed: r.decision.verdict.passes(),
            rule: st.compiled.rule_name(r.decision.rule_id).to_string(),
            from_identity: st.compiled.identity_name(r.src_identity).to_string(),
            to_identity: st.compiled.identity_name(r.dst_identity).to_string(),
            generation: r.generation,
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
            rules: st.policy.rules.len(),
            identities: st.policy.identities.len(),
            map_usage: st.datapath.usage(slot_of(st.generation)),
            conntrack_entries: st.datapath.conntrack_entries(),
            verdicts: Verdict::ALL
                .iter()
                .map(|v| (v.name().to_string(), counters[*v as usize]))
                .collect(),
            events_lost: counters[COUNTER_EVENTS_LOST as usize],
            events_read: st.events_read,
        })
    }

    fn rescan(&self) -> Result<()> {
        let mut st = self.lock();
        let attachments = st.loaded.reconcile(&self.config.selector)?;
        let before: Vec<_> = st
            .attachments
            .iter()
            .map(|a| (&a.interface, a.ifindex))
            .collect();
        let after: Vec<_> = attachments
            .iter()
            .map(|a| (&a.interface, a.ifindex))
            .collect();
        if before != after {
            tracing::info!(
                interfaces = ?after.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                "enforced interfaces changed"
            );
        }
        st.attachments = attachments;
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
        format!(
            "{verdict} {} {} -> {} {what} ({} -> {}) by {} [if {} {}]",
            proto_name(ev.proto),
            addr(ev.saddr),
            addr(ev.daddr),
            st.compiled.identity_name(ev.src_identity),
            st.compiled.identity_name(ev.dst_identity),
            st.compiled.rule_name(ev.rule_id),
            ev.ifindex,
            if ev.direction == tollgate_common::direction::INGRESS {
                "ingress"
            } else {
                "egress"
            },
        )
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
        rules: st.policy.rules.len(),
        text: st.policy.source_text.clone(),
    }
}

/// Compiles `policy` for the next generation and swaps it in.
fn install(datapath: &mut Datapath, policy: &Policy) -> Result<(CompiledPolicy, u64)> {
    let generation = datapath.next_generation()?;
    let compiled = compile_policy(
        policy,
        slot_of(generation),
        &ClockReading::now(),
        &host_addresses()?,
    );
    datapath.install(&compiled, generation)?;
    Ok((compiled, generation))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<()> {
    let socket = config.socket.clone();
    // Bind first: a second agent on the same socket fails before touching any datapath.
    let listener = api::bind(&socket).await?;
    let agent = tokio::task::block_in_place(|| Agent::start(config))?;

    let server = tokio::spawn(api::serve(
        listener,
        api::router(agent.clone()),
        socket.clone(),
    ));
    let events = tokio::spawn(read_events(agent.clone()));
    let rescan = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESCAN_INTERVAL);
            loop {
                tick.tick().await;
                let a = agent.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || a.rescan())
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
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

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
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the kernel wrote a FlowEvent (repr(C), any bytes valid); read unaligned.
                let ev: FlowEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
                batch.push(ev);
            }
        }
        guard.clear_ready();
        for ev in &batch {
            if ev.verdict >= VERDICT_COUNT {
                continue;
            }
            tracing::info!(target: "tollgate::flow", "{}", agent.describe_event(ev));
        }
        agent.lock().events_read += batch.len() as u64;
    }
}
