//! Header parsing with direct packet access.
//!
//! Only headers are read, never payload. A header must lie in the linear part of the skb to be
//! read directly; lengths (IP total length, IPv6 payload length) are checked against the whole
//! skb (`skb->len`), whose payload of a GSO packet (up to 64 KB) mostly sits in page fragments.
//! When a header is not linear (rare: the stack builds its own packets with linear headers), the
//! headers alone are pulled once and parsing starts again. A packet whose headers run past the
//! end of the packet itself is `Malformed` and will be dropped, never allowed.

use aya_ebpf::programs::TcContext;
use tollgate_common::{flow::v4_mapped, proto, Verdict};

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
/// The largest datagram an IP length field can state; a GSO packet bigger than this ("BIG TCP")
/// carries 0 there instead.
const MAX_IP_LEN_FIELD: u32 = 65_535;
/// What is made linear when the headers are not: every header this parser reads fits (Ethernet,
/// two VLAN tags, IPv6 and its walked extension headers up to the parser's 1024-byte bound, and
/// an L4 header), and a typical packet's headers are far shorter.
const PULL_BYTES: u32 = 512;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Why a packet was not turned into a `Packet`.
pub enum ParseError {
    /// Not IP: passes without policy.
    NotIp,
    /// IPv6 neighbour discovery or MLD that can only have come from this link (RFC 4861 hop
    /// limit 255, RFC 3810 hop limit 1): the IPv6 equivalent of ARP, passes without policy.
    LinkLocalControl,
    /// Truncated or inconsistent IP headers: dropped.
    Malformed,
    /// A fragment other than the first: no ports to match, dropped.
    Fragment,
    /// A header lies beyond the linear data but inside the packet: pull and parse again.
    NotLinear,
}

impl ParseError {
    /// What happens to a packet that did not parse into a `Packet`.
    #[inline(always)]
    pub fn verdict(&self) -> Verdict {
        match self {
            ParseError::NotIp | ParseError::LinkLocalControl => Verdict::PassNonIp,
            ParseError::Malformed | ParseError::NotLinear => Verdict::DropMalformed,
            ParseError::Fragment => Verdict::DropFragment,
        }
    }
}

/// The fields policy and conntrack need, IPv4 addresses IPv4-mapped.
///
/// 8-byte aligned so that initialising and copying it compiles to word stores: with the
/// alignment of its byte arrays, LLVM called a byte-by-byte `memset`/`memcpy` instead (about
/// 400 instructions per packet before this and the same on `FlowKey`).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
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
    /// TCP flags byte (FIN, SYN, RST, PSH, ACK, ...), 0 for other protocols.
    pub tcp_flags: u8,
    /// Bytes of headers in front of the payload, link layer included (TCP: its data offset;
    /// UDP, ICMP: 8 bytes of L4 header; other protocols: up to the L4 header): what every
    /// segment of a GSO packet repeats on the wire.
    pub hdr_len: u16,
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        family: 0,
        proto: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        icmp_type: 0xff,
        icmp_id: 0,
        tcp_flags: 0,
        hdr_len: 0,
    };
}

/// Where the packet is: linear data `[start, end)`, and the whole packet's length from `start`.
#[derive(Clone, Copy)]
struct Bounds {
    start: usize,
    end: usize,
    len: usize,
}

/// A bounds-checked view of `N` header bytes at `offset`. Every field of a header is read
/// through the one reference this returns: the verifier then sees each access at a constant
/// offset from a pointer whose range it has checked. (Checking each field separately let LLVM
/// merge the checks and rebase the loads, which the verifier rejects with "invalid access to
/// packet, off=12 size=1, R1(id=199,off=12,r=0)".)
#[inline(always)]
fn header<const N: usize>(b: Bounds, offset: usize) -> Result<&'static [u8; N], ParseError> {
    let p = b.start + offset;
    if p + N > b.end {
        return Err(if offset + N > b.len {
            ParseError::Malformed
        } else {
            ParseError::NotLinear
        });
    }
    // SAFETY: [p, p + N) lies inside the linear packet data, checked just above.
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

/// Parses the packet's headers into `pkt`.
///
/// A BPF-to-BPF call of its own (not inlined): its stack frame, which holds two inlined copies
/// of the header walk, is released before the caller's policy and conntrack work needs its
/// own. Inlined into one frame, the classifier exceeded the 512-byte BPF stack ("Looks like the
/// BPF stack limit is exceeded").
#[inline(never)]
pub fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<(), ParseError> {
    match parse_headers(ctx, pkt) {
        Err(ParseError::NotIp) => {
            // The kernel says IP but there is no Ethernet header in front of it (an L3 device:
            // tun, WireGuard, GRE). Read as Ethernet it would pass as "not IP", unchecked; the
            // agent does not attach to such devices, and should a program end up on one anyway,
            // its IP is dropped, never passed.
            // SAFETY: the context pointer is valid for the whole program run.
            let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
            if protocol == ETH_P_IP || protocol == ETH_P_IPV6 {
                Err(ParseError::Malformed)
            } else {
                Err(ParseError::NotIp)
            }
        }
        Err(ParseError::NotLinear) => {
            // Make the headers linear (a copy of at most PULL_BYTES, never the whole payload)
            // and start again: pulling invalidates every packet pointer taken so far.
            let len = ctx.len();
            if ctx
                .pull_data(if len < PULL_BYTES { len } else { PULL_BYTES })
                .is_err()
            {
                return Err(ParseError::Malformed);
            }
            match parse_headers(ctx, pkt) {
                Err(ParseError::NotLinear) => Err(ParseError::Malformed),
                r => r,
            }
        }
        r => r,
    }
}

