//! Named network namespaces (`ip netns add`), removed in Drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{bail, Context as _, Result};

/// Runs `ip` with `args` and fails with its stderr if it fails.
pub fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args))
}

pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is iproute2 installed?)"))?;
    check(cmd, &out)
}

fn check(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace that exists while this value lives.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `name`. A namespace of that exact name left by a killed earlier run is replaced.
    pub fn new(name: &str) -> Result<Self> {
        if name.len() > 64 || name.contains('/') {
            bail!("bad namespace name {name:?}");
        }
        if PathBuf::from("/run/netns").join(name).exists() {
            let _ = ip(&["netns", "del", name]);
        }
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.exec_checked(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip netns exec <name> <args>`: fine for tools that do not need /sys/fs/bpf (it remounts
    /// /sys); use `command_inside` for anything that must see bpffs pins.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn exec_checked(&self, args: &[&str]) -> Result<()> {
        run_checked(&mut self.exec(args))
    }

    /// A command that starts inside this namespace with the caller's mounts (so bpffs pins
    /// stay visible): setns(2) in the child before exec.
    pub fn command_inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        use std::os::unix::process::CommandExt as _;
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open because `file` moves into the
        // closure, which lives as long as the Command.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a thread that has entered this namespace (setns is per thread). Sockets
    /// created in `f` stay in the namespace and may be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let handle = std::thread::spawn(move || {
            // SAFETY: plain syscall on a valid fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        let r = handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?;
        r.with_context(|| format!("entering namespace {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
    }
}
