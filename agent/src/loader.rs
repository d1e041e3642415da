//! Loading, pinning, attaching and adopting the datapath.
//!
//! Everything lives under one pin directory (`--bpffs`): `maps/` (state survives restarts),
//! `programs/` and `links/` (one TCX link per interface and direction). A starting agent loads
//! its programs against the pinned maps, then for every enforced interface either creates a
//! link or, when one is pinned already, swaps the new program into it atomically
//! (`bpf_link_update`): the interface is never without a program, so a restart opens no gap.
//! Stopping the agent leaves every pin in place and the kernel keeps enforcing. Every rescan
//! also checks that each link it made is still attached to its interface; one that was unpinned
//! or detached behind the agent's back is reported and attached again.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    fs, io,
    os::fd::AsRawFd as _,
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
use tollgate_common::{map_names, maps, program_names};

use crate::{
    datapath::{check_object_maps, check_pinned_maps, stamp_datapath_globals, OBJECT},
    paths::PinLayout,
    pinlock::PinLock,
};

pub use crate::wire::Attachment;

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

/// What one `reconcile` found and did.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub attachments: Vec<Attachment>,
    /// Links that had been unpinned or detached behind the agent's back and were attached
    /// again, as `ifname@ifindex direction`.
    pub restored: Vec<String>,
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

/// Is the existing `path` on a bpf filesystem?
fn is_on_bpffs(path: &Path) -> Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Does interface `name` carry Ethernet frames (ARPHRD_ETHER: veths, NICs, bridges, bonds)?
/// The classifiers parse an Ethernet header first; on an L3 device (tun, WireGuard, GRE) they
/// would misread every packet, so the agent does not attach there.
pub fn is_ethernet(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    let bytes = cname.as_bytes_with_nul();
    // SAFETY: an ifreq is plain data; all zero is valid. The name (with its NUL) is copied in
    // only if it fits, the socket is closed right after the ioctl, which writes within `req`.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        if bytes.len() > req.ifr_name.len() {
            return false;
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        libc::close(fd);
        rc == 0 && req.ifr_ifru.ifru_hwaddr.sa_family == libc::ARPHRD_ETHER
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
    if !is_on_bpffs(probe)? {
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

/// How to create maps that do not exist yet.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of each conntrack map (IPv4 and IPv6), in entries (two per flow). Maps that
    /// are pinned already keep the capacity they were made with.
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: maps::capacity::CONNTRACK_ENTRIES,
        }
    }
}

/// Loads the embedded object against the maps pinned under `layout` (creating and pinning any
/// that are missing) and loads and pins both classifiers.
pub fn load(layout: &PinLayout) -> Result<Loaded> {
    load_with(layout, &LoadOptions::default())
}

pub fn load_with(layout: &PinLayout, options: &LoadOptions) -> Result<Loaded> {
    load_object(layout, OBJECT, options)
}

pub fn load_object(layout: &PinLayout, object: &[u8], options: &LoadOptions) -> Result<Loaded> {
    ensure_bpffs(layout)?;
    check_pinned_maps(layout)?;
    let conntrack = options.conntrack_entries;
    if !(maps::capacity::CONNTRACK_MIN..=maps::capacity::CONNTRACK_MAX).contains(&conntrack) {
        bail!(
            "--conntrack-entries {conntrack}: must be between {} and {}",
            maps::capacity::CONNTRACK_MIN,
            maps::capacity::CONNTRACK_MAX
        );
    }
    for spec in [&maps::CONNTRACK_V4, &maps::CONNTRACK_V6] {
        if let Some(pinned) = pinned_capacity(layout, spec.name) {
            if pinned != conntrack {
                tracing::warn!(
                    map = spec.name,
                    pinned,
                    requested = conntrack,
                    "conntrack map is pinned with another capacity and keeps it; uninstall \
                     (forgetting tracked flows) to resize"
                );
            }
        }
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps())
        .map_max_entries(maps::CONNTRACK_V4.name, conntrack)
        .map_max_entries(maps::CONNTRACK_V6.name, conntrack)
        .load(object)
        .context("loading the eBPF object")?;
    check_object_maps(layout, ebpf.maps().map(|(name, _)| name))?;
    stamp_datapath_globals(layout)?;
    for dir in Direction::BOTH {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(dir.program())
            .with_context(|| format!("program {} missing from object", dir.program()))?
            .try_into()?;
        load_retrying(|| prog.load())
            .with_context(|| format!("verifier rejected {}", dir.program()))?;
        let pin = layout.program(dir.program());
        // The new program replaces the old pin; links keep their own reference to whichever
        // program they run, so removing the old pin detaches nothing.
        let _ = fs::remove_file(&pin);
        prog.pin(&pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
    }
    // Loaded, never attached or pinned: `tollgate check` runs it on crafted packets.
    let check: &mut SchedClassifier = ebpf
        .program_mut(program_names::TC_CHECK)
        .with_context(|| format!("program {} missing from object", program_names::TC_CHECK))?
        .try_into()?;
    load_retrying(|| check.load())
        .with_context(|| format!("verifier rejected {}", program_names::TC_CHECK))?;
    Ok(Loaded {
        ebpf,
        layout: layout.clone(),
        handled: Default::default(),
    })
}

/// Loads a program, again when the kernel answers EAGAIN: the verifier gives up with EAGAIN
/// when a signal arrives for the loading thread, and verifying a classifier takes most of a
/// second. libbpf retries the same way (five attempts).
fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::warn!(attempt, "verification interrupted (EAGAIN); loading again");
                attempt += 1;
            }
            r => return r,
        }
    }
}

