//! The tamper-evident audit log: every decision the agent records is one JSON line, chained to
//! the line before it by a SHA-256 hash, so that editing, deleting, inserting or reordering any
//! record breaks the chain at that record, and `tollgate audit verify` names it.
//!
//! # What is chained
//!
//! Each line is BODY, the compact JSON object `{"seq":N,"prev":"<hex>","time":..,"node":..,
//! "type":.., <the caller's fields>}`, with its final `}` replaced by `,"hash":"<hex>"}`, where
//! hash = SHA-256(previous record's hash, 32 raw bytes || BODY). `seq` counts from 1 and `prev`
//! of seq 1 is 64 zeros. The hash is over the bytes as written: a verifier strips the suffix,
//! puts `}` back and hashes, with no JSON canonicalisation. The chain runs on across files:
//!
//! - rotation (by size) renames `PATH` to `PATH.1` (`PATH.1` to `PATH.2`, and so on up to `keep`
//!   files) and starts `PATH` with a `rotated` record that continues the chain;
//! - a restart resumes from the last record of `PATH`. If that line is incomplete (a crash in
//!   the middle of a write) or does not verify, the file is renamed `PATH.damaged-<unix time>`
//!   and the new `PATH` starts with a `chain_break` record (`reason`, `damaged_file`) continuing
//!   from the last record that did verify, or from seq 1 if none did;
//! - a `checkpoint` record names the record before it (`head_seq`, `head`) and, with a key,
//!   signs that pair: `hmac` = HMAC-SHA256(key, `tollgate-audit-checkpoint:{head_seq}:{head}`).
//!   The agent writes one now and then and may publish `head_seq:head` elsewhere.
//!
//! So every file the writer starts begins with seq 1, `rotated` or `chain_break`.
//!
//! # What verification detects, and what it cannot
//!
//! Given the files oldest first, [`verify`] reports the first line that: does not match its
//! own hash (an edited byte anywhere, the hash included), is not a record (empty, partial, not
//! JSON), does not follow the record before it (deleted, inserted, copied, reordered records, a
//! file left out or given out of order), starts the log given without being a file's first
//! record (the first records of a file deleted), or is a checkpoint that does not name the
//! record before it. With `--checkpoint SEQ:HASH` it also reports a log cut off before SEQ and
//! a record SEQ whose hash is not HASH; with `--hmac-key` a checkpoint record that is unsigned
//! or whose signature does not verify.
//!
//! The chain proves that the records are the ones the writer wrote in that order only relative
//! to something the writer of a forgery cannot recompute. Without a checkpoint kept elsewhere
//! and without a key, anyone who can write the file can cut its tail off (the shorter log
//! verifies), or rewrite the whole log from any record on with new, consistent hashes, and
//! verification cannot tell. A checkpoint (`SEQ:HASH` kept off the node) detects both for the
//! records up to SEQ; a signing key detects forged checkpoint records, as long as the key is
//! not readable by whoever rewrote the log. Deleting whole old rotated files is not detected
//! either, only reported: the summary says at which seq the files given start.
//!
//! Writing never panics; each failure is returned for the caller to count. Records are written
//! with one `write_all` per line to a file opened `O_APPEND` (created 0600); [`AuditLog::flush`]
//! (`fdatasync`) is for checkpoints and shutdown.

mod key;
mod log;
mod record;
mod verify;

#[cfg(test)]
mod tests;

use std::io;

pub use key::{load_hmac_key, MIN_HMAC_KEY_BYTES};
pub use log::{Appended, AuditConfig, AuditLog, Checkpoint, DEFAULT_KEEP, DEFAULT_MAX_BYTES};
pub use record::{checkpoint_hmac, KIND_CHAIN_BREAK, KIND_CHECKPOINT, KIND_ROTATED};
pub use verify::{parse_checkpoint, run_verify_command, verify, VerifyFailure, VerifyReport};

/// Why the log could not be opened, written or its key read. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    #[error("record type {0:?} is written by the audit log itself, not by callers")]
    ReservedKind(String),
    #[error("field {0:?} is one every audit record has; give the caller's field another name")]
    ReservedField(String),
    #[error("a {kind} record of {bytes} bytes is longer than an audit record may be (1 MiB)")]
    TooLarge { kind: String, bytes: usize },
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    Config(String),
}

impl AuditError {
    fn io(context: impl Into<String>, error: io::Error) -> AuditError {
        AuditError::Io {
            context: context.into(),
            error,
        }
    }
}
