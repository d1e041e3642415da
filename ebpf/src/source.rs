//! Source validation: may this packet's source address come from the interface by which the
//! packet entered the node?
//!
//! The interface a packet entered by is `skb->ifindex` at an ingress hook and
//! `skb->ingress_ifindex` at an egress hook (0 for the node's own packets, which are not
//! checked). A packet is checked at its origin's ingress when Tollgate's program is attached
//! there (`INTERFACE_FLAG_ENFORCED`), before any NAT of the node rewrites it. A packet from an
//! interface without a program (a pod's veth in the moment before the agent attaches to it, or
//! created while no agent runs) is checked where it leaves toward a workload instead: strictly,
//! except that the node's own and unroutable addresses pass there, because that is what the
//! node's NAT writes (a masqueraded packet, a service's DNAT reply). `TG_INTERFACES[origin]`
//! says how:
//!
//! - **workload-facing** (an entry without `INTERFACE_FLAG_UPLINK`, or no entry at all): the
//!   route back to the source must leave through the origin (strict reverse path, through the
//!   kernel's own FIB with `bpf_fib_lookup`, IPv4 and IPv6, whatever the node's rp_filter says);
//!   an IPv6 link-local source is never valid here (it has no identity, and ND/MLD are handled
//!   apart); and if the interface is bound to an identity, the source must be of that identity
//!   (checked where identities are resolved, in `main.rs`);
//! - **uplink**: traffic from `world` arrives with any source, except one that belongs to this
//!   node's workloads (its route back leaves through a workload-facing interface) or to the node
//!   itself (identity `host`, or a node address marked in a declared identity's entries; checked
//!   where identities are resolved).
//!
//! A conntrack entry remembers the origin whose full check its direction last passed
//! (`validated_ifindex`; the relaxed check after NAT is never remembered), so only the first
//! packet of each direction pays for the FIB lookup.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
    },
    helpers::bpf_fib_lookup,
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use tollgate_common::{
    interface::{INTERFACE_FLAG_ENFORCED, INTERFACE_FLAG_UPLINK},
    maps, InterfaceValue,
};

use crate::parse::Packet;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// ifindex → settings of that interface. No entry: a workload-facing, unbound interface (the
/// safe default for an interface the agent has not described yet). Written by the agent for
/// every enforced interface and every uplink, and on every policy swap (the binding is per
/// slot).
#[map(name = "TG_INTERFACES")]
static INTERFACES: HashMap<u32, InterfaceValue> =
    HashMap::pinned(maps::INTERFACES.max_entries, maps::INTERFACES.flags);

/// No check: the node's own packet, or one checked at its origin's ingress already.
pub const MODE_NONE: u8 = 0;
/// Workload-facing origin, at its ingress: strict reverse path, no link-local sources.
pub const MODE_STRICT: u8 = 1;
/// Uplink origin, at its ingress: anything but the node's workloads and the node itself.
pub const MODE_UPLINK: u8 = 2;
/// Workload-facing origin without a program, where the packet leaves: strict, but the node's
/// own and unroutable addresses pass (what the node's NAT writes).
pub const MODE_STRICT_AFTER_NAT: u8 = 3;

/// How the packet's source must be checked.
#[derive(Clone, Copy)]
pub struct SourceCheck {
    /// `MODE_*`.
    pub mode: u8,
    /// The interface the packet entered by (0 with `MODE_NONE`).
    pub origin: u32,
    /// The identity the origin is bound to in the live slot, or 0.
    pub bound_identity: u32,
    /// The origin runs Tollgate's ingress program (`INTERFACE_FLAG_ENFORCED`; at an ingress
    /// hook, this very program): the packet was metered against its rate limits there.
    pub origin_enforced: bool,
}

/// How to check a packet that entered by `origin` (0: the node's own packet), at an ingress
/// hook (`ingress`) or where it leaves.
#[inline(always)]
pub fn source_check(origin: u32, slot: u32, ingress: bool) -> SourceCheck {
    let none = SourceCheck {
        mode: MODE_NONE,
        origin: 0,
        bound_identity: 0,
        origin_enforced: false,
    };
    if origin == 0 {
        return none;
    }
    let (flags, bound_identity) = match INTERFACES.get_ptr(&origin) {
        // SAFETY: the map value lives as long as the entry and is only read here. The agent
        // replaces whole entries (one update), so the read sees the old value or the new one.
        Some(v) => unsafe { ((*v).flags, (*v).bound_in(slot)) },
        None => (0, 0),
    };
    let mode = if ingress {
        if flags & INTERFACE_FLAG_UPLINK != 0 {
            MODE_UPLINK
        } else {
            MODE_STRICT
        }
    } else if flags & (INTERFACE_FLAG_UPLINK | INTERFACE_FLAG_ENFORCED) != 0 {
        // Checked at that interface's ingress (an uplink without a program is world, whatever
        // its source: only its own ingress sees it before the node's NAT).
        return SourceCheck {
            origin_enforced: flags & INTERFACE_FLAG_ENFORCED != 0,
            ..none
        };
    } else {
        MODE_STRICT_AFTER_NAT
    };
    SourceCheck {
        mode,
        origin,
        bound_identity: if mode == MODE_UPLINK {
            0
        } else {
            bound_identity
        },
        origin_enforced: ingress,
    }
}

