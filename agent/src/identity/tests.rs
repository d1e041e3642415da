//! Tests of the verifier (negative certificates made with rcgen, real TLS 1.3 handshakes over
//! tokio duplex pipes), the SVID loader, the directory source and the development CA.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::ca::{self, DevCa};
use super::cache::ChainCache;
use super::source::{follow, DirectorySource, FileNames, Loaded, SvidSource};
use super::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
use super::svid::{provider, Svid, SvidError, TrustBundle, TrustBundles};
use super::verify::{
    self, client_config, expect, io_reason, server_config, server_name, verify_svid, SharedBundles,
    SvidResolver, Usage, VerifiedSvid, VerifyError, ALPN,
};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn root() -> DevCa {
    DevCa::init(td(), DAY).unwrap()
}

fn bundles_of(ca: &DevCa) -> TrustBundles {
    [TrustBundle::from_der(ca.trust_domain().clone(), vec![ca.cert_der().clone()]).unwrap()]
        .into_iter()
        .collect()
}

fn shared(b: TrustBundles) -> SharedBundles {
    Arc::new(RwLock::new(b))
}

/// What the development CA issues, as parameters a test can then spoil.
fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let now = SystemTime::now();
    ca::set_validity(&mut p, now - HOUR, now + HOUR).unwrap();
    p
}

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn signed(ca: &DevCa, p: &CertificateParams) -> CertificateDer<'static> {
    ca.sign(p, &key()).unwrap()
}

fn now() -> UnixTime {
    UnixTime::now()
}

/// Verifies `chain` as a client SVID against `ca`'s bundle.
fn check_with(ca: &DevCa, chain: &[CertificateDer<'_>]) -> Result<VerifiedSvid, VerifyError> {
    verify_svid(chain, &bundles_of(ca), now(), Usage::ClientAuth)
}

/// A leaf from `p` signed by a fresh root, verified against that root.
fn check_leaf(p: &CertificateParams) -> VerifyError {
    let ca = root();
    check_with(&ca, &[signed(&ca, p)]).expect_err("the certificate must be refused")
}

const GOOD: &str = "spiffe://example.org/agent/node-1";

// ---- negative certificates, one builder per reason ----

fn expired() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    let now = SystemTime::now();
    ca::set_validity(&mut p, now - 2 * HOUR, now - HOUR).unwrap();
    check_leaf(&p)
}

fn not_yet_valid() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    let now = SystemTime::now();
    ca::set_validity(&mut p, now + HOUR, now + 2 * HOUR).unwrap();
    check_leaf(&p)
}

fn wrong_trust_domain() -> VerifyError {
    // Signed by the trusted CA, but naming a trust domain this agent holds no bundle for.
    check_leaf(&leaf_params(&["spiffe://other.org/agent/node-1"]))
}

fn unknown_ca_with_trusted_name() -> VerifyError {
    let trusted = root();
    let impostor = root(); // same name, another key
    let leaf = signed(&impostor, &leaf_params(&[GOOD]));
    check_with(&trusted, &[leaf]).unwrap_err()
}

fn leaf_is_ca() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    check_leaf(&p)
}

fn key_cert_sign() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    check_leaf(&p)
}

fn crl_sign() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    p.key_usages.push(KeyUsagePurpose::CrlSign);
    check_leaf(&p)
}

fn two_uri_sans() -> VerifyError {
    check_leaf(&leaf_params(&[GOOD, "spiffe://example.org/agent/node-2"]))
}

fn no_uri_san() -> VerifyError {
    let mut p = leaf_params(&[]);
    p.subject_alt_names = vec![SanType::DnsName("node-1.example.org".try_into().unwrap())];
    check_leaf(&p)
}

fn not_spiffe_scheme() -> VerifyError {
    check_leaf(&leaf_params(&["https://example.org/agent/node-1"]))
}

fn dot_segment() -> VerifyError {
    check_leaf(&leaf_params(&["spiffe://example.org/agent/../admin"]))
}

fn bad_path_character() -> VerifyError {
    check_leaf(&leaf_params(&["spiffe://example.org/agent/node$1"]))
}

fn too_long() -> VerifyError {
    let uri = format!("spiffe://example.org/{}", "a".repeat(2100));
    check_leaf(&leaf_params(&[&uri]))
}

fn uppercase_trust_domain() -> VerifyError {
    check_leaf(&leaf_params(&["spiffe://Example.org/agent/node-1"]))
}

fn empty_segment() -> VerifyError {
    check_leaf(&leaf_params(&["spiffe://example.org/a//b"]))
}

fn another_identity() -> VerifyError {
    let ca = root();
    let v = check_with(&ca, &[signed(&ca, &leaf_params(&[GOOD]))]).unwrap();
    expect(&v, &id("spiffe://example.org/agent/node-2")).unwrap_err()
}

fn empty_chain() -> VerifyError {
    check_with(&root(), &[]).unwrap_err()
}

fn self_signed() -> VerifyError {
    let mut p = leaf_params(&[GOOD]);
    // Self-issued: the same (non-empty) name as subject and issuer.
    p.distinguished_name
        .push(DnType::CommonName, "Tollgate development CA example.org");
    let k = key();
    let leaf = p.self_signed(&k).unwrap().der().clone();
    check_with(&root(), &[leaf]).unwrap_err()
}

