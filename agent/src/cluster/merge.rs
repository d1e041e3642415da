//! Merging every `Policy` object of the cluster into the one policy a generation enforces.
//!
//! - Objects are taken in order: those merged last time first (so an established object is
//!   never pushed out by a newcomer), then the rest, each group in name order. Identity, rule
//!   and rate-limit names share one namespace across objects, and a rule may name an identity
//!   another object declares.
//! - An object that makes the merged policy invalid is skipped whole, never half-applied: its
//!   first error is its reason (field paths and indexes are the object's own). Where two objects
//!   conflict (the same identity name, overlapping CIDRs or selectors), the error lands on the
//!   later item, so the object taken first wins.
//! - An object's `spec.mode` and `spec.log` apply to its own rules and quotas (those that do
//!   not set their own). The default deny is in audit mode only when every object there is,
//!   skipped ones included, says `mode: audit`: an enforcing object that is skipped for a typo
//!   never turns the cluster's default deny into audit.
//!
//! - With `--trust-domain`, an identity at an end of an `authentication: mtls` rule that has no
//!   `spiffeId` gets `spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccount>` from its
//!   selector, when the selector names one namespace and one service account (the ID
//!   SPIRE's Kubernetes workload registrar and csi-driver-spiffe give a pod by default).
//!
//! The merged policy is a JSON document (JSON is YAML), so it goes through the same parser and
//! validation as a file, and `tollgate policy get` shows it.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use crate::{
    identity::{SpiffeId, TrustDomain},
    policy::{parse_policy_owned, PolicyError},
};

/// Name of the merged policy.
pub const MERGED_NAME: &str = "kubernetes";

/// A `Policy` object as the API server gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    pub name: String,
    pub resource_version: String,
    /// The object's `spec`, as sent (`Value::Null` if it had none).
    pub spec: Value,
}

/// An object left out of the merged policy, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Merged {
    /// The merged document, ready for the installer.
    pub text: String,
    /// Objects in the merged policy, in name order.
    pub accepted: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// The three lists an object contributes to.
const LISTS: [&str; 3] = ["identities", "rules", "rateLimits"];

struct Piece<'a> {
    object: &'a PolicyObject,
    /// The object's lists with its `mode`/`log` pushed into their items.
    lists: [Vec<Value>; 3],
    audit: bool,
}

/// Merges `objects` (any order); `established` are the objects merged last time, taken first.
/// `trust_domain` (`--trust-domain`) gives mtls identities their default SPIFFE IDs.
pub fn merge(
    objects: &[PolicyObject],
    established: &[String],
    trust_domain: Option<&TrustDomain>,
) -> Merged {
    let mut sorted: Vec<&PolicyObject> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        let new = |o: &PolicyObject| !established.contains(&o.name);
        (new(a), &a.name).cmp(&(new(b), &b.name))
    });
    // Audit only if every object says so, whether or not it merges.
    let all_audit = !objects.is_empty()
        && objects.iter().all(|o| {
            o.spec
                .get("mode")
                .is_some_and(|m| m.as_str() == Some("audit"))
        });
    let mut skipped = Vec::new();
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    for object in sorted {
        match piece(object) {
            Ok(p) => pieces.push(p),
            Err(reason) => skipped.push(Skipped {
                name: object.name.clone(),
                reason,
            }),
        }
    }
    // Each round either succeeds or removes at least one object: bounded by their number.
    for _ in 0..=pieces.len() {
        let text = document(&pieces, all_audit, trust_domain);
        let error = match parse_policy_owned(text.clone(), "kubernetes") {
            Ok(_) => {
                return Merged {
                    text,
                    accepted: pieces.iter().map(|p| p.object.name.clone()).collect(),
                    skipped: sorted_skipped(skipped),
                }
            }
            Err(e) => e,
        };
        let mut blamed: Vec<(usize, String)> = Vec::new();
        for e in std::iter::once(&error).chain(&error.more) {
            if let Some((owner, reason)) = blame(&pieces, e) {
                if !blamed.iter().any(|(o, _)| *o == owner) {
                    blamed.push((owner, reason));
                }
            }
        }
        if blamed.is_empty() {
            // A policy-wide error (too many rate limits in total): the last object goes.
            let Some(last) = pieces.len().checked_sub(1) else {
                break;
            };
            blamed.push((last, error.without_more()));
        }
        blamed.sort_by_key(|(owner, _)| std::cmp::Reverse(*owner));
        for (owner, reason) in blamed {
            let p = pieces.remove(owner);
            skipped.push(Skipped {
                name: p.object.name.clone(),
                reason,
            });
        }
    }
    // Not reached for valid input (an empty policy is valid); refuse everything rather than
    // loop.
    let mut all: Vec<Skipped> = skipped;
    all.extend(pieces.iter().map(|p| Skipped {
        name: p.object.name.clone(),
        reason: "the merged policy could not be validated".to_owned(),
    }));
    Merged {
        text: document(&[], false, None),
        accepted: Vec::new(),
        skipped: sorted_skipped(all),
    }
}

