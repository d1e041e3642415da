//! The policy file as written: serde structs that mirror the YAML one to one, before any
//! validation. Every field is optional here so that a missing field is reported by validation
//! with the field path and line, in the same style as every other error; unknown fields are
//! rejected by serde itself (`deny_unknown_fields`).
//!
//! A policy can have 100k rules, all of them held here until validated, so rules and ports
//! are stored compactly: `Box<str>` and `Box<[T]>` are a third smaller than `String` and `Vec`,
//! and carry no spare capacity (a `Vec` filled one element at a time keeps room for four).
//!
//! Rate numbers are read as `i64`, wider than the `u64` they become, so that `-5` gets
//! validation's message rather than serde's type error.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Document {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub metadata: Option<Metadata>,
    pub spec: Option<Spec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Metadata {
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Spec {
    pub mode: Option<String>,
    pub log: Option<bool>,
    pub identities: Option<Vec<IdentityEntry>>,
    pub rules: Option<Box<[RuleEntry]>>,
    pub rate_limits: Option<Vec<QuotaEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct IdentityEntry {
    pub name: Option<String>,
    pub spiffe_id: Option<String>,
    /// File mode: where the agent of the node hosting this identity listens for mutual-TLS
    /// handshakes (`host:port`).
    pub auth_address: Option<String>,
    pub cidrs: Option<Vec<String>>,
    pub interfaces: Option<Vec<String>>,
    /// Kubernetes mode: the identity's addresses are those of the pods this selects.
    pub selector: Option<SelectorEntry>,
}

/// An identity's `selector`, as Kubernetes writes its selectors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct SelectorEntry {
    pub namespace: Option<String>,
    pub namespace_selector: Option<LabelSelectorEntry>,
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<ExpressionEntry>>,
    pub service_account: Option<String>,
}

/// `namespaceSelector`: a Kubernetes `LabelSelector`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LabelSelectorEntry {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<ExpressionEntry>>,
}

/// One of `matchExpressions`: `{key, operator, values}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ExpressionEntry {
    pub key: Option<String>,
    pub operator: Option<String>,
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RuleEntry {
    pub name: Option<Box<str>>,
    pub from: Option<Box<str>>,
    pub to: Option<Box<str>>,
    pub ports: Option<Box<[PortEntry]>>,
    pub mode: Option<Box<str>>,
    pub log: Option<bool>,
    pub expires: Option<Box<str>>,
    pub authentication: Option<Box<str>>,
    /// `Some(None)`: written as null or left empty, which is an error, not "no limit". Boxed:
    /// a 100k-rule policy mostly has none, and eight numbers inline would double every entry.
    #[serde(default, deserialize_with = "written")]
    pub rate_limit: Option<Option<Box<RateLimitEntry>>>,
}

/// A rule's `rateLimit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RateLimitEntry {
    pub packets_per_second: Option<i64>,
    pub packets_per_minute: Option<i64>,
    pub bytes_per_second: Option<i64>,
    pub bytes_per_minute: Option<i64>,
    pub connections_per_second: Option<i64>,
    pub connections_per_minute: Option<i64>,
    pub burst: Option<i64>,
    pub burst_bytes: Option<i64>,
}

/// An entry of `spec.rateLimits`: the fields of [`RateLimitEntry`] and whose quota it is.
/// Written out rather than `#[serde(flatten)]`, which cannot deny unknown fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct QuotaEntry {
    pub identity: Option<String>,
    pub mode: Option<String>,
    pub packets_per_second: Option<i64>,
    pub packets_per_minute: Option<i64>,
    pub bytes_per_second: Option<i64>,
    pub bytes_per_minute: Option<i64>,
    pub connections_per_second: Option<i64>,
    pub connections_per_minute: Option<i64>,
    pub burst: Option<i64>,
    pub burst_bytes: Option<i64>,
}

impl QuotaEntry {
    /// (identity, mode, rates).
    pub fn split(self) -> (Option<String>, Option<String>, RateLimitEntry) {
        let rates = RateLimitEntry {
            packets_per_second: self.packets_per_second,
            packets_per_minute: self.packets_per_minute,
            bytes_per_second: self.bytes_per_second,
            bytes_per_minute: self.bytes_per_minute,
            connections_per_second: self.connections_per_second,
            connections_per_minute: self.connections_per_minute,
            burst: self.burst,
            burst_bytes: self.burst_bytes,
        };
        (self.identity, self.mode, rates)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PortEntry {
    pub protocol: Option<Box<str>>,
    // Wider than u16 so that 0 and 70000 get our range message rather than serde's type error.
    pub port: Option<i64>,
    pub end_port: Option<i64>,
}

/// An optional field that tells "written as null" (`Some(None)`) from "not written" (`None`,
/// with `#[serde(default)]`).
fn written<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}
