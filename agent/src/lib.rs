//! The Tollgate node agent and CLI as a library, so integration tests and benchmarks drive the
//! same code the `tollgate` binary runs.

pub mod api;
pub mod app;
pub mod cli;
pub mod client;
pub mod datapath;
pub mod host;
pub mod loader;
pub mod paths;
pub mod policy;
