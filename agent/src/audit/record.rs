//! One audit record on the wire: how a line is built and sealed with its hash, how a line is
//! taken apart again for checking, and the checkpoint signature. Both the writer and the
//! verifier go through here, so there is one definition of the format.

use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// The `prev` of the first record of a chain.
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// Record types the log writes itself; [`super::AuditLog::append`] refuses them so that a caller
/// can never forge one.
pub const KIND_CHECKPOINT: &str = "checkpoint";
pub const KIND_ROTATED: &str = "rotated";
pub const KIND_CHAIN_BREAK: &str = "chain_break";
pub(crate) const RESERVED_KINDS: [&str; 3] = [KIND_CHECKPOINT, KIND_ROTATED, KIND_CHAIN_BREAK];

/// Field names every record starts with (and `hash`, which ends it): a caller field of the same
/// name would make the line ambiguous.
pub(crate) const RESERVED_FIELDS: [&str; 6] = ["seq", "prev", "time", "node", "type", "hash"];

/// The longest line (with its newline) the writer writes and the verifier reads: a record is
/// one decision, and the cap keeps a hostile file from making the verifier read gigabytes as
/// one line.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// `,"hash":"` + 64 hex + `"}`: what the sealed line carries after BODY without its `}`.
const SUFFIX_HEAD: &[u8] = b",\"hash\":\"";
const SUFFIX_TAIL: &[u8] = b"\"}";
const SUFFIX_LEN: usize = SUFFIX_HEAD.len() + 64 + SUFFIX_TAIL.len();

/// The HMAC-SHA256 of a checkpoint: over `tollgate-audit-checkpoint:{head_seq}:{head}`, so the
/// signature binds the position and the hash of the record it vouches for, and nothing else.
pub fn checkpoint_hmac(key: &[u8], head_seq: u64, head: &str) -> String {
    hex_encode(&checkpoint_mac(key, head_seq, head).finalize().into_bytes())
}

fn checkpoint_mac(key: &[u8], head_seq: u64, head: &str) -> Hmac<Sha256> {
    // HMAC takes a key of any length (longer ones are hashed first), so this never fails.
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("tollgate-audit-checkpoint:{head_seq}:{head}").as_bytes());
    mac
}

/// Compares in constant time, so a forger cannot learn the signature a byte at a time from how
/// long a verifier takes (a verifier may run as a service).
pub fn checkpoint_hmac_matches(key: &[u8], head_seq: u64, head: &str, hmac_hex: &str) -> bool {
    match hex_decode::<32>(hmac_hex) {
        Some(tag) => checkpoint_mac(key, head_seq, head)
            .verify_slice(&tag)
            .is_ok(),
        None => false,
    }
}

