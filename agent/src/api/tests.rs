//! The control socket under hostile or careless clients: idle connections by the thousand,
//! connections that never send a request, slowly trickled bodies, every slot busy, and policy
//! bodies past axum's 2 MB default and past [`MAX_POLICY_BYTES`]. Each test serves a stub
//! router with [`serve_with`] on a socket in a temporary directory; no root needed.

use std::time::{Duration, Instant};

use axum::{
    body::Body,
    routing::{get, put},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    sync::mpsc,
    task::JoinHandle,
};

use super::*;
use crate::client::{Client, ClientError};

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(router: Router, config: ServeConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tollgate.sock");
    let listener = bind(&socket).await.unwrap();
    let task = tokio::spawn(serve_with(listener, router, socket.clone(), config));
    Server {
        _dir: dir,
        socket,
        task,
    }
}

/// `GET /v1/status` answers `{"ok": true}`; `PUT /v1/policy` answers the length of the
/// [`PolicyText`] it got.
fn stub_router() -> Router {
    Router::new()
        .route(
            PATH_STATUS,
            get(|| async { Json(serde_json::json!({ "ok": true })) }),
        )
        .route(
            PATH_POLICY,
            put(|PolicyText(text): PolicyText| async move { Json(text.len()) }),
        )
}

/// Connects, retrying while the listen backlog is full.
async fn connect(socket: &Path) -> UnixStream {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("connecting to {}: {e}", socket.display()),
        }
    }
}

/// Everything the server sends until it closes the connection; panics if that takes longer
/// than `within`.
async fn read_until_closed(stream: &mut UnixStream, within: Duration) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the connection open for {within:?}"));
    String::from_utf8_lossy(&answer).into_owned()
}

/// Has the server closed this connection? (Ok(0) from a nonblocking read.)
fn closed_by_server(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Ok(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_answered_promptly_with_1100_idle_connections() {
    const IDLE: usize = 1_100;
    let limit = crate::rlimit::raise_nofile_limit().unwrap().after;
    // This process holds both ends of every connection, and other tests run alongside.
    let spare = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(IDLE + 300);
    let max_connections = spare.min(ServeConfig::default().max_connections);
    assert!(
        max_connections >= 2,
        "the hard open-file limit ({limit}) leaves no room for {IDLE} idle connections"
    );
    let server = start(
        stub_router(),
        ServeConfig {
            max_connections,
            // Long, so that the idle connections are closed to make room, not by the timeout.
            header_read_timeout: Duration::from_secs(120),
            ..ServeConfig::default()
        },
    )
    .await;

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(connect(&server.socket).await);
    }
    let started = Instant::now();
    let answer: serde_json::Value = Client::new(&server.socket, Duration::from_secs(2))
        .get(PATH_STATUS)
        .await
        .expect("status answered within 2 s");
    assert_eq!(answer, serde_json::json!({ "ok": true }));
    assert!(started.elapsed() < Duration::from_secs(2));

    // The server kept at most `max_connections`, closing the oldest idle ones.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = idle.iter().filter(|s| !closed_by_server(s)).count();
        if open < max_connections {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} idle connections still open with a cap of {max_connections}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed_by_server(&idle[0]), "the oldest was closed");
    assert!(!closed_by_server(&idle[IDLE - 1]), "the newest was kept");
}

#[tokio::test]
async fn connection_without_a_request_is_closed_after_the_header_timeout() {
    let server = start(
        stub_router(),
        ServeConfig {
            header_read_timeout: Duration::from_millis(200),
            ..ServeConfig::default()
        },
    )
    .await;
    let mut stream = connect(&server.socket).await;
    let started = Instant::now();
    read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Half a request head is no better than none.
    let mut stream = connect(&server.socket).await;
    stream
        .write_all(b"GET /v1/status HTTP/1.1\r\nho")
        .await
        .unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn slowly_trickled_body_is_cut_off_by_the_request_timeout() {
    let server = start(
        stub_router(),
        ServeConfig {
            request_timeout: Duration::from_millis(300),
            ..ServeConfig::default()
        },
    )
    .await;
    let mut stream = connect(&server.socket).await;
    stream
        .write_all(b"PUT /v1/policy HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nkind: ")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request did not complete within 300ms"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomer_is_closed_when_every_connection_is_busy() {
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<()>();
    // Holds its request until the body has arrived, which the test never sends.
    let router = Router::new().route(
        "/slow",
        put(move |body: Body| {
            let started = started_tx.clone();
            async move {
                let _ = started.send(());
                let _ = body.collect().await;
                "done"
            }
        }),
    );
    let server = start(
        router,
        ServeConfig {
            max_connections: 2,
            ..ServeConfig::default()
        },
    )
    .await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&server.socket).await;
        stream
            .write_all(b"PUT /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n")
            .await
            .unwrap();
        started_rx.recv().await.unwrap();
        busy.push(stream);
    }
    let mut newcomer = connect(&server.socket).await;
    let answer = read_until_closed(&mut newcomer, Duration::from_secs(2)).await;
    assert_eq!(answer, "", "closed without an answer");
    for stream in &busy {
        assert!(!closed_by_server(stream), "busy connections are kept");
    }
    // Once one finishes, there is room again.
    busy[0].write_all(b"0123456789").await.unwrap();
    let answer = read_until_closed(&mut busy[0], Duration::from_secs(5)).await;
    assert!(answer.ends_with("done"), "{answer}");
    let mut next = connect(&server.socket).await;
    next.write_all(b"PUT /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut next, Duration::from_secs(5)).await;
    assert!(answer.ends_with("done"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_bodies_up_to_the_limit_are_accepted_and_larger_ones_get_413() {
    let server = start(stub_router(), ServeConfig::default()).await;
    let client = Client::new(&server.socket, Duration::from_secs(60));

    // Past axum's 2 MB default, which a 100k-rule policy needs.
    let three_mib = "#".repeat(3 << 20);
    let len: usize = client.put_text(PATH_POLICY, three_mib).await.unwrap();
    assert_eq!(len, 3 << 20);

    let err = client
        .put_text::<usize>(PATH_POLICY, "#".repeat(MAX_POLICY_BYTES + 1))
        .await
        .unwrap_err();
    match &err {
        ClientError::Refused { status, .. } => assert_eq!(*status, StatusCode::PAYLOAD_TOO_LARGE),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "the policy is larger than 32 MiB; the agent accepts policies of up to 33554432 bytes"
    );
}

#[tokio::test]
async fn policy_body_that_is_not_utf8_is_refused() {
    let server = start(stub_router(), ServeConfig::default()).await;
    let mut stream = connect(&server.socket).await;
    stream
        .write_all(b"PUT /v1/policy HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\nab\xff\xfe")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("not UTF-8 text"), "{answer}");
}

// Running out of descriptors is tested with a real agent started under RLIMIT_NOFILE 1024:
// tests/namespaced.rs `status_answers_with_1100_idle_connections_at_a_1024_descriptor_limit`.
