//! Tollgate's TC classifiers. Attached to both directions of every enforced interface, they
//! decide each IP packet: parse → conntrack → (new flow or new policy generation) identity and
//! rule lookup → verdict, counters, and an event for anything denied.

#![no_std]
#![no_main]

mod maps;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tollgate_common::{
    decide, direction,
    flow::{event_kind, FLOW_FLAG_AUDIT, FLOW_FLAG_REPLY},
    identity::{IDENTITY_WORLD, SLOT_PREFIX_BITS},
    proto,
    rule::RULE_FULL_PREFIX_BITS,
    slot_of,
    time::is_expired,
    verdict::COUNTER_EVENTS_LOST,
    Decision, FlowEvent, FlowKey, FlowValue, IdentityKeyV4, IdentityKeyV6, RuleKey, Verdict,
};

use crate::{
    maps::{ACTIVE, CONNTRACK, COUNTERS, EVENTS, IDENTITY_V4, IDENTITY_V6, RULES, SLOT_CONFIG},
    parse::{
        parse, Packet, ParseError, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST,
    },
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Idle time after which a tracked flow is forgotten and its next packet is a new flow
/// (Cilium's defaults: long for TCP, short for datagrams).
const TCP_IDLE_NS: u64 = 6 * 3600 * NS_PER_SEC;
const OTHER_IDLE_NS: u64 = 60 * NS_PER_SEC;
/// `last_seen_ns` is rewritten at most this often, to keep the established path read-mostly.
const LAST_SEEN_GRANULARITY_NS: u64 = NS_PER_SEC;

#[classifier]
pub fn tollgate_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, direction::INGRESS)
}

#[classifier]
pub fn tollgate_egress(ctx: TcContext) -> i32 {
    classify(&ctx, direction::EGRESS)
}

/// The benchmark baseline: an attached classifier that does nothing.
#[classifier]
pub fn tollgate_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// CLOCK_BOOTTIME, the clock rule expiries are stated in.
#[inline(always)]
fn boot_ns() -> u64 {
    unsafe { bpf_ktime_get_boot_ns() }
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> i32 {
    let pkt = match parse(ctx) {
        Ok(p) => p,
        Err(ParseError::NotIp) | Err(ParseError::NeighbourDiscovery) => {
            return finish(Verdict::PassNonIp);
        }
        Err(ParseError::Malformed) => return finish(Verdict::DropMalformed),
        Err(ParseError::Fragment) => return finish(Verdict::DropFragment),
    };

    let generation = match ACTIVE.get(0) {
        Some(g) if *g != 0 => *g,
        _ => return finish(Verdict::DenyNoPolicy),
    };
    // Idle tracking only needs the coarse clock (a cached value); CLOCK_BOOTTIME, which reads
    // the clocksource and costs far more in a VM, is read only when an expiry must be checked.
    let coarse = unsafe { bpf_ktime_get_coarse_ns() };
    let key = flow_key(&pkt);

    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        let entry = unsafe { &mut *entry };
        let idle_limit = if pkt.proto == proto::TCP {
            TCP_IDLE_NS
        } else {
            OTHER_IDLE_NS
        };
        let idle = coarse.wrapping_sub(entry.last_seen_ns);
        if idle < idle_limit {
            if entry.generation == generation
                && (entry.expires_ns == 0 || !is_expired(entry.expires_ns, boot_ns()))
            {
                if idle > LAST_SEEN_GRANULARITY_NS {
                    entry.last_seen_ns = coarse;
                }
                return finish(Verdict::AllowEstablished);
            }
            return recheck(ctx, dir, &pkt, &key, entry, generation, boot_ns(), coarse);
        }
        // Idle too long: forget it and treat the packet as the start of a new flow.
        let _ = CONNTRACK.remove(&key);
    }

    new_flow(ctx, dir, &pkt, &key, generation, boot_ns(), coarse)
}

