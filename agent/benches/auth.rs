//! `cargo bench -p tollgate-agent --bench auth` (also run by `cargo xtask bench`): the auth
//! listener's mutual TLS 1.3 handshakes (ECDSA P-256 SVIDs from the development CA, X25519,
//! the ring provider) per second and per second of server CPU, `openssl s_server`/`s_time` on the
//! same certificates in the same invocation, and the time from an SVID file change to the new
//! SVID in use. Needs no root. Results go to stdout (progress to stderr); docs/benchmarks.md
//! records them. It reports numbers and ratios and never fails on a time.
//!
//! Method:
//! - Crypto floor: the primitives one server handshake cannot avoid, timed in this process
//!   (ring through rustls and webpki, as the agent calls them): an ECDSA P-256 signature (the
//!   server's CertificateVerify), a verification (the client's CertificateVerify), an X25519
//!   key pair and agreement, `verify_svid` on the client's chain (x509 parse, SVID rules,
//!   webpki path building: one more verification) as the rustls verifier runs it, and
//!   `accepted_chain`, which `serve_connection` runs after the handshake to read what the
//!   verifier accepted. Beside them `openssl speed` for the same primitives, and what building
//!   a `ClientConfig` costs (the client builds one per handshake in `initiate`).
//! - Handshakes: five rounds, each running every setup below once (0.5 s warm-up, 2 s
//!   measured), the order rotating from round to round; medians and ranges over the rounds,
//!   and ratios between setups taken within a round. The VM is shared and drifts by tens of
//!   percent over a minute; interleaving keeps the comparisons fair. Steal time (/proc/stat)
//!   over the rounds is printed with them.
//! - Handshakes, tollgate: a TCP listener on 127.0.0.1 served by the agent's own listener loop
//!   (`manager::serve`: at most `MAX_SERVED` at once and `MAX_SERVED_PER_PEER` per address,
//!   `handshake::serve_connection` per connection) on a tokio current_thread runtime in its own
//!   OS thread pinned to CPU 0; the auth manager is stood in for by a task on that runtime
//!   answering every `GrantRequest` with now + 10 min. Clients: `handshake::initiate_from`
//!   loops on a current_thread runtime in another thread pinned to CPU 1: 32 in flight
//!   (saturation), spread over 127.0.0.1–4 so that no address reaches `MAX_SERVED_PER_PEER`,
//!   then 1 (sequential, like `s_time`), then 32 in flight again against a server whose bundles
//!   keep no chain cache (`TrustBundles::without_chain_cache`: every client chain validated in
//!   full, as for a certificate the server has not seen before). Handshakes/s is the clients' completions in the window over its wall time; per core is
//!   the server's completed connections in the window over the server thread's CPU time
//!   (`CLOCK_THREAD_CPUTIME_ID`, read on that thread, kernel time of its syscalls included) in
//!   the same window. Latency is the client's, connect to answer.
//! - Handshakes, openssl: the same server and client certificates, key and CA written to a
//!   temporary directory, one `openssl s_server -tls1_3 -Verify 1` (client certificate
//!   required) pinned to CPU 0 for all rounds, and in each round one `openssl s_time -new`
//!   (sequential full handshakes, one process) pinned to CPU 1 for 2 s: s_time's count over
//!   the wall time of the s_time process, and over s_server's CPU time
//!   (`/proc/<pid>/schedstat`) in that time. s_server is killed by its pid at the end.
//! - The second validation: `serve_connection` used to run `verify_svid` on the client's chain
//!   again after the handshake; it now reads what the verifier accepted (`accepted_chain`). To
//!   measure what that was worth, one more server at 32 in flight has its stand-in manager run
//!   `verify_svid_uncached` on the client's chain (on the server thread) in alternate 1 s phases: 10
//!   pairs, the order within a pair alternating, ratios within a pair. Alternating phases on
//!   one server rather than separate runs, because the effect is smaller than the drift.
//! - SVID reload: a `DirectorySource` over a temporary directory holding the server's SVID
//!   (csi-driver-spiffe file names), `source::follow` at the agent's `SVID_POLL` feeding a
//!   watch channel, and a consumer doing what the auth manager does with a reading (keep the
//!   previous SVID of an ID whose directory reads broken, `SvidResolver::replace`). The SVID
//!   is re-issued (new key, same SPIFFE ID) and written with `IssuedSvid::write` 20 times, each
//!   after a pseudo-random 0–700 ms pause so the writes fall at all points of the poll cycle;
//!   latency is from the write's return to the consumer having replaced the resolver with the
//!   new leaf (DER compared). Then end to end, 5 more rotations with the listener serving from
//!   that resolver and a client handshaking every 20 ms: from the write's return to the end of
//!   the first handshake that saw the new server certificate.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc, Arc, RwLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use rustls::{pki_types::UnixTime, SignatureScheme};
use tokio::sync::{mpsc, oneshot, watch};

use tokio_rustls::TlsAcceptor;
use tollgate_agent::{
    auth::{
        handshake::{self, GrantRequest},
        manager::{self, HANDSHAKE_DEADLINE, MAX_SERVED, SVID_POLL},
        stats::{AuthStats, Reporter},
    },
    identity::{
        ca::{DevCa, IssuedSvid},
        client_config, server_config,
        source::{follow, DirectorySource, FileNames, Loaded, SvidSource},
        verify::{accepted_chain, SharedBundles},
        verify_svid, verify_svid_uncached, SpiffeId, Svid, SvidResolver, TrustBundle, TrustBundles,
        TrustDomain, Usage,
    },
};

