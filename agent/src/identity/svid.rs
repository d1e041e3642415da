//! X.509 SVIDs (a certificate chain, its private key and the SPIFFE ID inside) and the trust
//! bundles that verify them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::cache::ChainCache;
use super::spiffe::{SpiffeId, TrustDomain};
use super::verify::{check_svid_leaf, VerifyError};

/// Why an SVID or a bundle could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The certificate PEM holds no certificate.
    #[error("no certificate in the SVID certificate file")]
    NoCertificate,
    /// The PEM text could not be read.
    #[error("{what} is not valid PEM: {detail}")]
    Pem {
        /// Which file or object.
        what: &'static str,
        /// The parser's reason.
        detail: String,
    },
    /// The key PEM holds no PKCS#8, SEC1 or PKCS#1 private key.
    #[error("no private key (PKCS#8, SEC1 or PKCS#1) in the SVID key file")]
    NoKey,
    /// The leaf fails the SVID rules the verifier applies to peers.
    #[error("the SVID's leaf certificate is not a valid SVID: {0}")]
    Leaf(#[from] VerifyError),
    /// A certificate after the first is not a CA certificate, so the file is not "leaf, then
    /// its issuers".
    #[error("certificate {index} of the SVID chain is not a CA certificate; the file must hold the leaf first, then its intermediates")]
    ChainOrder {
        /// Zero-based position in the file.
        index: usize,
    },
    /// The private key cannot be used by the TLS stack.
    #[error("the SVID's private key cannot be used: {0}")]
    UnusableKey(String),
    /// The private key is not the key of the leaf certificate (for example a rotation caught
    /// half way).
    #[error("the private key does not match the public key of the SVID certificate for {id}")]
    KeyMismatch {
        /// The SPIFFE ID of the certificate.
        id: SpiffeId,
    },
    /// The trust bundle holds no certificate.
    #[error("the trust bundle for {0} holds no certificate")]
    EmptyBundle(TrustDomain),
    /// A bundle certificate is not valid DER.
    #[error("certificate {index} of the trust bundle for {trust_domain} cannot be parsed")]
    BadBundleCert {
        /// Trust domain of the bundle.
        trust_domain: TrustDomain,
        /// Zero-based position in the file.
        index: usize,
    },
}

/// An X.509 SVID: the identity a workload (here, an agent) proves in a handshake.
#[derive(Clone)]
pub struct Svid {
    /// The SPIFFE ID in the leaf's URI SAN.
    pub id: SpiffeId,
    /// The leaf first, then the intermediates to present with it.
    pub chain: Vec<CertificateDer<'static>>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    // The key is kept only inside the rustls signer so it is parsed once and never printed.
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Loads an SVID from its certificate PEM (leaf first, then intermediates) and its private
    /// key PEM (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Svid, SvidError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Pem {
                what: "SVID certificate",
                detail: e.to_string(),
            })?;
        // Checked before the key so an empty certificate file is named as such.
        if chain.is_empty() {
            return Err(SvidError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => SvidError::NoKey,
            e => SvidError::Pem {
                what: "SVID private key",
                detail: e.to_string(),
            },
        })?;
        Svid::from_der(chain, key)
    }

    /// Builds an SVID from DER, applying the same checks as [`Svid::from_pem`].
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Svid, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        let facts = check_svid_leaf(leaf)?;
        for (index, cert) in chain.iter().enumerate().skip(1) {
            if !super::verify::is_ca_cert(cert) {
                return Err(SvidError::ChainOrder { index });
            }
        }
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| SvidError::UnusableKey(e.to_string()))?;
        let certified = CertifiedKey::new(chain.clone(), signer);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(SvidError::KeyMismatch { id: facts.id });
            }
            Err(e) => return Err(SvidError::UnusableKey(e.to_string())),
        }
        Ok(Svid {
            id: facts.id,
            chain,
            not_before: facts.not_before,
            not_after: facts.not_after,
            certified: Arc::new(certified),
        })
    }

    /// The chain and signing key as rustls presents them (ring provider).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

