//! `status`: assembled from what the subsystems publish (the installer's last install, the fill
//! sampler's last count) and a read of the counters, without walking a map or waiting for the
//! installer; it answers in about a millisecond whatever the conntrack map holds.

use std::sync::atomic::Ordering;

use tollgate_common::{
    ratelimit::kind,
    verdict::{COUNTER_EVENTS_LOST, COUNTER_EVENTS_SUPPRESSED},
    Verdict,
};

use crate::{
    error::Error,
    handles::Handles,
    wire::{LimitStatus, StatusResponse},
};

pub fn status(h: &Handles) -> Result<StatusResponse, Error> {
    let installed = h.installer.installed();
    let counters = h.reader.counters()?;
    let fill = h.fill.borrow().clone();
    let mut maps = installed.maps.clone();
    for m in &mut maps {
        if let Some((_, n)) = fill.conntrack.iter().find(|(name, _)| *name == m.name) {
            m.entries = Some(*n);
        }
    }
    let limits = installed
        .live_limits
        .iter()
        .filter_map(|id| Some((installed.limits.get(id)?, h.reader.bucket(*id)?)))
        .map(|(info, b)| LimitStatus {
            owner: info.owner.clone(),
            limit: info.description.clone(),
            mode: if info.audit { "audit" } else { "enforce" }.to_owned(),
            dropped_packets: b.dropped[kind::PACKETS],
            dropped_bytes_limit: b.dropped[kind::BYTES],
            refused_connections: b.dropped[kind::CONNECTIONS],
            would_drop_packets: b.would_drop[kind::PACKETS],
            would_drop_bytes_limit: b.would_drop[kind::BYTES],
            would_refuse_connections: b.would_drop[kind::CONNECTIONS],
        })
        .collect();
    Ok(StatusResponse {
        kubernetes: h
            .cluster
            .as_ref()
            .and_then(|s| s.lock().ok().map(|s| s.clone())),
        version: env!("CARGO_PKG_VERSION").to_string(),
        bpffs: h.config.bpffs.clone(),
        interfaces_selector: h.config.interfaces_selector.clone(),
        attachments: installed.attachments.clone(),
        policy_name: installed.policy.name.clone(),
        generation: installed.generation,
        rules: installed.policy.rules,
        identities: installed.policy.identities,
        map_usage: installed.map_usage,
        conntrack_entries: fill.conntrack_total(),
        conntrack_counted_at: fill.at.map(crate::events::rfc3339),
        maps,
        limits,
        verdicts: Verdict::ALL
            .iter()
            .map(|v| (v.name().to_string(), counters[*v as usize]))
            .collect(),
        events_lost: counters[COUNTER_EVENTS_LOST as usize],
        events_suppressed: counters[COUNTER_EVENTS_SUPPRESSED as usize],
        events_read: h.events.read.load(Ordering::Relaxed),
        events_unknown: h.events.unknown.load(Ordering::Relaxed)
            + h.events.malformed.load(Ordering::Relaxed),
        interfaces: installed.interfaces.clone(),
        links_restored: installed.links_restored,
        audit: h.audit.as_ref().map(|a| a.status()),
        auth: h.auth.as_ref().map(|a| a.status()),
    })
}
