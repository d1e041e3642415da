//! The SVID verifier both ends of an agent-to-agent handshake run, its rustls adapters and the
//! TLS 1.3-only configurations built on them.
//!
//! The SVID rules are checked with x509-parser before webpki builds the chain, so a refusal names
//! the precise reason (a CA used as a leaf, two URI SANs...) rather than a generic path error;
//! webpki's errors are then reclassified so an operator can tell "wrong CA" from "missing
//! intermediate" from "forged CA with a trusted name".

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::cache::{Accepted, ChainCache};
use super::spiffe::{sni_name, SpiffeId, SpiffeIdError};
use super::svid::{provider, Svid, TrustBundles};

/// The ALPN protocol both sides require, so a TLS endpoint of another kind is never mistaken
/// for an agent.
pub const ALPN: &[u8] = b"tollgate-auth/1";

/// Trust bundles shared with the verifiers; replacing the contents takes effect at the next
/// handshake.
pub type SharedBundles = Arc<RwLock<TrustBundles>>;

/// Which end of the handshake the certificate authenticates (checked against the extended key
/// usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a client.
    ClientAuth,
    /// The peer is a server.
    ServerAuth,
}

/// What a successful verification proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub id: SpiffeId,
    /// When the peer's certificate expires (a connection should not outlive it).
    pub not_after: SystemTime,
}

/// Why a peer's SVID was refused. Each variant is one distinct reason, so logs, metrics and
/// tests can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No certificate at all.
    #[error("no certificate presented: the peer must present an X.509 SVID")]
    NoCertificate,
    /// DER that cannot be parsed.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// A certificate of the chain has expired.
    #[error("certificate {subject} expired at {not_after}")]
    Expired {
        /// Who (SPIFFE ID or subject).
        subject: String,
        /// End of validity.
        not_after: String,
    },
    /// A certificate of the chain is not valid yet.
    #[error("certificate {subject} is not valid before {not_before}")]
    NotYetValid {
        /// Who (SPIFFE ID or subject).
        subject: String,
        /// Start of validity.
        not_before: String,
    },
    /// No bundle is held for the leaf's trust domain.
    #[error(
        "{id} belongs to trust domain {trust_domain}, which this agent has no trust bundle for"
    )]
    UnknownTrustDomain {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// Its trust domain.
        trust_domain: String,
    },
    /// The issuer's name is trusted but its signature does not verify: a CA that copied a
    /// trusted CA's name.
    #[error("{subject} names issuer {issuer}, a trusted name, but the signature does not verify with that CA's key (an unknown CA using a trusted CA's name?)")]
    UntrustedSignature {
        /// The certificate whose signature failed.
        subject: String,
        /// The issuer it claims.
        issuer: String,
    },
    /// The issuer is neither a bundle root nor a presented intermediate.
    #[error("the issuer {issuer} of {subject} is neither in the trust bundle nor among the presented intermediates")]
    IssuerNotFound {
        /// The certificate whose issuer is missing.
        subject: String,
        /// The missing issuer.
        issuer: String,
    },
    /// The leaf signed itself.
    #[error("{subject} is self-signed; an SVID must be issued by the trust domain's CA")]
    SelfSigned {
        /// Who.
        subject: String,
    },
    /// The leaf has basicConstraints cA=true.
    #[error("{subject} is a CA certificate, not a leaf SVID")]
    LeafIsCa {
        /// Who.
        subject: String,
    },
    /// The leaf may sign certificates.
    #[error("{subject} has the keyCertSign key usage, which a leaf SVID must not have")]
    KeyCertSign {
        /// Who.
        subject: String,
    },
    /// The leaf may sign CRLs.
    #[error("{subject} has the cRLSign key usage, which a leaf SVID must not have")]
    CrlSign {
        /// Who.
        subject: String,
    },
    /// More than one URI SAN, so the identity is ambiguous.
    #[error("{subject} has {count} URI SANs; an SVID has exactly one")]
    MultipleUriSans {
        /// Who.
        subject: String,
        /// How many.
        count: usize,
    },
    /// No URI SAN, so no identity.
    #[error("{subject} has no URI SAN, so no SPIFFE ID")]
    NoUriSan {
        /// Who.
        subject: String,
    },
    /// The URI SAN is not a `spiffe:` URI.
    #[error("the URI SAN {uri:?} is not a SPIFFE ID")]
    NotSpiffe {
        /// The URI as found.
        uri: String,
    },
    /// The URI SAN is a `spiffe:` URI the spec refuses.
    #[error("the URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(SpiffeIdError),
    /// A valid SVID, of another identity than the policy names.
    #[error("peer is {found}, expected {expected}")]
    UnexpectedId {
        /// What the policy names.
        expected: SpiffeId,
        /// What the peer proved.
        found: SpiffeId,
    },
    /// The handshake signature was not made with the certificate's key.
    #[error("the handshake was not signed with the key of {subject}'s certificate")]
    WrongKey {
        /// Who the certificate names.
        subject: String,
    },
    /// Any other chain failure webpki reports.
    #[error("certificate chain rejected: {0}")]
    Chain(String),
}

