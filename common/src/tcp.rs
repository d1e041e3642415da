//! How much TCP state conntrack keeps, and what each packet does to it.
//!
//! A flow has two conntrack entries (original and reply direction), each with its own
//! `FLOW_FLAG_*` bits. The kernel only looks at TCP flags when a segment carries SYN, FIN or RST,
//! or when the flow is still half-open, so an established data segment costs one branch. The
//! rules, which the kernel and these host tests share:
//!
//! - A SYN without ACK that hits the reply entry is not part of the flow: it opens a new
//!   connection in the other direction and is decided by policy (a stale entry must never admit
//!   a reverse connection). The same holds for a SYN on a flow that is already closing (port
//!   reuse). A SYN in the original direction of an open flow is a retransmission and passes.
//! - A flow admitted on a bare SYN is half-open (`FLOW_FLAG_SYN_SENT`) with a short lifetime
//!   until the reply direction answers.
//! - An RST, or a FIN in each direction, marks both entries closing: they are forgotten a few
//!   seconds after the last packet.

use crate::flow::{FLOW_FLAG_CLOSING, FLOW_FLAG_FIN_SEEN, FLOW_FLAG_REPLY, FLOW_FLAG_SYN_SENT};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Idle lifetime of an established TCP flow (Cilium's default).
pub const TCP_ESTABLISHED_IDLE_NS: u64 = 6 * 3600 * NS_PER_SEC;
/// Idle lifetime of a flow whose SYN has not been answered. Linux retransmits a SYN after 1, 2,
/// 4, ... 32 s, each retransmission refreshing the entry.
pub const TCP_SYN_IDLE_NS: u64 = 60 * NS_PER_SEC;
/// Idle lifetime after an RST or the second FIN: long enough for the last ACK and a few
/// retransmissions, short enough that the tuple cannot be reused the other way for long.
pub const TCP_CLOSING_IDLE_NS: u64 = 10 * NS_PER_SEC;
const _: () = assert!(
    TCP_CLOSING_IDLE_NS <= 10 * NS_PER_SEC,
    "closed flows go within seconds"
);
/// Idle lifetime of UDP, ICMP echo and other tracked flows.
pub const DATAGRAM_IDLE_NS: u64 = 60 * NS_PER_SEC;

/// Flags worth a closer look on a tracked flow; anything else is plain data.
pub const TCP_CONTROL_FLAGS: u8 = TCP_SYN | TCP_FIN | TCP_RST;

/// How long an entry may stay idle before its next packet counts as a new flow.
#[inline(always)]
pub const fn idle_limit_ns(proto: u8, flow_flags: u32) -> u64 {
    if proto != crate::proto::TCP {
        DATAGRAM_IDLE_NS
    } else if flow_flags & FLOW_FLAG_CLOSING != 0 {
        TCP_CLOSING_IDLE_NS
    } else if flow_flags & FLOW_FLAG_SYN_SENT != 0 {
        TCP_SYN_IDLE_NS
    } else {
        TCP_ESTABLISHED_IDLE_NS
    }
}

/// State bits a TCP flow starts with, from the segment that opened it. A flow picked up in the
/// middle (after an eviction or a restart) starts established; one first seen closing starts
/// closing.
#[inline(always)]
pub const fn initial_flags(tcp_flags: u8) -> u32 {
    if tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        FLOW_FLAG_CLOSING
    } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        FLOW_FLAG_SYN_SENT
    } else {
        0
    }
}

/// Does this packet on a tracked TCP flow need `step`? False for the data segments of an
/// established flow: the fast path.
#[inline(always)]
pub const fn needs_step(tcp_flags: u8, flow_flags: u32) -> bool {
    tcp_flags & TCP_CONTROL_FLAGS != 0 || flow_flags & FLOW_FLAG_SYN_SENT != 0
}

/// What a segment does to the tracked flow whose entry (`flow_flags`) it hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpStep {
    /// Nothing changes.
    Pass,
    /// Not part of this flow: decide it as a new flow (a SYN in the reply direction, or on a
    /// closing flow).
    NewFlow,
    /// The reply direction answered a half-open flow: clear `FLOW_FLAG_SYN_SENT` on both
    /// entries.
    Answered,
    /// RST: both entries closing.
    Reset,
    /// FIN: mark this entry `FLOW_FLAG_FIN_SEEN`; if the twin has it too, both are closing.
    Fin,
}

#[inline(always)]
pub const fn step(tcp_flags: u8, flow_flags: u32) -> TcpStep {
    let bare_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if bare_syn && flow_flags & (FLOW_FLAG_REPLY | FLOW_FLAG_CLOSING) != 0 {
        return TcpStep::NewFlow;
    }
    if tcp_flags & TCP_RST != 0 {
        return if flow_flags & FLOW_FLAG_CLOSING != 0 {
            TcpStep::Pass
        } else {
            TcpStep::Reset
        };
    }
    if tcp_flags & TCP_FIN != 0 && flow_flags & (FLOW_FLAG_FIN_SEEN | FLOW_FLAG_CLOSING) == 0 {
        return TcpStep::Fin;
    }
    if flow_flags & (FLOW_FLAG_SYN_SENT | FLOW_FLAG_REPLY) == FLOW_FLAG_SYN_SENT | FLOW_FLAG_REPLY {
        return TcpStep::Answered;
    }
    TcpStep::Pass
}

