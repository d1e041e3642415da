//! Hand-built packets sent from inside a workload namespace: TCP segments and UDP datagrams with
//! any source address, port, flags and sequence numbers (someone else's address, or a live
//! connection's 4-tuple), and ICMPv6 neighbour-discovery messages aimed across the node. A
//! compromised workload can send all of these; raw sockets let a test do the same, so the
//! datapath, not the sender's own stack, is what has to stop them.
//!
//! IPv4 and IPv6 both go out through an `IPPROTO_RAW` socket, which on Linux takes the complete
//! IP header as given (IPv4: IP_HDRINCL is implied; IPv6: `inet6_create` sets `hdrincl` for
//! IPPROTO_RAW) and does not check that the source address is local. The packet is routed by
//! its destination like any other, so it leaves through the workload's default route.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

use anyhow::{bail, Context as _, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::NetNs;

/// TCP header flag bits, as in the 13th byte of the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Hop limit / TTL of the packets built here: what a Linux stack would use.
const DEFAULT_TTL: u8 = 64;

/// One TCP segment, addressed however the test likes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `tcp_flags` bits.
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl TcpSegment {
    /// A bare SYN from `src` to `dst`.
    pub fn syn(src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            src,
            dst,
            flags: tcp_flags::SYN,
            seq: 0x5eed_0001,
            ack: 0,
            payload: Vec::new(),
        }
    }

    /// The whole IP packet: IP header, TCP header (20 bytes, no options) and payload, with
    /// correct checksums.
    pub fn to_packet(&self) -> Result<Vec<u8>> {
        let mut tcp = Vec::with_capacity(20 + self.payload.len());
        tcp.extend_from_slice(&self.src.port().to_be_bytes());
        tcp.extend_from_slice(&self.dst.port().to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push(5 << 4); // data offset: 5 words
        tcp.push(self.flags);
        tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(&self.payload);
        ip_packet(self.src.ip(), self.dst.ip(), IPPROTO_TCP, tcp, 16)
    }
}

/// A UDP datagram from `src` to `dst` as a whole IP packet with correct checksums.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let len = u16::try_from(8 + payload.len()).context("UDP payload too long")?;
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), IPPROTO_UDP, udp, 6)
}

