//! Bounded traffic probes between workloads: every call has a timeout, every server thread
//! stops when its socket is dropped or after a fixed number of connections.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::NetNs;

/// How long a probe waits before calling the traffic blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A TCP echo server inside a namespace: echoes whatever each connection sends. Stops after
/// `max_connections` connections; its thread ends when the test process ends at the latest.
pub fn tcp_echo_server(ns: &NetNs, addr: IpAddr, port: u16, max_connections: usize) -> Result<()> {
    let listener = ns.run(move || TcpListener::bind(SocketAddr::new(addr, port)))??;
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_connections) {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// A UDP echo server inside a namespace, answering up to `max_datagrams` datagrams.
pub fn udp_echo_server(ns: &NetNs, addr: IpAddr, port: u16, max_datagrams: usize) -> Result<()> {
    let socket = ns.run(move || UdpSocket::bind(SocketAddr::new(addr, port)))??;
    socket.set_read_timeout(Some(Duration::from_secs(60)))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..max_datagrams {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                break;
            };
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// Opens a TCP connection from inside `ns`, bounded by `PROBE_TIMEOUT`.
pub fn tcp_connect(ns: &NetNs, to: IpAddr, port: u16) -> Result<TcpStream> {
    let stream =
        ns.run(move || TcpStream::connect_timeout(&SocketAddr::new(to, port), PROBE_TIMEOUT))??;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    Ok(stream)
}

/// Sends `msg` on an open connection and waits for the echo; false if nothing came back in time.
pub fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> bool {
    if stream.write_all(msg).is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).is_ok() && got == msg
}

/// Can `ns` open a TCP connection to `to:port` and get an echo back?
pub fn tcp_reachable(ns: &NetNs, to: IpAddr, port: u16) -> bool {
    match tcp_connect(ns, to, port) {
        Ok(mut s) => echo_roundtrip(&mut s, b"tollgate"),
        Err(_) => false,
    }
}

/// Does a UDP datagram from `ns` to `to:port` get its echo back within the timeout?
pub fn udp_reachable(ns: &NetNs, to: IpAddr, port: u16) -> Result<bool> {
    let any: IpAddr = if to.is_ipv4() {
        "0.0.0.0".parse()?
    } else {
        "::".parse()?
    };
    let socket = ns.run(move || UdpSocket::bind(SocketAddr::new(any, 0)))??;
    // UDP has no retransmission: resend a few times within the probe's time budget, so one
    // datagram lost to neighbour resolution does not read as "blocked".
    const TRIES: u32 = 3;
    socket.set_read_timeout(Some(PROBE_TIMEOUT / TRIES))?;
    let mut buf = [0u8; 64];
    for _ in 0..TRIES {
        socket
            .send_to(b"tollgate", SocketAddr::new(to, port))
            .context("udp send")?;
        if matches!(socket.recv_from(&mut buf), Ok((8, _))) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One ICMP echo from `ns` to `to` (the `ping` tool, 1 s deadline).
pub fn ping(ns: &NetNs, to: IpAddr) -> Result<bool> {
    let status = ns
        .exec(&["ping", "-c", "1", "-W", "1", "-w", "2", &to.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running ping (is iputils-ping installed?)")?;
    Ok(status.success())
}
