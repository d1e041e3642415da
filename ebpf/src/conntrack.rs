//! Connection tracking: admitted flows, their TCP state, idle expiry and re-checks.
//!
//! Two LRU hashes, one per address family: IPv4 flows under a 16-byte key, IPv6 under a
//! 40-byte one (see `tollgate_common::flow`). Admitting a flow writes two entries, the original
//! direction and the reply direction (`FLOW_FLAG_REPLY`), so a packet of either direction costs
//! one lookup.
//!
//! Shared state: an entry may be read and written by packets of its flow on both CPUs at once.
//! The hot path writes nothing but `last_seen_ns` (at most once a second) and `validated_ifindex`
//! (once per direction and origin). TCP state changes are plain stores of a whole field or a
//! read-modify-write of `flags`; the race this accepts is two CPUs changing `flags` of one entry
//! at the same instant and losing one bit (a FIN_SEEN or CLOSING mark), which leaves the flow on
//! a longer idle lifetime. It never lets a packet pass that policy denies: admission
//! (`generation`, `expires_ns`, `rule_id`) is only written by a full re-decision, and a torn
//! read of it (one field old, one new) either matches the live generation, whose decision
//! allowed it, or sends the packet to that decision again.

use aya_ebpf::{macros::map, maps::LruHashMap};
use tollgate_common::{
    flow::{
        FLOW_FLAG_AUDIT, FLOW_FLAG_CLOSING, FLOW_FLAG_FIN_SEEN, FLOW_FLAG_REPLY, FLOW_FLAG_SYN_SENT,
    },
    maps, proto,
    tcp::{self, TcpStep},
    time::is_expired,
    FlowKey, FlowKeyV4, FlowValue, Verdict,
};

use crate::{
    context::PacketContext,
    parse::{Packet, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST},
    policy::{boot_ns, Evaluation},
    source::MODE_STRICT_AFTER_NAT,
};

/// IPv4 5-tuple as on the wire → admitted flow. Sized at load (`--conntrack-entries`).
#[map(name = "TG_CONNTRACK_V4")]
static CONNTRACK_V4: LruHashMap<FlowKeyV4, FlowValue> =
    LruHashMap::pinned(maps::CONNTRACK_V4.max_entries, maps::CONNTRACK_V4.flags);

/// IPv6 5-tuple as on the wire (`family` 6) → admitted flow.
#[map(name = "TG_CONNTRACK_V6")]
static CONNTRACK_V6: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::pinned(maps::CONNTRACK_V6.max_entries, maps::CONNTRACK_V6.flags);

const NS_PER_SEC: u64 = 1_000_000_000;
/// `last_seen_ns` is rewritten at most this often, to keep the established path read-mostly.
const LAST_SEEN_GRANULARITY_NS: u64 = NS_PER_SEC;

/// The entry of `key`, if the flow is tracked.
///
/// Returns a raw pointer into the map: the value stays valid for this program run (RCU), and
/// other CPUs may write it at the same time (see the module comment for what that race allows).
///
/// The established path takes the address family as a constant (`V4`), one copy per family; the
/// admission chain after it reaches entries by key through small calls (`track`, `readmit`,
/// `forget`) that branch on the family inside. A pointer into one of two maps carried through
/// the admission chain doubled the verifier's work for all of it (630k instructions verified
/// instead of 260k).
#[inline(always)]
pub fn lookup<const V4: bool>(key: &FlowKey) -> Option<*mut FlowValue> {
    if V4 {
        CONNTRACK_V4.get_ptr_mut(&key.to_v4())
    } else {
        CONNTRACK_V6.get_ptr_mut(key)
    }
}

/// Writes (or replaces) the entry of `key`. If the LRU map cannot take it the packet still
/// passes (policy allowed it); its reply is then decided as a new flow of its own.
#[inline(always)]
fn insert<const V4: bool>(key: &FlowKey, value: &FlowValue) {
    let _ = if V4 {
        CONNTRACK_V4.insert(&key.to_v4(), value, 0)
    } else {
        CONNTRACK_V6.insert(key, value, 0)
    };
}

#[inline(always)]
pub fn remove<const V4: bool>(key: &FlowKey) {
    let _ = if V4 {
        CONNTRACK_V4.remove(&key.to_v4())
    } else {
        CONNTRACK_V6.remove(key)
    };
}

/// The entry is not idle past its lifetime (which depends on its TCP state).
#[inline(always)]
pub fn is_live(pc: &PacketContext, entry: &FlowValue) -> bool {
    pc.coarse.wrapping_sub(entry.last_seen_ns) < tcp::idle_limit_ns(pc.pkt.proto, entry.flags)
}

