//! Workload identities proven with certificates: SPIFFE IDs, X.509 SVIDs and their sources,
//! the verifier both sides of an agent-to-agent handshake run, and the development CA.
//!
//! Agents authenticate each other with mutual TLS 1.3 using X.509 SVIDs: the SPIFFE ID in the
//! certificate's single URI SAN is the identity policy names, the trust bundle of that ID's trust
//! domain is what vouches for it. SVIDs come from an [`source::SvidSource`] (files written by
//! cert-manager's csi-driver-spiffe or spiffe-helper today, the Workload API later); the
//! [`ca`] module is a small CA for development and tests, not for production.
#![forbid(unsafe_code)]

pub mod ca;
pub mod cache;
pub mod source;
pub mod spiffe;
pub mod svid;
pub mod verify;

#[cfg(test)]
mod tests;

pub use spiffe::{sni_name, SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{Svid, SvidError, TrustBundle, TrustBundles};
pub use verify::{
    client_config, expect, reason_of, server_config, verify_svid, verify_svid_uncached,
    SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, Usage, VerifiedSvid, VerifyError,
};
