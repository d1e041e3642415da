//! The event reader: takes the datapath's events off the `TG_EVENTS` ring buffer, decodes each
//! by its kind (kinds this build does not know are skipped and counted), names it with the
//! generation that produced it, and fans it out to the sinks: the log, the audit log, the
//! metrics, the flow list and inventory. Control actions (agent start and stop, a policy
//! applied) reach the same sinks through [`Control`], so the audit log has one writer.
//!
//! Each sink sees every decision ([`Sink::decision`]: metrics, inventory) and the aggregated
//! records ([`Sink::record`]: log, audit log, recent flows; see `aggregate`).

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
};
use tollgate_common::{flow::event_kind, map_names, FlowEvent, Verdict};

use crate::{
    aggregate::{self, Aggregator},
    installer::{Installed, PolicyChange},
    names::name_event,
    paths::PinLayout,
    wire::FlowRecord,
};

/// An event from the datapath, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A packet denied, dropped, passed in audit mode, or a new flow of a logged rule.
    Verdict(FlowEvent),
}

/// What [`decode`] made of one ring-buffer record.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Event(Event),
    /// A kind this build does not know (a newer datapath): skipped.
    Unknown {
        kind: u16,
    },
    /// Shorter than its header or than its kind needs: skipped.
    Malformed {
        len: usize,
    },
}

/// Decodes one record: the header (kind, size) first, then the kind's layout. A record longer
/// than this build's layout of its kind (a newer datapath that appended fields) is read up to
/// what this build knows.
pub fn decode(bytes: &[u8]) -> Decoded {
    if bytes.len() < 4 {
        return Decoded::Malformed { len: bytes.len() };
    }
    let kind = u16::from_ne_bytes([bytes[0], bytes[1]]);
    match kind {
        event_kind::VERDICT => {
            if bytes.len() < std::mem::size_of::<FlowEvent>() {
                return Decoded::Malformed { len: bytes.len() };
            }
            // SAFETY: at least size_of::<FlowEvent>() bytes; FlowEvent is repr(C) of integers
            // and byte arrays (any bytes valid); read unaligned.
            let ev: FlowEvent =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) };
            if Verdict::from_u32(ev.verdict).is_none() {
                return Decoded::Malformed { len: bytes.len() };
            }
            Decoded::Event(Event::Verdict(ev))
        }
        kind => Decoded::Unknown { kind },
    }
}

/// Counts of the reader, for `status` and the metrics.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Records taken off the ring buffer.
    pub read: AtomicU64,
    /// Of those, kinds this build does not know.
    pub unknown: AtomicU64,
    /// Of those, too short for their kind, or with a verdict out of range.
    pub malformed: AtomicU64,
    /// The reader is running (it stops only on an error, which is logged).
    pub running: AtomicBool,
}

/// A control action for the audit log and the log.
#[derive(Debug)]
pub enum Control {
    AgentStart {
        version: &'static str,
        bpffs: String,
        interfaces: String,
    },
    Policy(PolicyChange),
    /// A record of another subsystem (authentication: handshakes and lapses) for the audit
    /// log, `kind` being its record type.
    Record {
        kind: &'static str,
        fields: serde_json::Map<String, serde_json::Value>,
    },
    AgentStop {
        reason: String,
    },
}

/// What the pipeline is told besides events.
#[derive(Debug)]
pub enum Input {
    Control(Control),
    /// The agent is stopping: pending aggregates go out, the sinks record the stop and flush,
    /// then `done` is answered and the pipeline ends.
    Stop {
        reason: String,
        done: oneshot::Sender<()>,
    },
}

/// One consumer of decisions.
pub trait Sink: Send {
    /// Every decision the datapath reported, as it arrives.
    fn decision(&mut self, _record: &FlowRecord) {}
    /// Aggregated records: the first decision of an edge, then its repeats summed per
    /// interval.
    fn record(&mut self, _record: &FlowRecord) {}
    /// A control action.
    fn control(&mut self, _control: &Control) {}
    /// Called about once a second: periodic work (checkpoints, persisting).
    fn tick(&mut self, _now: Instant) {}
    /// The agent stops: flush.
    fn stop(&mut self) {}
}

/// How often the reader collects events the datapath did not wake it for.
const EVENT_POLL: Duration = Duration::from_millis(100);
/// How often sinks get their [`Sink::tick`].
const TICK: Duration = Duration::from_secs(1);

pub struct Pipeline {
    pub installed: watch::Receiver<Arc<Installed>>,
    pub sinks: Vec<Box<dyn Sink>>,
    pub stats: Arc<EventStats>,
    pub input: mpsc::UnboundedReceiver<Input>,
    pub aggregate_interval: Duration,
}

