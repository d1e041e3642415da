//! Turns the policy as written ([`model::Document`]) into a [`Policy`] that compiles without
//! surprises, or into the list of everything wrong with it. Each problem is an [`Issue`] naming
//! the document path of the offending field (`spec.rules[2].to`); the caller adds the file name
//! and the line. Problems are collected rather than stopping at the first, so that
//! `tollgate policy validate` can show them all.

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use tollgate_common::ratelimit::{kind, RateError, LIMIT_KINDS, MAX_BURST_WINDOW_NS};

use super::{
    model,
    selector::{LabelSelector, NamespaceMatch, Op, Requirement, Selector},
    Authentication, Identity, IdentityQuota, Mode, Per, Policy, PortSpec, Protocol, Rate,
    RateLimit, Rule, API_VERSION, KIND,
};

/// One problem, at a document path (`spec.identities[1].cidrs[0]`).
#[derive(Debug)]
pub(super) struct Issue {
    pub path: String,
    pub message: String,
}

const RESERVED_IDENTITIES: [&str; 2] = ["host", "world"];

/// How many identity names an "unknown identity" message lists before abbreviating; a policy
/// can declare thousands.
const KNOWN_NAMES_SHOWN: usize = 20;

/// The rate fields of each kind (`kind::*`): per second, per minute.
const RATE_FIELDS: [[&str; 2]; LIMIT_KINDS] = [
    ["packetsPerSecond", "packetsPerMinute"],
    ["bytesPerSecond", "bytesPerMinute"],
    ["connectionsPerSecond", "connectionsPerMinute"],
];

/// The fastest rate accepted per kind, per second (per minute: 60 times as many). Beyond what a
/// node carries, so a larger number is a typo; they also keep the kernel's arithmetic far from
/// overflow (see `tollgate_common::ratelimit`).
const MAX_PER_SECOND: [u64; LIMIT_KINDS] = [1_000_000_000, 1_000_000_000_000, 10_000_000];

/// The slowest byte rate accepted, per second (per minute: 60 times as many): below 1 KiB/s
/// no TCP connection works. Packets and connections go down to 1 per minute.
const MIN_BYTES_PER_SECOND: u64 = 1024;

const NO_RATE: &str = "set at least one of packetsPerSecond, packetsPerMinute, bytesPerSecond, \
                       bytesPerMinute, connectionsPerSecond, connectionsPerMinute";

/// Whose rates are validated, for messages.
#[derive(Clone, Copy)]
enum LimitOf {
    Rule,
    Quota,
}

impl LimitOf {
    fn instead_of_zero(self) -> &'static str {
        match self {
            LimitOf::Rule => "to allow none of this traffic, remove the rule",
            LimitOf::Quota => {
                "to let the identity send none of this traffic, remove the rules that allow it"
            }
        }
    }
}

/// `1 packet`, `5 packets`.
fn units(count: u64, k: usize) -> String {
    let name = kind::NAMES[k];
    match count {
        1 => format!("1 {}", &name[..name.len() - 1]),
        n => format!("{n} {name}"),
    }
}

/// How long `burst` units last at `rate`, for "burst ... is 200 minutes of traffic".
fn burst_duration(burst: u64, rate: Rate) -> String {
    let seconds_num = u128::from(burst) * u128::from(rate.per.ns() / 1_000_000_000);
    let count = u128::from(rate.count);
    if seconds_num % (count * 60) == 0 {
        format!("{} minutes", seconds_num / (count * 60))
    } else if seconds_num % count == 0 {
        format!("{} seconds", seconds_num / count)
    } else {
        format!("{:.1} seconds", seconds_num as f64 / count as f64)
    }
}

