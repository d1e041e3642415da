//! Port ranges as bit prefixes. An LPM trie matches prefixes, so a range `[start, end]` becomes
//! the smallest set of aligned blocks `value/len` that cover exactly that range (at most 30 for
//! 16-bit ports).

/// One aligned block of ports: all ports whose top `prefix_len` bits equal those of `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortPrefix {
    pub port: u16,
    /// 0..=16 bits of the port that must match.
    pub prefix_len: u8,
}

impl PortPrefix {
    pub const fn first(self) -> u16 {
        self.port
    }
    pub const fn last(self) -> u16 {
        let span = (1u32 << (16 - self.prefix_len as u32)) - 1;
        (self.port as u32 + span) as u16
    }
}

/// Splits the inclusive range `[start, end]` into aligned prefixes, lowest first, and hands each
/// to `emit`. Does nothing if `start > end`.
pub fn for_each_prefix(start: u16, end: u16, mut emit: impl FnMut(PortPrefix)) {
    if start > end {
        return;
    }
    let mut lo = start as u32;
    let hi = end as u32;
    while lo <= hi {
        // Largest block aligned at `lo` that does not run past `hi`.
        let mut size_bits = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while size_bits > 0 && lo + (1u32 << size_bits) - 1 > hi {
            size_bits -= 1;
        }
        emit(PortPrefix {
            port: lo as u16,
            prefix_len: (16 - size_bits) as u8,
        });
        lo += 1u32 << size_bits;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn prefixes(start: u16, end: u16) -> Vec<PortPrefix> {
        let mut v = Vec::new();
        for_each_prefix(start, end, |p| v.push(p));
        v
    }

    fn covered(ps: &[PortPrefix]) -> Vec<u16> {
        ps.iter().flat_map(|p| p.first()..=p.last()).collect()
    }

    #[test]
    fn single_port_is_one_full_prefix() {
        assert_eq!(
            prefixes(8080, 8080),
            [PortPrefix {
                port: 8080,
                prefix_len: 16
            }]
        );
    }

    #[test]
    fn whole_range_is_one_empty_prefix() {
        assert_eq!(
            prefixes(0, 65535),
            [PortPrefix {
                port: 0,
                prefix_len: 0
            }]
        );
    }

    #[test]
    fn aligned_block_is_one_prefix() {
        assert_eq!(
            prefixes(1024, 2047),
            [PortPrefix {
                port: 1024,
                prefix_len: 6
            }]
        );
    }

    #[test]
    fn range_covers_exactly_its_ports() {
        for (s, e) in [
            (9000, 9100),
            (1, 65534),
            (0, 0),
            (65535, 65535),
            (1023, 1025),
            (7, 9),
        ] {
            let ps = prefixes(s, e);
            let ports = covered(&ps);
            assert_eq!(ports, (s..=e).collect::<Vec<_>>(), "range {s}-{e}");
        }
    }

    #[test]
    fn worst_case_range_needs_at_most_thirty_prefixes() {
        assert_eq!(prefixes(1, 65534).len(), 30);
    }

    #[test]
    fn reversed_range_is_empty() {
        assert!(prefixes(10, 9).is_empty());
    }
}
