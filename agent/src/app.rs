//! `tollgate agent`: wires the subsystems together, and owns none of them.
//!
//! - the policy installer (`installer`) loads or adopts the pinned datapath, installs the policy
//!   from `--policy`, attaches to the selected interfaces, and is from then on the only writer
//!   of the policy maps and links; it publishes what it installed through a `watch`;
//! - the event pipeline (`events`) reads the ring buffer and feeds the sinks: the log, the
//!   audit log (`recorder`), the metrics and the flow list and inventory (`flows`);
//! - the fill sampler (`reader`) counts the conntrack maps every few seconds;
//! - the control socket (`api`) and the metrics endpoint (`metrics`) answer from the handles
//!   of all of these (`handles`).
//!
//! SIGTERM/SIGINT stop the process and leave the pinned datapath enforcing the last policy.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    aggregate, api,
    audit::{AuditConfig, AuditLog},
    cluster::{self, watch::KubeSettings, SharedStatus},
    events::{Control, EventStats, Input, LogSink, Pipeline, Sink},
    flows::{Flows, FlowsSink},
    handles::{ConfigView, Handles},
    installer::{ClusterState, Initial, Installer, InstallerConfig, RESCAN_INTERVAL},
    linkwatch::LinkEvents,
    metrics::{self, Metrics},
    paths::PinLayout,
    persist::{PolicyStore, StartChoice},
    reader::{FillSampler, Reader},
    recorder::{QueuedStdout, Recorder, RecorderConfig},
};

pub use crate::installer::map_large_buffers_apart;

/// Where the policy comes from.
pub enum PolicySource {
    /// `--policy FILE`.
    File(PathBuf),
    /// `--kubernetes`: the cluster's Policy objects, and pods for selectors.
    Kubernetes(KubeSettings),
}

pub struct AgentConfig {
    pub installer: InstallerConfig,
    pub source: PolicySource,
    pub socket: PathBuf,
    /// Where the agent keeps what must survive it (the flow inventory). None: nothing is kept.
    pub state_dir: Option<PathBuf>,
    /// `/metrics`, `/healthz` and `/readyz`; None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// The audit log, if one is written.
    pub audit: Option<AuditSettings>,
    /// This node's name, in audit records.
    pub node: String,
    /// Authentication of identity pairs (`--svid-dir`); None: this node holds no SVIDs, and
    /// flows of rules that require authentication are refused.
    pub auth: Option<crate::auth::manager::AuthSettings>,
}

pub struct AuditSettings {
    pub log: AuditConfig,
    pub checkpoint_interval: Duration,
}

