//! The CLI's side of the control socket: one HTTP/1 request per call over the unix socket.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::ErrorResponse;

pub struct Client<'a> {
    socket: &'a Path,
}

impl<'a> Client<'a> {
    pub fn new(socket: &'a Path) -> Self {
        Self { socket }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, Bytes::new(), "text/plain")
            .await
    }

    pub async fn put_text<T: DeserializeOwned>(&self, path: &str, body: String) -> Result<T> {
        self.call(Method::PUT, path, Bytes::from(body), "text/yaml")
            .await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T> {
        let body = serde_json::to_vec(body)?;
        self.call(Method::POST, path, Bytes::from(body), "application/json")
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<T> {
        let stream = UnixStream::connect(self.socket).await.map_err(|e| {
            anyhow!(
                "cannot reach the agent at {} ({e}); is `tollgate agent` running? (--socket or TOLLGATE_SOCKET)",
                self.socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("control socket handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tollgate")
            .header("content-type", content_type)
            .body(Full::new(body))?;
        let resp = sender
            .send_request(req)
            .await
            .context("the agent closed the connection (is this user allowed on the socket?)")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<ErrorResponse>(&bytes) {
                bail!("{}", e.error);
            }
            bail!(
                "agent answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            );
        }
        serde_json::from_slice(&bytes).context("decoding the agent's answer")
    }
}