/// The largest burst the kernel's arithmetic accepts for `count` per `period_ns` (a burst of
/// one is always accepted for a rate in bounds, and the window grows with the burst).
fn longest_burst(k: usize, count: u64, period_ns: u64) -> u64 {
    let accepted = |burst: u64| {
        super::KindLimit {
            count,
            period_ns,
            burst,
        }
        .limit_rate(k, 1)
        .is_ok()
    };
    // One hour's worth is the answer unless the interval's rounding costs a unit or two.
    let estimate = u128::from(count) * u128::from(MAX_BURST_WINDOW_NS) / u128::from(period_ns);
    let (mut good, mut bad) = (
        1u64,
        u64::try_from(estimate)
            .unwrap_or(u64::MAX / 2)
            .saturating_add(2),
    );
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if accepted(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

/// The policy has no `source_text` yet: the caller owns the text and moves it in.
pub(super) fn validate(doc: model::Document) -> Result<Policy, Vec<Issue>> {
    let mut v = Validator::default();
    let policy = v.document(doc);
    if v.issues.is_empty() {
        Ok(policy)
    } else {
        Err(v.issues)
    }
}

/// A document path (`spec.rules[2].ports[0].port`), made text only when an issue is reported
/// there: formatting the path of every field of a valid 100k-rule policy took a third of its
/// parse.
#[derive(Clone, Copy)]
enum At<'a> {
    /// A path written out: `spec.mode`.
    Path(&'a str),
    /// `parent[index]`
    Item(&'a At<'a>, usize),
    /// `parent.field`
    Field(&'a At<'a>, &'static str),
}

impl At<'_> {
    fn item(&self, index: usize) -> At<'_> {
        At::Item(self, index)
    }

    fn field(&self, name: &'static str) -> At<'_> {
        At::Field(self, name)
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Path(path) => f.write_str(path),
            At::Item(parent, index) => write!(f, "{parent}[{index}]"),
            At::Field(parent, name) => write!(f, "{parent}.{name}"),
        }
    }
}

#[derive(Default)]
struct Validator {
    issues: Vec<Issue>,
}

impl Validator {
    fn issue(&mut self, path: impl fmt::Display, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn document(&mut self, doc: model::Document) -> Policy {
        let mut policy = Policy {
            name: String::new(),
            mode: Mode::Enforce,
            log: false,
            identities: Vec::new(),
            rules: Vec::new(),
            rate_limits: Vec::new(),
            source_text: String::new(),
        };
        if doc.api_version.is_none()
            && doc.kind.is_none()
            && doc.metadata.is_none()
            && doc.spec.is_none()
        {
            self.issue(
                "",
                format!(
                    "the policy is empty; expected a document with apiVersion: {API_VERSION}, \
                     kind: {KIND}, metadata and spec"
                ),
            );
            return policy;
        }
        self.constant("apiVersion", doc.api_version.as_deref(), API_VERSION);
        self.constant("kind", doc.kind.as_deref(), KIND);
        match doc.metadata {
            Some(metadata) => {
                policy.name = self.dns_label(At::Path("metadata.name"), metadata.name)
            }
            None => self.issue("metadata", "required (metadata.name names the policy)"),
        }
        let Some(spec) = doc.spec else {
            self.issue("spec", "required");
            return policy;
        };
        if let Some(mode) = self.mode(At::Path("spec.mode"), spec.mode.as_deref()) {
            policy.mode = mode;
        }
        policy.log = spec.log.unwrap_or(false);
        policy.identities = self.identities(spec.identities.unwrap_or_default());
        policy.rules = self.rules(
            spec.rules.unwrap_or_default().into_vec(),
            &policy.identities,
        );
        policy.rate_limits = self.quotas(spec.rate_limits.unwrap_or_default(), &policy.identities);
        let limits = policy
            .rules
            .iter()
            .filter(|r| r.rate_limit.is_some())
            .count()
            + policy.rate_limits.len();
        let room = tollgate_common::maps::LIMITS.max_entries as usize - 1;
        if limits > room {
            self.issue(
                "spec",
                format!(
                    "{limits} rate limits (rules' rateLimit and rateLimits quotas together); the \
                     datapath holds at most {room}"
                ),
            );
        }
        policy
    }

    fn constant(&mut self, path: &str, value: Option<&str>, expected: &str) {
        match value {
            Some(v) if v == expected => {}
            Some(v) => self.issue(
                path,
                format!("unsupported value {v:?}; expected {expected:?}"),
            ),
            None => self.issue(path, format!("required; set it to {expected:?}")),
        }
    }

    fn required<T>(&mut self, path: At<'_>, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.issue(path, "required");
        }
        value
    }

    fn dns_label(&mut self, path: At<'_>, value: Option<String>) -> String {
        let Some(name) = self.required(path, value) else {
            return String::new();
        };
        if !is_dns_label(&name) {
            self.issue(
                path,
                format!(
                    "{name:?} is not a valid name: use 1 to 63 lowercase letters, digits and '-', \
                     starting and ending with a letter or digit"
                ),
            );
        }
        name
    }

    fn mode(&mut self, path: At<'_>, value: Option<&str>) -> Option<Mode> {
        let value = value?;
        let mode = Mode::parse(value);
        if mode.is_none() {
            self.issue(
                path,
                format!("unknown mode {value:?}; expected enforce or audit"),
            );
        }
        mode
    }

    fn identities(&mut self, entries: Vec<model::IdentityEntry>) -> Vec<Identity> {
        let mut first_declared: HashMap<String, usize> = HashMap::new();
        let mut spiffe_first_declared: HashMap<String, usize> = HashMap::new();
        let mut interface_bound_by: HashMap<String, usize> = HashMap::new();
        let mut identities = Vec::with_capacity(entries.len());
        // Where each parsed CIDR was written (a CIDR that does not parse is left out of
        // `Identity::cidrs`), so overlap errors point at the right list item.
        let mut written_at: Vec<Vec<usize>> = Vec::with_capacity(entries.len());
        let list = At::Path("spec.identities");
        for (i, entry) in entries.into_iter().enumerate() {
            let at = list.item(i);
            let name_path = at.field("name");
            let name = self.dns_label(name_path, entry.name);
            if RESERVED_IDENTITIES.contains(&name.as_str()) || name == "ambiguous" {
                self.issue(
                    name_path,
                    format!("{name:?} is a reserved identity and cannot be declared"),
                );
            } else if !name.is_empty() {
                if let Some(&first) = first_declared.get(&name) {
                    self.issue(
                        name_path,
                        format!(
                            "duplicate identity name {name:?} (first declared at identities[{first}])"
                        ),
                    );
                } else {
                    first_declared.insert(name.clone(), i);
                }
            }

            if let Some(id) = &entry.spiffe_id {
                let path = at.field("spiffeId");
                if let Err(why) = check_spiffe_id(id) {
                    self.issue(path, format!("{id:?} is not a SPIFFE ID: {why}"));
                } else if let Some(&first) = spiffe_first_declared.get(id) {
                    // Authentication maps a verified SVID to exactly one identity.
                    self.issue(
                        path,
                        format!("{id:?} is already the SPIFFE ID of identities[{first}]"),
                    );
                } else {
                    spiffe_first_declared.insert(id.clone(), i);
                }
            }

            let auth_address = entry.auth_address.and_then(|text| {
                let path = at.field("authAddress");
                match text.parse::<std::net::SocketAddr>() {
                    Ok(addr) if addr.port() != 0 && !addr.ip().is_unspecified() => {
                        if entry.spiffe_id.is_none() {
                            self.issue(
                                path,
                                "needs spiffeId: the handshake there proves that SPIFFE ID",
                            );
                        }
                        Some(addr)
                    }
                    _ => {
                        self.issue(
                            path,
                            format!(
                                "{text:?} is not an address and port to connect to; write e.g. \
                                 \"10.0.0.2:7443\" or \"[fd00::2]:7443\""
                            ),
                        );
                        None
                    }
                }
            });
            let selector_path = at.field("selector");
            let selector_written = entry.selector.is_some();
            let selector = entry
                .selector
                .and_then(|written| self.selector(selector_path, written));
            let cidrs_path = at.field("cidrs");
            let mut cidrs = Vec::new();
            let mut positions = Vec::new();
            match entry.cidrs {
                // A selector that is itself wrong has its own error.
                None if selector_written => {}
                None => self.issue(
                    cidrs_path,
                    "required unless the identity has a selector (the addresses of this identity)",
                ),
                Some(list) if list.is_empty() => self.issue(
                    cidrs_path,
                    "must list at least one CIDR or address (an identity without addresses \
                     matches no traffic); leave it out if the selector gives the addresses",
                ),
                Some(list) => {
                    for (j, text) in list.iter().enumerate() {
                        match parse_cidr(text) {
                            Ok(net) => {
                                cidrs.push(net);
                                positions.push(j);
                            }
                            Err(why) => self.issue(cidrs_path.item(j), why),
                        }
                    }
                }
            }
            let mut interfaces = Vec::new();
            let interfaces_path = at.field("interfaces");
            for (j, ifname) in entry.interfaces.unwrap_or_default().into_iter().enumerate() {
                let path = interfaces_path.item(j);
                if let Err(why) = check_interface_name(&ifname) {
                    self.issue(path, format!("{ifname:?} is not an interface name: {why}"));
                } else if let Some(&first) = interface_bound_by.get(&ifname) {
                    self.issue(
                        path,
                        format!(
                            "interface {ifname:?} is already bound to identities[{first}]; an \
                             interface carries one identity's traffic"
                        ),
                    );
                } else {
                    interface_bound_by.insert(ifname.clone(), i);
                    interfaces.push(ifname);
                }
            }
            identities.push(Identity {
                name,
                spiffe_id: entry.spiffe_id,
                auth_address,
                cidrs,
                interfaces,
                selector,
            });
            written_at.push(positions);
        }
        self.overlaps(&identities, &written_at);
        self.selector_overlaps(&identities);
        identities
    }

    /// An identity's `selector`: at least one part, `namespace` or `namespaceSelector` (not
    /// both), every label key and value as Kubernetes accepts them.
    fn selector(&mut self, at: At<'_>, entry: model::SelectorEntry) -> Option<Selector> {
        let issues_before = self.issues.len();
        if entry.namespace.is_none()
            && entry.namespace_selector.is_none()
            && entry.match_labels.is_none()
            && entry.match_expressions.is_none()
            && entry.service_account.is_none()
        {
            self.issue(
                at,
                "an empty selector would take in every pod of the cluster; set namespace, \
                 namespaceSelector, matchLabels, matchExpressions or serviceAccount",
            );
            return None;
        }
        let namespace = match (entry.namespace, entry.namespace_selector) {
            (Some(_), Some(_)) => {
                self.issue(
                    at.field("namespaceSelector"),
                    "set namespace or namespaceSelector, not both",
                );
                NamespaceMatch::Any
            }
            (Some(name), None) => {
                let name = self.dns_label(at.field("namespace"), Some(name));
                NamespaceMatch::Named(name)
            }
            (None, Some(ns)) => {
                let path = at.field("namespaceSelector");
                if ns.match_labels.is_none() && ns.match_expressions.is_none() {
                    self.issue(
                        path,
                        "an empty namespaceSelector selects every namespace; set matchLabels or \
                         matchExpressions, or leave it out",
                    );
                }
                NamespaceMatch::Labels(self.label_selector(
                    path,
                    ns.match_labels,
                    ns.match_expressions,
                ))
            }
            (None, None) => NamespaceMatch::Any,
        };
        let pods = self.label_selector(at, entry.match_labels, entry.match_expressions);
        if let Some(sa) = &entry.service_account {
            if !is_dns_subdomain(sa) {
                self.issue(
                    at.field("serviceAccount"),
                    format!(
                        "{sa:?} is not a service account name: lowercase letters, digits, '-' \
                         and '.', at most 253"
                    ),
                );
            }
        }
        (self.issues.len() == issues_before).then_some(Selector {
            namespace,
            pods,
            service_account: entry.service_account,
        })
    }

    /// `matchLabels` and `matchExpressions` under `at`, as one list of requirements.
    fn label_selector(
        &mut self,
        at: At<'_>,
        labels: Option<std::collections::BTreeMap<String, String>>,
        expressions: Option<Vec<model::ExpressionEntry>>,
    ) -> LabelSelector {
        let mut requirements = Vec::new();
        let labels_path = at.field("matchLabels");
        for (key, value) in labels.unwrap_or_default() {
            if let Err(why) = check_label_key(&key) {
                self.issue(labels_path, format!("label key {key:?}: {why}"));
            } else if let Err(why) = check_label_value(&value) {
                self.issue(labels_path, format!("label {key:?} value {value:?}: {why}"));
            }
            requirements.push(Requirement {
                key,
                op: Op::In([value].into()),
            });
        }
        let list = at.field("matchExpressions");
        for (i, e) in expressions.unwrap_or_default().into_iter().enumerate() {
            let at = list.item(i);
            let Some(key) = self.required(at.field("key"), e.key) else {
                continue;
            };
            if let Err(why) = check_label_key(&key) {
                self.issue(at.field("key"), format!("{key:?}: {why}"));
            }
            let Some(operator) = self.required(at.field("operator"), e.operator) else {
                continue;
            };
            let values_path = at.field("values");
            let op = match operator.as_str() {
                "In" | "NotIn" => {
                    let values = e.values.unwrap_or_default();
                    if values.is_empty() {
                        self.issue(values_path, format!("{operator} needs at least one value"));
                    }
                    for (j, v) in values.iter().enumerate() {
                        if let Err(why) = check_label_value(v) {
                            self.issue(values_path.item(j), format!("{v:?}: {why}"));
                        }
                    }
                    let values = values.into_iter().collect();
                    if operator == "In" {
                        Op::In(values)
                    } else {
                        Op::NotIn(values)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if e.values.as_ref().is_some_and(|v| !v.is_empty()) {
                        self.issue(values_path, format!("{operator} takes no values"));
                    }
                    if operator == "Exists" {
                        Op::Exists
                    } else {
                        Op::DoesNotExist
                    }
                }
                other => {
                    self.issue(
                        at.field("operator"),
                        format!(
                            "unknown operator {other:?}; expected In, NotIn, Exists or \
                             DoesNotExist"
                        ),
                    );
                    continue;
                }
            };
            requirements.push(Requirement { key, op });
        }
        LabelSelector { requirements }
    }

    /// A pod may belong to one identity only. Where one identity's selector takes in every pod
    /// another's does, no pod could ever be the narrower one's alone: refused. Selectors that
    /// merely could share a pod are checked at run time, pod by pod.
    fn selector_overlaps(&mut self, identities: &[Identity]) {
        let with: Vec<(usize, &Selector)> = identities
            .iter()
            .enumerate()
            .filter_map(|(i, id)| id.selector.as_ref().map(|s| (i, s)))
            .collect();
        for (n, &(i, a)) in with.iter().enumerate() {
            for &(j, b) in &with[n + 1..] {
                let (wide, narrow) = if a.covers(b) {
                    (i, j)
                } else if b.covers(a) {
                    (j, i)
                } else {
                    continue;
                };
                self.issue(
                    format!("spec.identities[{j}].selector"),
                    format!(
                        "every pod the selector of identities[{narrow}] ({:?}) matches is also \
                         matched by identities[{wide}] ({:?}); a pod may belong to one identity \
                         only, so narrow the broader selector (for example with a NotIn \
                         expression)",
                        identities[narrow].name, identities[wide].name
                    ),
                );
            }
        }
    }

    /// An address must resolve to at most one identity, so CIDRs of different identities may
    /// not be equal or nested. CIDRs are either nested or disjoint, so sorting by (start,
    /// prefix length) and sweeping with a stack of the CIDRs containing the current one finds
    /// every conflict in O(n log n).
    fn overlaps(&mut self, identities: &[Identity], written_at: &[Vec<usize>]) {
        struct Block {
            start: u128,
            end: u128,
            prefix_len: u8,
            identity: usize,
            cidr: usize,
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (identity, ident) in identities.iter().enumerate() {
            for (cidr, net) in ident.cidrs.iter().enumerate() {
                let (start, end) = net_range(net);
                let block = Block {
                    start,
                    end,
                    prefix_len: net.prefix_len(),
                    identity,
                    cidr,
                };
                match net {
                    IpNet::V4(_) => v4.push(block),
                    IpNet::V6(_) => v6.push(block),
                }
            }
        }
        for mut blocks in [v4, v6] {
            blocks.sort_unstable_by_key(|b| (b.start, b.prefix_len, b.identity, b.cidr));
            // Invariant: every block on the stack contains the next one and, since a conflict
            // is never pushed, all of them belong to one identity.
            let mut stack: Vec<&Block> = Vec::new();
            for block in &blocks {
                while stack.last().is_some_and(|top| top.end < block.start) {
                    stack.pop();
                }
                match stack.last() {
                    Some(outer) if outer.identity != block.identity => {
                        // Report at the one declared later: the earlier one was there first.
                        let (later, earlier) =
                            if (block.identity, block.cidr) > (outer.identity, outer.cidr) {
                                (block, *outer)
                            } else {
                                (*outer, block)
                            };
                        let later_net = identities[later.identity].cidrs[later.cidr];
                        let earlier_net = identities[earlier.identity].cidrs[earlier.cidr];
                        self.issue(
                            format!(
                                "spec.identities[{}].cidrs[{}]",
                                later.identity, written_at[later.identity][later.cidr]
                            ),
                            format!(
                                "{later_net} of identity {:?} overlaps {earlier_net} of identity \
                                 {:?} (identities[{}].cidrs[{}]); an address may belong to at \
                                 most one identity",
                                identities[later.identity].name,
                                identities[earlier.identity].name,
                                earlier.identity,
                                written_at[earlier.identity][earlier.cidr],
                            ),
                        );
                    }
                    _ => stack.push(block),
                }
            }
        }
    }

    fn rules(&mut self, entries: Vec<model::RuleEntry>, identities: &[Identity]) -> Vec<Rule> {
        let known: HashSet<&str> = identities
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !n.is_empty())
            .chain(RESERVED_IDENTITIES)
            .collect();
        let with_spiffe_id: HashMap<&str, bool> = identities
            .iter()
            .map(|i| (i.name.as_str(), i.spiffe_id.is_some()))
            .collect();
        let mut known_list: Option<String> = None;
        // Rule index → index of the earlier rule of the same name. Found before the names move
        // into the rules, so that 100k rule names are looked up without a copy of each.
        let mut duplicate_of: HashMap<usize, usize> = HashMap::new();
        {
            let mut first_declared: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
            for (i, entry) in entries.iter().enumerate() {
                let Some(name) = entry.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                match first_declared.entry(name) {
                    Entry::Occupied(first) => {
                        duplicate_of.insert(i, *first.get());
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                }
            }
        }
        let mut rules = Vec::with_capacity(entries.len());
        let list = At::Path("spec.rules");
        for (i, entry) in entries.into_iter().enumerate() {
            let at = list.item(i);
            let name_path = at.field("name");
            let name = self.dns_label(name_path, entry.name.map(String::from));
            if let Some(first) = duplicate_of.get(&i) {
                self.issue(
                    name_path,
                    format!("duplicate rule name {name:?} (first declared at rules[{first}])"),
                );
            }

            let mut endpoint = |v: &mut Self, field: &'static str, value: Option<Box<str>>| {
                let path = at.field(field);
                let Some(value) = v.required(path, value) else {
                    return String::new();
                };
                if !known.contains(&*value) {
                    let list = known_list
                        .get_or_insert_with(|| known_names(identities, &RESERVED_IDENTITIES));
                    v.issue(path, format!("unknown identity {value:?} (known: {list})"));
                }
                String::from(value)
            };
            let from = endpoint(self, "from", entry.from);
            let to = endpoint(self, "to", entry.to);

            let ports_path = at.field("ports");
            let mut ports = Vec::with_capacity(entry.ports.as_ref().map_or(0, |l| l.len()));
            match entry.ports {
                None => self.issue(
                    ports_path,
                    "required (list the allowed traffic, e.g. [{ protocol: TCP, port: 443 }])",
                ),
                Some(list) if list.is_empty() => self.issue(
                    ports_path,
                    "must list at least one entry (a rule without ports allows nothing)",
                ),
                Some(list) => {
                    for (j, port) in list.into_vec().into_iter().enumerate() {
                        if let Some(spec) = self.port(ports_path.item(j), port) {
                            ports.push(spec);
                        }
                    }
                }
            }

            let mode = self.mode(at.field("mode"), entry.mode.as_deref());
            let expires = entry.expires.and_then(|text| match parse_expiry(&text) {
                Some(t) => Some(t),
                None => {
                    self.issue(
                        at.field("expires"),
                        format!(
                            "{text:?} is not an RFC 3339 timestamp; write e.g. \
                             \"2026-12-01T10:00:00Z\" or \"2026-12-01T11:00:00+01:00\""
                        ),
                    );
                    None
                }
            });
            let authentication = entry.authentication.and_then(|text| {
                self.authentication(
                    at.field("authentication"),
                    &text,
                    &with_spiffe_id,
                    [&from, &to],
                )
            });
            let rate_limit = entry.rate_limit.and_then(|limit| {
                self.rate_limit(at.field("rateLimit"), limit.as_deref(), LimitOf::Rule)
            });
            rules.push(Rule {
                name,
                from,
                to,
                ports,
                mode,
                log: entry.log,
                expires,
                rate_limit,
                authentication,
            });
        }
        rules
    }

    /// A rule's `authentication`: `mtls`, between two declared identities that each have a
    /// `spiffeId` (the SVIDs the handshake must present).
    fn authentication(
        &mut self,
        path: At<'_>,
        text: &str,
        with_spiffe_id: &HashMap<&str, bool>,
        ends: [&str; 2],
    ) -> Option<Authentication> {
        let Some(authentication) = Authentication::parse(text) else {
            self.issue(
                path,
                format!("unknown authentication {text:?}; expected mtls"),
            );
            return None;
        };
        for (end, field) in ends.into_iter().zip(["from", "to"]) {
            if end.is_empty() {
                continue;
            }
            if RESERVED_IDENTITIES.contains(&end) {
                self.issue(
                    path,
                    format!(
                        "{field} is {end:?}, which has no certificate to authenticate with; \
                         mtls needs two declared identities with a spiffeId"
                    ),
                );
            } else if let Some(&has) = with_spiffe_id.get(end) {
                if !has {
                    self.issue(
                        path,
                        format!(
                            "identity {end:?} ({field}) has no spiffeId; mtls needs the SPIFFE ID \
                             its certificates carry (in Kubernetes mode with --trust-domain, a \
                             selector with one namespace and serviceAccount gives it one, \
                             unless another identity has or would get the same)"
                        ),
                    );
                }
            }
        }
        Some(authentication)
    }

    fn quotas(
        &mut self,
        entries: Vec<model::QuotaEntry>,
        identities: &[Identity],
    ) -> Vec<IdentityQuota> {
        let declared: HashSet<&str> = identities
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        let mut first_quota: HashMap<String, usize> = HashMap::new();
        let mut quotas = Vec::with_capacity(entries.len());
        let list = At::Path("spec.rateLimits");
        for (i, entry) in entries.into_iter().enumerate() {
            let at = list.item(i);
            let (identity, mode, rates) = entry.split();
            let identity_path = at.field("identity");
            let identity = match self.required(identity_path, identity) {
                None => None,
                Some(name) if name == "world" => {
                    self.issue(
                        identity_path,
                        "world has no addresses to meter by (it is every address no identity \
                         claims); to limit traffic from world, give the rules from world a \
                         rateLimit",
                    );
                    None
                }
                Some(name) if name != "host" && !declared.contains(name.as_str()) => {
                    self.issue(
                        identity_path,
                        format!(
                            "unknown identity {name:?} (known: {})",
                            known_names(identities, &["host"])
                        ),
                    );
                    None
                }
                Some(name) => match first_quota.get(&name) {
                    Some(&first) => {
                        self.issue(
                            identity_path,
                            format!(
                                "identity {name:?} already has a quota (rateLimits[{first}]); an \
                                 identity has one quota"
                            ),
                        );
                        None
                    }
                    None => {
                        first_quota.insert(name.clone(), i);
                        Some(name)
                    }
                },
            };
            let mode_path = at.field("mode");
            let mode = self.mode(mode_path, mode.as_deref());
            let limit = self.rate_limit(at, Some(&rates), LimitOf::Quota);
            if let (Some(identity), Some(limit)) = (identity, limit) {
                quotas.push(IdentityQuota {
                    identity,
                    mode,
                    limit,
                });
            }
        }
        quotas
    }

    /// A rule's `rateLimit` or a quota's rates, at `at`; `None` (with the issues reported) if
    /// anything in it is wrong, or if it was written as null.
    fn rate_limit(
        &mut self,
        at: At<'_>,
        entry: Option<&model::RateLimitEntry>,
        of: LimitOf,
    ) -> Option<RateLimit> {
        let Some(entry) = entry else {
            self.issue(at, format!("empty; {}", NO_RATE));
            return None;
        };
        let written = [
            (entry.packets_per_second, entry.packets_per_minute),
            (entry.bytes_per_second, entry.bytes_per_minute),
            (entry.connections_per_second, entry.connections_per_minute),
        ];
        if written.iter().all(|(s, m)| s.is_none() && m.is_none()) {
            self.issue(at, format!("no rate given; {NO_RATE}"));
            return None;
        }
        let mut ok = true;
        let mut rates: [Option<Rate>; LIMIT_KINDS] = [None; LIMIT_KINDS];
        for (k, (per_second, per_minute)) in written.into_iter().enumerate() {
            let [second_field, minute_field] = RATE_FIELDS[k];
            if per_second.is_some() && per_minute.is_some() {
                self.issue(
                    at.field(minute_field),
                    format!(
                        "{second_field} is given too; {} have one rate, per second or per \
                         minute: keep one of the two",
                        kind::NAMES[k]
                    ),
                );
                ok = false;
            }
            for (field, value, per) in [
                (second_field, per_second, Per::Second),
                (minute_field, per_minute, Per::Minute),
            ] {
                let Some(value) = value else { continue };
                match self.rate_count(at.field(field), k, value, per, of) {
                    Some(count) => rates[k] = Some(Rate { count, per }),
                    None => ok = false,
                }
            }
        }
        let has = |k: usize| written[k].0.is_some() || written[k].1.is_some();
        let burst = self.burst(
            at.field("burst"),
            entry.burst,
            has(kind::PACKETS) || has(kind::CONNECTIONS),
            "burst applies to packets and connections, and this limit has neither; use \
             burstBytes for bytes",
        );
        let burst_bytes = self.burst(
            at.field("burstBytes"),
            entry.burst_bytes,
            has(kind::BYTES),
            "burstBytes applies to bytes, and this limit has no byte rate; use burst for \
             packets and connections",
        );
        let (Some(burst), Some(burst_bytes)) = (burst, burst_bytes) else {
            return None;
        };
        if !ok {
            return None;
        }
        let limit = RateLimit {
            packets: rates[kind::PACKETS],
            bytes: rates[kind::BYTES],
            connections: rates[kind::CONNECTIONS],
            burst,
            burst_bytes,
        };
        // The kernel's own arithmetic decides what it can represent; every number is in bounds
        // by now, so only a burst too long for its rate is expected here.
        for (k, kind_limit) in limit.kinds().iter().enumerate() {
            let Some(kind_limit) = kind_limit else {
                continue;
            };
            let Err(error) = kind_limit.limit_rate(k, 1) else {
                continue;
            };
            let rate = rates[k].expect("a kind with a limit has a rate");
            let rate_field = match rate.per {
                Per::Second => RATE_FIELDS[k][0],
                Per::Minute => RATE_FIELDS[k][1],
            };
            let (burst_field, burst_written) = match k {
                kind::BYTES => ("burstBytes", limit.burst_bytes.is_some()),
                _ => ("burst", limit.burst.is_some()),
            };
            let field = if burst_written {
                burst_field
            } else {
                rate_field
            };
            let rate_text = format!("{} per {}", units(rate.count, k), rate.per.name());
            let message = match error {
                RateError::BurstTooLong => format!(
                    "{burst_field} {} at {rate_text} is {} of traffic; at most one hour's worth \
                     ({}) is accepted",
                    kind_limit.burst,
                    burst_duration(kind_limit.burst, rate),
                    longest_burst(k, kind_limit.count, kind_limit.period_ns),
                ),
                RateError::Zero => "must be at least 1".to_owned(),
                RateError::TooFast => format!("{rate_text} is too fast to meter"),
            };
            self.issue(at.field(field), message);
            ok = false;
        }
        ok.then_some(limit)
    }

    /// One rate number, in the bounds of its kind.
    fn rate_count(
        &mut self,
        path: At<'_>,
        k: usize,
        value: i64,
        per: Per,
        of: LimitOf,
    ) -> Option<u64> {
        let periods = per.ns() / Per::Second.ns();
        let max = MAX_PER_SECOND[k] * periods;
        let min = match k {
            kind::BYTES => MIN_BYTES_PER_SECOND * periods,
            _ => 1,
        };
        let what = format!("{} per {}", kind::NAMES[k], per.name());
        let message = if value < 0 {
            format!("{value} is negative; a rate counts {what}, at least 1")
        } else if value == 0 {
            format!("must be at least 1; {}", of.instead_of_zero())
        } else if (value as u64) > max {
            format!("{value} {what} is more than any node carries; at most {max} is accepted")
        } else if (value as u64) < min {
            format!(
                "{value} {what} is below 1 KiB/s, at which no TCP connection works; at least \
                 {min} is accepted"
            )
        } else {
            return Some(value as u64);
        };
        self.issue(path, message);
        None
    }

    /// A burst: `Some(None)` if not written, `Some(Some(n))` if valid, `None` after an issue.
    fn burst(
        &mut self,
        path: At<'_>,
        value: Option<i64>,
        applies: bool,
        not_applicable: &str,
    ) -> Option<Option<u64>> {
        let Some(value) = value else {
            return Some(None);
        };
        if !applies {
            self.issue(path, not_applicable);
            return None;
        }
        match u64::try_from(value) {
            Ok(n) if n >= 1 => Some(Some(n)),
            _ => {
                self.issue(
                    path,
                    format!(
                        "{value} is not a burst; it is how much may pass at once from a full \
                         bucket, at least 1 (leave it out for one period's worth)"
                    ),
                );
                None
            }
        }
    }

    fn port(&mut self, at: At<'_>, entry: model::PortEntry) -> Option<PortSpec> {
        let protocol_path = at.field("protocol");
        let text = self.required(protocol_path, entry.protocol)?;
        let Some(protocol) = Protocol::parse(&text) else {
            self.issue(
                protocol_path,
                format!("unknown protocol {text:?}; expected one of TCP, UDP, ICMP, ICMPv6, ANY"),
            );
            return None;
        };
        let has_ports = matches!(protocol, Protocol::Tcp | Protocol::Udp);
        let mut ok = true;
        let mut port_number = |v: &mut Self, field: &'static str, value: Option<i64>| {
            let value = value?;
            let path = at.field(field);
            if !has_ports {
                v.issue(
                    path,
                    format!(
                        "not allowed with protocol {} (it has no ports; the entry matches all \
                         of its traffic)",
                        protocol.name()
                    ),
                );
                ok = false;
                return None;
            }
            match u16::try_from(value) {
                Ok(p) if p >= 1 => Some(p),
                _ => {
                    v.issue(
                        path,
                        format!(
                            "{value} is out of range; ports are 1 to 65535 (leave port out to \
                             allow every port)"
                        ),
                    );
                    ok = false;
                    None
                }
            }
        };
        let port = port_number(self, "port", entry.port);
        let end_port = port_number(self, "endPort", entry.end_port);
        if ok {
            match (port, end_port) {
                (None, Some(_)) => {
                    self.issue(
                        at.field("endPort"),
                        "endPort requires port (the range start)",
                    );
                    ok = false;
                }
                (Some(p), Some(e)) if e < p => {
                    self.issue(
                        at.field("endPort"),
                        format!("endPort {e} is below port {p}; a range runs from port to endPort"),
                    );
                    ok = false;
                }
                _ => {}
            }
        }
        ok.then_some(PortSpec {
            protocol,
            port,
            end_port,
        })
    }
}

/// Declared identity names, then `reserved`.
fn known_names(identities: &[Identity], reserved: &[&str]) -> String {
    let mut seen = HashSet::new();
    let declared: Vec<&str> = identities
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !n.is_empty() && !RESERVED_IDENTITIES.contains(n) && seen.insert(*n))
        .collect();
    let mut list: Vec<String> = declared
        .iter()
        .take(KNOWN_NAMES_SHOWN)
        .map(|n| n.to_string())
        .collect();
    if declared.len() > KNOWN_NAMES_SHOWN {
        list.push(format!("{} more", declared.len() - KNOWN_NAMES_SHOWN));
    }
    list.extend(reserved.iter().map(|n| n.to_string()));
    list.join(", ")
}

