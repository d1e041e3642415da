//! File mode: the policy in force survives a restart (the `--policy` file is followed by
//! `follow`).
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

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

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

/// SHA-256 of `text`, hex: how policies are compared and recorded.
pub fn digest(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