/// What the TCP state machine says about a packet of a tracked flow.
pub enum Step {
    /// Part of the flow.
    Continue,
    /// Not part of this flow (a SYN the other way, or on a closing flow): policy decides it,
    /// and if it is allowed its entries replace these.
    NewFlow,
}

/// Advances the flow's TCP state on this packet (both entries). Most packets change nothing
/// and return at once; the state changes are a BPF-to-BPF call of their own.
#[inline(always)]
pub fn step<const V4: bool>(pc: &PacketContext, entry: &mut FlowValue) -> Step {
    if pc.pkt.proto != proto::TCP || !tcp::needs_step(pc.pkt.tcp_flags, entry.flags) {
        return Step::Continue;
    }
    if tcp_transition::<V4>(pc, entry) {
        Step::NewFlow
    } else {
        Step::Continue
    }
}

/// Applies a TCP state change; true if the packet starts a new flow instead. (A `bool`, not
/// `Step`: BPF calls return in one register, and this keeps the ABI obvious.)
#[inline(never)]
fn tcp_transition<const V4: bool>(pc: &PacketContext, entry: &mut FlowValue) -> bool {
    let is_reply = entry.flags & FLOW_FLAG_REPLY != 0;
    match tcp::step(pc.pkt.tcp_flags, entry.flags) {
        TcpStep::Pass => {}
        TcpStep::NewFlow => return true,
        TcpStep::Answered => {
            entry.flags &= !FLOW_FLAG_SYN_SENT;
            update_twin::<V4>(pc, is_reply, 0, FLOW_FLAG_SYN_SENT);
        }
        TcpStep::Reset => {
            entry.flags = (entry.flags & !FLOW_FLAG_SYN_SENT) | FLOW_FLAG_CLOSING;
            entry.last_seen_ns = pc.coarse;
            update_twin::<V4>(pc, is_reply, FLOW_FLAG_CLOSING, FLOW_FLAG_SYN_SENT);
        }
        TcpStep::Fin => {
            entry.flags |= FLOW_FLAG_FIN_SEEN;
            let twin = twin_key(&pc.pkt, &pc.key, is_reply);
            if let Some(t) = lookup::<V4>(&twin) {
                // SAFETY: a live map value; concurrent writers as in the module comment.
                let t = unsafe { &mut *t };
                if tcp::fin_closes(t.flags) {
                    t.flags |= FLOW_FLAG_CLOSING;
                    t.last_seen_ns = pc.coarse;
                    entry.flags |= FLOW_FLAG_CLOSING;
                    entry.last_seen_ns = pc.coarse;
                }
            }
        }
    }
    false
}

/// Whether the flow's admission still holds: decided under the live generation and its rule
/// not expired. If so, the entry's idle clock is refreshed (at most once a second).
#[inline(always)]
pub fn still_admitted(pc: &PacketContext, entry: &mut FlowValue) -> bool {
    if entry.generation != pc.generation
        || (entry.expires_ns != 0 && is_expired(entry.expires_ns, boot_ns()))
    {
        return false;
    }
    // A closing flow is not kept alive by its packets: it ends a fixed time after it closed,
    // however much is still sent on it.
    if entry.flags & FLOW_FLAG_CLOSING == 0
        && pc.coarse.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS
    {
        entry.last_seen_ns = pc.coarse;
    }
    true
}

/// Sets `set` and clears `clear` in the flags of the other direction's entry, if it exists.
#[inline(always)]
fn update_twin<const V4: bool>(pc: &PacketContext, key_is_reply: bool, set: u32, clear: u32) {
    let twin = twin_key(&pc.pkt, &pc.key, key_is_reply);
    if let Some(t) = lookup::<V4>(&twin) {
        // SAFETY: a live map value; concurrent writers as in the module comment.
        let t = unsafe { &mut *t };
        t.flags = (t.flags & !clear) | set;
        if set != 0 {
            t.last_seen_ns = pc.coarse;
        }
    }
}

/// Tracks a newly admitted flow: both entries, each with the limits its direction is metered
/// by (the rule's, and its sender's quota). A BPF-to-BPF call: its keys and values need a frame
/// of their own.
#[inline(never)]
pub fn track(pc: &PacketContext, e: &Evaluation) {
    if pc.pkt.family == 4 {
        track_in::<true>(pc, e)
    } else {
        track_in::<false>(pc, e)
    }
}

