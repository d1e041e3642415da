//! The writer and the verifier together: a log written by `AuditLog`, tampered with the way an
//! attacker would, must fail `verify` at exactly the first bad line.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    slice,
    sync::{Arc, Mutex},
};

use serde_json::{json, Map, Value};

use super::{
    record::{encode_body, hex_decode, hex_encode, seal, MAX_RECORD_BYTES},
    *,
};

const KEY: &[u8] = b"test key of 32 bytes, not secret";

fn config(path: &Path) -> AuditConfig {
    AuditConfig {
        path: Some(path.to_owned()),
        stdout: false,
        max_bytes: 0,
        keep: 3,
        hmac_key: None,
        node: "node-a".to_owned(),
    }
}

fn fields(i: u64) -> Map<String, Value> {
    json!({"rule": "frontend-to-orders", "from": "10.10.1.5", "port": 8080, "i": i})
        .as_object()
        .unwrap()
        .clone()
}

/// A log file of `n` records, `deny` records numbered 1..=n in their `i` field.
fn log_of(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(config(&path)).unwrap();
    for i in 1..=n {
        log.append("deny", fields(i)).unwrap();
    }
    path
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn hash_of(line: &str) -> String {
    line[line.len() - 66..line.len() - 2].to_owned()
}

fn field_of(line: &str, name: &str) -> Value {
    serde_json::from_str::<Map<String, Value>>(line).unwrap()[name].clone()
}

fn seq_of(line: &str) -> u64 {
    field_of(line, "seq").as_u64().unwrap()
}

fn verify_one(path: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify(&[path.to_owned()], None, None)
}

#[track_caller]
fn assert_fails_at(
    result: Result<VerifyReport, VerifyFailure>,
    file: &Path,
    line: u64,
    seq: Option<u64>,
    reason: &str,
) -> VerifyFailure {
    let failure = result.expect_err("the log verified");
    assert_eq!(
        (failure.file.as_path(), failure.line, failure.seq),
        (file, line, seq),
        "{failure}"
    );
    assert!(failure.reason.contains(reason), "{failure}");
    failure
}

/// Replaces the first `from` in line `n` (1-based) with `to`.
fn edit_line(path: &Path, n: usize, from: &str, to: &str) {
    let mut l = lines(path);
    assert!(l[n - 1].contains(from), "{}", l[n - 1]);
    l[n - 1] = l[n - 1].replacen(from, to, 1);
    write_lines(path, &l);
}

#[test]
fn clean_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let l = lines(&path);
    assert!(l[0].starts_with(&format!(
        "{{\"seq\":1,\"prev\":\"{}\",\"time\":\"",
        "0".repeat(64)
    )));
    let report = verify_one(&path).unwrap();
    assert_eq!(
        report,
        VerifyReport {
            records: 10,
            first_seq: 1,
            last_seq: 10,
            head: hash_of(&l[9]),
            checkpoints: 0,
            signed_checkpoints: 0,
            signed_through: None,
            chain_breaks: 0,
            files: 1,
        }
    );
    assert_eq!(
        report.summary(false),
        format!(
            "ok: 10 records (seq 1..10) in 1 file, head {}; 0 checkpoints",
            hash_of(&l[9])
        )
    );
}

#[test]
fn edited_field_value_fails_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    edit_line(&path, 5, "10.10.1.5", "10.10.1.6");
    assert_fails_at(verify_one(&path), &path, 5, Some(5), "hash does not match");
}

#[test]
fn edited_hash_fails_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    let hash = hash_of(&l[4]);
    let flipped = format!(
        "{}{}",
        if hash.starts_with('0') { '1' } else { '0' },
        &hash[1..]
    );
    l[4] = l[4].replace(&hash, &flipped);
    write_lines(&path, &l);
    assert_fails_at(verify_one(&path), &path, 5, Some(5), "hash does not match");
}

