//! Connection tracking and flow events.
//!
//! `TG_CONNTRACK_V4` and `TG_CONNTRACK_V6` are LRU hashes keyed by the 5-tuple as seen on the
//! wire: IPv4 flows under a compact 16-byte key ([`FlowKeyV4`]), IPv6 flows under the 40-byte
//! [`FlowKey`]. Admitting a flow writes two entries: the original direction and the reply
//! direction (`FLOW_FLAG_REPLY`), so either direction costs one lookup. For ICMP echo the
//! "ports" are the echo identifier and the ICMP type expected in that direction, so a reply
//! matches only the reply entry and a fresh echo request in the other direction is a new flow.
//!
//! [`FlowKey`] is also the family-independent form the agent and tests use (IPv4 addresses
//! IPv4-mapped, `::ffff:a.b.c.d`); [`FlowKey::to_v4`] gives the IPv4 map's key.

/// Key of `TG_CONNTRACK_V6`, and the family-independent form of a flow's key (IPv4 addresses
/// IPv4-mapped). 8-byte aligned (its size is a multiple of 8, so the layout is unchanged): with
/// the alignment of its byte arrays the eBPF build zeroed and copied it byte by byte through a
/// `memset`/`memcpy` call on every packet.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order as on the wire (ICMP echo: the identifier).
    pub sport: u16,
    /// Network byte order as on the wire (ICMP echo: the expected ICMP type, host order).
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key of the opposite direction.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// The `TG_CONNTRACK_V4` key of an IPv4 flow (whose addresses are IPv4-mapped here).
    #[inline(always)]
    pub const fn to_v4(&self) -> FlowKeyV4 {
        FlowKeyV4 {
            saddr: [
                self.saddr[12],
                self.saddr[13],
                self.saddr[14],
                self.saddr[15],
            ],
            daddr: [
                self.daddr[12],
                self.daddr[13],
                self.daddr[14],
                self.daddr[15],
            ],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Key of `TG_CONNTRACK_V4`: the IPv4 5-tuple in 16 bytes (hashing and comparing it costs less
/// than the 40-byte key IPv6 needs). Fields as in [`FlowKey`]; aligned like it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKeyV4>() == 16);

/// This entry is the reply direction of a flow admitted the other way.
pub const FLOW_FLAG_REPLY: u32 = 1 << 0;
/// The flow was admitted as a would-deny in audit mode.
pub const FLOW_FLAG_AUDIT: u32 = 1 << 1;
/// TCP: admitted on a bare SYN and not answered yet (short lifetime). Set on both entries.
pub const FLOW_FLAG_SYN_SENT: u32 = 1 << 2;
/// TCP: a FIN went in this entry's direction.
pub const FLOW_FLAG_FIN_SEEN: u32 = 1 << 3;
/// TCP: reset, or a FIN went each way; forgotten seconds after the last packet. Set on both
/// entries.
pub const FLOW_FLAG_CLOSING: u32 = 1 << 4;

/// Value of `TG_CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Policy generation that admitted (or last re-checked) the flow. A packet seen under
    /// another generation re-runs the policy decision.
    pub generation: u64,
    /// CLOCK_BOOTTIME expiry of the flow's admission (0 = never): the earlier of its rule's
    /// expiry and, for a rule that requires authentication, its pair's proof. Checked on every
    /// packet so an expired grant or proof cuts established flows without the agent.
    pub expires_ns: u64,
    /// The datapath's idle clock (jiffies in nanoseconds, see `ACTIVE_NS_PER_JIFFY_INDEX`) at the
    /// last packet, refreshed at most once a second; only for idle expiry, so tick precision is
    /// enough.
    pub last_seen_ns: u64,
    pub rule_id: u32,
    /// `FLOW_FLAG_*`.
    pub flags: u32,
    /// The interface whose reverse-path check packets of this direction last passed at
    /// ingress (0 = none yet). A packet arriving there again skips the FIB lookup; one arriving
    /// anywhere else is checked in full, so a spoofer elsewhere cannot ride on the entry.
    pub validated_ifindex: u32,
    /// Rate limits the packets of this direction are metered by (`TG_LIMITS` ids, 0: none):
    /// the admitting rule's, and the quota of this direction's sender (the source identity for
    /// the original direction, the destination identity for the reply).
    pub rule_limit: u32,
    pub sender_limit: u32,
    /// The interface at whose ingress Tollgate last metered this direction's packets (0:
    /// none): a packet that entered the node there was charged to its limits already and is not
    /// charged again where it leaves. A whole field, not a flag, so that no race on `flags` can
    /// lose it.
    pub metered_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 48);

/// Kind of an event on `TG_EVENTS`. New kinds are appended; readers skip kinds they do not
/// know (the header is stable).
pub mod event_kind {
    /// A packet was denied or would have been denied (audit).
    pub const VERDICT: u16 = 1;
}

/// An event on the `TG_EVENTS` ring buffer: denies, would-denies and revoked flows. New fields
/// go at the end and bump `size`, so old readers keep working.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `event_kind::*`.
    pub kind: u16,
    /// Size of the whole event in bytes, for forward compatibility.
    pub size: u16,
    /// `Verdict` as u32.
    pub verdict: u32,
    /// CLOCK_BOOTTIME nanoseconds.
    pub timestamp_ns: u64,
    pub generation: u64,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Rule that decided (0 = default deny).
    pub rule_id: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// `direction::*`.
    pub direction: u8,
    /// For `DropRateLimited` and `AuditWouldDrop`: the kind of the limit that dropped
    /// (`ratelimit::kind::*`); 0 otherwise.
    pub limit_kind: u8,
    /// Events of the same edge (addresses, protocol, destination port, verdict) the sampler
    /// suppressed on this CPU since the previous one it let through (see `sampler`).
    pub suppressed: u32,
    /// For `DropRateLimited` and `AuditWouldDrop`: the `TG_LIMITS` id of the limit; 0
    /// otherwise.
    pub limit_id: u32,
    /// `EVENT_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// The flow was refused (or, in audit mode, would have been) because its rule requires
/// authentication and no valid proof exists for the pair: the agent runs the handshake.
pub const EVENT_FLAG_AUTH_REQUIRED: u32 = 1 << 0;

/// An identity id in a `FlowEvent` that the datapath did not resolve (a spoofed packet is
/// dropped before its identities are looked up).
pub const EVENT_IDENTITY_UNRESOLVED: u32 = 0;
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 96);

/// Writes an IPv4 address as IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}
