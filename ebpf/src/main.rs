//! Tollgate's TC classifiers. Attached to both directions of every enforced interface, they
//! decide each IP packet: parse → source validation (ingress) → conntrack (with TCP state) →
//! (new flow or new policy generation) identity and rule lookup → verdict, counters, and an
//! event for anything denied.

#![no_std]
#![no_main]

mod maps;
mod parse;
mod source;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tollgate_common::{
    decide, direction,
    flow::{
        event_kind, EVENT_IDENTITY_UNRESOLVED, FLOW_FLAG_AUDIT, FLOW_FLAG_CLOSING,
        FLOW_FLAG_FIN_SEEN, FLOW_FLAG_REPLY, FLOW_FLAG_SYN_SENT,
    },
    identity::{IDENTITY_WORLD, SLOT_PREFIX_BITS},
    proto,
    rule::{RULE_FULL_PREFIX_BITS, RULE_ID_NONE},
    slot_of,
    tcp::{self, TcpStep},
    time::is_expired,
    verdict::COUNTER_EVENTS_LOST,
    CheckResult, Decision, FlowEvent, FlowKey, FlowValue, IdentityKeyV4, IdentityKeyV6,
    IdentityValue, RuleKey, Verdict, CHECK_MARK_VALIDATE_SOURCE,
};

use crate::{
    maps::{
        ACTIVE, CHECK, CONNTRACK, COUNTERS, EVENTS, IDENTITY_V4, IDENTITY_V6, RULES, SLOT_CONFIG,
    },
    parse::{
        parse, Packet, ParseError, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST,
    },
    source::{
        is_link_local, link_control, source_check, source_ok, LinkControl, SourceCheck, MODE_NONE,
        MODE_STRICT, MODE_STRICT_AFTER_NAT, MODE_UPLINK,
    },
};

const NS_PER_SEC: u64 = 1_000_000_000;
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

/// `tollgate check`: the admission chain of the classifiers (parse, source validation,
/// identities, rule, decision, binding) on a packet the agent crafts and runs through
/// BPF_PROG_TEST_RUN, so `check` answers with the kernel's own code and maps. Never attached;
/// reads no conntrack (it asks about a new flow) and writes no counter or event, only its
/// result to `TG_CHECK[0]`.
#[classifier]
pub fn tollgate_check(ctx: TcContext) -> i32 {
    let result = check(&ctx);
    if let Some(slot) = CHECK.get_ptr_mut(0) {
        // SAFETY: an array slot; only this program writes it, and the agent runs one check at
        // a time.
        unsafe { *slot = result };
    }
    TC_ACT_OK
}

/// The benchmark baseline: an attached classifier that does nothing.
#[classifier]
pub fn tollgate_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// CLOCK_BOOTTIME, the clock rule expiries are stated in.
#[inline(always)]
fn boot_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The live policy generation; `None` until a policy is loaded (generation 0).
#[inline(always)]
fn live_generation() -> Option<u64> {
    match ACTIVE.get(0) {
        Some(g) if *g != 0 => Some(*g),
        _ => None,
    }
}

/// Everything known about the packet in hand, passed down the decision instead of long
/// argument lists.
struct PacketContext<'a> {
    ctx: &'a TcContext,
    dir: u8,
    /// The interface of this hook (for events).
    ifindex: u32,
    pkt: Packet,
    key: FlowKey,
    generation: u64,
    /// CLOCK_MONOTONIC (coarse), for idle tracking.
    coarse: u64,
    /// The interface the packet entered the node by (0: the node's own packet).
    origin: u32,
    ingress: bool,
    /// How the source is validated, from `TG_INTERFACES[origin]`; read only when needed
    /// (`load_source`): a packet of an established flow validated at this origin needs none.
    source: SourceCheck,
    source_known: bool,
}

/// Reads how this packet's source is to be validated, once.
#[inline(always)]
fn load_source(pc: &mut PacketContext) {
    if !pc.source_known {
        pc.source = source_check(pc.origin, slot_of(pc.generation), pc.ingress);
        pc.source_known = true;
    }
}

