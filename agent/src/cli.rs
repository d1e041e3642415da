//! The `tollgate` command line. Exit status: 0 success, 1 error (one line on stderr), 2 usage
//! error (clap), 3 `check` answered deny.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::{
    app::{self, AgentConfig, AuditSettings},
    audit::AuditConfig,
    client::Client,
    installer::InstallerConfig,
    loader::{self, InterfaceSelector},
    paths::{PinLayout, DEFAULT_BPFFS, DEFAULT_SOCKET, DEFAULT_STATE_DIR},
    policy::load_policy_file,
    rlimit,
    wire::{
        CheckRequest, CheckResponse, FlowRecord, FlowsResponse, InventoryEdge, InventoryResponse,
        PolicyResponse, StatusResponse, PATH_CHECK, PATH_FLOWS, PATH_INVENTORY, PATH_POLICY,
        PATH_STATUS,
    },
};

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_DENY: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Zero-trust traffic enforcement for Linux nodes"
)]
pub struct Cli {
    /// Control socket of the agent.
    #[arg(long, global = true, env = "TOLLGATE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// How long a command may wait for the agent: connecting, sending and the answer
    /// together (e.g. 500ms, 30s, 2m).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_TIMEOUT",
        default_value = "30s",
        value_parser = parse_timeout
    )]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent (or remove its pinned datapath with --uninstall).
    Agent(Box<AgentArgs>),
    /// Show programs, interfaces, policy generation and verdict counters.
    Status {
        /// Print the agent's JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Apply, show or validate policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Ask what the datapath would decide for a new flow, without sending traffic.
    Check(CheckArgs),
    /// Check the audit log's hash chain (no agent needed).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show recent decisions (denies, would-denies, limit drops, logged new flows), follow them
    /// live, or print the flow inventory.
    Flows(FlowsArgs),
    /// A development CA that issues short-lived SVIDs (no agent needed): for demos and tests,
    /// not production (use SPIRE or cert-manager's csi-driver-spiffe there).
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create the CA (ECDSA P-256): DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Where the CA's files go.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The trust domain it issues SVIDs for (e.g. shop.test).
        #[arg(long)]
        trust_domain: String,
        /// How long the CA certificate is valid.
        #[arg(long, default_value = "365d", value_parser = parse_timeout)]
        ttl: Duration,
        /// Replace a CA that exists in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue an X.509 SVID for a SPIFFE ID into OUT (certificate, key, bundle).
    Issue {
        /// The CA's directory (`ca init --dir`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        /// How long the SVID is valid (never past the CA's expiry).
        #[arg(long, default_value = "1h", value_parser = parse_timeout)]
        ttl: Duration,
        /// The directory to write the SVID into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// File names: `csi` (tls.crt, tls.key, ca.crt, as cert-manager's csi-driver-spiffe)
        /// or `spiffe-helper` (svid.pem, svid_key.pem, svid_bundle.pem).
        #[arg(long, default_value = "csi")]
        layout: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify audit log files, oldest first (e.g. audit.log.2 audit.log.1 audit.log): report
    /// the first record that was edited, removed, inserted or reordered.
    Verify(AuditVerifyArgs),
}

#[derive(clap::Args, Debug)]
pub struct AuditVerifyArgs {
    /// Log files, oldest first.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// A record kept elsewhere (a checkpoint's head_seq:head): the log must reach seq SEQ with
    /// hash HASH, which also detects a log cut short or rewritten before it.
    #[arg(long, value_name = "SEQ:HASH", value_parser = crate::audit::parse_checkpoint)]
    pub checkpoint: Option<(u64, String)>,
    /// The key checkpoints are signed with (a file only its owner may read): every checkpoint
    /// record must carry a valid signature.
    #[arg(long, value_name = "FILE")]
    pub hmac_key: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Only denies, would-denies and drops (no logged allows).
    #[arg(long)]
    pub denied: bool,
    /// Keep printing decisions as they happen (Ctrl-C to stop).
    #[arg(long, conflicts_with = "inventory")]
    pub follow: bool,
    /// Only decisions from or to this identity.
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
    /// Print the inventory of distinct edges (from, to, port, protocol, verdict) instead:
    /// what would break if everything audited were enforced.
    #[arg(long)]
    pub inventory: bool,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Interfaces to enforce on: comma-separated names or globs, e.g. 'tg-*,eth0'.
    #[arg(long, required_unless_present = "uninstall")]
    pub interfaces: Option<String>,
    /// Policy file (v1alpha1 YAML) to enforce; read again whenever it changes (a ConfigMap
    /// volume's swap included).
    #[arg(long, required_unless_present_any = ["uninstall", "kubernetes"], conflicts_with = "kubernetes")]
    pub policy: Option<PathBuf>,
    /// Kubernetes mode: identities from pods (selectors), policy from the cluster's
    /// `tollgate.dev/v1alpha1` Policy objects, merged. Uses in-cluster configuration unless
    /// --kubeconfig is given.
    #[arg(long, conflicts_with = "uninstall")]
    pub kubernetes: bool,
    /// The kubeconfig for --kubernetes (default: in-cluster, or KUBECONFIG).
    #[arg(long, requires = "kubernetes", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the SPIFFE trust domain of the cluster. An identity at an end of an
    /// `authentication: mtls` rule without a `spiffeId`, whose selector names one namespace
    /// and one serviceAccount, gets `spiffe://DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT`.
    #[arg(long, requires = "kubernetes", value_name = "DOMAIN", value_parser = parse_trust_domain)]
    pub trust_domain: Option<crate::identity::TrustDomain>,
    /// Directory on bpffs where programs, links and maps are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// The node's uplinks (comma-separated names or globs), enforced or not: traffic from
    /// `world` arrives there with any source address but the node's own and its pods'. Every
    /// other interface is workload-facing (strict source validation).
    #[arg(long, conflicts_with = "uninstall")]
    pub uplinks: Option<String>,
    /// Capacity of each conntrack map (IPv4 and IPv6), in entries; a flow takes two. Applies
    /// when the maps are created; pinned maps keep their size until `--uninstall`.
    #[arg(
        long,
        conflicts_with = "uninstall",
        default_value_t = tollgate_common::capacity::CONNTRACK_ENTRIES,
        value_parser = clap::value_parser!(u32).range(
            tollgate_common::capacity::CONNTRACK_MIN as i64
                ..=tollgate_common::capacity::CONNTRACK_MAX as i64
        )
    )]
    pub conntrack_entries: u32,
    /// Directory for what must survive a restart (the flow inventory).
    #[arg(long, conflicts_with = "uninstall", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Address of `/metrics`, `/healthz` and `/readyz` (HTTP), or `none`.
    #[arg(long, conflicts_with = "uninstall", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Write the hash-chained audit log (JSON Lines) to this file.
    #[arg(long, conflicts_with = "uninstall", value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Write the audit records to standard output as well (for Kubernetes log collectors).
    #[arg(long, conflicts_with = "uninstall")]
    pub audit_stdout: bool,
    /// Sign audit checkpoints with HMAC-SHA256 using the key in this file (mode 0600 or
    /// stricter, at least 16 bytes).
    #[arg(long, conflicts_with = "uninstall", value_name = "FILE")]
    pub audit_hmac_key: Option<PathBuf>,
    /// Rotate the audit log when it would grow past this many bytes.
    #[arg(long, conflicts_with = "uninstall", default_value_t = 100 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(4096..))]
    pub audit_max_bytes: u64,
    /// Rotated audit files kept (FILE.1 ... FILE.N).
    #[arg(long, conflicts_with = "uninstall", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub audit_keep: u64,
    /// How often the audit log gets a checkpoint (also logged and exported as a metric).
    #[arg(long, conflicts_with = "uninstall", default_value = "60s", value_parser = parse_timeout)]
    pub audit_checkpoint_interval: Duration,
    /// This node's name in audit records (default: the host name).
    #[arg(long, conflicts_with = "uninstall", env = "TOLLGATE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The SVIDs of the identities this node hosts and their trust bundle: one subdirectory
    /// per SVID (or the directory itself), as csi-driver-spiffe (tls.crt, tls.key, ca.crt) or
    /// spiffe-helper (svid.pem, svid_key.pem, svid_bundle.pem) write them; read again when
    /// they change. Without it, flows of rules with `authentication: mtls` are refused.
    #[arg(long, conflicts_with = "uninstall", value_name = "DIR")]
    pub svid_dir: Option<PathBuf>,
    /// The three file names of each SVID directory, as CERT,KEY,BUNDLE (default: either of
    /// the two layouts, recognised per directory).
    #[arg(long, requires = "svid_dir", value_name = "CERT,KEY,BUNDLE", value_parser = parse_svid_files)]
    pub svid_files: Option<crate::identity::source::FileNames>,
    /// Where this agent serves mutual-TLS handshakes for other nodes' agents (a node address
    /// and port, e.g. 10.0.0.2:7443).
    #[arg(long, requires = "svid_dir", value_name = "ADDR:PORT")]
    pub auth_addr: Option<std::net::SocketAddr>,
    /// The longest a proof of authentication lives, even when both certificates last longer.
    #[arg(long, requires = "svid_dir", default_value = "10m", value_parser = parse_timeout)]
    pub auth_max_ttl: Duration,
    /// Detach every program and remove every pin under --bpffs, then exit.
    #[arg(long, conflicts_with_all = ["interfaces", "policy"])]
    pub uninstall: bool,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate and apply a policy file to the running agent (atomic swap).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Print the policy the agent enforces.
    Get,
    /// Validate a policy file without an agent.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[arg(long)]
    pub from: IpAddr,
    #[arg(long)]
    pub to: IpAddr,
    /// Destination port (ignored for ICMP).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// tcp, udp, icmp or icmpv6.
    #[arg(long)]
    pub protocol: String,
    /// The enforced interface the packet arrives on: also check its source as the datapath
    /// does there (reverse path, interface binding).
    #[arg(long)]
    pub interface: Option<String>,
}

