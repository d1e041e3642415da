//! Events for the agent and the packet counters.
//!
//! Every packet bumps one per-CPU counter for its verdict (`TG_COUNTERS`). Denies, would-denies,
//! revoked flows and spoofed packets also put a `FlowEvent` on the `TG_EVENTS` ring buffer,
//! sampled per edge and CPU (`tollgate_common::sampler`) so a flood or a SYN retry storm costs a
//! counter, not an event, per packet; what the sampler holds back is counted exactly
//! (`COUNTER_EVENTS_SUPPRESSED`) and reported with the edge's next event.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use tollgate_common::{
    flow::event_kind,
    maps, proto,
    sampler::{edge_hash, edge_tail, slot_of_edge, SAMPLER_BUDGET_SLOT},
    verdict::{COUNTER_EVENTS_LOST, COUNTER_EVENTS_SUPPRESSED},
    FlowEvent, SamplerSlot, Verdict,
};

use crate::{context::PacketContext, policy::boot_ns};

/// Per-CPU packet counters: `[verdict as u32]`, then `COUNTER_EVENTS_LOST` and
/// `COUNTER_EVENTS_SUPPRESSED`.
#[map(name = "TG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::pinned(maps::COUNTERS.max_entries, maps::COUNTERS.flags);

/// `FlowEvent`s for the agent.
#[map(name = "TG_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(maps::EVENTS.max_entries, maps::EVENTS.flags);

/// The agent is woken when this much is waiting in `TG_EVENTS`; below it, it collects events
/// on its own timer (every 100 ms). A wakeup per event cost about 6 µs on the packet path of
/// a denied packet in this VM, against 0.5 µs for the whole deny without it.
const WAKEUP_BYTES: u64 = 64 * 1024;
/// A `FlowEvent` on the ring: the kernel's 8-byte record header and the event.
const RECORD_BYTES: u64 = 8 + core::mem::size_of::<FlowEvent>() as u64;

/// Per-CPU sampler slots: `[slot_of_edge(edge)]` per edge, `[SAMPLER_BUDGET_SLOT]` the CPU's
/// event budget.
#[map(name = "TG_EVT_SAMPLER")]
static EVT_SAMPLER: PerCpuArray<SamplerSlot> =
    PerCpuArray::pinned(maps::EVENT_SAMPLER.max_entries, maps::EVENT_SAMPLER.flags);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: only this CPU writes it, and a program run is not preempted.
        unsafe { *c += 1 };
    }
}