/// A `SourceCheck` that checks nothing, before the real one is read.
const NO_SOURCE_CHECK: SourceCheck = SourceCheck {
    mode: MODE_NONE,
    origin: 0,
    bound_identity: 0,
};

#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // The interface the packet entered the node by: this one at ingress; at egress the one it
    // was received on (0 for the node's own packets).
    let origin = if dir == direction::INGRESS {
        ifindex
    } else {
        ingress_ifindex
    };
    let ingress = dir == direction::INGRESS;
    let mut pkt = Packet::EMPTY;
    match parse(ctx, &mut pkt) {
        Ok(()) => {}
        Err(ParseError::LinkLocalControl) => {
            let action = link_local_control(ctx, dir, ifindex, origin, &pkt);
            if action != DECIDE_BY_POLICY {
                return action;
            }
            // From a workload toward an address the node would forward: an ICMPv6 message
            // like any other, for policy to decide.
        }
        Err(e) => return finish(e.verdict()),
    }
    let Some(generation) = live_generation() else {
        return finish(Verdict::DenyNoPolicy);
    };
    let key = flow_key(&pkt);
    let mut pc = PacketContext {
        ctx,
        dir,
        ifindex,
        pkt,
        key,
        generation,
        // Idle tracking only needs the coarse clock (a cached value); CLOCK_BOOTTIME, which
        // reads the clocksource and costs far more in a VM, is read only when an expiry must be
        // checked.
        // SAFETY: a helper without arguments or side effects.
        coarse: unsafe { bpf_ktime_get_coarse_ns() },
        origin,
        ingress,
        source: NO_SOURCE_CHECK,
        source_known: false,
    };

    if let Some(entry) = CONNTRACK.get_ptr_mut(&pc.key) {
        // SAFETY: the value stays valid while this program runs (RCU). Other CPUs may update
        // the same entry at once; every write here is a plain store of a whole field or a
        // read-modify-write of `flags`. The race this accepts: two CPUs changing `flags` of one
        // entry at the same instant can lose one bit (a FIN_SEEN or CLOSING mark), leaving the
        // flow on a longer idle lifetime; it never lets a packet pass that policy denies,
        // because admission (`generation`, `expires_ns`) is only written by a full re-decision.
        let entry = unsafe { &mut *entry };
        let idle = pc.coarse.wrapping_sub(entry.last_seen_ns);
        if idle < tcp::idle_limit_ns(pc.pkt.proto, entry.flags) {
            return established(&mut pc, entry);
        }
        // Idle too long: forget it and treat the packet as the start of a new flow.
        let _ = CONNTRACK.remove(&pc.key);
    }

    load_source(&mut pc);
    if pc.source.mode != MODE_NONE && !source_ok(pc.ctx, &pc.pkt, pc.source.mode, origin) {
        return spoofed(&pc, EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED);
    }
    new_flow(&pc)
}

/// IPv6 neighbour discovery and MLD from the link: no policy, but when they come from a
/// workload their source is checked (see `source::link_control`), and they pass without policy
/// only toward what the node does not forward: a link-local or multicast address, or the node
/// itself. `DECIDE_BY_POLICY`: toward anything else, an ICMPv6 message like any other (else a
/// pod could send data anywhere in ND-shaped packets).
///
/// Inlined: as a call of its own its frame sat above `source_ok`'s in one chain, past the
/// 512-byte stack of the opt-level-2 build.
#[inline(always)]
fn link_local_control(ctx: &TcContext, dir: u8, ifindex: u32, origin: u32, pkt: &Packet) -> i32 {
    let generation = live_generation().unwrap_or(0);
    let slot = slot_of(generation);
    let source = source_check(origin, slot, dir == direction::INGRESS);
    let passes = match link_control(ctx, pkt, &source) {
        LinkControl::Pass => true,
        LinkControl::Spoofed => false,
        LinkControl::CheckBinding => identity_of(6, slot, &pkt.saddr) == source.bound_identity,
    };
    if !passes {
        let pc = PacketContext {
            ctx,
            dir,
            ifindex,
            key: flow_key(pkt),
            pkt: *pkt,
            generation,
            coarse: 0,
            origin,
            ingress: dir == direction::INGRESS,
            source,
            source_known: true,
        };
        return spoofed(&pc, EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED);
    }
    let from_workload = source.mode == MODE_STRICT || source.mode == MODE_STRICT_AFTER_NAT;
    if from_workload
        && !is_link_local(&pkt.daddr)
        && pkt.daddr[0] != 0xff
        && (generation == 0
            || !identity_entry(6, slot, &pkt.daddr).is_some_and(|v| v.is_node_address()))
    {
        return DECIDE_BY_POLICY;
    }
    finish(Verdict::PassNonIp)
}