fn missing_intermediate() -> VerifyError {
    let ca = root();
    let int = ca.intermediate("Tollgate intermediate", DAY).unwrap();
    let leaf = signed(&int, &leaf_params(&[GOOD]));
    check_with(&ca, &[leaf]).unwrap_err()
}

fn malformed_der() -> VerifyError {
    check_with(
        &root(),
        &[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])],
    )
    .unwrap_err()
}

// ---- one test per reason ----

macro_rules! refused_as {
    ($name:ident, $case:ident, $pat:pat) => {
        #[test]
        fn $name() {
            let err = $case();
            assert!(matches!(err, $pat), "got {err:?}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    };
}

refused_as!(
    expired_leaf_is_expired,
    expired,
    VerifyError::Expired { .. }
);
refused_as!(
    future_leaf_is_not_yet_valid,
    not_yet_valid,
    VerifyError::NotYetValid { .. }
);
refused_as!(
    leaf_of_another_trust_domain_is_unknown_trust_domain,
    wrong_trust_domain,
    VerifyError::UnknownTrustDomain { .. }
);
refused_as!(
    leaf_of_ca_copying_the_trusted_name_is_untrusted_signature,
    unknown_ca_with_trusted_name,
    VerifyError::UntrustedSignature { .. }
);
refused_as!(
    ca_as_leaf_is_leaf_is_ca,
    leaf_is_ca,
    VerifyError::LeafIsCa { .. }
);
refused_as!(
    leaf_with_key_cert_sign_is_refused,
    key_cert_sign,
    VerifyError::KeyCertSign { .. }
);
refused_as!(
    leaf_with_crl_sign_is_refused,
    crl_sign,
    VerifyError::CrlSign { .. }
);
refused_as!(
    two_uri_sans_are_multiple_uri_sans,
    two_uri_sans,
    VerifyError::MultipleUriSans { count: 2, .. }
);
refused_as!(
    dns_san_only_is_no_uri_san,
    no_uri_san,
    VerifyError::NoUriSan { .. }
);
refused_as!(
    https_uri_san_is_not_spiffe,
    not_spiffe_scheme,
    VerifyError::NotSpiffe { .. }
);
refused_as!(
    dot_segment_is_invalid_spiffe_id,
    dot_segment,
    VerifyError::InvalidSpiffeId(SpiffeIdError::DotSegment(_))
);
refused_as!(
    bad_path_character_is_invalid_spiffe_id,
    bad_path_character,
    VerifyError::InvalidSpiffeId(SpiffeIdError::BadPathChar { ch: '$', .. })
);
refused_as!(
    overlong_id_is_invalid_spiffe_id,
    too_long,
    VerifyError::InvalidSpiffeId(SpiffeIdError::TooLong { .. })
);
refused_as!(
    uppercase_trust_domain_is_invalid_spiffe_id,
    uppercase_trust_domain,
    VerifyError::InvalidSpiffeId(SpiffeIdError::BadTrustDomainChar { ch: 'E', .. })
);
refused_as!(
    empty_path_segment_is_invalid_spiffe_id,
    empty_segment,
    VerifyError::InvalidSpiffeId(SpiffeIdError::EmptySegment)
);
refused_as!(
    valid_svid_of_another_identity_is_unexpected_id,
    another_identity,
    VerifyError::UnexpectedId { .. }
);
refused_as!(
    empty_chain_is_no_certificate,
    empty_chain,
    VerifyError::NoCertificate
);
refused_as!(
    self_signed_leaf_is_self_signed,
    self_signed,
    VerifyError::SelfSigned { .. }
);
refused_as!(
    leaf_without_its_intermediate_is_issuer_not_found,
    missing_intermediate,
    VerifyError::IssuerNotFound { .. }
);
refused_as!(
    garbage_der_is_malformed,
    malformed_der,
    VerifyError::Malformed(_)
);

#[test]
fn trailing_bytes_after_the_certificate_are_malformed() {
    let ca = root();
    let mut der = signed(&ca, &leaf_params(&[GOOD])).to_vec();
    der.push(0);
    let err = check_with(&ca, &[CertificateDer::from(der)]).unwrap_err();
    assert!(matches!(err, VerifyError::Malformed(_)), "{err:?}");
}

#[test]
fn leaf_without_any_san_extension_is_no_uri_san() {
    assert!(matches!(
        check_leaf(&leaf_params(&[])),
        VerifyError::NoUriSan { .. }
    ));
}

#[test]
fn port_in_trust_domain_is_invalid_spiffe_id() {
    assert!(matches!(
        check_leaf(&leaf_params(&["spiffe://example.org:8443/x"])),
        VerifyError::InvalidSpiffeId(SpiffeIdError::Port)
    ));
}

#[test]
fn server_only_leaf_is_refused_as_client() {
    let ca = root();
    let mut p = leaf_params(&[GOOD]);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = signed(&ca, &p);
    assert!(verify_svid(
        std::slice::from_ref(&leaf),
        &bundles_of(&ca),
        now(),
        Usage::ServerAuth
    )
    .is_ok());
    let err = check_with(&ca, &[leaf]).unwrap_err();
    assert!(
        matches!(err, VerifyError::Chain(ref m) if m.contains("client")),
        "{err:?}"
    );
}

#[test]
fn expired_intermediate_is_expired() {
    let ca = root();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "Tollgate intermediate");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let now = SystemTime::now();
    ca::set_validity(&mut p, now - 2 * HOUR, now - HOUR).unwrap();
    let int_key = key();
    let int_cert = ca.sign(&p, &int_key).unwrap();
    let issuer = rcgen::Issuer::new(p, int_key);
    let leaf = leaf_params(&[GOOD])
        .signed_by(&key(), &issuer)
        .unwrap()
        .der()
        .clone();
    let err = check_with(&ca, &[leaf, int_cert]).unwrap_err();
    assert!(
        matches!(err, VerifyError::Expired { ref subject, .. } if subject.contains("intermediate")),
        "{err:?}"
    );
}

#[test]
fn verify_error_codes_are_unique() {
    let samples = [
        VerifyError::NoCertificate,
        VerifyError::Malformed(String::new()),
        expired(),
        not_yet_valid(),
        wrong_trust_domain(),
        unknown_ca_with_trusted_name(),
        missing_intermediate(),
        self_signed(),
        leaf_is_ca(),
        key_cert_sign(),
        crl_sign(),
        two_uri_sans(),
        no_uri_san(),
        not_spiffe_scheme(),
        dot_segment(),
        another_identity(),
        VerifyError::WrongKey {
            subject: String::new(),
        },
        VerifyError::Chain(String::new()),
    ];
    let codes: HashSet<_> = samples.iter().map(VerifyError::code).collect();
    assert_eq!(codes.len(), samples.len());
}

// ---- positives ----

#[test]
fn valid_leaf_directly_under_the_root_is_accepted() {
    let ca = root();
    let leaf = signed(&ca, &leaf_params(&[GOOD]));
    for usage in [Usage::ClientAuth, Usage::ServerAuth] {
        let v = verify_svid(std::slice::from_ref(&leaf), &bundles_of(&ca), now(), usage).unwrap();
        assert_eq!(v.id, id(GOOD));
        assert!(v.not_after > SystemTime::now());
        expect(&v, &id(GOOD)).unwrap();
    }
}

#[test]
fn valid_leaf_under_a_presented_intermediate_is_accepted() {
    let ca = root();
    let int = ca.intermediate("Tollgate intermediate", DAY).unwrap();
    let leaf = signed(&int, &leaf_params(&[GOOD]));
    let v = check_with(&ca, &[leaf, int.cert_der().clone()]).unwrap();
    assert_eq!(v.id, id(GOOD));
}

#[test]
fn forged_intermediate_with_the_real_name_is_untrusted_signature() {
    let ca = root();
    let real = ca.intermediate("Tollgate intermediate", DAY).unwrap();
    let impostor_root = root();
    let forged = impostor_root
        .intermediate("Tollgate intermediate", DAY)
        .unwrap();
    let leaf = signed(&forged, &leaf_params(&[GOOD]));
    let err = check_with(&ca, &[leaf, forged.cert_der().clone()]).unwrap_err();
    assert!(
        matches!(err, VerifyError::UntrustedSignature { .. }),
        "{err:?}"
    );
    drop(real);
}

// ---- handshakes ----

const SERVER: &str = "spiffe://example.org/agent/server";
const SERVER_B: &str = "spiffe://example.org/agent/server-b";
const CLIENT: &str = "spiffe://example.org/agent/client";

fn svid(ca: &DevCa, s: &str) -> Svid {
    let issued = ca.issue(&id(s), HOUR).unwrap();
    Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

struct Outcome {
    server: io::Result<Option<SpiffeId>>,
    client: io::Result<()>,
}

impl Outcome {
    fn server_reason(&self) -> Option<VerifyError> {
        self.server.as_ref().err().and_then(io_reason)
    }
    fn client_reason(&self) -> Option<VerifyError> {
        self.client.as_ref().err().and_then(io_reason)
    }
}

/// Runs one handshake and a ping/pong over a tokio duplex pipe. The server reports the client's
/// SPIFFE ID, re-verified from the certificate rustls accepted.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sni: ServerName<'static>,
    bundles: &SharedBundles,
) -> Outcome {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server);
    let connector = TlsConnector::from(client);
    let bundles = bundles.read().unwrap().clone();
    let server = async move {
        let mut tls = acceptor.accept(s).await?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let peer = conn
            .peer_certificates()
            .and_then(|c| verify_svid(c, &bundles, UnixTime::now(), Usage::ClientAuth).ok())
            .map(|v| v.id);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok(peer)
    };
    let client = async move {
        let mut tls = connector.connect(sni, c).await?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    };
    let (server, client) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(server, client)
    })
    .await
    .expect("the handshake must finish");
    Outcome { server, client }
}

