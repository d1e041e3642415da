//! The Prometheus harness against a fixed exposition: the server scrapes it and answers queries,
//! promtool passes a valid text and refuses lint and parse errors, and nothing outlives the test.
//! These need Debian's `prometheus` package; without it they fail and name `cargo xtask setup`.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tollgate_testbed::prometheus::{http_get, promtool_check_metrics, PrometheusServer};

const DEMO_EXPOSITION: &str =
    "# HELP demo_total A demo.\n# TYPE demo_total counter\ndemo_total{verdict=\"allow\"} 42\n";

/// Serves one fixed text on every request, on 127.0.0.1 and a free port, until dropped.
struct StaticExposition {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticExposition {
    /// The server ends by itself after this, in case a test never drops it.
    const LIFETIME: Duration = Duration::from_secs(120);

    fn start(body: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Self::LIFETIME;
            while !stopped.load(Ordering::Relaxed) && Instant::now() < end {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        // Read the request head (bounded by size and the read timeout).
                        let mut request = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n")
                            && request.len() < 64 << 10
                        {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        StaticExposition {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StaticExposition {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn prometheus_scrapes_a_counter_with_its_value_and_labels() {
    let exposition = StaticExposition::start(DEMO_EXPOSITION);
    let workdir = tempfile::tempdir().unwrap();
    let prom = PrometheusServer::start(workdir.path(), &[exposition.addr], Duration::from_secs(1))
        .expect("starting prometheus");

    let samples = prom
        .wait_for("demo_total", Duration::from_secs(20), |s| !s.is_empty())
        .unwrap();

    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0].value, 42.0);
    assert_eq!(
        samples[0].labels.get("verdict").map(String::as_str),
        Some("allow")
    );
    assert_eq!(
        samples[0].labels.get("job").map(String::as_str),
        Some("tollgate")
    );
    let targets = prom.targets_up().unwrap();
    assert_eq!(
        targets,
        vec![(
            format!("http://{}/metrics", exposition.addr),
            "up".to_string()
        )]
    );
}

#[test]
fn a_bad_query_reports_prometheus_error() {
    let workdir = tempfile::tempdir().unwrap();
    let prom = PrometheusServer::start(workdir.path(), &[], Duration::from_secs(1))
        .expect("starting prometheus");

    let error = format!("{:#}", prom.query("sum(").unwrap_err());

    assert!(error.contains("bad_data"), "{error}");
    // A scalar comes back as one unlabelled sample.
    let scalar = prom.query("1 + 2").unwrap();
    assert_eq!(scalar.len(), 1);
    assert_eq!(scalar[0].value, 3.0);
    assert!(scalar[0].labels.is_empty());
}

#[test]
fn dropping_the_server_ends_its_process_and_frees_its_port() {
    let workdir = tempfile::tempdir().unwrap();
    let prom = PrometheusServer::start(workdir.path(), &[], Duration::from_secs(1))
        .expect("starting prometheus");
    let pid = prom.pid().expect("running");
    let addr = prom.addr();
    assert_eq!(
        http_get(addr, "/-/healthy", Duration::from_secs(5))
            .unwrap()
            .0,
        200
    );

    drop(prom);

    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "prometheus {pid} still exists after drop"
    );
    assert!(http_get(addr, "/-/healthy", Duration::from_secs(1)).is_err());
}

#[test]
fn promtool_passes_a_valid_exposition() {
    promtool_check_metrics(DEMO_EXPOSITION).expect("valid exposition");
}

#[test]
fn promtool_refuses_a_counter_without_total_suffix() {
    let text = "# HELP demo A demo.\n# TYPE demo counter\ndemo{verdict=\"allow\"} 42\n";

    let error = format!("{:#}", promtool_check_metrics(text).unwrap_err());

    assert!(error.contains("_total"), "{error}");
}

#[test]
fn promtool_refuses_an_unparsable_exposition() {
    let text =
        "# HELP demo_total A demo.\n# TYPE demo_total counter\ndemo_total{verdict=\"allow\" 42\n";

    let error = format!("{:#}", promtool_check_metrics(text).unwrap_err());

    assert!(error.contains("parsing error"), "{error}");
}
