//! Rate limits: the token buckets the kernel keeps, and their arithmetic.
//!
//! A limit (a rule's `rateLimit`, or an identity's quota in `spec.rateLimits`) is one
//! [`LimitBucket`] in `TG_LIMITS`, an array indexed by the bucket's [`LimitId`] (0: no limit).
//! A bucket meters up to three kinds ([`kind`]): packets, bytes and new connections, each with
//! its own rate and burst.
//!
//! # The bucket as one timestamp
//!
//! Each kind is a token bucket written the way GCRA (the generic cell rate algorithm of ATM and
//! of most policers) writes it: instead of a token count and the time of the last refill, one
//! "theoretical arrival time" (`tat`), the instant at which the bucket would be full again.
//! With `interval` the time one unit (a packet, a byte, a connection) is worth at the configured
//! rate, and `tolerance` the burst expressed as time:
//!
//! - tokens available at `now` = `(now + tolerance - tat) / interval` (the bucket is full, and
//!   refills no further, once `tat <= now`: the burst cap);
//! - a packet conforms if the bucket is not in debt beyond the burst, `max(tat, now) - now <=
//!   tolerance`, and then costs `units × interval`: `tat = max(tat, now) + cost`.
//!
//! Refill is the passing of `now`: nothing is multiplied by elapsed time, so nothing can
//! overflow however long a bucket sits idle, and a whole bucket is one `u64` per kind. That is
//! what keeps it exact when both CPUs send at once: the kernel updates `tat` with one
//! compare-and-swap (see `ebpf/src/ratelimit.rs`), where a count plus a timestamp would need a
//! spin lock, and per-CPU shares would halve the rate of a flow that only one CPU sees.
//!
//! A packet is admitted when the bucket is not in debt beyond the burst, whatever its size, and
//! pays its whole cost: a 64 KB GSO packet passes a byte bucket whose burst is smaller and
//! leaves it in debt, which later packets wait out. The long-run rate is exact either way, and a
//! byte limit never becomes a wall no GSO packet can pass.
//!
//! # Numbers
//!
//! Times are nanoseconds of the datapath's tick clock (`TG_ACTIVE[ACTIVE_NS_PER_JIFFY_INDEX]`).
//! An interval has a fractional part in units of 2^-32 ns, so a byte rate of 10 GB/s (0.1 ns a
//! byte) is exact to 10^-9; the fraction of a packet's cost is rounded by a dither the caller
//! takes from the clock, unbiased over many packets. The agent builds the rates
//! ([`LimitRate::new`]) from validated numbers, which bound every product below 2^57.

/// Index of a bucket in `TG_LIMITS`; 0 is "no limit".
pub type LimitId = u32;

/// The kinds a bucket meters, as indexes of its per-kind arrays.
pub mod kind {
    /// Packets; a GSO packet counts as the segments it leaves as.
    pub const PACKETS: usize = 0;
    /// Bytes on the wire; a GSO packet counts every segment's headers.
    pub const BYTES: usize = 1;
    /// New connections (new flows): only the first packet of a flow is charged.
    pub const CONNECTIONS: usize = 2;
    /// Names in the CLI and JSON, by index.
    pub const NAMES: [&str; 3] = ["packets", "bytes", "connections"];
}
pub const LIMIT_KINDS: usize = 3;

/// The most units one packet is charged for, by kind: the kernel clamps to these, and the
/// agent's bounds on rates keep `MAX_UNITS × interval` below 2^57.
pub const MAX_UNITS: [u64; LIMIT_KINDS] = [1 << 16, 1 << 20, 1];

/// The limit is in audit mode (its policy's, its rule's or its own `mode: audit`): over the
/// rate a packet passes and counts as a would-drop.
pub const LIMIT_FLAG_AUDIT: u32 = 1 << 0;

/// One kind's rate in a bucket. `interval_ns == 0 && interval_frac == 0`: the kind is not
/// limited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LimitRate {
    /// Whole nanoseconds one unit is worth.
    pub interval_ns: u64,
    /// The burst as time: how far ahead of now `tat` may be for a packet to conform.
    pub tolerance_ns: u64,
    /// How far ahead of now `tat` can get by this rate's own arithmetic; beyond it the clock
    /// went back (never in a running system), and the bucket starts over rather than blocking.
    pub horizon_ns: u64,
    /// The fraction of a nanosecond one unit is worth beyond `interval_ns`, in 2^-32 ns.
    pub interval_frac: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<LimitRate>() == 32);

impl LimitRate {
    pub const NONE: LimitRate = LimitRate {
        interval_ns: 0,
        tolerance_ns: 0,
        horizon_ns: 0,
        interval_frac: 0,
        _pad: 0,
    };

