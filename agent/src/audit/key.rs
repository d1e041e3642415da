//! The checkpoint signing key: a file of raw bytes that only its owner may read, since anyone
//! who can read it can sign a rewritten log.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use super::AuditError;

/// The shortest key accepted: 128 bits.
pub const MIN_HMAC_KEY_BYTES: usize = 16;

/// Reads an HMAC key: the file's bytes, less one trailing newline (so `echo`/editors do not
/// change the key). Refuses a file that group or other may access (mode & 0o077), an empty key
/// and one shorter than [`MIN_HMAC_KEY_BYTES`].
pub fn load_hmac_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    use std::{io::Read as _, os::unix::fs::MetadataExt as _};
    let shown = path.display();
    let io = |e| AuditError::io(format!("reading the HMAC key {shown}"), e);
    let meta = std::fs::metadata(path).map_err(io)?;
    // Only a regular file (a FIFO would block the start, a device never end).
    if !meta.is_file() {
        return Err(AuditError::Key(format!(
            "{shown}: the HMAC key must be a regular file"
        )));
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(AuditError::Key(format!(
            "{shown}: the HMAC key file belongs to uid {}, not to this process's uid {euid}; \
             whoever owns it can read (and change) the key",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(AuditError::Key(format!(
            "{shown}: mode {:04o} lets group or other access the HMAC key; run chmod 600 {shown}",
            mode & 0o7777
        )));
    }
    let mut key = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut key))
        .map_err(io)?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    if key.is_empty() {
        return Err(AuditError::Key(format!(
            "{shown}: the HMAC key file is empty"
        )));
    }
    if key.iter().all(|b| *b == key[0]) {
        return Err(AuditError::Key(format!(
            "{shown}: the HMAC key is one byte repeated; use random bytes \
             (e.g. head -c 32 /dev/urandom > {shown})"
        )));
    }
    if key.len() < MIN_HMAC_KEY_BYTES {
        return Err(AuditError::Key(format!(
            "{shown}: the HMAC key is {} bytes, at least {MIN_HMAC_KEY_BYTES} are needed \
             (e.g. head -c 32 /dev/urandom > {shown})",
            key.len()
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn key_file(dir: &Path, contents: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join("key");
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn key_is_the_file_less_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"0123456789abcdef\n", 0o600);
        assert_eq!(load_hmac_key(&path).unwrap(), b"0123456789abcdef");
        let path = key_file(dir.path(), b"0123456789abcdef\n\n", 0o400);
        assert_eq!(load_hmac_key(&path).unwrap(), b"0123456789abcdef\n");
    }

    #[test]
    fn key_readable_by_group_or_other_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620] {
            let path = key_file(dir.path(), b"0123456789abcdef", mode);
            let e = load_hmac_key(&path).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
        }
    }

    #[test]
    fn a_key_of_one_repeated_byte_or_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"                ", 0o600);
        assert!(load_hmac_key(&path)
            .unwrap_err()
            .to_string()
            .contains("one byte repeated"));
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(load_hmac_key(&sub)
            .unwrap_err()
            .to_string()
            .contains("regular file"));
    }

    #[test]
    fn empty_or_short_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), b"\n", 0o600);
        assert!(load_hmac_key(&path)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        let path = key_file(dir.path(), b"0123456789abcde", 0o600);
        assert!(load_hmac_key(&path)
            .unwrap_err()
            .to_string()
            .contains("15 bytes"));
    }
}
