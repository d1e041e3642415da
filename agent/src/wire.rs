//! What the agent and the CLI say to each other over the control socket: request and answer
//! types (JSON) and the paths they go to. Shared by the server (`api`) and the client (`cli`),
//! so the two cannot drift apart.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One program attached to one interface direction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub direction: String,
    /// The link was pinned by an earlier agent and its program replaced in place.
    pub adopted: bool,
}

/// Entries currently in each policy map, for status and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MapUsage {
    pub identities_v4: usize,
    pub identities_v6: usize,
    pub rules: usize,
}

pub const PATH_STATUS: &str = "/v1/status";
pub const PATH_POLICY: &str = "/v1/policy";
pub const PATH_CHECK: &str = "/v1/check";

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub version: String,
    pub bpffs: String,
    pub interfaces_selector: String,
    pub attachments: Vec<Attachment>,
    pub policy_name: String,
    pub generation: u64,
    pub rules: usize,
    pub identities: usize,
    pub map_usage: MapUsage,
    /// Tracked flow entries, both families, as counted at `conntrack_counted_at` (the maps are
    /// counted every few seconds, not on each `status`).
    pub conntrack_entries: usize,
    #[serde(default)]
    pub conntrack_counted_at: Option<String>,
    /// Packet counters by verdict name, summed over CPUs since the maps were created.
    pub verdicts: Vec<(String, u64)>,
    pub events_lost: u64,
    pub events_read: u64,
    /// Events of kinds this agent does not know, or malformed: skipped.
    #[serde(default)]
    pub events_unknown: u64,
    /// Deny events the datapath's sampler held back (counted exactly; packets are counted in
    /// `verdicts` either way).
    #[serde(default)]
    pub events_suppressed: u64,
    /// Every map of the datapath (from the registry in `tollgate_common::maps`): capacity as
    /// created, and entries of the live policy slot for policy maps.
    #[serde(default)]
    pub maps: Vec<MapStatus>,
    /// The rate limits of the live policy, with their drops.
    #[serde(default)]
    pub limits: Vec<LimitStatus>,
    /// Enforced interfaces: role (uplink or workload-facing) and binding.
    #[serde(default)]
    pub interfaces: Vec<InterfaceStatus>,
    /// Links found unpinned or detached and attached again since the agent started.
    #[serde(default)]
    pub links_restored: u64,
    /// The audit log, when one is written.
    #[serde(default)]
    pub audit: Option<AuditStatus>,
    /// Kubernetes mode: what the watchers and the pod membership stand at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesStatus>,
    /// Authentication (`--svid-dir`): SVIDs, live proofs and handshakes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthStatus>,
}