/// Counts the packet under its verdict and gives the TC action.
#[inline(always)]
pub fn finish(v: Verdict) -> i32 {
    count(v as u32);
    if v.passes() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// The identities of an event, packed for [`emit`]: source in the high half.
#[inline(always)]
pub fn identities(src_id: u32, dst_id: u32) -> u64 {
    ((src_id as u64) << 32) | dst_id as u64
}

/// The event being reported, per CPU: [`emit`] writes it, [`tollgate_emit`] reads it. A program
/// run is not preempted and runs on one CPU, so the two see the same slot and nothing else
/// writes it in between.
#[map(name = "TG_EVT_DRAFT")]
static EVT_DRAFT: PerCpuArray<FlowEvent> =
    PerCpuArray::pinned(maps::EVENT_DRAFT.max_entries, maps::EVENT_DRAFT.flags);

/// Reports a decision: puts a `FlowEvent` on the ring buffer unless the sampler holds it back.
/// `ids`: see [`identities`]; `limit`: for a rate-limit verdict, the kind (bits 8..16) and limit
/// id (bits 32..64) as `ratelimit::meter` reports them, else 0; `flags`: `EVENT_FLAG_*`.
///
/// Inlined at each call site, it only writes the event's fields into this CPU's draft slot;
/// the sampling, the ring-buffer reserve and the wakeup are in [`tollgate_emit`], a global
/// function the verifier checks once on its own. As a static call the verifier walked all of
/// it again for every state the classifier reaches it in (about 100k instructions each time a
/// path to it was added).
#[inline(always)]
pub fn emit(pc: &PacketContext, verdict: Verdict, rule_id: u32, ids: u64, limit: u64, flags: u32) {
    let (limit_kind, limit_id) = crate::ratelimit::limit_of(limit);
    let pkt = &pc.pkt;
    let (sport, dport) = match pkt.proto {
        proto::TCP | proto::UDP => (u16::from_be(pkt.sport), u16::from_be(pkt.dport)),
        proto::ICMP | proto::ICMPV6 => (pkt.icmp_type as u16, 0),
        _ => (0, 0),
    };
    let Some(draft) = EVT_DRAFT.get_ptr_mut(0) else {
        // Cannot happen (index 0 of a one-entry array); counted as lost rather than unseen.
        count(COUNTER_EVENTS_LOST);
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map, written and read within this program run.
    // Field by field, straight into the map: a whole `FlowEvent` built first would take 88
    // bytes of the caller's stack frame.
    unsafe {
        let d = &mut *draft;
        d.kind = event_kind::VERDICT;
        d.size = core::mem::size_of::<FlowEvent>() as u16;
        d.verdict = verdict as u32;
        d.generation = pc.generation;
        d.ifindex = pc.ifindex;
        d.src_identity = (ids >> 32) as u32;
        d.dst_identity = ids as u32;
        d.rule_id = rule_id;
        d.saddr = pkt.saddr;
        d.daddr = pkt.daddr;
        d.sport = sport;
        d.dport = dport;
        d.proto = pkt.proto;
        d.family = pkt.family;
        d.direction = pc.dir;
        d.limit_kind = limit_kind;
        d.limit_id = limit_id;
        d.flags = flags;
    }
    tollgate_emit(pc.coarse);
}

/// Sends this CPU's draft event (see [`emit`]): asks the sampler, reserves room on the ring
/// buffer, copies the event there with its timestamp and the count the sampler held back
/// before it, and wakes the agent when enough is waiting. `now`: the datapath's idle clock,
/// for the sampler. What the sampler holds back and what finds no room are counted.
///
/// A global BPF function: exported (so the verifier checks it once, with no knowledge of its
/// caller's state) and taking only scalars; it returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tollgate_emit(now: u64) -> u64 {
    let Some(draft) = EVT_DRAFT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, written by `emit` in this program run and only touched by it;
    // worked on in place (a copy would take 96 bytes of a stack the caller's frame shares).
    let event = unsafe { &mut *draft };
    let Some(suppressed) = sampled(event, now) else {
        count(COUNTER_EVENTS_SUPPRESSED);
        return 0;
    };
    event.timestamp_ns = boot_ns();
    event.suppressed = suppressed;
    let Some(mut slot) = EVENTS.reserve::<FlowEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return 0;
    };
    // SAFETY: the reserved record has room for one FlowEvent; the draft is a whole one.
    unsafe { core::ptr::copy_nonoverlapping(draft as *const FlowEvent, slot.as_mut_ptr(), 1) };
    // Wake the agent only with the event that takes the waiting data past WAKEUP_BYTES (the
    // reserved record counts already): forcing a wakeup with every event above it made each
    // pay for one while the reader was behind. A wakeup lost to two CPUs crossing at once is
    // made up by the agent's timer.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let wakeup = if waiting >= WAKEUP_BYTES && waiting < WAKEUP_BYTES + RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    slot.submit(wakeup as u64);
    0
}

/// The sampler's answer for the event's edge: `Some(suppressed before it)` to send.
#[inline(always)]
fn sampled(event: &FlowEvent, now: u64) -> Option<u32> {
    let mut words = [0u32; 8];
    for i in 0..4 {
        words[i] = u32::from_ne_bytes([
            event.saddr[4 * i],
            event.saddr[4 * i + 1],
            event.saddr[4 * i + 2],
            event.saddr[4 * i + 3],
        ]);
        words[4 + i] = u32::from_ne_bytes([
            event.daddr[4 * i],
            event.daddr[4 * i + 1],
            event.daddr[4 * i + 2],
            event.daddr[4 * i + 3],
        ]);
    }
    let edge = edge_hash(
        words,
        edge_tail(event.family, event.proto, event.dport, event.verdict),
    );
    let (Some(slot), Some(budget)) = (
        EVT_SAMPLER.get_ptr_mut(slot_of_edge(edge)),
        EVT_SAMPLER.get_ptr_mut(SAMPLER_BUDGET_SLOT),
    ) else {
        // Cannot happen (both indexes are in range); send rather than lose the event.
        return Some(0);
    };
    // SAFETY: per-CPU slots: only this CPU touches them and a program run is not preempted;
    // the two indexes differ (`slot_of_edge` stays below the budget slot).
    unsafe { tollgate_common::sample(&mut *slot, &mut *budget, edge, now) }
}
