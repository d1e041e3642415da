//! The writer: appends sealed records to the log file (and stdout), rotates the file by size
//! without breaking the chain, and on open resumes the chain from the file's last record, or
//! sets a damaged file aside and says so in a `chain_break` record.

use std::{
    borrow::Cow,
    cell::RefCell,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value};

use super::{
    record::{
        checkpoint_hmac, encode_body, hex_encode, parse_line, seal, KIND_CHAIN_BREAK,
        KIND_CHECKPOINT, KIND_ROTATED, MAX_RECORD_BYTES, RESERVED_FIELDS, RESERVED_KINDS,
        ZERO_HASH,
    },
    AuditError,
};

/// `encode_body` gives BODY; the line written is BODY less `}`, plus `,"hash":"<64>"}` and `\n`.
const LINE_OVERHEAD: usize = 75;

/// A file's size when rotation is not configured otherwise: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Rotated files kept by default (`PATH.1` .. `PATH.5`).
pub const DEFAULT_KEEP: usize = 5;

/// Where the audit log goes and how it is rotated and signed.
#[derive(Clone)]
pub struct AuditConfig {
    /// The log file. `None` with `stdout: true` writes the chain to stdout only: nothing can be
    /// resumed then, so every start begins a new chain at seq 1.
    pub path: Option<PathBuf>,
    /// Also write every record line, byte for byte the same, to stdout.
    pub stdout: bool,
    /// Rotate before a record would take the file past this size; 0 never rotates.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` newest .. `PATH.{keep}` oldest); 0 deletes the full file.
    pub keep: usize,
    /// Signs checkpoint records (HMAC-SHA256) when set.
    pub hmac_key: Option<Vec<u8>>,
    /// The node name every record carries.
    pub node: String,
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("path", &self.path)
            .field("stdout", &self.stdout)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .field("hmac_key", &self.hmac_key.as_ref().map(|_| "<redacted>"))
            .field("node", &self.node)
            .finish()
    }
}

/// A record that made it into the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// What a checkpoint record vouches for: the record before it. `head_seq:head` is what
/// `tollgate audit verify --checkpoint` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub head_seq: u64,
    pub head: String,
    pub hmac: Option<String>,
}

/// The tamper-evident audit log of one agent: the open file, the stdout sink and the chain's
/// head. Not shared: one task owns it.
pub struct AuditLog {
    node: String,
    hmac_key: Option<Vec<u8>>,
    head: Head,
    file: Option<LogFile>,
    stdout: Option<Box<dyn Write + Send>>,
    /// `<path>.lock`, locked (flock) for as long as this log is open: two writers would
    /// interleave their chains.
    _lock: Option<File>,
}

/// Locks `<path>.lock` for this process, or says who must not share the log.
fn lock_log(path: &Path) -> Result<File, AuditError> {
    use std::os::fd::AsRawFd as _;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)
            .map_err(|e| AuditError::io(format!("creating {}", dir.display()), e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| AuditError::io(format!("opening {}", lock_path.display()), e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(AuditError::Config(format!(
                "the audit log {} is being written by another process (it holds {}); give each \
                 agent its own --audit-log",
                path.display(),
                lock_path.display()
            )));
        }
        return Err(AuditError::io(
            format!("locking {}", lock_path.display()),
            e,
        ));
    }
    Ok(file)
}

impl AuditLog {
    /// Opens the log: resumes the chain of an existing file, or starts one. See the module
    /// documentation for what happens to a damaged file. With no file (stdout only) there is
    /// nothing to resume from: the chain starts at seq 1 on every open.
    ///
    /// Writing is blocking file I/O, one `write_all` per record; an async caller runs it where
    /// blocking is allowed.
    pub fn open(config: AuditConfig) -> Result<AuditLog, AuditError> {
        Self::open_with_stdout(config, Box::new(io::stdout()))
    }

    /// [`AuditLog::open`] with `stdout` standing in for the process's stdout (used when
    /// `config.stdout` is set), so tests can read what would have been printed.
    pub fn open_with_stdout(
        config: AuditConfig,
        stdout: Box<dyn Write + Send>,
    ) -> Result<AuditLog, AuditError> {
        if config.path.is_none() && !config.stdout {
            return Err(AuditError::Config(
                "the audit log needs a file, stdout or both".to_owned(),
            ));
        }
        let mut log = AuditLog {
            node: config.node,
            hmac_key: config.hmac_key,
            head: Head::START,
            file: None,
            stdout: config.stdout.then_some(stdout),
            _lock: None,
        };
        if let Some(path) = config.path {
            log._lock = Some(lock_log(&path)?);
            let mut file = LogFile {
                path,
                max_bytes: config.max_bytes,
                keep: config.keep,
                file: None,
                size: 0,
                retry_rotation_at: 0,
            };
            let (head, start) = file.resume(None)?;
            log.head = head;
            log.file = Some(file);
            if let Some(start) = start {
                log.emit(start.kind, &start.fields)?;
            }
        }
        Ok(log)
    }

