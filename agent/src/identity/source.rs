//! Where SVIDs and trust bundles come from: a trait so the SPIFFE Workload API can be added
//! later, and the file-based source used today (cert-manager csi-driver-spiffe, spiffe-helper,
//! or the development CA's output).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, UnixTime};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{
    spiffe::TrustDomain,
    svid::{Svid, TrustBundle, TrustBundles},
    verify::{verify_svid, Usage},
};

/// Why a source could not be read at all (as opposed to one SVID among several being bad,
/// which is a [`Loaded::problems`] entry).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's root cannot be read.
    #[error("cannot read SVID directory {path}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Invalid file-name configuration.
    #[error("invalid SVID file names {0:?}: expected \"cert,key,bundle\"")]
    FileNames(String),
}

/// One reading of a source.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The usable SVIDs, sorted by SPIFFE ID, at most one per ID.
    pub svids: Vec<Svid>,
    /// The trust bundles delivered with them, merged per trust domain.
    pub bundles: TrustBundles,
    /// What was wrong and left out (per directory); not fatal.
    pub problems: Vec<String>,
    /// The directory each usable SVID came from.
    pub origins: BTreeMap<super::SpiffeId, PathBuf>,
    /// Directories that gave no usable SVID because something in them was wrong (unreadable,
    /// a certificate and key of two rotations, not chaining to the bundle): what they held
    /// before may be mid-rotation rather than gone.
    pub broken: Vec<PathBuf>,
    /// Changes whenever any file read changes, so a reader can skip unchanged readings.
    pub digest: [u8; 32],
}

/// A provider of SVIDs and trust bundles.
pub trait SvidSource: Send + Sync + 'static {
    /// Where this source reads from, for logs.
    fn describe(&self) -> String;
    /// Reads the current SVIDs and bundles.
    fn load(&self) -> Result<Loaded, SourceError>;
}

/// The names of the three files of one SVID directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileNames {
    /// Certificate chain PEM, leaf first.
    pub cert: Cow<'static, str>,
    /// Private key PEM.
    pub key: Cow<'static, str>,
    /// Trust bundle PEM.
    pub bundle: Cow<'static, str>,
}

impl FileNames {
    /// cert-manager csi-driver-spiffe's layout.
    pub const CSI_SPIFFE: FileNames = FileNames {
        cert: Cow::Borrowed("tls.crt"),
        key: Cow::Borrowed("tls.key"),
        bundle: Cow::Borrowed("ca.crt"),
    };
    /// spiffe-helper's default layout.
    pub const SPIFFE_HELPER: FileNames = FileNames {
        cert: Cow::Borrowed("svid.pem"),
        key: Cow::Borrowed("svid_key.pem"),
        bundle: Cow::Borrowed("svid_bundle.pem"),
    };
    const KNOWN: [FileNames; 2] = [FileNames::CSI_SPIFFE, FileNames::SPIFFE_HELPER];

    /// Parses custom names, `"cert,key,bundle"`.
    pub fn parse(s: &str) -> Result<FileNames, SourceError> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        match parts.as_slice() {
            [cert, key, bundle]
                if parts
                    .iter()
                    .all(|p| !p.is_empty() && !p.contains('/') && !p.starts_with("..")) =>
            {
                Ok(FileNames {
                    cert: Cow::Owned((*cert).to_owned()),
                    key: Cow::Owned((*key).to_owned()),
                    bundle: Cow::Owned((*bundle).to_owned()),
                })
            }
            _ => Err(SourceError::FileNames(s.to_owned())),
        }
    }

    /// A known layout by name: `csi` (or `csi-spiffe`) or `spiffe-helper`.
    pub fn layout(name: &str) -> Option<FileNames> {
        match name {
            "csi" | "csi-spiffe" => Some(FileNames::CSI_SPIFFE),
            "spiffe-helper" => Some(FileNames::SPIFFE_HELPER),
            _ => None,
        }
    }
}

impl fmt::Display for FileNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.cert, self.key, self.bundle)
    }
}

