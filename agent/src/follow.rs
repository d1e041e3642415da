//! File mode: the `--policy` file is followed while the agent runs.
//!
//! The file is watched by polling (every second): a change of its identity (device, inode,
//! size, modification time, following symlinks) makes the agent read it, and a new digest makes
//! it apply it. Kubelet updates a ConfigMap volume by switching the `..data` symlink to a new
//! directory, which is exactly such a change; editors that write in place or rename over the
//! file are too. What went live is saved by the installer (`persist`).

use std::{os::unix::fs::MetadataExt as _, path::Path, path::PathBuf, time::Duration};

use crate::{installer::InstallerHandle, persist::digest};

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
