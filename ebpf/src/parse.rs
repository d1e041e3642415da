//! Header parsing with direct packet access. Every read is bounds-checked against `data_end`;
//! a packet whose IP headers cannot be read completely is `Malformed` and will be dropped, never
//! allowed.

use aya_ebpf::programs::TcContext;
use tollgate_common::{flow::v4_mapped, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
/// At most two stacked VLAN tags (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;

const IPV6_HLEN: usize = 40;
/// Extension headers walked before giving up (and dropping the packet).
const MAX_IPV6_EXT_HEADERS: usize = 8;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Why a packet was not turned into a `Packet`.
pub enum ParseError {
    /// Not IP: passes without policy.
    NotIp,
    /// IPv6 neighbour discovery / MLD: the IPv6 equivalent of ARP, passes without policy.
    NeighbourDiscovery,
    /// Truncated or inconsistent IP headers: dropped.
    Malformed,
    /// A fragment other than the first: no ports to match, dropped.
    Fragment,
}

/// The fields policy and conntrack need, IPv4 addresses IPv4-mapped.
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order as on the wire (0 for protocols without ports).
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 type, 0xff for other protocols.
    pub icmp_type: u8,
    /// ICMP echo identifier (network byte order).
    pub icmp_id: u16,
}

/// A bounds-checked view of `N` header bytes at `offset`. Every field of a header is read
/// through the one reference this returns: the verifier then sees each access at a constant
/// offset from a pointer whose range it has checked. (Checking each field separately let LLVM
/// merge the checks and rebase the loads, which the verifier rejects with "invalid access to
/// packet, off=12 size=1, R1(id=199,off=12,r=0)".)
#[inline(always)]
fn header<const N: usize>(
    start: usize,
    end: usize,
    offset: usize,
) -> Result<&'static [u8; N], ParseError> {
    let p = start + offset;
    if p + N > end {
        return Err(ParseError::Malformed);
    }
    // SAFETY: [p, p + N) lies inside the packet, checked just above.
    Ok(unsafe { &*(p as *const [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Two bytes as they are on the wire (network order kept).
#[inline(always)]
fn raw16(b0: u8, b1: u8) -> u16 {
    u16::from_ne_bytes([b0, b1])
}

/// Makes sure the headers we may read are in the linear part of the skb. Packets built by the
/// stack already are; GRO'd or tunnelled ones may not be, and reading them would wrongly look
/// truncated.
#[inline(always)]
fn ensure_linear(ctx: &TcContext) {
    // Ethernet + two VLAN tags + IPv6 + 8 extension headers of typical size + L4 header.
    const WANT: u32 = 256;
    let len = ctx.len();
    let want = if len < WANT { len } else { WANT };
    if (ctx.data_end() - ctx.data()) < want as usize {
        let _ = ctx.pull_data(want);
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, ParseError> {
    ensure_linear(ctx);
    let start = ctx.data();
    let end = ctx.data_end();

    // Too short for an Ethernet header: we cannot even tell whether it is IP.
    let eth = header::<ETH_HLEN>(start, end, 0)?;
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(eth[12], eth[13]);
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = header::<VLAN_HLEN>(start, end, l3)?;
        ethertype = be16(tag[2], tag[3]);
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(start, end, l3),
        ETH_P_IPV6 => parse_ipv6(start, end, l3),
        // A third VLAN tag: we would have to guess what is inside; refuse.
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::Malformed),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, l3: usize) -> Result<Packet, ParseError> {
    let ip = header::<20>(start, end, l3)?;
    let vihl = ip[0];
    if vihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let total_len = be16(ip[2], ip[3]) as usize;
    // The datagram must hold its own header and fit in what we received (trailing padding, as on
    // short Ethernet frames, is fine).
    if total_len < ihl || start + l3 + total_len > end {
        return Err(ParseError::Malformed);
    }
    if be16(ip[6], ip[7]) & 0x1fff != 0 {
        return Err(ParseError::Fragment);
    }
    let proto = ip[9];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let mut pkt = Packet {
        family: 4,
        proto,
        saddr: v4_mapped(saddr),
        daddr: v4_mapped(daddr),
        sport: 0,
        dport: 0,
        icmp_type: 0xff,
        icmp_id: 0,
    };
    // Options included: the L4 header starts after IHL words (20..=60 bytes).
    parse_l4(start, end, l3 + (ihl & 0x3c), &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_ipv6(start: usize, end: usize, l3: usize) -> Result<Packet, ParseError> {
    let ip = header::<IPV6_HLEN>(start, end, l3)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = be16(ip[4], ip[5]) as usize;
    // Jumbograms (payload length 0) are not supported; a length past the data is truncation.
    if payload_len == 0 || start + l3 + IPV6_HLEN + payload_len > end {
        return Err(ParseError::Malformed);
    }
    let mut next = ip[6];
    let mut saddr = [0u8; 16];
    saddr.copy_from_slice(&ip[8..24]);
    let mut daddr = [0u8; 16];
    daddr.copy_from_slice(&ip[24..40]);

    let mut off = l3 + IPV6_HLEN;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let ext = header::<2>(start, end, off)?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = header::<2>(start, end, off)?;
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = header::<8>(start, end, off)?;
                if be16(ext[2], ext[3]) & 0xfff8 != 0 {
                    return Err(ParseError::Fragment);
                }
                next = ext[0];
                off += 8;
            }
            _ => {
                done = true;
                break;
            }
        }
        // Keeps the offset provably bounded for the verifier and stops absurd chains.
        if off > 1024 {
            return Err(ParseError::Malformed);
        }
    }
    if !done {
        return Err(ParseError::Malformed);
    }
    let mut pkt = Packet {
        family: 6,
        proto: next,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        icmp_type: 0xff,
        icmp_id: 0,
    };
    parse_l4(start, end, off & 0x7ff, &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_l4(start: usize, end: usize, l4: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    match pkt.proto {
        proto::TCP => {
            let tcp = header::<20>(start, end, l4)?;
            if tcp[12] >> 4 < 5 {
                return Err(ParseError::Malformed);
            }
            pkt.sport = raw16(tcp[0], tcp[1]);
            pkt.dport = raw16(tcp[2], tcp[3]);
        }
        proto::UDP => {
            let udp = header::<8>(start, end, l4)?;
            pkt.sport = raw16(udp[0], udp[1]);
            pkt.dport = raw16(udp[2], udp[3]);
        }
        proto::ICMP => {
            let icmp = header::<8>(start, end, l4)?;
            pkt.icmp_type = icmp[0];
            pkt.icmp_id = raw16(icmp[4], icmp[5]);
        }
        proto::ICMPV6 => {
            let icmp = header::<8>(start, end, l4)?;
            let t = icmp[0];
            // Router/neighbour solicitation and advertisement, redirect (133..=137) and MLD
            // (130..=132, 143): IPv6 cannot resolve neighbours without them.
            if matches!(t, 130..=137 | 143) {
                return Err(ParseError::NeighbourDiscovery);
            }
            pkt.icmp_type = t;
            pkt.icmp_id = raw16(icmp[4], icmp[5]);
        }
        // Other protocols (ESP, GRE, SCTP, no-next-header, ...) carry no ports we match on:
        // they are matched by `protocol: ANY` rules only.
        _ => {}
    }
    Ok(())
}
