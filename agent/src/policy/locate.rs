//! Finds the line a field was written on, so that errors found after deserializing (unknown
//! identity, overlapping CIDRs, ...) point into the file like serde's own errors do. serde
//! forgets positions once it has built the structs, so this walks the YAML a second time with
//! yaml-rust2's event parser and notes the line of each node whose field path is asked for. It
//! only runs when there is an error to report, so a valid 100k-rule policy never pays for it,
//! and it stops as soon as every path asked for has been found.
//!
//! Paths are document paths as the reader's errors print them: `spec.rules[2].to`. A mapping entry is
//! at the line of its key (for a block list under `cidrs:` that is the `cidrs:` line, where
//! "must not be empty" should point); a list item at the line where the item starts.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, Parser};

pub(super) struct LineIndex {
    lines: HashMap<String, usize>,
}

struct Frame {
    /// Length of the container's own path in the path buffer.
    path_len: usize,
    kind: FrameKind,
}

enum FrameKind {
    /// `value_next`: a key was read, the next node is its value.
    Mapping {
        value_next: bool,
    },
    Sequence {
        next_index: usize,
    },
}

impl LineIndex {
    /// Finds the lines of `paths` and of their ancestors (see [`Self::line_of`]). Best effort:
    /// if yaml-rust2 cannot read the text, the lines found so far are kept.
    pub(super) fn build<'a>(text: &str, paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut wanted: HashSet<&str> = HashSet::new();
        for mut path in paths {
            while wanted.insert(path) && !path.is_empty() {
                path = parent(path);
            }
        }
        let mut lines = HashMap::with_capacity(wanted.len());
        // The path of the current node, built in place: no allocation per node.
        let mut path = String::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut seen_root = false;
        let mut parser = Parser::new_from_str(text);
        while lines.len() < wanted.len() {
            let Ok((event, mark)) = parser.next_token() else {
                break;
            };
            let is_container = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            match event {
                Event::Scalar(..)
                | Event::Alias(_)
                | Event::MappingStart(..)
                | Event::SequenceStart(..) => {}
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    if let Some(Frame {
                        kind: FrameKind::Mapping { value_next },
                        ..
                    }) = stack.last_mut()
                    {
                        *value_next = false;
                    }
                    continue;
                }
                Event::StreamEnd => break,
                _ => continue,
            }
            match stack.last_mut() {
                None if seen_root => break, // a second document; the reader rejects it anyway
                None => seen_root = true,
                Some(Frame {
                    path_len,
                    kind: FrameKind::Sequence { next_index },
                }) => {
                    path.truncate(*path_len);
                    path.push_str(&format!("[{next_index}]"));
                    *next_index += 1;
                }
                Some(Frame {
                    kind: FrameKind::Mapping { value_next },
                    ..
                }) if *value_next => {
                    // The path buffer still holds the key's path.
                    if !is_container {
                        *value_next = false;
                    }
                }
                Some(Frame {
                    path_len,
                    kind: FrameKind::Mapping { value_next },
                }) => {
                    // A key. Complex keys (a mapping or list as key) are never valid in a
                    // policy; their contents get a path no field has.
                    path.truncate(*path_len);
                    if *path_len > 0 {
                        path.push('.');
                    }
                    match &event {
                        Event::Scalar(key, ..) => path.push_str(key),
                        _ => path.push('?'),
                    }
                    *value_next = true;
                    if !is_container {
                        record(&mut lines, &wanted, &path, mark.line());
                        continue;
                    }
                }
            }
            record(&mut lines, &wanted, &path, mark.line());
            match event {
                Event::MappingStart(..) => stack.push(Frame {
                    path_len: path.len(),
                    kind: FrameKind::Mapping { value_next: false },
                }),
                Event::SequenceStart(..) => stack.push(Frame {
                    path_len: path.len(),
                    kind: FrameKind::Sequence { next_index: 0 },
                }),
                _ => {}
            }
        }
        Self { lines }
    }

    /// The line of `path`, or of its nearest ancestor that was written (a missing field is
    /// reported at the mapping it is missing from; a field inside an alias at the alias).
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(&line) = self.lines.get(path) {
                return Some(line);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }
}

/// The first occurrence wins: for a duplicated key serde reports its own error anyway.
fn record(lines: &mut HashMap<String, usize>, wanted: &HashSet<&str>, path: &str, line: usize) {
    if wanted.contains(path) && !lines.contains_key(path) {
        lines.insert(path.to_owned(), line);
    }
}

/// `spec.rules[2].to` → `spec.rules[2]` → `spec.rules` → `spec` → ``.
fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: v
spec:
  identities:
    - name: a
      cidrs:
        - 10.0.0.0/8
        - 10.1.0.0/16
  rules:
    - { name: r, from: a, to: b,
        ports: [ { protocol: TCP } ] }
";

    const PATHS: [&str; 7] = [
        "apiVersion",
        "spec.identities[0].cidrs",
        "spec.identities[0].cidrs[1]",
        "spec.identities[0]",
        "spec.rules[0].to",
        "spec.rules[0].ports[0].protocol",
        "spec.identities[0].spiffeId",
    ];

    #[test]
    fn mapping_entries_are_at_their_key_line() {
        let index = LineIndex::build(TEXT, PATHS);
        assert_eq!(index.line_of("apiVersion"), Some(1));
        assert_eq!(index.line_of("spec.identities[0].cidrs"), Some(5));
    }

    #[test]
    fn list_items_are_at_their_own_line() {
        let index = LineIndex::build(TEXT, PATHS);
        assert_eq!(index.line_of("spec.identities[0].cidrs[1]"), Some(7));
        assert_eq!(index.line_of("spec.identities[0]"), Some(4));
    }

    #[test]
    fn flow_style_nodes_have_lines() {
        let index = LineIndex::build(TEXT, PATHS);
        assert_eq!(index.line_of("spec.rules[0].to"), Some(9));
        assert_eq!(index.line_of("spec.rules[0].ports[0].protocol"), Some(10));
    }

    #[test]
    fn paths_not_asked_for_are_not_recorded() {
        let index = LineIndex::build(TEXT, ["spec.rules[0].to"]);
        assert!(!index.lines.contains_key("apiVersion"));
        assert!(!index.lines.contains_key("spec.identities"));
        assert_eq!(index.line_of("spec.rules[0]"), Some(9));
    }

    #[test]
    fn missing_field_falls_back_to_its_mapping() {
        let index = LineIndex::build(TEXT, PATHS);
        assert_eq!(index.line_of("spec.identities[0].spiffeId"), Some(4));
    }
}