#[test]
fn edited_seq_fails_at_that_record_naming_the_seq_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    edit_line(&path, 5, "{\"seq\":5,", "{\"seq\":6,");
    assert_fails_at(verify_one(&path), &path, 5, Some(6), "hash does not match");
    edit_line(&path, 5, "{\"seq\":6,", "{\"seq\":x,");
    assert_fails_at(verify_one(&path), &path, 5, None, "not a JSON object");
}

#[test]
fn edited_syntax_or_suffix_fails_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    edit_line(&path, 3, "\"rule\":", "\"rule\"=");
    assert_fails_at(verify_one(&path), &path, 3, Some(3), "not a JSON object");
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    edit_line(&path, 7, ",\"hash\":\"", ",\"hasH\":\"");
    assert_fails_at(verify_one(&path), &path, 7, Some(7), "does not end in");
}

#[test]
fn every_single_byte_edit_is_caught_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 3);
    let original = fs::read(&path).unwrap();
    let second_line = original.iter().position(|&b| b == b'\n').unwrap() + 1;
    let third_line = second_line
        + original[second_line..]
            .iter()
            .position(|&b| b == b'\n')
            .unwrap()
        + 1;
    for at in second_line..third_line - 1 {
        let mut edited = original.clone();
        edited[at] ^= 0x01;
        fs::write(&path, &edited).unwrap();
        let failure = verify_one(&path).expect_err("an edited byte verified");
        assert_eq!(failure.line, 2, "byte {at}: {failure}");
    }
}

#[test]
fn deleted_middle_record_fails_at_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    l.remove(4);
    write_lines(&path, &l);
    assert_fails_at(
        verify_one(&path),
        &path,
        5,
        Some(6),
        "seq 4 is followed by seq 6: 1 record(s) missing before it",
    );
}

#[test]
fn deleted_first_record_of_a_file_fails_at_the_new_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    l.remove(0);
    write_lines(&path, &l);
    assert_fails_at(
        verify_one(&path),
        &path,
        1,
        Some(2),
        "record(s) before it are missing",
    );
    // With the checkpoint of what came before, the shorter log is fine: it is a later part
    // of the chain, vouched for by the checkpoint.
    let (seq, prev) = (
        1,
        field_of(&lines(&path)[0], "prev")
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert_eq!(
        verify(slice::from_ref(&path), Some((seq, prev)), None)
            .unwrap()
            .first_seq,
        2
    );
}

#[test]
fn inserted_copy_of_a_record_fails_at_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    l.insert(7, l[2].clone());
    write_lines(&path, &l);
    assert_fails_at(
        verify_one(&path),
        &path,
        8,
        Some(3),
        "seq 3 follows seq 7: a copied, inserted or reordered record",
    );
}

#[test]
fn inserted_forged_record_with_recomputed_hash_fails_at_the_forgery() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    // A well-formed record whose hash is right for its contents and which claims to follow
    // record 7, but under a seq of its own choosing.
    let prev = hex_decode::<32>(&hash_of(&l[6])).unwrap();
    let body = encode_body(
        42,
        &prev,
        "2026-11-23T10:00:00.000Z",
        "node-a",
        "allow",
        &fields(0),
    );
    let (_, forged) = seal(&prev, &body);
    l.insert(7, forged.trim_end().to_owned());
    write_lines(&path, &l);
    assert_fails_at(
        verify_one(&path),
        &path,
        8,
        Some(42),
        "seq 7 is followed by seq 42",
    );
}

#[test]
fn forged_record_with_the_right_seq_fails_at_the_record_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    let prev = hex_decode::<32>(&hash_of(&l[6])).unwrap();
    let body = encode_body(
        8,
        &prev,
        "2026-11-23T10:00:00.000Z",
        "node-a",
        "allow",
        &fields(0),
    );
    let (_, forged) = seal(&prev, &body);
    l.insert(7, forged.trim_end().to_owned());
    write_lines(&path, &l);
    assert_fails_at(verify_one(&path), &path, 9, Some(8), "seq 8 follows seq 8");
}

