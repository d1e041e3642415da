//! A development CA (ECDSA P-256, rcgen) for demos and tests: `tollgate ca init` and
//! `tollgate ca issue`. It has no revocation, no audit and keeps its key in a file; production
//! trust domains should use cert-manager, SPIRE or another real CA.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::source::FileNames;
use super::spiffe::{SpiffeId, TrustDomain};

/// File name of the CA certificate in the CA directory (also the trust bundle).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
const CN_PREFIX: &str = "Tollgate development CA ";
/// Issued leaves start this long before now, so a peer whose clock is slightly behind accepts
/// them.
const BACKDATE: Duration = Duration::from_secs(60);

/// A development CA: a self-signed root, or an intermediate under one (for tests).
pub struct DevCa {
    trust_domain: TrustDomain,
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
    cert_pem: String,
    /// This CA's certificate then its issuers' up to (excluding) the root; empty for a root.
    chain_to_root: Vec<String>,
    root_pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An SVID the development CA issued, as PEM.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// The leaf, then any intermediates.
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    /// The trust bundle: the root CA certificate.
    pub bundle_pem: String,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

fn ca_name(trust_domain: &TrustDomain) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{CN_PREFIX}{trust_domain}"));
    dn
}

fn ca_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Sets a certificate's validity from `from` to `to`.
pub(crate) fn set_validity(
    params: &mut CertificateParams,
    from: SystemTime,
    to: SystemTime,
) -> anyhow::Result<()> {
    // rcgen takes `time::OffsetDateTime`, a crate this one does not depend on; the epoch plus
    // a std Duration produces one without naming it.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since = |t: SystemTime| t.duration_since(UNIX_EPOCH).context("time before 1970");
    params.not_before = epoch + since(from)?;
    params.not_after = epoch + since(to)?;
    Ok(())
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("cannot generate a P-256 key")
}

/// Second-resolution end of validity, as encoded in the certificate.
fn truncate_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

impl DevCa {
    /// Creates a self-signed root for `trust_domain`, valid from now for `ttl`.
    pub fn init(trust_domain: TrustDomain, ttl: Duration) -> anyhow::Result<DevCa> {
        ensure!(!ttl.is_zero(), "the CA's lifetime must not be zero");
        let key = new_key()?;
        let mut params = ca_params(ca_name(&trust_domain));
        let now = SystemTime::now();
        let not_after = truncate_secs(now + ttl);
        set_validity(&mut params, now - BACKDATE, not_after)?;
        let cert = params
            .self_signed(&key)
            .context("cannot sign the CA certificate")?;
        let cert_pem = cert.pem();
        Ok(DevCa {
            trust_domain,
            params,
            key,
            cert: cert.der().clone(),
            root_pem: cert_pem.clone(),
            cert_pem,
            chain_to_root: Vec::new(),
            not_after,
        })
    }

