//! A local pod's host-side interface: the device of the node's most specific direct route (no
//! gateway, not the default route) to the pod's address. Routed CNIs (Calico, Cilium) install a
//! host route per pod on its veth. A device several local pods sit behind (a bridge CNI's
//! bridge) is not bound (see the installer); source validation there falls back to the
//! reverse-path check alone.
//!
//! Read from `/proc/net/route` and `/proc/net/ipv6_route` (the main table) of the agent's
//! network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The main routing tables of the agent's namespace, read once for many lookups.
pub struct RouteTables {
    v4: String,
    v6: String,
}

impl RouteTables {
    /// Reads both tables (an unreadable table finds no route).
    pub fn read() -> Self {
        RouteTables {
            v4: std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
            v6: std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
        }
    }

    /// The interface of the most specific direct route to `addr`, if there is one.
    pub fn device(&self, addr: IpAddr) -> Option<String> {
        let table = if addr.is_ipv4() { &self.v4 } else { &self.v6 };
        best_route(table, addr).map(|r| r.device)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Route {
    device: String,
    prefix_len: u8,
}

fn best_route(table: &str, addr: IpAddr) -> Option<Route> {
    let mut best: Option<Route> = None;
    for line in table.lines() {
        let Some((dest, len, device)) = (match addr {
            IpAddr::V4(_) => parse_v4(line),
            IpAddr::V6(_) => parse_v6(line),
        }) else {
            continue;
        };
        // The default route and routes through a gateway lead away from the node's pods.
        if len > 0 && contains(dest, len, addr) && best.as_ref().is_none_or(|b| len > b.prefix_len)
        {
            best = Some(Route {
                device,
                prefix_len: len,
            });
        }
    }
    best
}

fn contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    let (n, a, width) = match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(u32::from(n)), u128::from(u32::from(a)), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    if len == 0 {
        return true;
    }
    let shift = width - u32::from(len);
    (n >> shift) == (a >> shift)
}

/// `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses as the hex of the
/// in-memory (network order) u32.
fn parse_v4(line: &str) -> Option<(IpAddr, u8, String)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 || f[0] == "Iface" {
        return None;
    }
    let dest = u32::from_str_radix(f[1], 16).ok()?;
    let gateway = u32::from_str_radix(f[2], 16).ok()?;
    let mask = u32::from_str_radix(f[7], 16).ok()?;
    if gateway != 0 {
        return None;
    }
    let dest = Ipv4Addr::from(dest.to_le_bytes());
    let len = u32::from_be_bytes(mask.to_le_bytes()).leading_ones() as u8;
    Some((IpAddr::V4(dest), len, f[0].to_owned()))
}

/// `dest dest_len src src_len nexthop metric refcnt use flags iface`, hex.
fn parse_v6(line: &str) -> Option<(IpAddr, u8, String)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || f[0].len() != 32 {
        return None;
    }
    let dest = u128::from_str_radix(f[0], 16).ok()?;
    let len = u8::from_str_radix(f[1], 16).ok()?;
    if u128::from_str_radix(f[4], 16).ok()? != 0 {
        return None;
    }
    Some((IpAddr::V6(Ipv6Addr::from(dest)), len, f[9].to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100C80A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000C80A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
tgp-web\t0201C80A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";

    const V6: &str = "fd000200000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 tgp-web\n\
fd000200000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";

    #[test]
    fn the_longest_direct_match_wins() {
        let pod: IpAddr = "10.200.1.2".parse().unwrap();
        assert_eq!(
            best_route(V4, pod),
            Some(Route {
                device: "tgp-web".into(),
                prefix_len: 32
            })
        );
        let other: IpAddr = "10.200.7.7".parse().unwrap();
        assert_eq!(best_route(V4, other).unwrap().prefix_len, 16);
        // Only the default route (through a gateway) covers it: no device.
        let far: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(best_route(V4, far), None);
        let v6: IpAddr = "fd00:200::2".parse().unwrap();
        assert_eq!(best_route(V6, v6).unwrap().device, "tgp-web");
        let v6_other: IpAddr = "fd00:200::9".parse().unwrap();
        assert_eq!(best_route(V6, v6_other).unwrap().prefix_len, 64);
    }
}
