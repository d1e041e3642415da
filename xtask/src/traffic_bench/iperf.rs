//! Bulk TCP throughput with iperf3 (Debian's): a one-off server in the server namespace, the
//! client in the client namespace, the receiver's rate from the client's JSON report. Both
//! processes are bounded in time and killed by pid in Drop.

use std::{
    net::IpAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use tollgate_testbed::NetNs;

/// How long the server may take to listen, and the client may run beyond its test time.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const EXTRA_RUN_TIME: Duration = Duration::from_secs(15);

/// A child process killed by pid (SIGTERM, then SIGKILL) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling the pid of our own child, which has not been reaped yet.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Bulk TCP from `client_ns` to `server:port` in `server_ns` for `seconds`: bits per second
/// received by the server. Both iperf3 processes run on `cpu` (`-A`): left to the scheduler,
/// their placement changes from run to run and with it the rate (measured on the 2-CPU VM:
/// 8-16 Gbit/s unpinned or on two CPUs, 14-16 on one).
pub fn throughput(
    server_ns: &NetNs,
    client_ns: &NetNs,
    server: IpAddr,
    port: u16,
    seconds: u32,
    cpu: usize,
) -> Result<f64> {
    let addr = server.to_string();
    let port_arg = port.to_string();
    let server_proc = ChildGuard(
        server_ns
            .command_inside("iperf3")?
            .args(["-s", "-1", "-B", &addr, "-p", &port_arg])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the iperf3 server (is iperf3 installed?)")?,
    );
    wait_listening(&server_proc, port)?;

    let mut client = ChildGuard(
        client_ns
            .command_inside("iperf3")?
            .args(["-c", &addr, "-p", &port_arg, "-t", &seconds.to_string()])
            .args(["-J", "--connect-timeout", "2000"])
            .args(["-A", &format!("{cpu},{cpu}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the iperf3 client")?,
    );
    // Read on threads, so a report larger than the pipe cannot block the client's exit.
    let stdout = drain(client.0.stdout.take());
    let stderr = drain(client.0.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(seconds.into()) + EXTRA_RUN_TIME;
    let status = loop {
        if let Some(status) = client.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("iperf3 client still running {EXTRA_RUN_TIME:?} after its test time; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().map_err(|_| anyhow!("reader panicked"))?;
    let stderr = stderr.join().map_err(|_| anyhow!("reader panicked"))?;
    let bits = received_bits_per_second(&stdout).with_context(|| {
        format!(
            "iperf3 -c {addr} -p {port} ({status}){}",
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        )
    })?;
    drop(server_proc);
    Ok(bits)
}

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut text);
        }
        text
    })
}

/// Waits until the server process listens on TCP `port`, as its own /proc/<pid>/net/tcp{,6}
/// (which show the sockets of the process's network namespace) say.
fn wait_listening(server: &ChildGuard, port: u16) -> Result<()> {
    let pid = server.0.id();
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
                .with_context(|| format!("the iperf3 server (pid {pid}) exited"))?;
            if listens_on(&text, port) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the iperf3 server did not listen on port {port} within {START_TIMEOUT:?}")
}

/// Does a /proc/net/tcp table have a socket in LISTEN (state 0A) on local `port`?
fn listens_on(table: &str, port: u16) -> bool {
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or("");
        let state = fields.nth(1).unwrap_or("");
        local.ends_with(&port) && state == "0A"
    })
}

/// The receiver's rate from iperf3's `-J` report, or the error iperf3 reported.
fn received_bits_per_second(json: &str) -> Result<f64> {
    let report: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("iperf3 printed no JSON report: {:.200}", json.trim()))?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report has no end.sum_received.bits_per_second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receivers_rate_is_read_from_the_report() {
        let json = r#"{"start": {}, "intervals": [],
            "end": {"sum_sent": {"bits_per_second": 2.5e10},
                    "sum_received": {"bits_per_second": 2.4e10}}}"#;
        assert_eq!(received_bits_per_second(json).unwrap(), 2.4e10);
    }

    #[test]
    fn an_iperf3_error_is_passed_on() {
        let json = r#"{"start": {}, "intervals": [], "end": {},
            "error": "unable to connect to server: Connection timed out"}"#;
        let err = received_bits_per_second(json).unwrap_err().to_string();
        assert!(err.contains("unable to connect"), "{err}");
    }

    #[test]
    fn a_listening_socket_is_found_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
            0: 0202C80A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n   \
            1: 0202C80A:1B59 0201C80A:9C40 01 00000000:00000000 00:00000000 00000000\n";
        assert!(listens_on(table, 5201));
        assert!(!listens_on(table, 7001), "established, not listening");
        assert!(!listens_on(table, 7002));
    }
}
