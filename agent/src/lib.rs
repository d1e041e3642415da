//! The Tollgate node agent and CLI as a library, so integration tests and benchmarks drive the
//! same code the `tollgate` binary runs.

pub mod aggregate;
pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod check;
pub mod cli;
pub mod client;
pub mod cluster;
mod connections;
pub mod datapath;
pub mod error;
pub mod events;
pub mod flows;
pub mod follow;
pub mod handles;
pub mod host;
pub mod identity;
pub mod installer;
pub mod limits;
pub mod linkwatch;
pub mod loader;
pub mod metrics;
pub mod names;
pub mod paths;
pub mod persist;
pub mod pinlock;
pub mod policy;
pub mod reader;
pub mod recorder;
pub mod rlimit;
pub mod statefile;
pub mod status;
pub mod wire;