/// SVIDs in files: `root` holds one subdirectory per SVID (any name; the identity is the SPIFFE
/// ID inside the certificate), or `root` itself holds one SVID's files.
///
/// Symbolic links are followed and entries starting with `..` are ignored, so a Kubernetes
/// projected or CSI volume (which swaps a `..data` symlink to publish new files) is read as the
/// files it publishes. A directory whose files do not fit together (a certificate and key from
/// different rotations, an unparseable file) is reported in [`Loaded::problems`] and left out;
/// the caller should keep serving the previous good SVID for that identity until the directory
/// is consistent again.
#[derive(Debug, Clone)]
pub struct DirectorySource {
    /// The directory to read.
    pub root: PathBuf,
    /// The file names, or `None` to detect a known layout in each directory.
    pub names: Option<FileNames>,
}

impl DirectorySource {
    /// A source reading `root` with the given names (`None` to auto-detect).
    pub fn new(root: impl Into<PathBuf>, names: Option<FileNames>) -> DirectorySource {
        DirectorySource {
            root: root.into(),
            names,
        }
    }

    fn names_for(&self, dir: &Path) -> Option<FileNames> {
        match &self.names {
            Some(n) => dir.join(n.cert.as_ref()).is_file().then(|| n.clone()),
            None => FileNames::KNOWN
                .into_iter()
                .find(|n| dir.join(n.cert.as_ref()).is_file()),
        }
    }

    /// The SVID directories: the root itself, or its subdirectories.
    fn svid_dirs(&self) -> Result<Vec<(String, PathBuf)>, SourceError> {
        let root_err = |source| SourceError::Root {
            path: self.root.clone(),
            source,
        };
        if self.names_for(&self.root).is_some() {
            return Ok(vec![(".".to_owned(), self.root.clone())]);
        }
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(root_err)? {
            let entry = entry.map_err(root_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") {
                continue;
            }
            let path = entry.path();
            // `is_dir` follows symlinks, as a projected volume needs.
            if path.is_dir() {
                dirs.push((name, path));
            }
        }
        dirs.sort();
        Ok(dirs)
    }
}

/// Accumulates the digest over everything read, in a fixed order.
struct Digester(Sha256);

impl Digester {
    fn file(&mut self, dir: &str, file: &str, content: Option<&[u8]>) {
        for part in [dir.as_bytes(), file.as_bytes()] {
            self.0.update((part.len() as u64).to_be_bytes());
            self.0.update(part);
        }
        match content {
            Some(c) => {
                self.0.update([1]);
                self.0.update((c.len() as u64).to_be_bytes());
                self.0.update(c);
            }
            None => self.0.update([0]),
        }
    }
}

impl SvidSource for DirectorySource {
    fn describe(&self) -> String {
        match &self.names {
            Some(n) => format!("SVID files {n} under {}", self.root.display()),
            None => format!("SVID files under {}", self.root.display()),
        }
    }

