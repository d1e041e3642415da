//! Bounded traffic probes between workloads: every call has a timeout, every server thread
//! stops when its socket is dropped, after a fixed number of connections, or when its peer has
//! been silent for a fixed time. Besides reachability probes there are bulk transfers (megabytes
//! over one TCP connection, datagrams close to the MTU) that make the kernel hand the datapath
//! large and segmented skbs, and a connect from a chosen source port for flows that reuse a
//! 4-tuple in the other direction.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::NetNs;

/// How long a probe waits before calling the traffic blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a whole bulk transfer may take.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(30);

/// A bulk transfer that has not moved a byte for this long has stalled: TCP would only keep
/// retransmitting into whatever drops its segments.
pub const BULK_STALL: Duration = Duration::from_secs(10);

/// How long an echo server connection waits for its peer to read or write before giving up.
const SERVER_IDLE: Duration = Duration::from_secs(30);

/// Echo buffer: large enough for any UDP datagram, and for TCP to move megabytes in few calls.
const ECHO_BUFFER: usize = 64 * 1024;

/// A TCP echo server inside a namespace: echoes whatever each connection sends. Stops after
/// `max_connections` connections; its thread ends when the test process ends at the latest.
pub fn tcp_echo_server(ns: &NetNs, addr: IpAddr, port: u16, max_connections: usize) -> Result<()> {
    let listener = ns.run(move || TcpListener::bind(SocketAddr::new(addr, port)))??;
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max_connections) {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                // A write timeout too: a client that gave up on a black-holed transfer stops
                // reading, and the echo would otherwise block until TCP gives up (minutes).
                let _ = s.set_read_timeout(Some(SERVER_IDLE));
                let _ = s.set_write_timeout(Some(SERVER_IDLE));
                let mut buf = vec![0u8; ECHO_BUFFER];
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
        let mut buf = vec![0u8; ECHO_BUFFER];
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

/// Opens a TCP connection from inside `ns` from the local address `from` (port 0 for any) to
/// `to`, bounded by `PROBE_TIMEOUT`. SO_REUSEADDR lets the local port be one that a closed or
/// refused connection used a moment ago.
pub fn tcp_connect_from(ns: &NetNs, from: SocketAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = ns.run(move || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(from))?;
        socket.connect_timeout(&SockAddr::from(to), PROBE_TIMEOUT)?;
        Ok(socket)
    })?;
    let stream: TcpStream = socket
        .with_context(|| format!("connecting {from} -> {to}"))?
        .into();
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
    udp_echoes(ns, to, port, b"tollgate")
}

/// Does a UDP datagram of exactly `size` bytes (pseudo-random content) come back whole from an
/// echo server at `to:port` within the probe timeout? `size` must fit the path MTU: the
/// datapath drops non-first IP fragments by design.
pub fn udp_echo_of_size(ns: &NetNs, to: IpAddr, port: u16, size: usize) -> Result<bool> {
    udp_echoes(ns, to, port, &pseudo_random_bytes(size, size as u64))
}

fn udp_echoes(ns: &NetNs, to: IpAddr, port: u16, payload: &[u8]) -> Result<bool> {
    let any = if to.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let socket = ns.run(move || UdpSocket::bind(SocketAddr::new(any, 0)))??;
    // UDP has no retransmission: resend a few times within the probe's time budget, so one
    // datagram lost to neighbour resolution does not read as "blocked".
    const TRIES: u32 = 3;
    socket.set_read_timeout(Some(PROBE_TIMEOUT / TRIES))?;
    // One byte more than sent, so a longer answer is seen as longer rather than cut to size.
    let mut buf = vec![0u8; payload.len() + 1];
    for _ in 0..TRIES {
        socket
            .send_to(payload, SocketAddr::new(to, port))
            .with_context(|| format!("udp send of {} bytes", payload.len()))?;
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            if buf[..n] == *payload {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Sends `bytes` pseudo-random bytes over one TCP connection from `ns` to an echo server at
/// `to:port` while reading the echo back, and checks every byte. Writing and reading run on
/// separate threads: with both directions in flight, a single thread would fill both socket
/// buffers and deadlock. Fails within `BULK_TIMEOUT` (or `BULK_STALL` without progress), saying
/// how many bytes had come back.
pub fn tcp_bulk_echo(ns: &NetNs, to: IpAddr, port: u16, bytes: usize) -> Result<()> {
    let data = Arc::new(pseudo_random_bytes(
        bytes,
        u64::from(port) << 32 | bytes as u64,
    ));
    let mut reader = tcp_connect(ns, to, port)?;
    // Short socket timeouts so both loops look at their deadlines often.
    let tick = Duration::from_millis(200);
    reader.set_read_timeout(Some(tick))?;
    reader.set_write_timeout(Some(tick))?;
    let mut writer = reader.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer_thread = {
        let (data, stop) = (Arc::clone(&data), Arc::clone(&stop));
        std::thread::spawn(move || -> (usize, Option<std::io::Error>) {
            let mut sent = 0;
            while sent < data.len() && !stop.load(Ordering::Relaxed) {
                match writer.write(&data[sent..]) {
                    Ok(0) => return (sent, Some(ErrorKind::WriteZero.into())),
                    Ok(n) => sent += n,
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => return (sent, Some(e)),
                }
            }
            (sent, None)
        })
    };
    let outcome = read_echo(&mut reader, &data);
    // Unblocks the writer whatever happened (its next write fails), so the join is bounded.
    stop.store(true, Ordering::Relaxed);
    let _ = reader.shutdown(Shutdown::Both);
    let (written, write_error) = writer_thread
        .join()
        .map_err(|_| anyhow!("bulk writer thread panicked"))?;
    outcome.with_context(|| {
        // A broken pipe is our own shutdown above; anything else the writer met first.
        let write_error = match write_error {
            Some(e) if e.kind() != ErrorKind::BrokenPipe => format!(", write failed: {e}"),
            _ => String::new(),
        };
        format!("TCP bulk echo of {bytes} bytes to {to}:{port} ({written} written{write_error})")
    })
}

/// Reads the echo of `data` from `stream`, comparing as it goes.
fn read_echo(stream: &mut TcpStream, data: &[u8]) -> Result<()> {
    let start = Instant::now();
    let mut last_progress = start;
    let mut echoed = 0;
    let mut buf = vec![0u8; ECHO_BUFFER];
    while echoed < data.len() {
        let now = Instant::now();
        if now > start + BULK_TIMEOUT {
            bail!("not done after {BULK_TIMEOUT:?}: {echoed} bytes echoed");
        }
        if now > last_progress + BULK_STALL {
            bail!("stalled for {BULK_STALL:?}: {echoed} bytes echoed");
        }
        let want = buf.len().min(data.len() - echoed);
        match stream.read(&mut buf[..want]) {
            Ok(0) => bail!("connection closed by the peer: {echoed} bytes echoed"),
            Ok(n) => {
                if let Some(i) = (0..n).find(|&i| buf[i] != data[echoed + i]) {
                    bail!("echo differs at byte {}", echoed + i);
                }
                echoed += n;
                last_progress = Instant::now();
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context(format!("read failed: {echoed} bytes echoed")),
        }
    }
    Ok(())
}

/// A socket timeout reads as EAGAIN (WouldBlock) on Linux; TimedOut for good measure.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// `len` bytes from xorshift64 seeded with `seed`: reproducible, and unlike a repeating pattern
/// a misordered or duplicated chunk does not compare equal.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
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