#[inline(always)]
fn parse_headers(ctx: &TcContext, pkt: &mut Packet) -> Result<(), ParseError> {
    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
        len: ctx.len() as usize,
    };

    // Too short for an Ethernet header: we cannot even tell whether it is IP.
    let eth = header::<ETH_HLEN>(b, 0)?;
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(eth[12], eth[13]);
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = header::<VLAN_HLEN>(b, l3)?;
        ethertype = be16(tag[2], tag[3]);
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(b, l3, pkt),
        ETH_P_IPV6 => parse_ipv6(b, l3, pkt),
        // A third VLAN tag: we would have to guess what is inside; refuse.
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::Malformed),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(b: Bounds, l3: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    let ip = header::<20>(b, l3)?;
    let vihl = ip[0];
    if vihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let total_len = be16(ip[2], ip[3]) as usize;
    // The datagram must hold its own header and fit in the packet (trailing padding, as on short
    // Ethernet frames, is fine). A GSO packet over 64 KB states 0 (BIG TCP, Linux 6.3+).
    let big_gso = total_len == 0 && b.len - l3 > MAX_IP_LEN_FIELD as usize;
    if !big_gso && (total_len < ihl || l3 + total_len > b.len) {
        return Err(ParseError::Malformed);
    }
    if be16(ip[6], ip[7]) & 0x1fff != 0 {
        return Err(ParseError::Fragment);
    }
    let proto = ip[9];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    *pkt = Packet {
        family: 4,
        proto,
        saddr: v4_mapped(saddr),
        daddr: v4_mapped(daddr),
        ..Packet::EMPTY
    };
    // Options included: the L4 header starts after IHL words (20..=60 bytes).
    parse_l4(b, l3 + (ihl & 0x3c), ip[8], pkt)
}

#[inline(always)]
fn parse_ipv6(b: Bounds, l3: usize, pkt: &mut Packet) -> Result<(), ParseError> {
    let ip = header::<IPV6_HLEN>(b, l3)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = be16(ip[4], ip[5]) as usize;
    // A length past the packet is truncation. Payload length 0 is only accepted for a GSO packet
    // over 64 KB (BIG TCP); jumbograms with a hop-by-hop jumbo option are not supported.
    let big_gso = payload_len == 0 && b.len - l3 > IPV6_HLEN + MAX_IP_LEN_FIELD as usize;
    if !big_gso && (payload_len == 0 || l3 + IPV6_HLEN + payload_len > b.len) {
        return Err(ParseError::Malformed);
    }
    let hop_limit = ip[7];
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
                let ext = header::<2>(b, off)?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext = header::<2>(b, off)?;
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext = header::<8>(b, off)?;
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
    *pkt = Packet {
        family: 6,
        proto: next,
        saddr,
        daddr,
        ..Packet::EMPTY
    };
    parse_l4(b, off & 0x7ff, hop_limit, pkt)
}

/// `ttl` is the IPv4 TTL or IPv6 hop limit.
#[inline(always)]
fn parse_l4(b: Bounds, l4: usize, ttl: u8, pkt: &mut Packet) -> Result<(), ParseError> {
    match pkt.proto {
        proto::TCP => {
            let tcp = header::<20>(b, l4)?;
            if tcp[12] >> 4 < 5 {
                return Err(ParseError::Malformed);
            }
            pkt.sport = raw16(tcp[0], tcp[1]);
            pkt.dport = raw16(tcp[2], tcp[3]);
            pkt.tcp_flags = tcp[13];
            pkt.hdr_len = (l4 + (tcp[12] >> 4) as usize * 4) as u16;
        }
        proto::UDP => {
            let udp = header::<8>(b, l4)?;
            pkt.sport = raw16(udp[0], udp[1]);
            pkt.dport = raw16(udp[2], udp[3]);
            pkt.hdr_len = (l4 + 8) as u16;
        }
        proto::ICMP => {
            let icmp = header::<8>(b, l4)?;
            pkt.icmp_type = icmp[0];
            pkt.icmp_id = raw16(icmp[4], icmp[5]);
            pkt.hdr_len = (l4 + 8) as u16;
        }
        proto::ICMPV6 => {
            let icmp = header::<8>(b, l4)?;
            let (t, code) = (icmp[0], icmp[1]);
            pkt.icmp_type = t;
            if is_link_local_control(t, code, ttl) {
                return Err(ParseError::LinkLocalControl);
            }
            pkt.icmp_id = raw16(icmp[4], icmp[5]);
            pkt.hdr_len = (l4 + 8) as u16;
        }
        // Other protocols (ESP, GRE, SCTP, no-next-header, ...) carry no ports we match on:
        // they are matched by `protocol: ANY` rules only.
        _ => pkt.hdr_len = l4 as u16,
    }
    Ok(())
}

/// IPv6 cannot resolve neighbours without neighbour discovery, nor manage multicast without
/// MLD, so both pass without policy, but only in the form that cannot have crossed a router:
/// ND (router/neighbour solicitation and advertisement, redirect: 133..=137) with code 0 and hop
/// limit 255 (RFC 4861 section 6.1, 7.1, 8.1: a receiver discards anything else), MLD (130..=132,
/// 143) with hop limit 1 (RFC 3810 section 5). Anything else with these types, such as an ND
/// message forwarded through the node (hop limit 254 by then), is decided by policy like any other
/// ICMPv6.
#[inline(always)]
fn is_link_local_control(icmp_type: u8, code: u8, hop_limit: u8) -> bool {
    match icmp_type {
        133..=137 => code == 0 && hop_limit == 255,
        130..=132 | 143 => hop_limit == 1,
        _ => false,
    }
}
