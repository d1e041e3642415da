//! Reads policy YAML straight into the model structs ([`from_str`]): yaml-rust2's event parser
//! hands serde one event at a time, so no list of events and no document tree is ever built.
//! (serde_yaml 0.9, used before, and its forks serde_yaml_ng and serde_norway keep every event
//! of the document first: a 229 MB peak for an 8.6 MB, 100k-rule policy, against 40 MB here,
//! and a parse 15% slower.) An error carries the line of the event being read and the document
//! path of the node it belongs to (`spec.rules[2].ports[0].port`), which is what
//! `file:line: field: message` needs; a syntax error carries yaml-rust2's line and no path.
//!
//! Scalars are read the way serde_yaml 0.9 read them, so a policy means what it meant before:
//! any scalar can be a string (`name: 123` is the name "123"); a plain `~`, `null`, `Null`,
//! `NULL` or nothing at all leaves an optional field out; integers are decimal (a leading zero
//! makes a string, as in YAML 1.2), or `0x`, `0o`, `0b` with an optional sign. A mapping of a
//! struct rejects unknown and repeated keys through serde itself. Anchors and aliases work, an
//! alias being read as a copy of its anchored node: at most [`MAX_ALIAS_NODES`] nodes are
//! copied in all, so that a few lines of aliases of aliases cannot expand into gigabytes, and an
//! alias inside the node it names is refused. Nesting deeper than [`MAX_DEPTH`] (aliases
//! included) is refused, and a file holds one document.

use std::{collections::HashMap, fmt, rc::Rc, str::Chars};

use serde::de::{
    self, value::StrDeserializer, DeserializeOwned, DeserializeSeed, Unexpected, Visitor,
};
use yaml_rust2::{
    parser::{Event, Parser},
    scanner::{Marker, ScanError, TScalarStyle},
};

use super::nesting::MAX_DEPTH;

/// How many nodes (scalars, lists and mappings) aliases may copy in one policy. Far above what
/// reuse of port lists or CIDR lists needs even at 100k rules, far below what would strain
/// memory.
pub(super) const MAX_ALIAS_NODES: usize = 1_000_000;

/// Why the YAML could not be read into the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct YamlError {
    /// 1-based line.
    pub line: usize,
    /// Document path of the node (`spec.rules[0]`; empty for the document itself), or `None`
    /// when the error is about the text rather than a node (syntax, nesting, aliases).
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        if let Some(path) = self.path.as_deref().filter(|p| !p.is_empty()) {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Reads the one document of `text` as a `T`. An empty stream (nothing, or only comments) reads
/// as an empty document: a struct with every field left out.
pub(super) fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut reader = Reader::new(text);
    reader.start().map_err(Error::into_yaml_error)?;
    let value = T::deserialize(Node {
        reader: &mut reader,
        path: Path::Root,
    })
    .map_err(Error::into_yaml_error)?;
    reader.finish().map_err(Error::into_yaml_error)?;
    Ok(value)
}

/// An error on its way out. serde creates them without a position ([`de::Error::custom`]); the
/// innermost node the error passes through gives it its line and path.
#[derive(Debug)]
struct Error {
    message: String,
    /// Line and path, once known. A path of `None` means the error is about the text.
    at: Option<(usize, Option<String>)>,
}

impl Error {
    /// An error about the text at `line`, not about a node.
    fn in_text(line: usize, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            at: Some((line, None)),
        }
    }

    /// Places the error at `line` and `path` unless a node inside already did.
    fn at(mut self, line: usize, path: &Path<'_>) -> Self {
        if self.at.is_none() {
            self.at = Some((line, Some(path.to_string())));
        }
        self
    }

    fn into_yaml_error(self) -> YamlError {
        let (line, path) = self.at.unwrap_or((1, None));
        YamlError {
            line,
            path,
            message: self.message,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self {
            message: message.to_string(),
            at: None,
        }
    }
}

/// yaml-rust2 words its errors context first (`while parsing a block mapping, did not find
/// expected key`); the problem reads better first, as libyaml put it.
fn syntax_error(e: ScanError) -> Error {
    let info = e.info();
    let message = match info.strip_prefix("while ").and_then(|r| r.split_once(", ")) {
        Some((context, problem)) => format!("{problem}, while {context}"),
        None => info.to_owned(),
    };
    Error::in_text(e.marker().line(), message)
}