impl Pipeline {
    /// Reads events until the task is dropped or the ring buffer fails.
    pub async fn run(mut self, layout: PinLayout) {
        self.stats.running.store(true, Ordering::Relaxed);
        if let Err(e) = self.run_inner(&layout).await {
            tracing::error!(error = %format!("{e:#}"), "event reader stopped");
        }
        self.stats.running.store(false, Ordering::Relaxed);
    }

    async fn run_inner(&mut self, layout: &PinLayout) -> Result<()> {
        let path = layout.map(map_names::EVENTS);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let ring = aya::maps::RingBuf::try_from(aya::maps::Map::from_map_data(data)?)?;
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until dropped,
        // which happens only when the AsyncFd is dropped.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)?;
        let mut aggregator = Aggregator::new(
            self.aggregate_interval,
            aggregate::MAX_EDGES,
            Instant::now(),
        );
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            // The datapath wakes the reader only when 64 KiB are waiting (a wakeup per event
            // was dear on the packet path); otherwise events are collected every 100 ms.
            tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut(), &mut batch);
                    guard.clear_ready();
                }
                _ = tokio::time::sleep(EVENT_POLL) => self.drain(fd.get_mut(), &mut batch),
                _ = tick.tick() => {
                    let now = Instant::now();
                    for r in aggregator.flush(now) {
                        self.each(|s| s.record(&r));
                    }
                    self.each(|s| s.tick(now));
                }
                input = self.input.recv() => match input {
                    Some(Input::Stop { reason, done }) => {
                        for r in aggregator.flush_all(Instant::now()) {
                            self.each(|s| s.record(&r));
                        }
                        let stop = Control::AgentStop { reason };
                        self.each(|s| s.control(&stop));
                        self.each(|s| s.stop());
                        let _ = done.send(());
                        return Ok(());
                    }
                    Some(Input::Control(c)) => self.each(|s| s.control(&c)),
                    // The agent is gone without a stop: nothing more will come.
                    None => return Ok(()),
                },
            }
            if batch.is_empty() {
                continue;
            }
            let installed = self.installed.borrow().clone();
            let clock = WallClock::now();
            for ev in batch.drain(..) {
                let record = describe(&ev, &installed, &clock);
                self.each(|s| s.decision(&record));
                if let Some(r) = aggregator.offer(record) {
                    self.each(|s| s.record(&r));
                }
            }
        }
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink)) {
        for s in &mut self.sinks {
            f(s.as_mut());
        }
    }

    /// Every event waiting in the ring buffer, decoded; what cannot be decoded is counted.
    fn drain(&self, ring: &mut aya::maps::RingBuf<aya::maps::MapData>, out: &mut Vec<FlowEvent>) {
        while let Some(item) = ring.next() {
            self.stats.read.fetch_add(1, Ordering::Relaxed);
            match decode(&item) {
                Decoded::Event(Event::Verdict(ev)) => out.push(ev),
                Decoded::Unknown { .. } => {
                    self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                }
                Decoded::Malformed { .. } => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The wall clock and the boot clock read together, to date events (stamped with
/// CLOCK_BOOTTIME) in wall-clock time.
pub struct WallClock {
    wall: SystemTime,
    boot_ns: u64,
}

impl WallClock {
    pub fn now() -> Self {
        Self {
            boot_ns: crate::datapath::boottime_ns(),
            wall: SystemTime::now(),
        }
    }

    pub fn at(&self, boot_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.boot_ns.saturating_sub(boot_ns))
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn proto_name(p: u8) -> String {
    match p {
        tollgate_common::proto::TCP => "tcp".into(),
        tollgate_common::proto::UDP => "udp".into(),
        tollgate_common::proto::ICMP => "icmp".into(),
        tollgate_common::proto::ICMPV6 => "icmpv6".into(),
        n => format!("proto-{n}"),
    }
}

/// `deny`, `audit` or `allow`.
pub fn outcome(v: Verdict) -> &'static str {
    match v {
        Verdict::AuditWouldDeny | Verdict::AuditWouldDrop => "audit",
        v if v.passes() => "allow",
        _ => "deny",
    }
}

/// Names an event with the names of the generation that produced it.
pub fn describe(ev: &FlowEvent, installed: &Installed, clock: &WallClock) -> FlowRecord {
    let verdict = Verdict::from_u32(ev.verdict).unwrap_or(Verdict::DenyDefault);
    let addr = |a: [u8; 16]| -> IpAddr {
        let v6 = std::net::Ipv6Addr::from(a);
        match v6.to_ipv4_mapped() {
            Some(v4) if ev.family == 4 => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    };
    let (from, to, rule) = name_event(installed.names.of(ev.generation), ev);
    let limit = matches!(verdict, Verdict::DropRateLimited | Verdict::AuditWouldDrop).then(|| {
        let kind = tollgate_common::ratelimit::kind::NAMES
            .get(usize::from(ev.limit_kind))
            .copied()
            .unwrap_or("unknown");
        match installed.limits.get(&ev.limit_id) {
            Some(info) => format!("{kind} limit of {} ({})", info.owner, info.description),
            None => format!("{kind} limit #{}", ev.limit_id),
        }
    });
    FlowRecord {
        seq: 0,
        time: rfc3339(clock.at(ev.timestamp_ns)),
        verdict: verdict.name().to_owned(),
        outcome: outcome(verdict).to_owned(),
        rule,
        limit,
        from_identity: from,
        to_identity: to,
        src: addr(ev.saddr),
        dst: addr(ev.daddr),
        sport: ev.sport,
        dport: ev.dport,
        protocol: proto_name(ev.proto),
        generation: ev.generation,
        ifindex: ev.ifindex,
        direction: if ev.direction == tollgate_common::direction::INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_owned(),
        // The packet itself and those of its edge the datapath's sampler held back before it.
        count: 1 + u64::from(ev.suppressed),
        repeated: false,
        auth_required: ev.flags & tollgate_common::flow::EVENT_FLAG_AUTH_REQUIRED != 0,
    }
}

/// One line for the log: what was decided, between whom, by what.
pub fn log_line(r: &FlowRecord) -> String {
    let what = match r.protocol.as_str() {
        "icmp" | "icmpv6" => format!("type {}", r.sport),
        _ => format!("port {}", r.dport),
    };
    let by = match &r.limit {
        Some(limit) => format!("the {limit} (the flow's rule: {})", r.rule),
        None => r.rule.clone(),
    };
    let count = if r.repeated {
        format!(" ({} more like it)", r.count)
    } else if r.count > 1 {
        format!(" (+{} like it before it)", r.count - 1)
    } else {
        String::new()
    };
    format!(
        "{} {} {} -> {} {what} ({} -> {}) by {by} [if {} {}]{count}",
        r.verdict, r.protocol, r.src, r.dst, r.from_identity, r.to_identity, r.ifindex, r.direction
    )
}

/// The log sink: one line per aggregated record, under the `tollgate::flow` target.
pub struct LogSink;

impl Sink for LogSink {
    fn record(&mut self, r: &FlowRecord) {
        tracing::info!(target: "tollgate::flow", "{}", log_line(r));
    }

    fn control(&mut self, c: &Control) {
        if let Control::Policy(PolicyChange::Rejected { digest, reason }) = c {
            tracing::warn!(%digest, %reason, "policy apply refused; the running policy stays in force");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(ev: &FlowEvent) -> Vec<u8> {
        // SAFETY: FlowEvent is repr(C) plain data; viewing it as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(
                ev as *const FlowEvent as *const u8,
                std::mem::size_of::<FlowEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn events_are_decoded_by_kind_and_unknown_kinds_are_skipped() {
        let ev = FlowEvent {
            kind: event_kind::VERDICT,
            size: std::mem::size_of::<FlowEvent>() as u16,
            verdict: Verdict::DenyDefault as u32,
            ..Default::default()
        };
        assert_eq!(decode(&bytes_of(&ev)), Decoded::Event(Event::Verdict(ev)));
        // A newer datapath's longer event of a known kind: read as far as this build knows.
        let mut longer = bytes_of(&ev);
        longer.extend_from_slice(&[0xAB; 16]);
        assert_eq!(decode(&longer), Decoded::Event(Event::Verdict(ev)));
        let mut unknown = bytes_of(&ev);
        unknown[0..2].copy_from_slice(&77u16.to_ne_bytes());
        assert_eq!(decode(&unknown), Decoded::Unknown { kind: 77 });
        assert_eq!(decode(&[1, 0]), Decoded::Malformed { len: 2 });
        assert_eq!(decode(&bytes_of(&ev)[..40]), Decoded::Malformed { len: 40 });
        let bad_verdict = FlowEvent { verdict: 999, ..ev };
        assert_eq!(
            decode(&bytes_of(&bad_verdict)),
            Decoded::Malformed {
                len: std::mem::size_of::<FlowEvent>()
            }
        );
    }

    #[test]
    fn wall_clock_dates_boot_clock_stamps() {
        let c = WallClock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000),
            boot_ns: 50_000_000_000,
        };
        assert_eq!(
            c.at(49_000_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(999)
        );
        // A stamp from after the reading (read late) is dated at the reading, not later.
        assert_eq!(c.at(51_000_000_000), c.wall);
    }
}
