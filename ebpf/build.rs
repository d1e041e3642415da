//! bpf-linker must be on PATH; rebuild the object when it changes.
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH; run `cargo xtask setup` (installs bpf-linker 0.13 against LLVM 22)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