/// The hash that seals a record: SHA-256 over the previous record's raw hash and then BODY.
pub fn record_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// BODY: the compact JSON object `{"seq":..,"prev":..,"time":..,"node":..,"type":.., fields..}`
/// with those five first, in that order, and the caller's fields after them (in the map's order).
pub fn encode_body(
    seq: u64,
    prev: &[u8; 32],
    time: &str,
    node: &str,
    kind: &str,
    fields: &Map<String, Value>,
) -> String {
    let mut body = format!("{{\"seq\":{seq},\"prev\":\"{}\"", hex_encode(prev));
    for (name, value) in [("time", time), ("node", node), ("type", kind)] {
        body.push_str(",\"");
        body.push_str(name);
        body.push_str("\":");
        body.push_str(&json_string(value));
    }
    for (name, value) in fields {
        body.push(',');
        body.push_str(&json_string(name));
        body.push(':');
        // Writing a `Value` to a String cannot fail: its keys are strings and it holds no NaN.
        body.push_str(&value.to_string());
    }
    body.push('}');
    body
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// The line to write for BODY: BODY with its final `}` replaced by `,"hash":"<hex>"}`, and `\n`.
pub fn seal(prev: &[u8; 32], body: &str) -> ([u8; 32], String) {
    let hash = record_hash(prev, body.as_bytes());
    let open = &body[..body.len() - 1];
    let line = format!("{open},\"hash\":\"{}\"}}\n", hex_encode(&hash));
    (hash, line)
}

/// A line taken apart, its hash not yet checked against its contents.
#[derive(Debug)]
pub struct ParsedLine {
    pub seq: u64,
    pub prev: [u8; 32],
    /// The hash the line claims.
    pub hash: [u8; 32],
    pub kind: String,
    pub fields: Map<String, Value>,
    /// BODY as it was hashed: the line without its hash suffix, `}` put back.
    pub body: Vec<u8>,
}

impl ParsedLine {
    /// Whether the claimed hash is the hash of this line's `prev` and BODY.
    pub fn hash_matches(&self) -> bool {
        record_hash(&self.prev, &self.body) == self.hash
    }
}

/// Why a line is not a record, and the seq it claims when that much could still be read.
#[derive(Debug)]
pub struct LineError {
    pub seq: Option<u64>,
    pub reason: String,
}

/// Takes a line (without its `\n`) apart: the exact hash suffix, then BODY as a JSON object that
/// starts with `seq` and `prev`. Works on the bytes as written: nothing is re-serialised.
pub fn parse_line(line: &[u8]) -> Result<ParsedLine, LineError> {
    let fail = |seq, reason: &str| LineError {
        seq,
        reason: reason.to_owned(),
    };
    if line.is_empty() {
        return Err(fail(None, "empty line"));
    }
    let claimed_seq = sniff_seq(line);
    let Some(split) = line.len().checked_sub(SUFFIX_LEN) else {
        return Err(fail(claimed_seq, "no hash at the end of the line (edited)"));
    };
    let (open, suffix) = line.split_at(split);
    let hash_hex = &suffix[SUFFIX_HEAD.len()..SUFFIX_HEAD.len() + 64];
    let hash = std::str::from_utf8(hash_hex)
        .ok()
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .and_then(hex_decode::<32>);
    let (true, true, Some(hash)) = (
        suffix.starts_with(SUFFIX_HEAD),
        suffix.ends_with(SUFFIX_TAIL),
        hash,
    ) else {
        return Err(fail(
            claimed_seq,
            "the line does not end in ,\"hash\":\"<64 lowercase hex>\"} (edited)",
        ));
    };
    let mut body = Vec::with_capacity(open.len() + 1);
    body.extend_from_slice(open);
    body.push(b'}');
    let Ok(mut fields) = serde_json::from_slice::<Map<String, Value>>(&body) else {
        return Err(fail(claimed_seq, "not a JSON object (edited)"));
    };
    let seq = fields.remove("seq").and_then(|v| v.as_u64());
    let prev = fields
        .remove("prev")
        .and_then(|v| v.as_str().and_then(hex_decode::<32>));
    let kind = match fields.remove("type") {
        Some(Value::String(k)) => Some(k),
        _ => None,
    };
    let (Some(seq), Some(prev), Some(kind)) = (seq, prev, kind) else {
        return Err(fail(
            claimed_seq,
            "lacks a numeric seq, a 64-hex prev or a string type (edited)",
        ));
    };
    // The hash covers the bytes, so the order is sealed too; checking it keeps every record
    // readable by its first few bytes (`head -c`, `grep '^{"seq":17,'`).
    let start = format!("{{\"seq\":{seq},\"prev\":\"{}\",", hex_encode(&prev));
    if !body.starts_with(start.as_bytes()) {
        return Err(fail(
            Some(seq),
            "does not start with \"seq\" and \"prev\" (edited)",
        ));
    }
    Ok(ParsedLine {
        seq,
        prev,
        hash,
        kind,
        fields,
        body,
    })
}

/// The seq a line claims if it starts like a record, for naming a line that is otherwise
/// unreadable.
fn sniff_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Exactly `2 * N` hex digits, either case.
pub fn hex_decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? << 4 | digit(pair[1])?).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn sealed_line_is_body_with_hash_suffix_and_parses_back() {
        let body = encode_body(
            7,
            &[0xab; 32],
            "2026-11-23T10:00:00.123Z",
            "node-a",
            "deny",
            &fields(json!({"rule": "default-deny", "port": 8080})),
        );
        assert!(body.starts_with(&format!(
            "{{\"seq\":7,\"prev\":\"{}\",\"time\":\"2026-11-23T10:00:00.123Z\",\"node\":\"node-a\",\"type\":\"deny\",",
            "ab".repeat(32)
        )));
        let (hash, line) = seal(&[0xab; 32], &body);
        assert_eq!(hash, record_hash(&[0xab; 32], body.as_bytes()));
        assert!(line.ends_with(&format!(",\"hash\":\"{}\"}}\n", hex_encode(&hash))));
        let parsed = parse_line(line.trim_end().as_bytes()).unwrap();
        assert_eq!(
            (parsed.seq, parsed.prev, parsed.hash),
            (7, [0xab; 32], hash)
        );
        assert_eq!(parsed.kind, "deny");
        assert_eq!(parsed.fields["port"], 8080);
        assert_eq!(parsed.body, body.as_bytes());
        assert!(parsed.hash_matches());
    }

    #[test]
    fn strings_are_json_escaped_so_a_record_stays_one_line() {
        let body = encode_body(
            1,
            &ZERO_HASH,
            "t",
            "no\"de\n",
            "x",
            &fields(json!({"a\nb": "c\nd"})),
        );
        assert!(!body.contains('\n'));
        let (_, line) = seal(&ZERO_HASH, &body);
        let parsed = parse_line(line.trim_end().as_bytes()).unwrap();
        assert_eq!(parsed.fields["node"], "no\"de\n");
        assert_eq!(parsed.fields["a\nb"], "c\nd");
    }

    #[test]
    fn uppercase_hash_is_not_the_format() {
        let (_, line) = seal(
            &ZERO_HASH,
            &encode_body(1, &ZERO_HASH, "t", "n", "x", &Map::new()),
        );
        let line = line.trim_end();
        let upper = format!(
            "{}{}",
            &line[..line.len() - 66],
            line[line.len() - 66..].to_uppercase()
        );
        assert_eq!(parse_line(upper.as_bytes()).unwrap_err().seq, Some(1));
    }

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 4] = [0, 0x0f, 0xa0, 0xff];
        assert_eq!(hex_encode(&bytes), "000fa0ff");
        assert_eq!(hex_decode::<4>("000fa0ff"), Some(bytes));
        assert_eq!(hex_decode::<4>("000FA0FF"), Some(bytes));
        assert_eq!(hex_decode::<4>("000fa0f"), None);
        assert_eq!(hex_decode::<4>("000fa0fg"), None);
    }

    #[test]
    fn checkpoint_hmac_binds_seq_and_head() {
        let key = b"0123456789abcdef";
        let head = "ab".repeat(32);
        let tag = checkpoint_hmac(key, 5, &head);
        assert_eq!(tag.len(), 64);
        assert!(checkpoint_hmac_matches(key, 5, &head, &tag));
        assert!(!checkpoint_hmac_matches(key, 6, &head, &tag));
        assert!(!checkpoint_hmac_matches(
            b"another key 1234",
            5,
            &head,
            &tag
        ));
        assert!(!checkpoint_hmac_matches(key, 5, &head, "zz"));
    }
}