/// After a FIN marked one entry, does the twin's state close the flow?
#[inline(always)]
pub const fn fin_closes(twin_flags: u32) -> bool {
    twin_flags & FLOW_FLAG_FIN_SEEN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flow::FLOW_FLAG_AUDIT, proto};

    const ORIGINAL: u32 = 0;
    const REPLY: u32 = FLOW_FLAG_REPLY;

    #[test]
    fn bare_syn_in_the_reply_direction_is_a_new_flow() {
        assert_eq!(step(TCP_SYN, REPLY), TcpStep::NewFlow);
        assert_eq!(step(TCP_SYN, REPLY | FLOW_FLAG_AUDIT), TcpStep::NewFlow);
    }

    #[test]
    fn syn_ack_in_the_reply_direction_answers_a_half_open_flow() {
        assert_eq!(
            step(TCP_SYN | TCP_ACK, REPLY | FLOW_FLAG_SYN_SENT),
            TcpStep::Answered
        );
        // Any reply-direction segment answers (e.g. the SYN-ACK was lost, the ACK came).
        assert_eq!(step(TCP_ACK, REPLY | FLOW_FLAG_SYN_SENT), TcpStep::Answered);
    }

    #[test]
    fn retransmitted_syn_in_the_original_direction_passes() {
        assert_eq!(step(TCP_SYN, ORIGINAL | FLOW_FLAG_SYN_SENT), TcpStep::Pass);
        assert_eq!(step(TCP_SYN, ORIGINAL), TcpStep::Pass);
    }

    #[test]
    fn syn_on_a_closing_flow_is_a_new_flow_either_way() {
        assert_eq!(
            step(TCP_SYN, ORIGINAL | FLOW_FLAG_CLOSING),
            TcpStep::NewFlow
        );
        assert_eq!(step(TCP_SYN, REPLY | FLOW_FLAG_CLOSING), TcpStep::NewFlow);
    }

    #[test]
    fn rst_closes_once() {
        assert_eq!(step(TCP_RST, ORIGINAL), TcpStep::Reset);
        assert_eq!(
            step(TCP_RST | TCP_ACK, REPLY | FLOW_FLAG_SYN_SENT),
            TcpStep::Reset
        );
        assert_eq!(step(TCP_RST, REPLY | FLOW_FLAG_CLOSING), TcpStep::Pass);
    }

    #[test]
    fn fin_marks_once_and_closes_when_both_sides_sent_one() {
        assert_eq!(step(TCP_FIN | TCP_ACK, ORIGINAL), TcpStep::Fin);
        assert_eq!(
            step(TCP_FIN | TCP_ACK, ORIGINAL | FLOW_FLAG_FIN_SEEN),
            TcpStep::Pass
        );
        assert!(!fin_closes(REPLY));
        assert!(fin_closes(REPLY | FLOW_FLAG_FIN_SEEN));
    }

    #[test]
    fn data_of_an_established_flow_takes_the_fast_path() {
        assert!(!needs_step(TCP_ACK, ORIGINAL));
        assert!(!needs_step(TCP_ACK | 0x08, REPLY)); // PSH
        assert!(needs_step(TCP_ACK, REPLY | FLOW_FLAG_SYN_SENT));
        assert!(needs_step(TCP_FIN | TCP_ACK, ORIGINAL));
    }

    #[test]
    fn initial_state_follows_the_opening_segment() {
        assert_eq!(initial_flags(TCP_SYN), FLOW_FLAG_SYN_SENT);
        assert_eq!(initial_flags(TCP_ACK), 0);
        assert_eq!(initial_flags(TCP_SYN | TCP_ACK), 0);
        assert_eq!(initial_flags(TCP_RST), FLOW_FLAG_CLOSING);
        assert_eq!(initial_flags(TCP_FIN | TCP_ACK), FLOW_FLAG_CLOSING);
    }

    #[test]
    fn lifetimes_shrink_for_half_open_and_closing_flows() {
        assert_eq!(idle_limit_ns(proto::TCP, 0), TCP_ESTABLISHED_IDLE_NS);
        assert_eq!(
            idle_limit_ns(proto::TCP, FLOW_FLAG_SYN_SENT),
            TCP_SYN_IDLE_NS
        );
        assert_eq!(
            idle_limit_ns(proto::TCP, FLOW_FLAG_CLOSING | FLOW_FLAG_SYN_SENT),
            TCP_CLOSING_IDLE_NS
        );
        assert_eq!(
            idle_limit_ns(proto::UDP, FLOW_FLAG_CLOSING),
            DATAGRAM_IDLE_NS
        );
    }
}
