//! Prometheus metrics on `--metrics-addr`: `/metrics` (text exposition), `/healthz` and
//! `/readyz`.
//!
//! Kernel counters (verdicts, drops by reason, rate-limit drops, events lost) and map fill are
//! read at scrape time, so they are exact and cost nothing between scrapes. Decisions by rule
//! come from the event pipeline ([`MetricsSink`]). Label values are names from the policy
//! (rules, identities, maps, verdicts), never addresses.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tollgate_common::{
    ratelimit::kind,
    verdict::{COUNTER_EVENTS_LOST, COUNTER_EVENTS_SUPPRESSED},
    Verdict,
};

use crate::{events::Sink, handles::Handles, wire::FlowRecord};

/// Every metric of the agent, registered once.
pub struct Metrics {
    registry: Registry,
    verdicts: IntCounterVec,
    drops: IntCounterVec,
    limit_drops: IntCounterVec,
    rule_decisions: IntCounterVec,
    events_lost: IntCounter,
    events_suppressed: IntCounter,
    events_read: IntCounter,
    events_skipped: IntCounter,
    generation: IntGauge,
    rules: IntGauge,
    identities: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    links_restored: IntCounter,
    audit_head_seq: IntGauge,
    audit_checkpoint: IntGaugeVec,
    audit_write_errors: IntCounter,
    audit_stdout_dropped: IntCounter,
    ready: IntGauge,
    /// Kubernetes mode only: not exported by an agent in file mode.
    kube: Option<KubeMetrics>,
    /// Only with `--svid-dir`.
    auth: Option<AuthMetrics>,
    /// Scrapes refresh the kernel-derived values one at a time.
    scrape: Mutex<()>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Sets a counter to a value read elsewhere (a kernel counter). Counters only go up; a value
/// below the last one (maps made anew under a running agent) starts the series again.
fn set_counter(c: &IntCounter, value: u64) {
    let now = c.get();
    if value >= now {
        c.inc_by(value - now);
    } else {
        c.reset();
        c.inc_by(value);
    }
}

/// `tollgate_auth_*`, read from the auth manager's shared record at scrape time.
struct AuthMetrics {
    handshakes: IntCounterVec,
    lapses: IntCounterVec,
    proofs: IntGauge,
    svids: IntGauge,
}

impl AuthMetrics {
    fn new(r: &Registry) -> Result<Self> {
        let m = AuthMetrics {
            handshakes: counter_vec(
                r,
                "tollgate_auth_handshakes_total",
                "Mutual-TLS handshakes between agents, by this agent's role (client, server) and result (ok, or why not: a verifier reason such as expired or untrusted_signature, refused, timeout, connect_failed, no_svid, busy).",
                &["role", "result"],
            )?,
            lapses: counter_vec(
                r,
                "tollgate_auth_lapses_total",
                "Proofs of authentication that ended before renewal, by reason (expired, certificate_withdrawn, peer_untrusted, policy, peer_gone).",
                &["reason"],
            )?,
            proofs: gauge(
                r,
                "tollgate_auth_proofs",
                "Authenticated identity pairs the kernel admits now (entries this agent holds in TG_AUTH).",
            )?,
            svids: gauge(r, "tollgate_auth_svids", "SVIDs this node holds.")?,
        };
        m.handshakes.with_label_values(&["client", "ok"]);
        m.handshakes.with_label_values(&["server", "ok"]);
        m.lapses.with_label_values(&["expired"]);
        Ok(m)
    }