struct Mesh {
    ca: DevCa,
    bundles: SharedBundles,
    resolver: Arc<SvidResolver>,
}

fn mesh() -> Mesh {
    let ca = root();
    let bundles = shared(bundles_of(&ca));
    let resolver = Arc::new(SvidResolver::new(&[svid(&ca, SERVER), svid(&ca, SERVER_B)]));
    Mesh {
        ca,
        bundles,
        resolver,
    }
}

impl Mesh {
    fn server(&self) -> Arc<ServerConfig> {
        server_config(Arc::clone(&self.resolver), Arc::clone(&self.bundles))
    }
    fn client(&self, expected: &str) -> Arc<ClientConfig> {
        client_config(
            &svid(&self.ca, CLIENT),
            id(expected),
            Arc::clone(&self.bundles),
        )
    }
}

#[tokio::test]
async fn mutual_tls13_handshake_proves_both_identities_and_sni_picks_the_svid() {
    let m = mesh();
    for expected in [SERVER, SERVER_B] {
        let out = handshake(
            m.server(),
            m.client(expected),
            server_name(&id(expected)),
            &m.bundles,
        )
        .await;
        out.client.as_ref().unwrap();
        assert_eq!(out.server.unwrap(), Some(id(CLIENT)));
    }
}

#[tokio::test]
async fn server_presenting_another_identity_is_unexpected_id() {
    let m = mesh();
    // Ask for server A's SVID while expecting B.
    let out = handshake(
        m.server(),
        m.client(SERVER_B),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    assert!(
        matches!(out.client_reason(), Some(VerifyError::UnexpectedId { ref found, .. }) if *found == id(SERVER)),
        "{:?}",
        out.client.err()
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn unknown_sni_gets_no_certificate_and_the_handshake_fails() {
    let m = mesh();
    let out = handshake(
        m.server(),
        m.client(SERVER),
        server_name(&id("spiffe://example.org/nobody")),
        &m.bundles,
    )
    .await;
    assert!(out.server.is_err());
    assert!(out.client.is_err());
}

#[tokio::test]
async fn client_without_certificate_is_no_certificate() {
    let m = mesh();
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::SpiffeServerVerifier::new(
            id(SERVER),
            Arc::clone(&m.bundles),
        )))
        .with_no_client_auth();
    let mut client = client;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let out = handshake(
        m.server(),
        Arc::new(client),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    assert_eq!(out.server_reason(), Some(VerifyError::NoCertificate));
    assert_eq!(empty_chain(), VerifyError::NoCertificate);
}

#[tokio::test]
async fn client_signing_with_another_key_is_wrong_key() {
    let m = mesh();
    let good = svid(&m.ca, CLIENT);
    let other = key();
    let signer = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::try_from(other.serialize_der()).unwrap())
        .unwrap();
    let mismatched = Arc::new(CertifiedKey::new(good.chain.clone(), signer));
    let client = verify::client_config_with_key(mismatched, id(SERVER), Arc::clone(&m.bundles));
    let out = handshake(m.server(), client, server_name(&id(SERVER)), &m.bundles).await;
    assert!(
        matches!(out.server_reason(), Some(VerifyError::WrongKey { ref subject }) if subject == CLIENT),
        "{:?}",
        out.server.err()
    );
    // The loader refuses the same pairing before it could ever be presented.
    let issued = m.ca.issue(&id(CLIENT), HOUR).unwrap();
    let err =
        Svid::from_pem(issued.cert_pem.as_bytes(), other.serialize_pem().as_bytes()).unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch { .. }), "{err:?}");
}