fn too_deep(line: usize) -> Error {
    Error::in_text(
        line,
        format!("the policy nests deeper than {MAX_DEPTH} levels"),
    )
}

/// Where a node is in the document, as `spec.rules[2].to`; built on the stack as the reader
/// descends, and only turned into text for an error.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Seq {
        parent: &'p Path<'p>,
        index: usize,
    },
    Map {
        parent: &'p Path<'p>,
        key: &'p str,
    },
    /// The value of a key that is not a scalar (never valid in a policy).
    Unknown {
        parent: &'p Path<'p>,
    },
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Seq { parent, index } => write!(f, "{parent}[{index}]"),
            Path::Map {
                parent: Path::Root,
                key,
            } => f.write_str(key),
            Path::Map { parent, key } => write!(f, "{parent}.{key}"),
            Path::Unknown { parent: Path::Root } => f.write_str("?"),
            Path::Unknown { parent } => write!(f, "{parent}.?"),
        }
    }
}

/// The event stream with aliases replaced by copies of their anchored nodes, and the nesting
/// depth counted.
struct Reader<'t> {
    parser: Parser<Chars<'t>>,
    peeked: Option<(Event, Marker)>,
    /// Line of the last event taken (1-based).
    line: usize,
    /// Depth of the event last pulled: mappings and lists open around it.
    depth: usize,
    /// Complete anchored nodes by anchor id, and how many nodes each holds.
    anchors: HashMap<usize, (Rc<[Event]>, usize)>,
    /// Anchored nodes still being read, innermost last.
    recording: Vec<Recording>,
    /// Aliases being read, innermost last.
    replaying: Vec<Replay>,
    /// Nodes copied by aliases so far.
    alias_nodes: usize,
}

struct Recording {
    anchor: usize,
    events: Vec<Event>,
    nodes: usize,
    /// Mappings and lists of the node still open.
    open: usize,
}

struct Replay {
    events: Rc<[Event]>,
    next: usize,
    /// Where the alias is: events of the copy are reported there.
    at: Marker,
}

impl<'t> Reader<'t> {
    fn new(text: &'t str) -> Self {
        Self {
            parser: Parser::new_from_str(text),
            peeked: None,
            line: 1,
            depth: 0,
            anchors: HashMap::new(),
            recording: Vec::new(),
            replaying: Vec::new(),
            alias_nodes: 0,
        }
    }

    /// Reads up to the root node. An empty stream gets an empty plain scalar as its root,
    /// which reads as an empty mapping or a left-out optional value (as in serde_yaml).
    fn start(&mut self) -> Result<(), Error> {
        loop {
            let (event, mark) = self.take()?;
            match event {
                Event::StreamStart => {}
                Event::DocumentStart => return Ok(()),
                Event::StreamEnd => {
                    let empty = Event::Scalar(String::new(), TScalarStyle::Plain, 0, None);
                    self.peeked = Some((empty, mark));
                    return Ok(());
                }
                _ => {
                    return Err(Error::in_text(
                        mark.line(),
                        "the YAML stream has no document",
                    ))
                }
            }
        }
    }

    /// After the root node: the end of its document, then of the stream.
    fn finish(&mut self) -> Result<(), Error> {
        loop {
            let (event, mark) = self.take()?;
            match event {
                Event::DocumentEnd => {}
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart => {
                    return Err(Error::in_text(
                        mark.line(),
                        "a second YAML document; a policy file holds exactly one",
                    ))
                }
                // The parser ends a document after its root node; anything else is a bug there.
                _ => {
                    return Err(Error::in_text(
                        mark.line(),
                        "unexpected YAML after the document",
                    ))
                }
            }
        }
    }

    fn peek(&mut self) -> Result<&Event, Error> {
        if self.peeked.is_none() {
            self.peeked = Some(self.pull()?);
        }
        Ok(&self.peeked.as_ref().expect("just filled").0)
    }

    /// The next event; its line becomes the line errors are reported at.
    fn take(&mut self) -> Result<(Event, Marker), Error> {
        let (event, mark) = match self.peeked.take() {
            Some(next) => next,
            None => self.pull()?,
        };
        self.line = mark.line();
        Ok((event, mark))
    }