const TRUST_DOMAIN: &str = "bench.test";
const SERVER_ID: &str = "spiffe://bench.test/agent/server";
const CLIENT_ID: &str = "spiffe://bench.test/agent/client";
const SVID_TTL: Duration = Duration::from_secs(3600);
/// What the stand-in manager grants.
const PROOF_TTL: Duration = Duration::from_secs(600);
const ROUNDS: usize = 5;
const WARMUP: Duration = Duration::from_millis(500);
/// Whole seconds: `s_time -time` takes seconds.
const MEASURE: Duration = Duration::from_secs(2);
const IN_FLIGHT: usize = 32;
/// The second-validation comparison: pairs of phases (without, with) on one server.
const AB_PAIRS: usize = 10;
const AB_PHASE: Duration = Duration::from_secs(1);
/// After switching, before a phase is measured (handshakes past their grant finish).
const AB_SETTLE: Duration = Duration::from_millis(100);
/// Client source addresses 127.0.0.1..=this, so 32 in flight stay under the per-address cap.
const CLIENT_ADDRESSES: u8 = 4;
const SERVER_CPU: usize = 0;
const CLIENT_CPU: usize = 1;
const ROTATIONS: usize = 20;
const E2E_ROTATIONS: usize = 5;
/// Pauses before each rotation are drawn from 0..this.
const MAX_OFFSET_MS: u64 = 700;
const E2E_PROBE_EVERY: Duration = Duration::from_millis(20);
/// A rotation not seen within this is counted as missed.
const ROTATION_WAIT: Duration = Duration::from_secs(5);

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let started = Instant::now();
    let pki = Pki::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cpus >= 2;
    println!("tollgate auth bench: mutual TLS 1.3, ECDSA P-256 SVIDs, X25519, rustls 0.23 + ring");
    println!(
        "machine: {cpus} CPUs ({}); {}",
        cpu_model(),
        if pin {
            format!("servers pinned to CPU {SERVER_CPU}, clients to CPU {CLIENT_CPU}")
        } else {
            "one CPU: nothing pinned".to_owned()
        }
    );
    println!("load average at start: {}", loadavg());
    println!();

    eprintln!("  crypto floor ...");
    let floor = crypto_floor(&pki);
    let speed = openssl_speed();
    print_floor(&floor, speed.as_ref());

    let (rounds, verify_errors, steal) = rounds(&pki, pin);
    print_handshakes(&floor, &rounds, verify_errors, steal);
    eprintln!("  a second verify_svid, {AB_PAIRS} pairs of phases ...");
    let pairs = revalidate_run(&pki, pin);
    print_revalidate(&floor, &pairs);

    eprintln!("  SVID reload ({ROTATIONS} rotations, then {E2E_ROTATIONS} end to end) ...");
    let reload = reload_run(&pki);
    print_reload(&reload);
    println!("load average at the end: {}", loadavg());
    eprintln!("  done in {:.0} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct Pki {
    ca: DevCa,
    server_id: SpiffeId,
    client_id: SpiffeId,
    server: IssuedSvid,
    client: IssuedSvid,
    server_svid: Svid,
    client_svid: Arc<Svid>,
    bundles: TrustBundles,
}

impl Pki {
    fn new() -> Pki {
        let td = TrustDomain::parse(TRUST_DOMAIN).expect("trust domain");
        let ca = DevCa::init(td.clone(), Duration::from_secs(86_400)).expect("dev CA");
        let server_id = SpiffeId::parse(SERVER_ID).expect("server ID");
        let client_id = SpiffeId::parse(CLIENT_ID).expect("client ID");
        let server = ca.issue(&server_id, SVID_TTL).expect("server SVID");
        let client = ca.issue(&client_id, SVID_TTL).expect("client SVID");
        let svid = |s: &IssuedSvid| {
            Svid::from_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes()).expect("SVID")
        };
        let mut bundles = TrustBundles::new();
        bundles.add(TrustBundle::from_pem(td, ca.bundle_pem().as_bytes()).expect("bundle"));
        Pki {
            server_svid: svid(&server),
            client_svid: Arc::new(svid(&client)),
            ca,
            server_id,
            client_id,
            server,
            client,
            bundles,
        }
    }

    fn shared_bundles(&self) -> SharedBundles {
        Arc::new(RwLock::new(self.bundles.clone()))
    }

    /// The bundles as a server that validates every client chain in full sees them: what a
    /// handshake with a certificate it has not seen before costs.
    fn shared_bundles_uncached(&self) -> SharedBundles {
        Arc::new(RwLock::new(self.bundles.clone().without_chain_cache()))
    }
}

// ---------------------------------------------------------------------------------------------
// Threads, CPUs, clocks

/// Pins the calling thread (`pid` 0) or process `pid` to one CPU; false if it could not.
fn pin(pid: libc::pid_t, cpu: usize) -> bool {
    // SAFETY: `set` is a plain bit set initialised here; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// CPU time of the calling thread, user and system.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current thread's CPU clock into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of process `pid` (all its threads): the first field of `/proc/<pid>/schedstat`.
fn process_cpu(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The 1, 5 and 15 minute load averages, to tell a quiet run from a busy one.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".to_owned())
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Crypto floor

struct Floor {
    sign: Duration,
    verify: Duration,
    kx: Duration,
    /// P-256 ECDHE, for comparison (not in the floor: clients offer X25519 first).
    kx_p256: Duration,
    verify_svid: Duration,
    /// `verify_svid` on a chain the bundles accepted before (a cache hit).
    verify_svid_hit: Duration,
    accepted_chain: Duration,
    client_config: Duration,
}

impl Floor {
    /// What one server handshake spends in public-key crypto and certificate checks: sign,
    /// verify the client's CertificateVerify, the key exchange, `verify_svid` in the rustls
    /// verifier, `accepted_chain` after the handshake.
    fn server(&self) -> Duration {
        self.sign + self.verify + self.kx + self.verify_svid + self.accepted_chain
    }

    /// The same with a client chain the server has accepted before (the cache answers).
    fn server_cached(&self) -> Duration {
        self.sign + self.verify + self.kx + self.verify_svid_hit + self.accepted_chain
    }
}

/// Per-call time of `f`: calls in batches of at least 50 ms, the median of 7 batches.
fn per_call(mut f: impl FnMut()) -> Duration {
    let mut n = 1u32;
    loop {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        if t.elapsed() >= Duration::from_millis(50) {
            break;
        }
        n *= 2;
    }
    let mut batches: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed() / n
        })
        .collect();
    batches.sort();
    batches[batches.len() / 2]
}

