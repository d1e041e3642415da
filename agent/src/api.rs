//! The control socket: HTTP/JSON over a unix socket, created 0600, every connection's peer uid
//! checked with SO_PEERCRED. The wire types here are shared by the server and the CLI client.
//!
//! The socket must keep answering however its clients behave: a failing accept (EMFILE) backs
//! off instead of spinning, at most [`ServeConfig::max_connections`] are served at once with
//! idle ones closed first to make room (see `connections.rs`), a connection gets
//! [`ServeConfig::header_read_timeout`] to send its request head and
//! [`ServeConfig::request_timeout`] for the rest, and carries one request (the CLI sends one).

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use axum::{
    extract::{FromRequest, State},
    http::{header::CONTENT_LENGTH, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use http_body_util::BodyExt as _;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::{
    app::Agent,
    connections::{Connections, LogThrottle, Tracked},
    datapath::MapUsage,
    loader::Attachment,
    policy::{too_large_message, MAX_POLICY_BYTES},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub version: String,
    pub bpffs: String,
    pub interfaces_selector: String,
    pub attachments: Vec<Attachment>,
    pub policy_name: String,
    pub generation: u64,
    pub rules: usize,
    pub identities: usize,
    pub map_usage: MapUsage,
    pub conntrack_entries: usize,
    /// Packet counters by verdict name, summed over CPUs since the maps were created.
    pub verdicts: Vec<(String, u64)>,
    pub events_lost: u64,
    pub events_read: u64,
    /// Deny events the datapath's sampler held back (counted exactly; packets are counted in
    /// `verdicts` either way).
    #[serde(default)]
    pub events_suppressed: u64,
    /// Every map of the datapath (from the registry in `tollgate_common::maps`): capacity as
    /// created, and entries of the live policy slot for policy maps.
    #[serde(default)]
    pub maps: Vec<MapStatus>,
    /// The rate limits of the live policy, with their drops.
    #[serde(default)]
    pub limits: Vec<LimitStatus>,
    /// Enforced interfaces: role (uplink or workload-facing) and binding.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
    /// Links found unpinned or detached and attached again since the agent started.
    #[serde(default)]
    pub links_restored: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub what: String,
    /// Entries (ring buffer: bytes) the map was created with.
    pub capacity: u32,
    /// Entries in use where that is cheap to know (policy maps, live slot), else `None`.
    pub entries: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// `uplink` (no source validation) or `workload`.
    pub role: String,
    /// The identity the interface is bound to, if any.
    pub bound_identity: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyResponse {
    pub name: String,
    pub generation: u64,
    pub rules: usize,
    /// The policy as applied (YAML text).
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckRequest {
    pub from: IpAddr,
    pub to: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// The enforced interface the packet arrives on: its source is then validated as there
    /// (reverse path, binding). None: source validation is not part of the answer.
    #[serde(default)]
    pub interface: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckResponse {
    /// Verdict name (`allow_new`, `deny_default`, `deny_expired`, `audit_would_deny`).
    pub verdict: String,
    /// Would the packet pass?
    pub allowed: bool,
    /// The rule that decided, or `default-deny`.
    pub rule: String,
    pub from_identity: String,
    pub to_identity: String,
    pub generation: u64,
    /// The rate limits an admitted flow would be metered by: the rule's, the source identity's
    /// quota (the flow's packets), the destination identity's quota (its replies).
    #[serde(default)]
    pub limits: Vec<CheckLimit>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckLimit {
    /// "rule login", "identity frontend".
    pub owner: String,
    /// What it meters of this flow: "new connections and packets", "packets from frontend",
    /// "replies from backend".
    pub applies_to: String,
    /// The rates ("5 connections/min (burst 5)").
    pub limit: String,
    /// `enforce` or `audit` (over the rate: would-drops, passed).
    pub mode: String,
}

/// One rate limit of the live policy and what it has dropped (`status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitStatus {
    pub owner: String,
    pub limit: String,
    pub mode: String,
    /// Packets dropped by the packet and byte limits, connections refused, since the limit was
    /// made (a changed limit starts again).
    pub dropped_packets: u64,
    pub dropped_bytes_limit: u64,
    pub refused_connections: u64,
    /// The same, passed in audit mode.
    pub would_drop_packets: u64,
    pub would_drop_bytes_limit: u64,
    pub would_refuse_connections: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// An error answered to the client: status code and one-line message.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { error: self.1 })).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_POLICY: &str = "/v1/policy";
pub const PATH_CHECK: &str = "/v1/check";

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(PATH_STATUS, get(status))
        .route(PATH_POLICY, get(policy_get).put(policy_apply))
        .route(PATH_CHECK, post(check))
        .with_state(agent)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn status(State(agent): State<Arc<Agent>>) -> Result<Json<StatusResponse>, ApiError> {
    blocking(move || Ok(Json(agent.status()?))).await
}

async fn policy_get(State(agent): State<Arc<Agent>>) -> Result<Json<PolicyResponse>, ApiError> {
    blocking(move || Ok(Json(agent.policy()?))).await
}

async fn policy_apply(
    State(agent): State<Arc<Agent>>,
    PolicyText(body): PolicyText,
) -> Result<Json<PolicyResponse>, ApiError> {
    blocking(move || agent.apply_text(body).map(Json)).await
}

/// The body of `PUT /v1/policy`: UTF-8 text of at most [`MAX_POLICY_BYTES`]. axum's `String`
/// extractor stops at 2 MB, below what a 100k-rule policy needs, and answers in plain text.
pub struct PolicyText(pub String);

/// How much of an oversized body is read (and thrown away) before answering 413: a client
/// still writing its body gets the answer rather than a broken pipe. Beyond this the answer
/// goes out at once and the connection closes.
const OVERSIZED_BODY_DRAINED: usize = 2 * MAX_POLICY_BYTES;

impl<S: Send + Sync> FromRequest<S> for PolicyText {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _state: &S) -> Result<Self, ApiError> {
        let too_large = || {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{}; the agent accepts policies of up to {MAX_POLICY_BYTES} bytes",
                    too_large_message()
                ),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > OVERSIZED_BODY_DRAINED as u64) {
            return Err(too_large());
        }
        let capacity = declared.map_or(0, |n| n.min(MAX_POLICY_BYTES as u64) as usize);
        let mut text = Vec::with_capacity(capacity);
        let mut received = 0usize;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("reading the policy from the request: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            received += data.len();
            if received > OVERSIZED_BODY_DRAINED {
                break;
            }
            if received <= MAX_POLICY_BYTES {
                text.extend_from_slice(&data);
            }
        }
        if received > MAX_POLICY_BYTES {
            return Err(too_large());
        }
        String::from_utf8(text).map(PolicyText).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "the policy is not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            )
        })
    }
}

async fn check(
    State(agent): State<Arc<Agent>>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<CheckResponse>, ApiError> {
    blocking(move || agent.check(&req).map(Json)).await
}

/// Binds the control socket. A socket file left by a dead agent is replaced; one that a live
/// agent answers on is an error (two agents must use two sockets).
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another agent is listening on {}; give each agent its own --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Create the socket already 0600: no window in which another user could connect.
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Limits of the control socket. [`Default`] is what the agent runs with; tests shrink them.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Connections served at once. At the cap a newcomer closes the oldest connection that has
    /// no request in progress, or is closed itself when every connection has one.
    pub max_connections: usize,
    /// How long a new connection has to send its request line and headers.
    pub header_read_timeout: Duration,
    /// How long a request has after its headers (a slowly sent body included) to be answered.
    pub request_timeout: Duration,
    /// The pause after a failed accept: EMFILE leaves the connection queued, so without one
    /// the accept loop would spin at full speed.
    pub accept_backoff: Duration,
    /// At most one log line per interval for failed accepts, and one for refused connections.
    pub log_interval: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            // Far more than one node's operators and scripts use, far fewer than the agent's
            // open-file limit.
            max_connections: 128,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            accept_backoff: Duration::from_millis(100),
            log_interval: Duration::from_secs(5),
        }
    }
}