#[tokio::test]
async fn client_of_an_unknown_ca_is_refused_by_the_server() {
    let m = mesh();
    let impostor = root();
    let client = client_config(&svid(&impostor, CLIENT), id(SERVER), Arc::clone(&m.bundles));
    let out = handshake(m.server(), client, server_name(&id(SERVER)), &m.bundles).await;
    assert!(
        matches!(
            out.server_reason(),
            Some(VerifyError::UntrustedSignature { .. })
        ),
        "{:?}",
        out.server.err()
    );
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let m = mesh();
    let issued = m.ca.issue(&id(CLIENT), HOUR).unwrap();
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    // Possible only because another dependency enables rustls' `tls12` feature; the agent's
    // own configurations never offer TLS 1.2.
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::SpiffeServerVerifier::new(
            id(SERVER),
            Arc::clone(&m.bundles),
        )))
        .with_client_auth_cert(chain, key)
        .unwrap();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let out = handshake(
        m.server(),
        Arc::new(client),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    let err = out.server.unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(
        matches!(inner, Some(rustls::Error::PeerIncompatible(_))),
        "{err:?}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn bundle_replacement_applies_to_the_next_handshake() {
    let m = mesh();
    let out = handshake(
        m.server(),
        m.client(SERVER),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    assert!(out.server.is_ok());
    *m.bundles.write().unwrap() = TrustBundles::new();
    let out = handshake(
        m.server(),
        m.client(SERVER),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    assert!(matches!(
        out.client_reason(),
        Some(VerifyError::UnknownTrustDomain { .. })
    ));
}

#[tokio::test]
async fn resolver_replacement_changes_the_served_svids() {
    let m = mesh();
    m.resolver.replace(&[svid(&m.ca, SERVER_B)]);
    assert_eq!(m.resolver.len(), 1);
    let out = handshake(
        m.server(),
        m.client(SERVER),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await;
    assert!(out.server.is_err());
    let out = handshake(
        m.server(),
        m.client(SERVER_B),
        server_name(&id(SERVER_B)),
        &m.bundles,
    )
    .await;
    assert!(out.client.is_ok());
}

/// Every reason the brief lists comes out of the verifier as a different reason.
#[tokio::test]
async fn reasons_of_all_negative_cases_are_pairwise_distinct() {
    let m = mesh();
    let other = key();
    let signer = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::try_from(other.serialize_der()).unwrap())
        .unwrap();
    let mismatched = Arc::new(CertifiedKey::new(svid(&m.ca, CLIENT).chain.clone(), signer));
    let wrong_key = handshake(
        m.server(),
        verify::client_config_with_key(mismatched, id(SERVER), Arc::clone(&m.bundles)),
        server_name(&id(SERVER)),
        &m.bundles,
    )
    .await
    .server_reason()
    .unwrap();

    let cases = [
        ("expired", expired()),
        ("not yet valid", not_yet_valid()),
        ("wrong trust domain", wrong_trust_domain()),
        ("unknown CA", unknown_ca_with_trusted_name()),
        ("leaf is CA", leaf_is_ca()),
        ("keyCertSign", key_cert_sign()),
        ("cRLSign", crl_sign()),
        ("two URI SANs", two_uri_sans()),
        ("no URI SAN", no_uri_san()),
        ("https scheme", not_spiffe_scheme()),
        ("dot segment", dot_segment()),
        ("bad character", bad_path_character()),
        ("too long", too_long()),
        ("uppercase trust domain", uppercase_trust_domain()),
        ("another identity", another_identity()),
        ("no certificate", empty_chain()),
        ("self-signed", self_signed()),
        ("wrong key", wrong_key),
        ("missing intermediate", missing_intermediate()),
        ("malformed", malformed_der()),
        ("empty segment", empty_segment()),
    ];
    let reason = |e: &VerifyError| match e {
        VerifyError::InvalidSpiffeId(inner) => {
            format!("{}/{:?}", e.code(), std::mem::discriminant(inner))
        }
        e => e.code().to_owned(),
    };
    for (i, (a, ea)) in cases.iter().enumerate() {
        for (b, eb) in &cases[i + 1..] {
            assert_ne!(
                reason(ea),
                reason(eb),
                "{a} and {b} give the same reason: {ea} / {eb}"
            );
        }
    }
}

#[test]
fn reason_survives_the_trip_through_rustls() {
    let e = VerifyError::SelfSigned {
        subject: "x".into(),
    };
    let wrapped = verify::to_rustls(e.clone());
    assert_eq!(verify::reason_of(&wrapped), Some(&e));
    assert_eq!(
        verify::handshake_reason(&rustls::Error::NoCertificatesPresented),
        Some(VerifyError::NoCertificate)
    );
    assert_eq!(verify::reason_of(&rustls::Error::DecryptError), None);
}

// ---- SVID loading ----

#[test]
fn svid_loads_with_its_intermediates_and_rejects_bad_order() {
    let ca = root();
    let int = ca.intermediate("Tollgate intermediate", DAY).unwrap();
    let issued = int.issue(&id(GOOD), HOUR).unwrap();
    let s = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    assert_eq!(s.chain.len(), 2);
    assert_eq!(s.id, id(GOOD));
    assert!(check_with(&ca, &s.chain).is_ok());
    // Intermediate first, leaf second.
    let reversed = format!("{}{}", int.cert_pem(), issued.cert_pem);
    let err = Svid::from_pem(reversed.as_bytes(), issued.key_pem.as_bytes()).unwrap_err();
    assert!(
        matches!(err, SvidError::Leaf(VerifyError::LeafIsCa { .. })),
        "{err:?}"
    );
}

#[test]
fn svid_loading_refuses_what_peers_would_refuse() {
    let ca = root();
    let k = key();
    let mut p = leaf_params(&["https://example.org/x"]);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = ca.sign(&p, &k).unwrap();
    let err = Svid::from_der(
        vec![cert],
        PrivateKeyDer::try_from(k.serialize_der()).unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(err, SvidError::Leaf(VerifyError::NotSpiffe { .. })),
        "{err:?}"
    );
    assert!(matches!(
        Svid::from_pem(b"", b"").unwrap_err(),
        SvidError::NoCertificate
    ));
    let issued = ca.issue(&id(GOOD), HOUR).unwrap();
    assert!(matches!(
        Svid::from_pem(issued.cert_pem.as_bytes(), b"").unwrap_err(),
        SvidError::NoKey
    ));
}

#[test]
fn bundles_merge_per_trust_domain_without_duplicates() {
    let ca = root();
    let other = root();
    let mut b = bundles_of(&ca);
    b.add(
        TrustBundle::from_der(td(), vec![ca.cert_der().clone(), other.cert_der().clone()]).unwrap(),
    );
    assert_eq!(b.len(), 1);
    assert_eq!(b.get(&td()).unwrap().roots.len(), 2);
    assert!(TrustBundle::from_pem(td(), b"").is_err());
}

// ---- directory source ----

fn write_svid(ca: &DevCa, dir: &Path, s: &str, names: &FileNames) {
    ca.issue(&id(s), HOUR).unwrap().write(dir, names).unwrap();
}

fn ids(l: &Loaded) -> Vec<String> {
    l.svids.iter().map(|s| s.id.to_string()).collect()
}

#[test]
fn directory_source_reads_both_layouts_and_merges_bundles() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    write_svid(&ca, &tmp.path().join("a"), SERVER, &FileNames::CSI_SPIFFE);
    write_svid(
        &ca,
        &tmp.path().join("b"),
        CLIENT,
        &FileNames::SPIFFE_HELPER,
    );
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    assert_eq!(ids(&loaded), [CLIENT, SERVER]);
    assert_eq!(loaded.bundles.len(), 1);
    assert_eq!(loaded.bundles.get(&td()).unwrap().roots.len(), 1);
    // A fixed layout ignores directories of the other one.
    let csi_only = DirectorySource::new(tmp.path(), Some(FileNames::CSI_SPIFFE))
        .load()
        .unwrap();
    assert_eq!(ids(&csi_only), [SERVER]);
    assert_eq!(csi_only.problems.len(), 1);
}

#[test]
fn directory_source_reads_custom_names_and_a_root_holding_one_svid() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    let names = FileNames::parse("cert.pem, key.pem, bundle.pem").unwrap();
    write_svid(&ca, tmp.path(), SERVER, &names);
    let loaded = DirectorySource::new(tmp.path(), Some(names))
        .load()
        .unwrap();
    assert_eq!(ids(&loaded), [SERVER]);
    assert!(FileNames::parse("a,b").is_err());
    assert!(FileNames::parse("a,../b,c").is_err());
    assert_eq!(FileNames::layout("csi"), Some(FileNames::CSI_SPIFFE));
}

#[cfg(unix)]
#[test]
fn kubelet_style_data_symlink_swap_is_seen_with_a_new_digest() {
    use std::os::unix::fs::symlink;
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("agent");
    std::fs::create_dir(&vol).unwrap();
    write_svid(
        &ca,
        &vol.join("..2025_01_01"),
        SERVER,
        &FileNames::CSI_SPIFFE,
    );
    symlink("..2025_01_01", vol.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{f}"), vol.join(f)).unwrap();
    }
    // An SVID in a `..` directory of the root is not a directory of its own.
    write_svid(
        &ca,
        &tmp.path().join("..hidden"),
        CLIENT,
        &FileNames::CSI_SPIFFE,
    );
    let source = DirectorySource::new(tmp.path(), None);
    let first = source.load().unwrap();
    assert_eq!(ids(&first), [SERVER]);
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    assert_eq!(source.load().unwrap().digest, first.digest);

    // kubelet writes a new timestamped directory, then swaps `..data` atomically.
    write_svid(
        &ca,
        &vol.join("..2025_01_02"),
        SERVER_B,
        &FileNames::CSI_SPIFFE,
    );
    symlink("..2025_01_02", vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    let second = source.load().unwrap();
    assert_ne!(second.digest, first.digest);
    assert_eq!(ids(&second), [SERVER_B]);
}

#[test]
fn mismatched_cert_and_key_mid_rotation_is_a_problem_not_an_svid() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    write_svid(&ca, &tmp.path().join("a"), SERVER, &FileNames::CSI_SPIFFE);
    write_svid(&ca, &tmp.path().join("b"), CLIENT, &FileNames::CSI_SPIFFE);
    // The rotation wrote the new certificate but not yet the new key.
    let next = ca.issue(&id(SERVER), HOUR).unwrap();
    std::fs::write(tmp.path().join("a/tls.crt"), &next.cert_pem).unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert_eq!(ids(&loaded), [CLIENT]);
    assert_eq!(loaded.problems.len(), 1);
    assert!(
        loaded.problems[0].contains("does not match"),
        "{:?}",
        loaded.problems
    );
    // Unparseable files are reported the same way.
    std::fs::write(tmp.path().join("b/tls.key"), "not a key").unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert!(loaded.svids.is_empty());
    assert_eq!(loaded.problems.len(), 2);
}

#[test]
fn removed_directory_drops_its_svid_and_changes_the_digest() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    write_svid(&ca, &tmp.path().join("a"), SERVER, &FileNames::CSI_SPIFFE);
    write_svid(
        &ca,
        &tmp.path().join("b"),
        CLIENT,
        &FileNames::SPIFFE_HELPER,
    );
    let source = DirectorySource::new(tmp.path(), None);
    let before = source.load().unwrap();
    std::fs::remove_dir_all(tmp.path().join("b")).unwrap();
    let after = source.load().unwrap();
    assert_eq!(ids(&after), [SERVER]);
    assert_ne!(before.digest, after.digest);
}

