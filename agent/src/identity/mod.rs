//! Workload identities proven with certificates: SPIFFE IDs, X.509 SVIDs and their sources,
//! the verifier both sides of an agent-to-agent handshake run, and the development CA.
