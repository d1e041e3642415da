//! The policy file as written: serde structs that mirror the YAML one to one, before any
//! validation. Every field is optional here so that a missing field is reported by validation
//! with the field path and line, in the same style as every other error; unknown fields are
//! rejected by serde itself (`deny_unknown_fields`).
//!
//! A policy can have 100k rules, all of them held here until validated, so rules and ports
//! are stored compactly: `Box<str>` and `Box<[T]>` are a third smaller than `String` and `Vec`,
//! and carry no spare capacity (a `Vec` filled one element at a time keeps room for four).
//!
//! Fields this version parses but refuses (`rateLimits`, `rateLimit`, `authentication`) are
//! kept as [`Present`] markers: they must be known field names, so the user is told they are not
//! supported yet instead of "unknown field", and their content is never looked at.

use serde::{de::IgnoredAny, Deserialize, Deserializer};

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
    pub identities: Option<Vec<IdentityEntry>>,
    pub rules: Option<Box<[RuleEntry]>>,
    #[serde(default, deserialize_with = "present")]
    pub rate_limits: Option<Present>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct IdentityEntry {
    pub name: Option<String>,
    pub spiffe_id: Option<String>,
    pub cidrs: Option<Vec<String>>,
    pub interfaces: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RuleEntry {
    pub name: Option<Box<str>>,
    pub from: Option<Box<str>>,
    pub to: Option<Box<str>>,
    pub ports: Option<Box<[PortEntry]>>,
    pub mode: Option<Box<str>>,
    pub expires: Option<Box<str>>,
    #[serde(default, deserialize_with = "present")]
    pub authentication: Option<Present>,
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Present>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PortEntry {
    pub protocol: Option<Box<str>>,
    // Wider than u16 so that 0 and 70000 get our range message rather than serde's type error.
    pub port: Option<i64>,
    pub end_port: Option<i64>,
}

/// A field that was written, whatever its value (even `null` or `[]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Present;

fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Present>, D::Error> {
    IgnoredAny::deserialize(deserializer)?;
    Ok(Some(Present))
}