fn parse_trust_domain(text: &str) -> Result<crate::identity::TrustDomain, String> {
    crate::identity::TrustDomain::parse(text).map_err(|e| e.to_string())
}

fn parse_svid_files(text: &str) -> Result<crate::identity::source::FileNames, String> {
    crate::identity::source::FileNames::parse(text).map_err(|e| e.to_string())
}

/// `--metrics-addr`: an address, or `none`.
#[derive(Clone, Copy, Debug)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "none" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{e} (write e.g. 127.0.0.1:9464, [::1]:9464 or none)"))
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Agent(_)) {
        // A CLI verb whose output is cut short (`tollgate flows | head`) ends quietly, as
        // other Unix tools do, instead of panicking on the broken pipe. Not the agent: it
        // must never die of a signal because a reader went away.
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// A `--timeout`: a humantime duration (`500ms`, `30s`, `2m`) above zero.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write e.g. 500ms, 30s or 2m)")),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Agent(args) => run_agent(*args, cli.socket),
        Command::Policy(PolicyCommand::Validate { file }) => {
            let p = load_policy_file(&file)?;
            println!(
                "{}: valid (policy {:?}: {} identities, {} rules)",
                file.display(),
                p.name,
                p.identities.len(),
                p.rules.len()
            );
            Ok(0)
        }
        Command::Policy(PolicyCommand::Apply { file }) => {
            // Validate locally first so the error names the file the user gave; what is sent is
            // the text that was validated, read once.
            let text = load_policy_file(&file)?.source_text;
            let r: PolicyResponse = runtime()?
                .block_on(Client::new(&cli.socket, cli.timeout).put_text(PATH_POLICY, text))?;
            println!(
                "applied policy {:?} as generation {} ({} rules)",
                r.name, r.generation, r.rules
            );
            Ok(0)
        }
        Command::Policy(PolicyCommand::Get) => {
            let r: PolicyResponse =
                runtime()?.block_on(Client::new(&cli.socket, cli.timeout).get(PATH_POLICY))?;
            println!("# policy {:?}, generation {}", r.name, r.generation);
            print!("{}", r.text);
            if !r.text.ends_with('\n') {
                println!();
            }
            Ok(0)
        }
        Command::Status { json } => {
            let s: StatusResponse =
                runtime()?.block_on(Client::new(&cli.socket, cli.timeout).get(PATH_STATUS))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        Command::Audit(AuditCommand::Verify(args)) => {
            crate::audit::run_verify_command(&args.files, args.checkpoint, args.hmac_key.as_deref())
        }
        Command::Flows(args) => run_flows(args, &cli.socket, cli.timeout),
        Command::Ca(CaCommand::Init {
            dir,
            trust_domain,
            ttl,
            force,
        }) => {
            println!(
                "{}",
                crate::identity::ca::init_command(&dir, &trust_domain, ttl, force)?
            );
            Ok(0)
        }
        Command::Ca(CaCommand::Issue {
            dir,
            spiffe_id,
            ttl,
            out,
            layout,
        }) => {
            let names = crate::identity::source::FileNames::layout(&layout)
                .with_context(|| format!("--layout {layout:?}: expected csi or spiffe-helper"))?;
            println!(
                "{}",
                crate::identity::ca::issue_command(&dir, &spiffe_id, ttl, &out, &names)?
            );
            Ok(0)
        }
        Command::Check(args) => {
            let req = CheckRequest {
                from: args.from,
                to: args.to,
                port: args.port,
                protocol: args.protocol.to_lowercase(),
                interface: args.interface,
            };
            let r: CheckResponse = runtime()?
                .block_on(Client::new(&cli.socket, cli.timeout).post_json(PATH_CHECK, &req))?;
            let what = match r.verdict.as_str() {
                "allow_new" => "allow",
                "audit_would_deny" => "would-deny (audit mode: passes)",
                "deny_expired" => "deny (rule expired)",
                "drop_spoofed" => "deny (spoofed source)",
                "deny_auth_required" => "deny (authentication required, no valid proof)",
                _ => "deny",
            };
            let port = if matches!(req.protocol.as_str(), "tcp" | "udp") {
                format!("/{}", req.port)
            } else {
                String::new()
            };
            println!(
                "{what}: {} ({}) -> {} ({}) {}{port}: {}",
                req.from, r.from_identity, req.to, r.to_identity, req.protocol, r.rule
            );
            if let Some(state) = &r.authentication {
                let what = match state.as_str() {
                    "valid" => "a valid proof admits the pair",
                    "missing" => "no proof yet: the agents run the handshake on the first attempt, the retry passes",
                    "expired" => "the pair's proof has expired: the agents renew it on the next attempt",
                    _ => "unknown",
                };
                println!("  authentication: mtls required; {what}");
            }
            for l in &r.limits {
                let audit = if l.mode == "audit" {
                    " [audit: over the rate passes as a would-drop]"
                } else {
                    ""
                };
                println!(
                    "  rate limit: {} meters {}: {}{audit}",
                    l.owner, l.applies_to, l.limit
                );
            }
            Ok(if r.allowed { 0 } else { EXIT_DENY })
        }
    }
}