/// When accept runs out of file descriptors, this many idle connections are closed at once, so
/// that a backlog of queued connections (with a `status` somewhere behind them) drains in
/// batches rather than one descriptor per pause.
const DESCRIPTORS_FREED_AT_ONCE: usize = 16;

/// How long the accept loop waits for closed idle connections to give back their descriptors.
const DESCRIPTOR_RELEASE_WAIT: Duration = Duration::from_millis(5);

/// Serves `router` on `listener` with the default [`ServeConfig`] until the task is dropped.
pub async fn serve(listener: UnixListener, router: Router, socket: PathBuf) {
    serve_with(listener, router, socket, ServeConfig::default()).await
}

/// Serves `router` on `listener` until the task is dropped. Connections from any uid other than
/// the agent's own effective uid are closed before a byte is read.
pub async fn serve_with(
    listener: UnixListener,
    router: Router,
    socket: PathBuf,
    config: ServeConfig,
) {
    // SAFETY: geteuid cannot fail.
    let allowed_uid = unsafe { libc::geteuid() };
    let connections = Connections::new(config.max_connections);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(false);
    // A connection is dropped after this whatever it is doing, so that a client that sends a
    // request and never reads the answer cannot hold its place for ever; the answer gets as
    // long to go out as the head had to come in.
    let lifetime = config.header_read_timeout * 2 + config.request_timeout;
    let mut accept_errors = LogThrottle::new(config.log_interval);
    let mut refusals = LogThrottle::new(config.log_interval);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = accept_errors.event(Instant::now()) {
                    tracing::warn!(
                        error = %e,
                        suppressed,
                        socket = %socket.display(),
                        "accept on the control socket failed; retrying"
                    );
                }
                let mut pause = config.accept_backoff;
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                    && connections.close_oldest_idle(DESCRIPTORS_FREED_AT_ONCE) > 0
                {
                    // Idle connections' descriptors are worth more to the clients queued
                    // behind them; their tasks close them in a moment.
                    pause = pause.min(DESCRIPTOR_RELEASE_WAIT);
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == allowed_uid => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), socket = %socket.display(), "refused control connection from another uid");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; refusing connection");
                continue;
            }
        }
        let Some(mut admitted) = connections.admit() else {
            if let Some(suppressed) = refusals.event(Instant::now()) {
                tracing::warn!(
                    max_connections = config.max_connections,
                    suppressed,
                    socket = %socket.display(),
                    "closed a new control connection: every connection has a request in progress"
                );
            }
            continue; // dropping `stream` closes it
        };
        let service = Tracked {
            inner: TowerToHyperService::new(router.clone()),
            activity: admitted.activity.clone(),
            request_timeout: config.request_timeout,
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            // Each branch ends with the connection dropped, which closes the socket.
            tokio::select! {
                _ = connection => {}
                _ = &mut admitted.closed => {}
                _ = tokio::time::sleep(lifetime) => {}
            }
            drop(admitted);
        });
    }
}

#[cfg(test)]
mod tests;
