//! Policy: reads the declarative YAML policy (`tollgate.dev/v1alpha1`, kind `Policy`), rejects
//! anything it cannot enforce exactly as written (every error names the file, the line and the
//! field), and compiles what it accepts into the entries of the identity and rule LPM tries for
//! one policy slot. Parsing and validation ([`parse_policy`]) are pure and need no privileges,
//! so `tollgate policy validate` and the agent run the same checks; compiling
//! ([`compile_policy`]) is pure too, given a clock reading and the node's addresses, and is the
//! only place that decides which rule wins where rules overlap. docs/policy.md is the user
//! reference for the format and for these semantics.
//!
//! Field paths in errors are relative to `spec` for everything under it (`rules[2].to`,
//! `identities[1].cidrs[0]`, `rateLimits[0].identity`) and document paths otherwise (`apiVersion`, `kind`,
//! `metadata.name`, `spec`).

mod compile;
mod locate;
mod model;
mod nesting;
pub mod selector;
mod validate;
mod yaml;

#[cfg(test)]
mod compile_tests;
#[cfg(test)]
mod parse_tests;

use std::{borrow::Cow, io::Read as _, path::Path, time::SystemTime};

pub use compile::{
    auth_pair_key, compile_policy, ClockReading, CompiledLimit, CompiledPolicy, LimitOwner,
    PolicyNames,
};
use tollgate_common::{proto, ratelimit};

/// The only `apiVersion` this version reads.
pub const API_VERSION: &str = "tollgate.dev/v1alpha1";
/// The only `kind` this version reads.
pub const KIND: &str = "Policy";

/// The largest policy accepted, in bytes, from a file or on the control socket: a 100k-rule
/// policy is about 10 MB, and the cap keeps a wrong file (`/dev/zero`, a disk image) from being
/// read into memory whole.
pub const MAX_POLICY_BYTES: usize = 32 * 1024 * 1024;

/// `the policy is larger than 32 MiB`: the one wording for a policy over [`MAX_POLICY_BYTES`],
/// whether it came from a file or over the control socket.
pub fn too_large_message() -> String {
    format!(
        "the policy is larger than {} MiB",
        MAX_POLICY_BYTES / (1024 * 1024)
    )
}

/// What a deny does: `Enforce` drops the packet, `Audit` logs and counts a would-deny and lets
/// it pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    /// Exactly `enforce` or `audit`, as written in the policy.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    IcmpV6,
    /// Every IP protocol, including ones the datapath has no other name for.
    Any,
}

impl Protocol {
    /// The IP protocol number; `Any` is 0, the protocol byte of the pair-wide rule entry.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Icmp => proto::ICMP,
            Protocol::IcmpV6 => proto::ICMPV6,
            Protocol::Any => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Icmp => "ICMP",
            Protocol::IcmpV6 => "ICMPv6",
            Protocol::Any => "ANY",
        }
    }

    /// A protocol name in any letter case (`tcp`, `TCP`, `icmpv6`, `ICMPv6`, `any`).
    pub fn parse(text: &str) -> Option<Self> {
        [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Icmp,
            Protocol::IcmpV6,
            Protocol::Any,
        ]
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(text))
    }
}

/// One entry of a rule's `ports`. After validation: `port`/`end_port` only for TCP and UDP,
/// `end_port` only with `port` and not below it; no `port` means every port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Option<u16>,
    pub end_port: Option<u16>,
}

impl PortSpec {
    /// The inclusive destination-port range the entry allows (ICMP, ICMPv6 and ANY: all).
    pub fn port_range(&self) -> (u16, u16) {
        match (self.port, self.end_port) {
            (Some(p), Some(e)) => (p, e),
            (Some(p), None) => (p, p),
            _ => (0, u16::MAX),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub spiffe_id: Option<String>,
    /// File mode: the auth listener (`--auth-addr`) of the node that hosts this identity,
    /// where other agents run the handshake for pairs it takes part in.
    pub auth_address: Option<std::net::SocketAddr>,
    /// Networks with host bits clear; a bare address was read as a /32 or /128.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Interfaces bound to this identity: packets arriving on them must come from one of its
    /// addresses (source validation). No interface is bound to two identities.
    pub interfaces: Vec<String>,
    /// Kubernetes mode: the pods whose addresses belong to this identity as well.
    pub selector: Option<selector::Selector>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// An identity name, `world` or `host`.
    pub from: String,
    pub to: String,
    pub ports: Vec<PortSpec>,
    /// `None` when the rule does not say; the policy's mode applies.
    pub mode: Option<Mode>,
    /// `log`: report each new flow this rule admits as an event (audit log, `flows`). `None`:
    /// the policy's `spec.log`.
    pub log: Option<bool>,
    pub expires: Option<SystemTime>,
    /// Meters both directions of the flows this rule admits.
    pub rate_limit: Option<RateLimit>,
    /// The flows this rule admits need a proof that both identities hold their certificates.
    pub authentication: Option<Authentication>,
}

/// How a rule's identity pair must prove itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Authentication {
    /// The agents of the two identities' nodes run a mutual TLS 1.3 handshake presenting the
    /// identities' X.509 SVIDs.
    Mtls,
}

impl Authentication {
    /// Exactly `mtls`, as written in the policy.
    pub fn parse(text: &str) -> Option<Self> {
        (text == "mtls").then_some(Authentication::Mtls)
    }

