//! Offered load for the rate-limit tests, and sinks that count what got through. A generator
//! sends at a fixed rate for a fixed time (new TCP connections, UDP datagrams) or as fast as
//! TCP allows (a bulk transfer), from the calling thread's network namespace, and reports what
//! it offered and when on CLOCK_MONOTONIC, which every process on the machine shares: the
//! window a limit had to meter comes from the senders, what passed from the sinks, so a test
//! never judges a rate by how long its own code took.
//!
//! A connection generator is one SYN per attempt: each attempt comes from a source port of its
//! own (a new flow, whatever the datapath remembers of earlier ones) and is abandoned before the
//! SYN's first retransmission (1 s), so a refused connection is not tried again behind the
//! test's back. A generator can be handed to another process as one line of text
//! ([`ConnectionLoad::to_spec`]) and report back in one line ([`Offered::to_line`]).
//!
//! Every loop is bounded by a deadline and every blocking call by a timeout; a sink's threads
//! stop and are joined when it is dropped, which closes its sockets.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    ops::Range,
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    load::{listen_in, readable},
    netns::NetNs,
};

/// Nanoseconds of CLOCK_MONOTONIC: comparable between processes, unlike `Instant`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until CLOCK_MONOTONIC reads `ns` (at once if it has passed).
fn sleep_until_ns(ns: u64) {
    let now = monotonic_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// The longest any generator may run, so a mistyped duration cannot hang a test run.
pub const MAX_DURATION: Duration = Duration::from_secs(60);

/// Gaps between sends (or polls) of a paced generator: the rate is kept on average, in clumps
/// no longer than this.
const PACING_TICK: Duration = Duration::from_millis(1);

/// What a generator offered: attempts (connections tried, datagrams or bytes sent), how many
/// of them completed from the sender's side (handshakes seen, datagrams the kernel accepted),
/// and the CLOCK_MONOTONIC instants of the first and the last attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offered {
    pub attempted: u64,
    pub completed: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Marks a generator's report line among whatever else a process prints.
const REPORT_PREFIX: &str = "tollgate-offered:";

impl Offered {
    /// Seconds from the first to the last attempt: the window a limit metered.
    pub fn window_secs(&self) -> f64 {
        self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9
    }

    /// Attempts per second over the window.
    pub fn rate(&self) -> f64 {
        self.attempted as f64 / self.window_secs().max(1e-9)
    }

    /// Several generators' attempts as one offer: counts add up, the window spans them all.
    pub fn combined(all: &[Offered]) -> Offered {
        Offered {
            attempted: all.iter().map(|o| o.attempted).sum(),
            completed: all.iter().map(|o| o.completed).sum(),
            first_ns: all.iter().map(|o| o.first_ns).min().unwrap_or(0),
            last_ns: all.iter().map(|o| o.last_ns).max().unwrap_or(0),
        }
    }

    /// One line for another process to read back with `from_output`.
    pub fn to_line(&self) -> String {
        format!(
            "{REPORT_PREFIX} {} {} {} {}",
            self.attempted, self.completed, self.first_ns, self.last_ns
        )
    }

    /// Finds the report line in a process's output.
    pub fn from_output(output: &str) -> Result<Offered> {
        let line = output
            .lines()
            .find_map(|l| l.trim().strip_prefix(REPORT_PREFIX))
            .ok_or_else(|| anyhow!("no report line in {output:?}"))?;
        let n: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("report line {line:?}"))?;
        let [attempted, completed, first_ns, last_ns] = n[..] else {
            bail!("report line {line:?}: expected 4 numbers");
        };
        Ok(Offered {
            attempted,
            completed,
            first_ns,
            last_ns,
        })
    }
}

// ---- New TCP connections at a fixed rate -------------------------------------------------------

/// New TCP connections to `to`, `per_second` of them, for `duration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLoad {
    pub to: SocketAddr,
    pub per_second: u32,
    pub duration: Duration,
    /// One source port per attempt, in order; the load ends early when they run out. Give
    /// generators running at once ranges of their own.
    pub source_ports: Range<u16>,
    /// How long an attempt waits for its handshake before it is abandoned (closed in SYN-SENT,
    /// which sends nothing). Under the 1 s of the first SYN retransmission, so every attempt is
    /// one SYN.
    pub give_up_after: Duration,
    /// CLOCK_MONOTONIC instant of the first attempt (0: at once), so generators in several
    /// processes start together.
    pub start_at_ns: u64,
}

