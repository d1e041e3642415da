//! Tollgate's TC classifiers. Attached to both directions of every enforced interface, they
//! decide each IP packet:
//!
//! parse → conntrack lookup → established: (source re-validated if the packet came in
//! elsewhere) → TCP state → still admitted? pass.
//! Otherwise (a new flow, or a tracked one under a new policy generation or past its expiry):
//! source validation → the admission chain (`admit`): decide (identities, rule, authentication
//! of the pair) → rate limits → track → verdict, counters, and an event for anything denied.
//!
//! One module per concern: `parse` (headers), `source` (where a source may come from),
//! `conntrack` (flows and TCP state), `policy` (generation, identities, rules), `events`
//! (counters, sampled events), `ratelimit`, `auth` (proofs of authenticated pairs). Each owns
//! its maps.

#![no_std]
#![no_main]
// The atomic read-modify-write intrinsics of `ratelimit` (see there).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod auth;
mod conntrack;
mod context;
mod events;
mod parse;
mod policy;
mod ratelimit;
mod source;

use aya_ebpf::{
    bindings::TC_ACT_OK, macros::classifier, macros::map, maps::Array, programs::TcContext,
};
use tollgate_common::{
    auth::state as auth_state,
    direction,
    flow::{EVENT_FLAG_AUTH_REQUIRED, EVENT_IDENTITY_UNRESOLVED},
    maps, slot_of, CheckResult, FlowValue, Verdict, CHECK_MARK_VALIDATE_SOURCE,
};

use crate::{
    conntrack::Step,
    context::{PacketContext, NO_SOURCE_CHECK},
    events::{emit, finish, identities},
    parse::{parse, Packet, ParseError},
    policy::{evaluate, live_generation, Evaluation},
    source::{
        is_link_local, link_control, sender_allowed, source_check, source_ok, LinkControl,
        MODE_NONE, MODE_STRICT, MODE_STRICT_AFTER_NAT,
    },
};

/// `[0]` = what the last `tollgate_check` run decided (see `tollgate_common::CheckResult`).
#[map(name = "TG_CHECK")]
static CHECK: Array<CheckResult> = Array::pinned(maps::CHECK.max_entries, maps::CHECK.flags);

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