    pub fn name(self) -> &'static str {
        match self {
            Authentication::Mtls => "mtls",
        }
    }
}

/// The period a rate is written per: `packetsPerSecond` or `packetsPerMinute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Per {
    Second,
    Minute,
}

impl Per {
    /// The period in nanoseconds.
    pub fn ns(self) -> u64 {
        match self {
            Per::Second => 1_000_000_000,
            Per::Minute => 60 * 1_000_000_000,
        }
    }

    /// `s` or `min`, as in `5 connections/min`.
    pub fn unit(self) -> &'static str {
        match self {
            Per::Second => "s",
            Per::Minute => "min",
        }
    }

    /// `second` or `minute`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Per::Second => "second",
            Per::Minute => "minute",
        }
    }
}

/// `count` units (packets, bytes or connections) per `per`. After validation: within the
/// bounds of its kind (docs/policy.md), so [`tollgate_common::ratelimit::LimitRate::new`]
/// accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per: Per,
}

/// A rule's `rateLimit` or the rates of an identity's quota, as written. At least one kind is
/// set; `burst` only with packets or connections, `burst_bytes` only with bytes; every burst
/// is at most one hour of its rate. [`RateLimit::kinds`] applies the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub packets: Option<Rate>,
    pub bytes: Option<Rate>,
    pub connections: Option<Rate>,
    /// The burst of packets and of connections, a count; default: each kind's own rate count.
    pub burst: Option<u64>,
    /// The burst of bytes; default: the byte rate's count.
    pub burst_bytes: Option<u64>,
}

/// One kind with defaults applied: `count` units per `period_ns`, `burst` at once from a full
/// bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KindLimit {
    pub count: u64,
    pub period_ns: u64,
    pub burst: u64,
}

impl KindLimit {
    /// The kernel's rate for this limit as kind `kind` (`ratelimit::kind::*`), on a clock of
    /// `tick_ns` resolution. Validation built every limit of a policy with a tick of 1 ns, and a
    /// coarser tick only raises the tolerance, so this succeeds for any validated policy.
    pub fn limit_rate(
        &self,
        kind: usize,
        tick_ns: u64,
    ) -> Result<ratelimit::LimitRate, ratelimit::RateError> {
        ratelimit::LimitRate::new(
            self.count,
            self.period_ns,
            self.burst,
            tick_ns,
            ratelimit::MAX_UNITS[kind],
        )
    }
}

impl RateLimit {
    /// The limited kinds, indexed by `tollgate_common::ratelimit::kind::*`, bursts defaulted to
    /// the count written (one period's worth).
    pub fn kinds(&self) -> [Option<KindLimit>; ratelimit::LIMIT_KINDS] {
        let with = |rate: Option<Rate>, burst: Option<u64>| {
            rate.map(|r| KindLimit {
                count: r.count,
                period_ns: r.per.ns(),
                burst: burst.unwrap_or(r.count),
            })
        };
        let mut kinds = [None; ratelimit::LIMIT_KINDS];
        kinds[ratelimit::kind::PACKETS] = with(self.packets, self.burst);
        kinds[ratelimit::kind::BYTES] = with(self.bytes, self.burst_bytes);
        kinds[ratelimit::kind::CONNECTIONS] = with(self.connections, self.burst);
        kinds
    }