#[test]
fn duplicate_identity_keeps_the_later_expiry_and_reports_it() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    ca.issue(&id(SERVER), HOUR)
        .unwrap()
        .write(&tmp.path().join("a"), &FileNames::CSI_SPIFFE)
        .unwrap();
    let later = ca.issue(&id(SERVER), 2 * HOUR).unwrap();
    later
        .write(&tmp.path().join("b"), &FileNames::CSI_SPIFFE)
        .unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert_eq!(loaded.svids.len(), 1);
    assert_eq!(loaded.svids[0].not_after, later.not_after);
    assert_eq!(loaded.problems.len(), 1);
}

#[test]
fn missing_root_is_a_source_error() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(DirectorySource::new(tmp.path().join("nope"), None)
        .load()
        .is_err());
}

#[tokio::test]
async fn follow_sends_only_changes_and_stops_without_receivers() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    write_svid(&ca, &tmp.path().join("a"), SERVER, &FileNames::CSI_SPIFFE);
    let source: Arc<dyn SvidSource> = Arc::new(DirectorySource::new(tmp.path(), None));
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Loaded::default()));
    let task = tokio::spawn(follow(source, Duration::from_millis(100), tx));
    let wait = Duration::from_secs(10);
    tokio::time::timeout(wait, rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&rx.borrow_and_update()), [SERVER]);
    // Nothing changes on disk: nothing is sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(400), rx.changed())
            .await
            .is_err()
    );
    write_svid(&ca, &tmp.path().join("b"), CLIENT, &FileNames::CSI_SPIFFE);
    tokio::time::timeout(wait, rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&rx.borrow_and_update()), [CLIENT, SERVER]);
    drop(rx);
    tokio::time::timeout(wait, task).await.unwrap().unwrap();
}