#[test]
fn swapped_records_fail_at_the_first_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let mut l = lines(&path);
    l.swap(3, 4);
    write_lines(&path, &l);
    assert_fails_at(
        verify_one(&path),
        &path,
        4,
        Some(5),
        "seq 3 is followed by seq 5",
    );
}

#[test]
fn truncated_log_verifies_without_a_checkpoint_and_fails_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let l = lines(&path);
    let checkpoint = (10, hash_of(&l[9]));
    write_lines(&path, &l[..7]);
    // The limit of a bare hash chain: a log cut after a whole record is a valid shorter log.
    let report = verify_one(&path).unwrap();
    assert_eq!((report.records, report.last_seq), (7, 7));
    // The checkpoint kept elsewhere shows the cut, at the last line there is.
    assert_fails_at(
        verify(slice::from_ref(&path), Some(checkpoint), None),
        &path,
        7,
        Some(7),
        "the log ends at seq 7 but the checkpoint names seq 10",
    );
}

#[test]
fn checkpoint_with_another_hash_fails_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let l = lines(&path);
    assert_eq!(
        verify(slice::from_ref(&path), Some((6, hash_of(&l[5]))), None)
            .unwrap()
            .records,
        10
    );
    assert_fails_at(
        verify(slice::from_ref(&path), Some((6, hash_of(&l[4]))), None),
        &path,
        6,
        Some(6),
        "hash differs from the checkpoint's",
    );
}

#[test]
fn rewritten_tail_is_undetectable_without_checkpoint_or_key() {
    // The documented limit: whoever can write the file recomputes every hash after an edit.
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let l = lines(&path);
    let checkpoint = (5, hash_of(&l[4]));
    let mut prev = hex_decode::<32>(&hash_of(&l[1])).unwrap();
    let mut rewritten = l[..2].to_vec();
    for seq in 3..=5 {
        let body = encode_body(
            seq,
            &prev,
            "2026-11-23T10:00:00.000Z",
            "node-a",
            "allow",
            &fields(seq),
        );
        let (hash, line) = seal(&prev, &body);
        rewritten.push(line.trim_end().to_owned());
        prev = hash;
    }
    write_lines(&path, &rewritten);
    assert_eq!(verify_one(&path).unwrap().records, 5);
    assert_fails_at(
        verify(slice::from_ref(&path), Some(checkpoint), None),
        &path,
        5,
        Some(5),
        "hash differs from the checkpoint's",
    );
}

#[test]
fn empty_line_fails_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let mut l = lines(&path);
    l.insert(2, String::new());
    write_lines(&path, &l);
    assert_fails_at(verify_one(&path), &path, 3, None, "empty line");
}

#[test]
fn partial_last_line_fails_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() - 1]).unwrap();
    assert_fails_at(verify_one(&path), &path, 5, Some(5), "incomplete");
    fs::write(&path, &text[..text.len() - 40]).unwrap();
    assert_fails_at(verify_one(&path), &path, 5, Some(5), "incomplete");
}

/// A log rotated into exactly `PATH.2`, `PATH.1` and `PATH`, returned oldest first.
fn rotated_log(dir: &Path) -> Vec<PathBuf> {
    let path = dir.join("audit.log");
    let one_line = {
        let probe = dir.join("probe.log");
        log_of_path(&probe, 1);
        fs::metadata(&probe).unwrap().len()
    };
    let mut log = AuditLog::open(AuditConfig {
        max_bytes: one_line * 4,
        ..config(&path)
    })
    .unwrap();
    // Three records fill a file after its `rotated` record: 3 + 3 + 3 (+ rotated records).
    for i in 1..=8 {
        log.append("deny", fields(i)).unwrap();
    }
    let files = vec![
        dir.join("audit.log.2"),
        dir.join("audit.log.1"),
        path.clone(),
    ];
    assert!(!dir.join("audit.log.3").exists());
    for f in &files {
        assert!(f.exists(), "{}", f.display());
    }
    files
}