    /// The next event of the document, an alias read as its anchored node.
    fn pull(&mut self) -> Result<(Event, Marker), Error> {
        let (event, mark) = loop {
            if let Some(replay) = self.replaying.last_mut() {
                let event = replay.events[replay.next].clone();
                let at = replay.at;
                replay.next += 1;
                if replay.next == replay.events.len() {
                    self.replaying.pop();
                }
                break (event, at);
            }
            let (event, mark) = self.parser.next_token().map_err(syntax_error)?;
            let Event::Alias(anchor) = event else {
                break (event, mark);
            };
            let Some((events, nodes)) = self.anchors.get(&anchor) else {
                // yaml-rust2 refuses aliases of unknown anchors itself, so the anchor is open.
                return Err(Error::in_text(
                    mark.line(),
                    "an alias inside the node its anchor names (a node cannot contain itself)",
                ));
            };
            self.alias_nodes += nodes;
            if self.alias_nodes > MAX_ALIAS_NODES {
                return Err(Error::in_text(
                    mark.line(),
                    format!(
                        "aliases copy more than {MAX_ALIAS_NODES} nodes; write the policy out \
                         without them"
                    ),
                ));
            }
            self.replaying.push(Replay {
                events: Rc::clone(events),
                next: 0,
                at: mark,
            });
        };
        let (is_node, opens, closes, anchor) = match &event {
            Event::Scalar(_, _, anchor, _) => (true, false, false, *anchor),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                (true, true, false, *anchor)
            }
            Event::SequenceEnd | Event::MappingEnd => (false, false, true, 0),
            _ => (false, false, false, 0),
        };
        if opens {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(too_deep(mark.line()));
            }
        } else if closes {
            self.depth = self.depth.saturating_sub(1);
        }
        if !self.recording.is_empty() || anchor != 0 {
            self.record(&event, is_node, opens, closes, anchor);
        }
        Ok((event, mark))
    }

    /// Adds the event to every anchored node being read, starts one if the event is anchored,
    /// and files the nodes it completes.
    fn record(&mut self, event: &Event, is_node: bool, opens: bool, closes: bool, anchor: usize) {
        // Copies carry no anchor: reading one defines nothing again.
        let copy = match event {
            Event::Scalar(value, style, _, tag) => {
                Event::Scalar(value.clone(), *style, 0, tag.clone())
            }
            Event::SequenceStart(_, tag) => Event::SequenceStart(0, tag.clone()),
            Event::MappingStart(_, tag) => Event::MappingStart(0, tag.clone()),
            other => other.clone(),
        };
        for open in &mut self.recording {
            open.events.push(copy.clone());
            open.nodes += usize::from(is_node);
            if opens {
                open.open += 1;
            } else if closes {
                open.open -= 1;
            }
        }
        if anchor != 0 {
            self.recording.push(Recording {
                anchor,
                events: vec![copy],
                nodes: 1,
                open: usize::from(opens),
            });
        }
        while self.recording.last().is_some_and(|r| r.open == 0) {
            let done = self.recording.pop().expect("checked above");
            self.anchors
                .insert(done.anchor, (Rc::from(done.events), done.nodes));
        }
    }

    /// Skips the node whose first event was just taken.
    fn skip_rest(&mut self, first: &Event) -> Result<(), Error> {
        let mut open = usize::from(matches!(
            first,
            Event::SequenceStart(..) | Event::MappingStart(..)
        ));
        while open > 0 {
            match self.take()?.0 {
                Event::SequenceStart(..) | Event::MappingStart(..) => open += 1,
                Event::SequenceEnd | Event::MappingEnd => open -= 1,
                _ => {}
            }
        }
        Ok(())
    }
}