#[inline(always)]
fn track_in<const V4: bool>(pc: &PacketContext, e: &Evaluation) {
    let d = &e.decision;
    let pkt = &pc.pkt;
    if !is_trackable(pkt) {
        return;
    }
    let mut flags = if d.verdict == Verdict::AuditWouldDeny {
        FLOW_FLAG_AUDIT
    } else {
        0
    };
    if pkt.proto == proto::TCP {
        flags |= tcp::initial_flags(pkt.tcp_flags);
    }
    let mut value = FlowValue {
        generation: pc.generation,
        expires_ns: d.expires_ns,
        last_seen_ns: pc.coarse,
        rule_id: d.rule_id,
        flags,
        // The relaxed check after NAT is not remembered: once the origin gets its program, the
        // strict check at its ingress must see the flow's next packet.
        validated_ifindex: if pc.source.mode == MODE_STRICT_AFTER_NAT {
            0
        } else {
            pc.origin
        },
        rule_limit: e.rule_limit,
        sender_limit: e.src_limit,
        // This packet was metered where it entered, if Tollgate's ingress program runs there.
        metered_ifindex: if pc.source.origin_enforced {
            pc.origin
        } else {
            0
        },
    };
    // Inserting replaces entries of the same tuple, e.g. those of a closed flow.
    insert::<V4>(&pc.key, &value);
    value.flags |= FLOW_FLAG_REPLY;
    value.validated_ifindex = 0;
    value.sender_limit = e.dst_limit;
    value.metered_ifindex = 0;
    insert::<V4>(&twin_key(pkt, &pc.key, false), &value);
}

/// A tracked flow re-decided and still admitted: carries on under the live generation, with
/// the limits it has there (`reply`: the packet travels the reply way, so its sender is the
/// flow's destination). (Looked up again by key: rare, and see `lookup` for why no pointer is
/// carried here.)
#[inline(never)]
pub fn readmit(pc: &PacketContext, e: &Evaluation, reply: bool) {
    let d = &e.decision;
    let entry = if pc.pkt.family == 4 {
        lookup::<true>(&pc.key)
    } else {
        lookup::<false>(&pc.key)
    };
    let Some(entry) = entry else {
        // Evicted or removed since: the packet passes as decided, the flow is untracked.
        return;
    };
    // SAFETY: a live map value; concurrent writers as in the module comment.
    let entry = unsafe { &mut *entry };
    entry.generation = pc.generation;
    entry.expires_ns = d.expires_ns;
    entry.rule_id = d.rule_id;
    entry.rule_limit = e.rule_limit;
    entry.sender_limit = if reply { e.dst_limit } else { e.src_limit };
    if entry.flags & FLOW_FLAG_CLOSING == 0 {
        entry.last_seen_ns = pc.coarse;
    }
    if d.verdict == Verdict::AuditWouldDeny {
        entry.flags |= FLOW_FLAG_AUDIT;
    } else {
        entry.flags &= !FLOW_FLAG_AUDIT;
    }
}

/// Cuts a tracked flow: both entries go.
#[inline(never)]
pub fn forget(pc: &PacketContext, key_is_reply: bool) {
    let twin = twin_key(&pc.pkt, &pc.key, key_is_reply);
    if pc.pkt.family == 4 {
        remove::<true>(&pc.key);
        remove::<true>(&twin);
    } else {
        remove::<false>(&pc.key);
        remove::<false>(&twin);
    }
}

/// Echo requests and replies are tracked; other ICMP messages (errors, timestamps) are decided
/// one by one.
#[inline(always)]
pub fn is_trackable(pkt: &Packet) -> bool {
    match pkt.proto {
        proto::ICMP => pkt.icmp_type == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => pkt.icmp_type == ICMPV6_ECHO_REQUEST,
        _ => true,
    }
}

/// The conntrack key of the packet's direction.
#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    let (sport, dport) = match pkt.proto {
        // ICMP: (identifier, type) so a reply only matches the reply entry.
        proto::ICMP | proto::ICMPV6 => (pkt.icmp_id, pkt.icmp_type as u16),
        _ => (pkt.sport, pkt.dport),
    };
    FlowKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// The conntrack key of the other direction of the flow `key` belongs to. `key_is_reply` says
/// whether `key` itself is the reply direction.
#[inline(always)]
fn twin_key(pkt: &Packet, key: &FlowKey, key_is_reply: bool) -> FlowKey {
    match pkt.proto {
        proto::ICMP | proto::ICMPV6 => {
            let (request, reply) = if pkt.proto == proto::ICMP {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            } else {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            };
            let twin_type = if key_is_reply { request } else { reply };
            // Addresses swap, the identifier stays, the expected type flips.
            FlowKey {
                sport: key.sport,
                dport: twin_type as u16,
                ..key.reversed()
            }
        }
        _ => key.reversed(),
    }
}
