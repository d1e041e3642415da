//! Every filesystem path the agent and CLI use, named once.

use std::path::{Path, PathBuf};

/// Control socket, unless `--socket` or `TOLLGATE_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tollgate/tollgate.sock";
/// Where programs, links and maps are pinned, unless `--bpffs` says otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/tollgate";
/// Where the agent keeps what must survive it (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";
/// The bpf filesystem mount point; `--bpffs` must be below a bpffs mount.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Layout of one agent's pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
        }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }
    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// One TCX link per interface and direction. The ifindex is part of the name so a link left
    /// behind by a deleted interface is never mistaken for one on a new interface that reuses
    /// the name.
    pub fn link(&self, ifname: &str, ifindex: u32, direction: &str) -> PathBuf {
        self.links().join(format!("{ifname}@{ifindex}@{direction}"))
    }
}
