//! A real Prometheus server for the metrics tests, and the two tools they need around it: a
//! bounded HTTP GET (for the agent's /metrics, /healthz and /readyz, and Prometheus's own API) and
//! `promtool check metrics` (the exposition lint Prometheus's maintainers apply). The server runs
//! on a free loopback port with its config, TSDB and log in a directory the caller owns; it never
//! uses :9090, where a packaged service may be listening. Drop stops it by pid (SIGTERM, then
//! SIGKILL). The binaries come from Debian's `prometheus` package, which `cargo xtask setup`
//! installs; without them every function here fails and says so.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// How long the server may take to answer 200 on `/-/ready` (it opens its TSDB first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port: between dropping the probe socket and Prometheus binding the port,
/// another process may take it.
const START_ATTEMPTS: usize = 5;
/// Between SIGTERM and SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// One API call to the server.
const API_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// The largest HTTP response `http_get` accepts; an exposition of every metric of a busy agent
/// is well under a megabyte.
const MAX_RESPONSE: usize = 16 << 20;
/// How much of the server's log an error shows.
const LOG_TAIL_LINES: usize = 40;
const SETUP_HINT: &str = "run `cargo xtask setup` (Debian package `prometheus`)";

/// One element of an instant query's result: the series' labels (`__name__` included when the
/// expression keeps it) and its value at the query time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A `prometheus` process scraping a fixed set of targets as job `tollgate`.
pub struct PrometheusServer {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl PrometheusServer {
    /// Writes `prometheus.yml` into `workdir`, starts `prometheus` on a free loopback port with
    /// its TSDB and log (`prometheus.log`) there, and waits until it reports ready. The scrape
    /// timeout is the interval (capped at Prometheus's default of 10 s): a timeout longer than
    /// the interval is a config error.
    pub fn start(
        workdir: &Path,
        targets: &[SocketAddr],
        scrape_interval: Duration,
    ) -> Result<Self> {
        if scrape_interval < Duration::from_millis(1) {
            bail!("scrape interval {scrape_interval:?} is below Prometheus's resolution of 1 ms");
        }
        std::fs::create_dir_all(workdir)
            .with_context(|| format!("creating {}", workdir.display()))?;
        let config = workdir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(targets, scrape_interval))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = workdir.join("prometheus.log");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let addr = free_loopback_addr()?;
            let mut server = PrometheusServer {
                child: None,
                addr,
                log: log.clone(),
            };
            // Each attempt appends to the log; only this attempt's part tells why it failed.
            let log_start = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
            server.spawn(workdir, &config)?;
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) if server.lost_port_race(log_start) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "prometheus found its port taken {START_ATTEMPTS} times in a row"
            )))
    }

    fn spawn(&mut self, workdir: &Path, config: &Path) -> Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                workdir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={}", self.addr))
            // Relative defaults (console templates, the query log) resolve inside workdir.
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| binary_error("prometheus", e))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "prometheus exited during start ({status}); log tail:\n{}",
                    self.log_tail()
                );
            }
            let last = match http_get(self.addr, "/-/ready", Duration::from_secs(1)) {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "prometheus on {} not ready after {READY_TIMEOUT:?} (last: {last}); log \
                     tail:\n{}",
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the attempt whose log starts at byte `log_start` failed because another process
    /// bound the port first (Prometheus then exits with "Unable to start web listener ... bind:
    /// address already in use").
    fn lost_port_race(&self, log_start: usize) -> bool {
        let log = std::fs::read(&self.log).unwrap_or_default();
        self.child.is_none()
            && log.get(log_start..).is_some_and(|attempt| {
                String::from_utf8_lossy(attempt).contains("address already in use")
            })
    }

    /// The address of the web UI and HTTP API.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Evaluates `expr` now (`/api/v1/query`). A vector result gives one sample per series, a
    /// scalar one sample without labels; a range vector is refused (wrap it in a function).
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        self.query_within(expr, API_TIMEOUT)
    }

    fn query_within(&self, expr: &str, timeout: Duration) -> Result<Vec<Sample>> {
        let data = self
            .api(
                &format!("/api/v1/query?query={}", percent_encode(expr)),
                timeout,
            )
            .with_context(|| format!("query `{expr}`"))?;
        parse_query_result(&data).with_context(|| format!("query `{expr}`"))
    }

    /// Runs `query(expr)` every 200 ms until `pred` holds of its result, for at most `timeout`,
    /// and returns that result. On timeout the error shows the last result (or query error) and
    /// the scrape targets' health.
    pub fn wait_for(
        &self,
        expr: &str,
        timeout: Duration,
        pred: impl Fn(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            // A hung server cannot stretch the wait: each query gets what is left of it.
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match self.query_within(expr, left.max(POLL)) {
                Ok(samples) if pred(&samples) => return Ok(samples),
                Ok(samples) => format!("{samples:?}"),
                Err(e) => format!("error: {e:#}"),
            };
            if Instant::now() >= deadline {
                let targets = match self.target_report() {
                    Ok(report) => report,
                    Err(e) => format!("(targets unavailable: {e:#})"),
                };
                bail!(
                    "`{expr}` did not reach the expected state within {timeout:?}; last \
                     result: {last}; targets: {targets}"
                );
            }
            std::thread::sleep(
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// `(scrapeUrl, health)` of every active target (`/api/v1/targets`); health is "up",
    /// "down" or "unknown" (not scraped yet).
    pub fn targets_up(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .active_targets()?
            .iter()
            .map(|t| (json_str(t, "scrapeUrl"), json_str(t, "health")))
            .collect())
    }

    /// Every target with its health and last scrape error, for error messages.
    fn target_report(&self) -> Result<String> {
        let mut report = String::new();
        for t in self.active_targets()? {
            let _ = write!(
                report,
                "[{} {}",
                json_str(&t, "scrapeUrl"),
                json_str(&t, "health")
            );
            let error = json_str(&t, "lastError");
            if !error.is_empty() {
                let _ = write!(report, ": {error}");
            }
            report.push(']');
        }
        Ok(report)
    }

    fn active_targets(&self) -> Result<Vec<Value>> {
        let data = self.api("/api/v1/targets?state=active", API_TIMEOUT)?;
        match data.get("activeTargets") {
            Some(Value::Array(targets)) => Ok(targets.clone()),
            _ => bail!("/api/v1/targets: no activeTargets in {data}"),
        }
    }

    /// GETs an API path and returns the envelope's `data`, or Prometheus's error.
    fn api(&self, path: &str, timeout: Duration) -> Result<Value> {
        let (status, body) = http_get(self.addr, path, timeout)?;
        let reply: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {path}: HTTP {status}, not JSON: {body}"))?;
        if reply.get("status").and_then(Value::as_str) != Some("success") {
            bail!(
                "GET {path}: HTTP {status}: {}: {}",
                json_str(&reply, "errorType"),
                json_str(&reply, "error")
            );
        }
        reply
            .get("data")
            .cloned()
            .ok_or_else(|| anyhow!("GET {path}: no data in {body}"))
    }

    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Child::kill sends SIGKILL to this pid.
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "prometheus {} ignored SIGTERM for {STOP_TIMEOUT:?}; killed",
            child.id()
        )
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log tail ({}) ---\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

fn scrape_config(targets: &[SocketAddr], interval: Duration) -> String {
    let interval_ms = interval.as_millis();
    let timeout_ms = interval_ms.min(10_000);
    let mut yaml = format!(
        "global:\n  scrape_interval: {interval_ms}ms\n  evaluation_interval: {interval_ms}ms\n\
         scrape_configs:\n  - job_name: tollgate\n    scrape_interval: {interval_ms}ms\n    \
         scrape_timeout: {timeout_ms}ms\n    static_configs:\n      - targets:\n"
    );
    for target in targets {
        // SocketAddr's Display brackets IPv6 (`[::1]:9000`), the form Prometheus expects.
        let _ = writeln!(yaml, "          - \"{target}\"");
    }
    if targets.is_empty() {
        yaml.push_str("          []\n");
    }
    yaml
}

fn free_loopback_addr() -> Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

fn binary_error(binary: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == ErrorKind::NotFound {
        anyhow!("`{binary}` is not on PATH: {SETUP_HINT}")
    } else {
        anyhow!(e).context(format!("starting `{binary}`"))
    }
}

fn json_str(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn parse_query_result(data: &Value) -> Result<Vec<Sample>> {
    let result = data.get("result").unwrap_or(&Value::Null);
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => result
            .as_array()
            .ok_or_else(|| anyhow!("vector result is not an array: {result}"))?
            .iter()
            .map(|series| {
                let labels = series
                    .get("metric")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = parse_sample_value(series.get("value").unwrap_or(&Value::Null))?;
                Ok(Sample { labels, value })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: parse_sample_value(result)?,
        }]),
        other => bail!(
            "result type {} is not an instant vector or scalar",
            other.unwrap_or("(none)")
        ),
    }
}