/// What the auth manager stands at (`status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthStatus {
    /// The auth listener (`--auth-addr`), if any.
    pub listen: Option<String>,
    /// Where the SVIDs are read from.
    pub source: String,
    /// The SVIDs this node holds.
    pub svids: Vec<SvidStatus>,
    /// What was wrong with the SVID files at the last reading (left out, previous kept).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Proofs in `TG_AUTH`: the kernel admits these pairs until their expiry.
    pub proofs: Vec<ProofStatus>,
    /// Handshakes since start, by role (`client`, `server`) and result (`ok` or the reason).
    pub handshakes: Vec<HandshakeCount>,
    /// Proofs that ended before being renewed, by reason.
    pub lapses: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SvidStatus {
    pub spiffe_id: String,
    /// RFC 3339.
    pub not_after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProofStatus {
    pub from_identity: String,
    pub to_identity: String,
    pub from_spiffe_id: String,
    pub to_spiffe_id: String,
    /// RFC 3339.
    pub expires: String,
    /// `client` (this node started the handshake and renews it), `server`, or `adopted` (found
    /// pinned at start).
    pub role: String,
    /// The peer agent's node.
    pub peer_node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandshakeCount {
    pub role: String,
    pub result: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditStatus {
    /// The file, or `stdout`.
    pub destination: String,
    /// Sequence number and hash of the last record written.
    pub head_seq: u64,
    pub head: String,
    /// The last checkpoint (`head_seq:head` it vouched for), if any was written yet.
    pub last_checkpoint: Option<String>,
    /// Records that could not be written (the chain continues after them; see the log).
    pub write_errors: u64,
    /// Records dropped on the way to stdout (`--audit-stdout`) because nothing read them.
    #[serde(default)]
    pub stdout_dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    pub name: String,
    pub what: String,
    /// Entries (ring buffer: bytes) the map was created with.
    pub capacity: u32,
    /// Entries in use where that is cheap to know (policy maps, live slot), else `None`.
    pub entries: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// `uplink` (no source validation) or `workload`.
    pub role: String,
    /// The identity the interface is bound to, if any.
    pub bound_identity: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyResponse {
    pub name: String,
    pub generation: u64,
    pub rules: usize,
    /// The policy as applied (YAML text).
    pub text: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckRequest {
    pub from: IpAddr,
    pub to: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// The enforced interface the packet arrives on: its source is then validated as there
    /// (reverse path, binding). None: source validation is not part of the answer.
    #[serde(default)]
    pub interface: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckResponse {
    /// Verdict name (`allow_new`, `deny_default`, `deny_expired`, `audit_would_deny`).
    pub verdict: String,
    /// Would the packet pass?
    pub allowed: bool,
    /// The rule that decided, or `default-deny`.
    pub rule: String,
    pub from_identity: String,
    pub to_identity: String,
    pub generation: u64,
    /// The rate limits an admitted flow would be metered by: the rule's, the source identity's
    /// quota (the flow's packets), the destination identity's quota (its replies).
    #[serde(default)]
    pub limits: Vec<CheckLimit>,
    /// When the deciding rule requires authentication: whether a proof admits the pair now
    /// (`valid`, `missing`, `expired`); absent when none is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckLimit {
    /// "rule login", "identity frontend".
    pub owner: String,
    /// What it meters of this flow: "new connections and packets", "packets from frontend",
    /// "replies from backend".
    pub applies_to: String,
    /// The rates ("5 connections/min (burst 5)").
    pub limit: String,
    /// `enforce` or `audit` (over the rate: would-drops, passed).
    pub mode: String,
}

/// One rate limit of the live policy and what it has dropped (`status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitStatus {
    pub owner: String,
    pub limit: String,
    pub mode: String,
    /// Packets dropped by the packet and byte limits, connections refused, since the limit was
    /// made (a changed limit starts again).
    pub dropped_packets: u64,
    pub dropped_bytes_limit: u64,
    pub refused_connections: u64,
    /// The same, passed in audit mode.
    pub would_drop_packets: u64,
    pub would_drop_bytes_limit: u64,
    pub would_refuse_connections: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

pub const PATH_FLOWS: &str = "/v1/flows";
pub const PATH_INVENTORY: &str = "/v1/flows/inventory";

/// One decision the datapath reported, named: a deny (by a rule or `default-deny`), a
/// would-deny in audit mode, a rate-limit drop, a spoofed source, or a new flow of a rule that
/// asks to be logged. Repeats of the same edge within an aggregation interval are one record
/// with a count (`repeated`: the record sums those after the first).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRecord {
    /// Position in the agent's list of recent decisions (increasing; restarts at 1 with the
    /// agent).
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds: when the (last) packet was decided.
    pub time: String,
    /// Verdict name (`deny_default`, `audit_would_deny`, `drop_rate_limited`, ...).
    pub verdict: String,
    /// `deny`, `audit` (passed, would have been denied or dropped) or `allow`.
    pub outcome: String,
    /// The rule that decided, `default-deny`, or `source validation`.
    pub rule: String,
    /// For rate-limit verdicts: which limit, e.g. "packets limit of rule login (100 packets/s
    /// (burst 100))".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    pub from_identity: String,
    pub to_identity: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Source port (TCP, UDP), ICMP type for ICMP; 0 otherwise.
    pub sport: u16,
    /// Destination port (TCP, UDP); 0 otherwise.
    pub dport: u16,
    pub protocol: String,
    pub generation: u64,
    pub ifindex: u32,
    /// `ingress` or `egress` of `ifindex`.
    pub direction: String,
    /// Packets this record stands for.
    pub count: u64,
    /// This record sums the repeats of an edge whose first packet had its own record.
    #[serde(default)]
    pub repeated: bool,
    /// Refused (or would have been) for want of a proof that the pair authenticated: the
    /// agent runs the handshake.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auth_required: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub records: Vec<FlowRecord>,
    /// Ask for records after this one next (`after`).
    pub last_seq: u64,
    /// Records between `after` and the first one returned were dropped from the agent's list
    /// (it keeps the most recent ones) or the agent restarted.
    #[serde(default)]
    pub gap: bool,
}

/// One edge of the flow inventory: a distinct (source identity, destination identity, port,
/// protocol, verdict) the datapath decided, since the inventory was started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InventoryEdge {
    pub from_identity: String,
    pub to_identity: String,
    pub protocol: String,
    /// Destination port (0 for ICMP).
    pub port: u16,
    pub verdict: String,
    /// `deny`, `audit` or `allow`.
    pub outcome: String,
    /// The rule (or `default-deny`) that decided it last.
    pub rule: String,
    /// RFC 3339 times of the first and the last decision.
    pub first_seen: String,
    pub last_seen: String,
    /// Packets decided on this edge (as reported by events: exact but for sampler
    /// evictions, see docs/operations.md).
    pub count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InventoryResponse {
    pub edges: Vec<InventoryEdge>,
    /// Where the inventory is kept across restarts.
    pub path: Option<String>,
}

/// Kubernetes mode in `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubernetesStatus {
    /// Pods, Namespaces and Policies were listed and the merged policy installed since start:
    /// enforcement follows the cluster (`/readyz` answers ready only then).
    pub synced: bool,
    pub pods_synced: bool,
    pub namespaces_synced: bool,
    pub policies_synced: bool,
    /// Whether every watch is connected now (false while the API server is unreachable: the
    /// agent keeps enforcing what it last knew).
    pub connected: bool,
    /// Resources whose watch is failing now.
    #[serde(default)]
    pub disconnected: Vec<String>,
    /// The last error of a watch or an install, and when (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Pods known (all nodes) and those on this node.
    pub pods: usize,
    pub local_pods: usize,
    /// Pod addresses with an entry of their own in the identity maps.
    pub addresses: usize,
    /// Pod addresses whose entry could not be written (a full map); retried every second.
    #[serde(default)]
    pub addresses_not_written: usize,
    /// Pod changes applied to the maps since start.
    pub pod_changes: u64,
    /// Tracked flow entries removed because an address changed identity.
    pub flows_revoked: u64,
    /// Watch and list failures since start (the API server unreachable, refusing, or a watch
    /// cut).
    pub watch_errors: u64,
    /// Policy objects merged into the live policy, in name order.
    pub policies: Vec<String>,
    /// Policy objects left out, and why.
    pub skipped: Vec<NamedReason>,
    /// Pods that could not be given one identity (their traffic is denied): how many, and the
    /// first 100 of them.
    #[serde(default)]
    pub conflict_count: usize,
    pub conflicts: Vec<NamedReason>,
}

/// A name and a reason: a skipped Policy object, a pod in conflict (`namespace/name`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamedReason {
    pub name: String,
    pub reason: String,
}
