//! Aggregation of repeated decisions into one record per edge and interval, so the log, the
//! audit log and the list of recent flows stay bounded under a deny flood while the counters
//! (kernel counters, and the counts these records carry) stay exact.
//!
//! An edge is what an operator asks about: verdict, rule (and limit), both identities, both
//! addresses, destination port and protocol; not the source port, so a client's retries and
//! reconnects fall together. The first decision of an edge in an interval is passed on at once
//! (a deny shows up live); later ones of the interval are summed, and at the interval's end the
//! sum goes out as one `repeated` record. An edge quiet for a whole interval is forgotten.
//!
//! The datapath's sampler already sends at most one event per edge, CPU and second (and 1,000
//! per CPU and second in all); this takes that down to at most two records per edge and
//! interval.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::wire::FlowRecord;

/// How long repeats of an edge are summed before their record goes out.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Edges followed per interval. Beyond it, records pass through unaggregated (still bounded by
/// the datapath's event budget); a warning says so.
pub const MAX_EDGES: usize = 50_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EdgeKey {
    verdict: String,
    rule: String,
    limit: Option<String>,
    from: String,
    to: String,
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    protocol: String,
}

impl EdgeKey {
    fn of(r: &FlowRecord) -> Self {
        Self {
            verdict: r.verdict.clone(),
            rule: r.rule.clone(),
            limit: r.limit.clone(),
            from: r.from_identity.clone(),
            to: r.to_identity.clone(),
            src: r.src,
            dst: r.dst,
            dport: r.dport,
            protocol: r.protocol.clone(),
        }
    }
}

struct Pending {
    /// The latest record of the edge (its time, source port and interface go out with the sum).
    last: FlowRecord,
    /// Packets since the record that went out, not yet reported.
    count: u64,
}

pub struct Aggregator {
    interval: Duration,
    max_edges: usize,
    window_start: Instant,
    edges: HashMap<EdgeKey, Pending>,
    /// Records passed through unaggregated because `max_edges` was reached, this interval.
    overflowed: u64,
}

impl Aggregator {
    pub fn new(interval: Duration, max_edges: usize, now: Instant) -> Self {
        Self {
            interval,
            max_edges,
            window_start: now,
            edges: HashMap::new(),
            overflowed: 0,
        }
    }

    /// Takes one decision; returns it if it is to go out now (the edge's first in this
    /// interval), or `None` when it was added to the edge's sum.
    pub fn offer(&mut self, record: FlowRecord) -> Option<FlowRecord> {
        let key = EdgeKey::of(&record);
        if let Some(p) = self.edges.get_mut(&key) {
            p.count += record.count;
            p.last = record;
            return None;
        }
        if self.edges.len() >= self.max_edges {
            self.overflowed += 1;
            return Some(record);
        }
        self.edges.insert(
            key,
            Pending {
                last: record.clone(),
                count: 0,
            },
        );
        Some(record)
    }

    /// When the interval is over: the sums of its repeats, one record per edge that had any,
    /// and a new interval. Before that: nothing.
    pub fn flush(&mut self, now: Instant) -> Vec<FlowRecord> {
        if now.saturating_duration_since(self.window_start) < self.interval {
            return Vec::new();
        }
        self.flush_all(now)
    }

    /// Every pending sum, now (at stop).
    pub fn flush_all(&mut self, now: Instant) -> Vec<FlowRecord> {
        self.window_start = now;
        if self.overflowed > 0 {
            tracing::warn!(
                passed_unaggregated = self.overflowed,
                max_edges = self.max_edges,
                "more distinct edges than the aggregator follows in one interval; the rest were logged one by one"
            );
            self.overflowed = 0;
        }
        let mut out: Vec<FlowRecord> = self
            .edges
            .drain()
            .filter(|(_, p)| p.count > 0)
            .map(|(_, p)| FlowRecord {
                count: p.count,
                repeated: true,
                ..p.last
            })
            .collect();
        out.sort_by(|a, b| a.time.cmp(&b.time));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(src: &str, dport: u16, sport: u16, count: u64) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: format!("2026-11-24T10:00:00.{sport:03}Z"),
            verdict: "deny_default".into(),
            outcome: "deny".into(),
            rule: "default-deny".into(),
            limit: None,
            from_identity: "world".into(),
            to_identity: "orders".into(),
            src: src.parse().unwrap(),
            dst: "10.200.1.2".parse().unwrap(),
            sport,
            dport,
            protocol: "tcp".into(),
            generation: 1,
            ifindex: 3,
            direction: "ingress".into(),
            count,
            repeated: false,
            auth_required: false,
        }
    }

    #[test]
    fn first_of_an_edge_goes_out_and_repeats_are_summed_until_the_interval_ends() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(INTERVAL, MAX_EDGES, t0);
        assert!(a.offer(record("10.200.0.1", 80, 1, 1)).is_some());
        // Another source port of the same client: the same edge.
        assert!(a.offer(record("10.200.0.1", 80, 2, 3)).is_none());
        assert!(a.offer(record("10.200.0.1", 80, 3, 5)).is_none());
        // Another port, another source: other edges.
        assert!(a.offer(record("10.200.0.1", 443, 4, 1)).is_some());
        assert!(a.offer(record("10.200.0.9", 80, 5, 1)).is_some());
        assert!(a.flush(t0 + INTERVAL / 2).is_empty());
        let sums = a.flush(t0 + INTERVAL);
        assert_eq!(sums.len(), 1, "{sums:?}");
        assert_eq!(sums[0].count, 8);
        assert!(sums[0].repeated);
        assert_eq!(
            sums[0].sport, 3,
            "the sum carries the latest record's details"
        );
        // A new interval: the edge's next decision goes out at once again.
        assert!(a.offer(record("10.200.0.1", 80, 6, 1)).is_some());
    }

    #[test]
    fn a_flood_of_one_edge_makes_two_records_per_interval() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(INTERVAL, MAX_EDGES, t0);
        let mut out = 0;
        let mut packets = 0;
        for i in 0..10_000u64 {
            if let Some(r) = a.offer(record("10.200.0.1", 80, (i % 1000) as u16, 7)) {
                out += 1;
                packets += r.count;
            }
        }
        for r in a.flush(t0 + INTERVAL) {
            out += 1;
            packets += r.count;
        }
        assert_eq!(out, 2);
        assert_eq!(packets, 70_000, "counts are kept exactly");
    }

    #[test]
    fn beyond_the_edge_limit_records_pass_through_and_nothing_is_lost() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(INTERVAL, 2, t0);
        assert!(a.offer(record("10.200.0.1", 80, 1, 1)).is_some());
        assert!(a.offer(record("10.200.0.2", 80, 1, 1)).is_some());
        assert!(a.offer(record("10.200.0.3", 80, 1, 1)).is_some());
        assert!(a.offer(record("10.200.0.3", 80, 1, 1)).is_some());
        assert!(a.offer(record("10.200.0.1", 80, 2, 4)).is_none());
        let sums = a.flush_all(t0);
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[0].count, 4);
    }

    #[test]
    fn quiet_edges_are_forgotten_at_the_interval_end() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(INTERVAL, MAX_EDGES, t0);
        assert!(a.offer(record("10.200.0.1", 80, 1, 1)).is_some());
        assert!(a.flush(t0 + INTERVAL).is_empty());
        assert!(a.edges.is_empty());
    }
}
