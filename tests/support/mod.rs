//! Shared support for the root-only kernel tests. Everything a test creates (pin directories,
//! namespaces, processes) is removed in Drop, by the exact name or pid it was given.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod cluster;
pub mod env;
pub mod load_process;
pub mod packet;

use std::{fs::File, os::fd::AsRawFd as _, path::PathBuf};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use tollgate_agent::{
    datapath::Datapath,
    loader::{self, Loaded},
    paths::PinLayout,
    policy::{compile_policy, parse_policy, ClockReading, CompiledPolicy},
};
use tollgate_common::{program_names, slot_of, Verdict};

/// ifindex of `lo`, where BPF_PROG_TEST_RUN puts a packet unless told otherwise.
pub const LOOPBACK_IFINDEX: u32 = 1;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Kernel tests must never skip: without root they fail and say why.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel tests need root (BPF, namespaces); run `cargo xtask test` as root"
    );
}

/// A pin directory of its own for one test: /sys/fs/bpf/tollgate-tests/<name>-<pid>.
pub fn test_pin_dir(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/tollgate-tests/{name}-{}",
        std::process::id()
    ))
}

/// Removes a test's pin directory when dropped, also when setup panics half-way (the verifier
/// can reject a program after the maps were already pinned).
pub struct PinDirGuard(pub PinLayout);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = loader::uninstall(&self.0);
        if let Some(parent) = self.0.root.parent() {
            // Only succeeds once every test's directory is gone.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The classifier loaded with maps of its own, driven through BPF_PROG_TEST_RUN.
pub struct DatapathFixture {
    pub loaded: Loaded,
    pub datapath: Datapath,
    pub layout: PinLayout,
    pub compiled: Option<CompiledPolicy>,
    /// Last field: dropped after the program and map handles.
    _pins: PinDirGuard,
}

impl DatapathFixture {
    pub fn new(name: &str) -> Self {
        Self::with_object(name, tollgate_agent::datapath::OBJECT)
    }

    pub fn with_object(name: &str, object: &[u8]) -> Self {
        require_root();
        let layout = PinLayout::new(test_pin_dir(name));
        // A previous run killed half-way may have left this exact directory behind.
        let _ = loader::uninstall(&layout);
        let pins = PinDirGuard(layout.clone());
        let loaded = loader::load_object(&layout, object, &loader::LoadOptions::default())
            .expect("load datapath");
        let mut datapath = Datapath::open(&layout).expect("open maps");
        // The test runner delivers packets on `lo`. Policy tests are not about source
        // validation, so it is an uplink here; the source validation tests describe their own
        // interfaces.
        datapath
            .write_interface(LOOPBACK_IFINDEX, true, Some(true), [Some(0), Some(0)])
            .expect("describe lo");
        Self {
            loaded,
            datapath,
            layout,
            compiled: None,
            _pins: pins,
        }
    }

    /// Compiles and installs `yaml` as the next generation (no host addresses).
    pub fn apply(&mut self, yaml: &str) {
        self.apply_with_interfaces(yaml, &[], &[]);
    }

    /// Like `apply`, writing the bindings of `interfaces` (name, ifindex) for the new slot, with
    /// `host_addrs` as the node's addresses (identity `host`).
    pub fn apply_with_interfaces(
        &mut self,
        yaml: &str,
        interfaces: &[(String, u32)],
        host_addrs: &[std::net::IpAddr],
    ) {
        let policy = parse_policy(yaml, "test.yaml").expect("test policy is valid");
        let generation = self.datapath.next_generation().unwrap();
        let compiled = compile_policy(
            &policy,
            slot_of(generation),
            &ClockReading::now(),
            host_addrs,
        );
        self.datapath
            .install(&compiled, generation, interfaces)
            .expect("install");
        self.compiled = Some(compiled);
    }

    fn program(&self, name: &str) -> &SchedClassifier {
        self.loaded
            .ebpf
            .program(name)
            .expect("program in object")
            .try_into()
            .expect("a classifier")
    }

    /// Runs the ingress classifier once on `packet`; returns the TC action.
    pub fn run(&self, packet: &[u8]) -> u32 {
        self.run_program(program_names::TC_INGRESS, packet)
    }

    pub fn run_program(&self, name: &str, packet: &[u8]) -> u32 {
        self.try_run_program(name, packet)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e:?}", packet.len()))
    }

    /// Like `run_program`, but returns the error when the kernel's test runner itself refuses
    /// the frame (it rejects IPv4/IPv6 frames whose IP header is incomplete).
    pub fn try_run_program(
        &self,
        name: &str,
        packet: &[u8],
    ) -> Result<u32, aya::programs::ProgramError> {
        self.try_run_with(name, packet, &SkbContext::default())
    }

    /// Runs program `name` on `packet` with the given `__sk_buff` fields.
    pub fn try_run_with(
        &self,
        name: &str,
        packet: &[u8],
        skb: &SkbContext,
    ) -> Result<u32, aya::programs::ProgramError> {
        let ctx = skb.bytes();
        let r = self.program(name).test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        })?;
        Ok(r.return_value)
    }

    /// Runs the ingress classifier on `packet` as if it arrived on interface `ifindex` (of the
    /// calling thread's network namespace).
    pub fn run_on(&self, ifindex: u32, packet: &[u8]) -> u32 {
        let skb = SkbContext {
            ifindex,
            ..Default::default()
        };
        self.try_run_with(program_names::TC_INGRESS, packet, &skb)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on ifindex {ifindex}: {e:?}"))
    }

    /// The conntrack entry of `key`, if any.
    pub fn flow(&self, key: &tollgate_common::FlowKey) -> Option<tollgate_common::FlowValue> {
        self.datapath.flow(key)
    }

    pub fn counter(&self, v: Verdict) -> u64 {
        self.datapath.counters().unwrap()[v as usize]
    }

    /// Asserts `packet` passes and that the verdict counter `v` moved by one.
    pub fn assert_passes_as(&self, packet: &[u8], v: Verdict) {
        let before = self.counter(v);
        assert_eq!(self.run(packet), TC_ACT_OK, "expected {} to pass", v.name());
        assert_eq!(
            self.counter(v),
            before + 1,
            "counter {} did not move",
            v.name()
        );
    }

    /// Asserts `packet` is dropped and that the verdict counter `v` moved by one.
    pub fn assert_dropped_as(&self, packet: &[u8], v: Verdict) {
        let before = self.counter(v);
        assert_eq!(
            self.run(packet),
            TC_ACT_SHOT,
            "expected drop ({})",
            v.name()
        );
        assert_eq!(
            self.counter(v),
            before + 1,
            "counter {} did not move",
            v.name()
        );
    }
}