fn crypto_floor(pki: &Pki) -> Floor {
    // A TLS 1.3 CertificateVerify input: 64 spaces, the context string, a zero, a SHA-256.
    let message = [0x20u8; 130];
    let key = pki.server_svid.certified_key();
    let sign_once = || {
        key.key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .expect("an ECDSA P-256 key")
            .sign(&message)
            .expect("signing")
    };
    let signature = sign_once();
    let sign = per_call(|| {
        std::hint::black_box(sign_once());
    });
    let (_, leaf) = x509_parser::parse_x509_certificate(&pki.server_svid.chain[0]).expect("leaf");
    let public_key = leaf.public_key().subject_public_key.data.to_vec();
    let alg = webpki::ring::ECDSA_P256_SHA256;
    alg.verify_signature(&public_key, &message, &signature)
        .expect("the signature verifies");
    let verify = per_call(|| {
        std::hint::black_box(alg.verify_signature(&public_key, &message, &signature)).ok();
    });

    let provider = rustls::crypto::ring::default_provider();
    let group = provider.kx_groups[0];
    assert_eq!(
        group.name(),
        rustls::NamedGroup::X25519,
        "rustls' first group"
    );
    let peer = group.start().expect("X25519").pub_key().to_vec();
    let kx = per_call(|| {
        std::hint::black_box(group.start_and_complete(&peer).expect("X25519"));
    });
    // The group a server could prefer instead (rustls' second).
    let p256 = provider
        .kx_groups
        .iter()
        .find(|g| g.name() == rustls::NamedGroup::secp256r1)
        .expect("the ring provider offers secp256r1");
    let p256_peer = p256.start().expect("secp256r1").pub_key().to_vec();
    let kx_p256 = per_call(|| {
        std::hint::black_box(p256.start_and_complete(&p256_peer).expect("secp256r1"));
    });

    let chain = &pki.client_svid.chain;
    verify_svid(chain, &pki.bundles, UnixTime::now(), Usage::ClientAuth).expect("client SVID");
    let svid_check = per_call(|| {
        std::hint::black_box(verify_svid_uncached(
            chain,
            &pki.bundles,
            UnixTime::now(),
            Usage::ClientAuth,
        ))
        .ok();
    });
    // The chain was accepted above: these are answered by the bundles' cache.
    let svid_hit = per_call(|| {
        std::hint::black_box(verify_svid(
            chain,
            &pki.bundles,
            UnixTime::now(),
            Usage::ClientAuth,
        ))
        .ok();
    });
    accepted_chain(chain).expect("client SVID");
    let read_chain = per_call(|| {
        std::hint::black_box(accepted_chain(chain)).ok();
    });
    let bundles = pki.shared_bundles();
    let config_build = per_call(|| {
        std::hint::black_box(client_config(
            &pki.client_svid,
            pki.server_id.clone(),
            bundles.clone(),
        ));
    });
    Floor {
        sign,
        verify,
        kx,
        kx_p256,
        verify_svid: svid_check,
        verify_svid_hit: svid_hit,
        accepted_chain: read_chain,
        client_config: config_build,
    }
}

/// `openssl speed` for the same primitives: ECDSA P-256 sign and verify, X25519 agreement
/// (per operation).
struct Speed {
    sign: Duration,
    verify: Duration,
    x25519: Duration,
}

