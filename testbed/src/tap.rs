//! A packet capture on one interface inside a namespace, so a test can say what actually
//! arrived at a workload ("no packet from 10.200.1.2:40001 reached orders within a second")
//! instead of inferring it from whether some probe got an answer. Spoofed packets never get an
//! answer the sender could see, so for them this is the only way to tell.
//!
//! It is an AF_PACKET socket in cooked mode (SOCK_DGRAM: the link-layer header is stripped, the
//! frame's direction comes with each packet), created with protocol 0 so that it receives
//! nothing until it is bound to the one interface with ETH_P_ALL. Packets queue in its receive
//! buffer from then on; reads take what is queued, waiting until a deadline. The socket closes
//! when the tap is dropped.

use std::{
    ffi::CString,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use socket2::{Domain, Socket, Type};

use crate::{
    netns::NetNs,
    spoof::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

/// Largest skb the tap reads whole. Larger ones (GSO super-packets) are cut, which keeps their
/// headers, all the parser needs; lengths come from the IP header.
const SNAPLEN: usize = 64 * 1024 + 512;

/// Receive buffer asked for, so a burst of control traffic does not push out what a test looks
/// for. The kernel caps it at net.core.rmem_max.
const RECV_BUFFER: usize = 4 * 1024 * 1024;

/// At most this many packets per `collect_for`, so a flood cannot make a test loop forever.
pub const MAX_COLLECTED: usize = 100_000;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The parts of a TCP header a test needs to tell segments apart and to continue a connection's
/// sequence space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFields {
    /// `spoof::tcp_flags` bits.
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
}

/// One IP packet as seen on the tapped interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedPacket {
    /// Sent out of the interface by this namespace, rather than received on it.
    pub outgoing: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 header after any extension headers.
    pub proto: u8,
    /// TTL (IPv4) or hop limit (IPv6) as the packet arrived.
    pub hop_limit: u8,
    /// TCP and UDP only.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub tcp: Option<TcpFields>,
    /// ICMP and ICMPv6 only.
    pub icmp_type: Option<u8>,
    /// Bytes after the TCP or UDP header (0 for other protocols): sequence space a TCP segment
    /// uses.
    pub payload_len: usize,
}

impl CapturedPacket {
    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// Received from `src` (any port).
    pub fn arrived_from(&self, src: IpAddr) -> bool {
        !self.outgoing && self.src == src
    }
}

pub struct PacketTap {
    socket: Socket,
    /// `<namespace>/<interface>`, for messages.
    name: String,
}

impl PacketTap {
    /// Starts capturing on `interface` inside `ns`.
    pub fn open(ns: &NetNs, interface: &str) -> Result<Self> {
        let name = format!("{}/{interface}", ns.name());
        let ifname = CString::new(interface).context("interface name")?;
        let socket = ns.run(move || -> std::io::Result<Socket> {
            // SAFETY: `ifname` is a valid NUL-terminated string; this thread is in the
            // namespace whose interface we want.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Protocol 0: nothing is received until bind names the interface below.
            let socket = Socket::new(Domain::PACKET, Type::DGRAM, None)?;
            let _ = socket.set_recv_buffer_size(RECV_BUFFER);
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: binds our own socket to a fully initialised sockaddr_ll of the size
            // given.
            let rc = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(socket)
        })?;
        let socket = socket.with_context(|| format!("opening a packet tap on {name}"))?;
        Ok(Self { socket, name })
    }