impl Loaded {
    /// Runs the check program once on `packet` as if it arrived on `ifindex` (0: no interface)
    /// of this thread's network namespace; `mark` carries `CHECK_MARK_*` bits. The result is in
    /// `TG_CHECK`.
    pub fn run_check(&self, packet: &[u8], ifindex: u32, mark: u32) -> Result<()> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // `struct __sk_buff` up to `ifindex`: only `mark` (offset 8) and `ifindex` (offset 40)
        // are set, the fields BPF_PROG_TEST_RUN accepts.
        let mut skb = [0u8; 44];
        skb[8..12].copy_from_slice(&mark.to_ne_bytes());
        skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let prog: &SchedClassifier = self
            .ebpf
            .program(program_names::TC_CHECK)
            .expect("loaded in load_object")
            .try_into()?;
        prog.test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&skb),
            repeat: 1,
            ..Default::default()
        })
        .context("running the check program (BPF_PROG_TEST_RUN)")?;
        Ok(())
    }

    /// Makes the set of links match `wanted` (name, ifindex): attaches to new interfaces, swaps
    /// the program into links pinned by an earlier agent, attaches again where a link this
    /// process made has vanished or been detached, and removes links of interfaces that are no
    /// longer wanted.
    pub fn reconcile(&mut self, wanted: &[(String, u32)]) -> Result<Reconciled> {
        let mut keep = BTreeSet::new();
        let mut done = Reconciled::default();
        for (name, ifindex) in wanted {
            for dir in Direction::BOTH {
                let pin = self.layout.link(name, *ifindex, dir.name());
                let live = pin.exists() && link_attached_to(&pin) == Some(*ifindex);
                let adopted = match self.handled.get(&pin) {
                    Some(adopted) if live => *adopted,
                    handled => {
                        if handled.is_some() || (pin.exists() && !live) {
                            // Ours (or an earlier agent's) and gone: say so, start afresh.
                            done.restored
                                .push(format!("{name}@{ifindex} {}", dir.name()));
                            let _ = fs::remove_file(&pin);
                        }
                        let adopted = self
                            .attach_one(name, dir, &pin)
                            .with_context(|| format!("attaching to {name} {}", dir.name()))?;
                        self.handled.insert(pin.clone(), adopted);
                        adopted
                    }
                };
                keep.insert(pin);
                done.attachments.push(Attachment {
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
        Ok(done)
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

/// Detaches everything and removes every pin under `layout`. Idempotent. Refuses a directory
/// that is not on bpffs (it would otherwise delete whatever files it finds) and one that a
/// running agent holds.
pub fn uninstall(layout: &PinLayout) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !layout.root.exists() {
        return Ok(removed);
    }
    if !is_on_bpffs(&layout.root)? {
        bail!(
            "{} is not on a bpf filesystem; --uninstall only removes tollgate pins under {}",
            layout.root.display(),
            crate::paths::BPFFS_MOUNT
        );
    }
    let _lock = PinLock::acquire(&layout.root)?;
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

/// The capacity of the map pinned as `name`, if it is.
pub fn pinned_capacity(layout: &PinLayout, name: &str) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(layout.map(name)).ok()?;
    Some(data.info().ok()?.max_entries())
}

/// True if a datapath is pinned under `layout` (some link or map exists).
pub fn is_installed(layout: &PinLayout) -> bool {
    layout.map(map_names::ACTIVE).exists()
}

/// The ifindex the TCX link pinned at `pin` is attached to: `None` when the pin cannot be
/// opened, 0 when the link was detached (its interface deleted, or `bpftool link detach`).
/// aya's `LinkInfo` does not expose the TCX part of `bpf_link_info`, so this asks the kernel
/// directly: BPF_OBJ_GET on the pin, then BPF_OBJ_GET_INFO_BY_FD.
pub fn link_attached_to(pin: &Path) -> Option<u32> {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `struct bpf_link_info` up to the TCX `ifindex`: type, id, prog_id, padding to the
    /// 8-aligned union, then tcx.ifindex and tcx.attach_type.
    const TCX_IFINDEX_WORD: usize = 4;

    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).ok()?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags; the rest zero.
    let mut attr = [0u64; 3];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: the bpf syscall reads `attr` (sized as passed) and the NUL-terminated path it
    // points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor the kernel just returned to us; we own and close it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u32; 6];
    // bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd (u32), info_len (u32), info (u64).
    let mut attr = [0u64; 2];
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    (rc == 0).then_some(info[TCX_IFINDEX_WORD])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_not_ethernet() {
        assert!(!is_ethernet("lo"));
        assert!(!is_ethernet("no-such-if"));
        assert!(!is_ethernet("a-name-far-too-long-for-linux"));
    }

    #[test]
    fn uninstall_refuses_a_directory_that_is_not_on_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PinLayout::new(dir.path());
        std::fs::create_dir_all(layout.maps()).unwrap();
        let precious = layout.maps().join("precious.txt");
        std::fs::write(&precious, "keep me").unwrap();
        let err = uninstall(&layout).unwrap_err().to_string();
        assert!(err.contains("not on a bpf filesystem"), "{err}");
        assert!(precious.exists(), "uninstall deleted a file outside bpffs");
    }

    #[test]
    fn uninstall_of_a_missing_directory_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PinLayout::new(dir.path().join("never-made"));
        assert!(uninstall(&layout).unwrap().is_empty());
    }
}
