//! The coordinator of a virtual cluster: runs the checkpoint protocol over the
//! sidecars (vector timestamps and a two-phase commit whose point is an atomically
//! written record), detects failures by heartbeats and the sidecars' reports, and rolls
//! the cluster back to its last committed epoch.

pub mod actor;
pub mod client;
pub mod demo;
pub mod figures;
pub mod harness;
pub mod hosts;
pub mod phase;
pub mod record;
pub mod server;
pub mod state;
pub mod tls;
