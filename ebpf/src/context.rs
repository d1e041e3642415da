//! The packet context: everything known about the packet in hand, passed down the decision
//! instead of long argument lists.

use aya_ebpf::programs::TcContext;
use tollgate_common::{slot_of, FlowKey};

use crate::{
    parse::Packet,
    source::{source_check, SourceCheck, MODE_NONE},
};

pub struct PacketContext<'a> {
    pub ctx: &'a TcContext,
    /// `direction::*` of the hook.
    pub dir: u8,
    /// The interface of this hook (for events).
    pub ifindex: u32,
    pub pkt: Packet,
    /// The conntrack key of the packet's direction (family-independent form).
    pub key: FlowKey,
    /// The live policy generation, read once per packet.
    pub generation: u64,
    /// `policy::clock_ns()`, for idle tracking and event sampling (CLOCK_BOOTTIME, the clock
    /// of rule expiries, is read only when an expiry must be checked).
    pub coarse: u64,
    /// The interface the packet entered the node by (0: the node's own packet).
    pub origin: u32,
    pub ingress: bool,
    /// How the source is validated, from `TG_INTERFACES[origin]`; read only when needed
    /// (`load_source`): a packet of an established flow validated at this origin needs none.
    pub source: SourceCheck,
    pub source_known: bool,
}

/// A `SourceCheck` that checks nothing, before the real one is read.
pub const NO_SOURCE_CHECK: SourceCheck = SourceCheck {
    mode: MODE_NONE,
    origin: 0,
    bound_identity: 0,
    origin_enforced: false,
};

impl PacketContext<'_> {
    /// Reads how this packet's source is to be validated, once.
    #[inline(always)]
    pub fn load_source(&mut self) {
        if !self.source_known {
            self.source = source_check(self.origin, slot_of(self.generation), self.ingress);
            self.source_known = true;
        }
    }
}
