#![no_std]
// The programs are in the `tollgate` binary target (src/main.rs); this stub library only exists
// so aya-build's build-dependency on this crate resolves.
