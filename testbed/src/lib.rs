//! A test bed of network namespaces for Tollgate: a "node" namespace that routes between
//! workload namespaces over veth pairs (the node side named `tg-<workload>`, like a pod's host
//! veth), agent processes running inside the node namespace, bounded traffic probes (from a
//! one-line echo to megabytes over one connection), hand-built spoofed packets, and a packet tap
//! that shows what actually arrived in a namespace, load generators (connection and
//! request/response rates) for the traffic benchmark, and paced offered load with counting sinks
//! for the rate-limit tests. A real Prometheus server (and promtool) scrapes and lints agents'
//! metrics. A fake Kubernetes API server ([`kubeapi`]) speaks the list/watch protocol to the
//! agent's Kubernetes mode.
//!
//! Everything is created by exact name and removed in Drop by that name or by pid, also when
//! setup fails half-way. Addresses come from 10.200.0.0/16 and fd00:200::/48.

pub mod agent;
pub mod kubeapi;
pub mod load;
pub mod netns;
pub mod offered;
pub mod prometheus;
pub mod spoof;
pub mod tap;
pub mod topology;
pub mod traffic;
pub mod two_nodes;

pub use agent::AgentProcess;
pub use kubeapi::FakeApiServer;
pub use netns::NetNs;
pub use prometheus::{PrometheusServer, Sample};
pub use tap::{CapturedPacket, PacketTap};
pub use topology::{Topology, TopologyOptions, Workload};
pub use two_nodes::TwoNodes;
