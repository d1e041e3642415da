//! Rate limits: the token buckets of rules and identity quotas, one gate of the admission chain
//! and a check on every established packet of a limited flow.
//!
//! `TG_LIMITS[id]` is a [`LimitBucket`]: per kind (packets, bytes, new connections) a rate, a
//! burst and the bucket's state as one timestamp (GCRA; the arithmetic and why it is one
//! timestamp are in `tollgate_common::ratelimit`). A flow carries the ids of the limits it is
//! metered by in its conntrack entries (`rule_limit`, `sender_limit`), so an established packet
//! of an unlimited flow pays nothing here, and a limited one one array slot per bucket.
//!
//! # Both CPUs at once
//!
//! A bucket is shared by every flow of its rule or identity, on every CPU. Each kind's state is
//! one `u64`, updated with a compare-and-swap (BPF's `cmpxchg`; the BPF target hides Rust's
//! `AtomicU64` read-modify-write methods, so [`Shared`] calls the intrinsics they are made of):
//! exact under any interleaving, no lock to hold and no lock for a verifier to check (a
//! `bpf_spin_lock` would need BTF-described map values, and would serialise the CPUs for the
//! whole update; per-CPU buckets with a share of the rate each would give a flow that only one
//! CPU sees half its rate). `cargo xtask bench` measures it with both CPUs charging one bucket
//! at once: the rate holds to 10^-4, and a packet costs what it costs on one CPU. A CAS that loses to the other
//! CPU is decided again on the value that CPU left, and charged with an atomic add, which
//! cannot fail (a retry loop of compare-and-swaps would be exact too, but each attempt is
//! another branch for the verifier to walk). The counters are atomic adds. Nothing here can
//! lose a charge or count one twice.
//!
//! The agent writes a bucket only while no policy slot names its id (see the contract), so the
//! configuration read here never changes under a packet.
//!
//! # Where a packet is metered
//!
//! Once per node: at the first of Tollgate's hooks it meets. A packet from a workload is
//! metered at its interface's ingress and not again where it leaves toward another workload;
//! the node's own packets, and packets from an interface without Tollgate's program, are
//! metered where they leave (see `main.rs`).

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use aya_ebpf::{macros::map, maps::Array};
use tollgate_common::{
    maps,
    ratelimit::{conform, cost_ns, dither, kind, LIMIT_FLAG_AUDIT, LIMIT_KINDS, MAX_UNITS},
    LimitBucket,
};

use crate::context::PacketContext;

/// `[limit id]` → the limit's rates and bucket state. Index 0 is unused ("no limit").
#[map(name = "TG_LIMITS")]
static LIMITS: Array<LimitBucket> = Array::pinned(maps::LIMITS.max_entries, maps::LIMITS.flags);

/// [`meter`]'s answer: the packet passes unlimited.
pub const PASS: u64 = 0;
/// `outcome & OUTCOME_MASK`: over a limit in audit mode; the packet passes as a would-drop.
pub const WOULD_DROP: u64 = 1;
/// `outcome & OUTCOME_MASK`: over a limit; the packet (or new connection) is dropped.
pub const DROP: u64 = 2;
pub const OUTCOME_MASK: u64 = 0xff;

/// A `u64` of a bucket that both CPUs update: only ever accessed atomically.
#[derive(Clone, Copy)]
struct Shared(*mut u64);

impl Shared {
    const R: AtomicOrdering = AtomicOrdering::Relaxed;

    /// A plain aligned 8-byte load, which the JIT makes one machine load: atomic as it is
    /// (LLVM's BPF backend cannot select an atomic load before CPU v4; a stale value only makes
    /// the compare-and-swap after it fail and retry).
    #[inline(always)]
    fn load(self) -> u64 {
        // SAFETY: `Shared` is only made from an aligned `u64` of a `TG_LIMITS` value, which
        // lives as long as the map; every write to it is atomic.
        unsafe { core::ptr::read_volatile(self.0) }
    }

    #[inline(always)]
    fn compare_exchange(self, old: u64, new: u64) -> Result<u64, u64> {
        // SAFETY: as in `load`.
        match unsafe { atomic_cxchg::<u64, { Self::R }, { Self::R }>(self.0, old, new) } {
            (_, true) => Ok(old),
            (current, false) => Err(current),
        }
    }

    /// An atomic add whose result is not used: BPF's `XADD`, the one read-modify-write of the
    /// CPU version the object is built for (`generic`, v1) besides compare-and-swap; an add that
    /// returns the old value would need v3.
    #[inline(always)]
    fn add(self, v: u64) {
        // SAFETY: as in `load`.
        unsafe { atomic_xadd::<u64, u64, { Self::R }>(self.0, v) };
    }

