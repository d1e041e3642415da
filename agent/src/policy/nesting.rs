//! Refuses deeply nested YAML before the policy reader ([`super::yaml`]) sees it. The reader
//! counts depth too, but yaml-rust2's scanner reads ahead through up to 255 flow levels on a
//! line (and across lines inside flow collections) before it hands over the first event, and
//! fails with "recursion limit exceeded" beyond that: only a pass of our own can name the line
//! that went too deep. (The pass was first written for libyaml, under serde_yaml, which spent
//! time quadratic in flow depth: a 200 KB file of 100,000 nested `[` kept `tollgate policy
//! validate` busy for tens of seconds, while no valid policy nests deeper than six levels.)
//!
//! The happy path must stay one parse: a 10 MB policy is not read twice. So [`check`] first
//! makes one pass over the bytes ([`scan`], about 3% of the parse) that follows flow depth the
//! way a YAML tokenizer does (`[` and `{` open, `]` and `}` close, except inside quoted scalars,
//! plain scalars, comments and tags), and only when that count goes above [`MAX_DEPTH`] (a
//! bracket-laden block scalar, say) does it confirm with yaml-rust2's event parser, which stops
//! at the first level too many. Block (indentation) nesting is not counted by the first pass:
//! yaml-rust2 hands over its events one by one, so the reader's own depth limit stops it at the
//! right line.
//!
//! The first pass keeps no indentation state. In block context (depth 0) it therefore scans
//! every line afresh: constructs that span lines there (block scalars, multi-line plain or
//! quoted scalars) have their continuation lines read as if they were structure, which can only
//! raise the count, never hide a real `[`. In flow context it follows libyaml's rules, where
//! scalars do span lines. A file whose prose opens more brackets than it closes is counted as
//! deeper than it is and so costs the confirming parse; it is not refused for it.

use yaml_rust2::parser::{Event, Parser};

/// How deep a policy may nest, counting every mapping and list (a valid policy needs six).
pub(super) const MAX_DEPTH: usize = 32;

/// Why [`check`] refused the text, with the 1-based line it was at.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NestingError {
    /// More than [`MAX_DEPTH`] levels.
    TooDeep { line: usize },
    /// The confirming parser could not read the text. The first pass only sends text there
    /// that already looks too deep, so this is refused too rather than handed to the reader.
    Unreadable { line: usize, message: String },
}

/// Ok when `text` nests at most [`MAX_DEPTH`] levels.
pub(super) fn check(text: &str) -> Result<(), NestingError> {
    match scan(text.as_bytes(), MAX_DEPTH) {
        None => Ok(()),
        Some(offset) => confirm(text, offset),
    }
}

/// What the first pass is in the middle of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lexeme {
    /// Between tokens: the next byte that is not blank starts one.
    Between,
    /// A plain scalar. `after_blank` when the previous byte was a space, tab or line break:
    /// `#` there starts a comment, anywhere else it is part of the scalar.
    Plain {
        after_blank: bool,
    },
    SingleQuoted,
    DoubleQuoted,
    Comment,
    /// `!tag`: runs to a blank (in flow context, to a flow indicator too).
    Tag,
    /// `!<verbatim tag>`: runs to `>`, flow indicators included.
    VerbatimTag,
    /// `&anchor` or `*alias`: letters, digits, `-` and `_`.
    Anchor,
}