// ---- development CA ----

#[test]
fn ca_round_trips_through_its_directory_and_issues_verifiable_svids() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = root();
    ca.save(tmp.path(), false).unwrap();
    let loaded = DevCa::load(tmp.path()).unwrap();
    assert_eq!(loaded.trust_domain(), &td());
    assert_eq!(loaded.cert_der(), ca.cert_der());
    let issued = loaded.issue(&id(GOOD), HOUR).unwrap();
    let s = Svid::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let bundles: TrustBundles =
        [TrustBundle::from_pem(td(), issued.bundle_pem.as_bytes()).unwrap()]
            .into_iter()
            .collect();
    for usage in [Usage::ClientAuth, Usage::ServerAuth] {
        let v = verify_svid(&s.chain, &bundles, now(), usage).unwrap();
        expect(&v, &id(GOOD)).unwrap();
    }
    // The original CA's SVIDs verify against the loaded CA's bundle, and vice versa.
    assert!(check_with(&loaded, &svid(&ca, GOOD).chain).is_ok());
}

#[test]
fn ca_refuses_to_overwrite_an_existing_ca_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    root().save(tmp.path(), false).unwrap();
    let err = root().save(tmp.path(), false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let replacement = root();
    replacement.save(tmp.path(), true).unwrap();
    assert_eq!(
        DevCa::load(tmp.path()).unwrap().cert_der(),
        replacement.cert_der()
    );
}