    /// Appends one record of type `kind` with the caller's `fields` after the common ones.
    /// Refuses the types the log writes itself (`checkpoint`, `rotated`, `chain_break`) and
    /// fields named like the common ones (`seq`, `prev`, `time`, `node`, `type`, `hash`).
    pub fn append(
        &mut self,
        kind: &str,
        fields: Map<String, Value>,
    ) -> Result<Appended, AuditError> {
        if RESERVED_KINDS.contains(&kind) {
            return Err(AuditError::ReservedKind(kind.to_owned()));
        }
        if let Some(name) = RESERVED_FIELDS.iter().find(|f| fields.contains_key(**f)) {
            return Err(AuditError::ReservedField((*name).to_owned()));
        }
        self.write_record(kind, |_| Cow::Borrowed(&fields))
    }

    /// Writes a checkpoint record naming the record before it (signed when a key is
    /// configured), then flushes to disk. A failed flush is returned although the record was
    /// written.
    pub fn checkpoint(&mut self) -> Result<Checkpoint, AuditError> {
        let key = self.hmac_key.clone();
        let made = RefCell::new(None);
        self.write_record(KIND_CHECKPOINT, |before| {
            let checkpoint = Checkpoint {
                head_seq: before.seq,
                head: hex_encode(&before.hash),
                hmac: key
                    .as_deref()
                    .map(|k| checkpoint_hmac(k, before.seq, &hex_encode(&before.hash))),
            };
            let mut fields = Map::new();
            fields.insert("head_seq".to_owned(), checkpoint.head_seq.into());
            fields.insert("head".to_owned(), checkpoint.head.clone().into());
            if let Some(hmac) = &checkpoint.hmac {
                fields.insert("hmac".to_owned(), hmac.clone().into());
            }
            *made.borrow_mut() = Some(checkpoint);
            Cow::Owned(fields)
        })?;
        self.flush()?;
        Ok(made.into_inner().expect("write_record builds the fields"))
    }