impl VerifyError {
    /// A short stable name for the reason, for metrics labels and structured logs.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no_certificate",
            VerifyError::Malformed(_) => "malformed",
            VerifyError::Expired { .. } => "expired",
            VerifyError::NotYetValid { .. } => "not_yet_valid",
            VerifyError::UnknownTrustDomain { .. } => "unknown_trust_domain",
            VerifyError::UntrustedSignature { .. } => "untrusted_signature",
            VerifyError::IssuerNotFound { .. } => "issuer_not_found",
            VerifyError::SelfSigned { .. } => "self_signed",
            VerifyError::LeafIsCa { .. } => "leaf_is_ca",
            VerifyError::KeyCertSign { .. } => "key_cert_sign",
            VerifyError::CrlSign { .. } => "crl_sign",
            VerifyError::MultipleUriSans { .. } => "multiple_uri_sans",
            VerifyError::NoUriSan { .. } => "no_uri_san",
            VerifyError::NotSpiffe { .. } => "not_spiffe",
            VerifyError::InvalidSpiffeId(_) => "invalid_spiffe_id",
            VerifyError::UnexpectedId { .. } => "unexpected_id",
            VerifyError::WrongKey { .. } => "wrong_key",
            VerifyError::Chain(_) => "chain",
        }
    }
}

/// What the SVID rules learnt about a leaf.
pub(crate) struct LeafFacts {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Verifies a peer's chain (leaf first, then the intermediates it presented) as an X.509 SVID
/// against the bundle of the leaf's trust domain. A chain these bundles accepted before is
/// answered from their cache (see [`super::cache`]) while every certificate of it is valid.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    usage: Usage,
) -> Result<VerifiedSvid, VerifyError> {
    if !bundles.caches_chains() {
        return verify_svid_uncached(chain, bundles, now, usage);
    }
    let key = ChainCache::key(chain, usage);
    if let Some(hit) = bundles.chains().get(&key, now) {
        return Ok(hit);
    }
    let verified = verify_svid_uncached(chain, bundles, now, usage)?;
    // Accepted: every certificate parsed, so the validity window can be read.
    let mut valid_from = i64::MIN;
    let mut valid_until = i64::MAX;
    for cert in chain {
        let validity = parse(cert)?.validity().clone();
        valid_from = valid_from.max(validity.not_before.timestamp());
        valid_until = valid_until.min(validity.not_after.timestamp());
    }
    bundles.chains().put(
        key,
        Accepted {
            id: verified.id.clone(),
            leaf_not_after: verified.not_after,
            valid_from,
            valid_until,
        },
    );
    Ok(verified)
}

/// [`verify_svid`] without the cache: the whole path validation and the SVID rules.
pub fn verify_svid_uncached(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    now: UnixTime,
    usage: Usage,
) -> Result<VerifiedSvid, VerifyError> {
    let leaf_der = chain.first().ok_or(VerifyError::NoCertificate)?;
    let leaf = parse(leaf_der)?;
    let facts = svid_rules(&leaf)?;
    let intermediates = chain[1..]
        .iter()
        .map(|c| parse(c))
        .collect::<Result<Vec<_>, _>>()?;

    check_time(&leaf, &facts.id.to_string(), now)?;

    let bundle = bundles
        .get_str(facts.id.trust_domain_str())
        .ok_or_else(|| VerifyError::UnknownTrustDomain {
            trust_domain: facts.id.trust_domain_str().to_owned(),
            id: facts.id.clone(),
        })?;
    let anchors: Vec<_> = bundle
        .roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    let ee = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| VerifyError::Malformed(format!("{e:?}")))?;
    let eku = match usage {
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
    };
    let presented = &chain[1..];
    match ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        presented,
        now,
        eku,
        None,
        None,
    ) {
        Ok(_) => Ok(VerifiedSvid {
            id: facts.id,
            not_after: facts.not_after,
        }),
        Err(e) => Err(classify_chain_error(
            e,
            leaf_der,
            &leaf,
            &intermediates,
            &bundle.roots,
            now,
            usage,
        )),
    }
}