fn log_of_path(path: &Path, n: u64) {
    let mut log = AuditLog::open(config(path)).unwrap();
    for i in 1..=n {
        log.append("deny", fields(i)).unwrap();
    }
}

#[test]
fn rotation_keeps_files_under_max_bytes_and_starts_each_with_a_rotated_record() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let max = fs::metadata(dir.path().join("probe.log")).unwrap().len() * 4;
    for f in &files {
        assert!(fs::metadata(f).unwrap().len() <= max, "{}", f.display());
    }
    for (f, previous) in files[1..].iter().zip(["audit.log.1", "audit.log.1"]) {
        let first = &lines(f)[0];
        assert!(
            first.contains(&format!(
                "\"type\":\"rotated\",\"previous_file\":\"{previous}\""
            )),
            "{first}"
        );
    }
}

#[test]
fn rotated_files_verify_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let report = verify(&files, None, None).unwrap();
    assert_eq!(report.files, 3);
    assert_eq!(report.first_seq, 1);
    assert_eq!(report.records, report.last_seq);
    // Each later file alone, or the two newest, verify too: they start with `rotated`.
    for from in 1..3 {
        let report = verify(&files[from..], None, None).unwrap();
        assert!(report.first_seq > 1);
        assert!(report.summary(false).contains("starts at seq"));
    }
}

#[test]
fn missing_middle_file_fails_at_the_start_of_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let seq = seq_of(&lines(&files[2])[0]);
    let failure = assert_fails_at(
        verify(&[files[0].clone(), files[2].clone()], None, None),
        &files[2],
        1,
        Some(seq),
        "record(s) missing before it",
    );
    assert!(
        failure.reason.contains("does not continue from"),
        "{failure}"
    );
}

#[test]
fn files_out_of_order_fail_at_the_first_misplaced_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let failure = verify(
        &[files[1].clone(), files[0].clone(), files[2].clone()],
        None,
        None,
    )
    .expect_err("files out of order verified");
    assert_eq!(
        (failure.file.as_path(), failure.line),
        (files[0].as_path(), 1)
    );
    assert!(
        failure.reason.contains("not given oldest first"),
        "{failure}"
    );
}

#[test]
fn deleted_first_record_of_a_rotated_file_fails_there() {
    let dir = tempfile::tempdir().unwrap();
    let files = rotated_log(dir.path());
    let mut l = lines(&files[1]);
    l.remove(0);
    write_lines(&files[1], &l);
    assert_fails_at(
        verify(&files, None, None),
        &files[1],
        1,
        Some(seq_of(&l[0])),
        "1 record(s) missing before it",
    );
    assert_fails_at(
        verify(&files[1..], None, None),
        &files[1],
        1,
        Some(seq_of(&l[0])),
        "record(s) before it are missing",
    );
}

fn signed_log(dir: &Path, key: Option<&[u8]>) -> (PathBuf, Vec<Checkpoint>) {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(AuditConfig {
        hmac_key: key.map(<[u8]>::to_vec),
        ..config(&path)
    })
    .unwrap();
    let mut checkpoints = Vec::new();
    for i in 1..=9 {
        log.append("deny", fields(i)).unwrap();
        if i % 3 == 0 {
            checkpoints.push(log.checkpoint().unwrap());
        }
    }
    (path, checkpoints)
}

#[test]
fn checkpoint_names_the_record_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, checkpoints) = signed_log(dir.path(), Some(KEY));
    let l = lines(&path);
    // deny 1..3 are seq 1..3, the first checkpoint seq 4.
    assert_eq!(checkpoints[0].head_seq, 3);
    assert_eq!(checkpoints[0].head, hash_of(&l[2]));
    assert_eq!(
        checkpoints[0].hmac.as_deref(),
        Some(checkpoint_hmac(KEY, 3, &hash_of(&l[2])).as_str())
    );
    assert!(l[3].contains(&format!(
        "\"type\":\"checkpoint\",\"head\":\"{}\",\"head_seq\":3,\"hmac\":\"",
        hash_of(&l[2])
    )));
    // What checkpoint() returns is what --checkpoint takes.
    let cp = &checkpoints[2];
    assert!(verify(
        slice::from_ref(&path),
        Some((cp.head_seq, cp.head.clone())),
        None
    )
    .is_ok());
}