#[cfg(unix)]
#[test]
fn private_keys_are_written_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ca = root();
    ca.save(tmp.path(), false).unwrap();
    let out = tmp.path().join("svid");
    write_svid(&ca, &out, GOOD, &FileNames::SPIFFE_HELPER);
    for key in [tmp.path().join("ca.key"), out.join("svid_key.pem")] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn ca_issues_only_for_its_trust_domain_and_never_past_its_own_expiry() {
    let ca = DevCa::init(td(), HOUR).unwrap();
    assert!(ca.issue(&id("spiffe://other.org/x"), HOUR).is_err());
    let issued = ca.issue(&id(GOOD), 10 * HOUR).unwrap();
    assert!(issued.not_after <= ca.not_after());
    assert!(ca.issue(&id(GOOD), Duration::ZERO).is_err());
}

#[test]
fn ca_commands_write_a_ca_and_an_svid_in_the_chosen_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let summary = ca::init_command(&ca_dir, "example.org", DAY, false).unwrap();
    assert!(summary.contains("example.org"), "{summary}");
    assert!(ca::init_command(&ca_dir, "example.org", DAY, false).is_err());
    assert!(ca::init_command(&tmp.path().join("x"), "Example.org", DAY, false).is_err());
    let out = tmp.path().join("svids/agent");
    let summary = ca::issue_command(&ca_dir, GOOD, HOUR, &out, &FileNames::CSI_SPIFFE).unwrap();
    assert!(summary.contains(GOOD), "{summary}");
    let loaded = DirectorySource::new(tmp.path().join("svids"), None)
        .load()
        .unwrap();
    assert_eq!(ids(&loaded), [GOOD]);
    assert!(ca::issue_command(
        &ca_dir,
        "spiffe://other.org/x",
        HOUR,
        &out,
        &FileNames::CSI_SPIFFE
    )
    .is_err());
}

#[test]
fn a_directory_cannot_bring_its_own_ca_and_take_over_an_identity() {
    let ca = root();
    let tmp = tempfile::tempdir().unwrap();
    write_svid(&ca, &tmp.path().join("a"), SERVER, &FileNames::CSI_SPIFFE);
    // A stray directory: its own CA, and a longer-lived certificate for the same SPIFFE ID.
    let rogue_ca = DevCa::init(td(), Duration::from_secs(7200)).unwrap();
    let rogue = rogue_ca
        .issue(&id(SERVER), Duration::from_secs(7000))
        .unwrap();
    rogue
        .write(&tmp.path().join("b"), &FileNames::CSI_SPIFFE)
        .unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    // Only CAs every directory of the domain lists are trusted: here none, so nothing is used
    // (it fails closed); above all the rogue SVID never replaces the real one.
    assert!(loaded.svids.iter().all(|s| s.not_after < rogue.not_after));
    let forged = rogue_ca
        .issue(&id(CLIENT), Duration::from_secs(600))
        .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(forged.cert_pem.as_bytes())
            .map(|c| c.unwrap())
            .collect();
    assert!(verify_svid(&chain, &loaded.bundles, now(), Usage::ClientAuth).is_err());
    assert!(
        loaded
            .problems
            .iter()
            .any(|p| p.contains("differs from another directory")),
        "{:?}",
        loaded.problems
    );
    // With the stray directory gone, the real SVID is back.
    std::fs::remove_dir_all(tmp.path().join("b")).unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert_eq!(ids(&loaded), [SERVER]);
}