/// The `struct __sk_buff` fields BPF_PROG_TEST_RUN lets a test set (the kernel rejects any other
/// non-zero field).
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbContext {
    /// The device the packet is on (0: `lo`).
    pub ifindex: u32,
    /// The device the packet was received on (`skb->skb_iif`; 0: the node's own packet).
    pub ingress_ifindex: u32,
    /// GSO segment size and count: the skb is marked as a GSO packet.
    pub gso_size: u32,
    pub gso_segs: u32,
}

impl SkbContext {
    /// `struct __sk_buff` up to `gso_size` (uapi/linux/bpf.h, stable layout).
    fn bytes(&self) -> Vec<u8> {
        const INGRESS_IFINDEX: usize = 36;
        const IFINDEX: usize = 40;
        const GSO_SEGS: usize = 164;
        const GSO_SIZE: usize = 176;
        let mut b = vec![0u8; GSO_SIZE + 4];
        b[INGRESS_IFINDEX..INGRESS_IFINDEX + 4]
            .copy_from_slice(&self.ingress_ifindex.to_ne_bytes());
        b[IFINDEX..IFINDEX + 4].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[GSO_SEGS..GSO_SEGS + 4].copy_from_slice(&self.gso_segs.to_ne_bytes());
        b[GSO_SIZE..GSO_SIZE + 4].copy_from_slice(&self.gso_size.to_ne_bytes());
        b
    }
}

/// Moves the calling thread into another network namespace until dropped (setns is per
/// thread), then back.
pub struct EnterNetNs {
    home: File,
}

impl EnterNetNs {
    pub fn new(ns: &tollgate_testbed::NetNs) -> Self {
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let target = File::open(ns.path()).expect("target netns");
        // SAFETY: setns on valid namespace descriptors; affects only this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Self { home }
    }
}

impl Drop for EnterNetNs {
    fn drop(&mut self) {
        // SAFETY: as above, back to the namespace this thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}
