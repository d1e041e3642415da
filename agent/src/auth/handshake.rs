//! Both ends of one handshake. The client connects to the peer agent's auth listener, presents
//! the SVID of the pair member its node hosts and asks (by SNI) for the other member's; both
//! certificates are checked by the SPIFFE verifier (`identity::verify`) inside TLS 1.3; then
//! the client names the pair and the server answers with the proof's expiry. What the server
//! may grant is decided by the auth manager ([`GrantRequest`]), which knows the policy and the
//! node's SVIDs; this module only moves bytes and certificates, under a deadline.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::pki_types::CertificateDer;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{mpsc, oneshot},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::protocol::{read_message, write_message, Answer, Request, VERSION};
use crate::identity::{
    client_config,
    verify::{accepted_chain, io_reason, server_name, SharedBundles},
    SpiffeId, Svid, VerifiedSvid, VerifyError,
};

/// Why a handshake did not prove the pair.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake failed; with the verifier's reason when a certificate was refused.
    #[error("TLS: {0}")]
    Tls(String, Option<VerifyError>),
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("{0}")]
    Protocol(String),
    /// This node holds no (valid) SVID for either identity of the pair.
    #[error("{0}")]
    NoSvid(String),
}

impl HandshakeError {
    /// The `result` label of `tollgate_auth_handshakes_total`: a verifier reason's code when
    /// a certificate was refused.
    pub fn result(&self) -> &'static str {
        match self {
            HandshakeError::Connect(..) => "connect_failed",
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Tls(_, Some(reason)) => reason.code(),
            HandshakeError::Tls(_, None) => "tls_failed",
            HandshakeError::Refused(_) => "refused",
            HandshakeError::Protocol(_) => "protocol_error",
            HandshakeError::NoSvid(_) => "no_svid",
        }
    }

    fn tls(e: std::io::Error) -> Self {
        let reason = io_reason(&e);
        let text = match &reason {
            Some(r) => r.to_string(),
            None => e.to_string(),
        };
        HandshakeError::Tls(text, reason)
    }
}

/// What the client learnt from a successful handshake.
#[derive(Debug)]
pub struct ClientProof {
    pub peer: VerifiedSvid,
    pub peer_chain: Vec<CertificateDer<'static>>,
    pub answer: Answer,
}

/// Runs the client side against `to`: presents `local`, accepts only `peer`, asks for the pair
/// (`src`, `dst`). The whole exchange must finish within `deadline`.
pub async fn initiate(
    to: SocketAddr,
    local: &Svid,
    peer: &SpiffeId,
    pair: (&SpiffeId, &SpiffeId),
    node: &str,
    bundles: SharedBundles,
    deadline: Duration,
) -> Result<ClientProof, HandshakeError> {
    initiate_from(None, to, local, peer, pair, node, bundles, deadline).await
}

/// [`initiate`] from the local address `from` (the node's auth address: the peer checks that
/// a client of an identity connects from that identity's node).
#[expect(
    clippy::too_many_arguments,
    reason = "one handshake's whole description"
)]
pub async fn initiate_from(
    from: Option<std::net::IpAddr>,
    to: SocketAddr,
    local: &Svid,
    peer: &SpiffeId,
    (src, dst): (&SpiffeId, &SpiffeId),
    node: &str,
    bundles: SharedBundles,
    deadline: Duration,
) -> Result<ClientProof, HandshakeError> {
    let request = Request {
        version: VERSION,
        src: src.to_string(),
        dst: dst.to_string(),
        node: node.to_owned(),
    };
    let work = async {
        let tcp = connect(from, to)
            .await
            .map_err(|e| HandshakeError::Connect(to, e))?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(client_config(local, peer.clone(), bundles.clone()));
        let mut tls = connector
            .connect(server_name(peer), tcp)
            .await
            .map_err(HandshakeError::tls)?;
        let peer_chain: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        // The verifier accepted the chain during the handshake; this reads what it proved.
        let verified =
            accepted_chain(&peer_chain).map_err(|e| HandshakeError::Tls(e.to_string(), Some(e)))?;
        write_message(&mut tls, &request)
            .await
            .map_err(|e| tls_or_protocol(e, "sending the request"))?;
        let answer: Answer = read_message(&mut tls)
            .await
            .map_err(|e| tls_or_protocol(e, "reading the answer"))?;
        let _ = tls.shutdown().await;
        if !answer.ok {
            return Err(HandshakeError::Refused(
                answer
                    .reason
                    .unwrap_or_else(|| "no reason given".to_owned()),
            ));
        }
        Ok(ClientProof {
            peer: verified,
            peer_chain,
            answer,
        })
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(deadline)),
    }
}