fn openssl_speed() -> Option<Speed> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "1", "ecdsap256", "ecdhx25519"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // " 256 bits ecdsa (nistp256)   0.0000s   0.0001s  31201.2   8892.0"
    // " 253 bits ecdh (X25519)   0.0000s  22284.6"
    let rates = |needle: &str| -> Option<Vec<f64>> {
        let line = text.lines().find(|l| l.contains(needle))?;
        let after = line.split_once(')')?.1;
        Some(
            after
                .split_whitespace()
                .filter(|w| !w.ends_with('s'))
                .filter_map(|w| w.parse().ok())
                .collect(),
        )
    };
    let per_op = |rate: f64| Duration::from_secs_f64(1.0 / rate);
    let ecdsa = rates("ecdsa (nistp256)")?;
    let x25519 = rates("ecdh (X25519)")?;
    Some(Speed {
        sign: per_op(*ecdsa.first()?),
        verify: per_op(*ecdsa.get(1)?),
        x25519: per_op(*x25519.first()?),
    })
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn print_floor(f: &Floor, speed: Option<&Speed>) {
    let o = |pick: fn(&Speed) -> Duration| speed.map_or("n/a".to_owned(), |s| us(pick(s)));
    println!("Crypto, per operation (one thread)");
    println!("| operation | rustls + ring | openssl speed |");
    println!("|---|---|---|");
    println!("| ECDSA P-256 sign | {} | {} |", us(f.sign), o(|s| s.sign));
    println!(
        "| ECDSA P-256 verify | {} | {} |",
        us(f.verify),
        o(|s| s.verify)
    );
    println!(
        "| X25519 key pair + agreement (openssl: agreement only) | {} | {} |",
        us(f.kx),
        o(|s| s.x25519)
    );
    println!(
        "| P-256 ECDHE key pair + agreement (not used: X25519 is negotiated) | {} | |",
        us(f.kx_p256)
    );
    println!(
        "| verify_svid on the client's chain (parse, rules, 1 verify) | {} | |",
        us(f.verify_svid)
    );
    println!(
        "| verify_svid on a chain accepted before (the chain cache: SHA-256 of the chain, lookup, time check) | {} | |",
        us(f.verify_svid_hit)
    );
    println!(
        "| accepted_chain on the same chain (parse, SVID rules: what the handshake reads after) | {} | |",
        us(f.accepted_chain)
    );
    println!(
        "| client_config() (built per handshake by initiate) | {} | |",
        us(f.client_config)
    );
    println!(
        "Server floor per handshake (sign + verify + X25519 + verify_svid + accepted_chain): {} = at most {:.0} handshakes per CPU-second; with the client chain seen before, {} = at most {:.0}",
        us(f.server()),
        1.0 / f.server().as_secs_f64(),
        us(f.server_cached()),
        1.0 / f.server_cached().as_secs_f64()
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// Handshakes: tollgate

#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    cpu: Duration,
    served: u64,
    failed: u64,
}

enum Probe {
    Snapshot(oneshot::Sender<Snap>),
    Stop,
}

/// The agent's auth listener (`manager::serve`) with a stand-in for the manager that grants
/// every request and counts it in `served`; what fails before a grant is counted by the
/// listener in `stats`.
///
/// `revalidate`: the stand-in manager also runs `verify_svid_uncached` on the client's chain
/// before it answers, on the same thread: the second path validation `serve_connection` did
/// until it read the verifier's result instead (`accepted_chain`), to measure what that was
/// worth.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    bundles: SharedBundles,
    revalidate: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    stats: Arc<AuthStats>,
) {
    let (grants, mut asked) = mpsc::channel::<GrantRequest>(MAX_SERVED);
    tokio::spawn(async move {
        while let Some(g) = asked.recv().await {
            if revalidate.load(Ordering::Relaxed) {
                let trusted = bundles.read().unwrap_or_else(|p| p.into_inner());
                let checked = verify_svid_uncached(
                    &g.client_chain,
                    &trusted,
                    UnixTime::now(),
                    Usage::ClientAuth,
                );
                assert!(checked.is_ok(), "the bench's client SVID verifies");
            }
            if g.reply.send(Ok(SystemTime::now() + PROOF_TTL)).is_ok() {
                served.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    manager::serve(
        listener,
        acceptor,
        grants,
        "bench-server".to_owned(),
        stats,
        Arc::new(Reporter::new(None)),
    )
    .await;
}

/// Server handshakes the listener counted as failed (busy, TLS, timeouts).
fn failed_handshakes(stats: &AuthStats) -> u64 {
    stats
        .handshakes()
        .into_iter()
        .filter(|((role, result), _)| *role == "server" && *result != "ok")
        .map(|(_, n)| n)
        .sum()
}

/// A server thread; stopped and joined on drop.
struct ServerThread {
    addr: SocketAddr,
    probe: mpsc::UnboundedSender<Probe>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// The listener with the agent's `server_config` over `resolver` (`revalidate`: see
    /// [`serve`]).
    fn start(
        pki: &Pki,
        resolver: Arc<SvidResolver>,
        revalidate: Arc<AtomicBool>,
        cpu: Option<usize>,
        cached: bool,
    ) -> ServerThread {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a listener");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local address");
        let bundles = if cached {
            pki.shared_bundles()
        } else {
            pki.shared_bundles_uncached()
        };
        let acceptor = handshake::acceptor(server_config(resolver, bundles.clone()));
        let (probe, mut probes) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("auth-server".to_owned())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin(0, cpu);
                }
                current_thread_runtime().block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let served = Arc::default();
                    let stats = Arc::new(AuthStats::new(None, "bench".to_owned()));
                    let server = tokio::spawn(serve(
                        listener,
                        acceptor,
                        bundles,
                        revalidate,
                        Arc::clone(&served),
                        Arc::clone(&stats),
                    ));
                    while let Some(p) = probes.recv().await {
                        match p {
                            Probe::Snapshot(reply) => {
                                let _ = reply.send(Snap {
                                    cpu: thread_cpu(),
                                    served: served.load(Ordering::Relaxed),
                                    failed: failed_handshakes(&stats),
                                });
                            }
                            Probe::Stop => break,
                        }
                    }
                    server.abort();
                });
            })
            .expect("server thread");
        ServerThread {
            addr,
            probe,
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let _ = self.probe.send(Probe::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn snapshot(probe: &mpsc::UnboundedSender<Probe>) -> Snap {
    let (tx, rx) = oneshot::channel();
    probe
        .send(Probe::Snapshot(tx))
        .expect("server thread alive");
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("server snapshot in time")
        .expect("server snapshot")
}

struct Run {
    in_flight: usize,
    window: Duration,
    completed: u64,
    latencies: Vec<Duration>,
    server_handshakes: u64,
    server_failed: u64,
    server_cpu: Duration,
    client_cpu: Duration,
    /// Failures seen by the clients (warm-up included), by result, with one message.
    failures: BTreeMap<&'static str, (u64, String)>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.completed as f64 / self.window.as_secs_f64()
    }

    fn busy(&self) -> f64 {
        100.0 * self.server_cpu.as_secs_f64() / self.window.as_secs_f64()
    }

    fn client_cpu_per_handshake(&self) -> f64 {
        self.client_cpu.as_secs_f64() / self.completed.max(1) as f64
    }

    fn per_server_cpu(&self) -> f64 {
        self.server_handshakes as f64 / self.server_cpu.as_secs_f64()
    }
}

/// `cached`: the server keeps the client chains it accepted (as the agent does); without, it
/// validates each in full (a client certificate it has not seen before).
fn tollgate_run(pki: &Pki, in_flight: usize, pin_cpus: bool, cached: bool) -> Run {
    clients_against_server(pki, in_flight, None, pin_cpus, cached).0
}

/// 32 in flight against one server whose stand-in manager runs a second `verify_svid` in
/// alternate phases: per server CPU-second (without, with) for each pair of phases.
fn revalidate_run(pki: &Pki, pin_cpus: bool) -> Vec<(f64, f64)> {
    let flag = Arc::new(AtomicBool::new(false));
    clients_against_server(pki, IN_FLIGHT, Some(flag), pin_cpus, true).1
}

fn clients_against_server(
    pki: &Pki,
    in_flight: usize,
    alternate: Option<Arc<AtomicBool>>,
    pin_cpus: bool,
    cached: bool,
) -> (Run, Vec<(f64, f64)>) {
    let resolver = Arc::new(SvidResolver::new(std::slice::from_ref(&pki.server_svid)));
    let revalidate = alternate.clone().unwrap_or_default();
    let server = ServerThread::start(
        pki,
        resolver,
        revalidate,
        pin_cpus.then_some(SERVER_CPU),
        cached,
    );
    let addr = server.addr;
    let probe = server.probe.clone();
    let (svid, server_id, client_id) = (
        Arc::clone(&pki.client_svid),
        pki.server_id.clone(),
        pki.client_id.clone(),
    );
    let bundles = pki.shared_bundles();
    let client = std::thread::Builder::new()
        .name("auth-clients".to_owned())
        .spawn(move || {
            if pin_cpus {
                pin(0, CLIENT_CPU);
            }
            current_thread_runtime().block_on(clients(
                addr,
                svid,
                (server_id, client_id),
                bundles,
                in_flight,
                probe,
                alternate,
            ))
        })
        .expect("client thread");
    let run = client.join().expect("client thread");
    drop(server);
    run
}

/// `in_flight` handshake loops against `addr` (presenting `svid` as the client ID, expecting
/// the server ID), the measurement windows, and the phases of `alternate` if given.
async fn clients(
    addr: SocketAddr,
    svid: Arc<Svid>,
    (server_id, client_id): (SpiffeId, SpiffeId),
    bundles: SharedBundles,
    in_flight: usize,
    probe: mpsc::UnboundedSender<Probe>,
    alternate: Option<Arc<AtomicBool>>,
) -> (Run, Vec<(f64, f64)>) {
    let start = tokio::time::Instant::now();
    let measured = match alternate {
        Some(_) => (AB_SETTLE + AB_PHASE) * 2 * AB_PAIRS as u32,
        None => MEASURE,
    };
    let (from, until) = (start + WARMUP, start + WARMUP + measured);
    let loops: Vec<_> = (0..in_flight)
        .map(|i| {
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % CLIENT_ADDRESSES as usize) as u8,
            ));
            let (svid, server_id, client_id, bundles) = (
                Arc::clone(&svid),
                server_id.clone(),
                client_id.clone(),
                bundles.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures: BTreeMap<&'static str, (u64, String)> = BTreeMap::new();
                loop {
                    let began = tokio::time::Instant::now();
                    if began >= until {
                        break;
                    }
                    let result = handshake::initiate_from(
                        Some(source),
                        addr,
                        &svid,
                        &server_id,
                        (&client_id, &server_id),
                        "bench-client",
                        bundles.clone(),
                        HANDSHAKE_DEADLINE,
                    )
                    .await;
                    let done = tokio::time::Instant::now();
                    match result {
                        Ok(_) if done >= from && done < until => latencies.push(done - began),
                        Ok(_) => {}
                        Err(e) => {
                            let entry = failures.entry(e.result()).or_default();
                            entry.0 += 1;
                            if entry.1.is_empty() {
                                entry.1 = e.to_string();
                            }
                            // Do not spin on a refused connection.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (latencies, failures)
            })
        })
        .collect();

    tokio::time::sleep_until(from).await;
    let (s0, c0, t0) = (snapshot(&probe).await, thread_cpu(), Instant::now());
    let mut pairs = Vec::new();
    if let Some(flag) = &alternate {
        for pair in 0..AB_PAIRS {
            // Which phase goes first alternates, so neither always follows the other.
            let mut rates = [0.0; 2];
            for on in [pair % 2 == 1, pair % 2 == 0] {
                flag.store(on, Ordering::Relaxed);
                tokio::time::sleep(AB_SETTLE).await;
                let a = snapshot(&probe).await;
                tokio::time::sleep(AB_PHASE).await;
                let b = snapshot(&probe).await;
                rates[usize::from(on)] =
                    (b.served - a.served) as f64 / (b.cpu - a.cpu).as_secs_f64();
            }
            pairs.push((rates[0], rates[1]));
        }
        flag.store(false, Ordering::Relaxed);
    }
    tokio::time::sleep_until(until).await;
    let (s1, c1, t1) = (snapshot(&probe).await, thread_cpu(), Instant::now());

    let mut latencies = Vec::new();
    let mut failures: BTreeMap<&'static str, (u64, String)> = BTreeMap::new();
    for l in loops {
        let (lat, fails) = l.await.expect("client loop");
        latencies.extend(lat);
        for (k, (n, msg)) in fails {
            let entry = failures.entry(k).or_default();
            entry.0 += n;
            if entry.1.is_empty() {
                entry.1 = msg;
            }
        }
    }
    latencies.sort();
    let run = Run {
        in_flight,
        window: t1 - t0,
        completed: latencies.len() as u64,
        latencies,
        server_handshakes: s1.served - s0.served,
        server_failed: s1.failed - s0.failed,
        server_cpu: s1.cpu - s0.cpu,
        client_cpu: c1 - c0,
        failures,
    };
    (run, pairs)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mean(v: &[Duration]) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.iter().sum::<Duration>() / v.len() as u32
}

