//! Checking a log: every line is a record whose hash matches its contents, each record follows
//! the one before it (seq + 1, prev = its hash) across all the files given, checkpoint records
//! name the record before them and carry a valid signature when a key is given, and an outside
//! checkpoint (`--checkpoint SEQ:HASH`) is matched or shown to be cut off.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{
    load_hmac_key,
    record::{
        checkpoint_hmac_matches, hex_decode, hex_encode, parse_line, ParsedLine, KIND_CHAIN_BREAK,
        KIND_CHECKPOINT, KIND_ROTATED, MAX_RECORD_BYTES, ZERO_HASH,
    },
};

/// What a clean log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// The seq of the first record given: above 1 when older files were not given, in which
    /// case that record's `prev` was taken as the start.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash of the last record, hex (zeros when there are no records).
    pub head: String,
    pub checkpoints: usize,
    /// Checkpoints whose signature was checked with the key given (0 without a key).
    pub signed_checkpoints: usize,
    /// The seq of the last record a signed checkpoint vouches for (with a key).
    pub signed_through: Option<u64>,
    /// `chain_break` records: places where the writer found its log damaged and restarted
    /// the chain (the records it could not vouch for are in a `.damaged-*` file).
    pub chain_breaks: usize,
    pub files: usize,
}

impl VerifyReport {
    /// One line for `tollgate audit verify`.
    pub fn summary(&self, key_given: bool) -> String {
        let mut s = format!("ok: {}", plural(self.records, "record"));
        if self.records > 0 {
            s += &format!(" (seq {}..{})", self.first_seq, self.last_seq);
        }
        s += &format!(
            " in {}, head {}",
            plural(self.files as u64, "file"),
            self.head
        );
        s += &format!("; {}", plural(self.checkpoints as u64, "checkpoint"));
        if key_given {
            s += &format!(" ({} signed)", self.signed_checkpoints);
            if let Some(through) = self.signed_through.filter(|t| *t < self.last_seq) {
                s += &format!(
                    "; the last {} (after seq {through}) are not covered by a signed \
                     checkpoint: only a later checkpoint held elsewhere (the agent's log, its \
                     metrics) vouches for them",
                    plural(self.last_seq - through, "record")
                );
            }
        } else if self.checkpoints > 0 {
            s += " (signatures not checked: no --hmac-key)";
        }
        if self.first_seq > 1 {
            s += &format!(
                "; starts at seq {}: the records before it were not given",
                self.first_seq
            );
        }
        if self.chain_breaks > 0 {
            s += &format!(
                "; {}: the writer found its log damaged and restarted the chain",
                plural(self.chain_breaks as u64, "chain break")
            );
        }
        s
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The first bad record found, or why a good-looking log still fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    pub file: PathBuf,
    /// 1-based line in `file`; 0 when the failure is about the file as a whole.
    pub line: u64,
    /// The seq the line claims, when that much of it could be read.
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for VerifyFailure {}

/// Verifies `files` as one chain, oldest first. `checkpoint` is a `(seq, hash hex)` recorded
/// elsewhere: the log must reach that seq with that hash. With `hmac_key`, every checkpoint
/// record must carry a signature made with it.
pub fn verify(
    files: &[PathBuf],
    checkpoint: Option<(u64, String)>,
    hmac_key: Option<&[u8]>,
) -> Result<VerifyReport, VerifyFailure> {
    let whole = |file: &Path, reason: &str| VerifyFailure {
        file: file.to_owned(),
        line: 0,
        seq: None,
        reason: reason.to_owned(),
    };
    let Some(last_file) = files.last() else {
        return Err(whole(Path::new(""), "no files to verify"));
    };
    let checkpoint = match checkpoint {
        None => None,
        Some((seq, hash)) => match hex_decode::<32>(&hash) {
            Some(hash) => Some(Checkpoint {
                seq,
                hash,
                reached: false,
            }),
            None => {
                return Err(whole(
                    last_file,
                    "the checkpoint's hash is not 64 hex digits",
                ))
            }
        },
    };
    let mut chain = Chain {
        key: hmac_key,
        checkpoint,
        last: None,
        first_seq: 0,
        records: 0,
        checkpoints: 0,
        signed_checkpoints: 0,
        signed_through: None,
        chain_breaks: 0,
    };
    let mut end = (last_file.as_path(), 0);
    for (i, file) in files.iter().enumerate() {
        let previous_file = i.checked_sub(1).map(|p| files[p].as_path());
        let lines = chain.check_file(file, previous_file)?;
        if lines > 0 {
            end = (file, lines);
        }
    }
    if let Some(cp) = chain.checkpoint.as_ref().filter(|cp| !cp.reached) {
        let (file, line) = end;
        return Err(match chain.last {
            Some(last) => VerifyFailure {
                file: file.to_owned(),
                line,
                seq: Some(last.0),
                reason: format!(
                    "the log ends at seq {} but the checkpoint names seq {}: the records \
                     after it were cut off (truncated)",
                    last.0, cp.seq
                ),
            },
            None => whole(
                file,
                &format!(
                    "no records, but the checkpoint names seq {}: the log was emptied",
                    cp.seq
                ),
            ),
        });
    }
    let (last_seq, head) = chain.last.unwrap_or((0, ZERO_HASH));
    Ok(VerifyReport {
        records: chain.records,
        first_seq: chain.first_seq,
        last_seq,
        head: hex_encode(&head),
        checkpoints: chain.checkpoints,
        signed_checkpoints: chain.signed_checkpoints,
        signed_through: chain.signed_through,
        chain_breaks: chain.chain_breaks,
        files: files.len(),
    })
}

/// `tollgate audit verify`: prints the summary and returns exit status 0, or fails with the
/// first bad record.
pub fn run_verify_command(
    files: &[PathBuf],
    checkpoint: Option<(u64, String)>,
    hmac_key: Option<&Path>,
) -> anyhow::Result<u8> {
    let key = hmac_key.map(load_hmac_key).transpose()?;
    let report = verify(files, checkpoint, key.as_deref())?;
    if report.records == 0 {
        anyhow::bail!(
            "no records: an audit log always starts with one (agent_start, rotated or \
             chain_break); an empty file is a log that was emptied"
        );
    }
    if key.is_some() && report.signed_checkpoints == 0 {
        anyhow::bail!(
            "no signed checkpoint in {} records: nothing here is vouched for by the key (a log \
             rewritten without the key, its checkpoints left out, would look the same)",
            report.records
        );
    }
    println!("{}", report.summary(key.is_some()));
    Ok(0)
}

/// A `--checkpoint` value: `SEQ:HASH`, HASH being 64 hex digits (returned lowercase).
pub fn parse_checkpoint(text: &str) -> Result<(u64, String), String> {
    let usage =
        "write SEQ:HASH, e.g. 1234:3f2a..., HASH being the 64 hex digits of that record's hash";
    let Some((seq, hash)) = text.split_once(':') else {
        return Err(format!("no ':' ({usage})"));
    };
    let seq = seq
        .parse()
        .map_err(|_| format!("{seq:?} is not a seq ({usage})"))?;
    if hex_decode::<32>(hash).is_none() {
        return Err(format!("the hash is not 64 hex digits ({usage})"));
    }
    Ok((seq, hash.to_ascii_lowercase()))
}

struct Checkpoint {
    seq: u64,
    hash: [u8; 32],
    reached: bool,
}

/// The verification state carried from line to line and file to file.
struct Chain<'k> {
    key: Option<&'k [u8]>,
    checkpoint: Option<Checkpoint>,
    /// The last record checked: seq and hash.
    last: Option<(u64, [u8; 32])>,
    first_seq: u64,
    records: u64,
    checkpoints: usize,
    signed_checkpoints: usize,
    signed_through: Option<u64>,
    chain_breaks: usize,
}

impl Chain<'_> {
    /// Checks every line of one file; returns how many lines it has.
    fn check_file(
        &mut self,
        path: &Path,
        previous_file: Option<&Path>,
    ) -> Result<u64, VerifyFailure> {
        let fail = |line, seq, reason: String| VerifyFailure {
            file: path.to_owned(),
            line,
            seq,
            reason,
        };
        let read_error = |line, e: io::Error| fail(line, None, format!("cannot read: {e}"));
        let mut reader = BufReader::new(File::open(path).map_err(|e| read_error(0, e))?);
        let mut buf = Vec::new();
        let mut line = 0;
        loop {
            buf.clear();
            let limit = MAX_RECORD_BYTES as u64 + 1;
            if (&mut reader)
                .take(limit)
                .read_until(b'\n', &mut buf)
                .map_err(|e| read_error(line + 1, e))?
                == 0
            {
                return Ok(line);
            }
            line += 1;
            if buf.len() > MAX_RECORD_BYTES {
                return Err(fail(
                    line,
                    None,
                    format!("longer than {MAX_RECORD_BYTES} bytes: not a record"),
                ));
            }
            if buf.last() != Some(&b'\n') {
                let seq = parse_line(&buf).map_or_else(|e| e.seq, |p| Some(p.seq));
                return Err(fail(
                    line,
                    seq,
                    "the last line is incomplete (no newline): the file was cut, or its \
                     writer stopped in the middle of a record"
                        .to_owned(),
                ));
            }
            buf.pop();
            let record = parse_line(&buf).map_err(|e| fail(line, e.seq, e.reason))?;
            let seq = record.seq;
            let first_in_file = line == 1;
            self.check_record(&record, first_in_file.then_some(previous_file))
                .map_err(|reason| fail(line, Some(seq), reason))?;
        }
    }

