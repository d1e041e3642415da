//! `tollgate check`: answers with the kernel's own code. The agent crafts the packet that would
//! open the flow in question (a TCP SYN, a UDP datagram, an ICMP echo request), runs the
//! never-attached `tollgate_check` classifier on it with BPF_PROG_TEST_RUN against the live
//! maps, and reads the decision from `TG_CHECK`. Whatever the datapath does to a real packet
//! (IPv4-mapped addresses, reverse-path and binding checks, ND rules, the rule trie, expiry)
//! the answer does too, with no second implementation to drift.

use std::net::IpAddr;

use tollgate_common::proto;

/// The first packet of a flow from `from` to `to` (same family) of IP protocol `protocol`,
/// destination port `port` (TCP, UDP) or an echo request (ICMP, ICMPv6), on Ethernet.
pub fn probe_packet(from: IpAddr, to: IpAddr, protocol: u8, port: u16) -> Vec<u8> {
    let l4: Vec<u8> = match protocol {
        proto::TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&PROBE_SOURCE_PORT.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h[12] = 5 << 4; // data offset: 5 words
            h[13] = 0x02; // SYN
            h
        }
        proto::UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&PROBE_SOURCE_PORT.to_be_bytes());
            h[2..4].copy_from_slice(&port.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        proto::ICMP => vec![8, 0, 0, 0, 0, 1, 0, 1],
        proto::ICMPV6 => vec![128, 0, 0, 0, 0, 1, 0, 1],
        _ => Vec::new(),
    };
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + l4.len()) as u16;
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]); // DF, TTL 64
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86DDu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[protocol, 64]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => unreachable!("the caller refuses mixed address families"),
    }
    frame.extend(l4);
    frame
}

/// Source port of a probe: an ephemeral port, as a client's would be.
const PROBE_SOURCE_PORT: u16 = 40000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_tcp_probe_is_a_syn_to_the_port() {
        let p = probe_packet(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            proto::TCP,
            8080,
        );
        assert_eq!(p.len(), 14 + 20 + 20);
        assert_eq!(&p[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([p[16], p[17]]), 40);
        assert_eq!(u16::from_be_bytes([p[36], p[37]]), 8080);
        assert_eq!(p[47], 0x02);
    }

    #[test]
    fn ipv6_icmp_probe_is_an_echo_request() {
        let p = probe_packet(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            proto::ICMPV6,
            0,
        );
        assert_eq!(p.len(), 14 + 40 + 8);
        assert_eq!(p[20], proto::ICMPV6);
        assert_eq!(p[54], 128);
    }
}