/// The CA certificates that verify the SVIDs of one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain these roots speak for.
    pub trust_domain: TrustDomain,
    /// Root (and possibly intermediate) CA certificates, DER.
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Reads a PEM bundle. The trust domain is not in the file: it is the trust domain of the
    /// SVIDs it was delivered beside.
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<TrustBundle, SvidError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Pem {
                what: "trust bundle",
                detail: e.to_string(),
            })?;
        TrustBundle::from_der(trust_domain, roots)
    }

    /// Builds a bundle from DER certificates, refusing an empty or unparseable one.
    pub fn from_der(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<TrustBundle, SvidError> {
        if roots.is_empty() {
            return Err(SvidError::EmptyBundle(trust_domain));
        }
        for (index, root) in roots.iter().enumerate() {
            if x509_parser::parse_x509_certificate(root).is_err() {
                return Err(SvidError::BadBundleCert {
                    trust_domain,
                    index,
                });
            }
        }
        let mut bundle = TrustBundle {
            trust_domain,
            roots: Vec::new(),
        };
        bundle.add_roots(roots);
        Ok(bundle)
    }

    fn add_roots(&mut self, roots: impl IntoIterator<Item = CertificateDer<'static>>) {
        for root in roots {
            if !self.roots.contains(&root) {
                self.roots.push(root);
            }
        }
    }
}

/// The trust bundles of every trust domain this agent accepts peers from, and the chains
/// verified against them (shared by clones: they have the same anchors).
#[derive(Debug, Clone)]
pub struct TrustBundles {
    by_domain: BTreeMap<TrustDomain, TrustBundle>,
    chains: Arc<ChainCache>,
    /// Whether `verify_svid` keeps accepted chains (always, but for the benchmark's
    /// every-chain-new rows).
    cache_chains: bool,
}

impl Default for TrustBundles {
    fn default() -> Self {
        TrustBundles {
            by_domain: BTreeMap::new(),
            chains: Arc::default(),
            cache_chains: true,
        }
    }
}

impl PartialEq for TrustBundles {
    fn eq(&self, other: &Self) -> bool {
        self.by_domain == other.by_domain
    }
}

impl Eq for TrustBundles {}

impl TrustBundles {
    /// No trust domain at all: every peer is refused.
    pub fn new() -> TrustBundles {
        TrustBundles::default()
    }

    /// Adds a bundle, merging its roots (without duplicates) into any bundle already held for
    /// the same trust domain, since several SVID directories usually carry the same CA.
    pub fn add(&mut self, bundle: TrustBundle) {
        // Other anchors: what was verified against the old ones is not carried over.
        self.chains = Arc::default();
        match self.by_domain.get_mut(&bundle.trust_domain) {
            Some(held) => held.add_roots(bundle.roots),
            None => {
                self.by_domain.insert(bundle.trust_domain.clone(), bundle);
            }
        }
    }

    /// The bundle of a trust domain.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&TrustBundle> {
        self.by_domain.get(trust_domain)
    }

    /// The bundle of a trust domain given by name.
    pub fn get_str(&self, trust_domain: &str) -> Option<&TrustBundle> {
        self.by_domain
            .iter()
            .find(|(td, _)| td.as_str() == trust_domain)
            .map(|(_, b)| b)
    }

    /// Bundles in trust domain order.
    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.by_domain.values()
    }

    /// The chains verified against these bundles.
    pub fn chains(&self) -> &ChainCache {
        &self.chains
    }

    /// The same bundles, with every chain validated in full each time (what a handshake
    /// with a certificate never seen before costs; for benchmarks).
    pub fn without_chain_cache(mut self) -> TrustBundles {
        self.cache_chains = false;
        self.chains = Arc::default();
        self
    }

    /// Whether accepted chains are kept (see [`TrustBundles::without_chain_cache`]).
    pub fn caches_chains(&self) -> bool {
        self.cache_chains
    }

    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.by_domain.len()
    }

    /// True when no trust domain is known.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }
}

impl FromIterator<TrustBundle> for TrustBundles {
    fn from_iter<I: IntoIterator<Item = TrustBundle>>(iter: I) -> Self {
        let mut bundles = TrustBundles::new();
        for b in iter {
            bundles.add(b);
        }
        bundles
    }
}

/// The crypto provider used everywhere in this module: always ring, never the process default,
/// so another library installing a default cannot change what this verifier accepts.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
