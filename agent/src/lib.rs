//! The Tollgate node agent and CLI as a library, so integration tests and benchmarks drive the
//! same code the `tollgate` binary runs.

pub mod api;
pub mod app;
pub mod audit;
pub mod check;
pub mod cli;
pub mod client;
mod connections;
pub mod datapath;
pub mod host;
pub mod limits;
pub mod linkwatch;
pub mod loader;
pub mod paths;
pub mod pinlock;
pub mod policy;
pub mod rlimit;