#[test]
fn signed_checkpoints_verify_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = signed_log(dir.path(), Some(KEY));
    let report = verify(slice::from_ref(&path), None, Some(KEY)).unwrap();
    assert_eq!((report.checkpoints, report.signed_checkpoints), (3, 3));
    let summary = report.summary(true);
    assert!(summary.contains("; 3 checkpoints (3 signed)"), "{summary}");
    // What comes after the last signed checkpoint is said to be covered by the chain only.
    match report.signed_through {
        Some(t) if t < report.last_seq => {
            assert!(
                summary.contains("not covered by a signed checkpoint"),
                "{summary}"
            )
        }
        _ => assert!(!summary.contains("not covered"), "{summary}"),
    }
    // Without the key they still chain; the summary says the signatures went unchecked.
    let report = verify_one(&path).unwrap();
    assert_eq!((report.checkpoints, report.signed_checkpoints), (3, 0));
    assert!(report.summary(false).contains("signatures not checked"));
}

#[test]
fn wrong_key_fails_at_the_first_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = signed_log(dir.path(), Some(KEY));
    assert_fails_at(
        verify(
            slice::from_ref(&path),
            None,
            Some(b"another key of 32 bytes, not it!"),
        ),
        &path,
        4,
        Some(4),
        "signature (hmac) does not verify",
    );
}

#[test]
fn unsigned_checkpoint_fails_when_a_key_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = signed_log(dir.path(), None);
    assert_fails_at(
        verify(slice::from_ref(&path), None, Some(KEY)),
        &path,
        4,
        Some(4),
        "checkpoint not signed",
    );
}

#[test]
fn rewritten_log_with_forged_checkpoints_fails_with_the_key() {
    // Rewriting the tail and re-hashing it cannot make the checkpoints after the edit sign.
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = signed_log(dir.path(), Some(KEY));
    let l = lines(&path);
    let mut prev = hex_decode::<32>(&hash_of(&l[4])).unwrap();
    let mut rewritten = l[..5].to_vec();
    for old in &l[5..] {
        let mut record: Map<String, Value> = serde_json::from_str(old).unwrap();
        let seq = record.remove("seq").unwrap().as_u64().unwrap();
        let kind = record.remove("type").unwrap();
        for common in ["prev", "time", "node", "hash"] {
            record.remove(common);
        }
        if kind == "checkpoint" {
            record.insert("head_seq".to_owned(), (seq - 1).into());
            record.insert("head".to_owned(), hex_encode(&prev).into());
        }
        let body = encode_body(seq, &prev, "t", "node-a", kind.as_str().unwrap(), &record);
        let (hash, line) = seal(&prev, &body);
        rewritten.push(line.trim_end().to_owned());
        prev = hash;
    }
    write_lines(&path, &rewritten);
    assert!(verify_one(&path).is_ok());
    assert_fails_at(
        verify(slice::from_ref(&path), None, Some(KEY)),
        &path,
        8,
        Some(8),
        "does not verify",
    );
}

#[test]
fn reopened_log_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let head = hash_of(&lines(&path)[4]);
    let mut log = AuditLog::open(config(&path)).unwrap();
    assert_eq!(log.head(), (5, hex_decode::<32>(&head).unwrap()));
    let appended = log.append("deny", fields(6)).unwrap();
    assert_eq!(appended.seq, 6);
    assert_eq!(log.head(), (6, appended.hash));
    let l = lines(&path);
    assert_eq!(l.len(), 6);
    assert!(l[5].contains(&format!("\"prev\":\"{head}\"")));
    let report = verify_one(&path).unwrap();
    assert_eq!(
        (report.records, report.head),
        (6, hex_encode(&appended.hash))
    );
}

