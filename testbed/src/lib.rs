//! A test bed of network namespaces for Tollgate: a "node" namespace that routes between
//! workload namespaces over veth pairs (the node side named `tg-<workload>`, like a pod's host
//! veth), agent processes running inside the node namespace, and bounded traffic probes.
//!
//! Everything is created by exact name and removed in Drop by that name or by pid, also when
//! setup fails half-way. Addresses come from 10.200.0.0/16 and fd00:200::/48.

pub mod agent;
pub mod netns;
pub mod topology;
pub mod traffic;

pub use agent::AgentProcess;
pub use netns::NetNs;
pub use topology::{Topology, Workload};