fn sorted_skipped(mut skipped: Vec<Skipped>) -> Vec<Skipped> {
    skipped.sort_by(|a, b| a.name.cmp(&b.name));
    skipped
}

/// An object's contribution, or why it has none.
fn piece(object: &PolicyObject) -> Result<Piece<'_>, String> {
    let spec = match &object.spec {
        Value::Object(map) => map,
        Value::Null => return Err("spec: required".to_owned()),
        _ => return Err("spec: must be a mapping".to_owned()),
    };
    for key in spec.keys() {
        if !matches!(
            key.as_str(),
            "mode" | "log" | "identities" | "rules" | "rateLimits"
        ) {
            return Err(format!(
                "spec.{key}: unknown field (expected mode, log, identities, rules, rateLimits)"
            ));
        }
    }
    let mode = spec.get("mode").cloned();
    let audit = match &mode {
        None => false,
        Some(Value::String(m)) if m == "audit" => true,
        Some(Value::String(m)) if m == "enforce" => false,
        Some(other) => {
            return Err(format!(
                "spec.mode: unknown mode {other}; expected enforce or audit"
            ))
        }
    };
    let log = match spec.get("log") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => return Err(format!("spec.log: {other} is not a boolean")),
    };
    let mut lists: [Vec<Value>; 3] = Default::default();
    for (i, list) in LISTS.iter().enumerate() {
        match spec.get(*list) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => lists[i] = items.clone(),
            Some(_) => return Err(format!("spec.{list}: must be a list")),
        }
    }
    for rule in &mut lists[1] {
        if let Value::Object(r) = rule {
            if let Some(m) = &mode {
                r.entry("mode").or_insert_with(|| m.clone());
            }
            if log {
                r.entry("log").or_insert(Value::Bool(true));
            }
        }
    }
    for quota in &mut lists[2] {
        if let (Value::Object(q), Some(m)) = (quota, &mode) {
            q.entry("mode").or_insert_with(|| m.clone());
        }
    }
    Ok(Piece {
        object,
        lists,
        audit,
    })
}