async fn connect(from: Option<std::net::IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(from) = from.filter(|f| f.is_ipv4() == to.is_ipv4()) else {
        return TcpStream::connect(to).await;
    };
    let socket = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// An I/O failure after the handshake: the server refusing our certificate shows up here (TLS
/// 1.3 clients finish before the server has checked them), so look for a verifier reason first.
fn tls_or_protocol(e: anyhow::Error, doing: &str) -> HandshakeError {
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                let reason = io_reason(io);
                return HandshakeError::Tls(
                    reason
                        .as_ref()
                        .map_or_else(|| io.to_string(), |r| r.to_string()),
                    reason,
                );
            }
        }
    }
    HandshakeError::Protocol(format!("{doing}: {e:#}"))
}

/// The server's question to the auth manager: may this verified client have this pair proven,
/// given the SVID the client asked this node to present (`sni`)? Answered with the expiry the
/// manager wrote, or the reason it refused.
#[derive(Debug)]
pub struct GrantRequest {
    pub request: Request,
    pub client: VerifiedSvid,
    pub client_chain: Vec<CertificateDer<'static>>,
    pub sni: Option<String>,
    pub peer_addr: SocketAddr,
    pub reply: oneshot::Sender<Result<std::time::SystemTime, String>>,
}

/// Serves one accepted connection: TLS (the client's SVID is verified there), the request, the
/// manager's answer, all within `deadline`. Returns the client's SPIFFE ID on success.
pub async fn serve_connection(
    stream: TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    grants: mpsc::Sender<GrantRequest>,
    node: String,
    deadline: Duration,
) -> Result<SpiffeId, HandshakeError> {
    let work = async {
        let _ = stream.set_nodelay(true);
        // A peer gets a short while for the TLS handshake itself: one that connects and says
        // nothing gives its slot back soon.
        let mut tls = tokio::time::timeout(ACCEPT_DEADLINE, acceptor.accept(stream))
            .await
            .map_err(|_| HandshakeError::Timeout(ACCEPT_DEADLINE))?
            .map_err(HandshakeError::tls)?;
        let (chain, sni) = {
            let conn = tls.get_ref().1;
            let chain: Vec<CertificateDer<'static>> = conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            (chain, conn.server_name().map(str::to_owned))
        };
        // The verifier accepted the chain during the handshake; this reads what it proved.
        let client =
            accepted_chain(&chain).map_err(|e| HandshakeError::Tls(e.to_string(), Some(e)))?;
        let request: Request = read_message(&mut tls)
            .await
            .map_err(|e| tls_or_protocol(e, "reading the request"))?;
        let refuse = |reason: String| Answer {
            ok: false,
            expires_unix_ms: None,
            reason: Some(reason),
            node: node.clone(),
        };
        let (answer, result) = if request.version != VERSION {
            let why = format!("exchange version {} is not {VERSION}", request.version);
            (refuse(why.clone()), Err(HandshakeError::Refused(why)))
        } else {
            let (reply, answered) = oneshot::channel();
            let asked = grants
                .send(GrantRequest {
                    request,
                    client: client.clone(),
                    client_chain: chain,
                    sni,
                    peer_addr,
                    reply,
                })
                .await;
            match (asked, answered.await) {
                (Ok(()), Ok(Ok(until))) => (
                    Answer {
                        ok: true,
                        expires_unix_ms: Some(
                            until
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as u64),
                        ),
                        reason: None,
                        node: node.clone(),
                    },
                    Ok(client.id.clone()),
                ),
                (Ok(()), Ok(Err(why))) => (refuse(why.clone()), Err(HandshakeError::Refused(why))),
                _ => {
                    let why = "the agent is stopping".to_owned();
                    (refuse(why.clone()), Err(HandshakeError::Refused(why)))
                }
            }
        };
        write_message(&mut tls, &answer)
            .await
            .map_err(|e| tls_or_protocol(e, "sending the answer"))?;
        let _ = tls.shutdown().await;
        result
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(deadline)),
    }
}

/// How long a connection may take to complete the TLS handshake on the server side.
pub const ACCEPT_DEADLINE: Duration = Duration::from_secs(2);

/// A TLS acceptor for the auth listener.
pub fn acceptor(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}