impl ConnectionLoad {
    /// The load as one line of text (for another process's environment).
    pub fn to_spec(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.to,
            self.per_second,
            self.duration.as_millis(),
            self.source_ports.start,
            self.source_ports.end,
            self.give_up_after.as_millis(),
            self.start_at_ns
        )
    }

    pub fn from_spec(spec: &str) -> Result<ConnectionLoad> {
        let f: Vec<&str> = spec.split_whitespace().collect();
        let [to, per_second, duration_ms, port_start, port_end, give_up_ms, start_at_ns] = f[..]
        else {
            bail!("connection load {spec:?}: expected 7 fields");
        };
        let ms = |s: &str| -> Result<Duration> { Ok(Duration::from_millis(s.parse()?)) };
        Ok(ConnectionLoad {
            to: to.parse()?,
            per_second: per_second.parse()?,
            duration: ms(duration_ms)?,
            source_ports: port_start.parse()?..port_end.parse()?,
            give_up_after: ms(give_up_ms)?,
            start_at_ns: start_at_ns.parse()?,
        })
    }
}

/// An attempt in flight.
struct Attempt {
    socket: Socket,
    give_up_ns: u64,
}

/// Runs `load` from the calling thread's namespace. `completed` counts handshakes the client
/// saw finish; each finished connection is closed at once (the client closes first, so its
/// source port stays in TIME-WAIT and is not used again).
pub fn offer_connections(load: &ConnectionLoad) -> Result<Offered> {
    if load.per_second == 0 || load.duration > MAX_DURATION {
        bail!("connection load {load:?}: rate 0 or longer than {MAX_DURATION:?}");
    }
    let interval_ns = 1_000_000_000 / u64::from(load.per_second);
    let give_up_ns = load.give_up_after.as_nanos() as u64;
    let target = SockAddr::from(load.to);
    let domain = Domain::for_address(load.to);
    let local_any = SocketAddr::new(
        if load.to.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        },
        0,
    );
    sleep_until_ns(load.start_at_ns);
    let start = monotonic_ns();
    let end = start + load.duration.as_nanos() as u64;
    // Attempts stop at `end`; the last ones are given their full time to finish.
    let hard_end = end + give_up_ns + PACING_TICK.as_nanos() as u64;
    let mut ports = load.source_ports.clone();
    let mut offered = Offered::default();
    let mut pending: Vec<Attempt> = Vec::new();
    let mut next_ns = start;
    loop {
        let now = monotonic_ns();
        if now >= hard_end || (now >= end && pending.is_empty()) {
            break;
        }
        while next_ns <= now && next_ns < end {
            let Some(port) = ports.next() else {
                bail!("connection load ran out of source ports after {offered:?}");
            };
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket
                .bind(&SockAddr::from(SocketAddr::new(local_any.ip(), port)))
                .with_context(|| format!("binding source port {port}"))?;
            match socket.connect(&target) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).with_context(|| format!("connecting to {}", load.to)),
            }
            let at = monotonic_ns();
            if offered.attempted == 0 {
                offered.first_ns = at;
            }
            offered.last_ns = at;
            offered.attempted += 1;
            pending.push(Attempt {
                socket,
                give_up_ns: at + give_up_ns,
            });
            next_ns += interval_ns;
        }
        // Wait for handshakes until the next attempt is due, at most a pacing tick (a whole
        // tick once the attempts are over).
        let tick_ns = PACING_TICK.as_nanos() as u64;
        let wait_ns = if next_ns < end {
            next_ns.saturating_sub(monotonic_ns()).min(tick_ns)
        } else {
            tick_ns
        };
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|a| libc::pollfd {
                fd: a.socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let timeout_ms = wait_ns.div_ceil(1_000_000) as i32;
        if fds.is_empty() {
            std::thread::sleep(Duration::from_nanos(wait_ns));
        } else {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error()).context("poll");
            }
        }
        let now = monotonic_ns();
        let mut still = Vec::with_capacity(pending.len());
        for (attempt, fd) in pending.into_iter().zip(&fds) {
            if fd.revents != 0 {
                // Writable: the handshake finished, or failed (reset, unreachable).
                if matches!(attempt.socket.take_error(), Ok(None)) {
                    offered.completed += 1;
                }
            } else if now < attempt.give_up_ns {
                still.push(attempt);
            }
            // Otherwise dropped: closed while in SYN-SENT, abandoned.
        }
        pending = still;
    }
    Ok(offered)
}