/// `~`, `null`, `Null`, `NULL`: YAML's null, when plain.
fn is_null(value: &str) -> bool {
    matches!(value, "~" | "null" | "Null" | "NULL")
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// What a plain scalar is as an integer.
#[derive(Debug, PartialEq, Eq)]
enum Int {
    Fits(i64),
    /// Written as an integer, beyond what an i64 holds.
    OutOfRange,
    NotAnInteger,
}

fn parse_int(value: &str) -> Option<i64> {
    match read_int(value) {
        Int::Fits(i) => Some(i),
        _ => None,
    }
}

/// An integer as serde_yaml 0.9 read one: decimal, or `0x`, `0o`, `0b`, each with an optional
/// sign. Decimal digits with a leading zero (`0755`) are a string, as in YAML 1.2.
fn read_int(value: &str) -> Int {
    let (negative, unsigned) = match value.as_bytes().first() {
        Some(b'-') => (true, &value[1..]),
        Some(b'+') => (false, &value[1..]),
        _ => (false, value),
    };
    let (radix, digits) = if let Some(d) = unsigned.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = unsigned.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = unsigned.strip_prefix("0b") {
        (2, d)
    } else {
        (10, unsigned)
    };
    // from_str_radix takes a sign of its own; only the one before the prefix counts.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Int::NotAnInteger;
    }
    if radix == 10 && digits.len() > 1 && digits.starts_with('0') {
        return Int::NotAnInteger;
    }
    let fits = u64::from_str_radix(digits, radix)
        .ok()
        .and_then(|magnitude| {
            if negative {
                0i64.checked_sub_unsigned(magnitude)
            } else {
                i64::try_from(magnitude).ok()
            }
        });
    fits.map_or(Int::OutOfRange, Int::Fits)
}

/// A float as serde_yaml 0.9 read one, for error messages.
fn parse_float(value: &str) -> Option<f64> {
    let unsigned = value.strip_prefix(['+', '-']).unwrap_or(value);
    if unsigned.starts_with(['+', '-']) {
        return None;
    }
    match unsigned {
        ".inf" | ".Inf" | ".INF" if value.starts_with('-') => return Some(f64::NEG_INFINITY),
        ".inf" | ".Inf" | ".INF" => return Some(f64::INFINITY),
        ".nan" | ".NaN" | ".NAN" if value == unsigned => return Some(f64::NAN),
        _ => {}
    }
    let digits_only = unsigned.len() > 1
        && unsigned.starts_with('0')
        && unsigned.bytes().all(|b| b.is_ascii_digit());
    match value.parse::<f64>() {
        Ok(f) if f.is_finite() && !digits_only => Some(f),
        _ => None,
    }
}

/// What a scalar is, for "invalid type: ..., expected ..." messages: a plain scalar as YAML
/// resolves it, a quoted or block one as a string.
fn unexpected(value: &str, style: TScalarStyle) -> Unexpected<'_> {
    if style != TScalarStyle::Plain {
        return Unexpected::Str(value);
    }
    if value.is_empty() || is_null(value) {
        Unexpected::Unit
    } else if let Some(b) = parse_bool(value) {
        Unexpected::Bool(b)
    } else if let Int::Fits(i) = read_int(value) {
        match u64::try_from(i) {
            Ok(u) => Unexpected::Unsigned(u),
            Err(_) => Unexpected::Signed(i),
        }
    } else if read_int(value) == Int::OutOfRange {
        Unexpected::Other("integer")
    } else if let Some(f) = parse_float(value) {
        Unexpected::Float(f)
    } else {
        Unexpected::Str(value)
    }
}

fn invalid_type(event: &Event, expected: &dyn de::Expected) -> Error {
    let what = match event {
        Event::Scalar(value, style, ..) => unexpected(value, *style),
        Event::SequenceStart(..) => Unexpected::Seq,
        Event::MappingStart(..) => Unexpected::Map,
        _ => Unexpected::Other("the end of a collection"),
    };
    de::Error::invalid_type(what, expected)
}

/// A plain scalar that is YAML's null, and not tagged as something else.
fn is_plain_null(event: &Event) -> bool {
    match event {
        Event::Scalar(value, TScalarStyle::Plain, _, tag) => {
            (value.is_empty() || is_null(value)) && tag.as_ref().is_none_or(|t| t.suffix == "null")
        }
        _ => false,
    }
}

fn is_plain_empty(event: &Event) -> bool {
    matches!(event, Event::Scalar(value, TScalarStyle::Plain, ..) if value.is_empty())
}

/// One node of the document: the next events of the reader, at `path`.
struct Node<'r, 't, 'p> {
    reader: &'r mut Reader<'t>,
    path: Path<'p>,
}