/// Wraps `l4` (whose checksum field at `checksum_at` is zero) in an IPv4 or IPv6 header and
/// fills in the transport checksum over the pseudo-header, and for IPv4 the header checksum.
pub fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    mut l4: Vec<u8>,
    checksum_at: usize,
) -> Result<Vec<u8>> {
    let l4_len = u16::try_from(l4.len()).context("transport segment too long")?;
    let mut pseudo = Vec::with_capacity(40);
    let mut packet = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&l4_len.to_be_bytes());
            let total = u16::try_from(20 + l4.len()).context("IPv4 packet too long")?;
            let mut h = Vec::with_capacity(20 + l4.len());
            h.extend_from_slice(&[0x45, 0]);
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&[0x7a, 0x11, 0x40, 0]); // id, DF, fragment offset 0
            h.extend_from_slice(&[DEFAULT_TTL, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let sum = internet_checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(l4_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
            let mut h = Vec::with_capacity(40 + l4.len());
            h.extend_from_slice(&[0x60, 0, 0, 0]);
            h.extend_from_slice(&l4_len.to_be_bytes());
            h.extend_from_slice(&[proto, DEFAULT_TTL]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => bail!("source {src} and destination {dst} are of different families"),
    };
    pseudo.extend_from_slice(&l4);
    let mut sum = internet_checksum(&pseudo);
    // In UDP a computed zero is sent as all ones (zero means "no checksum", and is not allowed
    // at all over IPv6).
    if proto == IPPROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&l4);
    Ok(packet)
}

/// The ones'-complement sum of RFC 1071, complemented: what goes into a checksum field, and
/// zero when computed over data that already holds a correct one.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `segment` from inside `ns`, whatever its source.
pub fn send_tcp(ns: &NetNs, segment: &TcpSegment) -> Result<()> {
    send_raw_ip(ns, segment.dst.ip(), segment.to_packet()?)
}

/// Sends one UDP datagram from inside `ns` with source `src`, local or not.
pub fn send_udp(ns: &NetNs, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<()> {
    send_raw_ip(ns, dst.ip(), udp_packet(src, dst, payload)?)
}

/// Sends a complete IP packet through an IPPROTO_RAW socket created inside `ns`.
pub fn send_raw_ip(ns: &NetNs, dst: IpAddr, packet: Vec<u8>) -> Result<()> {
    let sent = ns.run(move || -> std::io::Result<usize> {
        let socket = Socket::new(
            Domain::for_address(SocketAddr::new(dst, 0)),
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        // Port 0: for IPv6 a non-zero port would name the protocol, which IPPROTO_RAW takes
        // from the header instead.
        let n = socket.send_to(&packet, &SockAddr::from(SocketAddr::new(dst, 0)))?;
        if n != packet.len() {
            return Err(std::io::Error::other(format!(
                "sent {n} of {} bytes",
                packet.len()
            )));
        }
        Ok(n)
    })?;
    sent.with_context(|| format!("raw send to {dst}"))?;
    Ok(())
}

/// An ICMPv6 neighbour-discovery message (RFC 4861), without options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NdMessage {
    RouterAdvertisement,
    NeighborSolicitation {
        target: Ipv6Addr,
    },
    /// Solicited and override flags set: what a neighbour-cache poisoner sends.
    NeighborAdvertisement {
        target: Ipv6Addr,
    },
}

impl NdMessage {
    pub const ROUTER_ADVERTISEMENT: u8 = 134;
    pub const NEIGHBOR_SOLICITATION: u8 = 135;
    pub const NEIGHBOR_ADVERTISEMENT: u8 = 136;

    pub fn icmp_type(&self) -> u8 {
        match self {
            NdMessage::RouterAdvertisement => Self::ROUTER_ADVERTISEMENT,
            NdMessage::NeighborSolicitation { .. } => Self::NEIGHBOR_SOLICITATION,
            NdMessage::NeighborAdvertisement { .. } => Self::NEIGHBOR_ADVERTISEMENT,
        }
    }

    /// The ICMPv6 message with a zero checksum (the kernel fills it in for raw ICMPv6
    /// sockets).
    pub fn to_icmpv6(&self) -> Vec<u8> {
        let mut m = vec![self.icmp_type(), 0, 0, 0];
        match self {
            NdMessage::RouterAdvertisement => {
                // Current hop limit 64, no M/O flags, router lifetime 1800 s, reachable time
                // and retransmission timer unspecified.
                m.extend_from_slice(&[64, 0]);
                m.extend_from_slice(&1800u16.to_be_bytes());
                m.extend_from_slice(&[0; 8]);
            }
            NdMessage::NeighborSolicitation { target } => {
                m.extend_from_slice(&[0; 4]);
                m.extend_from_slice(&target.octets());
            }
            NdMessage::NeighborAdvertisement { target } => {
                m.extend_from_slice(&[0x60, 0, 0, 0]); // S and O flags
                m.extend_from_slice(&target.octets());
            }
        }
        m
    }
}

/// Sends `message` from inside `ns` to the unicast or global address `to` with hop limit
/// `hop_limit` (255 is what receivers require of genuine ND; a router forwarding the packet
/// lowers it). The source address is the one the namespace's stack picks for `to`.
pub fn send_nd(ns: &NetNs, to: Ipv6Addr, message: NdMessage, hop_limit: u8) -> Result<()> {
    let sent = ns.run(move || -> std::io::Result<()> {
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        socket.set_unicast_hops_v6(u32::from(hop_limit))?;
        socket.set_multicast_hops_v6(u32::from(hop_limit))?;
        let bytes = message.to_icmpv6();
        socket.send_to(&bytes, &SockAddr::from(SocketAddrV6::new(to, 0, 0, 0)))?;
        Ok(())
    })?;
    sent.with_context(|| format!("sending {message:?} to {to}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_a_known_ipv4_header() {
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
    }

    #[test]
    fn checksums_of_built_packets_verify() {
        let v4 = TcpSegment::syn(
            "10.200.1.2:40000".parse().unwrap(),
            "10.200.2.2:8080".parse().unwrap(),
        )
        .to_packet()
        .unwrap();
        assert_eq!(internet_checksum(&v4[..20]), 0, "IPv4 header");
        let mut pseudo = v4[12..20].to_vec();
        pseudo.extend_from_slice(&[0, IPPROTO_TCP, 0, 20]);
        pseudo.extend_from_slice(&v4[20..]);
        assert_eq!(internet_checksum(&pseudo), 0, "TCP over IPv4");

        let v6 = udp_packet(
            "[fd00:200:1::2]:40000".parse().unwrap(),
            "[fd00:200:2::2]:9000".parse().unwrap(),
            b"odd",
        )
        .unwrap();
        assert_eq!(v6.len(), 40 + 8 + 3);
        let mut pseudo = v6[8..40].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&v6[40..]);
        assert_eq!(internet_checksum(&pseudo), 0, "UDP over IPv6");
    }

    #[test]
    fn mixed_families_are_refused() {
        let seg = TcpSegment::syn(
            "10.200.1.2:1".parse().unwrap(),
            "[fd00:200:2::2]:2".parse().unwrap(),
        );
        assert!(seg.to_packet().is_err());
    }
}