/// A TCP listener inside a namespace that accepts every connection, counts it and closes it.
pub struct AcceptCounter {
    accepted: Arc<AtomicU64>,
    _threads: SinkThreads,
}

/// A sink's threads and the flag that stops them; Drop stops and joins them.
struct SinkThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for SinkThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How often a sink blocked in accept or read looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

impl AcceptCounter {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let listener = listen_in(ns, addr)?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (Arc::clone(&accepted), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !readable(listener.as_raw_fd(), STOP_POLL) {
                        continue;
                    }
                    // Drain the queue; each accepted socket is closed as it is dropped.
                    while listener.accept().is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Self {
            accepted,
            _threads: SinkThreads {
                stop,
                threads: vec![thread],
            },
        })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The count once it has stopped changing for `quiet` (handshakes finishing after the
    /// last attempt), waiting at most `max_wait`.
    pub fn settled(&self, quiet: Duration, max_wait: Duration) -> u64 {
        settle(|| self.accepted(), quiet, max_wait)
    }
}

/// `read()` once it has not changed for `quiet`, or after `max_wait`.
fn settle(read: impl Fn() -> u64, quiet: Duration, max_wait: Duration) -> u64 {
    let step = Duration::from_millis(20);
    let mut last = read();
    let mut unchanged = Duration::ZERO;
    let mut waited = Duration::ZERO;
    while unchanged < quiet && waited < max_wait {
        std::thread::sleep(step);
        waited += step;
        let now = read();
        if now == last {
            unchanged += step;
        } else {
            (last, unchanged) = (now, Duration::ZERO);
        }
    }
    last
}

// ---- UDP datagrams at a fixed rate -------------------------------------------------------------

/// UDP datagrams of `payload` bytes to `to` from one socket (one flow), `per_second` of them,
/// for `duration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatagramLoad {
    pub to: SocketAddr,
    pub per_second: u32,
    pub duration: Duration,
    pub payload: usize,
}

/// Runs `load` from the calling thread's namespace. `completed` counts datagrams the kernel
/// took (a send that fails, e.g. ENOBUFS, is an attempt that did not complete).
pub fn offer_datagrams(load: &DatagramLoad) -> Result<Offered> {
    if load.per_second == 0 || load.duration > MAX_DURATION {
        bail!("datagram load {load:?}: rate 0 or longer than {MAX_DURATION:?}");
    }
    let any = if load.to.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(load.to)?;
    socket.set_nonblocking(true)?;
    let payload = crate::traffic::pseudo_random_bytes(load.payload, 7);
    let interval_ns = 1_000_000_000 / u64::from(load.per_second);
    let start = monotonic_ns();
    let end = start + load.duration.as_nanos() as u64;
    let mut offered = Offered::default();
    let mut next_ns = start;
    loop {
        let now = monotonic_ns();
        if now >= end {
            break;
        }
        while next_ns <= now {
            if offered.attempted == 0 {
                offered.first_ns = now;
            }
            offered.last_ns = now;
            offered.attempted += 1;
            if socket.send(&payload).is_ok() {
                offered.completed += 1;
            }
            next_ns += interval_ns;
        }
        sleep_until_ns(next_ns.min(now + PACING_TICK.as_nanos() as u64));
    }
    Ok(offered)
}

/// A UDP socket inside a namespace that counts the datagrams it receives.
pub struct DatagramCounter {
    received: Arc<AtomicU64>,
    _threads: SinkThreads,
}

/// Receive buffer asked for, so the sink never drops what the datapath let through. The
/// kernel caps it at net.core.rmem_max (SO_RCVBUFFORCE would not be: root).
const SINK_BUFFER: usize = 8 * 1024 * 1024;

impl DatagramCounter {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let socket = ns.run(move || -> std::io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_recv_buffer_size(SINK_BUFFER)?;
            s.bind(&SockAddr::from(addr))?;
            s.set_read_timeout(Some(STOP_POLL))?;
            Ok(s)
        })??;
        let socket: UdpSocket = socket.into();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Self {
            received,
            _threads: SinkThreads {
                stop,
                threads: vec![thread],
            },
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The count once it has stopped changing for `quiet`, waiting at most `max_wait`.
    pub fn settled(&self, quiet: Duration, max_wait: Duration) -> u64 {
        settle(|| self.received(), quiet, max_wait)
    }
}

// ---- Bulk TCP ----------------------------------------------------------------------------------

