//! `cargo xtask setup | test | demo | bench`: the commands the README gives. Each installs
//! what it needs first (idempotently), so a fresh machine needs nothing but this repository.

mod churn_bench;
mod demo;
mod demo_auth;
mod demo_kubernetes;
mod interrupt;
mod setup;
mod traffic_bench;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("test") => setup::run().and_then(|()| test()),
        Some("demo") if args.len() == 1 => setup::run().and_then(|()| demo::run()),
        Some("demo") if args.len() == 2 && args[1] == "--kubernetes" => {
            setup::run().and_then(|()| demo_kubernetes::run())
        }
        Some("bench") if args.len() == 1 => setup::run().and_then(|()| bench()),
        Some("bench") if args.len() == 2 && args[1] == "--churn" => {
            setup::run().and_then(|()| churn_bench::run())
        }
        Some("bench") if args[1] == "--traffic" => {
            setup::run().and_then(|()| traffic_bench::run(&args[2..]))
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|test|demo [--kubernetes]|bench [--churn|--traffic [OPTIONS|--help]]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, streaming its output; fails if it fails.
pub fn run_command(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the `tollgate` binary (release) and returns its path, for the commands that run
/// real agents (`demo`, `bench --traffic`).
pub fn build_agent_binary() -> Result<PathBuf> {
    run_command(cargo().args([
        "build",
        "--release",
        "-p",
        "tollgate-agent",
        "--bin",
        "tollgate",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target_dir.join("release/tollgate"))
}

/// Builds the eBPF crate in the dev profile (the agent embeds the release build), so the tests
/// can show the verifier accepts both. Returns the object's path.
fn build_debug_ebpf() -> Result<PathBuf> {
    let root = workspace_root();
    let toolchain = setup::bpf_toolchain()?;
    let target_dir = root.join("target/ebpf-debug");
    // Same flags aya-build passes for the release build.
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    run_command(
        Command::new("rustup")
            .args([
                "run",
                &toolchain,
                "cargo",
                "build",
                "--package",
                "tollgate-ebpf",
                "--bins",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--profile", "bpf-debug"])
            .arg("--target-dir")
            .arg(&target_dir)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags),
    )?;
    let object = target_dir.join("bpfel-unknown-none/bpf-debug/tollgate");
    if !object.exists() {
        bail!("debug eBPF object not found at {}", object.display());
    }
    Ok(object)
}

/// The test binaries that hold root-only kernel tests: each must run and pass at least this
/// many tests, so a filter, a skip or a missing binary fails the run.
const KERNEL_TEST_BINARIES: [(&str, usize); 10] = [
    ("prog_test_run", 92),
    ("namespaced", 24),
    ("traffic", 25),
    ("ratelimit", 7),
    ("observability", 5),
    // The Prometheus harness against a fixed exposition (needs the Debian package).
    ("prometheus", 6),
    // The deploy/ manifests and the DaemonSet's capabilities proven on the real agent.
    ("manifests", 12),
    // Kubernetes mode against the fake API server, and file mode's ConfigMap swap and saved policy.
    ("kubernetes", 5),
    // Regression tests of the attack round on Kubernetes mode and the saved policy.
    ("kubernetes_attacks", 10),
    // mTLS between two nodes' agents: proofs, refusals, rotation, expiry, spoofing, records,
    // hostile clients of the auth listener.
    ("auth", 12),
];

fn test() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the kernel and namespace tests need root; run `cargo xtask test` as root");
    }
    run_command(cargo().args(["fmt", "--all", "--check"]))?;
    // Default members only: the eBPF crate targets bpfel-unknown-none and is built (and checked
    // by the verifier tests) through agent/build.rs and build_debug_ebpf.
    run_command(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let debug_object = build_debug_ebpf()?;

    eprintln!("+ cargo test (output checked for skipped kernel tests)");
    // cargo writes "Running <binary>" to stderr and results to stdout: one pipe for both keeps
    // them in order, so each result line can be attributed to its test binary.
    let (reader, writer) = std::io::pipe()?;
    let mut child = cargo()
        .args(["test", "--no-fail-fast"])
        .env("TOLLGATE_EBPF_DEBUG_OBJECT", &debug_object)
        .current_dir(workspace_root())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .context("starting cargo test")?;
    let mut text = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
        let line = line?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("tests failed");
    }
    check_test_summary(&text)?;
    let (passed, failed, ignored) = totals(&text);
    println!("xtask test: {passed} passed, {failed} failed");
    if ignored > 0 {
        bail!("{ignored} tests were ignored; every test must run");
    }
    Ok(())
}

/// Per test binary ("Running ... (target/.../deps/<name>-<hash>)"): (passed, failed, ignored).
fn summaries(text: &str) -> Vec<(String, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Running ") {
            current = rest
                .rsplit('/')
                .next()
                .unwrap_or(rest)
                .trim_end_matches(')')
                .rsplit_once('-')
                .map_or(rest.to_string(), |(name, _)| name.to_string());
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| -> usize {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(key))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            out.push((
                current.clone(),
                num(" passed"),
                num(" failed"),
                num(" ignored"),
            ));
        }
    }
    out
}

fn totals(text: &str) -> (usize, usize, usize) {
    summaries(text)
        .iter()
        .fold((0, 0, 0), |(p, f, i), s| (p + s.1, f + s.2, i + s.3))
}

fn check_test_summary(text: &str) -> Result<()> {
    let all = summaries(text);
    for (binary, minimum) in KERNEL_TEST_BINARIES {
        let Some((_, passed, _, ignored)) = all.iter().find(|s| s.0 == binary) else {
            bail!("the kernel test binary {binary} did not run");
        };
        if *passed < minimum || *ignored > 0 {
            bail!("{binary}: {passed} passed, {ignored} ignored; expected at least {minimum} to run and pass");
        }
    }
    Ok(())
}

/// The datapath bench (BPF_PROG_TEST_RUN), the auth listener's mTLS handshakes (beside
/// `openssl s_server`/`s_time`) and SVID reload latency, then Kubernetes churn against a real
/// agent.
fn bench() -> Result<()> {
    run_command(cargo().args(["bench", "-p", "tollgate-agent", "--bench", "datapath"]))?;
    run_command(cargo().args(["bench", "-p", "tollgate-agent", "--bench", "auth"]))?;
    churn_bench::run()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
     Running ../tests/namespaced.rs (target/debug/deps/namespaced-78c49ae7ffe53905)
test result: ok. 14 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 21.87s
     Running ../tests/prog_test_run.rs (target/debug/deps/prog_test_run-88d28f6d594c831e)
test result: ok. 31 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 4.06s
";

    #[test]
    fn summaries_attribute_results_to_their_binary() {
        let s = summaries(OUTPUT);
        assert_eq!(s[0], ("namespaced".to_string(), 14, 0, 0));
        assert_eq!(s[1], ("prog_test_run".to_string(), 31, 0, 2));
    }

    #[test]
    fn ignored_kernel_tests_fail_the_run() {
        assert!(check_test_summary(OUTPUT).is_err());
    }

    #[test]
    fn a_missing_kernel_test_binary_fails_the_run() {
        let only_one = OUTPUT.lines().take(2).collect::<Vec<_>>().join("\n");
        let err = check_test_summary(&only_one).unwrap_err().to_string();
        assert!(err.contains("prog_test_run did not run"), "{err}");
    }

    /// Output of a run in which every kernel test binary ran exactly its minimum.
    fn full_run() -> String {
        KERNEL_TEST_BINARIES
            .iter()
            .map(|(name, minimum)| {
                format!(
                    "     Running ../tests/{name}.rs (target/debug/deps/{name}-0123456789abcdef)\n\
                     test result: ok. {minimum} passed; 0 failed; 0 ignored; 0 measured; 0 \
                     filtered out; finished in 1.00s\n"
                )
            })
            .collect()
    }

    #[test]
    fn a_full_kernel_run_passes_the_check() {
        check_test_summary(&full_run()).unwrap();
    }

    #[test]
    fn a_kernel_binary_below_its_minimum_fails_the_run() {
        let (name, minimum) = KERNEL_TEST_BINARIES[0];
        let short = full_run().replacen(
            &format!("{minimum} passed"),
            &format!("{} passed", minimum - 1),
            1,
        );
        let err = check_test_summary(&short).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}