    /// One line for `status` and `check`, kinds in index order with their effective bursts:
    /// `1000 packets/s (burst 10), 5 connections/min (burst 5)`.
    pub fn describe(&self) -> String {
        let rates = [self.packets, self.bytes, self.connections];
        self.kinds()
            .iter()
            .zip(rates)
            .enumerate()
            .filter_map(|(kind, (limit, rate))| {
                let (limit, rate) = (limit.as_ref()?, rate?);
                Some(format!(
                    "{} {}/{} (burst {})",
                    rate.count,
                    ratelimit::kind::NAMES[kind],
                    rate.per.unit(),
                    limit.burst
                ))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An entry of `spec.rateLimits`: a quota over all the traffic `identity` sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityQuota {
    /// A declared identity or `host` (never `world`); no two quotas name one identity.
    pub identity: String,
    /// `None` when the entry does not say; the policy's mode applies.
    pub mode: Option<Mode>,
    pub limit: RateLimit,
}

/// A validated policy. Built by [`parse_policy`]; [`compile_policy`] relies on its invariants
/// (known identity names, no CIDR in two identities, well-formed ports).
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    /// `spec.log`: every rule's new flows are reported as events (a rule's own `log` wins).
    pub log: bool,
    pub identities: Vec<Identity>,
    pub rules: Vec<Rule>,
    /// Per-identity quotas (`spec.rateLimits`), in file order.
    pub rate_limits: Vec<IdentityQuota>,
    /// The YAML it was parsed from, so `tollgate policy get` returns what the user wrote.
    pub source_text: String,
}

/// Why a policy was rejected. Displays as one line,
/// `policy.yaml:14: rules[2].to: unknown identity "ordrs" (known: frontend, orders, host, world)`,
/// followed by ` (and N more)` when there are further errors; those are in `more`, in file
/// order.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.one_line())]
pub struct PolicyError {
    /// The file as given, e.g. `policy.yaml`.
    pub source_name: String,
    /// 1-based line of the offending node, when known.
    pub line: Option<usize>,
    /// Field path: relative to `spec` under it (`rules[2].to`), else from the top (`kind`).
    pub field: Option<String>,
    pub message: String,
    /// Further errors in the same policy (their own `more` is empty).
    pub more: Vec<PolicyError>,
}

impl PolicyError {
    /// This error alone, without the "(and N more)" suffix.
    pub fn without_more(&self) -> String {
        let mut s = self.source_name.clone();
        if let Some(line) = self.line {
            s.push_str(&format!(":{line}"));
        }
        s.push_str(": ");
        if let Some(field) = &self.field {
            s.push_str(field);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }

    /// Every error, the first one included, in file order.
    pub fn all(&self) -> impl Iterator<Item = &PolicyError> {
        std::iter::once(self).chain(&self.more)
    }

    fn one_line(&self) -> String {
        let mut s = self.without_more();
        if !self.more.is_empty() {
            s.push_str(&format!(" (and {} more)", self.more.len()));
        }
        s
    }

    fn whole_file(source_name: &str, message: String) -> Self {
        Self {
            source_name: source_name.to_owned(),
            line: None,
            field: None,
            message,
            more: Vec::new(),
        }
    }
}

/// Parses and validates. `source_name` is what errors print as the file (e.g. "policy.yaml").
/// One leading byte-order mark is dropped (and is not part of `source_text`); text over
/// [`MAX_POLICY_BYTES`] or nesting deeper than 32 levels is refused before YAML parsing.
pub fn parse_policy(text: &str, source_name: &str) -> Result<Policy, PolicyError> {
    parse(Cow::Borrowed(text), source_name)
}

/// [`parse_policy`] of text the caller hands over: it becomes `source_text` as it is, where
/// `parse_policy` copies it (10 MB for a 100k-rule policy).
pub fn parse_policy_owned(text: String, source_name: &str) -> Result<Policy, PolicyError> {
    parse(Cow::Owned(text), source_name)
}

fn parse(mut text: Cow<'_, str>, source_name: &str) -> Result<Policy, PolicyError> {
    // Editors on Windows start UTF-8 files with a byte-order mark. YAML allows it at the
    // start, but it is not part of what the user wrote (`policy get` returns the text).
    if text.starts_with('\u{feff}') {
        match &mut text {
            Cow::Borrowed(t) => *t = &t['\u{feff}'.len_utf8()..],
            Cow::Owned(t) => t.replace_range(..'\u{feff}'.len_utf8(), ""),
        }
    }
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::whole_file(source_name, too_large_message()));
    }
    nesting::check(&text).map_err(|e| {
        let (line, message) = match e {
            nesting::NestingError::TooDeep { line } => (
                line,
                format!("the policy nests deeper than {} levels", nesting::MAX_DEPTH),
            ),
            nesting::NestingError::Unreadable { line, message } => (line, message),
        };
        PolicyError {
            line: Some(line),
            ..PolicyError::whole_file(source_name, message)
        }
    })?;
    let doc: model::Document =
        yaml::from_str(&text).map_err(|e| from_yaml_error(e, source_name))?;
    let mut policy = validate::validate(doc).map_err(|issues| {
        let lines = locate::LineIndex::build(&text, issues.iter().map(|i| i.path.as_str()));
        let mut errors: Vec<PolicyError> = issues
            .into_iter()
            .map(|issue| PolicyError {
                source_name: source_name.to_owned(),
                line: lines.line_of(&issue.path),
                field: display_field(&issue.path),
                message: issue.message,
                more: Vec::new(),
            })
            .collect();
        // Stable: errors on one line keep the order validation found them in.
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        let mut first = errors.remove(0);
        first.more = errors;
        first
    })?;
    policy.source_text = text.into_owned();
    Ok(policy)
}

/// Reads the file (error if unreadable or over [`MAX_POLICY_BYTES`], naming the path) and calls
/// parse_policy with its path as source name.
pub fn load_policy_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = read_text(path, false)?;
    parse_policy_owned(text, &path.display().to_string())
}

/// The text of the agent's `--policy` file: a regular file only (a FIFO or a device put where
/// the policy was expected must not hang the agent's start or its follower of the file), at
/// most [`MAX_POLICY_BYTES`], UTF-8.
pub fn read_policy_text(path: &Path) -> Result<String, PolicyError> {
    read_text(path, true)
}

/// At most [`MAX_POLICY_BYTES`] of UTF-8 text; `regular_only` refuses anything but a regular
/// file without blocking on it. (The CLI reads pipes too: `policy apply -f /dev/stdin`.)
fn read_text(path: &Path, regular_only: bool) -> Result<String, PolicyError> {
    let source_name = path.display().to_string();
    let cannot_read = |e: std::io::Error| {
        PolicyError::whole_file(&source_name, format!("cannot read the policy: {e}"))
    };
    // One byte over the limit tells "too large" from "exactly the limit" without trusting the
    // size the file reports: /dev/zero, a pipe and a file still being written have none. The
    // size is only a hint for the buffer, which would otherwise double its way up, to 16 MB
    // for a 9 MB policy.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if regular_only { libc::O_NONBLOCK } else { 0 })
            .open(path)
            .map_err(cannot_read)?
    };
    if regular_only && !file.metadata().map_err(cannot_read)?.is_file() {
        return Err(PolicyError::whole_file(
            &source_name,
            "cannot read the policy: not a regular file".to_owned(),
        ));
    }
    let hint = file
        .metadata()
        .map_or(0, |m| m.len())
        .min(MAX_POLICY_BYTES as u64);
    let mut bytes = Vec::with_capacity(hint as usize + 1);
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::whole_file(&source_name, too_large_message()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        PolicyError {
            line: Some(valid.iter().filter(|&&b| b == b'\n').count() + 1),
            ..PolicyError::whole_file(&source_name, "not UTF-8 text".to_owned())
        }
    })?;
    Ok(text)
}