/// A DNS label (RFC 1123), as Kubernetes names: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub(super) fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// A label key as Kubernetes accepts it: an optional DNS-subdomain prefix and `/`, then a name
/// of 1 to 63 characters of letters, digits, `-`, `_`, `.`, starting and ending with a letter or
/// digit.
pub fn check_label_key(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err("the prefix before '/' must be 1 to 253 characters");
        }
        if !is_dns_subdomain(prefix) {
            return Err("the prefix before '/' must be a DNS subdomain (lowercase letters, digits, '-' and '.')");
        }
    }
    if name.is_empty() {
        return Err("the name part is empty");
    }
    check_label_value(name).map_err(|_| {
        "the name part must be at most 63 letters, digits, '-', '_' or '.', starting and ending \
         with a letter or digit"
    })
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`, starting and ending with
/// a letter or digit.
pub fn check_label_value(value: &str) -> Result<(), &'static str> {
    let b = value.as_bytes();
    if b.is_empty() {
        return Ok(());
    }
    let ok = b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("a label value is at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    }
}

/// A DNS subdomain (RFC 1123), as Kubernetes object names: dot-separated DNS labels, at most
/// 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// `spiffe://<trust domain>[/<path>]` as the SPIFFE ID specification defines it: the same
/// parser the verifier reads certificates with, so a policy never names an ID no SVID can carry.
fn check_spiffe_id(id: &str) -> Result<(), String> {
    crate::identity::SpiffeId::parse(id)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A Linux interface name as `ip link` accepts it: 1 to 15 bytes, no '/', ':' or whitespace, not
/// "." or "..". Globs are not accepted: a binding names one interface.
fn check_interface_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("use 1 to 15 characters");
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not interface names");
    }
    if name
        .bytes()
        .any(|c| c == b'/' || c == b':' || c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err("'/', ':', spaces and control characters are not allowed");
    }
    if name.contains(['*', '?', '[']) {
        return Err("a binding names one interface; globs are not accepted");
    }
    Ok(())
}

