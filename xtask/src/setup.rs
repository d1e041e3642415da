//! `cargo xtask setup`: installs every prerequisite, skipping what is already there. Safe to run
//! any number of times; CI runs it on a fresh machine.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{run_command, workspace_root};

/// Debian packages: LLVM 22 for bpf-linker, the tools the tests and demo call.
const APT_PACKAGES: [&str; 11] = [
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
];
const BPF_LINKER_VERSION: &str = "0.13.0";
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
    bpf_linker()?;
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