/// Whether the flow's sender, whose identity the policy lookup resolved (`sender_id`, and
/// whether the address is one of the node's own), may send from this packet's origin:
/// - a bound origin admits only its identity;
/// - an uplink never the node's own addresses (`host`, or a node address a declared identity
///   claims, marked in its entry);
/// - after NAT (an origin without a program) the node's own addresses are what masquerade
///   writes, but for IPv6, which has no martian-source check of its own in the kernel, a pod
///   could claim them there: refused (IPv6 masquerade into pods from such an interface is not
///   supported).
#[inline(always)]
pub fn sender_allowed(
    check: &SourceCheck,
    family: u8,
    sender_id: u32,
    sender_is_node: bool,
) -> bool {
    !((check.bound_identity != 0 && sender_id != check.bound_identity)
        || (check.mode == MODE_UPLINK && sender_is_node)
        || (check.mode == MODE_STRICT_AFTER_NAT && family == 6 && sender_is_node))
}

/// Whether IPv6 address `a` is `::`. Spelled out: an array comparison becomes a `bcmp` call,
/// which BPF does not have (bpf-linker crashed with SIGSEGV on it).
#[inline(always)]
fn is_unspecified(a: &[u8; 16]) -> bool {
    let mut any = 0u8;
    for b in a {
        any |= *b;
    }
    any == 0
}

/// Whether IPv6 address `a` is link-local (fe80::/10).
#[inline(always)]
pub fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// Does the packet's source pass `mode`'s check for a packet that entered by `origin`? (The
/// binding is checked by the caller, which resolves identities anyway.)
///
/// A BPF-to-BPF call of its own, so the 64-byte FIB request lives in its own stack frame.
#[inline(never)]
pub fn source_ok(ctx: &TcContext, pkt: &Packet, mode: u8, origin: u32) -> bool {
    if pkt.family == 6 && is_link_local(&pkt.saddr) {
        // fe80::/64 is routed on every interface, so the FIB cannot place it. From a workload it
        // has no identity and can only be a way around one (and the node never forwards it);
        // an uplink's neighbours (routers) legitimately use it.
        return mode == MODE_UPLINK;
    }
    // SAFETY: bpf_fib_lookup is a plain C struct of integers and unions of integers; all zero
    // is a valid (empty) request.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.ifindex = origin;
    // The reverse path: destination = our source, source = our destination, as the kernel's own
    // fib_validate_source asks it.
    if pkt.family == 4 {
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([pkt.saddr[12], pkt.saddr[13], pkt.saddr[14], pkt.saddr[15]]);
        params.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([pkt.daddr[12], pkt.daddr[13], pkt.daddr[14], pkt.daddr[15]]);
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_4.ipv6_dst = words(&pkt.saddr);
        // The lookup's source only serves source-specific routes, which never key on a
        // link-local or multicast address; and with one of the node's own link-local addresses
        // as source the lookup fails outright (a pod's neighbour advertisement to its router's
        // link-local address was dropped as spoofed).
        if !is_link_local(&pkt.daddr) && pkt.daddr[0] != 0xff {
            params.__bindgen_anon_3.ipv6_src = words(&pkt.daddr);
        }
    }
    // SAFETY: `ctx.skb.skb` is the program's context pointer; `params` is a valid, writable
    // bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    // SKIP_NEIGH (Linux 6.5): no neighbour entry is needed to name the egress interface. The
    // kernel fills in `ifindex` before any neighbour step, so NO_NEIGH names it as well.
    let routed = rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64;
    if mode == MODE_STRICT {
        // Anything the FIB cannot route back out of the origin (another interface, no route, a
        // local address of the node, forwarding disabled on the origin) is unverifiable:
        // treated as spoofed.
        return routed && params.ifindex == origin;
    }
    if mode == MODE_STRICT_AFTER_NAT {
        // After the node's NAT the source may be the node's own address (masquerade) or a
        // service address with no route (a DNAT reply): the FIB says NOT_FWDED for both. What
        // it must not be is an address routed out of another interface: another pod's.
        return (routed && params.ifindex == origin) || rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64;
    }
    // Uplink: refuse addresses routed to a workload-facing interface; anything else (the
    // internet, other nodes' pods) is world. The FIB answers NOT_FWDED both for "no route" and
    // for the node's own addresses, so those are told apart later: a packet from an uplink may
    // not have a source of identity `host` (see `admit` in main.rs). With forwarding disabled
    // on the uplink the FIB answers nothing; nothing is forwarded to a workload then either.
    if !routed {
        return true;
    }
    match INTERFACES.get_ptr(&params.ifindex) {
        Some(v) => {
            // SAFETY: as in `source_check`.
            let flags = unsafe { (*v).flags };
            flags & INTERFACE_FLAG_UPLINK != 0
        }
        // Not described: not a workload interface the agent enforces (a tunnel, a bridge).
        None => true,
    }
}

/// What to do with link-local control traffic (see `link_control`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LinkControl {
    Pass,
    Spoofed,
    /// Passes if its source is of the origin's bound identity.
    CheckBinding,
}

/// Neighbour discovery and MLD from the link (hop limit 255 / 1) pass without policy, but not
/// without a look at their source when they come from a workload: with a forged global source
/// an ND-shaped message would otherwise carry another identity through the node.
/// - the unspecified source (`::`, duplicate address detection) only toward multicast;
/// - a link-local source: fine (it cannot leave the link);
/// - any other source: the strict check, and the binding if the origin is bound.
#[inline(always)]
pub fn link_control(ctx: &TcContext, pkt: &Packet, check: &SourceCheck) -> LinkControl {
    if (check.mode != MODE_STRICT && check.mode != MODE_STRICT_AFTER_NAT)
        || is_link_local(&pkt.saddr)
    {
        return LinkControl::Pass;
    }
    if is_unspecified(&pkt.saddr) {
        return if pkt.daddr[0] == 0xff {
            LinkControl::Pass
        } else {
            LinkControl::Spoofed
        };
    }
    if !source_ok(ctx, pkt, check.mode, check.origin) {
        LinkControl::Spoofed
    } else if check.bound_identity != 0 {
        LinkControl::CheckBinding
    } else {
        LinkControl::Pass
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