    #[inline(always)]
    fn sub(self, v: u64) {
        self.add(v.wrapping_neg());
    }
}

/// What one packet is charged, by kind.
struct Units([u64; LIMIT_KINDS]);

/// The kind (bits 8..16) and limit id (bits 32..64) [`meter`] reports with an outcome.
#[inline(always)]
pub fn limit_of(outcome: u64) -> (u8, u32) {
    ((outcome >> 8) as u8, (outcome >> 32) as u32)
}

#[inline(always)]
fn outcome(what: u64, kind: usize, limit: u32) -> u64 {
    what | ((kind as u64) << 8) | ((limit as u64) << 32)
}

/// What this packet is charged, packed for [`tollgate_meter`]: its bytes on the wire (low 32
/// bits, at most `MAX_UNITS[BYTES]`) and its segments (high 32 bits, at most
/// `MAX_UNITS[PACKETS]`).
#[inline(always)]
pub fn packet_units(pc: &PacketContext) -> u64 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (len, segs) = unsafe { ((*pc.ctx.skb.skb).len, (*pc.ctx.skb.skb).gso_segs) };
    let segs = if segs > 1 { segs as u64 } else { 1 };
    // On the wire every segment of a GSO packet carries the headers again.
    let wire = len as u64 + (segs - 1) * pc.pkt.hdr_len as u64;
    min(wire, MAX_UNITS[kind::BYTES]) | (min(segs, MAX_UNITS[kind::PACKETS]) << 32)
}

/// Charges this packet (and, if `connection` is 1, a new connection) to the flow's rule limit
/// and its sender's quota (either may be 0: none). A packet must pass both: if the second
/// refuses, what the first took is given back. Returns `PASS`, or an outcome (`WOULD_DROP` or
/// `DROP`, the kind and the limit id that said so; see [`limit_of`]). `now`: `pc.coarse`;
/// `units`: [`packet_units`].
///
/// A global function (exported, scalar arguments only): the verifier checks it once, on its
/// own, instead of once for every path of the classifier that reaches one of its callers (the
/// established paths of both families and the admission chain). As a static BPF-to-BPF call
/// it took the classifier past the verifier's million-instruction budget.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tollgate_meter(
    rule_limit: u32,
    sender_limit: u32,
    connection: u64,
    now: u64,
    units: u64,
) -> u64 {
    let units = Units([units >> 32, units & 0xffff_ffff, connection & 1]);
    let mut taken = [0u64; LIMIT_KINDS];
    let mut would = PASS;
    if rule_limit != 0 {
        let r = charge(rule_limit, &units, now, &mut taken);
        if r & OUTCOME_MASK == DROP {
            return r;
        }
        would = r;
    }
    if sender_limit != 0 {
        let mut unused = [0u64; LIMIT_KINDS];
        let s = charge(sender_limit, &units, now, &mut unused);
        if s & OUTCOME_MASK == DROP {
            if rule_limit != 0 {
                give_back(rule_limit, &taken);
            }
            return s;
        }
        if would == PASS {
            would = s;
        }
    }
    would
}

/// The established path's way through a flow's buckets: each bucket that limits at most one of
/// packets and bytes is charged inline, in one compare-and-swap; only a bucket that limits both,
/// one over its rate or one the other CPU changed in between goes through [`tollgate_meter`]
/// (which counts and decides as always). What the inline charge took is given back if the meter
/// then drops the packet.
///
/// One call where the meter took two: through the meter's call and the per-kind call inside
/// it a bucket added 26 ns to an established packet in the runner (0.79x the empty classifier;
/// the compare-and-swap itself about 3 ns of it). Inlined into the classifier it cost 6 ns,
/// but the verifier walked it for every way the classifier reaches it: 918k instructions
/// verified of the million allowed, against 215k before. A global function of its own, it is
/// verified once.
#[inline(always)]
pub fn meter_established(pc: &PacketContext, rule_limit: u32, sender_limit: u32) -> u64 {
    tollgate_meter_established(rule_limit, sender_limit, pc.coarse, packet_units(pc))
}

