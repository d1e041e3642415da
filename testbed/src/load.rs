//! Load generators for `cargo xtask bench --traffic`: a connection-rate test (many short TCP
//! connections from a few workers, like netperf TCP_CRR without the payload) and a
//! request/response test (one byte each way on one TCP connection, like netperf TCP_RR). The
//! servers run on threads whose sockets live in the server's namespace, the clients on threads
//! that entered the client's namespace.
//!
//! Every loop is bounded by a deadline, every blocking call by a socket timeout, and a server's
//! threads stop and are joined when it is dropped, so its listening socket (which holds a
//! reference to its namespace) is closed with it.

use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::NetNs;

/// How long one connect, read or write may block before the attempt counts as failed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a server thread blocked in accept or read looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Deep enough that the accept queue never overflows under a few busy clients (an overflow
/// drops SYNs and costs the client a one-second retransmission).
const LISTEN_BACKLOG: i32 = 4096;

/// What a client loop achieved in its measured time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    /// Completed operations: connections opened and closed, or request/response round trips.
    pub completed: u64,
    /// Operations that failed or timed out.
    pub failed: u64,
    pub elapsed: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// A listening TCP socket created inside `ns`, non-blocking so its accept loop can stop.
pub(crate) fn listen_in(ns: &NetNs, addr: SocketAddr) -> Result<Socket> {
    let socket = ns.run(move || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(addr))?;
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    socket.with_context(|| format!("listening on {addr} in {}", ns.name()))
}

/// Waits up to `within` for `fd` to become readable; true if it did.
pub(crate) fn readable(fd: RawFd, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, within.as_millis() as i32) };
    n > 0
}

/// A server's threads and the flag that stops them; Drop stops and joins them.
struct ServerThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for ServerThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP server that accepts connections and closes each one at once. The server closes
/// first, so TIME_WAIT stays on the server side and the client may reuse its ports at once.
pub struct AcceptCloseServer {
    _threads: ServerThreads,
}

impl AcceptCloseServer {
    /// Listens on `addr` inside `ns` with `acceptors` threads sharing the socket.
    pub fn start(ns: &NetNs, addr: SocketAddr, acceptors: usize) -> Result<Self> {
        let listener = Arc::new(listen_in(ns, addr)?);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..acceptors.max(1))
            .map(|_| {
                let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if !readable(listener.as_raw_fd(), STOP_POLL) {
                            continue;
                        }
                        // Another acceptor may have taken it: WouldBlock, try again. The
                        // accepted socket is dropped at once, which closes it.
                        let _ = listener.accept();
                    }
                })
            })
            .collect();
        Ok(Self {
            _threads: ServerThreads { stop, threads },
        })
    }
}

/// A TCP server that answers every byte it reads with one byte, one connection at a time.
pub struct ByteEchoServer {
    _threads: ServerThreads,
}

impl ByteEchoServer {
    /// Listens on `addr` inside `ns`; with `cpu`, its thread runs on that CPU only.
    pub fn start(ns: &NetNs, addr: SocketAddr, cpu: Option<usize>) -> Result<Self> {
        let listener = listen_in(ns, addr)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    if pin_current_thread(cpu).is_err() {
                        return;
                    }
                }
                while !stop.load(Ordering::Relaxed) {
                    if !readable(listener.as_raw_fd(), STOP_POLL) {
                        continue;
                    }
                    let Ok((conn, _)) = listener.accept() else {
                        continue;
                    };
                    serve_bytes(conn, &stop);
                }
            })
        };
        Ok(Self {
            _threads: ServerThreads {
                stop,
                threads: vec![thread],
            },
        })
    }
}

/// Echoes one byte per read until the peer closes, an error, or `stop`.
fn serve_bytes(conn: Socket, stop: &AtomicBool) {
    let mut stream: TcpStream = conn.into();
    if stream.set_nonblocking(false).is_err()
        || stream.set_nodelay(true).is_err()
        || stream.set_read_timeout(Some(STOP_POLL)).is_err()
        || stream.set_write_timeout(Some(IO_TIMEOUT)).is_err()
    {
        return;
    }
    let mut byte = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut byte) {
            Ok(0) => return,
            Ok(_) => {
                if stream.write_all(&byte).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Restricts the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set we own; the index is checked by the macro.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is valid for the call.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Spawns a thread that enters `ns` and then runs `f`: sockets it creates belong to `ns`.
fn spawn_in<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<std::io::Result<T>>> {
    let file = File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: plain syscall on a valid fd; affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    }))
}

