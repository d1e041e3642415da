//! SPIFFE IDs and trust domains, parsed strictly as the SPIFFE ID specification requires.
//!
//! The parser is strict on purpose: a certificate whose URI SAN is "almost" a SPIFFE ID (upper
//! case, dot segments, percent-encoding) could be read differently by another implementation,
//! and two readings of one identity is how authorization bypasses start.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The scheme prefix every SPIFFE ID starts with; the spec requires it in lower case.
const SCHEME: &str = "spiffe://";
/// The spec's limit on the whole ID (a URI SAN longer than this is refused).
pub const MAX_ID_LEN: usize = 2048;
/// The spec's limit on the trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID (or a trust domain name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Empty input.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`] bytes.
    #[error("SPIFFE ID is {len} bytes long, more than the {MAX_ID_LEN} the spec allows")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// Does not start with `spiffe://` (scheme missing, another scheme, or not lower case).
    #[error("SPIFFE ID must start with \"spiffe://\" in lower case: {0:?}")]
    WrongScheme(String),
    /// `spiffe://` followed by nothing or by a `/`.
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    /// Trust domain longer than [`MAX_TRUST_DOMAIN_LEN`] bytes.
    #[error(
        "trust domain is {len} bytes long, more than the {MAX_TRUST_DOMAIN_LEN} the spec allows"
    )]
    TrustDomainTooLong {
        /// Length of the trust domain in bytes.
        len: usize,
    },
    /// A character outside `[a-z0-9.-_]` in the trust domain (upper case included).
    #[error("trust domain {trust_domain:?} has character {ch:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar {
        /// The trust domain as given.
        trust_domain: String,
        /// The first offending character.
        ch: char,
    },
    /// `host:port` in the authority.
    #[error("SPIFFE ID must not have a port in its trust domain")]
    Port,
    /// `user@host` in the authority.
    #[error("SPIFFE ID must not have user info in its trust domain")]
    UserInfo,
    /// `?query` present.
    #[error("SPIFFE ID must not have a query part")]
    Query,
    /// `#fragment` present.
    #[error("SPIFFE ID must not have a fragment")]
    Fragment,
    /// `//` inside the path.
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment, which URI normalisation would rewrite.
    #[error("SPIFFE ID path has a {0:?} segment; dot segments are not allowed")]
    DotSegment(String),
    /// A character outside `[A-Za-z0-9.-_]` in a path segment (percent-encoding included).
    #[error("SPIFFE ID path segment {segment:?} has character {ch:?}; only letters, digits, '.', '-' and '_' are allowed")]
    BadPathChar {
        /// The offending segment.
        segment: String,
        /// The first offending character.
        ch: char,
    },
    /// The path ends with `/`.
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
}

/// A SPIFFE trust domain name, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or takes the trust domain of a SPIFFE ID
    /// (`spiffe://example.org/...`).
    pub fn parse(s: &str) -> Result<TrustDomain, SpiffeIdError> {
        if s.starts_with(SCHEME) || s.contains("://") {
            return SpiffeId::parse(s).map(|id| id.trust_domain());
        }
        check_trust_domain(s)?;
        Ok(TrustDomain(s.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0),
            td_end: SCHEME.len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::parse(s)
    }
}

/// A SPIFFE ID, `spiffe://<trust domain>[/<path>]`, known to follow the spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    // Where the trust domain ends in `id`, so the parts need no reparsing.
    td_end: usize,
}

impl SpiffeId {
    /// Parses `s` per the SPIFFE ID specification; see [`SpiffeIdError`] for what is refused.
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(SpiffeIdError::WrongScheme(truncate(s, 64)));
        };
        // The fragment and query are refused before anything else so a `?` or `#` is named as
        // such rather than as a bad character.
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(SpiffeId {
            id: s.to_owned(),
            td_end: SCHEME.len() + td.len(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The trust domain name, without allocating.
    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.td_end]
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.td_end..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// The DNS name a client puts in the TLS SNI to ask the server for the SVID of `id`.
///
/// SNI only carries DNS names and a SPIFFE ID is not one, so the ID is hashed: lower-case hex of
/// the first 16 bytes of its SHA-256, under `spiffe.tollgate.invalid` (`.invalid` can never
/// resolve, so the name cannot be mistaken for a real host).
pub fn sni_name(id: &SpiffeId) -> String {
    let digest = Sha256::digest(id.as_str().as_bytes());
    let mut name = String::with_capacity(32 + 24);
    for b in &digest[..16] {
        name.push_str(&format!("{b:02x}"));
    }
    name.push_str(".spiffe.tollgate.invalid");
    name
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar {
            trust_domain: truncate(td, 64),
            ch,
        });
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/' (it was split there); the first element is the empty string before it.
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(SpiffeIdError::DotSegment((*seg).to_owned()));
        }
        if let Some(ch) = seg
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar {
                segment: truncate(seg, 64),
                ch,
            });
        }
    }
    Ok(())
}