#[test]
fn an_svid_that_does_not_chain_to_its_bundle_is_left_out() {
    let ca = root();
    let other = DevCa::init(td(), Duration::from_secs(3600)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut issued = other.issue(&id(SERVER), Duration::from_secs(600)).unwrap();
    issued.bundle_pem = ca.bundle_pem().to_owned();
    issued
        .write(&tmp.path().join("a"), &FileNames::CSI_SPIFFE)
        .unwrap();
    let loaded = DirectorySource::new(tmp.path(), None).load().unwrap();
    assert!(loaded.svids.is_empty());
    assert!(
        loaded
            .problems
            .iter()
            .any(|p| p.contains("does not chain to the trust bundle")),
        "{:?}",
        loaded.problems
    );
}

// ---- the chain cache ----

/// UnixTime `secs` from now.
fn at(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        (now().as_secs() as i64 + secs).try_into().unwrap(),
    ))
}

#[test]
fn an_accepted_chain_is_answered_from_the_cache_while_every_certificate_is_valid() {
    let ca = root();
    let int = ca.intermediate("Tollgate intermediate", DAY).unwrap();
    // The leaf lives an hour either side of now; the intermediate a day.
    let chain = [signed(&int, &leaf_params(&[GOOD])), int.cert_der().clone()];
    let bundles = bundles_of(&ca);
    let first = verify_svid(&chain, &bundles, now(), Usage::ClientAuth).unwrap();
    assert_eq!(bundles.chains().len(), 1);
    let again = verify_svid(&chain, &bundles, now(), Usage::ClientAuth).unwrap();
    assert_eq!(again, first);
    assert_eq!(bundles.chains().len(), 1);
    // Clones share the anchors, so they share what was verified against them.
    assert_eq!(bundles.clone().chains().len(), 1);
    // Past the leaf's expiry (or before its start) the cache does not answer: the full
    // validation runs and names the reason.
    for (secs, expired) in [(2 * 3600, true), (-2 * 3600, false)] {
        let err = verify_svid(&chain, &bundles, at(secs), Usage::ClientAuth).unwrap_err();
        assert!(
            matches!(
                (&err, expired),
                (VerifyError::Expired { .. }, true) | (VerifyError::NotYetValid { .. }, false)
            ),
            "{err:?}"
        );
    }
    // Checked for the other usage, the chain is validated again (and refused: the EKU test
    // above shows a server-only leaf refused as a client, and the key holds the usage).
    assert_ne!(
        ChainCache::key(&chain, Usage::ClientAuth),
        ChainCache::key(&chain, Usage::ServerAuth)
    );
    // Refusals are not kept.
    let forger = root();
    let forged = [signed(&forger, &leaf_params(&[GOOD]))];
    assert!(verify_svid(&forged, &bundles, now(), Usage::ClientAuth).is_err());
    assert_eq!(bundles.chains().len(), 1);
}

#[test]
fn other_anchors_never_reuse_what_the_old_ones_accepted() {
    let ca = root();
    let chain = [signed(&ca, &leaf_params(&[GOOD]))];
    let trusted = bundles_of(&ca);
    verify_svid(&chain, &trusted, now(), Usage::ClientAuth).unwrap();
    // The SVID directories now carry another CA only: a new value, an empty cache.
    let other = bundles_of(&root());
    assert!(other.chains().is_empty());
    let err = verify_svid(&chain, &other, now(), Usage::ClientAuth).unwrap_err();
    assert_eq!(err.code(), "untrusted_signature", "{err:?}");
    // Adding a bundle to a set starts its cache again.
    let mut grown = trusted.clone();
    grown.add(TrustBundle::from_der(td(), vec![root().cert_der().clone()]).unwrap());
    assert!(grown.chains().is_empty());
    assert_eq!(trusted.chains().len(), 1);
    // Without the cache, nothing is kept.
    let cold = bundles_of(&ca).without_chain_cache();
    verify_svid(&chain, &cold, now(), Usage::ClientAuth).unwrap();
    assert!(cold.chains().is_empty());
}

#[test]
fn a_full_cache_starts_again_rather_than_grow() {
    let cache = ChainCache::default();
    let accepted = || super::cache::Accepted {
        id: id(GOOD),
        leaf_not_after: SystemTime::now(),
        valid_from: 0,
        valid_until: i64::MAX,
    };
    for n in 0..=super::cache::CAPACITY as u32 {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&n.to_be_bytes());
        cache.put(key, accepted());
    }
    assert_eq!(cache.len(), 1);
}