    /// The next IP packet captured before `deadline`, or None once it has passed. Non-IP frames
    /// (ARP) and IP packets too short to parse are skipped.
    pub fn next_before(&self, deadline: Instant) -> Result<Option<CapturedPacket>> {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); SNAPLEN];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // A zero timeout would mean "block forever".
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(wait))?;
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: recvfrom writes at most `buf.len()` bytes into `buf` and at most
            // `from_len` bytes into `from`, both valid for writes for their whole length.
            let n = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted => continue,
                    _ => return Err(e).with_context(|| format!("reading tap {}", self.name)),
                }
            }
            // SAFETY: the kernel initialised the first `n` bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            if let Some(p) = parse_ip(bytes, outgoing) {
                return Ok(Some(p));
            }
        }
    }

    /// Every IP packet captured from now until `window` has passed (at most `MAX_COLLECTED`),
    /// including what was queued before the call.
    pub fn collect_for(&self, window: Duration) -> Result<Vec<CapturedPacket>> {
        let deadline = Instant::now() + window;
        let mut packets = Vec::new();
        while packets.len() < MAX_COLLECTED {
            match self.next_before(deadline)? {
                Some(p) => packets.push(p),
                None => break,
            }
        }
        Ok(packets)
    }

    /// The first packet (queued or new) that satisfies `pred` within `window`; packets before it
    /// are consumed.
    pub fn wait_for(
        &self,
        window: Duration,
        pred: impl Fn(&CapturedPacket) -> bool,
    ) -> Result<Option<CapturedPacket>> {
        let deadline = Instant::now() + window;
        for _ in 0..MAX_COLLECTED {
            match self.next_before(deadline)? {
                Some(p) if pred(&p) => return Ok(Some(p)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
        bail!("tap {}: {MAX_COLLECTED} packets without a match", self.name)
    }

    /// Throws away everything queued so far; returns how many IP packets that was.
    pub fn drain(&self) -> Result<usize> {
        Ok(self.collect_for(Duration::from_millis(1))?.len())
    }
}

/// Parses an IP packet (no link-layer header). None for anything that is not IPv4 or IPv6 or is
/// too short for its IP header; transport fields stay None when their header is cut off.
pub fn parse_ip(bytes: &[u8], outgoing: bool) -> Option<CapturedPacket> {
    let version = bytes.first()? >> 4;
    let (src, dst, hop_limit, mut proto, l4_start, ip_end) = match version {
        4 => {
            let h = bytes.get(..20)?;
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            // Non-first fragments carry no transport header.
            let l4 = if u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
                ihl
            } else {
                usize::MAX
            };
            (src.into(), dst.into(), h[8], h[9], l4, total)
        }
        6 => {
            let h = bytes.get(..40)?;
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?);
            (src.into(), dst.into(), h[7], h[6], 40, 40 + payload)
        }
        _ => return None,
    };
    // GSO packets may have a zero IPv4 total length; fall back to what was captured.
    let ip_end = if ip_end == 0 { bytes.len() } else { ip_end };
    let mut l4_start = l4_start;
    if version == 6 {
        for _ in 0..MAX_EXTENSION_HEADERS {
            match proto {
                // Hop-by-hop, routing, destination options: length in 8-byte units past 8.
                0 | 43 | 60 => {
                    let ext = bytes.get(l4_start..l4_start + 2)?;
                    proto = ext[0];
                    l4_start += (usize::from(ext[1]) + 1) * 8;
                }
                44 => {
                    let frag = bytes.get(l4_start..l4_start + 4)?;
                    proto = frag[0];
                    l4_start = if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 == 0 {
                        l4_start + 8
                    } else {
                        usize::MAX
                    };
                }
                _ => break,
            }
            if l4_start == usize::MAX {
                break;
            }
        }
    }
    let mut p = CapturedPacket {
        outgoing,
        src,
        dst,
        proto,
        hop_limit,
        src_port: None,
        dst_port: None,
        tcp: None,
        icmp_type: None,
        payload_len: 0,
    };
    let Some(l4) = bytes.get(l4_start..) else {
        return Some(p);
    };
    let be16 = |i: usize| Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?]));
    let be32 = |i: usize| Some(u32::from_be_bytes(l4.get(i..i + 4)?.try_into().ok()?));
    match proto {
        IPPROTO_TCP if l4.len() >= 20 => {
            p.src_port = be16(0);
            p.dst_port = be16(2);
            let header = usize::from(l4[12] >> 4) * 4;
            p.tcp = Some(TcpFields {
                flags: l4[13],
                seq: be32(4)?,
                ack: be32(8)?,
            });
            p.payload_len = ip_end.saturating_sub(l4_start + header);
        }
        IPPROTO_UDP if l4.len() >= 8 => {
            p.src_port = be16(0);
            p.dst_port = be16(2);
            p.payload_len = ip_end.saturating_sub(l4_start + 8);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => p.icmp_type = l4.first().copied(),
        _ => {}
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spoof::{tcp_flags, udp_packet, TcpSegment};

    #[test]
    fn parses_what_spoof_builds() {
        let mut seg = TcpSegment::syn(
            "[fd00:200:3::2]:40001".parse().unwrap(),
            "[fd00:200:2::2]:8080".parse().unwrap(),
        );
        seg.flags = tcp_flags::ACK | tcp_flags::PSH;
        seg.seq = 1000;
        seg.ack = 2000;
        seg.payload = b"evil".to_vec();
        let p = parse_ip(&seg.to_packet().unwrap(), false).unwrap();
        assert!(p.is_ipv6());
        assert_eq!(p.src, seg.src.ip());
        assert_eq!(p.dst_port, Some(8080));
        assert_eq!(p.proto, IPPROTO_TCP);
        assert_eq!(p.hop_limit, 64);
        assert_eq!(
            p.tcp,
            Some(TcpFields {
                flags: tcp_flags::ACK | tcp_flags::PSH,
                seq: 1000,
                ack: 2000
            })
        );
        assert_eq!(p.payload_len, 4);

        let udp = udp_packet(
            "10.200.3.99:40002".parse().unwrap(),
            "10.200.2.2:9000".parse().unwrap(),
            &[0; 100],
        )
        .unwrap();
        let p = parse_ip(&udp, true).unwrap();
        assert!(p.outgoing && !p.is_ipv6());
        assert_eq!((p.src_port, p.dst_port), (Some(40002), Some(9000)));
        assert_eq!(p.payload_len, 100);
    }

    #[test]
    fn ignores_what_is_not_ip() {
        assert_eq!(parse_ip(&[], false), None);
        assert_eq!(parse_ip(&[0x00, 0x01, 0x08, 0x00], false), None);
        assert_eq!(parse_ip(&[0x45, 0, 0, 20], false), None, "cut-off header");
    }
}