/// A CIDR, or a bare address meaning just that address. Host bits must be clear: `10.10.1.5/24`
/// is more likely a typo for one address or for the network than either of them, so the user
/// has to say which.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        let net = IpNet::from_str(text)
            .map_err(|_| format!("{text:?} is not a CIDR (e.g. 10.0.0.0/24 or fd00::/64)"))?;
        if net.addr() != net.network() {
            return Err(format!(
                "{net} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        reject_v4_mapped(net)
    } else {
        IpAddr::from_str(text)
            .map(IpNet::from)
            .map_err(|_| {
                format!("{text:?} is not an IP address or CIDR (e.g. 10.0.0.5 or 10.0.0.0/24)")
            })
            .and_then(reject_v4_mapped)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) never appear on the wire for IPv4 traffic, so
/// an identity written that way would silently match nothing the user meant.
fn reject_v4_mapped(net: IpNet) -> Result<IpNet, String> {
    match net {
        IpNet::V6(n) if n.addr().to_ipv4_mapped().is_some() && n.prefix_len() >= 96 => Err(
            format!("{net} is an IPv4-mapped IPv6 address, which IPv4 traffic never carries; write the IPv4 address or CIDR"),
        ),
        _ => Ok(net),
    }
}

/// First and last address of a network, as integers (IPv4 in the low 32 bits).
pub(super) fn net_range(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.network()) as u128,
            u32::from(n.broadcast()) as u128,
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// An RFC 3339 timestamp with a zone: `Z` or a numeric offset such as `+01:00`. humantime only
/// reads UTC, so an offset is applied here. A timestamp without a zone is refused: guessing
/// the zone of a grant's expiry could keep it open for hours longer than meant.
pub(super) fn parse_expiry(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    // Shortest form: 2026-12-01T10:00:00Z
    if b.len() < 20 || !text.is_ascii() || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let mut utc = String::with_capacity(text.len());
    utc.push_str(&text[..10]);
    utc.push('T');
    let (local, offset_secs) = match b[b.len() - 1] {
        b'Z' | b'z' => (&text[11..text.len() - 1], 0i64),
        _ => {
            let (local, zone) = text.split_at(text.len() - 6);
            let z = zone.as_bytes();
            let sign = match z[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if z[3] != b':' || !z[1..3].iter().chain(&z[4..6]).all(u8::is_ascii_digit) {
                return None;
            }
            let hours: i64 = zone[1..3].parse().ok()?;
            let minutes: i64 = zone[4..6].parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            (&local[11..], sign * (hours * 3600 + minutes * 60))
        }
    };
    utc.push_str(local);
    utc.push('Z');
    let at_offset = humantime::parse_rfc3339(&utc).ok()?;
    // Local time = UTC + offset, so UTC = local time - offset.
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        at_offset.checked_sub(shift)
    } else {
        at_offset.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_in_utc_parses() {
        let t = parse_expiry("2026-12-01T10:00:00Z").unwrap();
        assert_eq!(t, humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap());
    }

    #[test]
    fn expiry_with_offset_is_converted_to_utc() {
        let t = parse_expiry("2026-12-01T11:30:00+01:30").unwrap();
        assert_eq!(t, humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap());
        let t = parse_expiry("2026-12-01T05:00:00.5-05:00").unwrap();
        assert_eq!(
            t,
            humantime::parse_rfc3339("2026-12-01T10:00:00.5Z").unwrap()
        );
    }

    #[test]
    fn expiry_without_zone_is_refused() {
        assert_eq!(parse_expiry("2026-12-01T10:00:00"), None);
        assert_eq!(parse_expiry("2026-12-01 10:00:00Z"), None);
        assert_eq!(parse_expiry("tomorrow"), None);
    }

    #[test]
    fn label_keys_and_values() {
        for ok in ["app", "app.kubernetes.io/name", "a_b.c-d", "x/y"] {
            assert!(check_label_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/app",
            "Bad_Prefix/app",
            "app/",
            "-app",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(check_label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "v1", "a.b-c_d", "A1"] {
            assert!(check_label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a-", "a b", "é", &"x".repeat(64)] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("frontend-2"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("Orders"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    fn policy_with_identities(identities: &str) -> Result<Policy, super::super::PolicyError> {
        super::super::parse_policy(
            &format!(
                "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: p }}\n\
                 spec:\n  identities:\n{identities}"
            ),
            "p.yaml",
        )
    }

    #[test]
    fn interfaces_bind_to_one_identity_each() {
        let ok = policy_with_identities(
            "    - { name: a, cidrs: [10.0.0.1], interfaces: [tg-a, veth12ab] }\n\
                 \x20   - { name: b, cidrs: [10.0.0.2], interfaces: [tg-b] }\n",
        )
        .unwrap();
        assert_eq!(ok.identities[0].interfaces, ["tg-a", "veth12ab"]);
        let err = policy_with_identities(
            "    - { name: a, cidrs: [10.0.0.1], interfaces: [tg-a] }\n\
                 \x20   - { name: b, cidrs: [10.0.0.2], interfaces: [tg-a] }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("identities[1].interfaces[0]") && err.contains("already bound"),
            "{err}"
        );
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in [
            "\"\"",
            "tg-*",
            "a/b",
            "\"a b\"",
            "sixteen-chars-xx",
            "\"eth0:1\"",
        ] {
            let err = policy_with_identities(&format!(
                "    - {{ name: a, cidrs: [10.0.0.1], interfaces: [{bad}] }}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("is not an interface name"), "{bad}: {err}");
        }
    }

    #[test]
    fn ipv4_mapped_cidrs_are_refused() {
        for cidr in ["\"::ffff:10.0.0.1\"", "\"::ffff:10.0.0.0/120\""] {
            let err = policy_with_identities(&format!("    - {{ name: a, cidrs: [{cidr}] }}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("IPv4-mapped"), "{cidr}: {err}");
        }
    }

    #[test]
    fn spiffe_ids() {
        assert!(check_spiffe_id("spiffe://shop.test/ns/shop/sa/frontend").is_ok());
        assert!(check_spiffe_id("spiffe://shop.test").is_ok());
        assert!(check_spiffe_id("spiffe:///ns").is_err());
        assert!(check_spiffe_id("https://shop.test/x").is_err());
        assert!(check_spiffe_id("spiffe://Shop.test/x").is_err());
        assert!(check_spiffe_id("spiffe://shop.test/a//b").is_err());
    }
}
