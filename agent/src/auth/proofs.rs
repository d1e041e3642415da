//! `TG_AUTH`, the proofs the kernel admits authenticated pairs by (see `tollgate_common::auth`).
//! The auth manager is its only writer; tests and the loader open it from its pin too.

use std::time::SystemTime;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use tollgate_common::{map_names, AuthKey, AuthValue};

use crate::{paths::PinLayout, policy::ClockReading};

/// The wall-clock instant `until` on CLOCK_BOOTTIME, as proofs carry it (the wall clock may
/// step; the boot clock does not).
pub fn boot_ns(until: SystemTime) -> u64 {
    ClockReading::now().boot_ns(until)
}

/// Handle on the pinned `TG_AUTH`.
pub struct ProofMap {
    map: HashMap<MapData, AuthKey, AuthValue>,
}

impl ProofMap {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let path = layout.map(map_names::AUTH);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let map = Map::from_map_data(data)?.try_into()?;
        Ok(Self { map })
    }

    /// Admits the pair `pair` until `expires_boot_ns` (CLOCK_BOOTTIME; never 0), replacing
    /// what was there in one update.
    pub fn write(&mut self, pair: u64, expires_boot_ns: u64) -> Result<()> {
        let value = AuthValue {
            expires_ns: expires_boot_ns.max(1),
            ..Default::default()
        };
        self.map
            .insert(AuthKey { pair }, value, 0)
            .context("writing a proof to TG_AUTH")
    }

    /// Withdraws the pair's proof (absent already is fine).
    pub fn remove(&mut self, pair: u64) {
        let _ = self.map.remove(&AuthKey { pair });
    }

    /// Every proof in the map: (pair key, CLOCK_BOOTTIME expiry).
    pub fn entries(&self) -> Vec<(u64, u64)> {
        self.map
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k.pair, v.expires_ns))
            .collect()
    }
}
