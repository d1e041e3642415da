//! Expiry arithmetic. The kernel compares rule expiries against `bpf_ktime_get_boot_ns()`
//! (CLOCK_BOOTTIME, which keeps counting across suspend); policies state expiries in wall-clock
//! time. The agent converts with the current offset between CLOCK_REALTIME and CLOCK_BOOTTIME.

/// "Never expires" in a map value.
pub const NEVER: u64 = 0;

/// Converts a wall-clock instant (nanoseconds since the Unix epoch) to CLOCK_BOOTTIME
/// nanoseconds, given one simultaneous reading of both clocks.
///
/// An instant at or before boot maps to 1, the earliest non-zero boot time: the rule is already
/// expired, and 0 must never be produced because it means "never".
pub const fn wall_to_boot_ns(
    expires_unix_ns: u64,
    realtime_now_ns: u64,
    boottime_now_ns: u64,
) -> u64 {
    // boot = expires - (realtime_now - boottime_now), computed without overflow either way.
    if realtime_now_ns >= boottime_now_ns {
        let offset = realtime_now_ns - boottime_now_ns;
        if expires_unix_ns > offset {
            expires_unix_ns - offset
        } else {
            1
        }
    } else {
        let offset = boottime_now_ns - realtime_now_ns;
        expires_unix_ns.saturating_add(offset)
    }
}

/// Has an expiry passed at `now_ns` (both CLOCK_BOOTTIME)? `NEVER` never passes.
#[inline(always)]
pub const fn is_expired(expires_ns: u64, now_ns: u64) -> bool {
    expires_ns != NEVER && now_ns >= expires_ns
}

/// The earlier of two expiries, where `NEVER` is later than any instant.
#[inline(always)]
pub const fn earliest(a: u64, b: u64) -> u64 {
    match (a, b) {
        (NEVER, x) | (x, NEVER) => x,
        (a, b) if a < b => a,
        (_, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn converts_with_realtime_ahead_of_boottime() {
        // Booted at 1000 s after the epoch; now is 100 s after boot.
        let realtime = 1_100 * SEC;
        let boottime = 100 * SEC;
        assert_eq!(wall_to_boot_ns(1_200 * SEC, realtime, boottime), 200 * SEC);
    }

    #[test]
    fn instant_before_boot_is_already_expired_not_never() {
        let got = wall_to_boot_ns(10 * SEC, 1_100 * SEC, 100 * SEC);
        assert_eq!(got, 1);
        assert!(is_expired(got, 100 * SEC));
    }

    #[test]
    fn past_instant_after_boot_is_expired_now() {
        let got = wall_to_boot_ns(1_050 * SEC, 1_100 * SEC, 100 * SEC);
        assert_eq!(got, 50 * SEC);
        assert!(is_expired(got, 100 * SEC));
    }

    #[test]
    fn never_is_never_expired() {
        assert!(!is_expired(NEVER, u64::MAX));
    }

    #[test]
    fn expiry_is_inclusive_of_the_instant() {
        assert!(is_expired(5, 5));
        assert!(!is_expired(5, 4));
    }

    #[test]
    fn earliest_treats_never_as_latest() {
        assert_eq!(earliest(NEVER, 7), 7);
        assert_eq!(earliest(7, NEVER), 7);
        assert_eq!(earliest(3, 7), 3);
        assert_eq!(earliest(NEVER, NEVER), NEVER);
    }

    #[test]
    fn huge_instant_saturates_instead_of_wrapping() {
        assert_eq!(wall_to_boot_ns(u64::MAX, 10, 20), u64::MAX);
    }
}