    /// `file_start`: `Some(previous file)` for the first line of a file.
    fn check_record(
        &mut self,
        r: &ParsedLine,
        file_start: Option<Option<&Path>>,
    ) -> Result<(), String> {
        if !r.hash_matches() {
            return Err("hash does not match its contents (edited)".to_owned());
        }
        match self.last {
            None => self.check_chain_start(r)?,
            Some((last_seq, last_hash)) => {
                if Some(r.seq) != last_seq.checked_add(1) || r.prev != last_hash {
                    let what = if r.seq > last_seq.saturating_add(1) {
                        format!(
                            "seq {last_seq} is followed by seq {}: {} record(s) missing before it",
                            r.seq,
                            r.seq - last_seq - 1
                        )
                    } else if r.seq <= last_seq {
                        format!(
                            "seq {} follows seq {last_seq}: a copied, inserted or reordered record",
                            r.seq
                        )
                    } else {
                        format!(
                            "prev is not the hash of the record before it (seq {last_seq}): that \
                             record was replaced, or this one forged"
                        )
                    };
                    return Err(match file_start {
                        Some(Some(previous)) => format!(
                            "the file does not continue from {}, which ends at seq {last_seq}: \
                             {what} (files missing, or not given oldest first?)",
                            previous.display()
                        ),
                        _ => what,
                    });
                }
            }
        }
        match r.kind.as_str() {
            KIND_CHECKPOINT => self.check_checkpoint_record(r)?,
            KIND_CHAIN_BREAK => self.chain_breaks += 1,
            _ => {}
        }
        if let Some(cp) = self.checkpoint.as_mut().filter(|cp| cp.seq == r.seq) {
            if r.hash != cp.hash {
                return Err(format!(
                    "hash differs from the checkpoint's ({}:{}): the log was rewritten at or \
                     before this record",
                    cp.seq,
                    hex_encode(&cp.hash)
                ));
            }
            cp.reached = true;
        }
        self.records += 1;
        self.last = Some((r.seq, r.hash));
        Ok(())
    }