/// [`meter_established`]'s body: a global function, verified once on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tollgate_meter_established(
    rule_limit: u32,
    sender_limit: u32,
    now: u64,
    units: u64,
) -> u64 {
    let rule = quick_take(rule_limit, units, now);
    let sender = quick_take(sender_limit, units, now);
    let rule_left = if rule == QUICK_UNDECIDED {
        rule_limit
    } else {
        0
    };
    let sender_left = if sender == QUICK_UNDECIDED {
        sender_limit
    } else {
        0
    };
    if rule_left | sender_left == 0 {
        return PASS;
    }
    let outcome = tollgate_meter(rule_left, sender_left, 0, now, units);
    if outcome & OUTCOME_MASK == DROP {
        quick_give_back(rule_limit, rule);
        quick_give_back(sender_limit, sender);
    }
    outcome
}

/// [`quick_take`]: the bucket must go through [`tollgate_meter`]; nothing was charged.
const QUICK_UNDECIDED: u64 = u64::MAX;
/// [`quick_take`]'s answer packs the kind charged above the cost.
const QUICK_KIND_SHIFT: u32 = 62;

/// Charges the packet to bucket `id` (0: none) if it limits at most one of packets and bytes and
/// one compare-and-swap settles it: 0 if there was nothing to charge, else the cost charged
/// with its kind in the top bits; `QUICK_UNDECIDED` otherwise (over the rate, both kinds
/// limited, or the other CPU changed the bucket in between), with nothing charged.
#[inline(always)]
fn quick_take(id: u32, units: u64, now: u64) -> u64 {
    if id == 0 {
        return 0;
    }
    let Some(bucket) = LIMITS.get_ptr_mut(id) else {
        return 0;
    };
    let bucket = bucket as *mut LimitBucket;
    // SAFETY: a `TG_LIMITS` value; its configuration only changes while no policy names it.
    let (packets, bytes) = unsafe {
        (
            (*bucket).rates[kind::PACKETS].is_set(),
            (*bucket).rates[kind::BYTES].is_set(),
        )
    };
    let (k, n) = match (packets, bytes) {
        (false, false) => return 0,
        (true, false) => (kind::PACKETS, units >> 32),
        (false, true) => (kind::BYTES, units & 0xffff_ffff),
        (true, true) => return QUICK_UNDECIDED,
    };
    // SAFETY: as above; the state only accessed atomically.
    let rate = unsafe { (*bucket).rates[k] };
    let tat = Shared(unsafe { &raw mut (*bucket).tat_ns[k] });
    let seen = tat.load();
    let cost = nonzero(cost_ns(n, &rate, dither(seen)));
    let Some(next) = conform(seen, now, cost, &rate) else {
        return QUICK_UNDECIDED;
    };
    match tat.compare_exchange(seen, next) {
        Ok(_) => cost | ((k as u64) << QUICK_KIND_SHIFT),
        Err(_) => QUICK_UNDECIDED,
    }
}

/// Gives back what [`quick_take`] charged bucket `id` (`taken`: its answer).
#[inline(always)]
fn quick_give_back(id: u32, taken: u64) {
    if id == 0 || taken == 0 || taken == QUICK_UNDECIDED {
        return;
    }
    let k = (taken >> QUICK_KIND_SHIFT) as usize;
    let cost = taken & ((1 << QUICK_KIND_SHIFT) - 1);
    if k >= LIMIT_KINDS {
        return;
    }
    if let Some(bucket) = LIMITS.get_ptr_mut(id) {
        // SAFETY: an aligned `u64` of a `TG_LIMITS` value, only accessed atomically.
        Shared(unsafe { &raw mut (*(bucket as *mut LimitBucket)).tat_ns[k] }).sub(cost);
    }
}