/// The merged document of `pieces`, its default deny in audit mode when `audit`.
fn document(pieces: &[Piece<'_>], audit: bool, trust_domain: Option<&TrustDomain>) -> String {
    let mut spec = Map::new();
    let all_audit = audit && !pieces.is_empty() && pieces.iter().all(|p| p.audit);
    spec.insert(
        "mode".into(),
        Value::String(if all_audit { "audit" } else { "enforce" }.into()),
    );
    let mut lists: [Vec<Value>; 3] = Default::default();
    for (i, list) in lists.iter_mut().enumerate() {
        *list = pieces.iter().flat_map(|p| p.lists[i].clone()).collect();
    }
    if let Some(td) = trust_domain {
        let [identities, rules, _] = &mut lists;
        default_spiffe_ids(identities, rules, td);
    }
    for (list, items) in LISTS.iter().zip(lists) {
        spec.insert((*list).into(), Value::Array(items));
    }
    let doc = json!({
        "apiVersion": crate::policy::API_VERSION,
        "kind": crate::policy::KIND,
        "metadata": { "name": MERGED_NAME },
        "spec": spec,
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value serializes")
}

/// Gives each identity at an end of an mtls rule that has no `spiffeId` the SPIFFE ID of its
/// selector's one namespace and service account in `td`. Indexes do not move, so errors are
/// still blamed on the right object. An identity it cannot name is left for validation to
/// refuse ("has no spiffeId"), on the rule that needs it: so is one whose default would be
/// another identity's ID (two selectors of one service account, or an explicit `spiffeId`),
/// which a certificate could not tell apart. Blaming the duplicate on the identity instead
/// would let any object with mtls rules push out an established object that declares it.
fn default_spiffe_ids(identities: &mut [Value], rules: &[Value], td: &TrustDomain) {
    let ends: HashSet<&str> = rules
        .iter()
        .filter(|r| r.get("authentication").and_then(Value::as_str) == Some("mtls"))
        .flat_map(|r| ["from", "to"].map(|k| r.get(k).and_then(Value::as_str)))
        .flatten()
        .collect();
    let explicit: HashSet<String> = identities
        .iter()
        .filter_map(|i| i.get("spiffeId")?.as_str().map(str::to_owned))
        .collect();
    let mut defaults: Vec<(usize, String)> = Vec::new();
    for (at, identity) in identities.iter().enumerate() {
        let Value::Object(item) = identity else {
            continue;
        };
        let named = item.get("name").and_then(Value::as_str);
        if !named.is_some_and(|n| ends.contains(n)) || item.contains_key("spiffeId") {
            continue;
        }
        let selector = item.get("selector");
        let field = |k: &str| selector.and_then(|s| s.get(k)).and_then(Value::as_str);
        let (Some(namespace), Some(account)) = (field("namespace"), field("serviceAccount")) else {
            continue;
        };
        let text = format!("spiffe://{}/ns/{namespace}/sa/{account}", td.as_str());
        if SpiffeId::parse(&text).is_ok() && !explicit.contains(&text) {
            defaults.push((at, text));
        }
    }
    for (at, text) in &defaults {
        if defaults.iter().filter(|(_, t)| t == text).count() > 1 {
            continue;
        }
        if let Value::Object(item) = &mut identities[*at] {
            item.insert("spiffeId".into(), Value::String(text.clone()));
        }
    }
}

/// Which piece an error is about, and the error in that object's own terms.
fn blame(pieces: &[Piece<'_>], e: &PolicyError) -> Option<(usize, String)> {
    let field = e.field.as_deref()?;
    let field = field.strip_prefix("spec.").unwrap_or(field);
    let (list_index, rest) = LISTS.iter().enumerate().find_map(|(i, l)| {
        field
            .strip_prefix(l)
            .and_then(|r| r.strip_prefix('['))
            .map(|r| (i, r))
    })?;
    let (index, tail) = rest.split_once(']')?;
    let mut index: usize = index.parse().ok()?;
    for (owner, p) in pieces.iter().enumerate() {
        let len = p.lists[list_index].len();
        if index < len {
            let message = rebase(&e.message, pieces, owner, list_index);
            return Some((
                owner,
                format!("spec.{}[{index}]{tail}: {message}", LISTS[list_index]),
            ));
        }
        index -= len;
    }
    None
}

/// Messages refer to other items by merged index (`identities[7]`); say whose they are.
fn rebase(message: &str, pieces: &[Piece<'_>], owner: usize, list_index: usize) -> String {
    let list = LISTS[list_index];
    let marker = format!("{list}[");
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(&marker) {
        out.push_str(&rest[..at]);
        let after = &rest[at + marker.len()..];
        let Some((num, tail)) = after.split_once(']') else {
            out.push_str(&rest[at..]);
            rest = "";
            break;
        };
        match num.parse::<usize>() {
            Ok(mut n) => {
                let mut named = None;
                for (i, p) in pieces.iter().enumerate() {
                    let len = p.lists[list_index].len();
                    if n < len {
                        named = Some(if i == owner {
                            format!("{list}[{n}]")
                        } else {
                            format!("{list}[{n}] of Policy {:?}", p.object.name)
                        });
                        break;
                    }
                    n -= len;
                }
                out.push_str(&named.unwrap_or_else(|| format!("{list}[{num}]")));
            }
            Err(_) => out.push_str(&format!("{marker}{num}]")),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy;

    fn object(name: &str, spec: Value) -> PolicyObject {
        PolicyObject {
            name: name.into(),
            resource_version: "1".into(),
            spec,
        }
    }

    fn web_db() -> PolicyObject {
        object(
            "a-base",
            json!({
                "identities": [
                    {"name": "web", "selector": {"namespace": "shop", "matchLabels": {"app": "web"}}},
                    {"name": "db", "selector": {"namespace": "shop", "matchLabels": {"app": "db"}}}
                ]
            }),
        )
    }

    #[test]
    fn objects_merge_and_may_name_each_others_identities() {
        let rules = object(
            "b-rules",
            json!({
                "mode": "audit",
                "log": true,
                "rules": [{"name": "web-to-db", "from": "web", "to": "db",
                           "ports": [{"port": 5432, "protocol": "TCP"}]}]
            }),
        );
        let merged = merge(&[rules, web_db()], &[], None);
        assert_eq!(merged.accepted, ["a-base", "b-rules"]);
        assert!(merged.skipped.is_empty());
        let policy = parse_policy(&merged.text, "merged").unwrap();
        assert_eq!(policy.name, MERGED_NAME);
        assert_eq!(policy.identities.len(), 2);
        // The object's mode and log went into its rule; the default deny still enforces.
        assert_eq!(policy.mode, crate::policy::Mode::Enforce);
        assert_eq!(policy.rules[0].mode, Some(crate::policy::Mode::Audit));
        assert_eq!(policy.rules[0].log, Some(true));
    }

    #[test]
    fn an_invalid_object_is_skipped_whole_with_its_own_field_path() {
        let bad = object(
            "c-bad",
            json!({
                "identities": [{"name": "cache", "cidrs": ["10.200.3.0/24"]}],
                "rules": [
                    {"name": "ok", "from": "web", "to": "cache", "ports": [{"port": 80, "protocol": "TCP"}]},
                    {"name": "bad", "from": "web", "to": "db", "ports": [{"port": 70000, "protocol": "TCP"}]}
                ]
            }),
        );
        let merged = merge(&[web_db(), bad], &[], None);
        assert_eq!(merged.accepted, ["a-base"]);
        assert_eq!(merged.skipped.len(), 1);
        let reason = &merged.skipped[0].reason;
        assert!(
            reason.starts_with("spec.rules[1].ports[0].port"),
            "{reason}"
        );
        // Nothing of it went in: not its identity, not its valid rule.
        let policy = parse_policy(&merged.text, "merged").unwrap();
        assert_eq!(policy.identities.len(), 2);
        assert!(policy.rules.is_empty());
    }

    #[test]
    fn the_first_object_by_name_wins_a_conflict() {
        let dup = object(
            "z-dup",
            json!({"identities": [{"name": "web", "cidrs": ["10.200.5.0/24"]}]}),
        );
        let merged = merge(&[dup, web_db()], &[], None);
        assert_eq!(merged.accepted, ["a-base"]);
        assert_eq!(merged.skipped[0].name, "z-dup");
        assert!(
            merged.skipped[0].reason.contains("duplicate identity name")
                && merged.skipped[0].reason.contains("of Policy \"a-base\""),
            "{}",
            merged.skipped[0].reason
        );
    }

    #[test]
    fn an_object_relying_on_a_skipped_one_is_skipped_too() {
        let base = object(
            "a-base",
            json!({"identities": [{"name": "web", "cidrs": ["10.200.1.0/33"]}]}),
        );
        let user = object(
            "b-user",
            json!({"rules": [{"name": "r", "from": "web", "to": "world", "ports": [{"protocol": "TCP", "port": 80}]}]}),
        );
        let merged = merge(&[base, user], &[], None);
        assert!(merged.accepted.is_empty());
        assert_eq!(merged.skipped.len(), 2);
        assert!(merged.skipped[1].reason.contains("unknown identity"));
        // Nothing valid: the merged policy denies everything, and is itself valid.
        parse_policy(&merged.text, "merged").unwrap();
    }

    #[test]
    fn malformed_specs_are_refused_with_a_reason() {
        for (spec, expect) in [
            (Value::Null, "spec: required"),
            (json!([1]), "must be a mapping"),
            (json!({"extra": 1}), "spec.extra: unknown field"),
            (json!({"mode": "maybe"}), "spec.mode"),
            (json!({"rules": {"a": 1}}), "spec.rules: must be a list"),
            (json!({"log": "yes"}), "spec.log"),
        ] {
            let merged = merge(&[object("x", spec)], &[], None);
            assert!(merged.accepted.is_empty());
            assert!(
                merged.skipped[0].reason.contains(expect),
                "{}",
                merged.skipped[0].reason
            );
        }
    }

    #[test]
    fn a_skipped_enforcing_object_keeps_the_default_deny_enforcing() {
        let trial = object("trial", json!({"mode": "audit"}));
        let broken = object(
            "shop",
            json!({"rules": [{"name": "r", "from": "world", "to": "world",
                              "ports": [{"port": 70000, "protocol": "TCP"}]}]}),
        );
        let merged = merge(&[trial.clone(), broken], &[], None);
        assert_eq!(merged.accepted, ["trial"]);
        let p = parse_policy(&merged.text, "merged").unwrap();
        assert_eq!(p.mode, crate::policy::Mode::Enforce);
        let alone = merge(&[trial], &[], None);
        let p = parse_policy(&alone.text, "merged").unwrap();
        assert_eq!(p.mode, crate::policy::Mode::Audit);
    }

    #[test]
    fn an_established_object_is_not_pushed_out_by_a_newcomer() {
        let newcomer = object(
            "00-newcomer",
            json!({"identities": [{"name": "web", "cidrs": ["10.200.9.0/24"]}]}),
        );
        let merged = merge(&[newcomer.clone(), web_db()], &["a-base".to_owned()], None);
        assert_eq!(merged.accepted, ["a-base"]);
        assert_eq!(merged.skipped[0].name, "00-newcomer");
        // Without history (a fresh agent), names decide.
        let fresh = merge(&[newcomer, web_db()], &[], None);
        assert_eq!(fresh.accepted, ["00-newcomer"]);
    }

    #[test]
    fn no_objects_is_a_valid_deny_all_policy() {
        let merged = merge(&[], &[], None);
        let p = parse_policy(&merged.text, "merged").unwrap();
        assert!(p.rules.is_empty() && p.identities.is_empty());
        assert_eq!(p.mode, crate::policy::Mode::Enforce);
        let audit = merge(&[object("a", json!({"mode": "audit"}))], &[], None);
        let p = parse_policy(&audit.text, "merged").unwrap();
        assert_eq!(p.mode, crate::policy::Mode::Audit);
    }

    #[test]
    fn mtls_identities_get_the_spiffe_id_of_their_namespace_and_service_account() {
        let td = TrustDomain::parse("cluster.test").unwrap();
        let ids = object(
            "a-ids",
            json!({"identities": [
                {"name": "web", "selector": {"namespace": "shop", "serviceAccount": "web"}},
                {"name": "db", "selector": {"namespace": "shop", "serviceAccount": "db.main"}},
                {"name": "own", "spiffeId": "spiffe://other.test/own",
                 "selector": {"namespace": "shop", "serviceAccount": "own"}},
                {"name": "plain", "selector": {"namespace": "shop", "serviceAccount": "plain"}}
            ]}),
        );
        // The rules come from another object: the ends are found in the merged lists.
        let rules = object(
            "b-rules",
            json!({"rules": [
                {"name": "web-to-db", "from": "web", "to": "db", "authentication": "mtls",
                 "ports": [{"port": 5432, "protocol": "TCP"}]},
                {"name": "own-to-db", "from": "own", "to": "db", "authentication": "mtls",
                 "ports": [{"port": 5433, "protocol": "TCP"}]},
                {"name": "plain-to-db", "from": "plain", "to": "db",
                 "ports": [{"port": 5434, "protocol": "TCP"}]}
            ]}),
        );
        let merged = merge(&[ids.clone(), rules.clone()], &[], Some(&td));
        assert!(merged.skipped.is_empty(), "{:?}", merged.skipped);
        let p = parse_policy(&merged.text, "merged").unwrap();
        let id = |n: &str| {
            p.identities
                .iter()
                .find(|i| i.name == n)
                .unwrap()
                .spiffe_id
                .clone()
        };
        assert_eq!(
            id("web").as_deref(),
            Some("spiffe://cluster.test/ns/shop/sa/web")
        );
        assert_eq!(
            id("db").as_deref(),
            Some("spiffe://cluster.test/ns/shop/sa/db.main")
        );
        // An explicit ID wins; an identity no mtls rule names is left as written.
        assert_eq!(id("own").as_deref(), Some("spiffe://other.test/own"));
        assert_eq!(id("plain"), None);

        // Without a trust domain there is no default: the mtls rule's object is refused.
        let merged = merge(&[ids, rules], &[], None);
        assert_eq!(merged.accepted, ["a-ids"]);
        assert!(
            merged.skipped[0].reason.contains("has no spiffeId"),
            "{:?}",
            merged.skipped
        );
    }

    #[test]
    fn a_selector_without_one_namespace_and_service_account_gives_no_spiffe_id() {
        let td = TrustDomain::parse("cluster.test").unwrap();
        for selector in [
            json!({"namespace": "shop", "matchLabels": {"app": "web"}}),
            json!({"namespaceSelector": {"matchLabels": {"team": "a"}}, "serviceAccount": "web"}),
        ] {
            let spec = json!({
                "identities": [
                    {"name": "web", "selector": selector},
                    {"name": "db", "selector": {"namespace": "shop", "serviceAccount": "db"}}
                ],
                "rules": [{"name": "r", "from": "web", "to": "db", "authentication": "mtls",
                           "ports": [{"port": 1, "protocol": "TCP"}]}]
            });
            let merged = merge(&[object("x", spec)], &[], Some(&td));
            assert_eq!(merged.skipped.len(), 1, "{selector}");
            assert!(
                merged.skipped[0]
                    .reason
                    .contains("\"web\" (from) has no spiffeId"),
                "{:?}",
                merged.skipped
            );
        }
    }

    #[test]
    fn a_default_spiffe_id_two_identities_would_share_never_pushes_out_their_object() {
        let td = TrustDomain::parse("cluster.test").unwrap();
        // Established: two identities of one service account (fine without mtls), and one
        // with an explicit ID equal to another's default.
        let base = object(
            "a-base",
            json!({"identities": [
                {"name": "web", "selector": {"namespace": "shop", "serviceAccount": "web",
                                             "matchLabels": {"track": "stable"}}},
                {"name": "canary", "selector": {"namespace": "shop", "serviceAccount": "web",
                                                "matchLabels": {"track": "canary"}}},
                {"name": "db", "selector": {"namespace": "shop", "serviceAccount": "db"}},
                {"name": "db-copy", "spiffeId": "spiffe://cluster.test/ns/shop/sa/db",
                 "cidrs": ["10.200.9.0/24"]}
            ]}),
        );
        for rules in [
            json!([{"name": "web-to-db", "from": "web", "to": "db-copy", "authentication": "mtls",
                    "ports": [{"port": 1, "protocol": "TCP"}]},
                   {"name": "canary-to-db", "from": "canary", "to": "db-copy",
                    "authentication": "mtls", "ports": [{"port": 1, "protocol": "TCP"}]}]),
            json!([{"name": "db-to-x", "from": "db", "to": "db-copy", "authentication": "mtls",
                    "ports": [{"port": 2, "protocol": "TCP"}]}]),
        ] {
            let newcomer = object("b-rules", json!({ "rules": rules }));
            let merged = merge(&[base.clone(), newcomer], &["a-base".to_owned()], Some(&td));
            assert_eq!(merged.accepted, ["a-base"], "{rules}");
            assert_eq!(merged.skipped.len(), 1);
            assert_eq!(merged.skipped[0].name, "b-rules");
            assert!(
                merged.skipped[0].reason.contains("has no spiffeId"),
                "{:?}",
                merged.skipped
            );
        }
    }
}