/// One connection as the connection-rate test makes it: connect, wait for the server's close,
/// close. Connect and read are bounded by `IO_TIMEOUT` (on Linux SO_SNDTIMEO bounds a blocking
/// connect).
fn open_and_close(to: &SockAddr, domain: Domain) -> std::io::Result<()> {
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.connect(to)?;
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match s.recv(&mut byte)? {
        0 => Ok(()),
        _ => Err(ErrorKind::InvalidData.into()),
    }
}

/// New TCP connections per second: `workers` threads in `ns` each open and close connections
/// to `to` (an `AcceptCloseServer`) back to back for `duration`. A connection counts once the
/// client has seen the server's close.
pub fn connection_rate(
    ns: &NetNs,
    to: SocketAddr,
    workers: usize,
    duration: Duration,
) -> Result<Rate> {
    let start = Instant::now();
    let deadline = start + duration;
    let handles = (0..workers.max(1))
        .map(|_| {
            spawn_in(ns, move || {
                let target = SockAddr::from(to);
                let domain = Domain::for_address(to);
                let (mut completed, mut failed) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match open_and_close(&target, domain) {
                        Ok(()) => completed += 1,
                        Err(_) => failed += 1,
                    }
                }
                (completed, failed)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rate = Rate::default();
    for h in handles {
        let (completed, failed) = h
            .join()
            .map_err(|_| anyhow!("connection worker panicked"))?
            .with_context(|| format!("entering namespace {}", ns.name()))?;
        rate.completed += completed;
        rate.failed += failed;
    }
    rate.elapsed = start.elapsed();
    Ok(rate)
}

/// Request/response transactions per second on one TCP connection from `ns` to `to` (a
/// `ByteEchoServer`): write one byte, read one byte, for `duration`. Fails if the connection
/// cannot be opened or breaks; the time until then is not hidden in a lower rate. With `cpu`,
/// the client thread runs on that CPU only: pinned to the server's CPU, each transaction's
/// work stays on one CPU and no cross-CPU wakeup (an expensive IPI in a VM) decides the rate.
pub fn request_response_rate(
    ns: &NetNs,
    to: SocketAddr,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<Rate> {
    let worker = spawn_in(ns, move || -> std::io::Result<Rate> {
        if let Some(cpu) = cpu {
            pin_current_thread(cpu)?;
        }
        let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let start = Instant::now();
        let deadline = start + duration;
        let mut rate = Rate::default();
        let mut byte = [b'x'; 1];
        while Instant::now() < deadline {
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)?;
            rate.completed += 1;
        }
        rate.elapsed = start.elapsed();
        Ok(rate)
    })?;
    let rate = worker
        .join()
        .map_err(|_| anyhow!("request/response client panicked"))?
        .with_context(|| format!("entering namespace {}", ns.name()))?
        .with_context(|| format!("request/response on one connection to {to}"))?;
    if rate.completed == 0 {
        bail!("request/response to {to}: no transaction completed");
    }
    Ok(rate)
}

/// Is `to` reachable from `ns` through whatever filters lie between, as the connection-rate
/// test will use it? One connection to an `AcceptCloseServer`, bounded by `IO_TIMEOUT`.
pub fn accept_close_reachable(ns: &NetNs, to: SocketAddr) -> Result<()> {
    ns.run(move || open_and_close(&SockAddr::from(to), Domain::for_address(to)))?
        .with_context(|| format!("one TCP connection to {to}"))
}

/// What a connection attempt to a port nobody listens on tells about the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedPortProbe {
    /// The server's kernel answered with a reset: nothing in between dropped the SYN.
    Refused,
    /// No answer within the timeout: something in between dropped the SYN.
    Dropped,
    /// A connection was established: something listens there after all.
    Connected,
}

/// Connects from `ns` to `to`, where nothing listens, waiting at most `timeout`.
pub fn probe_closed_port(ns: &NetNs, to: SocketAddr, timeout: Duration) -> Result<ClosedPortProbe> {
    let outcome = ns.run(move || TcpStream::connect_timeout(&to, timeout))?;
    match outcome {
        Ok(_) => Ok(ClosedPortProbe::Connected),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(ClosedPortProbe::Refused),
        Err(e) if is_timeout(&e) => Ok(ClosedPortProbe::Dropped),
        Err(e) => Err(e).with_context(|| format!("probing {to}")),
    }
}