/// What a chain that the handshake's verifier (one of the rustls verifiers here) has already
/// accepted proves: the leaf's SPIFFE ID, and until when the whole chain is valid (the earliest
/// expiry of the leaf and the intermediates it came with). Reads the certificates only: the
/// path was validated during the handshake, and doing it again cost a fifth of a server's CPU
/// per handshake (docs/benchmarks.md).
pub fn accepted_chain(chain: &[CertificateDer<'_>]) -> Result<VerifiedSvid, VerifyError> {
    let leaf = parse(chain.first().ok_or(VerifyError::NoCertificate)?)?;
    let facts = svid_rules(&leaf)?;
    let mut not_after = facts.not_after;
    for c in &chain[1..] {
        not_after = not_after.min(system_time(parse(c)?.validity().not_after.timestamp()));
    }
    Ok(VerifiedSvid {
        id: facts.id,
        not_after,
    })
}

/// Checks that a verified peer is the identity the policy names.
pub fn expect(v: &VerifiedSvid, expected: &SpiffeId) -> Result<(), VerifyError> {
    if &v.id == expected {
        Ok(())
    } else {
        Err(VerifyError::UnexpectedId {
            expected: expected.clone(),
            found: v.id.clone(),
        })
    }
}

/// The SVID rules on a leaf without time or chain: used when loading our own SVIDs, so an agent
/// never presents something its peers would refuse.
pub(crate) fn check_svid_leaf(der: &CertificateDer<'_>) -> Result<LeafFacts, VerifyError> {
    svid_rules(&parse(der)?)
}

/// Whether a DER certificate is a CA certificate (basicConstraints cA=true).
pub(crate) fn is_ca_cert(der: &CertificateDer<'_>) -> bool {
    parse(der).map(|c| c.is_ca()).unwrap_or(false)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, VerifyError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(VerifyError::Malformed(format!(
            "{} bytes after the certificate",
            rest.len()
        ))),
        Err(e) => Err(VerifyError::Malformed(e.to_string())),
    }
}

/// How to name a certificate in a message: its URI SAN when it has one (an SVID's subject is
/// often empty), else its subject.
fn subject_of(cert: &X509Certificate<'_>) -> String {
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        if let Some(uri) = san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        }) {
            return uri.chars().take(128).collect();
        }
    }
    let s = cert.subject().to_string();
    if s.is_empty() {
        "(empty subject)".to_owned()
    } else {
        s
    }
}

fn svid_rules(cert: &X509Certificate<'_>) -> Result<LeafFacts, VerifyError> {
    let subject = subject_of(cert);
    let bc = cert
        .basic_constraints()
        .map_err(|e| VerifyError::Malformed(format!("basicConstraints of {subject}: {e}")))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(VerifyError::LeafIsCa { subject });
    }
    let ku = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed(format!("keyUsage of {subject}: {e}")))?;
    if let Some(ku) = ku {
        if ku.value.key_cert_sign() {
            return Err(VerifyError::KeyCertSign { subject });
        }
        if ku.value.crl_sign() {
            return Err(VerifyError::CrlSign { subject });
        }
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Malformed(format!("subjectAltName of {subject}: {e}")))?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(VerifyError::NoUriSan { subject }),
        [uri] => *uri,
        many => {
            return Err(VerifyError::MultipleUriSans {
                subject,
                count: many.len(),
            })
        }
    };
    // The scheme is compared without case so "SPIFFE://..." is called an invalid SPIFFE ID
    // (which it is) rather than "not SPIFFE".
    let is_spiffe = uri
        .split_once(':')
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"));
    if !is_spiffe {
        return Err(VerifyError::NotSpiffe {
            uri: uri.chars().take(128).collect(),
        });
    }
    let id = SpiffeId::parse(uri).map_err(VerifyError::InvalidSpiffeId)?;
    let validity = cert.validity();
    Ok(LeafFacts {
        id,
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
    })
}

fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