fn run_flows(args: FlowsArgs, socket: &std::path::Path, timeout: Duration) -> Result<u8> {
    let rt = runtime()?;
    let client = Client::new(socket, timeout);
    if args.inventory {
        let r: InventoryResponse = rt.block_on(client.get(PATH_INVENTORY))?;
        let edges: Vec<&InventoryEdge> = r
            .edges
            .iter()
            .filter(|e| !args.denied || e.outcome != "allow")
            .filter(|e| {
                args.identity
                    .as_ref()
                    .is_none_or(|n| &e.from_identity == n || &e.to_identity == n)
            })
            .collect();
        match args.output {
            Output::Json => {
                for e in edges {
                    println!("{}", serde_json::to_string(e)?);
                }
            }
            Output::Text => print_inventory(&edges, Paint::for_stdout()),
        }
        return Ok(0);
    }
    let mut query = format!("{PATH_FLOWS}?denied={}", args.denied);
    if let Some(name) = &args.identity {
        query.push_str(&format!("&identity={}", url_encode(name)));
    }
    let paint = Paint::for_stdout();
    let mut after = 0u64;
    let mut header = args.output == Output::Text;
    loop {
        // A follow polls for up to 25 s at a time, within the client's timeout.
        let wait = if args.follow {
            timeout
                .saturating_sub(Duration::from_secs(2))
                .min(Duration::from_secs(25))
        } else {
            Duration::ZERO
        };
        let asked = std::time::Instant::now();
        let r: FlowsResponse = rt.block_on(client.get(&format!(
            "{query}&after={after}&wait_ms={}",
            wait.as_millis()
        )))?;
        if args.follow && r.records.is_empty() && asked.elapsed() < wait / 2 {
            // The agent answered at once (too many followers wait already): poll gently.
            std::thread::sleep(Duration::from_secs(1));
        }
        if r.gap && after > 0 {
            eprintln!("tollgate: some decisions were missed (the agent restarted or kept only its most recent ones)");
        }
        for rec in &r.records {
            match args.output {
                Output::Json => println!("{}", serde_json::to_string(rec)?),
                Output::Text => {
                    if header {
                        println!("{}", flow_header());
                        header = false;
                    }
                    println!("{}", flow_line(rec, paint));
                }
            }
        }
        after = r.last_seq;
        if !args.follow {
            if header && r.records.is_empty() {
                println!("no recent decisions");
            }
            return Ok(0);
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// ANSI colour, only when standard output is a terminal (and NO_COLOR is not set).
#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn for_stdout() -> Self {
        Paint(
            std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none(),
        )
    }

    fn outcome(self, outcome: &str, text: &str) -> String {
        let code = match outcome {
            "deny" => "31",
            "audit" => "33",
            _ => "32",
        };
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

fn flow_header() -> String {
    format!(
        "{:<23} {:<18} {:<30} {:<30} {:<12} {:>7}  BY",
        "TIME", "VERDICT", "FROM", "TO", "PROTO/PORT", "PACKETS"
    )
}

fn flow_line(r: &FlowRecord, paint: Paint) -> String {
    let what = match r.protocol.as_str() {
        "tcp" | "udp" => format!("{}/{}", r.protocol, r.dport),
        "icmp" | "icmpv6" => format!("{} t{}", r.protocol, r.sport),
        p => p.to_owned(),
    };
    let by = match &r.limit {
        Some(limit) => format!("{limit} (rule {})", r.rule),
        None => r.rule.clone(),
    };
    let count = if r.repeated {
        format!("+{}", r.count)
    } else {
        r.count.to_string()
    };
    format!(
        "{:<23} {} {:<30} {:<30} {:<12} {:>7}  {}",
        r.time.get(..23).unwrap_or(&r.time),
        paint.outcome(&r.outcome, &format!("{:<18}", r.verdict)),
        format!("{} {}", r.from_identity, r.src),
        format!("{} {}", r.to_identity, r.dst),
        what,
        count,
        by
    )
}

fn print_inventory(edges: &[&InventoryEdge], paint: Paint) {
    if edges.is_empty() {
        println!("the inventory is empty: no decisions recorded yet");
        return;
    }
    println!(
        "{:<20} {:<20} {:<12} {:<18} {:>9}  {:<24} {:<24} RULE",
        "FROM", "TO", "PROTO/PORT", "VERDICT", "PACKETS", "FIRST SEEN", "LAST SEEN"
    );
    for e in edges {
        let what = match e.protocol.as_str() {
            "tcp" | "udp" => format!("{}/{}", e.protocol, e.port),
            p => p.to_owned(),
        };
        let mark = match e.outcome.as_str() {
            "deny" => "  <- denied",
            "audit" => "  <- would be denied if enforced",
            _ => "",
        };
        println!(
            "{:<20} {:<20} {:<12} {} {:>9}  {:<24} {:<24} {}{}",
            e.from_identity,
            e.to_identity,
            what,
            paint.outcome(&e.outcome, &format!("{:<18}", e.verdict)),
            e.count,
            e.first_seen,
            e.last_seen,
            e.rule,
            paint.outcome(&e.outcome, mark)
        );
    }
}

fn run_agent(args: AgentArgs, socket: PathBuf) -> Result<u8> {
    let layout = PinLayout::new(&args.bpffs);
    if args.uninstall {
        let removed = loader::uninstall(&layout)?;
        println!(
            "removed {} pins under {}; nothing of this agent is attached any more",
            removed.len(),
            layout.root.display()
        );
        return Ok(0);
    }
    let Some(interfaces) = args.interfaces else {
        unreachable!("clap requires --interfaces without --uninstall");
    };
    let source = match (args.policy, args.kubernetes) {
        (Some(path), false) => app::PolicySource::File(path),
        (None, true) => app::PolicySource::Kubernetes(crate::cluster::watch::KubeSettings {
            kubeconfig: args.kubeconfig,
            trust_domain: args.trust_domain,
        }),
        _ => unreachable!("clap requires exactly one of --policy and --kubernetes"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    app::map_large_buffers_apart();
    // Before the runtime starts, so that every thread and descriptor lives under the new limit.
    match rlimit::raise_nofile_limit() {
        Ok(limit) if limit.raised() => tracing::info!(
            from = limit.before,
            to = limit.after,
            "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(limit) => tracing::info!(
            limit = limit.after,
            "open-file limit (RLIMIT_NOFILE) is at its hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit (RLIMIT_NOFILE)"),
    }
    let node = args.node_name.unwrap_or_else(app::hostname);
    let audit = if args.audit_log.is_some() || args.audit_stdout {
        let hmac_key = args
            .audit_hmac_key
            .as_deref()
            .map(crate::audit::load_hmac_key)
            .transpose()
            .context("--audit-hmac-key")?;
        Some(AuditSettings {
            log: AuditConfig {
                path: args.audit_log,
                stdout: args.audit_stdout,
                max_bytes: args.audit_max_bytes,
                keep: args.audit_keep as usize,
                hmac_key,
                node: node.clone(),
            },
            checkpoint_interval: args.audit_checkpoint_interval,
        })
    } else {
        if args.audit_hmac_key.is_some() {
            anyhow::bail!(
                "--audit-hmac-key signs the audit log: give --audit-log or --audit-stdout too"
            );
        }
        None
    };
    let config = AgentConfig {
        installer: InstallerConfig {
            selector: InterfaceSelector::parse(&interfaces)?,
            uplinks: args
                .uplinks
                .as_deref()
                .map(|u| InterfaceSelector::parse(u).context("--uplinks"))
                .transpose()?,
            bpffs: args.bpffs,
            load: loader::LoadOptions {
                conntrack_entries: args.conntrack_entries,
            },
        },
        source,
        socket,
        state_dir: Some(args.state_dir),
        metrics_addr: args.metrics_addr.0,
        audit,
        auth: args
            .svid_dir
            .map(|svid_dir| crate::auth::manager::AuthSettings {
                listen: args.auth_addr,
                svid_dir,
                svid_files: args.svid_files,
                max_ttl: args.auth_max_ttl,
                node: node.clone(),
            }),
        node,
    };
    let rt = runtime()?;
    let result = rt.block_on(app::run(config));
    // A blocking task stuck in a system call must not keep a stopping agent alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result?;
    Ok(0)
}

fn print_auth(a: &crate::wire::AuthStatus) {
    println!(
        "auth         SVIDs from {}, listening on {}",
        a.source,
        a.listen.as_deref().unwrap_or("(no --auth-addr)")
    );
    for s in &a.svids {
        println!("  svid {} (until {})", s.spiffe_id, s.not_after);
    }
    for p in &a.problems {
        println!("  PROBLEM {p}");
    }
    for p in &a.proofs {
        println!(
            "  proof {} -> {} until {} ({}{})",
            p.from_identity,
            p.to_identity,
            p.expires,
            p.role,
            if p.peer_node.is_empty() {
                String::new()
            } else {
                format!(", peer {}", p.peer_node)
            }
        );
    }
    let handshakes: Vec<String> = a
        .handshakes
        .iter()
        .map(|h| format!("{} {} {}", h.role, h.result, h.count))
        .collect();
    println!(
        "  handshakes: {}",
        if handshakes.is_empty() {
            "none".to_owned()
        } else {
            handshakes.join(", ")
        }
    );
    if !a.lapses.is_empty() {
        let lapses: Vec<String> = a.lapses.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!("  lapses: {}", lapses.join(", "));
    }
}

fn print_kubernetes(k: &crate::wire::KubernetesStatus) {
    let listed = |done: bool| if done { "listed" } else { "not listed yet" };
    println!(
        "kubernetes   {}, {}; pods {}, namespaces {}, policies {}",
        if k.synced {
            "synced"
        } else {
            "NOT SYNCED (enforcing the pinned state or default deny)"
        },
        if k.connected {
            "connected"
        } else {
            "API server unreachable (enforcing the last known state)"
        },
        listed(k.pods_synced),
        listed(k.namespaces_synced),
        listed(k.policies_synced)
    );
    println!(
        "  pods {} ({} on this node), {} addresses with an identity, {} changes applied, {} flow entries revoked, {} watch errors",
        k.pods, k.local_pods, k.addresses, k.pod_changes, k.flows_revoked, k.watch_errors
    );
    println!(
        "  policy objects: {}",
        if k.policies.is_empty() {
            "none".to_owned()
        } else {
            k.policies.join(", ")
        }
    );
    for p in &k.skipped {
        println!("  SKIPPED policy {}: {}", p.name, p.reason);
    }
    for c in &k.conflicts {
        println!("  CONFLICT pod {}: {}", c.name, c.reason);
    }
    if let (Some(e), Some(at)) = (&k.last_error, &k.last_error_at) {
        println!("  last error at {at}: {e}");
    }
}

fn print_status(s: &StatusResponse) {
    println!("agent        tollgate {}", s.version);
    println!("bpffs        {}", s.bpffs);
    println!(
        "policy       {} (generation {})",
        s.policy_name, s.generation
    );
    println!(
        "rules        {} ({} map entries)",
        s.rules, s.map_usage.rules
    );
    println!(
        "identities   {} ({} IPv4 + {} IPv6 entries)",
        s.identities, s.map_usage.identities_v4, s.map_usage.identities_v6
    );
    println!("interfaces   {}", s.interfaces_selector);
    for i in &s.interfaces {
        let links: Vec<String> = s
            .attachments
            .iter()
            .filter(|a| a.ifindex == i.ifindex)
            .map(|a| {
                format!(
                    "{} {}",
                    a.direction,
                    if a.adopted { "adopted" } else { "attached" }
                )
            })
            .collect();
        let role = match &i.bound_identity {
            Some(id) => format!("{} (bound to {id})", i.role),
            None => i.role.clone(),
        };
        println!(
            "  {:<16} ifindex {:<5} {:<28} {}",
            i.name,
            i.ifindex,
            role,
            links.join(", ")
        );
    }
    if s.links_restored > 0 {
        println!(
            "links        {} restored after being unpinned or detached",
            s.links_restored
        );
    }
    println!(
        "flows        {} conntrack entries{}",
        s.conntrack_entries,
        s.conntrack_counted_at
            .as_deref()
            .map_or(String::new(), |t| format!(" (counted {t})"))
    );
    if !s.maps.is_empty() {
        println!("maps");
        for m in &s.maps {
            match m.entries {
                Some(n) => println!("  {:<16} {:>8} of {:<9} {}", m.name, n, m.capacity, m.what),
                None => println!("  {:<16} {:>8}    {:<9} {}", m.name, "", m.capacity, m.what),
            }
        }
    }
    println!("verdicts");
    for (name, n) in &s.verdicts {
        println!("  {name:<20} {n}");
    }
    if !s.limits.is_empty() {
        println!("rate limits  (dropped packets / dropped by bytes / refused connections)");
        for l in &s.limits {
            let audit = if l.mode == "audit" {
                format!(
                    "; audit, would have dropped {} / {} / {}",
                    l.would_drop_packets, l.would_drop_bytes_limit, l.would_refuse_connections
                )
            } else {
                String::new()
            };
            println!(
                "  {:<24} {} / {} / {}  ({}{audit})",
                l.owner, l.dropped_packets, l.dropped_bytes_limit, l.refused_connections, l.limit
            );
        }
    }
    println!(
        "events       {} read, {} lost, {} suppressed by sampling, {} skipped",
        s.events_read, s.events_lost, s.events_suppressed, s.events_unknown
    );
    if let Some(a) = &s.auth {
        print_auth(a);
    }
    if let Some(k) = &s.kubernetes {
        print_kubernetes(k);
    }
    if let Some(a) = &s.audit {
        println!(
            "audit        {}: head seq {} ({}), last checkpoint {}, {} write errors, {} dropped on stdout",
            a.destination,
            a.head_seq,
            a.head.get(..16).unwrap_or(&a.head),
            a.last_checkpoint.as_deref().unwrap_or("none yet"),
            a.write_errors,
            a.stdout_dropped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tollgate").chain(args.iter().copied()))
    }

    #[test]
    fn timeout_is_a_global_humantime_duration() {
        // Unless TOLLGATE_TIMEOUT is set around the tests, the default applies.
        if std::env::var_os("TOLLGATE_TIMEOUT").is_none() {
            assert_eq!(parse(&["status"]).unwrap().timeout, Duration::from_secs(30));
        }
        assert_eq!(
            parse(&["--timeout", "500ms", "status"]).unwrap().timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            parse(&["policy", "get", "--timeout", "2m"])
                .unwrap()
                .timeout,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn zero_or_malformed_timeout_is_a_usage_error() {
        for bad in ["0s", "soon", "10"] {
            let e = parse(&["--timeout", bad, "status"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
    }
}