// ---------------------------------------------------------------------------------------------
// Handshakes: openssl

/// A child process killed (by its pid) and reaped on drop.
struct ChildGuard {
    child: Child,
    _stdin: Option<ChildStdin>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct OpensslRun {
    connections: u64,
    wall: Duration,
    server_cpu: Option<Duration>,
    /// s_time's own "connections/user sec" (the client's user CPU).
    client_per_user_sec: Option<f64>,
}

impl OpensslRun {
    fn rate(&self) -> f64 {
        self.connections as f64 / self.wall.as_secs_f64()
    }

    fn per_server_cpu(&self) -> Option<f64> {
        self.server_cpu
            .map(|c| self.connections as f64 / c.as_secs_f64())
    }
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp, so no connection is
/// made to the server before the measurement).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("writing a certificate file");
    path
}

/// `openssl s_server` on the bench's certificates, for all rounds; killed by its pid and its
/// files removed on drop.
struct OpensslServer {
    // Dropped first: the process before its directory.
    process: ChildGuard,
    port: u16,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OpensslServer {
    fn start(pki: &Pki, pin_cpus: bool) -> Result<OpensslServer, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let d = dir.path();
        // The SVID PEMs hold the leaf only (no intermediates); the bundle is the root.
        let server_cert = write_file(d, "server.crt", &pki.server.cert_pem);
        let server_key = write_file(d, "server.key", &pki.server.key_pem);
        let client_cert = write_file(d, "client.crt", &pki.client.cert_pem);
        let client_key = write_file(d, "client.key", &pki.client.key_pem);
        let ca = write_file(d, "ca.crt", pki.ca.bundle_pem());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        let log = d.join("s_server.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(&server_cert)
            .arg("-key")
            .arg(&server_key)
            .arg("-CAfile")
            .arg(&ca)
            .args(["-Verify", "1", "-tls1_3", "-naccept", "100000000", "-quiet"])
            // A stdin that stays open and silent: s_server would act on its end.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start openssl s_server: {e}"))?;
        let stdin = child.stdin.take();
        let process = ChildGuard {
            child,
            _stdin: stdin,
        };
        if pin_cpus {
            pin(process.child.id() as libc::pid_t, SERVER_CPU);
        }
        let server = OpensslServer {
            process,
            port,
            client_cert,
            client_key,
            ca,
            log,
            _dir: dir,
        };
        let ready = Instant::now();
        while !listening(port) {
            if ready.elapsed() > Duration::from_secs(5) {
                return Err("openssl s_server did not listen within 5 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    /// One `s_time -new` of `MEASURE` against the server.
    fn s_time(&self, pin_cpus: bool) -> Result<OpensslRun, String> {
        let server_pid = self.process.child.id();
        let cpu0 = process_cpu(server_pid);
        let t0 = Instant::now();
        let mut client = ChildGuard {
            child: Command::new("openssl")
                .args(["s_time", "-connect", &format!("127.0.0.1:{}", self.port)])
                .args(["-new", "-time", &MEASURE.as_secs().max(1).to_string()])
                .arg("-cert")
                .arg(&self.client_cert)
                .arg("-key")
                .arg(&self.client_key)
                .arg("-CAfile")
                .arg(&self.ca)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start openssl s_time: {e}"))?,
            _stdin: None,
        };
        if pin_cpus {
            pin(client.child.id() as libc::pid_t, CLIENT_CPU);
        }
        // s_time prints a star per connection and its summary at the end: read it all, on a
        // thread, so the deadline below holds even if it hangs.
        let mut out = client.child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = MEASURE + Duration::from_secs(10);
        loop {
            match client.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t0.elapsed() > deadline => {
                    return Err(format!("openssl s_time still running after {deadline:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for s_time: {e}")),
            }
        }
        let wall = t0.elapsed();
        let cpu1 = process_cpu(server_pid);
        let text = reader.join().unwrap_or_default();
        // "1119 connections in 1.37s; 816.79 connections/user sec, bytes read 0"
        let summary = text
            .lines()
            .find(|l| l.contains("connections/user sec"))
            .ok_or_else(|| format!("no summary from s_time: {:?}", text.trim_matches('*')))?;
        let connections: u64 = summary
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("cannot read {summary:?}"))?;
        let client_per_user_sec = summary
            .split_once("; ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        Ok(OpensslRun {
            connections,
            wall,
            server_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
            client_per_user_sec,
        })
    }

    /// Client certificates s_server refused (its verify callback's errors in its log).
    fn verify_errors(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("verify error")
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Rounds

/// Picks one setup's run out of a round.
type RunOf = fn(&Round) -> &Run;

/// One round: each setup once, in an order that rotates from round to round.
struct Round {
    many: Run,
    one: Run,
    /// 32 in flight, every client chain validated in full.
    cold: Run,
    openssl: Result<OpensslRun, String>,
}

fn rounds(pki: &Pki, pin_cpus: bool) -> (Vec<Round>, usize, Option<f64>) {
    let openssl = OpensslServer::start(pki, pin_cpus);
    let steal0 = cpu_ticks();
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        eprintln!("  round {} of {ROUNDS} ...", r + 1);
        let (mut many, mut one, mut cold, mut o) = (None, None, None, None);
        for setup in (0..4).map(|i| (i + r) % 4) {
            match setup {
                0 => many = Some(tollgate_run(pki, IN_FLIGHT, pin_cpus, true)),
                1 => one = Some(tollgate_run(pki, 1, pin_cpus, true)),
                2 => cold = Some(tollgate_run(pki, IN_FLIGHT, pin_cpus, false)),
                _ => {
                    o = Some(match &openssl {
                        Ok(server) => server.s_time(pin_cpus),
                        Err(e) => Err(e.clone()),
                    })
                }
            }
        }
        rounds.push(Round {
            many: many.expect("ran"),
            one: one.expect("ran"),
            cold: cold.expect("ran"),
            openssl: o.expect("ran"),
        });
    }
    let steal = steal0
        .zip(cpu_ticks())
        .map(|((s0, t0), (s1, t1))| 100.0 * (s1 - s0) as f64 / (t1 - t0).max(1) as f64);
    let verify_errors = openssl.as_ref().map_or(0, OpensslServer::verify_errors);
    (rounds, verify_errors, steal)
}

/// Steal and total ticks of all CPUs, from the `cpu` line of /proc/stat.
fn cpu_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // in user.
    Some((*v.get(7)?, v.iter().take(8).sum()))
}

/// Median and range of `values`.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut values: Vec<f64>) -> Spread {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Spread {
        median,
        min: values[0],
        max: values[n - 1],
    }
}

impl Spread {
    /// "median (min–max)" with `digits` decimals.
    fn show(&self, digits: usize) -> String {
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake results

fn print_handshakes(floor: &Floor, rounds: &[Round], verify_errors: usize, steal: Option<f64>) {
    println!(
        "Handshakes: {ROUNDS} rounds, each setup {} ms measured after {} ms of warm-up, order rotating; server on CPU {SERVER_CPU}, client(s) on CPU {CLIENT_CPU}. Median (min–max) over the rounds; latency over all rounds' handshakes",
        MEASURE.as_millis(),
        WARMUP.as_millis()
    );
    println!("| server | client | handshakes/s (wall) | server CPU busy | per server CPU-second | client CPU per handshake | latency mean / p50 / p99 |");
    println!("|---|---|---|---|---|---|---|");
    let setups: [(RunOf, &str); 3] = [
        (|r| &r.many, "tollgate serve_connection"),
        (|r| &r.one, "tollgate serve_connection"),
        (
            |r| &r.cold,
            "tollgate serve_connection, chain cache off (every client chain new)",
        ),
    ];
    for (pick, server) in setups {
        let runs: Vec<&Run> = rounds.iter().map(pick).collect();
        let mut latencies: Vec<Duration> = runs
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        latencies.sort();
        println!(
            "| {server} | initiate, {} in flight | {} | {:.0}% | {} | {:.0} µs | {} / {} / {} |",
            runs[0].in_flight,
            spread(runs.iter().map(|r| r.rate()).collect()).show(0),
            spread(runs.iter().map(|r| r.busy()).collect()).median,
            spread(runs.iter().map(|r| r.per_server_cpu()).collect()).show(0),
            spread(runs.iter().map(|r| r.client_cpu_per_handshake()).collect()).median * 1e6,
            ms(mean(&latencies)),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
        );
        for (i, r) in runs.iter().enumerate() {
            if r.server_failed > 0 || !r.failures.is_empty() {
                println!(
                    "  round {}: server failures in the window {}; client failures {:?}",
                    i + 1,
                    r.server_failed,
                    r.failures
                );
            }
        }
    }
    let openssl: Vec<&OpensslRun> = rounds
        .iter()
        .filter_map(|r| r.openssl.as_ref().ok())
        .collect();
    if openssl.is_empty() {
        let why = rounds
            .iter()
            .find_map(|r| r.openssl.as_ref().err())
            .cloned()
            .unwrap_or_default();
        println!("| openssl s_server | s_time | skipped: {why} | | | | |");
    } else {
        println!(
            "| openssl s_server | s_time -new, 1 process | {} | {:.0}% | {} | {:.0} µs (user only) | {:.1} ms (mean) |",
            spread(openssl.iter().map(|o| o.rate()).collect()).show(0),
            spread(
                openssl
                    .iter()
                    .filter_map(|o| o.server_cpu)
                    .zip(&openssl)
                    .map(|(c, o)| 100.0 * c.as_secs_f64() / o.wall.as_secs_f64())
                    .collect()
            )
            .median,
            spread(openssl.iter().filter_map(|o| o.per_server_cpu()).collect()).show(0),
            spread(
                openssl
                    .iter()
                    .filter_map(|o| o.client_per_user_sec)
                    .map(|r| 1e6 / r)
                    .collect()
            )
            .median,
            spread(
                openssl
                    .iter()
                    .map(|o| 1e3 * o.wall.as_secs_f64() / o.connections.max(1) as f64)
                    .collect()
            )
            .median,
        );
        if openssl.len() < rounds.len() {
            println!(
                "  openssl failed in {} of {} rounds",
                rounds.len() - openssl.len(),
                rounds.len()
            );
        }
        if verify_errors > 0 {
            println!("  openssl s_server logged {verify_errors} client certificate verify errors");
        }
    }
    if let Some(steal) = steal {
        println!("Hypervisor steal during the rounds: {steal:.1}% of the CPUs' time");
    }

    let per_core = spread(rounds.iter().map(|r| r.many.per_server_cpu()).collect());
    let cold = spread(rounds.iter().map(|r| r.cold.per_server_cpu()).collect());
    println!(
        "Per server CPU-second, {IN_FLIGHT} in flight: {}; the crypto floor allows {:.0}, and is {:.0}% of the server's CPU per handshake (median)",
        per_core.show(0),
        1.0 / floor.server_cached().as_secs_f64(),
        100.0 * floor.server_cached().as_secs_f64() * per_core.median
    );
    println!(
        "Per server CPU-second, {IN_FLIGHT} in flight, every client chain new: {}; the crypto floor allows {:.0}; cached / new, same round: {}",
        cold.show(0),
        1.0 / floor.server().as_secs_f64(),
        spread(
            rounds
                .iter()
                .map(|r| r.many.per_server_cpu() / r.cold.per_server_cpu())
                .collect()
        )
        .show(2)
    );
    let ratio = |f: fn(&Round) -> Option<f64>| spread(rounds.iter().filter_map(f).collect());
    if !openssl.is_empty() {
        println!(
            "tollgate / openssl, same round: per server CPU-second {} ({IN_FLIGHT} in flight), {} (both 1 sequential client); handshakes/s with 1 sequential client each {}",
            ratio(|r| Some(r.many.per_server_cpu() / r.openssl.as_ref().ok()?.per_server_cpu()?)).show(2),
            ratio(|r| Some(r.one.per_server_cpu() / r.openssl.as_ref().ok()?.per_server_cpu()?)).show(2),
            ratio(|r| Some(r.one.rate() / r.openssl.as_ref().ok()?.rate())).show(2),
        );
    }
    let client_per_hs = spread(
        rounds
            .iter()
            .map(|r| r.many.client_cpu_per_handshake())
            .collect(),
    )
    .median;
    println!(
        "client_config() per handshake: {} of {} client CPU per handshake ({:.1}%)",
        us(floor.client_config),
        us(Duration::from_secs_f64(client_per_hs)),
        100.0 * floor.client_config.as_secs_f64() / client_per_hs
    );
    let verdict = |s: &Spread| {
        if s.median >= 3000.0 {
            format!("met (median {:.0})", s.median)
        } else {
            format!(
                "missed (median {:.0}, {:.0}% short; best round {:.0})",
                s.median,
                100.0 * (1.0 - s.median / 3000.0),
                s.max
            )
        }
    };
    println!(
        "Target >= 3,000 handshakes per server CPU-second: {}; with every client chain new: {}",
        verdict(&per_core),
        verdict(&cold)
    );
    println!();
}

/// What the second `verify_svid` removed from `serve_connection` cost.
fn print_revalidate(floor: &Floor, pairs: &[(f64, f64)]) {
    let without = spread(pairs.iter().map(|p| p.0).collect());
    let with = spread(pairs.iter().map(|p| p.1).collect());
    let ratio = spread(pairs.iter().map(|p| p.1 / p.0).collect());
    println!(
        "A second verify_svid per handshake ({} against accepted_chain's {}: what serve_connection ran before it read the verifier's result), {IN_FLIGHT} in flight, {AB_PAIRS} pairs of {} ms phases alternating on one server:",
        us(floor.verify_svid),
        us(floor.accepted_chain),
        AB_PHASE.as_millis()
    );
    println!(
        "  per server CPU-second without {}, with {}; with / without, same pair: {}",
        without.show(0),
        with.show(0),
        ratio.show(3)
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// SVID reload

struct Reload {
    /// Write to resolver replaced, per rotation (`None`: not seen within `ROTATION_WAIT`).
    replaced: Vec<Option<Duration>>,
    /// Write to a handshake that saw the new certificate, per end-to-end rotation.
    end_to_end: Vec<Option<Duration>>,
    /// Write to resolver replaced, for the end-to-end rotations.
    end_to_end_replaced: Vec<Option<Duration>>,
    /// Readings the follower sent with problems (a directory caught mid-rotation).
    mid_rotation: u64,
    readings: u64,
    /// Handshakes the end-to-end client ran, and how many failed.
    probes: u64,
    probe_failures: u64,
}

/// A small deterministic generator for the pauses.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the auth manager does with each reading (`Manager::take_svids`): keep the previous
/// SVID of an ID the reading left out because its directory reads broken (mid-rotation; the
/// manager's 30 s limit on that is never reached here), then replace the resolver's table.
/// Reports the server ID's leaf and when it was installed.
async fn consume(
    mut rx: watch::Receiver<Arc<Loaded>>,
    resolver: Arc<SvidResolver>,
    server_id: SpiffeId,
    installed: std_mpsc::Sender<(Vec<u8>, Instant)>,
    counts: Arc<(AtomicU64, AtomicU64)>,
) {
    let (mut held, mut origins) = {
        let first = rx.borrow();
        let held: BTreeMap<SpiffeId, Svid> = first
            .svids
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        (held, first.origins.clone())
    };
    while rx.changed().await.is_ok() {
        let loaded = rx.borrow_and_update().clone();
        counts.0.fetch_add(1, Ordering::Relaxed);
        if !loaded.problems.is_empty() {
            counts.1.fetch_add(1, Ordering::Relaxed);
        }
        let mut svids: BTreeMap<SpiffeId, Svid> = loaded
            .svids
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        for (id, svid) in &held {
            let broken = origins.get(id).is_some_and(|d| loaded.broken.contains(d));
            if broken && !svids.contains_key(id) {
                svids.insert(id.clone(), svid.clone());
            }
        }
        origins.extend(loaded.origins.clone());
        origins.retain(|id, _| svids.contains_key(id));
        let list: Vec<Svid> = svids.values().cloned().collect();
        resolver.replace(&list);
        let at = Instant::now();
        if let Some(s) = svids.get(&server_id) {
            let _ = installed.send((s.chain[0].to_vec(), at));
        }
        held = svids;
    }
}

fn leaf_der(issued: &IssuedSvid) -> Vec<u8> {
    Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
        .expect("issued SVID")
        .chain[0]
        .to_vec()
}

/// Waits for the consumer to report `leaf`; the time it was installed.
fn wait_installed(
    installed: &std_mpsc::Receiver<(Vec<u8>, Instant)>,
    leaf: &[u8],
    written: Instant,
) -> Option<Instant> {
    while let Some(left) = ROTATION_WAIT.checked_sub(written.elapsed()) {
        match installed.recv_timeout(left) {
            Ok((l, at)) if l == leaf => return Some(at),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

fn reload_run(pki: &Pki) -> Reload {
    let dir = tempfile::tempdir().expect("tempdir");
    let names = FileNames::CSI_SPIFFE;
    pki.server
        .write(dir.path(), &names)
        .expect("writing the SVID");
    let source: Arc<dyn SvidSource> = Arc::new(DirectorySource::new(dir.path(), None));
    let first = source.load().expect("reading the SVID directory");
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    let resolver = Arc::new(SvidResolver::new(&first.svids));
    let (installed_tx, installed) = std_mpsc::channel();
    let counts: Arc<(AtomicU64, AtomicU64)> = Arc::default();

    // The follower and consumer on their own runtime and thread, as in the agent; the listener
    // on another (the server thread), serving from the same resolver.
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let follower = {
        let (resolver, server_id, counts) =
            (Arc::clone(&resolver), pki.server_id.clone(), counts.clone());
        std::thread::Builder::new()
            .name("svid-follow".to_owned())
            .spawn(move || {
                current_thread_runtime().block_on(async move {
                    let (tx, rx) = watch::channel(Arc::new(first));
                    tokio::spawn(follow(source, SVID_POLL, tx));
                    tokio::spawn(consume(rx, resolver, server_id, installed_tx, counts));
                    let _ = stop_rx.await;
                });
            })
            .expect("follower thread")
    };
    let server = ServerThread::start(pki, Arc::clone(&resolver), Arc::default(), None, true);

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut pause = || Duration::from_millis(rng.next() % MAX_OFFSET_MS);
    let mut replaced = Vec::new();
    for _ in 0..ROTATIONS {
        let next = pki.ca.issue(&pki.server_id, SVID_TTL).expect("re-issuing");
        let leaf = leaf_der(&next);
        std::thread::sleep(pause());
        next.write(dir.path(), &names).expect("rotating the SVID");
        let written = Instant::now();
        replaced.push(
            wait_installed(&installed, &leaf, written)
                .map(|at| at.saturating_duration_since(written)),
        );
    }

    let rt = current_thread_runtime();
    let bundles = pki.shared_bundles();
    let (mut probes, mut probe_failures) = (0u64, 0u64);
    let mut end_to_end = Vec::new();
    let mut end_to_end_replaced = Vec::new();
    for _ in 0..E2E_ROTATIONS {
        let next = pki.ca.issue(&pki.server_id, SVID_TTL).expect("re-issuing");
        let leaf = leaf_der(&next);
        std::thread::sleep(pause());
        next.write(dir.path(), &names).expect("rotating the SVID");
        let written = Instant::now();
        let seen = rt.block_on(async {
            while written.elapsed() < ROTATION_WAIT {
                let result = handshake::initiate(
                    server.addr,
                    &pki.client_svid,
                    &pki.server_id,
                    (&pki.client_id, &pki.server_id),
                    "bench-client",
                    bundles.clone(),
                    HANDSHAKE_DEADLINE,
                )
                .await;
                probes += 1;
                match result {
                    Ok(proof) if proof.peer_chain.first().map(|c| c.as_ref()) == Some(&leaf) => {
                        return Some(written.elapsed());
                    }
                    Ok(_) => {}
                    Err(_) => probe_failures += 1,
                }
                tokio::time::sleep(E2E_PROBE_EVERY).await;
            }
            None
        });
        end_to_end.push(seen);
        end_to_end_replaced.push(
            wait_installed(&installed, &leaf, written)
                .map(|at| at.saturating_duration_since(written)),
        );
    }
    drop(server);
    let _ = stop_tx.send(());
    let _ = follower.join();
    Reload {
        replaced,
        end_to_end,
        end_to_end_replaced,
        mid_rotation: counts.1.load(Ordering::Relaxed),
        readings: counts.0.load(Ordering::Relaxed),
        probes,
        probe_failures,
    }
}

fn summary(v: &[Option<Duration>]) -> String {
    let mut seen: Vec<Duration> = v.iter().flatten().copied().collect();
    seen.sort();
    let missed = v.len() - seen.len();
    if seen.is_empty() {
        return format!("none of {} seen", v.len());
    }
    format!(
        "{} / {} / {} / {}{}",
        ms(seen[0]),
        ms(percentile(&seen, 0.5)),
        ms(percentile(&seen, 0.95)),
        ms(seen[seen.len() - 1]),
        if missed > 0 {
            format!(
                " ({missed} of {} not seen within {ROTATION_WAIT:?})",
                v.len()
            )
        } else {
            String::new()
        }
    )
}

fn print_reload(r: &Reload) {
    println!(
        "SVID reload: poll every {} ms (SVID_POLL), writes after 0-{MAX_OFFSET_MS} ms pauses",
        SVID_POLL.as_millis()
    );
    println!("| from the write's return to | rotations | min / median / p95 / max |");
    println!("|---|---|---|");
    println!(
        "| SvidResolver::replace done with the new leaf | {} | {} |",
        r.replaced.len(),
        summary(&r.replaced)
    );
    println!(
        "| the same, end-to-end rotations | {} | {} |",
        r.end_to_end_replaced.len(),
        summary(&r.end_to_end_replaced)
    );
    println!(
        "| a new handshake (every {} ms) sees the new certificate | {} | {} |",
        E2E_PROBE_EVERY.as_millis(),
        r.end_to_end.len(),
        summary(&r.end_to_end)
    );
    println!(
        "Readings sent by the follower: {}, of which caught mid-rotation (left out, previous SVID kept): {}; probe handshakes {}, failed {}",
        r.readings, r.mid_rotation, r.probes, r.probe_failures
    );
    let mut all: Vec<Duration> = r.replaced.iter().flatten().copied().collect();
    all.sort();
    let mut end: Vec<Duration> = r.end_to_end.iter().flatten().copied().collect();
    end.sort();
    if let (Some(a), Some(e)) = (all.last(), end.last()) {
        println!(
            "Bounded by the poll: worst {} to the resolver, {} to a handshake, against a {} ms poll interval",
            ms(*a),
            ms(*e),
            SVID_POLL.as_millis()
        );
    }
}
