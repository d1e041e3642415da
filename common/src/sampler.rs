//! Deny-event sampling, so a flood costs counters, not events.
//!
//! A SYN retry storm or a scan would otherwise put one event on the ring buffer per packet.
//! Events are grouped by *edge*: family, protocol, both addresses, destination port and
//! verdict (not the source port, so retries and reconnects of one client fall together). Each
//! CPU keeps a small direct-mapped table (`TG_EVT_SAMPLER`, [`SAMPLER_SLOTS`] slots, per-CPU so
//! no other CPU writes it): an edge hashes to one slot, and within [`SAMPLE_INTERVAL_NS`] of the
//! last event that slot let through, further events of the same edge are suppressed and counted
//! in the slot. The next event let through carries that count (`FlowEvent::suppressed`). Two
//! edges sharing a slot evict each other: the evicted edge's count then only survives in the
//! global `events_suppressed` counter, which is exact. On top, each CPU lets at most
//! [`EVENT_BUDGET`] events through per interval whatever their edges (the last slot keeps that
//! budget), so a flood of distinct forged sources is bounded too.
//!
//! Packet counters are never sampled.

/// Slots per CPU: the last one is the budget, the others hold edges.
pub const SAMPLER_SLOTS: u32 = 1024;
/// Index of the budget slot.
pub const SAMPLER_BUDGET_SLOT: u32 = SAMPLER_SLOTS - 1;
/// One event per edge and CPU per interval.
pub const SAMPLE_INTERVAL_NS: u64 = 1_000_000_000;
/// Events per CPU and interval, all edges together.
pub const EVENT_BUDGET: u32 = 1_000;

/// Value of `TG_EVT_SAMPLER[i]` (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplerSlot {
    /// The edge hash ([`edge_hash`], never 0) this slot tracks; 0 = empty. In the budget slot:
    /// unused.
    pub edge: u64,
    /// The datapath's idle clock when the current interval started.
    pub window_start_ns: u64,
    /// Edge slots: events suppressed since the last one let through. Budget slot: events let
    /// through in the current interval.
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SamplerSlot>() == 24);

/// The slot of `edge`.
#[inline(always)]
pub const fn slot_of_edge(edge: u64) -> u32 {
    // The hash's high bits are its best mixed ones.
    ((edge >> 40) as u32) % (SAMPLER_SLOTS - 1)
}

/// A 64-bit hash of an edge: `words` are the addresses (IPv4 in the last word, others 0),
/// `tail` packs protocol, destination port, family and verdict. Never 0 (0 marks an empty slot).
#[inline(always)]
pub const fn edge_hash(words: [u32; 8], tail: u64) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = tail.wrapping_mul(K);
    let mut i = 0;
    while i < 8 {
        h = (h ^ words[i] as u64).wrapping_mul(K);
        h ^= h >> 29;
        i += 1;
    }
    h | 1
}

/// Packs the non-address parts of an edge for [`edge_hash`].
#[inline(always)]
pub const fn edge_tail(family: u8, proto: u8, dport: u16, verdict: u32) -> u64 {
    (family as u64) << 56 | (proto as u64) << 48 | (dport as u64) << 32 | verdict as u64
}

/// Whether the event of `edge` at `now_ns` goes out; `Some(n)`: yes, and `n` events of this
/// edge were suppressed before it. `slot` is the edge's slot, `budget` the CPU's budget slot.
/// The clock may step back (it is per-CPU coarse time read on different CPUs over a flow's
/// life, but each slot is only touched by its own CPU): a window that seems to start in the
/// future is treated as over.
#[inline(always)]
pub fn sample(
    slot: &mut SamplerSlot,
    budget: &mut SamplerSlot,
    edge: u64,
    now_ns: u64,
) -> Option<u32> {
    let same_edge = slot.edge == edge;
    if same_edge && within(slot.window_start_ns, now_ns) {
        slot.count = slot.count.saturating_add(1);
        return None;
    }
    if !within(budget.window_start_ns, now_ns) {
        budget.window_start_ns = now_ns;
        budget.count = 0;
    }
    if budget.count >= EVENT_BUDGET {
        // Over budget: suppressed. The edge keeps its slot (or takes it) so its count carries.
        if !same_edge {
            slot.edge = edge;
            slot.count = 0;
            slot.window_start_ns = now_ns;
        }
        slot.count = slot.count.saturating_add(1);
        return None;
    }
    budget.count += 1;
    let suppressed = if same_edge { slot.count } else { 0 };
    slot.edge = edge;
    slot.window_start_ns = now_ns;
    slot.count = 0;
    Some(suppressed)
}