    /// The first record given: nothing before it to follow, so it must start a chain (seq 1)
    /// or a file (`rotated`, `chain_break`), or continue from the outside checkpoint.
    fn check_chain_start(&mut self, r: &ParsedLine) -> Result<(), String> {
        self.first_seq = r.seq;
        if r.seq == 0 {
            return Err("seq 0: a chain starts at seq 1".to_owned());
        }
        if r.seq == 1 && r.prev != ZERO_HASH {
            return Err("seq 1 starts a chain, but its prev is not all zeros".to_owned());
        }
        if let Some(cp) = self.checkpoint.as_mut().filter(|cp| cp.seq < r.seq) {
            if cp.seq.saturating_add(1) < r.seq {
                return Err(format!(
                    "the log given starts at seq {}, after the checkpoint's seq {}: give the \
                     older files too",
                    r.seq, cp.seq
                ));
            }
            if r.prev != cp.hash {
                return Err(format!(
                    "prev differs from the checkpoint's hash ({}:{}): the log was rewritten",
                    cp.seq,
                    hex_encode(&cp.hash)
                ));
            }
            cp.reached = true;
            return Ok(());
        }
        // Every file the writer starts begins with seq 1, `rotated` or `chain_break`; any
        // other first record means the ones before it were removed.
        if r.seq > 1 && r.kind != KIND_ROTATED && r.kind != KIND_CHAIN_BREAK {
            return Err(format!(
                "the first record is neither seq 1 nor the rotated or chain_break record a file \
                 starts with: record(s) before it are missing (give the older file too, or \
                 --checkpoint {}:<its prev>)",
                r.seq - 1
            ));
        }
        Ok(())
    }

    fn check_checkpoint_record(&mut self, r: &ParsedLine) -> Result<(), String> {
        let head_seq = r.fields.get("head_seq").and_then(Value::as_u64);
        let head = r.fields.get("head").and_then(Value::as_str);
        let prev_hex = hex_encode(&r.prev);
        if head_seq != Some(r.seq - 1) || head != Some(prev_hex.as_str()) {
            return Err("checkpoint does not name the record before it".to_owned());
        }
        self.checkpoints += 1;
        if let Some(key) = self.key {
            match r.fields.get("hmac") {
                None => {
                    return Err("checkpoint not signed, but an HMAC key was given".to_owned());
                }
                Some(Value::String(tag))
                    if checkpoint_hmac_matches(key, r.seq - 1, &prev_hex, tag) =>
                {
                    self.signed_checkpoints += 1;
                    self.signed_through = Some(r.seq - 1);
                }
                Some(_) => {
                    return Err(
                        "checkpoint signature (hmac) does not verify: signed with another key, \
                         or forged"
                            .to_owned(),
                    );
                }
            }
        }
        Ok(())
    }
}