/// A context for a packet not parsed yet.
#[inline(always)]
fn new_context(ctx: &TcContext, dir: u8, ifindex: u32, origin: u32) -> PacketContext<'_> {
    PacketContext {
        ctx,
        dir,
        ifindex,
        pkt: Packet::EMPTY,
        key: tollgate_common::FlowKey {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            proto: 0,
            family: 0,
            _pad: [0; 2],
        },
        generation: 0,
        coarse: 0,
        origin,
        ingress: dir == direction::INGRESS,
        source: NO_SOURCE_CHECK,
        source_known: false,
    }
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    let ingress = dir == direction::INGRESS;
    // The interface the packet entered the node by: this one at ingress; at egress the one it
    // was received on (0 for the node's own packets).
    let origin = if ingress { ifindex } else { ingress_ifindex };
    // Built first and parsed into in place: one copy of the packet's fields on the stack.
    let mut pc = new_context(ctx, dir, ifindex, origin);
    match parse(ctx, &mut pc.pkt) {
        Ok(()) => {}
        Err(ParseError::LinkLocalControl) => {
            let action = link_local_control(&mut pc);
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
    pc.generation = generation;
    pc.key = conntrack::flow_key(&pc.pkt);
    pc.coarse = policy::clock_ns();
    let outcome = if pc.pkt.family == 4 {
        conntrack_step::<true>(&mut pc)
    } else {
        conntrack_step::<false>(&mut pc)
    };
    let tracked = match outcome {
        Established::Done(action) => return action,
        Established::Limited { outcome, rule_id } => return limited(&pc, outcome, rule_id),
        Established::NewFlow => None,
        Established::Recheck { reply } => Some(reply),
    };
    pc.load_source();
    if tracked.is_none() && !source_passes(&pc) {
        // A packet no tracked flow covers: its source is validated before anything else.
        return drop_spoofed(&pc, EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED);
    }
    // The one place the admission chain is entered. Both families meet here again: from now
    // on the conntrack entry is reached by key, not by a pointer into one of two maps, so the
    // verifier walks the admission chain once, not once per map.
    admit(&mut pc, tracked)
}

/// The conntrack lookup and, for a tracked flow, its established path, for one address family
/// (`V4`; see `conntrack::lookup` for why the family is a constant).
#[inline(always)]
fn conntrack_step<const V4: bool>(pc: &mut PacketContext) -> Established {
    let Some(entry) = conntrack::lookup::<V4>(&pc.key) else {
        return Established::NewFlow;
    };
    // SAFETY: a live map value, valid for this program run; see `conntrack` for what
    // concurrent writers on the other CPU may do to it.
    let entry = unsafe { &mut *entry };
    if !conntrack::is_live(pc, entry) {
        // Idle too long: forget it and treat the packet as the start of a new flow.
        conntrack::remove::<V4>(&pc.key);
        return Established::NewFlow;
    }
    established::<V4>(pc, entry)
}

/// What a packet of a tracked flow leads to.
enum Established {
    /// Decided: the TC action.
    Done(i32),
    /// Not part of the tracked flow: decided as a new one.
    NewFlow,
    /// The flow's admission must be decided again (new generation, expired rule); `reply`:
    /// the packet travels the flow's reply way.
    Recheck { reply: bool },
    /// Over a rate limit (`outcome` of `ratelimit::meter_established`, not `PASS`); decided in
    /// `classify`, one place for both families.
    Limited { outcome: u64, rule_id: u32 },
}

/// A packet that matched a live conntrack entry.
#[inline(always)]
fn established<const V4: bool>(pc: &mut PacketContext, entry: &mut FlowValue) -> Established {
    if pc.origin != 0 && entry.validated_ifindex != pc.origin {
        // The first packet of this direction from this origin (or one entering where the
        // flow's packets never did): check it in full, then remember the origin.
        pc.load_source();
        if !source_passes(pc) {
            return Established::Done(drop_spoofed(
                pc,
                EVENT_IDENTITY_UNRESOLVED,
                EVENT_IDENTITY_UNRESOLVED,
            ));
        }
        // The relaxed check after NAT is not remembered: once the origin gets its program, the
        // strict check at its ingress must see the flow's next packet.
        if pc.source.mode != MODE_STRICT_AFTER_NAT {
            entry.validated_ifindex = pc.origin;
        }
        if pc.source.origin_enforced {
            entry.metered_ifindex = pc.origin;
        }
    }
    match conntrack::step::<V4>(pc, entry) {
        Step::Continue => {}
        Step::NewFlow => return Established::NewFlow,
    }
    if conntrack::still_admitted(pc, entry) {
        // Rate limits: metered once per node, where the packet met Tollgate first (not again
        // where it leaves, if it was metered at the ingress it entered by).
        if (entry.rule_limit | entry.sender_limit) != 0
            && (pc.ingress || pc.origin == 0 || entry.metered_ifindex != pc.origin)
        {
            let outcome = ratelimit::meter_established(pc, entry.rule_limit, entry.sender_limit);
            if outcome != ratelimit::PASS {
                return Established::Limited {
                    outcome,
                    rule_id: entry.rule_id,
                };
            }
        }
        return Established::Done(finish(Verdict::AllowEstablished));
    }
    Established::Recheck {
        reply: entry.flags & tollgate_common::flow::FLOW_FLAG_REPLY != 0,
    }
}

/// The packet's source may come from its origin (reverse path; the binding is checked once the
/// identities are known, in `admit`).
#[inline(always)]
fn source_passes(pc: &PacketContext) -> bool {
    pc.source.mode == MODE_NONE || source_ok(pc.ctx, &pc.pkt, pc.source.mode, pc.source.origin)
}

/// The admission chain, for a new flow (`tracked` is `None`) and for a tracked flow whose
/// admission must be decided again (a new policy generation, an expired rule; `tracked` says
/// whether the packet travels its reply way):
///
/// 1. decide: both identities of the flow in its original direction, the rule between them,
///    the verdict; and the sender against its origin's binding;
/// 2. authentication (inside `evaluate`): a rule that requires it allows only while the pair
///    has a valid proof in `TG_AUTH`, and the flow carries the proof's expiry;
/// 3. rate limits: a new flow must pass its rule's limit and its source's quota, as a new
///    connection and as a packet (over either: refused, no conntrack entry); a re-checked flow
///    is metered as a packet under the limits of the live policy;
/// 4. track: a new flow gets its two conntrack entries, a tracked one carries on under the
///    live generation; a tracked flow no longer allowed is cut (both entries removed).
///
/// Inlined at its one call site; what it calls (`evaluate`, `meter`, `track`, `emit`) are
/// BPF-to-BPF calls, so the call chain stays two frames deep within the 512-byte stack.
#[inline(always)]
fn admit(pc: &mut PacketContext, tracked: Option<bool>) -> i32 {
    let reply = tracked.unwrap_or(false);
    let mut e = Evaluation::EMPTY;
    evaluate(pc, reply, &mut e);
    let sender = if reply { e.dst_id } else { e.src_id };
    if !sender_allowed(&pc.source, pc.pkt.family, sender, e.sender_is_node) {
        return drop_spoofed(pc, e.src_id, e.dst_id);
    }
    let d = e.decision;
    // Every way out below meets at one `emit` (each call site of it is verified on its own).
    let (verdict, limit, event) = match d.verdict {
        Verdict::AllowNew | Verdict::AuditWouldDeny => {
            let sender_limit = if reply { e.dst_limit } else { e.src_limit };
            // Metered here unless the packet was metered at the ingress it entered by.
            let metered_here = pc.ingress || !pc.source.origin_enforced;
            let limited_flow = (e.rule_limit | sender_limit) != 0 && metered_here;
            let mut outcome = ratelimit::PASS;
            let passed = match tracked {
                Some(_) => {
                    // Re-admitted first, so that a packet over a limit leaves the flow under
                    // the live generation and the next one is not re-decided again.
                    conntrack::readmit(pc, &e, reply);
                    if limited_flow {
                        outcome = ratelimit::meter(pc, e.rule_limit, sender_limit, 0);
                    }
                    if d.verdict == Verdict::AllowNew {
                        Verdict::AllowEstablished
                    } else {
                        d.verdict
                    }
                }
                None => {
                    if limited_flow {
                        // A connection is a flow that will be tracked: an ICMP error or other
                        // message decided on its own is charged as a packet only (or a peer
                        // could spend a quota with the errors it provokes).
                        let connection = conntrack::is_trackable(&pc.pkt) as u64;
                        outcome = ratelimit::meter(pc, e.rule_limit, sender_limit, connection);
                    }
                    // Refused: no conntrack entry, so its next attempt is new again.
                    if outcome & ratelimit::OUTCOME_MASK != ratelimit::DROP {
                        conntrack::track(pc, &e);
                    }
                    d.verdict
                }
            };
            match outcome & ratelimit::OUTCOME_MASK {
                ratelimit::DROP => (Verdict::DropRateLimited, outcome, true),
                // A would-deny stays the news of a would-denied flow that is also over a limit.
                ratelimit::WOULD_DROP if passed != Verdict::AuditWouldDeny => {
                    (Verdict::AuditWouldDrop, outcome, true)
                }
                // A new flow of a rule with `log: true` is news too (a re-admitted one is not).
                _ => (
                    passed,
                    0,
                    d.verdict == Verdict::AuditWouldDeny || (tracked.is_none() && e.log),
                ),
            }
        }
        denied => {
            let verdict = if tracked.is_some() {
                conntrack::forget(pc, reply);
                Verdict::DenyRevoked
            } else {
                denied
            };
            (verdict, 0, true)
        }
    };
    if event {
        // A refusal for want of a proof tells the agent to run the handshake for the pair.
        let flags = if e.auth_state == auth_state::MISSING || e.auth_state == auth_state::EXPIRED {
            EVENT_FLAG_AUTH_REQUIRED
        } else {
            0
        };
        emit(
            pc,
            verdict,
            d.rule_id,
            identities(e.src_id, e.dst_id),
            limit,
            flags,
        );
    }
    finish(verdict)
}

/// A packet of an established flow over a rate limit (`outcome` from `ratelimit`, not
/// `PASS`): dropped, or in audit passed as a would-drop; an event either way (sampled like
/// every event; the identities are not looked up on this path).
#[inline(always)]
fn limited(pc: &PacketContext, outcome: u64, rule_id: u32) -> i32 {
    let verdict = if outcome & ratelimit::OUTCOME_MASK == ratelimit::DROP {
        Verdict::DropRateLimited
    } else {
        Verdict::AuditWouldDrop
    };
    emit(
        pc,
        verdict,
        rule_id,
        identities(EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED),
        outcome,
        0,
    );
    finish(verdict)
}

/// Drops a packet whose source may not come from where it came from.
#[inline(always)]
fn drop_spoofed(pc: &PacketContext, src_id: u32, dst_id: u32) -> i32 {
    emit(
        pc,
        Verdict::DropSpoofed,
        0,
        identities(src_id, dst_id),
        0,
        0,
    );
    finish(Verdict::DropSpoofed)
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
fn link_local_control(pc: &mut PacketContext) -> i32 {
    let generation = live_generation().unwrap_or(0);
    pc.generation = generation;
    pc.source = source_check(pc.origin, slot_of(generation), pc.ingress);
    pc.source_known = true;
    let source = pc.source;
    let passes = match link_control(pc.ctx, &pc.pkt, &source) {
        LinkControl::Pass => true,
        LinkControl::Spoofed => false,
        LinkControl::CheckBinding => {
            policy::identity_of(6, generation, &pc.pkt.saddr) == source.bound_identity
        }
    };
    if !passes {
        pc.key = conntrack::flow_key(&pc.pkt);
        pc.coarse = policy::clock_ns();
        return drop_spoofed(pc, EVENT_IDENTITY_UNRESOLVED, EVENT_IDENTITY_UNRESOLVED);
    }
    let daddr = &pc.pkt.daddr;
    let from_workload = source.mode == MODE_STRICT || source.mode == MODE_STRICT_AFTER_NAT;
    if from_workload
        && !is_link_local(daddr)
        && daddr[0] != 0xff
        && (generation == 0 || !policy::is_node_address(6, generation, daddr))
    {
        // Decided by policy: the source is read again for the new generation there.
        pc.source_known = false;
        return DECIDE_BY_POLICY;
    }
    finish(Verdict::PassNonIp)
}

/// `link_local_control`'s answer when the message is to be decided like any other packet; no TC
/// action has this value.
const DECIDE_BY_POLICY: i32 = i32::MIN;

/// The decision `tollgate check` reports, for the packet in `ctx` as a new flow arriving on
/// `ctx`'s interface (source validated only when the agent sets `CHECK_MARK_VALIDATE_SOURCE`).
#[inline(always)]
fn check(ctx: &TcContext) -> CheckResult {
    let only = |v: Verdict| CheckResult {
        verdict: v as u32,
        ..CheckResult::default()
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
    let mut pc = new_context(ctx, direction::INGRESS, ifindex, origin);
    if let Err(e) = parse(ctx, &mut pc.pkt) {
        return only(e.verdict());
    }
    let Some(generation) = live_generation() else {
        return only(Verdict::DenyNoPolicy);
    };
    pc.generation = generation;
    pc.load_source();
    if !source_passes(&pc) {
        return CheckResult {
            generation,
            ..only(Verdict::DropSpoofed)
        };
    }
    let mut e = Evaluation::EMPTY;
    evaluate(&pc, false, &mut e);
    let spoofed = !sender_allowed(&pc.source, pc.pkt.family, e.src_id, e.sender_is_node);
    CheckResult {
        verdict: if spoofed {
            Verdict::DropSpoofed as u32
        } else {
            e.decision.verdict as u32
        },
        rule_id: if spoofed { 0 } else { e.decision.rule_id },
        src_identity: e.src_id,
        dst_identity: e.dst_id,
        generation,
        expires_ns: e.decision.expires_ns,
        rule_limit: if spoofed { 0 } else { e.rule_limit },
        src_limit: if spoofed { 0 } else { e.src_limit },
        dst_limit: if spoofed { 0 } else { e.dst_limit },
        auth_state: if spoofed { 0 } else { e.auth_state },
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Benchmark floor: the header parse alone (`cargo xtask bench` shows what the established
/// path costs beyond it). Never attached by the agent; passes everything.
#[classifier]
pub fn tollgate_floor_parse(ctx: TcContext) -> i32 {
    let mut pkt = Packet::EMPTY;
    match parse(&ctx, &mut pkt) {
        Ok(()) => TC_ACT_OK,
        // Not 0: the parse's outcome must stay observable, or it could be optimised away.
        Err(_) => aya_ebpf::bindings::TC_ACT_UNSPEC,
    }
}

/// Benchmark floor: the parse and one conntrack lookup, nothing else. Never attached by the
/// agent; the benchmark attaches it to real traffic too, so every packet passes: `TC_ACT_OK`
/// when the flow was found, `TC_ACT_UNSPEC` (pass, next program) when not.
#[classifier]
pub fn tollgate_floor_lookup(ctx: TcContext) -> i32 {
    let mut pkt = Packet::EMPTY;
    if parse(&ctx, &mut pkt).is_err() {
        return TC_ACT_OK;
    }
    let key = conntrack::flow_key(&pkt);
    let found = if pkt.family == 4 {
        conntrack::lookup::<true>(&key).is_some()
    } else {
        conntrack::lookup::<false>(&key).is_some()
    };
    if found {
        TC_ACT_OK
    } else {
        aya_ebpf::bindings::TC_ACT_UNSPEC
    }
}