    /// The last record written: its seq (0 before the first) and hash (zeros before the first).
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.head.seq, self.head.hash)
    }

    /// Makes what was written durable (`fdatasync`) and flushes stdout.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        if let Some(LogFile {
            path,
            file: Some(file),
            ..
        }) = &self.file
        {
            file.sync_data()
                .map_err(|e| AuditError::io(format!("syncing {}", path.display()), e))?;
        }
        if let Some(out) = &mut self.stdout {
            out.flush()
                .map_err(|e| AuditError::io("flushing the audit log on stdout", e))?;
        }
        Ok(())
    }

    /// Writes one record, rotating first if it would not fit. `fields` gets the head before the
    /// record, since a rotation writes a record of its own first.
    fn write_record<'a>(
        &mut self,
        kind: &str,
        fields: impl Fn(Head) -> Cow<'a, Map<String, Value>>,
    ) -> Result<Appended, AuditError> {
        self.reopen_if_closed()?;
        let mut body = self.body(kind, &fields(self.head));
        if self
            .file
            .as_ref()
            .is_some_and(|f| f.must_rotate(body.len() + LINE_OVERHEAD))
        {
            self.rotate()?;
            body = self.body(kind, &fields(self.head));
        }
        if body.len() + LINE_OVERHEAD > MAX_RECORD_BYTES {
            return Err(AuditError::TooLarge {
                kind: kind.to_owned(),
                bytes: body.len() + LINE_OVERHEAD,
            });
        }
        self.emit_body(body)
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        match file.rotate() {
            Ok(previous) => {
                let mut fields = Map::new();
                fields.insert("previous_file".to_owned(), previous.into());
                if let Err(e) = self.emit(KIND_ROTATED, &fields) {
                    self.close_file();
                    return Err(e);
                }
            }
            Err(e) => {
                // Keep logging into the full file rather than lose records; try again once it
                // has grown by another max_bytes, not on every record.
                tracing::warn!(
                    file = %file.path.display(),
                    error = %e,
                    "could not rotate the audit log; it grows past its size limit"
                );
                file.retry_rotation_at = file.size.saturating_add(file.max_bytes);
                self.reopen_if_closed()?;
            }
        }
        Ok(())
    }

    /// After a write the file could not be cut back from, or a rotation that failed half-way,
    /// the file is closed: open it again, continuing from the head in memory.
    fn reopen_if_closed(&mut self) -> Result<(), AuditError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        if file.file.is_some() {
            return Ok(());
        }
        let (head, start) = file.resume(Some(self.head))?;
        self.head = head;
        if let Some(start) = start {
            if let Err(e) = self.emit(start.kind, &start.fields) {
                self.close_file();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Every file starts with seq 1, `rotated` or `chain_break`, and the verifier relies on
    /// it: when that first record could not be written, close the file so the next append
    /// starts it again (`resume` finds it empty) instead of starting it with a caller's record.
    fn close_file(&mut self) {
        if let Some(file) = &mut self.file {
            file.file = None;
        }
    }

    fn body(&self, kind: &str, fields: &Map<String, Value>) -> String {
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        encode_body(
            self.head.seq + 1,
            &self.head.hash,
            &time,
            &self.node,
            kind,
            fields,
        )
    }

    /// Seals and writes one record as the next in the chain. The head moves on once the record
    /// is in the file (or on stdout when that is the only sink); a failure on stdout beside a
    /// file is still returned, after the head moved.
    /// Notices a log file removed, renamed or replaced behind the writer's back (the file it
    /// has open is no longer the one at its path): opens the path again, continuing the chain
    /// from the head in memory, with a `chain_break` record that says what happened. Returns
    /// whether it did. Without it, every later record would go into a deleted file.
    pub fn reopen_if_replaced(&mut self) -> Result<bool, AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let Some(log_file) = self.file.as_mut() else {
            return Ok(false);
        };
        let Some(open) = &log_file.file else {
            return Ok(false);
        };
        let open_id = open.metadata().map(|m| (m.dev(), m.ino())).ok();
        let path_id = fs::metadata(&log_file.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if open_id.is_some() && open_id == path_id {
            return Ok(false);
        }
        log_file.file = None;
        let (head, start) = log_file.resume(Some(self.head))?;
        self.head = head;
        if let Some(start) = start {
            self.emit(start.kind, &start.fields)?;
        }
        Ok(true)
    }

    fn emit(&mut self, kind: &str, fields: &Map<String, Value>) -> Result<Appended, AuditError> {
        self.emit_body(self.body(kind, fields))
    }

    /// [`AuditLog::emit`] of a BODY built by [`AuditLog::body`] for the current head.
    fn emit_body(&mut self, body: String) -> Result<Appended, AuditError> {
        let (hash, line) = seal(&self.head.hash, &body);
        let appended = Appended {
            seq: self.head.seq + 1,
            hash,
        };
        if let Some(file) = &mut self.file {
            file.write_line(line.as_bytes())?;
        }
        let printed = match &mut self.stdout {
            Some(out) => out
                .write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| AuditError::io("writing the audit log to stdout", e)),
            None => Ok(()),
        };
        if self.file.is_none() {
            printed?;
            self.head = Head::from(appended);
        } else {
            self.head = Head::from(appended);
            printed?;
        }
        Ok(appended)
    }
}

/// The chain's position: the last record's seq and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    /// Before the first record of a chain.
    const START: Head = Head {
        seq: 0,
        hash: ZERO_HASH,
    };
}

impl From<Appended> for Head {
    fn from(a: Appended) -> Head {
        Head {
            seq: a.seq,
            hash: a.hash,
        }
    }
}

/// A record the log writes first in a file it starts: `rotated` or `chain_break`.
struct StartRecord {
    kind: &'static str,
    fields: Map<String, Value>,
}

impl StartRecord {
    fn rotated(previous: &Path) -> StartRecord {
        let mut fields = Map::new();
        fields.insert("previous_file".to_owned(), file_name(previous).into());
        StartRecord {
            kind: KIND_ROTATED,
            fields,
        }
    }

    fn chain_break(reason: String) -> StartRecord {
        let mut fields = Map::new();
        fields.insert("reason".to_owned(), reason.into());
        StartRecord {
            kind: KIND_CHAIN_BREAK,
            fields,
        }
    }
}

struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// Open for appending; `None` until resumed, and again after a failure that left its state
    /// unknown.
    file: Option<File>,
    size: u64,
    /// Do not rotate before the file reaches this size (set after a rotation failed).
    retry_rotation_at: u64,
}