impl Node<'_, '_, '_> {
    fn visit_seq<'de, V: Visitor<'de>>(self, visitor: V, empty: bool) -> Result<V::Value, Error> {
        let mut access = SeqAccess {
            reader: &mut *self.reader,
            path: &self.path,
            index: 0,
            done: empty,
        };
        let value = visitor.visit_seq(&mut access)?;
        let (done, read) = (access.done, access.index);
        // serde's sequence visitors read every element; any left over is an error as in serde.
        if !done {
            let mut extra = 0;
            loop {
                let (event, _) = self.reader.take()?;
                if matches!(event, Event::SequenceEnd) {
                    break;
                }
                self.reader.skip_rest(&event)?;
                extra += 1;
            }
            if extra > 0 {
                return Err(de::Error::invalid_length(read + extra, &"fewer elements"));
            }
        }
        Ok(value)
    }

    fn visit_map<'de, V: Visitor<'de>>(self, visitor: V, empty: bool) -> Result<V::Value, Error> {
        let mut access = MapAccess {
            reader: &mut *self.reader,
            path: &self.path,
            key: None,
            done: empty,
        };
        let value = visitor.visit_map(&mut access)?;
        if !access.done {
            let mut extra = 0;
            loop {
                let (event, _) = self.reader.take()?;
                if matches!(event, Event::MappingEnd) {
                    break;
                }
                self.reader.skip_rest(&event)?;
                let (entry_value, _) = self.reader.take()?;
                self.reader.skip_rest(&entry_value)?;
                extra += 1;
            }
            if extra > 0 {
                return Err(de::Error::invalid_length(extra, &"fewer entries"));
            }
        }
        Ok(value)
    }
}