/// `[<unix time>, "<value>"]`; the value is a string because it may be "NaN" or "+Inf", which
/// Rust's float parser accepts as well.
fn parse_sample_value(pair: &Value) -> Result<f64> {
    let text = pair
        .get(1)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("sample is not [time, \"value\"]: {pair}"))?;
    text.parse()
        .with_context(|| format!("sample value {text:?} is not a number"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a PromQL expression
/// (braces, quotes, `=~`, spaces, `+`) arrives intact as one query parameter.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `GET path` with HTTP/1.0 (one request, the server closes the connection), all of it within
/// `timeout`: connect, send, and read the response. Returns the status code and the body (by
/// Content-Length, chunked encoding, or up to the close). Any status is Ok; a refused connection,
/// a timeout, a malformed or oversized (16 MiB) response, or a non-UTF-8 body is an error.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let context = || format!("GET http://{addr}{path}");
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(context)?;
    stream
        .set_write_timeout(Some(timeout))
        .with_context(context)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .with_context(context)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!(
                "{}: no complete response within {timeout:?} ({} bytes read)",
                context(),
                raw.len()
            );
        }
        stream
            .set_read_timeout(Some(remaining))
            .with_context(context)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
                "{}: no complete response within {timeout:?} ({} bytes read)",
                context(),
                raw.len()
            ),
            Err(e) => return Err(anyhow!(e).context(context())),
        }
        if raw.len() > MAX_RESPONSE {
            bail!("{}: response larger than {MAX_RESPONSE} bytes", context());
        }
    }
    parse_response(&raw).with_context(context)
}

fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "response ended before its headers did ({} bytes)",
                raw.len()
            )
        })?;
    let head = std::str::from_utf8(&raw[..head_end]).context("response headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = match status_line.split_whitespace().collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/") => code
            .parse()
            .with_context(|| format!("bad status line {status_line:?}"))?,
        _ => bail!("bad status line {status_line:?}"),
    };
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        if rest.len() < len {
            bail!("connection closed after {} of {len} body bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).context("response body is not UTF-8")?;
    Ok((status, body))
}

/// Decodes a chunked body (an HTTP/1.0 request should not get one, but a server may send it).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    // Each pass consumes at least the size line, so this ends with the input.
    while !rest.is_empty() {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("chunk size line without CRLF"))?;
        let size_line = std::str::from_utf8(&rest[..line_end]).context("chunk size line")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            bail!("chunked body ends inside a chunk");
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    bail!("chunked body ends without its last chunk")
}

/// `promtool check metrics` on `exposition` (the text format): Ok when promtool finds nothing,
/// otherwise an error with its exit status and what it printed (exit 3 lists lint problems such
/// as a counter without `_total`, exit 1 a parse error).
pub fn promtool_check_metrics(exposition: &str) -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| binary_error("promtool", e))?;
    // Separate threads feed stdin and drain the pipes, so a large text or a long report cannot
    // fill a pipe and stall both sides.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = exposition.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for promtool")? {
            break status;
        }
        if Instant::now() > deadline {
            // SIGKILL to this pid; the pipe threads then see EOF.
            let _ = child.kill();
            let _ = child.wait();
            bail!("promtool check metrics did not finish within {TIMEOUT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // promtool may exit on a parse error before reading everything (broken pipe): not an error.
    let _ = writer.join();
    let output = format!(
        "{}{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    if status.success() {
        return Ok(());
    }
    bail!("promtool check metrics: {status}:\n{}", output.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_is_percent_encoded_whole() {
        assert_eq!(
            percent_encode(r#"sum(x{a=~"b|c"}) + 1"#),
            "sum%28x%7Ba%3D~%22b%7Cc%22%7D%29%20%2B%201"
        );
    }

    #[test]
    fn special_sample_values_parse() {
        for (text, check) in [
            ("+Inf", f64::is_infinite as fn(f64) -> bool),
            ("-Inf", f64::is_infinite),
            ("NaN", f64::is_nan),
            ("42", |v| v == 42.0),
        ] {
            let v = parse_sample_value(&serde_json::json!([1.5, text])).unwrap();
            assert!(check(v), "{text} parsed as {v}");
        }
    }

    #[test]
    fn response_body_follows_content_length() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello trailing";
        assert_eq!(parse_response(raw).unwrap(), (200, "hello".into()));
    }

    #[test]
    fn response_body_without_length_runs_to_close() {
        let raw =
            b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nnot ready\n";
        assert_eq!(parse_response(raw).unwrap(), (503, "not ready\n".into()));
    }

    #[test]
    fn chunked_response_body_is_reassembled() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, "abcdefg".into()));
    }

    #[test]
    fn truncated_response_body_is_an_error() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(parse_response(raw).is_err());
    }

    #[test]
    fn only_this_attempts_bind_failure_counts_as_a_lost_port_race() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("prometheus.log");
        let earlier = "msg=\"Unable to start web listener\" err=\"bind: address already in use\"\n";
        std::fs::write(&log, format!("{earlier}msg=\"error loading config\"\n")).unwrap();
        let server = PrometheusServer {
            child: None,
            addr: "127.0.0.1:1".parse().unwrap(),
            log,
        };

        assert!(server.lost_port_race(0));
        assert!(!server.lost_port_race(earlier.len()));
    }

    #[test]
    fn scrape_timeout_never_exceeds_interval() {
        let target: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let fast = scrape_config(&[target], Duration::from_secs(1));
        assert!(fast.contains("scrape_timeout: 1000ms"), "{fast}");
        let slow = scrape_config(&[target], Duration::from_secs(30));
        assert!(slow.contains("scrape_timeout: 10000ms"), "{slow}");
        assert!(slow.contains("- \"127.0.0.1:9000\""), "{slow}");
    }
}
