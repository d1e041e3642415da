//! Loading, pinning, attaching and adopting the datapath.
//!
//! Everything lives under one pin directory (`--bpffs`): `maps/` (state survives restarts),
//! `programs/` and `links/` (one TCX link per interface and direction). A starting agent loads
//! its programs against the pinned maps, then for every enforced interface either creates a
//! link or, when one is pinned already, swaps the new program into it atomically
//! (`bpf_link_update`): the interface is never without a program, so a restart opens no gap.
//! Stopping the agent leaves every pin in place and the kernel keeps enforcing.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tollgate_common::{map_names, program_names};

use crate::{
    datapath::{check_pinned_maps, OBJECT},
    paths::PinLayout,
};

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Which hook a program serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
    fn program(self) -> &'static str {
        match self {
            Direction::Ingress => program_names::TC_INGRESS,
            Direction::Egress => program_names::TC_EGRESS,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        }
    }
}

/// One program attached to one interface direction.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub direction: String,
    /// The link was pinned by an earlier agent and its program replaced in place.
    pub adopted: bool,
}

/// Interface glob patterns from `--interfaces` (comma separated).
#[derive(Clone, Debug)]
pub struct InterfaceSelector {
    patterns: Vec<glob::Pattern>,
    text: String,
}

impl InterfaceSelector {
    pub fn parse(text: &str) -> Result<Self> {
        let mut patterns = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let p = glob::Pattern::new(part)
                .with_context(|| format!("--interfaces: bad pattern {part:?}"))?;
            patterns.push(p);
        }
        if patterns.is_empty() {
            bail!("--interfaces: no interface pattern given (e.g. 'tg-*,eth0')");
        }
        Ok(Self {
            patterns,
            text: text.to_string(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Interfaces of the calling thread's network namespace, as (name, ifindex). Uses
/// `if_nameindex` (netlink), not /sys/class/net, which shows the namespace sysfs was mounted in.
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(io::Error::last_os_error()).context("if_nameindex");
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

/// Fails unless `path` (or the closest existing parent) is on a bpf filesystem.
pub fn ensure_bpffs(layout: &PinLayout) -> Result<()> {
    let mut probe: &Path = &layout.root;
    while !probe.exists() {
        probe = probe
            .parent()
            .with_context(|| format!("{} has no existing parent", layout.root.display()))?;
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf {}`",
            layout.root.display(),
            crate::paths::BPFFS_MOUNT
        );
    }
    for dir in [layout.maps(), layout.programs(), layout.links()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// The loaded object: programs verified and pinned, maps pinned (reused if they were).
pub struct Loaded {
    pub ebpf: Ebpf,
    pub layout: PinLayout,
    /// Links this process attached or adopted, by pin path, with whether it adopted them. A
    /// link in here already runs this process's program and is left alone by `reconcile`.
    handled: std::collections::BTreeMap<PathBuf, bool>,
}

/// Loads the embedded object against the maps pinned under `layout` (creating and pinning any
/// that are missing) and loads and pins both classifiers.
pub fn load(layout: &PinLayout) -> Result<Loaded> {
    load_object(layout, OBJECT)
}

pub fn load_object(layout: &PinLayout, object: &[u8]) -> Result<Loaded> {
    ensure_bpffs(layout)?;
    check_pinned_maps(layout)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps())
        .load(object)
        .context("loading the eBPF object")?;
    for dir in Direction::BOTH {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(dir.program())
            .with_context(|| format!("program {} missing from object", dir.program()))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {}", dir.program()))?;
        let pin = layout.program(dir.program());
        // The new program replaces the old pin; links keep their own reference to whichever
        // program they run, so removing the old pin detaches nothing.
        let _ = fs::remove_file(&pin);
        prog.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
    }
    Ok(Loaded {
        ebpf,
        layout: layout.clone(),
        handled: Default::default(),
    })
}

impl Loaded {
    /// Makes the set of links match the interfaces `selector` selects right now: attaches to new
    /// interfaces, swaps the program into links pinned by an earlier agent, and removes links
    /// of interfaces that disappeared or are no longer selected.
    pub fn reconcile(&mut self, selector: &InterfaceSelector) -> Result<Vec<Attachment>> {
        let wanted: Vec<(String, u32)> = interfaces()?
            .into_iter()
            .filter(|(name, _)| selector.matches(name))
            .collect();
        let mut keep = BTreeSet::new();
        let mut out = Vec::new();
        for (name, ifindex) in &wanted {
            for dir in Direction::BOTH {
                let pin = self.layout.link(name, *ifindex, dir.name());
                let adopted = match self.handled.get(&pin) {
                    Some(adopted) if pin.exists() => *adopted,
                    _ => {
                        let adopted = self
                            .attach_one(name, dir, &pin)
                            .with_context(|| format!("attaching to {name} {}", dir.name()))?;
                        self.handled.insert(pin.clone(), adopted);
                        adopted
                    }
                };
                keep.insert(pin);
                out.push(Attachment {
                    interface: name.clone(),
                    ifindex: *ifindex,
                    direction: dir.name().to_string(),
                    adopted,
                });
            }
        }
        for entry in fs::read_dir(self.layout.links())? {
            let path = entry?.path();
            if !keep.contains(&path) {
                self.handled.remove(&path);
                // Unpinning drops the last reference: the kernel detaches the link.
                fs::remove_file(&path)
                    .with_context(|| format!("removing stale link {}", path.display()))?;
            }
        }
        Ok(out)
    }

    /// Returns whether an existing pinned link was adopted.
    fn attach_one(&mut self, ifname: &str, dir: Direction, pin: &Path) -> Result<bool> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(dir.program())
            .expect("loaded in load_object")
            .try_into()?;
        if pin.exists() {
            let link: FdLink = PinnedLink::from_pin(pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?
                .into();
            let link = SchedClassifierLink::try_from(link)?;
            // Atomic: the link runs the old program until this returns, then the new one.
            let id = prog.attach_to_link(link)?;
            // The pin keeps the link; our descriptor can go.
            drop(prog.take_link(id)?);
            return Ok(true);
        }
        let id = prog.attach_with_options(
            ifname,
            dir.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
        Ok(false)
    }
}

/// Detaches everything and removes every pin under `layout`. Idempotent.
pub fn uninstall(layout: &PinLayout) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    // Links first, so no program is left attached reading half-removed state.
    for dir in [layout.links(), layout.programs(), layout.maps()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if layout.root.exists() {
        fs::remove_dir(&layout.root)
            .with_context(|| format!("removing {}", layout.root.display()))?;
    }
    Ok(removed)
}

/// True if a datapath is pinned under `layout` (some link or map exists).
pub fn is_installed(layout: &PinLayout) -> bool {
    layout.map(map_names::ACTIVE).exists()
}
