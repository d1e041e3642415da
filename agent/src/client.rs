//! The CLI's side of the control socket: one HTTP/1 request per call over the unix socket. A
//! timeout bounds each call as a whole (connect, request, answer), so a stuck or overloaded
//! agent makes the CLI fail with a message instead of hanging it.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::wire::ErrorResponse;

/// Why a call failed. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {} ({error}); is `tollgate agent` running? (--socket or \
         TOLLGATE_SOCKET)",
        .socket.display()
    )]
    Unreachable { socket: PathBuf, error: io::Error },
    #[error(
        "no answer from the agent at {} within {} (--timeout or TOLLGATE_TIMEOUT)",
        .socket.display(),
        humantime::format_duration(*.timeout)
    )]
    TimedOut { socket: PathBuf, timeout: Duration },
    #[error("control socket handshake")]
    Handshake(#[source] hyper::Error),
    #[error(
        "the agent closed the connection without answering: every control connection may be \
         busy (at most 128), or this user is not the agent's"
    )]
    Closed(#[source] hyper::Error),
    #[error("reading the agent's answer")]
    Answer(#[source] hyper::Error),
    /// The agent refused the request; `message` is its own one-line explanation.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
    #[error("decoding the agent's answer")]
    Decode(#[source] serde_json::Error),
    #[error("encoding the request")]
    Encode(#[source] serde_json::Error),
    #[error("building the request")]
    Request(#[source] hyper::http::Error),
}

pub struct Client<'a> {
    socket: &'a Path,
    timeout: Duration,
}

impl<'a> Client<'a> {
    /// A client of the agent at `socket`; each call fails with [`ClientError::TimedOut`] when
    /// it takes longer than `timeout`.
    pub fn new(socket: &'a Path, timeout: Duration) -> Self {
        Self { socket, timeout }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Bytes::new(), "text/plain")
            .await
    }

    pub async fn put_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Bytes::from(body), "text/yaml")
            .await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        self.call(Method::POST, path, Bytes::from(body), "application/json")
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(
            self.timeout,
            self.call_unbounded(method, path, body, content_type),
        )
        .await
        .map_err(|_| ClientError::TimedOut {
            socket: self.socket.to_owned(),
            timeout: self.timeout,
        })?
    }

    async fn call_unbounded<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<T, ClientError> {
        let stream =
            UnixStream::connect(self.socket)
                .await
                .map_err(|error| ClientError::Unreachable {
                    socket: self.socket.to_owned(),
                    error,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Handshake)?;
        // Ends with the connection, or with the runtime when the call times out.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tollgate")
            .header("content-type", content_type)
            .body(Full::new(body))
            .map_err(ClientError::Request)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(ClientError::Closed)?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Answer)?
            .to_bytes();
        if !status.is_success() {
            let message = match serde_json::from_slice::<ErrorResponse>(&bytes) {
                Ok(e) => e.error,
                Err(_) => format!(
                    "agent answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            };
            return Err(ClientError::Refused { status, message });
        }
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn a_silent_agent_times_out_naming_socket_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        // Accepts and never answers.
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let started = Instant::now();
        let err = Client::new(&socket, Duration::from_millis(300))
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, ClientError::TimedOut { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "no answer from the agent at {} within 300ms (--timeout or TOLLGATE_TIMEOUT)",
                socket.display()
            )
        );
    }

    #[tokio::test]
    async fn a_missing_agent_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let err = Client::new(&socket, Duration::from_secs(5))
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot reach the agent at {} (", socket.display())),
            "{err}"
        );
    }
}
