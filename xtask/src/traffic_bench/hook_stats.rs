//! The kernel's own account of what each attached Tollgate program costs on real traffic:
//! BPF run-time statistics (run_time_ns, run_cnt per program), switched on only while a
//! workload runs because they add two clock reads to every program run.
//!
//! BPF_ENABLE_STATS (Linux 5.8) returns a descriptor that keeps statistics on while it is
//! open, so they go off again even if this process dies; the sysctl kernel.bpf_stats_enabled
//! would have to be restored by hand. The counters are read with `bpftool prog show pinned`.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// `enum bpf_cmd` BPF_ENABLE_STATS and `enum bpf_stats_type` BPF_STATS_RUN_TIME (uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics are on while this lives.
pub struct StatsEnabled(#[expect(dead_code, reason = "held for its Drop (close)")] OwnedFd);

impl StatsEnabled {
    pub fn new() -> Result<Self> {
        // bpf_attr for BPF_ENABLE_STATS: `type` (u32); the rest must be zero.
        let mut attr = [0u64; 1];
        attr[0] = u64::from(BPF_STATS_RUN_TIME);
        // SAFETY: the kernel reads `attr`, which is as large as the size passed and alive for
        // the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("BPF_ENABLE_STATS (BPF run-time statistics need Linux 5.8 and root)");
        }
        // SAFETY: a new descriptor the kernel just returned; we own and close it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// Cumulative counters of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCounters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl ProgramCounters {
    /// The counters accumulated since `earlier`.
    pub fn since(self, earlier: ProgramCounters) -> ProgramCounters {
        ProgramCounters {
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(earlier.run_cnt),
        }
    }

    pub fn ns_per_run(self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// The programs pinned under an agent's pin directory (`<bpffs>/programs/<name>`): ingress
/// programs first, then by name. Listed rather than named, so the bench follows the datapath
/// when programs are renamed or added.
pub fn pinned_programs(bpffs: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = bpffs.join("programs");
    let mut programs = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        programs.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    programs.sort_by_key(|(name, _)| (!name.contains("ingress"), name.clone()));
    if programs.is_empty() {
        bail!("no programs pinned under {}", dir.display());
    }
    Ok(programs)
}

/// Counters of the program pinned at `pin`.
pub fn read_counters(pin: &Path) -> Result<ProgramCounters> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "pinned"])
        .arg(pin)
        .arg("-j")
        .output()
        .context("running bpftool (is the bpftool package installed?)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_bpftool(&String::from_utf8_lossy(&out.stdout))
}

/// bpftool leaves run_time_ns and run_cnt out while they are zero.
fn parse_bpftool(json: &str) -> Result<ProgramCounters> {
    let v: serde_json::Value = serde_json::from_str(json).context("bpftool printed no JSON")?;
    Ok(ProgramCounters {
        run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
    })
}

/// Counters of every pinned program, in `pinned_programs` order.
pub fn snapshot(programs: &[(String, PathBuf)]) -> Result<Vec<ProgramCounters>> {
    programs.iter().map(|(_, pin)| read_counters(pin)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_bpftool_json() {
        let json = r#"{"id":42,"type":"sched_cls","name":"tollgate_ingress",
            "run_time_ns":123456,"run_cnt":1000,"bytes_xlated":4096}"#;
        assert_eq!(
            parse_bpftool(json).unwrap(),
            ProgramCounters {
                run_time_ns: 123_456,
                run_cnt: 1000
            }
        );
    }

    #[test]
    fn counters_missing_from_bpftool_json_are_zero() {
        let json = r#"{"id":42,"type":"sched_cls","name":"tollgate_egress"}"#;
        assert_eq!(parse_bpftool(json).unwrap(), ProgramCounters::default());
    }

    #[test]
    fn cost_per_run_is_the_difference_of_two_snapshots() {
        let before = ProgramCounters {
            run_time_ns: 1_000,
            run_cnt: 10,
        };
        let after = ProgramCounters {
            run_time_ns: 21_000,
            run_cnt: 110,
        };
        assert_eq!(after.since(before).ns_per_run(), Some(200.0));
        assert_eq!(before.since(before).ns_per_run(), None);
    }
}