impl LogFile {
    /// Opens PATH for appending and says where the chain stands: from PATH's last record, from
    /// `PATH.1`'s when PATH is missing or empty (a rotation that stopped half-way), or from
    /// `known` (the head in memory, when reopening). A damaged PATH is set aside, and a
    /// `chain_break` record must start the new one.
    fn resume(&mut self, known: Option<Head>) -> Result<(Head, Option<StartRecord>), AuditError> {
        let shown = self.path.display().to_string();
        let read = |path: &Path| {
            read_tail(path).map_err(|e| AuditError::io(format!("reading {}", path.display()), e))
        };
        let (head, mut start, set_aside) = match read(&self.path)? {
            Tail::Good(last) => match known {
                Some(known) if known != last => (
                    known,
                    Some(StartRecord::chain_break(format!(
                        "{shown} does not end with the last record this agent wrote (seq {})",
                        known.seq
                    ))),
                    true,
                ),
                _ => (last, None, false),
            },
            Tail::Missing | Tail::Empty => {
                let older = self.rotated_path(1);
                // Unreadable, the older file cannot give the head; that need not stop the log,
                // and the chain_break record says why it starts anew.
                let older_tail = if self.keep > 0 {
                    read_tail(&older).unwrap_or_else(|e| Tail::Damaged {
                        last_good: None,
                        reason: format!("cannot be read ({e})"),
                    })
                } else {
                    Tail::Missing
                };
                match (older_tail, known) {
                    (Tail::Good(last), known) if known.is_none_or(|k| k == last) => {
                        (last, Some(StartRecord::rotated(&older)), false)
                    }
                    (_, Some(known)) => (
                        known,
                        Some(StartRecord::chain_break(format!(
                            "{shown} was missing or empty"
                        ))),
                        false,
                    ),
                    (Tail::Damaged { last_good, reason }, None) => (
                        last_good.unwrap_or(Head::START),
                        Some(StartRecord::chain_break(format!(
                            "{shown} was missing or empty and {}: {reason}",
                            older.display()
                        ))),
                        false,
                    ),
                    (Tail::Missing | Tail::Empty | Tail::Good(_), None) => {
                        (Head::START, None, false)
                    }
                }
            }
            Tail::Damaged { last_good, reason } => (
                known.or(last_good).unwrap_or(Head::START),
                Some(StartRecord::chain_break(format!("{shown}: {reason}"))),
                true,
            ),
        };
        if set_aside {
            let aside = self.damaged_path();
            fs::rename(&self.path, &aside).map_err(|e| {
                AuditError::io(
                    format!("setting the damaged {shown} aside as {}", aside.display()),
                    e,
                )
            })?;
            if let Some(start) = &mut start {
                start
                    .fields
                    .insert("damaged_file".to_owned(), file_name(&aside).into());
                tracing::warn!(
                    file = %shown,
                    damaged_file = %aside.display(),
                    reason = %start.fields["reason"].as_str().unwrap_or_default(),
                    seq = head.seq + 1,
                    "the audit log was damaged: set it aside and started a new file with a \
                     chain_break record"
                );
            }
        } else if let Some(start) = start.as_ref().filter(|s| s.kind == KIND_CHAIN_BREAK) {
            tracing::warn!(
                file = %shown,
                reason = %start.fields["reason"].as_str().unwrap_or_default(),
                seq = head.seq + 1,
                "the audit log chain is broken: starting it again with a chain_break record"
            );
        }
        let file = open_for_append(&self.path)
            .map_err(|e| AuditError::io(format!("opening {shown}"), e))?;
        self.size = file
            .metadata()
            .map_err(|e| AuditError::io(format!("reading the size of {shown}"), e))?
            .len();
        self.file = Some(file);
        if self.size == 0 {
            self.retry_rotation_at = 0;
        }
        Ok((head, start))
    }

    fn must_rotate(&self, line_len: usize) -> bool {
        self.max_bytes > 0
            && self.size > 0
            && self.size >= self.retry_rotation_at
            && self.size.saturating_add(line_len as u64) > self.max_bytes
    }