/// Sends as fast as TCP allows over one connection to `to` for `duration` (from the calling
/// thread's namespace), then closes it. `attempted` and `completed` are the bytes written.
/// Fails if the connection cannot be opened or breaks.
pub fn send_bulk(to: SocketAddr, duration: Duration) -> Result<Offered> {
    if duration > MAX_DURATION {
        bail!("bulk send longer than {MAX_DURATION:?}");
    }
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    // Short write timeouts so the loop looks at its deadline while a limiter holds it back.
    stream.set_write_timeout(Some(Duration::from_millis(100)))?;
    let chunk = crate::traffic::pseudo_random_bytes(256 * 1024, 11);
    let start = monotonic_ns();
    let end = start + duration.as_nanos() as u64;
    let mut offered = Offered {
        first_ns: start,
        ..Offered::default()
    };
    while monotonic_ns() < end {
        match stream.write(&chunk) {
            Ok(0) => bail!("bulk send to {to}: connection closed after {offered:?}"),
            Ok(n) => offered.attempted += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).with_context(|| format!("bulk send to {to}: {offered:?}")),
        }
    }
    offered.last_ns = monotonic_ns();
    offered.completed = offered.attempted;
    Ok(offered)
}

/// A TCP listener inside a namespace that reads one connection to its end and keeps a timeline
/// of the bytes received, for goodput over any part of a transfer.
pub struct BulkSink {
    /// (CLOCK_MONOTONIC ns, bytes received so far), at most one sample a millisecond.
    timeline: Arc<Mutex<Vec<(u64, u64)>>>,
    _threads: SinkThreads,
}

/// Samples kept per sink: a minute of one a millisecond.
const MAX_SAMPLES: usize = 60_000;

impl BulkSink {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        let listener = listen_in(ns, addr)?;
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (timeline, stop) = (Arc::clone(&timeline), Arc::clone(&stop));
            std::thread::spawn(move || {
                let conn = loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if readable(listener.as_raw_fd(), STOP_POLL) {
                        if let Ok((conn, _)) = listener.accept() {
                            break conn;
                        }
                    }
                };
                let mut stream: TcpStream = conn.into();
                if stream.set_nonblocking(false).is_err()
                    || stream.set_read_timeout(Some(STOP_POLL)).is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 256 * 1024];
                let (mut total, mut last_sample) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                    let now = monotonic_ns();
                    if now >= last_sample + 1_000_000 {
                        last_sample = now;
                        let mut t = timeline.lock().unwrap();
                        if t.len() < MAX_SAMPLES {
                            t.push((now, total));
                        }
                    }
                }
                let mut t = timeline.lock().unwrap();
                if t.len() < MAX_SAMPLES {
                    t.push((monotonic_ns(), total));
                }
            })
        };
        Ok(Self {
            timeline,
            _threads: SinkThreads {
                stop,
                threads: vec![thread],
            },
        })
    }

    /// Bytes received by CLOCK_MONOTONIC instant `ns` (as of the last sample at or before it).
    pub fn received_by(&self, ns: u64) -> u64 {
        let t = self.timeline.lock().unwrap();
        t.iter()
            .take_while(|(at, _)| *at <= ns)
            .last()
            .map_or(0, |&(_, bytes)| bytes)
    }

    /// When the first bytes arrived, if any did.
    pub fn first_bytes_ns(&self) -> Option<u64> {
        let t = self.timeline.lock().unwrap();
        t.iter().find(|(_, bytes)| *bytes > 0).map(|&(at, _)| at)
    }

    /// Bytes per second received between the CLOCK_MONOTONIC instants `from_ns` and `to_ns`.
    pub fn goodput(&self, from_ns: u64, to_ns: u64) -> f64 {
        let bytes = self.received_by(to_ns) - self.received_by(from_ns);
        bytes as f64 / (to_ns.saturating_sub(from_ns) as f64 / 1e9).max(1e-9)
    }

    /// The sender's steady state: goodput from `skip` after the first bytes arrived until the
    /// sender stopped (`sent.last_ns`).
    pub fn steady_goodput(&self, sent: &Offered, skip: Duration) -> Result<f64> {
        let first = self
            .first_bytes_ns()
            .ok_or_else(|| anyhow!("no bytes arrived"))?;
        let from = first + skip.as_nanos() as u64;
        if from + 500_000_000 > sent.last_ns {
            bail!("the transfer was too short to skip {skip:?} and measure 0.5 s");
        }
        Ok(self.goodput(from, sent.last_ns))
    }
}
