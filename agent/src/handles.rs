//! What the control socket and the metrics endpoint read: a handle on each subsystem, each
//! owned elsewhere (the installer, the event pipeline, the fill sampler). Cloning is cheap.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::watch;

use crate::{
    events::EventStats,
    flows::Flows,
    installer::InstallerHandle,
    reader::{Fill, Reader},
    recorder::AuditStats,
};

#[derive(Clone)]
pub struct Handles {
    pub installer: InstallerHandle,
    pub reader: Arc<Reader>,
    pub fill: watch::Receiver<Arc<Fill>>,
    pub events: Arc<EventStats>,
    pub flows: Flows,
    pub audit: Option<Arc<AuditStats>>,
    /// Set once the datapath is installed and attached, the event reader runs and the control
    /// socket serves: what `/readyz` answers.
    pub ready: Arc<AtomicBool>,
    /// Kubernetes mode: the watchers' and the membership's status.
    pub cluster: Option<crate::cluster::SharedStatus>,
    /// Authentication, when the agent holds SVIDs (`--svid-dir`).
    pub auth: Option<Arc<crate::auth::stats::AuthStats>>,
    /// What `status` shows of the configuration.
    pub config: Arc<ConfigView>,
}

/// The parts of the configuration `status` shows.
#[derive(Debug, Default)]
pub struct ConfigView {
    pub bpffs: String,
    pub interfaces_selector: String,
}

impl Handles {
    /// Started and healthy; in Kubernetes mode also synced with the API server once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self.is_healthy()
            && self
                .cluster
                .as_ref()
                .is_none_or(|s| s.lock().is_ok_and(|s| s.synced))
    }

    /// The installer takes commands and the event reader runs.
    pub fn is_healthy(&self) -> bool {
        self.installer.is_running() && self.events.running.load(Ordering::Relaxed)
    }
}