/// Follows the flow-collection depth of `text` as libyaml would tokenize it and returns the
/// offset of the `[` or `{` where it first goes above `limit`, or `None`. The count never falls
/// below the real depth; see the module documentation for where it is higher.
fn scan(text: &[u8], limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut state = Lexeme::Between;
    let mut i = 0usize;
    let mut line_start = true;
    while i < text.len() {
        if line_start {
            line_start = false;
            // libyaml skips a byte-order mark between tokens at a line start; anywhere else
            // it starts a plain scalar.
            if state == Lexeme::Between && text[i..].starts_with(BYTE_ORDER_MARK) {
                i += BYTE_ORDER_MARK.len();
            }
            if is_document_marker(&text[i..]) {
                // `--- [` opens a flow sequence whatever the previous line left unfinished.
                state = Lexeme::Between;
                i += 3;
                continue;
            }
        }
        // Most bytes are the inside of a scalar or comment, where only a few bytes matter;
        // skipping to the next of those keeps this pass a small fraction of the YAML parse.
        let stops = match state {
            Lexeme::Plain { .. } => Some(&PLAIN_STOPS),
            Lexeme::SingleQuoted => Some(&SINGLE_QUOTED_STOPS),
            Lexeme::DoubleQuoted => Some(&DOUBLE_QUOTED_STOPS),
            Lexeme::Comment => Some(&COMMENT_STOPS),
            Lexeme::Between => Some(&BETWEEN_STOPS),
            _ => None,
        };
        if let Some(stops) = stops {
            let run = text[i..]
                .iter()
                .position(|&b| stops[usize::from(b)])
                .unwrap_or(text.len() - i);
            if run > 0 {
                i += run;
                if let Lexeme::Plain { .. } = state {
                    state = Lexeme::Plain { after_blank: false };
                }
                continue;
            }
        }
        let b = text[i];
        let next = text.get(i + 1).copied();
        let flow = depth > 0;
        if b == b'\n' || b == b'\r' {
            state = match state {
                // libyaml continues these over line breaks in flow context.
                Lexeme::SingleQuoted | Lexeme::DoubleQuoted if flow => state,
                Lexeme::Plain { .. } if flow => Lexeme::Plain { after_blank: true },
                // In block context every line starts afresh (see the module documentation).
                _ => Lexeme::Between,
            };
            i += 1;
            line_start = true;
            continue;
        }
        match state {
            Lexeme::Between => match b {
                b' ' | b'\t' => {}
                b'#' => state = Lexeme::Comment,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Some(i);
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' => {}
                b'\'' => state = Lexeme::SingleQuoted,
                b'"' => state = Lexeme::DoubleQuoted,
                // Indicators: `- `, `? `, `: ` and, in flow context, any `?` or `:`.
                b'-' | b'?' | b':' if is_blank_or_end(next) || (flow && b != b'-') => {}
                b'!' if next == Some(b'<') => state = Lexeme::VerbatimTag,
                b'!' => state = Lexeme::Tag,
                b'&' | b'*' => state = Lexeme::Anchor,
                // A block scalar header or a directive: the rest of the line is no structure.
                // The block scalar's content lines are scanned like any other line.
                b'|' | b'>' if !flow => state = Lexeme::Comment,
                b'%' => state = Lexeme::Comment,
                _ => state = Lexeme::Plain { after_blank: false },
            },
            Lexeme::Plain { after_blank } => match b {
                b' ' | b'\t' => state = Lexeme::Plain { after_blank: true },
                b'#' if after_blank => state = Lexeme::Comment,
                b':' if is_blank_or_end(next)
                    || (flow && matches!(next, Some(b',' | b'?' | b'[' | b']' | b'{' | b'}'))) =>
                {
                    state = Lexeme::Between;
                    continue; // the `:` is an indicator: read it again between tokens
                }
                b',' | b'[' | b']' | b'{' | b'}' if flow => {
                    state = Lexeme::Between;
                    continue; // flow indicators end a plain scalar in flow context
                }
                _ => state = Lexeme::Plain { after_blank: false },
            },
            Lexeme::SingleQuoted => {
                if b == b'\'' {
                    if next == Some(b'\'') {
                        i += 1; // `''` is a quote inside the scalar
                    } else {
                        state = Lexeme::Between;
                    }
                }
            }
            Lexeme::DoubleQuoted => match b {
                // Only the escapes that could hide or fake the closing quote matter.
                b'\\' if matches!(next, Some(b'"' | b'\\')) => i += 1,
                b'"' => state = Lexeme::Between,
                _ => {}
            },
            Lexeme::Comment => {}
            Lexeme::Tag => match b {
                b' ' | b'\t' => state = Lexeme::Between,
                b',' | b'[' | b']' | b'{' | b'}' if flow => {
                    state = Lexeme::Between;
                    continue;
                }
                _ => {}
            },
            Lexeme::VerbatimTag => match b {
                b'>' => state = Lexeme::Tag,
                b' ' | b'\t' => state = Lexeme::Between,
                _ => {}
            },
            Lexeme::Anchor => {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    state = Lexeme::Between;
                    continue;
                }
            }
        }
        i += 1;
    }
    None
}

/// The bytes that end a run the state ignores: line breaks always, and what each state
/// looks at.
const PLAIN_STOPS: [bool; 256] = stops(b"\n\r \t#:,[]{}");
const SINGLE_QUOTED_STOPS: [bool; 256] = stops(b"\n\r'");
const DOUBLE_QUOTED_STOPS: [bool; 256] = stops(b"\n\r\"\\");
const COMMENT_STOPS: [bool; 256] = stops(b"\n\r");
/// Between tokens, only indentation and other blanks are skipped in a run.
const BETWEEN_STOPS: [bool; 256] = {
    let mut table = [true; 256];
    table[b' ' as usize] = false;
    table[b'\t' as usize] = false;
    table
};

const fn stops(bytes: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = true;
        i += 1;
    }
    table
}

const BYTE_ORDER_MARK: &[u8] = "\u{feff}".as_bytes();

fn is_blank_or_end(b: Option<u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t' | b'\n' | b'\r'))
}

/// `---` or `...` followed by a blank or the end: a document marker, when at a line start.
fn is_document_marker(rest: &[u8]) -> bool {
    (rest.starts_with(b"---") || rest.starts_with(b"...")) && is_blank_or_end(rest.get(3).copied())
}

/// yaml-rust2's message when its scanner runs out of flow levels (it has 255), which it can
/// reach before delivering the event at [`MAX_DEPTH`] because it reads ahead on one line.
const YAML_RUST2_TOO_DEEP: &str = "recursion limit exceeded";