/// A tracked flow seen under a newer policy generation, or whose rule expired: decide it again
/// in its original direction. Still allowed → carry on under the new generation; otherwise the
/// flow is cut here (both conntrack entries removed).
#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's view simple"
)]
#[inline(always)]
fn recheck(
    ctx: &TcContext,
    dir: u8,
    pkt: &Packet,
    key: &FlowKey,
    entry: &mut FlowValue,
    generation: u64,
    now: u64,
    coarse: u64,
) -> i32 {
    let is_reply = entry.flags & FLOW_FLAG_REPLY != 0;
    let (src, dst) = if is_reply {
        (&pkt.daddr, &pkt.saddr)
    } else {
        (&pkt.saddr, &pkt.daddr)
    };
    let dport = if is_reply { pkt.sport } else { pkt.dport };
    let (d, src_id, dst_id) = evaluate(pkt.family, pkt.proto, src, dst, dport, generation, now);
    match d.verdict {
        Verdict::AllowNew | Verdict::AuditWouldDeny => {
            entry.generation = generation;
            entry.expires_ns = d.expires_ns;
            entry.rule_id = d.rule_id;
            entry.last_seen_ns = coarse;
            if d.verdict == Verdict::AuditWouldDeny {
                entry.flags |= FLOW_FLAG_AUDIT;
                emit(
                    ctx,
                    dir,
                    pkt,
                    Verdict::AuditWouldDeny,
                    &d,
                    src_id,
                    dst_id,
                    generation,
                    now,
                );
                finish(Verdict::AuditWouldDeny)
            } else {
                entry.flags &= !FLOW_FLAG_AUDIT;
                finish(Verdict::AllowEstablished)
            }
        }
        _ => {
            let _ = CONNTRACK.remove(key);
            let _ = CONNTRACK.remove(&twin_key(pkt, key, is_reply));
            emit(
                ctx,
                dir,
                pkt,
                Verdict::DenyRevoked,
                &d,
                src_id,
                dst_id,
                generation,
                now,
            );
            finish(Verdict::DenyRevoked)
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's view simple"
)]
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    dir: u8,
    pkt: &Packet,
    key: &FlowKey,
    generation: u64,
    now: u64,
    coarse: u64,
) -> i32 {
    let (d, src_id, dst_id) = evaluate(
        pkt.family, pkt.proto, &pkt.saddr, &pkt.daddr, pkt.dport, generation, now,
    );
    match d.verdict {
        Verdict::AllowNew | Verdict::AuditWouldDeny => {
            if is_trackable(pkt) {
                let audit = if d.verdict == Verdict::AuditWouldDeny {
                    FLOW_FLAG_AUDIT
                } else {
                    0
                };
                let mut value = FlowValue {
                    generation,
                    expires_ns: d.expires_ns,
                    last_seen_ns: coarse,
                    rule_id: d.rule_id,
                    flags: audit,
                };
                // If the LRU map cannot take the entry the packet still passes (the policy allowed
                // it); its reply will simply be decided as a new flow of its own.
                let _ = CONNTRACK.insert(key, &value, 0);
                value.flags |= FLOW_FLAG_REPLY;
                let _ = CONNTRACK.insert(&twin_key(pkt, key, false), &value, 0);
            }
            if d.verdict == Verdict::AuditWouldDeny {
                emit(
                    ctx, dir, pkt, d.verdict, &d, src_id, dst_id, generation, now,
                );
            }
            finish(d.verdict)
        }
        v => {
            emit(ctx, dir, pkt, v, &d, src_id, dst_id, generation, now);
            finish(v)
        }
    }
}

/// Resolves both identities and the most specific rule in the active slot, then decides.
#[inline(always)]
fn evaluate(
    family: u8,
    l4proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    dport_be: u16,
    generation: u64,
    now: u64,
) -> (Decision, u32, u32) {
    let slot = slot_of(generation);
    let src_id = identity_of(family, slot, src);
    let dst_id = identity_of(family, slot, dst);
    let port = match l4proto {
        proto::TCP | proto::UDP => u16::from_be(dport_be),
        _ => 0,
    };
    let rule_key = Key::new(
        RULE_FULL_PREFIX_BITS,
        RuleKey::new(slot, src_id, dst_id, l4proto, port),
    );
    let entry = RULES.get(&rule_key);
    let policy_flags = match SLOT_CONFIG.get(slot) {
        Some(c) => c.flags,
        None => 0,
    };
    (decide(entry, policy_flags, now), src_id, dst_id)
}

#[inline(always)]
fn identity_of(family: u8, slot: u32, addr: &[u8; 16]) -> u32 {
    let found = if family == 4 {
        let key = Key::new(
            SLOT_PREFIX_BITS + 32,
            IdentityKeyV4 {
                slot,
                addr: [addr[12], addr[13], addr[14], addr[15]],
            },
        );
        IDENTITY_V4.get(&key).map(|v| v.id)
    } else {
        let key = Key::new(SLOT_PREFIX_BITS + 128, IdentityKeyV6 { slot, addr: *addr });
        IDENTITY_V6.get(&key).map(|v| v.id)
    };
    found.unwrap_or(IDENTITY_WORLD)
}

/// Echo requests and replies are tracked; other ICMP messages (errors, timestamps) are decided
/// one by one.
#[inline(always)]
fn is_trackable(pkt: &Packet) -> bool {
    match pkt.proto {
        proto::ICMP => pkt.icmp_type == ICMP_ECHO_REQUEST,
        proto::ICMPV6 => pkt.icmp_type == ICMPV6_ECHO_REQUEST,
        _ => true,
    }
}

#[inline(always)]
fn flow_key(pkt: &Packet) -> FlowKey {
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

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn finish(v: Verdict) -> i32 {
    count(v as u32);
    if v.passes() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's view simple"
)]
#[inline(always)]
fn emit(
    ctx: &TcContext,
    dir: u8,
    pkt: &Packet,
    verdict: Verdict,
    d: &Decision,
    src_id: u32,
    dst_id: u32,
    generation: u64,
    now: u64,
) {
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let (sport, dport) = match pkt.proto {
        proto::TCP | proto::UDP => (u16::from_be(pkt.sport), u16::from_be(pkt.dport)),
        proto::ICMP | proto::ICMPV6 => (pkt.icmp_type as u16, 0),
        _ => (0, 0),
    };
    slot.write(FlowEvent {
        kind: event_kind::VERDICT,
        size: core::mem::size_of::<FlowEvent>() as u16,
        verdict: verdict as u32,
        timestamp_ns: now,
        generation,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        src_identity: src_id,
        dst_identity: dst_id,
        rule_id: d.rule_id,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        direction: dir,
        _pad: 0,
    });
    slot.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