    #[inline(always)]
    pub const fn is_set(&self) -> bool {
        self.interval_ns != 0 || self.interval_frac != 0
    }
}

/// Value of `TG_LIMITS`. The agent writes a whole bucket only while no policy slot refers to
/// its id (a new limit, or one changed, gets a fresh id); from then on the kernel alone writes
/// it, and only `tat_ns` (compare-and-swap) and the counters (atomic adds).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitBucket {
    /// What the limit is (its owner, rates, bursts and mode), hashed by the agent: a policy
    /// swap keeps a bucket whose fingerprint the new policy has, and a restarted agent finds
    /// its buckets by it. 0: the id is free.
    pub fingerprint: u64,
    /// `LIMIT_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
    pub rates: [LimitRate; LIMIT_KINDS],
    /// Per kind: the instant the bucket is full again (see the module comment); 0 = full.
    pub tat_ns: [u64; LIMIT_KINDS],
    /// Per kind: packets dropped (or connections refused) by this limit.
    pub dropped: [u64; LIMIT_KINDS],
    /// Per kind: packets that would have been dropped, passed because the limit is in audit.
    pub would_drop: [u64; LIMIT_KINDS],
}
const _: () = assert!(core::mem::size_of::<LimitBucket>() == 184);

/// The dither for the next cost of a bucket whose `tat` is `tat`: the state changes with every
/// packet that passes, so this varies from packet to packet without a random-number helper.
#[inline(always)]
pub const fn dither(tat: u64) -> u32 {
    (tat as u32).wrapping_mul(0x9e37_79b9)
}

/// The cost of `units` at `rate`, in nanoseconds: `units × interval`, the fraction rounded up
/// when `dither` (uniform over u32) says so, so the rounding averages out. `units` must not
/// exceed `MAX_UNITS` of the rate's kind.
#[inline(always)]
pub const fn cost_ns(units: u64, rate: &LimitRate, dither: u32) -> u64 {
    units * rate.interval_ns + ((units * rate.interval_frac as u64 + dither as u64) >> 32)
}

/// One GCRA step: `Some(new tat)` if a packet of `cost` conforms at `now`, `None` if the
/// bucket is in debt past its burst. A `tat` beyond the rate's horizon (the clock went back)
/// is treated as a full bucket.
#[inline(always)]
pub const fn conform(tat: u64, now: u64, cost: u64, rate: &LimitRate) -> Option<u64> {
    let ahead = tat.saturating_sub(now);
    if ahead > rate.horizon_ns {
        return Some(now.saturating_add(cost));
    }
    if ahead > rate.tolerance_ns {
        return None;
    }
    let base = if tat > now { tat } else { now };
    Some(base.saturating_add(cost))
}

/// Why a rate cannot be built; the agent's validation reports these with the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateError {
    /// Zero units per period, or a zero burst.
    Zero,
    /// More than one unit per nanosecond per 2^32 (not representable), or a period of 0.
    TooFast,
    /// The burst stands for more than `MAX_BURST_WINDOW_NS` of the rate.
    BurstTooLong,
}

/// The longest burst accepted, as time at the configured rate: one hour.
pub const MAX_BURST_WINDOW_NS: u64 = 3_600 * 1_000_000_000;

impl LimitRate {
    /// The rate of `count` units per `period_ns`, with a burst of `burst` units, on a clock of
    /// `tick_ns` resolution, for a kind charged at most `max_units` per packet.
    ///
    /// `burst` units pass at once from a full bucket: the tolerance is `burst - 1` intervals
    /// and a margin for the rounding of their costs (under 1 ns each; at most half an
    /// interval), so the rounding can never cost the last of them. The
    /// tolerance is at least one tick: the kernel's clock advances a tick at a time, and a
    /// bucket that could not absorb a tick's worth of the rate would hold traffic below it.
    pub fn new(
        count: u64,
        period_ns: u64,
        burst: u64,
        tick_ns: u64,
        max_units: u64,
    ) -> Result<LimitRate, RateError> {
        if count == 0 || burst == 0 {
            return Err(RateError::Zero);
        }
        if period_ns == 0 {
            return Err(RateError::TooFast);
        }
        // 2^-32 ns fixed point, rounded up (never more than the rate): period < 2^64, so this
        // fits in 96 bits.
        let interval = ((period_ns as u128) << 32).div_ceil(count as u128);
        // Under 2^-20 ns a unit (a million units a nanosecond) is no rate a node carries.
        if interval < 1 << 12 {
            return Err(RateError::TooFast);
        }
        let margin = ((burst as u128 - 1) << 32).min(interval / 2);
        let window = (burst as u128 - 1) * interval + margin;
        if window >> 32 > MAX_BURST_WINDOW_NS as u128 {
            return Err(RateError::BurstTooLong);
        }
        let tolerance_ns = ((window >> 32) as u64).max(tick_ns);
        let max_cost = (max_units as u128 * interval) >> 32;
        // 64 packets of the largest cost past the burst: more than the CPUs racing the slow
        // path of `ebpf/src/ratelimit.rs` can ever add.
        let horizon = tolerance_ns as u128 + 64 * (max_cost + 1);
        Ok(LimitRate {
            interval_ns: (interval >> 32) as u64,
            tolerance_ns,
            horizon_ns: horizon.min(u64::MAX as u128 / 2) as u64,
            interval_frac: interval as u32,
            _pad: 0,
        })
    }
}

