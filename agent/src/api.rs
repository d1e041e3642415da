//! The control socket: HTTP/JSON over a unix socket, created 0600, every connection's peer uid
//! checked with SO_PEERCRED. The wire types are in `wire`, shared with the CLI client.
//!
//! The socket must keep answering however its clients behave: a failing accept (EMFILE) backs
//! off instead of spinning, at most [`ServeConfig::max_connections`] are served at once with
//! idle ones closed first to make room (see `connections.rs`), a connection gets
//! [`ServeConfig::header_read_timeout`] to send its request head and
//! [`ServeConfig::request_timeout`] for the rest, and carries one request (the CLI sends one).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use axum::{
    extract::{FromRequest, Query, State},
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
use serde::Deserialize;
use tokio::net::UnixListener;

use crate::{
    connections::{Connections, LogThrottle, Tracked},
    error::Error,
    handles::Handles,
    policy::{too_large_message, MAX_POLICY_BYTES},
    wire::{
        CheckRequest, CheckResponse, ErrorResponse, FlowsResponse, InventoryResponse,
        PolicyResponse, StatusResponse, PATH_CHECK, PATH_FLOWS, PATH_INVENTORY, PATH_POLICY,
        PATH_STATUS,
    },
};

/// An error answered to the client: status code and one-line message.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { error: self.1 })).into_response()
    }
}

/// The one place where the agent's errors become HTTP status codes.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::InvalidPolicy(_) => StatusCode::BAD_REQUEST,
            Error::NotInstalled(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

pub fn router(handles: Handles) -> Router {
    Router::new()
        .route(PATH_STATUS, get(status))
        .route(PATH_POLICY, get(policy_get).put(policy_apply))
        .route(PATH_CHECK, post(check))
        .route(PATH_FLOWS, get(flows))
        .route(PATH_INVENTORY, get(inventory))
        .with_state(handles)
}

async fn status(State(h): State<Handles>) -> Result<Json<StatusResponse>, Error> {
    Ok(Json(crate::status::status(&h)?))
}

async fn policy_get(State(h): State<Handles>) -> Json<PolicyResponse> {
    let installed = h.installer.installed();
    Json(PolicyResponse {
        name: installed.policy.name.clone(),
        generation: installed.generation,
        rules: installed.policy.rules,
        text: installed.policy.source_text.clone(),
    })
}

async fn policy_apply(
    State(h): State<Handles>,
    PolicyText(body): PolicyText,
) -> Result<Json<PolicyResponse>, Error> {
    Ok(Json(h.installer.apply(body).await?))
}

async fn check(
    State(h): State<Handles>,
    Json(req): Json<CheckRequest>,
) -> Result<Json<CheckResponse>, Error> {
    Ok(Json(h.installer.check(req).await?))
}

/// `GET /v1/flows`: recent decisions after `after`, long-polling up to `wait_ms`.
#[derive(Debug, Deserialize)]
struct FlowsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
    #[serde(default)]
    denied: bool,
    identity: Option<String>,
    limit: Option<usize>,
}

async fn flows(
    State(h): State<Handles>,
    Query(q): Query<FlowsQuery>,
) -> Result<Json<FlowsResponse>, Error> {
    if let Some(name) = &q.identity {
        let installed = h.installer.installed();
        let known = installed
            .live_names()
            .identity_names
            .iter()
            .any(|(_, n)| n == name);
        if !known {
            return Err(Error::NotFound(format!(
                "no identity named {name:?} in the live policy {:?}",
                installed.policy.name
            )));
        }
    }
    let identity = q.identity.clone();
    let denied = q.denied;
    let answer = h
        .flows
        .after(
            q.after,
            Duration::from_millis(q.wait_ms),
            q.limit.unwrap_or(crate::flows::MAX_PAGE),
            move |r| {
                (!denied || r.outcome != "allow")
                    && identity
                        .as_ref()
                        .is_none_or(|n| &r.from_identity == n || &r.to_identity == n)
            },
        )
        .await;
    Ok(Json(answer))
}

async fn inventory(State(h): State<Handles>) -> Json<InventoryResponse> {
    Json(InventoryResponse {
        edges: h.flows.inventory(),
        path: h.flows.inventory_path().map(|p| p.display().to_string()),
    })
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

/// A listener [`serve_with`] can serve: the control socket, or the metrics address.
pub trait Listener {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
    /// Whether this peer may be served; refused connections are closed before a byte is read.
    fn admits(&self, stream: &Self::Stream) -> bool;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept(&self) -> std::io::Result<Self::Stream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }

    /// Only the agent's own effective uid.
    fn admits(&self, stream: &Self::Stream) -> bool {
        // SAFETY: geteuid cannot fail.
        let allowed_uid = unsafe { libc::geteuid() };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == allowed_uid => true,
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "refused control connection from another uid"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; refusing connection");
                false
            }
        }
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }

    fn admits(&self, _stream: &Self::Stream) -> bool {
        true
    }
}

/// Serves `router` on `listener` until the task is dropped, within `config`'s limits (see the
/// module documentation). `socket` names the listener in log lines.
pub async fn serve_with<L: Listener>(
    listener: L,
    router: Router,
    socket: PathBuf,
    config: ServeConfig,
) {
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
            Ok(stream) => stream,
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
        if !listener.admits(&stream) {
            continue;
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
