//! Builds the eBPF crate for the BPF target (nightly, build-std) and places the object in
//! OUT_DIR, where `datapath::OBJECT` embeds it. aya-build always builds it in release mode;
//! `cargo xtask test` additionally builds a debug object so the verifier sees both.

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "tollgate-ebpf")
        .ok_or_else(|| anyhow!("tollgate-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    // The nightly must use the same LLVM major as bpf-linker (LLVM 22 here); a newer nightly
    // fails at link time with "Invalid record". `cargo xtask setup` installs this one.
    let toolchain = include_str!("../ebpf/bpf-toolchain").trim();
    println!("cargo:rerun-if-changed=../ebpf/bpf-toolchain");
    aya_build::build_ebpf([ebpf_package], aya_build::Toolchain::Custom(toolchain))
}