fn check_time(cert: &X509Certificate<'_>, who: &str, now: UnixTime) -> Result<(), VerifyError> {
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(VerifyError::NotYetValid {
            subject: who.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(VerifyError::Expired {
            subject: who.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    Ok(())
}

/// Turns webpki's error into the most precise reason, looking at the names in the chain.
fn classify_chain_error(
    err: webpki::Error,
    leaf_der: &CertificateDer<'_>,
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    roots: &[CertificateDer<'static>],
    now: UnixTime,
    usage: Usage,
) -> VerifyError {
    use webpki::Error as W;
    match err {
        W::UnknownIssuer | W::InvalidSignatureForPublicKey => {}
        W::CertExpired { .. } | W::CertNotValidYet { .. } => {
            // The leaf's own time was checked already, so this is an intermediate.
            for cert in intermediates {
                if let Err(e) = check_time(cert, &subject_of(cert), now) {
                    return e;
                }
            }
            return VerifyError::Chain(format!("{err:?}"));
        }
        W::CaUsedAsEndEntity => {
            return VerifyError::LeafIsCa {
                subject: subject_of(leaf),
            }
        }
        W::BadDer | W::BadDerTime | W::TrailingData(_) => {
            return VerifyError::Malformed(format!("{err:?}"))
        }
        W::RequiredEkuNotFoundContext(_) => {
            let want = match usage {
                Usage::ClientAuth => "client",
                Usage::ServerAuth => "server",
            };
            return VerifyError::Chain(format!(
                "{} is not valid for TLS {want} authentication (extended key usage)",
                subject_of(leaf)
            ));
        }
        other => return VerifyError::Chain(format!("{other:?}")),
    }

    if leaf.issuer().as_raw() == leaf.subject().as_raw() && signs_itself(leaf_der, now, usage) {
        return VerifyError::SelfSigned {
            subject: subject_of(leaf),
        };
    }

    let root_subjects: Vec<Vec<u8>> = roots
        .iter()
        .filter_map(|r| {
            x509_parser::parse_x509_certificate(r)
                .ok()
                .map(|(_, c)| c.subject().as_raw().to_vec())
        })
        .collect();
    // Follow issuer names through the presented intermediates to the last certificate whose
    // issuer is not presented; whether that issuer's name is trusted tells a forged signature
    // from a missing link.
    let mut current = leaf;
    for _ in 0..=intermediates.len() {
        let issuer = current.issuer().as_raw();
        if root_subjects.iter().any(|s| s.as_slice() == issuer) {
            return VerifyError::UntrustedSignature {
                subject: subject_of(current),
                issuer: current.issuer().to_string(),
            };
        }
        match intermediates
            .iter()
            .find(|i| i.subject().as_raw() == issuer && !std::ptr::eq(*i, current))
        {
            Some(next) => current = next,
            None => {
                return VerifyError::IssuerNotFound {
                    subject: subject_of(current),
                    issuer: current.issuer().to_string(),
                }
            }
        }
    }
    // A loop among the presented intermediates never reaches a root.
    VerifyError::IssuerNotFound {
        subject: subject_of(current),
        issuer: current.issuer().to_string(),
    }
}

/// Whether the certificate's signature verifies with its own key: webpki is asked to verify it
/// with itself as the only anchor.
fn signs_itself(der: &CertificateDer<'_>, now: UnixTime, usage: Usage) -> bool {
    let Ok(anchor) = webpki::anchor_from_trusted_cert(der) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let eku = match usage {
        Usage::ClientAuth => webpki::KeyUsage::client_auth(),
        Usage::ServerAuth => webpki::KeyUsage::server_auth(),
    };
    let anchors = [anchor];
    match ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        now,
        eku,
        None,
        None,
    ) {
        Ok(_) => true,
        Err(e) => !matches!(
            e,
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey
        ),
    }
}

/// Wraps a reason so it travels through rustls and can be recovered with [`reason_of`].
pub fn to_rustls(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The verifier's reason inside a rustls error, if it carries one.
pub fn reason_of(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

/// Like [`reason_of`], but also names rustls' own refusal of a client that sent no certificate
/// (rustls stops before asking the verifier), so every handshake failure about the peer's
/// identity maps to one reason.
pub fn handshake_reason(err: &rustls::Error) -> Option<VerifyError> {
    match err {
        rustls::Error::NoCertificatesPresented => Some(VerifyError::NoCertificate),
        other => reason_of(other).cloned(),
    }
}

/// The verifier's reason inside an I/O error from tokio-rustls, if any.
pub fn io_reason(err: &std::io::Error) -> Option<VerifyError> {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(handshake_reason)
}

fn read_bundles(bundles: &SharedBundles) -> std::sync::RwLockReadGuard<'_, TrustBundles> {
    // A panic while replacing bundles leaves either the old or the new set, both complete.
    bundles.read().unwrap_or_else(|p| p.into_inner())
}

/// Verifies the CertificateVerify signature, calling a bad one [`VerifyError::WrongKey`]: the
/// peer presented a certificate whose private key it does not hold.
fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, algs).map_err(|e| match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            let subject = check_svid_leaf(cert)
                .map(|f| f.id.to_string())
                .unwrap_or_else(|_| "the peer".to_owned());
            to_rustls(VerifyError::WrongKey { subject })
        }
        other => other,
    })
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is refused: agents authenticate with TLS 1.3 only".into())
}

/// Verifies client SVIDs on the server side; a client certificate is mandatory.
pub struct SpiffeClientVerifier {
    bundles: SharedBundles,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// A verifier reading `bundles` at each handshake.
    pub fn new(bundles: SharedBundles) -> SpiffeClientVerifier {
        SpiffeClientVerifier {
            bundles,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would list our CAs to anyone who connects, and a client has one SVID anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        verify_svid(&chain, &read_bundles(&self.bundles), now, Usage::ClientAuth)
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured; refusing here keeps that true even if a config is built
        // by hand with TLS 1.2 enabled.
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a server's SVID on the client side and that it is the expected identity.
pub struct SpiffeServerVerifier {
    expected: SpiffeId,
    bundles: SharedBundles,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier accepting only `expected`, reading `bundles` at each handshake.
    pub fn new(expected: SpiffeId, bundles: SharedBundles) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            expected,
            bundles,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected.as_str())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server name is only the SNI hash of the expected ID; the ID itself is checked.
        let chain = chain_of(end_entity, intermediates);
        verify_svid(&chain, &read_bundles(&self.bundles), now, Usage::ServerAuth)
            .and_then(|v| expect(&v, &self.expected))
            .map(|()| ServerCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn chain_of<'a>(
    end_entity: &'a CertificateDer<'_>,
    intermediates: &'a [CertificateDer<'_>],
) -> Vec<CertificateDer<'a>> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect()
}

/// Picks the SVID a server presents from the SNI the client sent ([`sni_name`] of the ID it
/// expects); an unknown or missing SNI gets no certificate, which ends the handshake.
pub struct SvidResolver {
    by_sni: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl SvidResolver {
    /// A resolver serving `svids`.
    pub fn new(svids: &[Svid]) -> SvidResolver {
        let resolver = SvidResolver {
            by_sni: RwLock::new(HashMap::new()),
        };
        resolver.replace(svids);
        resolver
    }

    /// Replaces the whole table (after a rotation); handshakes already past certificate
    /// selection keep the SVID they picked.
    pub fn replace(&self, svids: &[Svid]) {
        let table = svids
            .iter()
            .map(|s| (sni_name(&s.id), s.certified_key()))
            .collect();
        *self.by_sni.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// How many SVIDs are served.
    pub fn len(&self) -> usize {
        self.by_sni.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no SVID is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for SvidResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidResolver")
            .field("svids", &self.len())
            .finish()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name()?;
        let found = self
            .by_sni
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sni)
            .cloned();
        if found.is_none() {
            tracing::debug!(sni, "no SVID for the SNI the client asked for");
        }
        found
    }
}

/// Presents one fixed SVID as the client certificate, whatever CAs the server hints at.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn with_tls13<S: rustls::ConfigSide>(
    builder: rustls::ConfigBuilder<S, rustls::WantsVersions>,
) -> rustls::ConfigBuilder<S, rustls::WantsVerifier> {
    builder
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
}

/// The server side: TLS 1.3 only, ring, SVID chosen by SNI, client SVID mandatory.
pub fn server_config(resolver: Arc<SvidResolver>, bundles: SharedBundles) -> Arc<ServerConfig> {
    let mut config = with_tls13(ServerConfig::builder_with_provider(provider()))
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(bundles)))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every handshake presents and verifies both certificates in full (a
    // resumed one skips CertificateVerify), and no ticket is minted for nothing.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Arc::new(config)
}

/// The client side: TLS 1.3 only, ring, presents `svid`, accepts only `expected_server`.
/// Connect with [`server_name`] of `expected_server` so the server picks the right SVID.
pub fn client_config(
    svid: &Svid,
    expected_server: SpiffeId,
    bundles: SharedBundles,
) -> Arc<ClientConfig> {
    client_config_with_key(svid.certified_key(), expected_server, bundles)
}

/// [`client_config`] from an already-built chain and signer.
pub(crate) fn client_config_with_key(
    certified: Arc<CertifiedKey>,
    expected_server: SpiffeId,
    bundles: SharedBundles,
) -> Arc<ClientConfig> {
    let mut config = with_tls13(ClientConfig::builder_with_provider(provider()))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            expected_server,
            bundles,
        )))
        .with_client_cert_resolver(Arc::new(FixedClientCert(certified)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The TLS server name to connect with when expecting `id` (its [`sni_name`]).
pub fn server_name(id: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(sni_name(id)).expect("32 hex digits under a fixed suffix is a DNS name")
}
