//! Finds the line a field was written on, so that errors found after deserializing (unknown
//! identity, overlapping CIDRs, ...) point into the file like serde's own errors do. serde
//! forgets positions once it has built the structs, so this walks the YAML a second time with
//! yaml-rust2's event parser and records the line of every node by its field path. It only runs
//! when there is an error to report: a valid 100k-rule policy never pays for it.
//!
//! Paths are document paths in serde_yaml's style: `spec.rules[2].to`. A mapping entry is
//! recorded at the line of its key (for a block list under `cidrs:` that is the `cidrs:` line,
//! where "must not be empty" should point); a list item at the line where the item starts.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

pub(super) struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Mapping {
        path: String,
        /// The key just read, while waiting for its value.
        key: Option<String>,
    },
    Sequence {
        path: String,
        next: usize,
    },
}

impl LineIndex {
    /// Best effort: if the YAML cannot be scanned (serde_yaml accepted it, so this would be a
    /// difference between the two parsers) the lines found so far are kept.
    pub(super) fn build(text: &str) -> Self {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        let mut seen_root = false;
        while let Ok((event, mark)) = parser.next_token() {
            let line = mark.line();
            let node_path = match &event {
                Event::Scalar(..)
                | Event::Alias(_)
                | Event::MappingStart(..)
                | Event::SequenceStart(..) => match stack.last_mut() {
                    None if seen_root => break, // a second document; serde rejects it anyway
                    None => {
                        seen_root = true;
                        String::new()
                    }
                    Some(Frame::Sequence { path, next }) => {
                        let p = format!("{path}[{next}]");
                        *next += 1;
                        p
                    }
                    Some(Frame::Mapping { path, key }) => match key.take() {
                        Some(k) => join(path, &k),
                        None => {
                            // This node is a key. Complex keys (mappings or lists used as keys)
                            // are never valid in a policy; give them a placeholder name.
                            let name = match &event {
                                Event::Scalar(s, ..) => s.clone(),
                                _ => "?".to_owned(),
                            };
                            let p = join(path, &name);
                            lines.entry(p).or_insert(line);
                            *key = Some(name);
                            if matches!(event, Event::Scalar(..) | Event::Alias(_)) {
                                continue;
                            }
                            // A complex key's own children are recorded under a path no
                            // field uses.
                            "?".to_owned()
                        }
                    },
                },
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                Event::StreamEnd => break,
                _ => continue,
            };
            lines.entry(node_path.clone()).or_insert(line);
            match event {
                Event::MappingStart(..) => stack.push(Frame::Mapping {
                    path: node_path,
                    key: None,
                }),
                Event::SequenceStart(..) => stack.push(Frame::Sequence {
                    path: node_path,
                    next: 0,
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

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
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

    #[test]
    fn mapping_entries_are_at_their_key_line() {
        let index = LineIndex::build(TEXT);
        assert_eq!(index.line_of("apiVersion"), Some(1));
        assert_eq!(index.line_of("spec.identities[0].cidrs"), Some(5));
    }

    #[test]
    fn list_items_are_at_their_own_line() {
        let index = LineIndex::build(TEXT);
        assert_eq!(index.line_of("spec.identities[0].cidrs[1]"), Some(7));
        assert_eq!(index.line_of("spec.identities[0]"), Some(4));
    }

    #[test]
    fn flow_style_nodes_have_lines() {
        let index = LineIndex::build(TEXT);
        assert_eq!(index.line_of("spec.rules[0].to"), Some(9));
        assert_eq!(index.line_of("spec.rules[0].ports[0].protocol"), Some(10));
    }

    #[test]
    fn missing_field_falls_back_to_its_mapping() {
        let index = LineIndex::build(TEXT);
        assert_eq!(index.line_of("spec.identities[0].spiffeId"), Some(4));
    }
}