/// The exact depth, counting every mapping and list, block or flow; stops at the first level
/// beyond [`MAX_DEPTH`]. `scanned_too_deep_at` is where [`scan`] went above it.
fn confirm(text: &str, scanned_too_deep_at: usize) -> Result<(), NestingError> {
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            let line = e.marker().line();
            if e.info() == YAML_RUST2_TOO_DEEP {
                // yaml-rust2 stops at level 256, usually far past the line that went too deep;
                // the scan's position is that line whenever the scan counted right.
                let before = &text.as_bytes()[..scanned_too_deep_at];
                let scanned_line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                NestingError::TooDeep {
                    line: scanned_line.min(line),
                }
            } else {
                NestingError::Unreadable {
                    line,
                    message: e.info().to_owned(),
                }
            }
        })?;
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(NestingError::TooDeep { line: mark.line() });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::StreamEnd => return Ok(()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth the scan counts: the least limit it stays within.
    fn bound(text: &str) -> usize {
        (0..)
            .find(|&limit| scan(text.as_bytes(), limit).is_none())
            .unwrap()
    }

    #[test]
    fn counts_flow_collections() {
        assert_eq!(bound("a: [1, {b: [2]}, []]\n"), 3);
        assert_eq!(bound("a: [\n  [\n    x\n  ]\n]\nb: [c]\n"), 2);
        assert_eq!(scan(&[b'['; 100_000], 99_999), Some(99_999));
        assert_eq!(scan(&[b'['; 100_000], 100_000), None);
    }

    #[test]
    fn brackets_in_quoted_scalars_and_comments_do_not_count() {
        assert_eq!(bound("a: '[[[['  # [[[[\nb: \"{{{{\"\n"), 0);
        assert_eq!(bound("a: ['x]]]', \"y]]]\", 'it''s [']\n"), 1);
        assert_eq!(bound("a: [\"esc \\\" [[[[\", b]\n"), 1);
        // Multi-line quoted scalar in flow context.
        assert_eq!(bound("a: [ 'one\n  [[[[ two' ]\n"), 1);
    }

    #[test]
    fn quote_inside_a_plain_scalar_opens_nothing() {
        // libyaml reads `it's` and `a 'b` as plain scalars; the quote starts no string that
        // could hide the real nesting after it.
        assert_eq!(bound("a: [it's, [[x]]]\n"), 3);
        assert_eq!(bound("a: [ a 'b, [[ 'c' ]] ]\n"), 3);
    }

    #[test]
    fn closing_brackets_in_plain_scalars_count_in_flow_context_only() {
        // In flow context `]` ends the plain scalar and closes; in block context it is text.
        assert_eq!(bound("a: b]]]\nc: [[d]]\n"), 2);
        assert_eq!(bound("a: x[[[\n"), 0);
    }

    #[test]
    fn tags_and_anchors_are_skipped() {
        assert_eq!(bound("a: !!seq [&x [*x, !<tag:a]]b> [c]]]\n"), 3);
    }

    #[test]
    fn a_hash_inside_a_plain_scalar_is_not_a_comment() {
        assert_eq!(bound("a: [b#c, [d]]\n"), 2);
        assert_eq!(bound("a: [b #c, [d]]\n"), 1);
    }

    #[test]
    fn byte_order_mark_is_skipped_only_at_a_line_start() {
        assert_eq!(bound("\u{feff}[[a]]\n\u{feff}[b]\n"), 2);
        // Elsewhere it starts a plain scalar, and the quote after it opens nothing.
        assert_eq!(bound("[ \u{feff}'a, [[[b]]] ]\n"), 4);
    }

    #[test]
    fn document_marker_starts_afresh() {
        // Even inside what was a quoted scalar in flow context.
        assert_eq!(bound("[ 'open\n--- [[x]]\n"), 3);
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        assert_eq!(
            check(&"[".repeat(100_000)),
            Err(NestingError::TooDeep { line: 1 })
        );
        let text = format!("a: b\nc: {}\n", "[".repeat(40));
        assert!(matches!(
            check(&text),
            Err(NestingError::TooDeep { line: 2 })
        ));
        // yaml-rust2 gives up at line 256 here, before delivering the 33rd level.
        for n in [100, 100_000] {
            assert_eq!(
                check(&"[\n".repeat(n)),
                Err(NestingError::TooDeep { line: 33 })
            );
        }
    }

    #[test]
    fn deep_looking_but_shallow_text_is_confirmed_and_passes() {
        // A block scalar's prose is scanned like structure, so it looks deep.
        let text = format!("a: |\n  {}\nb: [c]\n", "[".repeat(40));
        assert!(bound(&text) > MAX_DEPTH);
        assert_eq!(check(&text), Ok(()));
    }

    #[test]
    fn confirmation_counts_block_levels_too() {
        // The prose makes the first pass confirm; the top-level mapping is one level.
        let nested = |n: usize| {
            format!(
                "a: |\n  {}\nb: {}{}\n",
                "[".repeat(40),
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(check(&nested(MAX_DEPTH - 1)), Ok(()));
        assert_eq!(
            check(&nested(MAX_DEPTH)),
            Err(NestingError::TooDeep { line: 3 })
        );
    }
}
