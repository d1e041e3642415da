//! The control socket: HTTP/JSON over a unix socket, created 0600, every connection's peer uid
//! checked with SO_PEERCRED. The wire types here are shared by the server and the CLI client.

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};
use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::{app::Agent, datapath::MapUsage, loader::Attachment};

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
    body: String,
) -> Result<Json<PolicyResponse>, ApiError> {
    blocking(move || agent.apply_text(&body).map(Json)).await
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

/// Serves `router` on `listener` until the task is dropped. Connections from any uid other than
/// the agent's own effective uid are closed before a byte is read.
pub async fn serve(listener: UnixListener, router: Router, socket: PathBuf) {
    // SAFETY: geteuid cannot fail.
    let allowed_uid = unsafe { libc::geteuid() };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on control socket failed");
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
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