/// `link_local_control`'s answer when the message is to be decided like any other packet; no TC
/// action has this value.
const DECIDE_BY_POLICY: i32 = i32::MIN;

/// A packet that matched a live conntrack entry.
#[inline(always)]
fn established(pc: &mut PacketContext, entry: &mut FlowValue) -> i32 {
    if pc.origin != 0 && entry.validated_ifindex != pc.origin {
        // The first packet of this direction from this origin (or one entering where the
        // flow's packets never did): check it in full, then remember the origin.
        load_source(pc);
        let source = pc.source;
        if source.mode != MODE_NONE && !source_ok(pc.ctx, &pc.pkt, source.mode, source.origin) {
            return spoofed(pc, EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED);
        }
        // The relaxed check after NAT is not remembered: once the origin gets its program, the
        // strict check at its ingress must see the flow's next packet.
        if source.mode != MODE_STRICT_AFTER_NAT {
            entry.validated_ifindex = pc.origin;
        }
    }
    if pc.pkt.proto == proto::TCP && tcp::needs_step(pc.pkt.tcp_flags, entry.flags) {
        let is_reply = entry.flags & FLOW_FLAG_REPLY != 0;
        match tcp::step(pc.pkt.tcp_flags, entry.flags) {
            TcpStep::Pass => {}
            // Not part of this flow (a SYN the other way, or on a closing flow): policy decides
            // it, and if it is allowed its entries replace these.
            TcpStep::NewFlow => {
                load_source(pc);
                return new_flow(pc);
            }
            TcpStep::Answered => {
                entry.flags &= !FLOW_FLAG_SYN_SENT;
                update_twin(pc, is_reply, 0, FLOW_FLAG_SYN_SENT);
            }
            TcpStep::Reset => {
                entry.flags = (entry.flags & !FLOW_FLAG_SYN_SENT) | FLOW_FLAG_CLOSING;
                entry.last_seen_ns = pc.coarse;
                update_twin(pc, is_reply, FLOW_FLAG_CLOSING, FLOW_FLAG_SYN_SENT);
            }
            TcpStep::Fin => {
                entry.flags |= FLOW_FLAG_FIN_SEEN;
                let twin = twin_key(&pc.pkt, &pc.key, is_reply);
                if let Some(t) = CONNTRACK.get_ptr_mut(&twin) {
                    // SAFETY: as for the entry itself (see `classify`).
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
    }
    if entry.generation == pc.generation
        && (entry.expires_ns == 0 || !is_expired(entry.expires_ns, boot_ns()))
    {
        // A closing flow is not kept alive by its packets: it ends a fixed time after it
        // closed, however much is still sent on it.
        if entry.flags & FLOW_FLAG_CLOSING == 0
            && pc.coarse.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS
        {
            entry.last_seen_ns = pc.coarse;
        }
        return finish(Verdict::AllowEstablished);
    }
    load_source(pc);
    recheck(pc, entry)
}

/// Sets `set` and clears `clear` in the flags of the other direction's entry, if it exists.
#[inline(always)]
fn update_twin(pc: &PacketContext, key_is_reply: bool, set: u32, clear: u32) {
    let twin = twin_key(&pc.pkt, &pc.key, key_is_reply);
    if let Some(t) = CONNTRACK.get_ptr_mut(&twin) {
        // SAFETY: as for the entry itself (see `classify`).
        let t = unsafe { &mut *t };
        t.flags = (t.flags & !clear) | set;
        if set != 0 {
            t.last_seen_ns = pc.coarse;
        }
    }
}

/// What the admission chain decided about a flow.
struct Admission {
    decision: Decision,
    src_id: u32,
    dst_id: u32,
    /// The packet's sender is not of the identity its ingress interface is bound to.
    spoofed: bool,
}

/// The admission chain, shared by new flows, re-checks and `tollgate check`: both identities of
/// the flow in its original direction, the most specific rule, the decision, and the sender
/// against its origin: the binding of a bound interface, and never `host` from an uplink. `reply`: the packet travels the flow's reply way,
/// so its sender is the flow's destination.
#[inline(always)]
fn admit(pc: &PacketContext, reply: bool) -> Admission {
    let mut e = Evaluation {
        decision: Decision {
            verdict: Verdict::DenyDefault,
            rule_id: RULE_ID_NONE,
            expires_ns: 0,
        },
        src_id: IDENTITY_WORLD,
        dst_id: IDENTITY_WORLD,
        sender_is_node: false,
    };
    evaluate(pc, reply, &mut e);
    let sender = if reply { e.dst_id } else { e.src_id };
    // A bound origin admits only its identity; an uplink never the node's own addresses
    // (`host`, or a node address a declared identity claims, marked in its entry).
    // After NAT (an origin without a program) the node's own addresses are what masquerade
    // writes, but for IPv6, which has no martian-source check of its own in the kernel, a pod
    // could claim them there: refused (IPv6 masquerade into pods from such an interface is not
    // supported).
    let spoofed = (pc.source.bound_identity != 0 && sender != pc.source.bound_identity)
        || (pc.source.mode == MODE_UPLINK && e.sender_is_node)
        || (pc.source.mode == MODE_STRICT_AFTER_NAT && pc.pkt.family == 6 && e.sender_is_node);
    Admission {
        decision: e.decision,
        src_id: e.src_id,
        dst_id: e.dst_id,
        spoofed,
    }
}

/// A tracked flow seen under a newer policy generation, or whose rule expired: decide it again
/// in its original direction. Still allowed → carry on under the new generation; otherwise the
/// flow is cut here (both conntrack entries removed).
#[inline(always)]
fn recheck(pc: &PacketContext, entry: &mut FlowValue) -> i32 {
    let is_reply = entry.flags & FLOW_FLAG_REPLY != 0;
    let a = admit(pc, is_reply);
    if a.spoofed {
        return spoofed(pc, a.src_id, a.dst_id);
    }
    let d = a.decision;
    match d.verdict {
        Verdict::AllowNew | Verdict::AuditWouldDeny => {
            entry.generation = pc.generation;
            entry.expires_ns = d.expires_ns;
            entry.rule_id = d.rule_id;
            if entry.flags & FLOW_FLAG_CLOSING == 0 {
                entry.last_seen_ns = pc.coarse;
            }
            if d.verdict == Verdict::AuditWouldDeny {
                entry.flags |= FLOW_FLAG_AUDIT;
                emit(pc, Verdict::AuditWouldDeny, d.rule_id, a.src_id, a.dst_id);
                finish(Verdict::AuditWouldDeny)
            } else {
                entry.flags &= !FLOW_FLAG_AUDIT;
                finish(Verdict::AllowEstablished)
            }
        }
        _ => {
            let _ = CONNTRACK.remove(&pc.key);
            let _ = CONNTRACK.remove(&twin_key(&pc.pkt, &pc.key, is_reply));
            emit(pc, Verdict::DenyRevoked, d.rule_id, a.src_id, a.dst_id);
            finish(Verdict::DenyRevoked)
        }
    }
}

#[inline(always)]
fn new_flow(pc: &PacketContext) -> i32 {
    let pkt = &pc.pkt;
    let a = admit(pc, false);
    if a.spoofed {
        return spoofed(pc, a.src_id, a.dst_id);
    }
    let d = a.decision;
    match d.verdict {
        Verdict::AllowNew | Verdict::AuditWouldDeny => {
            if is_trackable(pkt) {
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
                    // Not remembered after the relaxed check (see `established`).
                    validated_ifindex: if pc.source.mode == MODE_STRICT_AFTER_NAT {
                        0
                    } else {
                        pc.origin
                    },
                    _pad: 0,
                };
                // If the LRU map cannot take the entry the packet still passes (the policy allowed
                // it); its reply will simply be decided as a new flow of its own. Inserting
                // replaces entries of the same tuple, e.g. those of a closed flow.
                let _ = CONNTRACK.insert(&pc.key, &value, 0);
                value.flags |= FLOW_FLAG_REPLY;
                value.validated_ifindex = 0;
                let _ = CONNTRACK.insert(&twin_key(pkt, &pc.key, false), &value, 0);
            }
            if d.verdict == Verdict::AuditWouldDeny {
                emit(pc, d.verdict, d.rule_id, a.src_id, a.dst_id);
            }
            finish(d.verdict)
        }
        v => {
            emit(pc, v, d.rule_id, a.src_id, a.dst_id);
            finish(v)
        }
    }
}

/// The decision `tollgate check` reports, for the packet in `ctx` as a new flow arriving on
/// `ctx`'s interface (source validated only when the agent sets `CHECK_MARK_VALIDATE_SOURCE`).
#[inline(always)]
fn check(ctx: &TcContext) -> CheckResult {
    let only = |v: Verdict| CheckResult {
        verdict: v as u32,
        ..CheckResult::default()
    };
    let mut pkt = Packet::EMPTY;
    if let Err(e) = parse(ctx, &mut pkt) {
        return only(e.verdict());
    }
    let Some(generation) = live_generation() else {
        return only(Verdict::DenyNoPolicy);
    };
    // SAFETY: the context pointer is valid for the whole program run.
    let (ifindex, mark) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
    // As arriving on `ifindex` when the agent asks for source validation; otherwise as one of
    // the node's own packets, which are not checked.
    let origin = if mark & CHECK_MARK_VALIDATE_SOURCE != 0 {
        ifindex
    } else {
        0
    };
    let key = flow_key(&pkt);
    let pc = PacketContext {
        ctx,
        dir: direction::INGRESS,
        ifindex,
        pkt,
        key,
        generation,
        coarse: 0,
        origin,
        ingress: true,
        source: source_check(origin, slot_of(generation), true),
        source_known: true,
    };
    if pc.source.mode != MODE_NONE && !source_ok(ctx, &pc.pkt, pc.source.mode, origin) {
        return CheckResult {
            generation,
            ..only(Verdict::DropSpoofed)
        };
    }
    let a = admit(&pc, false);
    CheckResult {
        verdict: if a.spoofed {
            Verdict::DropSpoofed as u32
        } else {
            a.decision.verdict as u32
        },
        rule_id: if a.spoofed { 0 } else { a.decision.rule_id },
        src_identity: a.src_id,
        dst_identity: a.dst_id,
        generation,
        expires_ns: a.decision.expires_ns,
    }
}

/// Drops a packet whose source may not come from where it came from.
#[inline(always)]
fn spoofed(pc: &PacketContext, src_id: u32, dst_id: u32) -> i32 {
    emit(pc, Verdict::DropSpoofed, 0, src_id, dst_id);
    finish(Verdict::DropSpoofed)
}

/// What the identity and rule lookups found for a flow.
struct Evaluation {
    decision: Decision,
    src_id: u32,
    dst_id: u32,
    /// The packet's sender is one of the node's own addresses.
    sender_is_node: bool,
}

/// Resolves both identities of the flow (in its original direction; `reply`: the packet travels
/// the reply way) and the most specific rule in the live slot, then decides, into `out`.
///
/// A BPF-to-BPF call of its own: the LPM keys of three lookups, inlined at every caller, made the
/// classifier's frame so large that the opt-level-2 build's call chain passed the 512-byte stack.
/// The result goes to a caller-owned struct because BPF calls cannot return aggregates.
#[inline(never)]
fn evaluate(pc: &PacketContext, reply: bool, out: &mut Evaluation) {
    let pkt = &pc.pkt;
    let (src, dst, dport_be) = if reply {
        (&pkt.daddr, &pkt.saddr, pkt.sport)
    } else {
        (&pkt.saddr, &pkt.daddr, pkt.dport)
    };
    let slot = slot_of(pc.generation);
    let src_entry = identity_entry(pkt.family, slot, src);
    let dst_entry = identity_entry(pkt.family, slot, dst);
    let src_id = src_entry.map_or(IDENTITY_WORLD, |v| v.id);
    let dst_id = dst_entry.map_or(IDENTITY_WORLD, |v| v.id);
    let sender = if reply { dst_entry } else { src_entry };
    let port = match pkt.proto {
        proto::TCP | proto::UDP => u16::from_be(dport_be),
        _ => 0,
    };
    let rule_key = Key::new(
        RULE_FULL_PREFIX_BITS,
        RuleKey::new(slot, src_id, dst_id, pkt.proto, port),
    );
    let entry = RULES.get(&rule_key);
    let policy_flags = match SLOT_CONFIG.get(slot) {
        Some(c) => c.flags,
        None => 0,
    };
    out.decision = decide(entry, policy_flags, boot_ns());
    out.src_id = src_id;
    out.dst_id = dst_id;
    out.sender_is_node = sender.is_some_and(|v| v.is_node_address());
}

#[inline(always)]
fn identity_of(family: u8, slot: u32, addr: &[u8; 16]) -> u32 {
    identity_entry(family, slot, addr).map_or(IDENTITY_WORLD, |v| v.id)
}

/// The identity entry covering `addr` in `slot`, if any. A reference into the map: a 12-byte
/// `Option<IdentityValue>` returned by value made the verifier refuse the program ("R5
/// !read_ok": BPF returns in R0 alone).
#[inline(always)]
fn identity_entry(family: u8, slot: u32, addr: &[u8; 16]) -> Option<&'static IdentityValue> {
    if family == 4 {
        let key = Key::new(
            SLOT_PREFIX_BITS + 32,
            IdentityKeyV4 {
                slot,
                addr: [addr[12], addr[13], addr[14], addr[15]],
            },
        );
        IDENTITY_V4.get(&key)
    } else {
        let key = Key::new(SLOT_PREFIX_BITS + 128, IdentityKeyV6 { slot, addr: *addr });
        IDENTITY_V6.get(&key)
    }
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
        // SAFETY: a per-CPU slot: only this CPU writes it, and a program run is not preempted.
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

/// Puts a `FlowEvent` on the ring buffer. Only deny and would-deny paths call it, so it is a
/// BPF-to-BPF call with its own stack frame (at most five arguments, so it reads the clock
/// itself).
#[inline(never)]
fn emit(pc: &PacketContext, verdict: Verdict, rule_id: u32, src_id: u32, dst_id: u32) {
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let pkt = &pc.pkt;
    let (sport, dport) = match pkt.proto {
        proto::TCP | proto::UDP => (u16::from_be(pkt.sport), u16::from_be(pkt.dport)),
        proto::ICMP | proto::ICMPV6 => (pkt.icmp_type as u16, 0),
        _ => (0, 0),
    };
    slot.write(FlowEvent {
        kind: event_kind::VERDICT,
        size: core::mem::size_of::<FlowEvent>() as u16,
        verdict: verdict as u32,
        timestamp_ns: boot_ns(),
        generation: pc.generation,
        ifindex: pc.ifindex,
        src_identity: src_id,
        dst_identity: dst_id,
        rule_id,
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        direction: pc.dir,
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