#[test]
fn reopened_after_a_crash_mid_record_sets_the_file_aside_and_breaks_the_chain_openly() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let text = fs::read_to_string(&path).unwrap();
    let good_head = hash_of(&lines(&path)[3]);
    fs::write(&path, &text[..text.len() - 30]).unwrap();

    let mut log = AuditLog::open(config(&path)).unwrap();
    let damaged: Vec<PathBuf> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("audit.log.damaged-"))
        .collect();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(
        fs::read_to_string(&damaged[0]).unwrap(),
        text[..text.len() - 30]
    );
    // The new file starts with a chain_break continuing from the last record that verified.
    let first = lines(&path)[0].clone();
    assert!(
        first.starts_with(&format!("{{\"seq\":5,\"prev\":\"{good_head}\"")),
        "{first}"
    );
    assert!(first.contains("\"type\":\"chain_break\""), "{first}");
    assert!(first.contains("incomplete"), "{first}");
    log.append("deny", fields(6)).unwrap();

    let report = verify_one(&path).unwrap();
    assert_eq!(
        (report.first_seq, report.last_seq, report.chain_breaks),
        (5, 6, 1)
    );
    assert!(report.summary(false).contains("1 chain break:"));
    // The damaged file itself still shows where it broke.
    assert_fails_at(
        verify_one(&damaged[0]),
        &damaged[0],
        5,
        Some(5),
        "incomplete",
    );
}

#[test]
fn reopened_after_an_edited_last_record_breaks_the_chain_openly() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let good_head = hash_of(&lines(&path)[3]);
    edit_line(&path, 5, "10.10.1.5", "10.10.1.9");
    let log = AuditLog::open(config(&path)).unwrap();
    assert_eq!(log.head().0, 5);
    let first = lines(&path)[0].clone();
    assert!(
        first.starts_with(&format!("{{\"seq\":5,\"prev\":\"{good_head}\"")),
        "{first}"
    );
    assert!(first.contains("hash does not match"), "{first}");
}

#[test]
fn missing_file_with_an_unreadable_rotated_one_starts_a_new_chain_openly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    fs::create_dir(dir.path().join("audit.log.1")).unwrap();
    AuditLog::open(config(&path)).unwrap();
    let first = lines(&path)[0].clone();
    assert!(first.starts_with("{\"seq\":1,"), "{first}");
    assert!(first.contains("\"type\":\"chain_break\""), "{first}");
    assert!(first.contains("cannot be read"), "{first}");
}

#[test]
fn reopened_with_nothing_that_verifies_starts_a_new_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    fs::write(&path, "not an audit log").unwrap();
    let mut log = AuditLog::open(config(&path)).unwrap();
    log.append("deny", fields(1)).unwrap();
    let l = lines(&path);
    assert!(l[0].starts_with("{\"seq\":1,"), "{}", l[0]);
    assert!(l[0].contains("\"type\":\"chain_break\""), "{}", l[0]);
    assert_eq!(verify_one(&path).unwrap().records, 2);
}

#[test]
fn reopened_after_a_rotation_cut_short_continues_from_the_rotated_file() {
    // The old file was renamed but the new one never written: resume from PATH.1.
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let rotated = dir.path().join("audit.log.1");
    fs::rename(&path, &rotated).unwrap();
    let mut log = AuditLog::open(config(&path)).unwrap();
    assert_eq!(log.head().0, 6);
    log.append("deny", fields(6)).unwrap();
    assert!(lines(&path)[0].contains("\"type\":\"rotated\",\"previous_file\":\"audit.log.1\""));
    assert_eq!(verify(&[rotated, path], None, None).unwrap().records, 7);
}