/// [`tollgate_meter`] for the packet in `pc`.
#[inline(always)]
pub fn meter(pc: &PacketContext, rule_limit: u32, sender_limit: u32, connection: u64) -> u64 {
    tollgate_meter(
        rule_limit,
        sender_limit,
        connection,
        pc.coarse,
        packet_units(pc),
    )
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

/// A kind's charge that did not conform.
const OVER: u64 = u64::MAX;

/// Charges `units` to every kind bucket `id` limits; on a refusal gives back what this bucket
/// took. `taken` receives the costs charged, for the caller to give back.
///
/// Shaped for the verifier: each kind is one call that returns a cost or `OVER`, and only the
/// rare refusal branches further (`refuse`). Branching per kind and per compare-and-swap
/// attempt in one body multiplied the states it walks past its million-instruction budget.
#[inline(always)]
fn charge(id: u32, units: &Units, now: u64, taken: &mut [u64; LIMIT_KINDS]) -> u64 {
    let Some(bucket) = LIMITS.get_ptr_mut(id) else {
        return PASS;
    };
    let bucket = bucket as *mut LimitBucket;
    let mut over = 0u64;
    for k in 0..LIMIT_KINDS {
        // SAFETY: a `TG_LIMITS` value; its configuration only changes while no policy names
        // it.
        let limited = unsafe { (*bucket).rates[k].is_set() };
        if units.0[k] == 0 || !limited {
            continue;
        }
        let cost = tollgate_take(id, k as u64, units.0[k], now);
        if cost == OVER {
            over |= 1 << k;
        } else {
            taken[k] = cost;
        }
    }
    if over == 0 {
        return PASS;
    }
    refuse(bucket, id, over, taken)
}

/// Charges `n` units of kind `k` to `bucket`: the cost charged (0: nothing to charge, the kind
/// is not limited or the packet has none of it; at least 1 ns otherwise), or `OVER`.
///
/// One compare-and-swap; if the other CPU changed the bucket in between, the decision is made
/// again on the value it left and charged with an atomic add, which cannot fail.
///
/// A global function like [`tollgate_meter`], and for the same reason: verified once, its
/// result an unknown number to its callers, where as a static call every way through it
/// multiplied the ways through its caller.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tollgate_take(id: u32, k: u64, n: u64, now: u64) -> u64 {
    let k = k as usize;
    if k >= LIMIT_KINDS {
        return 0;
    }
    let Some(bucket) = LIMITS.get_ptr_mut(id) else {
        return 0;
    };
    let bucket = bucket as *mut LimitBucket;
    // SAFETY: a `TG_LIMITS` value, valid for the program run; the configuration is only
    // written by the agent while no policy names this bucket.
    let rate = unsafe { (*bucket).rates[k] };
    if n == 0 || !rate.is_set() {
        return 0;
    }
    // SAFETY: an aligned `u64` of the bucket, only accessed atomically.
    let tat = Shared(unsafe { &raw mut (*bucket).tat_ns[k] });
    let seen = tat.load();
    let cost = nonzero(cost_ns(n, &rate, dither(seen)));
    let Some(next) = conform(seen, now, cost, &rate) else {
        return OVER;
    };
    let current = match tat.compare_exchange(seen, next) {
        Ok(_) => return cost,
        Err(current) => current,
    };
    if conform(current, now, cost, &rate).is_none() {
        return OVER;
    }
    // (A bucket left behind `now` is not brought up to it by an add; the next compare-and-swap
    // does, and the cost is what counts.)
    tat.add(cost);
    cost
}

/// Bucket `id` refused the kinds in `over`: counts them, and unless the limit is in audit,
/// gives back what the packet was charged for the other kinds.
#[inline(never)]
fn refuse(bucket: *mut LimitBucket, id: u32, over: u64, taken: &mut [u64; LIMIT_KINDS]) -> u64 {
    // SAFETY: as in `tollgate_take`: configuration read, counters and state only atomically.
    let audit = unsafe { (*bucket).flags } & LIMIT_FLAG_AUDIT != 0;
    let first = if over & 1 != 0 {
        0
    } else if over & 2 != 0 {
        1
    } else {
        2
    };
    for k in 0..LIMIT_KINDS {
        if over & (1 << k) != 0 {
            let counter = if audit {
                // SAFETY: as above.
                unsafe { &raw mut (*bucket).would_drop[k] }
            } else {
                // SAFETY: as above.
                unsafe { &raw mut (*bucket).dropped[k] }
            };
            Shared(counter).add(1);
        }
    }
    if audit {
        return outcome(WOULD_DROP, first, id);
    }
    for k in 0..LIMIT_KINDS {
        if taken[k] != 0 {
            // SAFETY: as above.
            Shared(unsafe { &raw mut (*bucket).tat_ns[k] }).sub(taken[k]);
            taken[k] = 0;
        }
    }
    outcome(DROP, first, id)
}

#[inline(always)]
fn nonzero(cost: u64) -> u64 {
    if cost == 0 {
        1
    } else {
        cost
    }
}

/// Gives back what [`charge`] took from bucket `id` for a packet another bucket refused.
#[inline(never)]
fn give_back(id: u32, taken: &[u64; LIMIT_KINDS]) {
    let Some(bucket) = LIMITS.get_ptr_mut(id) else {
        return;
    };
    let bucket = bucket as *mut LimitBucket;
    for k in 0..LIMIT_KINDS {
        if taken[k] != 0 {
            // SAFETY: as in `charge`.
            Shared(unsafe { &raw mut (*bucket).tat_ns[k] }).sub(taken[k]);
        }
    }
}
