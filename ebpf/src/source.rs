//! Source validation at ingress: is this packet's source address one that may arrive on this
//! interface?
//!
//! `TG_INTERFACES` says per interface whether it is an uplink (exempt: `world` arrives there
//! with any source) and which identity it is bound to. On every other interface the route back
//! to the source must leave through the interface the packet came in on: a strict reverse-path
//! check with the kernel's own FIB (`bpf_fib_lookup`), IPv4 and IPv6 alike, independent of the
//! node's rp_filter setting (which IPv6 does not have at all). The binding is checked where the
//! source identity is resolved anyway (new flows and re-checks, in `main.rs`).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH,
    },
    helpers::bpf_fib_lookup,
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use tollgate_common::{capacity, interface::INTERFACE_FLAG_UPLINK, InterfaceValue};

use crate::parse::Packet;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// ifindex → settings of that interface. No entry: a workload-facing, unbound interface (the
/// safe default for an interface the agent has not described yet). Written by the agent before
/// it attaches to an interface, and on every policy swap (the binding is per slot).
#[map(name = "TG_INTERFACES")]
pub static INTERFACES: HashMap<u32, InterfaceValue> =
    HashMap::pinned(capacity::INTERFACE_ENTRIES, 0);

/// How the packet's source must be checked on this hook.
pub struct SourceCheck {
    /// The reverse-path check applies (ingress on a workload-facing interface).
    pub reverse_path: bool,
    /// The identity the interface is bound to in the live slot, or 0.
    pub bound_identity: u32,
}

#[inline(always)]
pub fn source_check(ingress: bool, ifindex: u32, slot: u32) -> SourceCheck {
    if !ingress {
        return SourceCheck {
            reverse_path: false,
            bound_identity: 0,
        };
    }
    match INTERFACES.get_ptr(&ifindex) {
        // SAFETY: the map value lives as long as the entry and is only read here. The agent
        // replaces whole entries (one update), so the read sees the old value or the new one.
        Some(v) => {
            let v = unsafe { &*v };
            if v.flags & INTERFACE_FLAG_UPLINK != 0 {
                SourceCheck {
                    reverse_path: false,
                    bound_identity: 0,
                }
            } else {
                SourceCheck {
                    reverse_path: true,
                    bound_identity: v.bound_in(slot),
                }
            }
        }
        None => SourceCheck {
            reverse_path: true,
            bound_identity: 0,
        },
    }
}

/// Does the route back to the packet's source leave through `ifindex`?
///
/// IPv6 link-local sources are not looked up: every interface has a route for fe80::/64, so the
/// FIB cannot say which link one belongs to, and the kernel never forwards a packet with a
/// link-local source off its link; such packets are decided by policy like any other. Anything
/// the FIB cannot route back (no route, a local address of the node, forwarding disabled on the
/// interface) fails the check: an unverifiable source is treated as spoofed.
/// A BPF-to-BPF call of its own, so the 64-byte FIB request lives in its own stack frame.
#[inline(never)]
pub fn reverse_path_ok(ctx: &TcContext, pkt: &Packet, ifindex: u32) -> bool {
    if pkt.family == 6 && pkt.saddr[0] == 0xfe && pkt.saddr[1] & 0xc0 == 0x80 {
        return true;
    }
    // SAFETY: bpf_fib_lookup is a plain C struct of integers and unions of integers; all zero
    // is a valid (empty) request.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.ifindex = ifindex;
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
        params.__bindgen_anon_3.ipv6_src = words(&pkt.daddr);
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
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64)
        && params.ifindex == ifindex
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