impl<'de> de::Deserializer<'de> for Node<'_, '_, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        let node = Node {
            reader: &mut *self.reader,
            path: self.path,
        };
        let result = match event {
            Event::Scalar(value, TScalarStyle::Plain, ..) => {
                if value.is_empty() || is_null(&value) {
                    visitor.visit_unit()
                } else if let Some(b) = parse_bool(&value) {
                    visitor.visit_bool(b)
                } else if let Some(i) = parse_int(&value) {
                    visitor.visit_i64(i)
                } else if let Some(f) = parse_float(&value) {
                    visitor.visit_f64(f)
                } else {
                    visitor.visit_string(value)
                }
            }
            Event::Scalar(value, ..) => visitor.visit_string(value),
            Event::SequenceStart(..) => node.visit_seq(visitor, false),
            Event::MappingStart(..) => node.visit_map(visitor, false),
            ref other => Err(invalid_type(other, &visitor)),
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    serde::forward_to_deserialize_any! {
        bool u8 u16 u32 u64 u128 i128 f32 f64 char bytes byte_buf unit unit_struct tuple
        tuple_struct enum
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_i64(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        let result = match &event {
            Event::Scalar(value, TScalarStyle::Plain, ..) => match read_int(value) {
                Int::Fits(i) => visitor.visit_i64(i),
                Int::OutOfRange => Err(de::Error::custom(format!(
                    "{value} is out of range for an integer"
                ))),
                Int::NotAnInteger => Err(invalid_type(&event, &visitor)),
            },
            _ => Err(invalid_type(&event, &visitor)),
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        let result = match event {
            // A copy: yaml-rust2's scalars have room for 32 bytes or more, and a 100k-rule
            // policy keeps half a million short strings until it is validated.
            Event::Scalar(value, ..) => visitor.visit_str(&value),
            other => Err(invalid_type(&other, &visitor)),
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = if is_plain_null(self.reader.peek()?) {
            self.reader.take()?;
            visitor.visit_none()
        } else {
            visitor.visit_some(Node {
                reader: &mut *self.reader,
                path: self.path,
            })
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        let node = Node {
            reader: &mut *self.reader,
            path: self.path,
        };
        let result = match event {
            Event::SequenceStart(..) => node.visit_seq(visitor, false),
            // An empty plain value (`cidrs: !!seq`) reads as an empty list, as in serde_yaml.
            ref e if is_plain_empty(e) => node.visit_seq(visitor, true),
            ref other => Err(invalid_type(other, &visitor)),
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        let node = Node {
            reader: &mut *self.reader,
            path: self.path,
        };
        let result = match event {
            Event::MappingStart(..) => node.visit_map(visitor, false),
            // An empty document, or `metadata:` read as a struct.
            ref e if is_plain_empty(e) => node.visit_map(visitor, true),
            ref other => Err(invalid_type(other, &visitor)),
        };
        result.map_err(|e| e.at(self.reader.line, &self.path))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let (event, _) = self.reader.take()?;
        self.reader.skip_rest(&event)?;
        visitor.visit_unit()
    }
}

struct SeqAccess<'a, 't, 'p> {
    reader: &'a mut Reader<'t>,
    path: &'a Path<'p>,
    index: usize,
    /// The end of the list has been taken (or there was no list).
    done: bool,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_, '_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.done {
            return Ok(None);
        }
        if matches!(self.reader.peek()?, Event::SequenceEnd) {
            self.reader.take()?;
            self.done = true;
            return Ok(None);
        }
        let index = self.index;
        self.index += 1;
        seed.deserialize(Node {
            reader: &mut *self.reader,
            path: Path::Seq {
                parent: self.path,
                index,
            },
        })
        .map(Some)
    }
}

struct MapAccess<'a, 't, 'p> {
    reader: &'a mut Reader<'t>,
    path: &'a Path<'p>,
    /// The key whose value is next, when it is a scalar.
    key: Option<String>,
    /// The end of the mapping has been taken (or there was no mapping).
    done: bool,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_, '_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.reader.peek()? {
            Event::MappingEnd => {
                self.reader.take()?;
                self.done = true;
                Ok(None)
            }
            Event::Scalar(..) => {
                let Event::Scalar(key, ..) = self.reader.take()?.0 else {
                    unreachable!("peeked a scalar");
                };
                // Errors about the key (an unknown field) are the mapping's, at the key's line.
                let value = seed
                    .deserialize(StrDeserializer::<Error>::new(&key))
                    .map_err(|e| e.at(self.reader.line, self.path))?;
                self.key = Some(key);
                Ok(Some(value))
            }
            _ => {
                self.key = None;
                seed.deserialize(Node {
                    reader: &mut *self.reader,
                    path: *self.path,
                })
                .map(Some)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let path = match &self.key {
            Some(key) => Path::Map {
                parent: self.path,
                key,
            },
            None => Path::Unknown { parent: self.path },
        };
        seed.deserialize(Node {
            reader: &mut *self.reader,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[test]
    fn integers_are_read_as_serde_yaml_read_them() {
        for (text, value) in [
            ("8080", Some(8080)),
            ("+8080", Some(8080)),
            ("-1", Some(-1)),
            ("0", Some(0)),
            ("-0", Some(0)),
            ("0x1F90", Some(8080)),
            ("-0x10", Some(-16)),
            ("0o17", Some(15)),
            ("0b101", Some(5)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("0755", None),
            ("0x", None),
            ("0x-5", None),
            ("+-5", None),
            ("--5", None),
            ("1_000", None),
            ("0xg", None),
            ("0b102", None),
            ("8080.0", None),
            ("eighty", None),
            ("", None),
        ] {
            assert_eq!(parse_int(text), value, "{text:?}");
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        name: Option<String>,
        port: Option<i64>,
        list: Option<Vec<Item>>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        a: Option<String>,
    }

    fn doc(text: &str) -> Result<Doc, YamlError> {
        from_str(text)
    }

    fn item(a: &str) -> Item {
        Item {
            a: Some(a.to_owned()),
        }
    }

    #[test]
    fn integers_beyond_64_bits_are_out_of_range_not_floats() {
        assert_eq!(read_int("99999999999999999999"), Int::OutOfRange);
        assert_eq!(read_int("-0x8000000000000001"), Int::OutOfRange);
        assert_eq!(read_int("1e20"), Int::NotAnInteger);
        let e = doc("port: 99999999999999999999\n").unwrap_err();
        assert_eq!(
            e.message,
            "99999999999999999999 is out of range for an integer"
        );
        let e = from_str::<Vec<String>>("99999999999999999999\n").unwrap_err();
        assert_eq!(e.message, "invalid type: integer, expected a sequence");
    }

    #[test]
    fn aliases_read_as_copies_of_their_anchor() {
        let d = doc("name: &n x\nlist: &l [{a: *n}, &i {a: y}, *i]\nport: 1\n").unwrap();
        assert_eq!(d.name.as_deref(), Some("x"));
        assert_eq!(d.list, Some(vec![item("x"), item("y"), item("y")]));
        let d: Vec<Vec<Item>> = from_str("- &l [{a: b}]\n- *l\n- *l\n").unwrap();
        assert_eq!(d, [[item("b")], [item("b")], [item("b")]]);
    }

    #[test]
    fn an_alias_inside_its_own_anchor_is_refused() {
        let e = doc("list: &l [*l]\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert_eq!(e.path, None);
        assert!(e.message.contains("cannot contain itself"), "{e}");
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // Each level doubles: 2^25 copies of the innermost scalar.
        let mut text = String::from("a0: &a0 [x, x]\n");
        for i in 1..25 {
            text.push_str(&format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1));
        }
        let e = from_str::<HashMap<String, de::IgnoredAny>>(&text).unwrap_err();
        assert!(e.message.starts_with("aliases copy more than"), "{e}");
    }

    #[test]
    fn nesting_through_aliases_is_bounded() {
        let deep = format!("{}x{}", "[".repeat(20), "]".repeat(20));
        let text = format!("a: &a {deep}\nb: {}*a{}\n", "[".repeat(20), "]".repeat(20));
        let e = from_str::<HashMap<String, de::IgnoredAny>>(&text).unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.message, "the policy nests deeper than 32 levels");
    }

    #[test]
    fn deep_block_nesting_is_refused_at_its_line() {
        let text: String = (0..40).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
        let e = from_str::<HashMap<String, de::IgnoredAny>>(&text).unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (33, None));
        assert_eq!(e.message, "the policy nests deeper than 32 levels");
    }

    #[test]
    fn errors_name_the_path_and_line() {
        let e = doc("name: a\nlist:\n  - a: b\n  - a: [c]\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (4, Some("list[1].a")));
        assert_eq!(e.message, "invalid type: sequence, expected a string");
        let e = doc("port: '80'\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (1, Some("port")));
        assert_eq!(e.message, "invalid type: string \"80\", expected i64");
    }

    #[test]
    fn unknown_and_repeated_keys_are_errors_of_the_mapping_at_the_key() {
        let e = doc("name: a\nlist:\n  - a: b\n    b: c\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (4, Some("list[0]")));
        assert!(e.message.starts_with("unknown field `b`"), "{e}");
        let e = doc("name: a\nport: 1\nname: b\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (3, Some("")));
        assert_eq!(e.message, "duplicate field `name`");
    }

    #[test]
    fn nulls_leave_optional_fields_out_and_quoted_nulls_do_not() {
        let d = doc("name: ~\nport: null\nlist:\n").unwrap();
        assert_eq!(
            d,
            Doc {
                name: None,
                port: None,
                list: None
            }
        );
        let d = doc("name: 'null'\n").unwrap();
        assert_eq!(d.name.as_deref(), Some("null"));
        let d = doc("name: 123\n").unwrap();
        assert_eq!(d.name.as_deref(), Some("123"));
    }

    #[test]
    fn empty_stream_is_an_empty_document() {
        for text in ["", "# just a comment\n", "---\n"] {
            assert_eq!(
                doc(text).unwrap(),
                Doc {
                    name: None,
                    port: None,
                    list: None
                }
            );
        }
    }

    #[test]
    fn a_second_document_is_refused() {
        let e = doc("name: a\n---\nname: b\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (2, None));
        assert!(e.message.contains("second YAML document"), "{e}");
    }

    #[test]
    fn syntax_errors_put_the_problem_first() {
        let e = doc("name: a\n list: b\n").unwrap_err();
        assert_eq!(e.path, None);
        assert!(
            e.message.starts_with("mapping values are not allowed"),
            "{e}"
        );
        let e = doc("list: [{a: b c: d}]\n").unwrap_err();
        assert_eq!((e.line, e.path.as_deref()), (1, None));
        assert_eq!(
            e.message,
            "did not find expected ',' or '}', while parsing a flow mapping"
        );
    }
}
