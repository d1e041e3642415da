//! The exchange inside the TLS stream, once both certificates are verified: the client names
//! the pair it wants proven, the server answers with the proof's expiry or why not. One JSON
//! object per line each way, at most [`MAX_MESSAGE`] bytes, so a peer cannot make an agent read
//! without end.

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The version of this exchange; a server answers another one with a refusal.
pub const VERSION: u32 = 1;
/// The longest message either side reads, newline included.
pub const MAX_MESSAGE: usize = 8 * 1024;

/// Client → server: prove the pair (`src`, `dst`). The client presented the SVID of one of
/// them, and asked (by SNI) for the server to present the other's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Request {
    pub version: u32,
    /// The rule's `from` identity's SPIFFE ID.
    pub src: String,
    /// The rule's `to` identity's SPIFFE ID.
    pub dst: String,
    /// The client's node, for the server's audit record.
    pub node: String,
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Answer {
    pub ok: bool,
    /// With `ok`: until when the server admits the pair (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// Without `ok`: why the pair was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The server's node, for the client's audit record.
    #[serde(default)]
    pub node: String,
}

/// Writes one message and its newline.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    message: &T,
) -> Result<()> {
    let mut line = serde_json::to_vec(message).context("encoding a message")?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE {
        bail!(
            "message of {} bytes is over the limit of {MAX_MESSAGE}",
            line.len()
        );
    }
    w.write_all(&line).await.context("sending")?;
    w.flush().await.context("sending")?;
    Ok(())
}

/// Reads one message: bytes up to the first newline, at most [`MAX_MESSAGE`].
pub async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T> {
    let mut buf = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    loop {
        let n = r.read(&mut byte).await.context("receiving")?;
        if n == 0 {
            bail!("the peer closed the connection before a whole message");
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
        if buf.len() >= MAX_MESSAGE {
            bail!("message longer than {MAX_MESSAGE} bytes");
        }
    }
    serde_json::from_slice(&buf).context("a malformed message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_goes_through_a_pipe_whole() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let sent = Request {
            version: VERSION,
            src: "spiffe://t.test/a".into(),
            dst: "spiffe://t.test/b".into(),
            node: "node-a".into(),
        };
        write_message(&mut a, &sent).await.unwrap();
        let got: Request = read_message(&mut b).await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_at_the_limit() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let _ = a.write_all(&vec![b'x'; 4 * MAX_MESSAGE]).await;
        });
        let err = read_message::<_, Request>(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[tokio::test]
    async fn unknown_fields_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"{\"version\":1,\"src\":\"x\",\"dst\":\"y\",\"node\":\"n\",\"admin\":true}\n")
            .await
            .unwrap();
        assert!(read_message::<_, Request>(&mut b).await.is_err());
    }
}
