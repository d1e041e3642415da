//! bpf-linker must be on PATH; rebuild the object when it changes.
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH; run `cargo xtask setup` (installs bpf-linker 0.13 against LLVM 22)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    // bpf-linker asks LLVM to expand memcpy "in order" (for JITs that pattern-match it), which
    // also turns every memset, down to zeroing a 3-byte pad, into a call to a byte-by-byte
    // loop: about 400 instructions per packet for the zeroed packet context and IPv4-mapped
    // addresses. Without it LLVM writes them as plain stores.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