    fn update(&self, stats: &crate::auth::stats::AuthStats) {
        for ((role, result), n) in stats.handshakes() {
            let c = self.handshakes.with_label_values(&[role, result]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        for (reason, n) in stats.lapses() {
            let c = self.lapses.with_label_values(&[reason]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        let (proofs, svids) = stats.counts();
        self.proofs.set(proofs as i64);
        self.svids.set(svids as i64);
    }
}

/// `tollgate_kubernetes_*`, read from the shared Kubernetes status at scrape time.
struct KubeMetrics {
    synced: IntGauge,
    connected: IntGauge,
    pods: IntGauge,
    addresses: IntGauge,
    policies: IntGaugeVec,
    conflicts: IntGauge,
    pod_changes: IntCounter,
    flows_revoked: IntCounter,
    watch_errors: IntCounter,
}

impl KubeMetrics {
    fn new(r: &Registry) -> Result<Self> {
        Ok(KubeMetrics {
            synced: gauge(
                r,
                "tollgate_kubernetes_synced",
                "Kubernetes mode: 1 once pods, namespaces and policies were listed and the merged policy installed.",
            )?,
            connected: gauge(
                r,
                "tollgate_kubernetes_connected",
                "Kubernetes mode: 1 while every watch is connected (0: enforcing the last known state).",
            )?,
            pods: gauge(r, "tollgate_kubernetes_pods", "Kubernetes mode: pods known, all nodes.")?,
            addresses: gauge(
                r,
                "tollgate_kubernetes_pod_addresses",
                "Kubernetes mode: pod addresses with an identity entry of their own.",
            )?,
            policies: gauge_vec(
                r,
                "tollgate_kubernetes_policy_objects",
                "Kubernetes mode: Policy objects merged (state=merged) or left out as invalid (state=skipped).",
                &["state"],
            )?,
            conflicts: gauge(
                r,
                "tollgate_kubernetes_pod_conflicts",
                "Kubernetes mode: pods that could not be given one identity (their traffic is denied).",
            )?,
            pod_changes: counter(
                r,
                "tollgate_kubernetes_pod_changes_total",
                "Kubernetes mode: pod address changes written to the identity maps.",
            )?,
            flows_revoked: counter(
                r,
                "tollgate_kubernetes_flows_revoked_total",
                "Kubernetes mode: tracked flow entries removed because their address changed identity.",
            )?,
            watch_errors: counter(
                r,
                "tollgate_kubernetes_watch_errors_total",
                "Kubernetes mode: failed lists and watches (API server unreachable, refusing, or a watch cut).",
            )?,
        })
    }

    fn update(&self, k: &crate::wire::KubernetesStatus) {
        self.synced.set(i64::from(k.synced));
        self.connected.set(i64::from(k.connected));
        self.pods.set(k.pods as i64);
        self.addresses.set(k.addresses as i64);
        self.policies
            .with_label_values(&["merged"])
            .set(k.policies.len() as i64);
        self.policies
            .with_label_values(&["skipped"])
            .set(k.skipped.len() as i64);
        self.conflicts.set(k.conflict_count as i64);
        set_counter(&self.pod_changes, k.pod_changes);
        set_counter(&self.flows_revoked, k.flows_revoked);
        set_counter(&self.watch_errors, k.watch_errors);
    }
}

impl Metrics {
    /// The registry; `kubernetes` adds the `tollgate_kubernetes_*` metrics.
    pub fn new(kubernetes: bool, auth: bool) -> Result<Arc<Self>> {
        let r = Registry::new();
        let m = Metrics {
            verdicts: counter_vec(
                &r,
                "tollgate_verdicts_total",
                "Packets decided by the datapath, by verdict (exact kernel counters).",
                &["verdict"],
            )?,
            drops: counter_vec(
                &r,
                "tollgate_drops_total",
                "Packets dropped by the datapath, by reason (the dropping verdicts).",
                &["reason"],
            )?,
            limit_drops: counter_vec(
                &r,
                "tollgate_ratelimit_drops_total",
                "Packets dropped (kind packets or bytes) and connections refused (kind connections) by a rate limit, by its owner; mode audit counts would-drops that passed.",
                &["owner", "name", "kind", "mode"],
            )?,
            rule_decisions: counter_vec(
                &r,
                "tollgate_rule_decisions_total",
                "Packets of evented decisions (denies, would-denies, limit drops, spoofed sources, new flows of logged rules) by rule and verdict, from the datapath's events.",
                &["rule", "verdict"],
            )?,
            events_lost: counter(
                &r,
                "tollgate_events_lost_total",
                "Events the datapath could not put on the ring buffer (full: the agent fell behind).",
            )?,
            events_suppressed: counter(
                &r,
                "tollgate_events_suppressed_total",
                "Events the datapath's sampler held back (repeats of an edge within a second, or over the per-CPU budget); their packets are counted.",
            )?,
            events_read: counter(
                &r,
                "tollgate_events_read_total",
                "Events the agent took off the ring buffer.",
            )?,
            events_skipped: counter(
                &r,
                "tollgate_events_skipped_total",
                "Events of a kind this agent does not know, or malformed: skipped.",
            )?,
            generation: gauge(&r, "tollgate_policy_generation", "The live policy generation.")?,
            rules: gauge(&r, "tollgate_policy_rules", "Rules of the live policy.")?,
            identities: gauge(
                &r,
                "tollgate_policy_identities",
                "Identities declared by the live policy.",
            )?,
            map_entries: gauge_vec(
                &r,
                "tollgate_map_entries",
                "Entries in each datapath map (policy maps: the live slot; ring buffer: none).",
                &["map"],
            )?,
            map_capacity: gauge_vec(
                &r,
                "tollgate_map_capacity",
                "Capacity of each datapath map, in entries (ring buffer: bytes).",
                &["map"],
            )?,
            links_restored: counter(
                &r,
                "tollgate_links_restored_total",
                "Links found detached or unpinned behind the agent's back and attached again.",
            )?,
            audit_head_seq: gauge(
                &r,
                "tollgate_audit_head_seq",
                "Sequence number of the last audit record written.",
            )?,
            audit_checkpoint: gauge_vec(
                &r,
                "tollgate_audit_checkpoint_info",
                "The last audit checkpoint: the sequence number and head hash it vouches for (value 1).",
                &["seq", "head"],
            )?,
            audit_write_errors: counter(
                &r,
                "tollgate_audit_write_errors_total",
                "Audit records that could not be written.",
            )?,
            audit_stdout_dropped: counter(
                &r,
                "tollgate_audit_stdout_dropped_total",
                "Audit records dropped on the way to stdout because nothing read them fast enough.",
            )?,
            ready: gauge(&r, "tollgate_ready", "1 when the agent is ready (as /readyz).")?,
            kube: kubernetes.then(|| KubeMetrics::new(&r)).transpose()?,
            auth: auth.then(|| AuthMetrics::new(&r)).transpose()?,
            registry: r,
            scrape: Mutex::new(()),
        };
        let build = gauge_vec(
            &m.registry,
            "tollgate_build_info",
            "The agent's version and datapath ABI (value 1).",
            &["version", "abi"],
        )?;
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &tollgate_common::ABI_VERSION.to_string(),
            ])
            .set(1);
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Every verdict and drop reason from the start, so that rate() has a zero to start at.
        for v in Verdict::ALL {
            m.verdicts.with_label_values(&[v.name()]);
            if !v.passes() {
                m.drops.with_label_values(&[v.name()]);
            }
        }
        Ok(Arc::new(m))
    }

    /// Reads the kernel counters and published state into the metrics and encodes them all.
    pub fn render(&self, h: &Handles) -> Result<String> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let counters = h.reader.counters()?;
        for v in Verdict::ALL {
            let n = counters[v as usize];
            set_counter(&self.verdicts.with_label_values(&[v.name()]), n);
            if !v.passes() {
                set_counter(&self.drops.with_label_values(&[v.name()]), n);
            }
        }
        set_counter(&self.events_lost, counters[COUNTER_EVENTS_LOST as usize]);
        set_counter(
            &self.events_suppressed,
            counters[COUNTER_EVENTS_SUPPRESSED as usize],
        );
        set_counter(&self.events_read, h.events.read.load(Ordering::Relaxed));
        set_counter(
            &self.events_skipped,
            h.events.unknown.load(Ordering::Relaxed) + h.events.malformed.load(Ordering::Relaxed),
        );
        let installed = h.installer.installed();
        self.generation.set(installed.generation as i64);
        self.rules.set(installed.policy.rules as i64);
        self.identities.set(installed.policy.identities as i64);
        set_counter(&self.links_restored, installed.links_restored);
        // Limits of the live policy only: a replaced limit's series stop.
        self.limit_drops.reset();
        for id in installed.live_limits.iter() {
            let (Some(info), Some(b)) = (installed.limits.get(id), h.reader.bucket(*id)) else {
                continue;
            };
            let (owner, name) = info.owner.split_once(' ').unwrap_or(("", &info.owner));
            for k in [kind::PACKETS, kind::BYTES, kind::CONNECTIONS] {
                let kind_name = kind::NAMES[k];
                self.limit_drops
                    .with_label_values(&[owner, name, kind_name, "enforce"])
                    .inc_by(b.dropped[k]);
                if info.audit {
                    self.limit_drops
                        .with_label_values(&[owner, name, kind_name, "audit"])
                        .inc_by(b.would_drop[k]);
                }
            }
        }
        let fill = h.fill.borrow().clone();
        for m in &installed.maps {
            let entries = fill
                .conntrack
                .iter()
                .find(|(name, _)| *name == m.name)
                .map(|(_, n)| *n)
                .or(m.entries);
            self.map_capacity
                .with_label_values(&[&m.name])
                .set(i64::from(m.capacity));
            if let Some(n) = entries {
                self.map_entries.with_label_values(&[&m.name]).set(n as i64);
            }
        }
        if let Some(audit) = &h.audit {
            let s = audit.status();
            self.audit_head_seq.set(s.head_seq as i64);
            set_counter(&self.audit_write_errors, s.write_errors);
            set_counter(&self.audit_stdout_dropped, s.stdout_dropped);
            if let Some((seq, head)) = s.last_checkpoint.as_deref().and_then(|c| c.split_once(':'))
            {
                self.audit_checkpoint.reset();
                self.audit_checkpoint.with_label_values(&[seq, head]).set(1);
            }
        }
        self.ready.set(i64::from(h.is_ready()));
        if let (Some(m), Some(k)) = (
            &self.kube,
            h.cluster
                .as_ref()
                .and_then(|s| s.lock().ok().map(|s| s.clone())),
        ) {
            m.update(&k);
        }
        if let (Some(m), Some(a)) = (&self.auth, &h.auth) {
            m.update(a);
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    /// Counts what the event pipeline decoded.
    pub fn sink(self: &Arc<Self>) -> MetricsSink {
        MetricsSink(self.clone())
    }
}

/// Decisions by rule and verdict, from the events.
pub struct MetricsSink(Arc<Metrics>);

impl Sink for MetricsSink {
    fn decision(&mut self, r: &FlowRecord) {
        self.0
            .rule_decisions
            .with_label_values(&[&r.rule, &r.verdict])
            .inc_by(r.count);
    }
}

#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    handles: Handles,
}

async fn scrape(State(e): State<Endpoint>) -> impl IntoResponse {
    match tokio::task::spawn_blocking(move || e.metrics.render(&e.handles)).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}\n")).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

async fn healthz(State(e): State<Endpoint>) -> impl IntoResponse {
    if e.handles.is_healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the policy installer or the event reader has stopped\n",
        )
    }
}

async fn readyz(State(e): State<Endpoint>) -> impl IntoResponse {
    if e.handles.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting, stopping, or a subsystem has stopped\n",
        )
    }
}

/// Binds `addr` (before the datapath is touched, so a taken port fails the start cleanly).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the metrics address {addr} (--metrics-addr; give each agent its own, or `none`)")
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, handles: Handles) {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoint { metrics, handles });
    // Bounded like the control socket, by the same code: a newcomer at the cap closes the
    // oldest connection that has not sent its request yet, so idle connections (however fast
    // they are reopened) cannot keep a scrape out.
    crate::api::serve_with(
        listener,
        router,
        std::path::PathBuf::from("the metrics address"),
        crate::api::ServeConfig {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: REQUEST_HEAD_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            ..crate::api::ServeConfig::default()
        },
    )
    .await
}

/// Connections served at once on the metrics address (Prometheus uses one per scrape).
const MAX_CONNECTIONS: usize = 32;
/// How long a connection has to send its request head (Prometheus sends it at once).
const REQUEST_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a scrape may take after its head.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