    /// Closes PATH and shifts it to `PATH.1` (`PATH.1` to `PATH.2`, ..., the oldest beyond
    /// `keep` deleted), then starts an empty PATH. Returns the name the old file now has. On
    /// failure the file is left closed; `resume` picks up from whatever state the files are in.
    fn rotate(&mut self) -> io::Result<String> {
        if let Some(file) = self.file.take() {
            // What is rotated away is never written again: make sure it is on disk.
            file.sync_data()?;
        }
        if self.keep == 0 {
            remove_if_present(&self.path)?;
        } else {
            remove_if_present(&self.rotated_path(self.keep))?;
            for i in (1..self.keep).rev() {
                match fs::rename(self.rotated_path(i), self.rotated_path(i + 1)) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
            fs::rename(&self.path, self.rotated_path(1))?;
        }
        let file = open_for_append(&self.path)?;
        sync_parent_dir(&self.path);
        self.file = Some(file);
        self.size = 0;
        self.retry_rotation_at = 0;
        Ok(file_name(&self.rotated_path(1)))
    }

    /// Writes a whole line at once. A failed write may have left part of it: cut the file back
    /// so the next record starts a line of its own, or close the file if even that fails.
    fn write_line(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let shown = self.path.display();
        let Some(file) = &mut self.file else {
            return Err(AuditError::io(
                format!("writing {shown}"),
                io::Error::other("the file is not open"),
            ));
        };
        match file.write_all(line) {
            Ok(()) => {
                self.size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = file.set_len(self.size) {
                    tracing::warn!(
                        file = %shown,
                        error = %cut,
                        "could not cut a failed audit record off the log; reopening it"
                    );
                    self.file = None;
                }
                Err(AuditError::io(format!("writing {shown}"), e))
            }
        }
    }

    fn rotated_path(&self, n: usize) -> PathBuf {
        suffixed(&self.path, &format!(".{n}"))
    }

    /// `PATH.damaged-<unix seconds>`, with `-2`, `-3`.. should that exist already.
    fn damaged_path(&self) -> PathBuf {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = suffixed(&self.path, &format!(".damaged-{now}"));
        let mut candidate = base.clone();
        let mut n = 1;
        while candidate.symlink_metadata().is_ok() {
            n += 1;
            candidate = suffixed(&base, &format!("-{n}"));
        }
        candidate
    }
}

/// Opens the log for appending: a regular file (a FIFO or device is refused, not waited on),
/// locked for this writer. The lock is on the file itself, so a second writer reaching it by
/// another name (a hard or symbolic link) is refused too; `<path>.lock` covers the moments
/// between files (rotation).
fn open_for_append(path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd as _;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::other(
                "another process is writing this file (perhaps under another name: a hard or \
                 symbolic link); give each agent its own --audit-log",
            ));
        }
        return Err(e);
    }
    Ok(file)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Makes the renames of a rotation durable. Best effort: the records themselves are already
/// synced, and a lost rename is recovered by `resume` from `PATH.1`.
fn sync_parent_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync the audit log directory");
    }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// The end of a log file, as far as resuming needs it.
#[derive(Debug)]
enum Tail {
    Missing,
    Empty,
    /// Ends with a newline, and its last line is a record whose hash matches its contents.
    Good(Head),
    /// The last line is partial or does not verify; `last_good` is the last line before it that
    /// does.
    Damaged {
        last_good: Option<Head>,
        reason: String,
    },
}

/// Reads only as much of the end of the file as it takes (64 KiB, more for long lines).
fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut file = match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::Missing),
        r => r?,
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        (&mut file).take(len - start).read_to_end(&mut buf)?;
        if let Some(tail) = tail_of(&buf, start == 0) {
            return Ok(tail);
        }
        window = window.saturating_mul(4);
    }
}

/// The tail of the file from the bytes at its end (`whole`: all of it). `None` when these bytes
/// hold too little to tell.
fn tail_of(buf: &[u8], whole: bool) -> Option<Tail> {
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    // Unless the window is the whole file, its first line may be cut: skip it.
    let first = if whole {
        0
    } else {
        buf[..end].iter().position(|&b| b == b'\n')? + 1
    };
    let lines: Vec<&[u8]> = if first < end {
        buf[first..end - 1].split(|&b| b == b'\n').collect()
    } else {
        Vec::new()
    };
    let good = |line: &&[u8]| {
        parse_line(line)
            .ok()
            .filter(|p| p.hash_matches())
            .map(|p| Head {
                seq: p.seq,
                hash: p.hash,
            })
    };
    let reason = if end < buf.len() {
        "the last line is incomplete (no newline): the writer stopped in the middle of a record"
            .to_owned()
    } else {
        let last = lines.last()?;
        match parse_line(last) {
            Ok(p) if p.hash_matches() => {
                return Some(Tail::Good(Head {
                    seq: p.seq,
                    hash: p.hash,
                }))
            }
            Ok(_) => "the last line's hash does not match its contents".to_owned(),
            Err(e) => format!("the last line is not a record: {}", e.reason),
        }
    };
    let last_good = lines.iter().rev().find_map(good);
    if last_good.is_none() && !whole {
        return None;
    }
    Some(Tail::Damaged { last_good, reason })
}
