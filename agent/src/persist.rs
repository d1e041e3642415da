//! File mode: the policy in force survives a restart, and the `--policy` file is followed.
//!
//! Every policy that goes live in file mode (the file at start, the file changed on disk,
//! `tollgate policy apply`) is written to `<state-dir>/policy.json` with the digest of the
//! `--policy` file as the agent last read it. At start the agent reads the file again and:
//! - if the file is unchanged since (same digest), the saved policy is enforced: a
//!   `policy apply` made after the file was read is newer than the file and stays in force;
//! - if the file changed (edited, or a new ConfigMap version while the agent was down), the
//!   file is newer: it is enforced.
//!
//! So a restart never goes back to a policy older than the one in force before it. A saved
//! policy that cannot be read or no longer validates is set aside and reported; the file then
//! decides. Kubernetes mode keeps nothing here: the API server is the record.
//!
//! The file is watched by polling (every second): a change of its identity (device, inode,
//! size, modification time, following symlinks) makes the agent read it, and a new digest makes
//! it apply it. Kubelet updates a ConfigMap volume by switching the `..data` symlink to a new
//! directory, which is exactly such a change; editors that write in place or rename over the
//! file are too.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::installer::{hex, InstallerHandle};

/// `<state-dir>/policy.json`.
pub const SAVED_POLICY_FILE: &str = "policy.json";

/// The largest saved policy read back: the policy limit, JSON-escaped.
const MAX_SAVED_BYTES: u64 = 2 * crate::policy::MAX_POLICY_BYTES as u64 + 4096;

/// What is saved of the policy in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedPolicy {
    /// The policy text as applied.
    pub text: String,
    /// `start`, `file` or `api`.
    pub source: String,
    /// SHA-256 (hex) of the `--policy` file as the agent last read it.
    pub file_digest: String,
    /// When it went live (RFC 3339).
    pub saved_at: String,
}

pub fn digest(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Where policies are saved.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    path: PathBuf,
}

impl PolicyStore {
    pub fn new(state_dir: &Path) -> Self {
        PolicyStore {
            path: state_dir.join(SAVED_POLICY_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved policy; `Ok(None)` when there is none.
    pub fn load(&self) -> Result<Option<SavedPolicy>> {
        use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            anyhow::bail!("{} is not a regular file", self.path.display());
        }
        let mut bytes = Vec::new();
        file.take(MAX_SAVED_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_SAVED_BYTES {
            anyhow::bail!("{} is larger than any policy", self.path.display());
        }
        let saved: SavedPolicy = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(Some(saved))
    }

    pub fn save(&self, saved: &SavedPolicy) -> Result<()> {
        let bytes = serde_json::to_vec(saved)?;
        crate::statefile::write_atomically(&self.path, &bytes)
    }

    /// Moves an unreadable saved policy out of the way (kept for inspection, never read again).
    pub fn set_aside(&self) {
        let aside = self.path.with_extension(format!(
            "unreadable-{}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        if let Err(e) = std::fs::rename(&self.path, &aside) {
            tracing::warn!(error = %e, path = %self.path.display(), "could not set the saved policy aside");
        }
    }
}

/// Which policy text to enforce at start: the saved one when the file is unchanged since it
/// was saved, else the file's.
#[derive(Debug, PartialEq, Eq)]
pub enum StartChoice {
    File,
    Saved(SavedPolicy),
}

pub fn choose(file_text: &str, saved: Option<SavedPolicy>) -> StartChoice {
    match saved {
        Some(s) if s.file_digest == digest(file_text) && s.text != file_text => {
            StartChoice::Saved(s)
        }
        _ => StartChoice::File,
    }
}

/// What identifies the file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// How often the policy file is looked at.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// Follows the `--policy` file until the task is dropped: a changed file whose text differs from
/// the last one seen is applied. A file that is gone, unreadable or invalid leaves the policy
/// in force (the refusal is logged and audited once per version of the file).
pub async fn follow_file(path: PathBuf, installer: InstallerHandle, mut last_digest: String) {
    // No stamp yet: the first look reads the file and compares its digest with the one read at
    // start, so a change while the agent was starting is not missed.
    let mut last_stamp = None;
    let mut tick = tokio::time::interval(FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now.is_some() && now == last_stamp {
            continue;
        }
        let was_there = last_stamp.is_some();
        last_stamp = now;
        if now.is_none() {
            if !was_there {
                continue;
            }
            tracing::warn!(path = %path.display(), "the policy file is gone; the policy in force stays");
            continue;
        }
        let p = path.clone();
        let text = match tokio::task::spawn_blocking(move || crate::policy::read_policy_text(&p))
            .await
        {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the policy file changed but cannot be read; the policy in force stays");
                continue;
            }
            Err(_) => return,
        };
        let d = digest(&text);
        if d == last_digest {
            continue;
        }
        last_digest = d;
        match installer.apply_from_file(text).await {
            Ok(r) => tracing::info!(
                path = %path.display(),
                policy = %r.name,
                generation = r.generation,
                "policy file changed; applied"
            ),
            Err(crate::error::Error::Unavailable(_)) => return,
            Err(e) => tracing::error!(
                path = %path.display(),
                error = %e,
                "policy file changed but was refused; the policy in force stays"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(text: &str, file: &str) -> SavedPolicy {
        SavedPolicy {
            text: text.into(),
            source: "api".into(),
            file_digest: digest(file),
            saved_at: "2026-11-24T10:00:00Z".into(),
        }
    }

    #[test]
    fn an_unchanged_file_never_overrides_a_later_apply() {
        assert_eq!(
            choose("file v1", Some(saved("applied", "file v1"))),
            StartChoice::Saved(saved("applied", "file v1"))
        );
        // The file changed since: it is newer.
        assert_eq!(
            choose("file v2", Some(saved("applied", "file v1"))),
            StartChoice::File
        );
        assert_eq!(choose("file v1", None), StartChoice::File);
        // Saved and file agree: the file (same text).
        assert_eq!(
            choose("file v1", Some(saved("file v1", "file v1"))),
            StartChoice::File
        );
    }

    #[test]
    fn the_store_round_trips_and_refuses_what_is_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(dir.path());
        assert!(store.load().unwrap().is_none());
        let s = saved("text", "file");
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s));
        std::fs::remove_file(store.path()).unwrap();
        std::os::unix::fs::symlink("/dev/zero", store.path()).unwrap();
        assert!(store.load().is_err());
        std::fs::remove_file(store.path()).unwrap();
        std::fs::write(store.path(), b"{not json").unwrap();
        assert!(store.load().is_err());
        store.set_aside();
        assert!(store.load().unwrap().is_none());
    }
}