#[inline(always)]
const fn within(start_ns: u64, now_ns: u64) -> bool {
    now_ns >= start_ns && now_ns - start_ns < SAMPLE_INTERVAL_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: u64 = 0x1234_5678_9abc_def1;
    const E2: u64 = 0x0fed_cba9_8765_4321;
    const SEC: u64 = SAMPLE_INTERVAL_NS;

    fn fresh() -> (SamplerSlot, SamplerSlot) {
        (SamplerSlot::default(), SamplerSlot::default())
    }

    #[test]
    fn the_first_event_of_an_edge_goes_out() {
        let (mut s, mut b) = fresh();
        assert_eq!(sample(&mut s, &mut b, E1, 5 * SEC), Some(0));
    }

    #[test]
    fn repeats_within_the_interval_are_counted_and_reported_with_the_next() {
        let (mut s, mut b) = fresh();
        let t = 10 * SEC;
        assert_eq!(sample(&mut s, &mut b, E1, t), Some(0));
        for i in 1..=500 {
            assert_eq!(sample(&mut s, &mut b, E1, t + i), None);
        }
        assert_eq!(sample(&mut s, &mut b, E1, t + SEC - 1), None);
        assert_eq!(sample(&mut s, &mut b, E1, t + SEC), Some(501));
        assert_eq!(sample(&mut s, &mut b, E1, t + SEC + 1), None);
    }

    #[test]
    fn another_edge_in_the_slot_evicts_it_and_goes_out() {
        let (mut s, mut b) = fresh();
        assert_eq!(sample(&mut s, &mut b, E1, SEC), Some(0));
        assert_eq!(sample(&mut s, &mut b, E1, SEC + 1), None);
        assert_eq!(sample(&mut s, &mut b, E2, SEC + 2), Some(0));
        // E1's count went with its slot; its next event starts afresh.
        assert_eq!(sample(&mut s, &mut b, E1, SEC + 3), Some(0));
    }

    #[test]
    fn the_budget_bounds_events_of_distinct_edges() {
        let mut b = SamplerSlot::default();
        let t = 100 * SEC;
        let mut out = 0;
        for i in 0..(EVENT_BUDGET as u64 + 500) {
            let mut s = SamplerSlot::default();
            if sample(&mut s, &mut b, E1 ^ (i << 1), t).is_some() {
                out += 1;
            }
        }
        assert_eq!(out, EVENT_BUDGET);
        // A new interval restores it.
        let mut s = SamplerSlot::default();
        assert_eq!(sample(&mut s, &mut b, E2, t + SEC), Some(0));
    }

    #[test]
    fn over_budget_an_edge_keeps_counting_in_its_slot() {
        let (mut s, mut b) = fresh();
        b.window_start_ns = SEC;
        b.count = EVENT_BUDGET;
        assert_eq!(sample(&mut s, &mut b, E1, SEC + 1), None);
        assert_eq!(sample(&mut s, &mut b, E1, SEC + 2), None);
        assert_eq!(s.count, 2);
        // Next interval: out, with what was suppressed.
        assert_eq!(sample(&mut s, &mut b, E1, 2 * SEC + 1), Some(2));
    }

    #[test]
    fn a_clock_behind_the_window_start_ends_the_window() {
        let (mut s, mut b) = fresh();
        assert_eq!(sample(&mut s, &mut b, E1, 50 * SEC), Some(0));
        assert_eq!(sample(&mut s, &mut b, E1, 40 * SEC), Some(0));
    }

    #[test]
    fn counts_saturate() {
        let (mut s, mut b) = fresh();
        assert_eq!(sample(&mut s, &mut b, E1, SEC), Some(0));
        s.count = u32::MAX;
        assert_eq!(sample(&mut s, &mut b, E1, SEC + 1), None);
        assert_eq!(s.count, u32::MAX);
    }

    #[test]
    fn edge_hashes_are_never_zero_and_separate_ports_and_verdicts() {
        let a = [0, 0, 0, 0x0a00_0001, 0, 0, 0, 0x0a00_0002];
        let h1 = edge_hash(a, edge_tail(4, 6, 8080, 2));
        let h2 = edge_hash(a, edge_tail(4, 6, 8081, 2));
        let h3 = edge_hash(a, edge_tail(4, 6, 8080, 3));
        assert!(h1 != 0 && h2 != 0 && h3 != 0);
        assert!(h1 != h2 && h1 != h3 && h2 != h3);
        assert_ne!(edge_hash([0; 8], 0), 0);
        assert!(slot_of_edge(h1) < SAMPLER_BUDGET_SLOT);
        assert!(slot_of_edge(u64::MAX) < SAMPLER_BUDGET_SLOT);
    }
}