/// Collects what the log prints, in place of the process's stdout.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn stdout_gets_the_same_bytes_as_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let out = Captured::default();
    let mut log = AuditLog::open_with_stdout(
        AuditConfig {
            stdout: true,
            hmac_key: Some(KEY.to_vec()),
            ..config(&path)
        },
        Box::new(out.clone()),
    )
    .unwrap();
    for i in 1..=4 {
        log.append("deny", fields(i)).unwrap();
    }
    log.checkpoint().unwrap();
    log.flush().unwrap();
    assert_eq!(*out.0.lock().unwrap(), fs::read(&path).unwrap());
}

#[test]
fn stdout_only_log_starts_a_chain_at_seq_1_every_time() {
    for _ in 0..2 {
        let out = Captured::default();
        let mut log = AuditLog::open_with_stdout(
            AuditConfig {
                path: None,
                stdout: true,
                ..config(Path::new("unused"))
            },
            Box::new(out.clone()),
        )
        .unwrap();
        assert_eq!(log.append("deny", fields(1)).unwrap().seq, 1);
        log.append("deny", fields(2)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let captured = dir.path().join("stdout.log");
        fs::write(&captured, &*out.0.lock().unwrap()).unwrap();
        assert_eq!(verify_one(&captured).unwrap().records, 2);
    }
}

#[test]
fn log_without_file_or_stdout_is_refused() {
    let e = AuditLog::open(AuditConfig {
        path: None,
        ..config(Path::new("unused"))
    });
    assert!(matches!(e, Err(AuditError::Config(_))));
}

#[test]
fn callers_cannot_write_the_records_the_log_writes_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(config(&path)).unwrap();
    for kind in ["checkpoint", "rotated", "chain_break"] {
        assert!(matches!(
            log.append(kind, Map::new()),
            Err(AuditError::ReservedKind(_))
        ));
    }
    for field in ["seq", "prev", "time", "node", "type", "hash"] {
        let mut f = fields(1);
        f.insert(field.to_owned(), json!(1));
        assert!(matches!(
            log.append("deny", f),
            Err(AuditError::ReservedField(_))
        ));
    }
    assert_eq!(log.head().0, 0);
}

#[test]
fn failed_rotation_keeps_the_chain_in_the_full_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(AuditConfig {
        max_bytes: 1000,
        keep: 1,
        ..config(&path)
    })
    .unwrap();
    // A directory where PATH.1 goes: the rotation can neither delete nor replace it.
    fs::create_dir(dir.path().join("audit.log.1")).unwrap();
    fs::write(dir.path().join("audit.log.1").join("x"), "").unwrap();
    for i in 1..=20 {
        log.append("deny", fields(i)).unwrap();
    }
    let report = verify_one(&path).unwrap();
    assert_eq!((report.records, report.last_seq), (20, 20));
}

#[test]
fn record_over_the_size_cap_is_refused_and_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 2);
    let mut log = AuditLog::open(config(&path)).unwrap();
    let mut big = fields(3);
    big.insert("blob".to_owned(), "x".repeat(MAX_RECORD_BYTES).into());
    assert!(matches!(
        log.append("deny", big),
        Err(AuditError::TooLarge { .. })
    ));
    assert_eq!(log.head().0, 2);
    let mut l = lines(&path);
    l.push("y".repeat(MAX_RECORD_BYTES + 10));
    write_lines(&path, &l);
    assert_fails_at(verify_one(&path), &path, 3, None, "not a record");
}

#[test]
fn audit_log_can_move_to_another_task() {
    fn send<T: Send>() {}
    send::<AuditLog>();
}

