//! The Tollgate node agent and CLI as a library, so integration tests and benchmarks drive the
//! same code the `tollgate` binary runs.

pub mod policy;
