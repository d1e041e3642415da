//! Addresses of the node (the agent's network namespace): they make up the reserved `host`
//! identity, where no declared identity claims them.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};

/// Every address configured on an interface of this network namespace (loopback included).
pub fn host_addresses() -> Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; ifa_addr may be null.
        unsafe {
            let sa = (*p).ifa_addr;
            if !sa.is_null() {
                match (*sa).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// The kernel's tick (1 s / CONFIG_HZ) in nanoseconds, measured: jiffies (from
/// /proc/timer_list) against CLOCK_MONOTONIC over about 100 ms, taken as the tick of a common
/// HZ (100, 250, 300, 1000) within 10% of it. A second try if the first lands near none of them
/// (a disturbed measurement); `None` then, or when /proc/timer_list cannot be read (container
/// runtimes mask it), and the datapath keeps the coarse clock rather than a doubtful tick.
pub fn ns_per_jiffy() -> Option<u64> {
    let sample = || -> Option<(u64, u64)> {
        let t = monotonic_ns();
        let j = read_jiffies()?;
        Some((j, t))
    };
    for _ in 0..2 {
        let (j0, t0) = sample()?;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (j1, t1) = sample()?;
        if let Some(tick) = tick_from(j1.checked_sub(j0)?, t1.checked_sub(t0)?) {
            return Some(tick);
        }
    }
    None
}

/// The tick length from `jiffies` elapsed over `ns`, if it is a common HZ's.
fn tick_from(jiffies: u64, ns: u64) -> Option<u64> {
    if jiffies == 0 || ns == 0 {
        return None;
    }
    let tick = ns / jiffies;
    [100u64, 250, 300, 1000]
        .into_iter()
        .map(|hz| 1_000_000_000 / hz)
        .find(|standard| tick.abs_diff(*standard) * 10 <= *standard)
}

/// The first `jiffies: N` line of /proc/timer_list.
fn read_jiffies() -> Option<u64> {
    use std::io::BufRead as _;
    let file = std::fs::File::open("/proc/timer_list").ok()?;
    // The line comes early (in the first tick device); stop there, the file is long.
    for line in std::io::BufReader::new(file).lines().take(4096) {
        let line = line.ok()?;
        if let Some(n) = line.trim().strip_prefix("jiffies:") {
            return n.trim().parse().ok();
        }
    }
    None
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tick_tests {
    use super::tick_from;

    #[test]
    fn common_hz_values_are_recognised_despite_a_tick_of_jitter() {
        // 100 ms at HZ=250 is 25 jiffies; one more or less is still HZ=250.
        for j in [24, 25, 26] {
            assert_eq!(tick_from(j, 100_000_000), Some(4_000_000));
        }
        assert_eq!(tick_from(30, 100_000_000), Some(3_333_333));
        assert_eq!(tick_from(100, 100_000_000), Some(1_000_000));
        assert_eq!(tick_from(10, 100_000_000), Some(10_000_000));
    }

    #[test]
    fn a_measurement_near_no_common_hz_is_not_trusted() {
        assert_eq!(tick_from(50, 100_000_000), None);
        assert_eq!(tick_from(40, 100_000_000), None);
        assert_eq!(tick_from(0, 100_000_000), None);
        assert_eq!(tick_from(25, 0), None);
    }
}