    /// An intermediate CA under this one (same trust domain), named `name`, valid for `ttl` but
    /// not past this CA.
    pub fn intermediate(&self, name: &str, ttl: Duration) -> anyhow::Result<DevCa> {
        let key = new_key()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        let mut params = ca_params(dn);
        let now = SystemTime::now();
        let not_after = truncate_secs((now + ttl).min(self.not_after));
        set_validity(&mut params, now - BACKDATE, not_after)?;
        let cert = params
            .signed_by(&key, &self.issuer())
            .context("cannot sign the intermediate CA certificate")?;
        let cert_pem = cert.pem();
        let mut chain_to_root = vec![cert_pem.clone()];
        chain_to_root.extend(self.chain_to_root.iter().cloned());
        Ok(DevCa {
            trust_domain: self.trust_domain.clone(),
            params,
            key,
            cert: cert.der().clone(),
            cert_pem,
            chain_to_root,
            root_pem: self.root_pem.clone(),
            not_after,
        })
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This CA's certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root CA certificate PEM: the trust bundle of the trust domain.
    pub fn bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// End of this CA's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs arbitrary leaf parameters, so tests can make certificates the CA would never issue.
    #[cfg(test)]
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> anyhow::Result<CertificateDer<'static>> {
        Ok(params.signed_by(key, &self.issuer())?.der().clone())
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, refusing to replace an existing CA
    /// unless `force`: replacing it silently would invalidate every SVID it issued.
    pub fn save(&self, dir: &Path, force: bool) -> anyhow::Result<()> {
        ensure!(
            self.chain_to_root.is_empty(),
            "only a root CA can be saved; intermediates are for tests"
        );
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if !force {
            for f in [CA_CERT_FILE, CA_KEY_FILE] {
                let p = dir.join(f);
                if p.exists() {
                    bail!(
                        "{} already exists; refusing to replace the CA (use --force to replace it and invalidate every SVID it issued)",
                        p.display()
                    );
                }
            }
        }
        write_atomic(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Loads a root CA saved by [`DevCa::save`].
    pub fn load(dir: &Path) -> anyhow::Result<DevCa> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        let key_pem = fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a usable private key", key_path.display()))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{} holds no certificate", cert_path.display()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|e| {
            anyhow::anyhow!("{} is not a valid certificate: {e}", cert_path.display())
        })?;
        ensure!(
            parsed.public_key().raw == key.subject_public_key_info().as_slice(),
            "{} is not the key of {}",
            key_path.display(),
            cert_path.display()
        );
        ensure!(
            parsed.is_ca(),
            "{} is not a CA certificate",
            cert_path.display()
        );
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        let td = cn.strip_prefix(CN_PREFIX).with_context(|| {
            format!(
                "{} is not a Tollgate development CA (subject {})",
                cert_path.display(),
                parsed.subject()
            )
        })?;
        let trust_domain = TrustDomain::parse(td)
            .with_context(|| format!("{}: bad trust domain in subject", cert_path.display()))?;
        let not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        // rcgen signs with the issuer's name as it would encode it; rebuilding the name from the
        // same string gives the same bytes, which the check below confirms.
        let params = ca_params(ca_name(&trust_domain));
        let ca = DevCa {
            trust_domain,
            params,
            key,
            cert: cert.clone(),
            root_pem: cert_pem.clone(),
            cert_pem,
            chain_to_root: Vec::new(),
            not_after,
        };
        let probe = ca.params.self_signed(&ca.key)?;
        let (_, probe) = x509_parser::parse_x509_certificate(probe.der())
            .map_err(|e| anyhow::anyhow!("cannot re-read the CA name: {e}"))?;
        ensure!(
            probe.subject().as_raw() == parsed.subject().as_raw(),
            "{}: the CA's name is not encoded as this version writes it",
            cert_path.display()
        );
        Ok(ca)
    }

    /// Issues an SVID for `id`, valid from a minute ago for `ttl` but never past the CA.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> anyhow::Result<IssuedSvid> {
        ensure!(!ttl.is_zero(), "the SVID's lifetime must not be zero");
        ensure!(
            id.trust_domain_str() == self.trust_domain.as_str(),
            "{id} is not in trust domain {}; this CA only issues for its own trust domain",
            self.trust_domain
        );
        let now = SystemTime::now();
        ensure!(now < self.not_after, "the CA has expired");
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        let not_after = truncate_secs((now + ttl).min(self.not_after));
        set_validity(&mut params, now - BACKDATE, not_after)?;
        let cert = params
            .signed_by(&key, &self.issuer())
            .with_context(|| format!("cannot sign the SVID for {id}"))?;
        let mut cert_pem = cert.pem();
        for c in &self.chain_to_root {
            cert_pem.push_str(c);
        }
        Ok(IssuedSvid {
            cert_pem,
            key_pem: key.serialize_pem(),
            bundle_pem: self.root_pem.clone(),
            not_after,
        })
    }
}

impl IssuedSvid {
    /// Writes the three files into `dir` under `names`, each through a temporary file and a
    /// rename so a reader never sees half a file (the key with mode 0600). A reader may still
    /// see the new certificate with the old key between two renames; the directory source
    /// reports that as a problem and keeps the previous SVID until both match.
    pub fn write(&self, dir: &Path, names: &FileNames) -> anyhow::Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(
            &dir.join(names.bundle.as_ref()),
            self.bundle_pem.as_bytes(),
            0o644,
        )?;
        write_atomic(
            &dir.join(names.key.as_ref()),
            self.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomic(
            &dir.join(names.cert.as_ref()),
            self.cert_pem.as_bytes(),
            0o644,
        )?;
        Ok(())
    }
}

fn write_atomic(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        // The mode given at creation is reduced by the umask and ignored for an existing file;
        // set it explicitly so a key is never left readable.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} into place", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `tollgate ca init`: creates and saves a development CA, returns a summary for the operator.
pub fn init_command(
    dir: &Path,
    trust_domain: &str,
    ttl: Duration,
    force: bool,
) -> anyhow::Result<String> {
    let td = TrustDomain::parse(trust_domain)
        .with_context(|| format!("invalid trust domain {trust_domain:?}"))?;
    let ca = DevCa::init(td, ttl)?;
    ca.save(dir, force)?;
    Ok(format!(
        "development CA for trust domain {} written to {} ({CA_CERT_FILE} is the trust bundle, {CA_KEY_FILE} the key), valid until {}",
        ca.trust_domain,
        dir.display(),
        humantime::format_rfc3339_seconds(ca.not_after())
    ))
}

/// `tollgate ca issue`: issues an SVID for `id` with the CA in `dir` and writes it into `out`.
pub fn issue_command(
    dir: &Path,
    id: &str,
    ttl: Duration,
    out: &Path,
    names: &FileNames,
) -> anyhow::Result<String> {
    let id = SpiffeId::parse(id).with_context(|| format!("invalid SPIFFE ID {id:?}"))?;
    let ca = DevCa::load(dir)?;
    let issued = ca.issue(&id, ttl)?;
    issued.write(out, names)?;
    Ok(format!(
        "SVID for {id} written to {} ({names}), expires {}",
        out.display(),
        humantime::format_rfc3339_seconds(issued.not_after)
    ))
}
