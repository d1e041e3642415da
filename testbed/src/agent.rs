//! A real `tollgate agent` process inside a namespace, with its own socket and pin directory.
//! Drop stops it (SIGTERM by pid, then SIGKILL) and removes its pinned datapath.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::NetNs;

pub struct AgentProcess {
    binary: PathBuf,
    child: Option<Child>,
    /// RLIMIT_NOFILE (soft and hard) the agent is started with, if set.
    nofile_limit: Option<u64>,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub log: PathBuf,
    /// The agent's `--state-dir` (the flow inventory): `<workdir>/state`.
    pub state_dir: PathBuf,
    /// More `tollgate agent` arguments (`--audit-log ...`, `--metrics-addr ...`). Without a
    /// `--metrics-addr` among them the agent serves no metrics, so that two agents of one
    /// namespace do not compete for the default port.
    pub extra_args: Vec<String>,
}

/// How long an agent may take to answer on its socket after start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

impl AgentProcess {
    /// Starts `binary agent` inside `ns`. `workdir` holds the socket and log; `bpffs` must be
    /// a fresh directory name under /sys/fs/bpf for this agent alone.
    pub fn start(
        binary: &Path,
        ns: &NetNs,
        interfaces: &str,
        policy: &Path,
        workdir: &Path,
        bpffs: &Path,
    ) -> Result<Self> {
        Self::start_with_nofile_limit(binary, ns, interfaces, policy, workdir, bpffs, None)
    }

    /// Like `start`, with more `tollgate agent` arguments (kept for restarts).
    pub fn start_with_args(
        binary: &Path,
        ns: &NetNs,
        interfaces: &str,
        policy: &Path,
        workdir: &Path,
        bpffs: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        let mut agent = Self::new(binary, workdir, bpffs, None)?;
        agent.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        agent.spawn(ns, interfaces, policy)?;
        Ok(agent)
    }

    fn new(binary: &Path, workdir: &Path, bpffs: &Path, nofile_limit: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(workdir)?;
        Ok(AgentProcess {
            binary: binary.to_path_buf(),
            child: None,
            nofile_limit,
            socket: workdir.join("tollgate.sock"),
            bpffs: bpffs.to_path_buf(),
            log: workdir.join("agent.log"),
            state_dir: workdir.join("state"),
            extra_args: Vec::new(),
        })
    }

    /// Like `start`, with the agent's open-file limit (soft and hard) set to `nofile_limit`:
    /// the agent cannot raise it, as when a node runs it under a tight limit.
    pub fn start_with_nofile_limit(
        binary: &Path,
        ns: &NetNs,
        interfaces: &str,
        policy: &Path,
        workdir: &Path,
        bpffs: &Path,
        nofile_limit: Option<u64>,
    ) -> Result<Self> {
        let mut agent = Self::new(binary, workdir, bpffs, nofile_limit)?;
        agent.spawn(ns, interfaces, policy)?;
        Ok(agent)
    }

    /// (Re)starts the process with the same socket and pin directory: a restart adopts the
    /// pinned datapath.
    pub fn spawn(&mut self, ns: &NetNs, interfaces: &str, policy: &Path) -> Result<()> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = ns.command_inside(&self.binary)?;
        if let Some(limit) = self.nofile_limit {
            use std::os::unix::process::CommandExt as _;
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and only touches the child being started.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Kubernetes mode takes its policy from the API server.
        let kubernetes = self.extra_args.iter().any(|a| a == "--kubernetes");
        cmd.args(["agent", "--interfaces", interfaces]);
        if !kubernetes {
            cmd.arg("--policy").arg(policy);
        }
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(
                (!self.extra_args.iter().any(|a| a == "--metrics-addr"))
                    .then_some(["--metrics-addr", "none"])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "agent exited during start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if self
                .cli(&["status"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready after {START_TIMEOUT:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `tollgate --socket <this agent's socket> <args>` (the CLI needs no namespace: the
    /// socket is a file).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.binary)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.binary.display()))
    }

    /// Sends SIGTERM to this agent's pid and waits (bounded) for it to exit. The pinned
    /// datapath stays.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("agent {} ignored SIGTERM for 10 s; killed", child.id())
    }

    /// `tollgate agent --uninstall --bpffs <dir>`.
    pub fn uninstall(&self) -> Result<()> {
        let out = Command::new(&self.binary)
            .args(["agent", "--uninstall", "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        if !out.status.success() {
            bail!("uninstall failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = self.uninstall() {
            eprintln!("warning: {e:#}");
        }
        // The agent creates missing parents of its pin directory; the tests share one
        // (`tollgate-tests`), which goes with the last agent or fixture that used it. Removing
        // fails harmlessly while it is not empty (or is the bpffs mount itself).
        if let Some(parent) = self.bpffs.parent() {
            if parent.file_name().is_some_and(|n| n == "tollgate-tests") {
                let _ = std::fs::remove_dir(parent);
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}