/// Keeps error messages one line long even for hostile multi-kilobyte input.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_into_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/web");
        let bare: SpiffeId = "spiffe://a-b_c.9".parse().unwrap();
        assert_eq!(bare.path(), "");
        assert_eq!(bare.trust_domain_str(), "a-b_c.9");
        assert!(SpiffeId::parse("spiffe://td/A.b-C_9/x").is_ok());
    }

    #[test]
    fn each_kind_of_invalid_id_has_its_own_error() {
        use SpiffeIdError as E;
        type Case = (&'static str, fn(&E) -> bool);
        let cases: &[Case] = &[
            ("", |e| matches!(e, E::Empty)),
            ("https://example.org/x", |e| matches!(e, E::WrongScheme(_))),
            ("SPIFFE://example.org/x", |e| matches!(e, E::WrongScheme(_))),
            ("spiffe:/example.org", |e| matches!(e, E::WrongScheme(_))),
            ("spiffe://", |e| matches!(e, E::EmptyTrustDomain)),
            ("spiffe:///path", |e| matches!(e, E::EmptyTrustDomain)),
            ("spiffe://Example.org/x", |e| {
                matches!(e, E::BadTrustDomainChar { ch: 'E', .. })
            }),
            ("spiffe://exa%6dple.org", |e| {
                matches!(e, E::BadTrustDomainChar { ch: '%', .. })
            }),
            ("spiffe://example.org:443/x", |e| matches!(e, E::Port)),
            ("spiffe://user@example.org/x", |e| matches!(e, E::UserInfo)),
            ("spiffe://example.org/x?y=1", |e| matches!(e, E::Query)),
            ("spiffe://example.org/x#y", |e| matches!(e, E::Fragment)),
            ("spiffe://example.org/a//b", |e| {
                matches!(e, E::EmptySegment)
            }),
            ("spiffe://example.org/a/./b", |e| {
                matches!(e, E::DotSegment(_))
            }),
            ("spiffe://example.org/a/..", |e| {
                matches!(e, E::DotSegment(_))
            }),
            ("spiffe://example.org/a/b c", |e| {
                matches!(e, E::BadPathChar { ch: ' ', .. })
            }),
            ("spiffe://example.org/a%2fb", |e| {
                matches!(e, E::BadPathChar { ch: '%', .. })
            }),
            ("spiffe://example.org/", |e| matches!(e, E::TrailingSlash)),
            ("spiffe://example.org/a/", |e| matches!(e, E::TrailingSlash)),
        ];
        for (input, check) in cases {
            let err = SpiffeId::parse(input).expect_err(input);
            assert!(check(&err), "{input:?} gave {err:?}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn length_limits_apply_to_the_id_and_the_trust_domain() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(
            SpiffeId::parse(&long_path),
            Err(SpiffeIdError::TooLong {
                len: long_path.len()
            })
        );
        let exact = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - 12));
        assert_eq!(exact.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&exact).is_ok());
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
        ));
        assert!(SpiffeId::parse(&format!("spiffe://{}/x", "a".repeat(255))).is_ok());
    }

    #[test]
    fn trust_domain_parses_bare_names_and_ids() {
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::parse("spiffe://example.org/x")
                .unwrap()
                .as_str(),
            "example.org"
        );
        assert!(TrustDomain::parse("Example.org").is_err());
        assert!(TrustDomain::parse("").is_err());
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().id().as_str(),
            "spiffe://example.org"
        );
    }

    #[test]
    fn sni_name_is_a_stable_dns_label_per_id() {
        let a = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let b = SpiffeId::parse("spiffe://example.org/b").unwrap();
        let name = sni_name(&a);
        assert_eq!(name.len(), 32 + ".spiffe.tollgate.invalid".len());
        assert!(name.ends_with(".spiffe.tollgate.invalid"));
        assert!(name[..32]
            .chars()
            .all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(name, sni_name(&a.clone()));
        assert_ne!(name, sni_name(&b));
        assert!(rustls::pki_types::ServerName::try_from(name).is_ok());
    }
}
