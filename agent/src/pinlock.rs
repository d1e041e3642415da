//! One owner per pin directory. An agent holds an exclusive `flock` on its `--bpffs` directory
//! for as long as it runs; a second agent or an `--uninstall` on the same directory fails at
//! once, naming the holder's pid, instead of silently overriding the running agent's policy or
//! turning its enforcement off. bpffs holds no regular files, so the lock is taken on the
//! directory itself and the holder is found in `/proc/locks` by the directory's device and
//! inode. The kernel releases the lock when the holder exits, however it exits.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another tollgate process ({holder}); stop it first, or give each \
         agent its own --bpffs"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("locking {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An exclusive lock on a pin directory, released when dropped (or when the process exits).
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
    path: PathBuf,
}

impl PinLock {
    /// Takes the lock on `dir` (which must exist) without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io_err)?;
        // SAFETY: flock on a descriptor we own; LOCK_NB never blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = match file.metadata().ok().and_then(|m| holder_pid(&m)) {
                    Some(pid) => format!("pid {pid}"),
                    None => "pid not visible from here".to_owned(),
                };
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            return Err(io_err(err));
        }
        // The directory may have been removed (and made again) between open and flock; then
        // the lock is on an inode nobody else will ever look at.
        let held = file.metadata().map_err(io_err)?;
        let now = std::fs::metadata(dir).map_err(io_err)?;
        if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
            return Err(LockError::Io {
                dir: dir.to_path_buf(),
                source: io::Error::other("the directory was replaced while it was being locked"),
            });
        }
        Ok(Self {
            _dir: file,
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid holding a flock on the file `meta` describes, from `/proc/locks`.
fn holder_pid(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    find_flock_holder(&locks, meta.dev(), meta.ino())
}

/// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 12398 00:27:19656 0 EOF`
/// (major and minor in hex, inode in decimal) for a flock on (`dev`, `ino`).
fn find_flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A line may carry a "->" marker for a blocked waiter; those are not holders.
        if fields.get(1) != Some(&"FLOCK") || fields.contains(&"->") {
            return None;
        }
        let pid: u32 = fields.get(4)?.parse().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_of_a_flock_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:27:19656 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 12398 00:27:19656 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 555 00:28:19656 0 EOF\n";
        let dev = libc::makedev(0, 0x27);
        assert_eq!(find_flock_holder(locks, dev, 19656), Some(12398));
        assert_eq!(find_flock_holder(locks, dev, 1), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = PinLock::acquire(dir.path()).unwrap();
        let err = PinLock::acquire(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        PinLock::acquire(dir.path()).expect("free again once dropped");
    }
}