/// Removes the control socket file when dropped, so a failed start or a stop leaves none.
struct SocketFile<'a>(&'a Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// How long the sinks get to flush (the audit log's last checkpoint, the inventory) at stop.
const STOP_FLUSH: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<()> {
    let socket = config.socket.clone();
    // Bind first: a second agent on the same socket or metrics address fails before touching
    // any datapath.
    let listener = api::bind(&socket).await?;
    let _socket_file = SocketFile(&socket);
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    // The audit log opens before the datapath is touched too: a log that cannot be written is
    // a configuration error to fix, not something to find out later.
    let audit = match config.audit {
        Some(settings) => {
            let destination = settings
                .log
                .path
                .as_ref()
                .map_or("stdout".to_owned(), |p| p.display().to_string());
            let destination = if settings.log.stdout && settings.log.path.is_some() {
                format!("{destination} and stdout")
            } else {
                destination
            };
            let head_file = settings
                .log
                .path
                .as_ref()
                .and(config.state_dir.as_ref())
                .map(|d| d.join("audit-head.json"));
            let (log, stdout_dropped) = if settings.log.stdout {
                let stdout = QueuedStdout::spawn().context("starting the audit stdout writer")?;
                let dropped = stdout.dropped();
                (
                    AuditLog::open_with_stdout(settings.log, Box::new(stdout)),
                    Some(dropped),
                )
            } else {
                (AuditLog::open(settings.log), None)
            };
            let log = log.context("opening the audit log")?;
            Some(Recorder::new(
                log,
                RecorderConfig {
                    checkpoint_interval: settings.checkpoint_interval,
                    destination,
                    head_file,
                },
                stdout_dropped,
            ))
        }
        None => None,
    };
    let flows = Flows::open(config.state_dir.as_deref())?;

    let (control_tx, control_rx) = mpsc::unbounded_channel();
    // First in the audit log, before the policy the start installs.
    let _ = control_tx.send(Input::Control(Control::AgentStart {
        version: env!("CARGO_PKG_VERSION"),
        bpffs: config.installer.bpffs.display().to_string(),
        interfaces: config.installer.selector.as_str().to_string(),
    }));
    let mut file_mode = None;
    let mut pod_nodes = None;
    let (initial, cluster, kube) = match &config.source {
        PolicySource::File(path) => {
            let (policy, file_digest, source) = start_policy(
                path,
                config.state_dir.as_deref().map(PolicyStore::new).as_ref(),
            )?;
            file_mode = Some((path.clone(), file_digest, source));
            (Initial::Policy(policy), None, None)
        }
        PolicySource::Kubernetes(settings) => {
            // A kubeconfig that cannot be used is a configuration error now; an API server
            // that does not answer is not (the watchers retry, the pinned state enforces).
            let client = cluster::watch::client(settings).await?;
            let status = SharedStatus::default();
            let fallback = crate::policy::parse_policy_owned(
                cluster::merge::merge(&[], &[], None).text,
                "kubernetes",
            )
            .context("the deny-all policy")?;
            let state = ClusterState::new(config.node.clone(), status.clone());
            pod_nodes = Some(state.pod_nodes.subscribe());
            (
                Initial::KeepPinned { fallback },
                Some(state),
                Some((client, status, settings.trust_domain.clone())),
            )
        }
    };
    let layout = PinLayout::new(&config.installer.bpffs);
    let (applied_tx, mut applied_rx) = mpsc::unbounded_channel();
    let installer_config = config.installer.clone();
    let mut installer = tokio::task::block_in_place(|| {
        Installer::start(installer_config, initial, Some(applied_tx), cluster)
    })?;
    if let (Some((_, file_digest, source)), Some(dir)) = (&file_mode, &config.state_dir) {
        installer.save_policies(PolicyStore::new(dir), file_digest.clone(), source);
    }
    let (installer, _installer_thread) = installer.spawn()?;
    let follow = file_mode.map(|(path, file_digest, _)| {
        tokio::spawn(crate::follow::follow_file(
            path,
            installer.clone(),
            file_digest,
        ))
    });
    let cluster_status = kube.as_ref().map(|(_, status, _)| status.clone());
    let watchers = kube.map(|(client, status, trust_domain)| {
        tokio::spawn(cluster::watch::run(
            client,
            installer.clone(),
            status,
            trust_domain,
        ))
    });
    {
        // Policies that went live, for the audit log, in order.
        let control = control_tx.clone();
        tokio::spawn(async move {
            while let Some(a) = applied_rx.recv().await {
                if control.send(Input::Control(Control::Policy(a))).is_err() {
                    return;
                }
            }
        });
    }

    let auth = match config.auth.clone() {
        Some(settings) => Some(
            crate::auth::manager::start(
                settings,
                &layout,
                installer.clone(),
                control_tx.clone(),
                pod_nodes,
            )
            .await?,
        ),
        None => None,
    };
    let reader = Arc::new(Reader::open(&layout)?);
    let fill = FillSampler::spawn(reader.clone());
    let metrics = Metrics::new(
        matches!(config.source, PolicySource::Kubernetes(_)),
        auth.is_some(),
    )?;
    let events = Arc::new(EventStats::default());
    let (recorder, audit_stats) = match audit {
        Some((r, stats)) => (Some(r), Some(stats)),
        None => (None, None),
    };
    let handles = Handles {
        installer: installer.clone(),
        reader,
        fill,
        events: events.clone(),
        flows: flows.clone(),
        audit: audit_stats,
        ready: Arc::new(AtomicBool::new(false)),
        cluster: cluster_status,
        auth: auth.as_ref().map(|a| a.stats.clone()),
        config: Arc::new(ConfigView {
            bpffs: config.installer.bpffs.display().to_string(),
            interfaces_selector: config.installer.selector.as_str().to_string(),
        }),
    };

    let mut sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(LogSink),
        Box::new(metrics.sink()),
        Box::new(FlowsSink::new(flows)),
    ];
    if let Some(a) = &auth {
        sinks.push(Box::new(crate::auth::AuthSink::new(a.demand.clone())));
    }
    if let Some(mut r) = recorder {
        r.check_remembered_head();
        let reader = handles.reader.clone();
        r.set_events_lost(Box::new(move || {
            reader.counters().map_or(0, |c| {
                c[tollgate_common::verdict::COUNTER_EVENTS_LOST as usize]
            })
        }));
        sinks.push(Box::new(r));
    }
    // The pipeline writes files (the audit log, the inventory) with blocking calls: it gets a
    // thread and a runtime of its own, so a slow disk never holds up the control socket.
    let pipeline = Pipeline {
        installed: installer.watch(),
        sinks,
        stats: events,
        input: control_rx,
        aggregate_interval: aggregate::INTERVAL,
    };
    let pipeline_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event pipeline's runtime")?;
    let _pipeline_thread = std::thread::Builder::new()
        .name("tollgate-events".into())
        .spawn(move || pipeline_runtime.block_on(pipeline.run(layout)))
        .context("starting the event pipeline thread")?;
    let server = tokio::spawn(api::serve(
        listener,
        api::router(handles.clone()),
        socket.clone(),
    ));
    let metrics_server =
        metrics_listener.map(|l| tokio::spawn(metrics::serve(l, metrics.clone(), handles.clone())));
    let rescan = spawn_rescan(installer.clone());
    handles
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(socket = %socket.display(), metrics = ?config.metrics_addr, "agent ready");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("stopping; the pinned datapath keeps enforcing the last policy");
    handles
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    server.abort();
    rescan.abort();
    if let Some(w) = watchers {
        w.abort();
    }
    if let Some(f) = follow {
        f.abort();
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    if control_tx
        .send(Input::Stop {
            reason: reason.to_owned(),
            done: done_tx,
        })
        .is_ok()
        && tokio::time::timeout(STOP_FLUSH, done_rx).await.is_err()
    {
        tracing::warn!("the event sinks did not flush within {STOP_FLUSH:?}");
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    Ok(())
}

/// File mode: the policy to enforce at start (see `persist`): the `--policy` file, or the
/// policy saved in the state directory when the file is unchanged since it was saved. Returns
/// it with the file's digest and what it is (`start`: the file; `saved`: the saved one).
fn start_policy(
    path: &Path,
    store: Option<&PolicyStore>,
) -> Result<(crate::policy::Policy, String, &'static str)> {
    let text = crate::policy::read_policy_text(path)?;
    let file_digest = crate::persist::digest(&text);
    let saved = match store.map(PolicyStore::load).transpose() {
        Ok(saved) => saved.flatten(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the saved policy cannot be read; set aside, the policy file decides");
            if let Some(s) = store {
                s.set_aside();
            }
            None
        }
    };
    if let StartChoice::Saved(saved) = crate::persist::choose(&text, saved) {
        let store_path = store
            .map(|s| s.path().display().to_string())
            .unwrap_or_default();
        match crate::policy::parse_policy_owned(saved.text, &store_path)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                crate::installer::refuse_selectors(&p)
                    .map(|()| p)
                    .map_err(|e| e.to_string())
            }) {
            Ok(policy) => {
                tracing::info!(
                    policy = %policy.name,
                    saved_at = %saved.saved_at,
                    source = %saved.source,
                    "the policy file is unchanged since a later policy went live; enforcing that one (saved in the state directory)"
                );
                return Ok((policy, file_digest, "saved"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the saved policy no longer validates; set aside, the policy file decides");
                if let Some(s) = store {
                    s.set_aside();
                }
            }
        }
    }
    let policy = crate::policy::parse_policy_owned(text, &path.display().to_string())?;
    crate::installer::refuse_selectors(&policy)?;
    Ok((policy, file_digest, "start"))
}

/// Asks the installer for a rescan every second and whenever a link changes. Link
/// notifications make a new interface enforced at once; the periodic rescan stays, for what
/// netlink does not announce (a link pin removed behind the agent's back) and in case the
/// socket cannot be had.
fn spawn_rescan(installer: crate::installer::InstallerHandle) -> tokio::task::JoinHandle<()> {
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
            installer.rescan();
        }
    })
}

/// This machine's host name, the default node name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