/// `spec.rules[2].to` → `rules[2].to`; `metadata.name` stays; the document itself has no field.
fn display_field(path: &str) -> Option<String> {
    match path.strip_prefix("spec.") {
        _ if path.is_empty() => None,
        Some(rest) => Some(rest.to_owned()),
        None => Some(path.to_owned()),
    }
}

/// A YAML error names the node's document path; serde's "unknown field `x`" and "duplicate
/// field `x`" come from the mapping, so the field itself is added to its path.
fn from_yaml_error(error: yaml::YamlError, source_name: &str) -> PolicyError {
    let field_named = ["unknown field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| error.message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    let path = match (error.path, field_named) {
        (Some(path), Some(name)) if path.is_empty() => Some(name.to_owned()),
        (Some(path), Some(name)) => Some(format!("{path}.{name}")),
        (path, _) => path,
    };
    PolicyError {
        source_name: source_name.to_owned(),
        line: Some(error.line),
        field: path.as_deref().and_then(display_field),
        message: plain_type_names(&error.message),
        more: Vec::new(),
    }
}

/// serde names Rust types (`expected i64`, `expected struct Spec`); say what to write instead.
fn plain_type_names(message: &str) -> String {
    let mut message = message.replace("expected i64", "expected an integer");
    if let Some(i) = message.find("expected struct ") {
        let rest = &message[i + "expected struct ".len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        message.replace_range(i..i + "expected struct ".len() + end, "expected a mapping");
    }
    message
}