#[test]
fn new_file_is_created_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 1);
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn checkpoint_argument_is_seq_colon_64_hex() {
    let hash = "3F".repeat(32);
    assert_eq!(
        parse_checkpoint(&format!("12:{hash}")),
        Ok((12, hash.to_lowercase()))
    );
    for bad in [
        "12",
        "x:00",
        &format!("12:{}", &hash[1..]),
        &format!(":{hash}"),
    ] {
        assert!(parse_checkpoint(bad).is_err(), "{bad}");
    }
}
#[test]
fn audit_verify_command_exit_statuses() {
    use clap::Parser as _;

    use crate::cli::{run, Cli};

    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 3);
    let shown = path.to_str().unwrap();
    let parse =
        |args: &[&str]| Cli::try_parse_from(["tollgate", "audit", "verify"].iter().chain(args));
    assert_eq!(run(parse(&[shown]).unwrap()).unwrap(), 0);
    let head = hash_of(&lines(&path)[2]);
    assert_eq!(
        run(parse(&[shown, "--checkpoint", &format!("3:{head}")]).unwrap()).unwrap(),
        0
    );
    // A bad --checkpoint is a usage error (exit 2), found by clap before anything runs.
    let usage = parse(&[shown, "--checkpoint", "3:nothex"]).unwrap_err();
    assert_eq!(usage.kind(), clap::error::ErrorKind::ValueValidation);
    assert_eq!(usage.exit_code(), 2);
    // A failed verification is an error (exit 1) naming the line.
    edit_line(&path, 2, "10.10.1.5", "10.10.1.6");
    let e = run(parse(&[shown]).unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{shown} line 2 (seq 2): hash does not match its contents (edited)")
    );
    // A key others may read is refused before any verifying.
    let key = dir.path().join("key");
    fs::write(&key, KEY).unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = run(parse(&[shown, "--hmac-key", key.to_str().unwrap()]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
}

#[test]
fn a_second_writer_of_the_same_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir.path().join("sub/audit.log"));
    let first = AuditLog::open(config.clone()).unwrap();
    let second = AuditLog::open(config.clone());
    let e = second.err().expect("a second writer must be refused");
    assert!(
        e.to_string().contains("being written by another process"),
        "{e}"
    );
    drop(first);
    AuditLog::open(config).expect("free again once the first is closed");
}

#[test]
fn with_a_key_a_log_without_signed_checkpoints_and_an_empty_log_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("key");
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key_path)
            .unwrap();
        f.write_all(KEY).unwrap();
    }
    // A log rewritten without the key would have to leave its checkpoints out.
    let (path, _) = signed_log(dir.path(), None);
    let text = fs::read_to_string(&path).unwrap();
    let unsigned = dir.path().join("unsigned.log");
    fs::write(&unsigned, &text).unwrap();
    let e = run_verify_command(slice::from_ref(&unsigned), None, Some(&key_path));
    assert!(e.is_err(), "no checkpoint can be signed without the key");
    let empty = dir.path().join("empty.log");
    fs::write(&empty, "").unwrap();
    let e = run_verify_command(slice::from_ref(&empty), None, None).unwrap_err();
    assert!(e.to_string().contains("no records"), "{e}");
}

#[test]
fn a_log_deleted_behind_the_writer_is_reopened_with_a_chain_break() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(config(&path)).unwrap();
    for i in 0..3 {
        log.append("decision", fields(i)).unwrap();
    }
    assert!(!log.reopen_if_replaced().unwrap(), "nothing happened yet");
    fs::remove_file(&path).unwrap();
    assert!(log.reopen_if_replaced().unwrap());
    log.append("decision", serde_json::Map::new()).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], "chain_break");
    assert_eq!(first["seq"], 4, "the chain goes on from the head in memory");
    verify(slice::from_ref(&path), None, None).expect("the new file verifies from its break");
}

#[test]
fn a_second_writer_through_a_hard_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = AuditLog::open(config(&dir.path().join("audit.log"))).unwrap();
    fs::hard_link(dir.path().join("audit.log"), dir.path().join("other.log")).unwrap();
    let e = AuditLog::open(config(&dir.path().join("other.log")))
        .err()
        .expect("refused");
    assert!(
        e.to_string()
            .contains("another process is writing this file"),
        "{e}"
    );
}