    fn load(&self) -> Result<Loaded, SourceError> {
        let mut digest = Digester(Sha256::new());
        let mut problems = Vec::new();
        let mut by_id: BTreeMap<_, Svid> = BTreeMap::new();
        let mut bundles = TrustBundles::new();
        let mut candidates: Vec<(PathBuf, Svid, TrustBundle)> = Vec::new();
        let mut origins = BTreeMap::new();
        let mut broken = Vec::new();

        for (name, dir) in self.svid_dirs()? {
            let Some(names) = self.names_for(&dir) else {
                digest.file(&name, "", None);
                problems.push(match &self.names {
                    Some(n) => format!("{}: no {} file", dir.display(), n.cert),
                    None => format!(
                        "{}: neither tls.crt (csi-driver-spiffe) nor svid.pem (spiffe-helper)",
                        dir.display()
                    ),
                });
                continue;
            };
            let mut read = |file: &str| {
                let content = std::fs::read(dir.join(file));
                digest.file(&name, file, content.as_deref().ok());
                content.map_err(|e| format!("{}: {file}: {e}", dir.display()))
            };
            let (cert, key, bundle) = (read(&names.cert), read(&names.key), read(&names.bundle));
            let (cert, key, bundle) = match (cert, key, bundle) {
                (Ok(c), Ok(k), Ok(b)) => (c, k, b),
                (c, k, b) => {
                    problems.extend([c.err(), k.err(), b.err()].into_iter().flatten());
                    broken.push(dir.clone());
                    continue;
                }
            };
            let svid = match Svid::from_pem(&cert, &key) {
                Ok(svid) => svid,
                Err(e) => {
                    problems.push(format!("{}: {e}", dir.display()));
                    broken.push(dir.clone());
                    continue;
                }
            };
            match TrustBundle::from_pem(svid.id.trust_domain(), &bundle) {
                Ok(b) => candidates.push((dir, svid, b)),
                Err(e) => {
                    problems.push(format!("{}: {}: {e}", dir.display(), names.bundle));
                    broken.push(dir.clone());
                    continue;
                }
            }
        }
        // Every directory of a trust domain delivers that domain's bundle; only the CAs all of
        // them list are trusted. A directory cannot add a CA of its own (and with it any SVID of
        // the domain): at most it can take trust away, which fails closed.
        let mut agreed: BTreeMap<TrustDomain, Vec<CertificateDer<'static>>> = BTreeMap::new();
        for (dir, _, bundle) in &candidates {
            match agreed.get_mut(&bundle.trust_domain) {
                None => {
                    agreed.insert(bundle.trust_domain.clone(), bundle.roots.clone());
                }
                Some(roots) => {
                    let before = roots.len();
                    roots.retain(|r| bundle.roots.contains(r));
                    if roots.len() != before || bundle.roots.len() != roots.len() {
                        problems.push(format!(
                            "{}: its bundle for {} differs from another directory's; only the CAs both list are trusted",
                            dir.display(),
                            bundle.trust_domain
                        ));
                    }
                }
            }
        }
        for (trust_domain, roots) in agreed {
            if let Ok(b) = TrustBundle::from_der(trust_domain, roots) {
                bundles.add(b);
            }
        }
        for (dir, svid, _) in candidates {
            // An SVID must chain to its domain's agreed bundle (checked at a time inside its
            // own validity: expiry is the handshake's business, not the loader's).
            let life = svid
                .not_after
                .duration_since(svid.not_before)
                .unwrap_or_default();
            let at = SystemTime::now()
                .max(svid.not_before)
                .min(svid.not_after - Duration::from_secs(1).min(life));
            let at = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default());
            if let Err(e) = verify_svid(&svid.chain, &bundles, at, Usage::ClientAuth) {
                problems.push(format!(
                    "{}: {} does not chain to the trust bundle of its trust domain: {e}",
                    dir.display(),
                    svid.id
                ));
                broken.push(dir);
                continue;
            }
            match by_id.remove(&svid.id) {
                Some(held) => {
                    problems.push(format!(
                        "{}: {} is also provided by another directory; keeping the one that expires later",
                        dir.display(),
                        svid.id
                    ));
                    let keep = if svid.not_after > held.not_after {
                        origins.insert(svid.id.clone(), dir);
                        svid
                    } else {
                        held
                    };
                    by_id.insert(keep.id.clone(), keep);
                }
                None => {
                    origins.insert(svid.id.clone(), dir);
                    by_id.insert(svid.id.clone(), svid);
                }
            }
        }
        if by_id.is_empty() && problems.is_empty() {
            problems.push(format!("{}: no SVID found", self.root.display()));
        }
        Ok(Loaded {
            svids: by_id.into_values().collect(),
            bundles,
            problems,
            origins,
            broken,
            digest: digest.0.finalize().into(),
        })
    }
}

/// Polls `source` every `every` (at least 100 ms) and sends a new [`Loaded`] when its digest
/// changes; returns once every receiver is gone. A failed read is logged and retried at the
/// next tick, leaving the last good value in the channel.
pub async fn follow(source: Arc<dyn SvidSource>, every: Duration, tx: watch::Sender<Arc<Loaded>>) {
    let every = every.max(Duration::from_millis(100));
    let mut last = tx.borrow().digest;
    loop {
        if tx.is_closed() {
            return;
        }
        let reader = Arc::clone(&source);
        match tokio::task::spawn_blocking(move || reader.load()).await {
            Ok(Ok(loaded)) if loaded.digest != last => {
                last = loaded.digest;
                for problem in &loaded.problems {
                    tracing::warn!(source = %source.describe(), problem, "SVID source problem");
                }
                tracing::info!(
                    source = %source.describe(),
                    svids = loaded.svids.len(),
                    trust_domains = loaded.bundles.len(),
                    "SVIDs changed"
                );
                if tx.send(Arc::new(loaded)).is_err() {
                    return;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(source = %source.describe(), error = %e, "cannot read SVIDs")
            }
            Err(e) => tracing::warn!(source = %source.describe(), error = %e, "SVID reader failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tx.closed() => return,
        }
    }
}
