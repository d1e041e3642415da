//! Crafted packets for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 (+ options / extension headers)
//! + TCP/UDP/ICMP/ICMPv6. Checksums are left zero: the classifier never looks at them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// ICMP type (for ICMP/ICMPv6) and echo identifier.
    pub icmp_type: u8,
    pub icmp_id: u16,
    /// IPv4 option bytes (multiple of 4) / IPv6 extension headers as (next-header-number, bytes).
    pub ipv4_options: Vec<u8>,
    pub ipv6_ext: Vec<(u8, Vec<u8>)>,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub payload: Vec<u8>,
    /// An 802.1Q tag (VLAN id) between the MAC addresses and the ethertype.
    pub vlan: Option<u16>,
    /// TCP flags byte (default SYN).
    pub tcp_flags: u8,
    /// IPv4 TTL / IPv6 hop limit (default 64).
    pub hop_limit: u8,
    /// ICMP/ICMPv6 code (default 0).
    pub icmp_code: u8,
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

impl PacketSpec {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::l4(src, dst, TCP, sport, dport)
    }
    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self::l4(src, dst, UDP, sport, dport)
    }
    pub fn echo_request(src: &str, dst: &str, id: u16) -> Self {
        let mut p = Self::l4(src, dst, ICMP, 0, 0);
        if p.src.is_ipv6() {
            p.proto = ICMPV6;
            p.icmp_type = 128;
        } else {
            p.icmp_type = 8;
        }
        p.icmp_id = id;
        p
    }
    pub fn echo_reply(src: &str, dst: &str, id: u16) -> Self {
        let mut p = Self::echo_request(src, dst, id);
        p.icmp_type = if p.src.is_ipv6() { 129 } else { 0 };
        p
    }
    fn l4(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Self {
        Self {
            src: src.parse().expect("src address"),
            dst: dst.parse().expect("dst address"),
            proto,
            sport,
            dport,
            icmp_type: 0,
            icmp_id: 0,
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            payload: b"tollgate".to_vec(),
            vlan: None,
            tcp_flags: SYN,
            hop_limit: 64,
            icmp_code: 0,
        }
    }
    /// The same spec with other TCP flags.
    pub fn flags(&self, tcp_flags: u8) -> Self {
        let mut p = self.clone();
        p.tcp_flags = tcp_flags;
        p
    }
    /// The same flow in the other direction. The answer to a bare SYN is a SYN-ACK (a bare SYN
    /// the other way would open a new connection instead).
    pub fn reply(&self) -> Self {
        let mut r = self.clone();
        std::mem::swap(&mut r.src, &mut r.dst);
        std::mem::swap(&mut r.sport, &mut r.dport);
        if r.proto == TCP && r.tcp_flags & (SYN | ACK) == SYN {
            r.tcp_flags = SYN | ACK;
        }
        r
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst mac
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src mac
        if let Some(vid) = self.vlan {
            out.extend_from_slice(&0x8100u16.to_be_bytes());
            out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                out.extend(self.ipv4_header(s, d, l4.len()));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&0x86DDu16.to_be_bytes());
                out.extend(self.ipv6_header(s, d, &l4));
            }
            _ => panic!("mixed address families"),
        }
        out.extend(l4);
        out
    }

    fn ipv4_header(&self, s: Ipv4Addr, d: Ipv4Addr, l4_len: usize) -> Vec<u8> {
        assert_eq!(
            self.ipv4_options.len() % 4,
            0,
            "IPv4 options must be whole words"
        );
        let ihl = 20 + self.ipv4_options.len();
        let total = ihl + l4_len;
        let mut h = vec![0x40 | (ihl / 4) as u8, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]); // id
        let frag = self.frag_offset & 0x1fff | if self.more_fragments { 0x2000 } else { 0 };
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[self.hop_limit, self.proto, 0, 0]);
        h.extend_from_slice(&s.octets());
        h.extend_from_slice(&d.octets());
        h.extend_from_slice(&self.ipv4_options);
        h
    }

    fn ipv6_header(&self, s: Ipv6Addr, d: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let ext_len: usize = self.ipv6_ext.iter().map(|(_, b)| b.len()).sum();
        let first_next = self.ipv6_ext.first().map_or(self.proto, |(n, _)| *n);
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[first_next, self.hop_limit]);
        h.extend_from_slice(&s.octets());
        h.extend_from_slice(&d.octets());
        for (i, (_, bytes)) in self.ipv6_ext.iter().enumerate() {
            let mut b = bytes.clone();
            // Each extension header's first byte is the next header.
            b[0] = self.ipv6_ext.get(i + 1).map_or(self.proto, |(n, _)| *n);
            h.extend(b);
        }
        h
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            TCP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
                // doff 5
            }
            UDP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            ICMP | ICMPV6 => {
                l4.extend_from_slice(&[self.icmp_type, self.icmp_code, 0, 0]);
                l4.extend_from_slice(&self.icmp_id.to_be_bytes());
                l4.extend_from_slice(&[0, 1]);
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

/// An IPv6 hop-by-hop or destination options header of 8 bytes (PadN only).
pub fn ipv6_options_header(kind: u8) -> (u8, Vec<u8>) {
    (kind, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// An ARP request frame.
pub fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 200, 1, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 200, 1, 1]);
    f
}