/// FNV-1a, 64 bits: the agent's bucket fingerprint over a limit's canonical text. Never 0 (0
/// marks a free bucket).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if h == 0 {
        1
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const MIN: u64 = 60 * SEC;
    const TICK: u64 = 4_000_000;

    fn rate(count: u64, period: u64, burst: u64, max_units: u64) -> LimitRate {
        LimitRate::new(count, period, burst, 1, max_units).unwrap()
    }

    /// Sends `n` packets of `units` at `now` through one kind; how many passed, and the tat.
    fn burst(mut tat: u64, now: u64, n: u64, units: u64, r: &LimitRate) -> (u64, u64) {
        let mut passed = 0;
        for i in 0..n {
            let _ = i;
            if let Some(t) = conform(tat, now, cost_ns(units, r, dither(tat)), r) {
                tat = t;
                passed += 1;
            }
        }
        (passed, tat)
    }

    #[test]
    fn a_full_bucket_passes_exactly_its_burst() {
        for (count, period, b) in [
            (5, SEC, 5),
            (5, MIN, 5),
            (3, SEC, 7),
            (1, SEC, 1),
            (1000, SEC, 10),
        ] {
            let r = rate(count, period, b, 1);
            let (passed, _) = burst(0, 100 * MIN, b + 50, 1, &r);
            assert_eq!(passed, b, "{count}/{period} burst {b}");
        }
    }

    #[test]
    fn the_n_plus_first_within_the_window_is_refused_then_one_interval_refills_one() {
        let r = rate(5, MIN, 5, 1);
        let now = 10 * MIN;
        let (passed, tat) = burst(0, now, 6, 1, &r);
        assert_eq!(passed, 5);
        // 11.9 s later: still nothing; at 12 s, one.
        assert_eq!(burst(tat, now + 11_900_000_000, 3, 1, &r).0, 0);
        assert_eq!(burst(tat, now + 12 * SEC, 3, 1, &r).0, 1);
    }

    #[test]
    fn sustained_rate_is_the_configured_rate() {
        // 1000 packets/s, burst 10, offered 10x for 10 s in 1 ms steps.
        let r = rate(1000, SEC, 10, 1 << 16);
        let mut tat = 0;
        let mut passed = 0;
        let start = 1_000 * SEC;
        for ms in 0..10_000u64 {
            let (p, t) = burst(tat, start + ms * 1_000_000, 10, 1, &r);
            tat = t;
            passed += p;
        }
        // 10 s at 1000/s plus the burst, within one.
        assert!((10_009..=10_011).contains(&passed), "{passed}");
    }

    #[test]
    fn bytes_at_a_fractional_interval_keep_the_rate() {
        // 3 GB/s: one byte is 1/3 ns. 9000-byte packets offered at twice the rate for 1 s.
        let r = rate(3_000_000_000, SEC, 9000, 1 << 20);
        let mut tat = 0;
        let mut bytes = 0u64;
        let start = 5 * SEC;
        for us in 0..1_000_000u64 {
            // 666_666 packets/s offered: 2/3 of them each microsecond, on average.
            let n = if us % 3 == 0 { 0 } else { 1 };
            let (p, t) = burst(tat, start + us * 1000, n, 9000, &r);
            tat = t;
            bytes += p * 9000;
        }
        let want = 3_000_000_000u64;
        assert!(bytes.abs_diff(want) <= 2 * 9000, "{bytes} vs {want}");
    }

    #[test]
    fn a_gso_packet_larger_than_the_burst_passes_and_leaves_debt() {
        let r = rate(1_000_000, SEC, 1500, 1 << 20); // 1 MB/s, 1 µs a byte
        let now = 50 * SEC;
        let tat = conform(0, now, cost_ns(65_536, &r, 0), &r).expect("a full bucket admits it");
        assert_eq!(tat, now + 65_536_000);
        // In debt: nothing passes until the debt is paid down to the tolerance.
        assert_eq!(
            conform(tat, now + 60 * 1_000_000, cost_ns(100, &r, 0), &r),
            None
        );
        assert!(conform(tat, now + 66 * 1_000_000, cost_ns(100, &r, 0), &r).is_some());
    }

    #[test]
    fn idle_for_years_refills_to_the_burst_only() {
        let r = rate(10, SEC, 4, 1);
        let (passed, _) = burst(1, u64::MAX / 4, 100, 1, &r);
        assert_eq!(passed, 4);
    }

    #[test]
    fn clock_edges() {
        let r = rate(10, SEC, 2, 1);
        // The clock at zero: a fresh bucket passes its burst.
        assert_eq!(burst(0, 0, 5, 1, &r).0, 2);
        // The same instant read twice: no refill between.
        let (_, tat) = burst(0, 7 * SEC, 2, 1, &r);
        assert_eq!(burst(tat, 7 * SEC, 1, 1, &r).0, 0);
        // A tat from a clock that went back (or another epoch) far beyond the horizon: the
        // bucket starts over instead of blocking for that long.
        assert_eq!(burst(u64::MAX - 5, 3 * SEC, 5, 1, &r).0, 2);
        // Near the end of the clock: saturates, never wraps to a small tat.
        let t = conform(0, u64::MAX - 10, cost_ns(1, &r, 0), &r).unwrap();
        assert_eq!(t, u64::MAX);
    }

    #[test]
    fn tolerance_is_at_least_one_tick() {
        // 100k packets/s with a burst of 10 is 90 µs: raised to the 4 ms tick, so a clock that
        // only moves 4 ms at a time still lets the rate through.
        let r = LimitRate::new(100_000, SEC, 10, TICK, 1).unwrap();
        assert_eq!(r.tolerance_ns, TICK);
        let mut tat = 0;
        let mut passed = 0;
        for tick in 0..250u64 {
            let (p, t) = burst(tat, 10 * SEC + tick * TICK, 1000, 1, &r);
            tat = t;
            passed += p;
        }
        // One second of ticks: 100k, plus a tick's worth of burst at the start.
        assert!((100_000..=100_000 + 401).contains(&passed), "{passed}");
    }

    #[test]
    fn costs_never_overflow_at_the_extremes() {
        // The slowest rates the agent accepts, charged the most units a packet can carry.
        for (k, period) in [
            (kind::PACKETS, MIN),
            (kind::BYTES, MIN),
            (kind::CONNECTIONS, MIN),
        ] {
            let r = rate(1, period, 1, MAX_UNITS[k]);
            let c = cost_ns(MAX_UNITS[k], &r, u32::MAX);
            assert!(c < 1 << 57, "{c}");
        }
        // The fastest: 10^12 bytes/s.
        let r = rate(1_000_000_000_000, SEC, 1 << 20, 1 << 20);
        assert_eq!(r.interval_ns, 0);
        assert!(r.is_set());
        assert_eq!(cost_ns(1_000_000, &r, 0), 1000);
        assert_eq!(cost_ns(1_000_000, &r, u32::MAX), 1001);
    }

    #[test]
    fn dither_averages_the_fraction_out() {
        let r = rate(3, SEC, 1, 1); // 333_333_333.33 ns
        let total: u64 = (0..3000u32)
            .map(|i| cost_ns(1, &r, dither(u64::from(i) * 333_333_333)))
            .sum();
        assert!(total.abs_diff(1_000_000_000_000) <= 3, "{total}");
    }

    #[test]
    fn bad_rates_are_refused() {
        assert_eq!(LimitRate::new(0, SEC, 1, 1, 1), Err(RateError::Zero));
        assert_eq!(LimitRate::new(1, SEC, 0, 1, 1), Err(RateError::Zero));
        assert_eq!(LimitRate::new(1, 0, 1, 1, 1), Err(RateError::TooFast));
        assert_eq!(
            LimitRate::new(u64::MAX, 1, 1, 1, 1),
            Err(RateError::TooFast)
        );
        // 5 a minute with a burst of 1000 is 200 minutes.
        assert_eq!(
            LimitRate::new(5, MIN, 1000, 1, 1),
            Err(RateError::BurstTooLong)
        );
        assert!(LimitRate::new(5, MIN, 300, 1, 1).is_ok());
    }

    #[test]
    fn fingerprints_differ_and_are_never_zero() {
        assert_ne!(fingerprint(b"rule login"), fingerprint(b"rule logon"));
        assert_ne!(fingerprint(b""), 0);
    }
}
