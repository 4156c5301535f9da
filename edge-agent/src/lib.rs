//! The store daemon's library: the ledger, configuration, logging and the daemon loop, shared
//! by the `edge-agent` and `storectl` binaries, the benchmarks and the end-to-end tests.

pub mod config;
pub mod control;
pub mod daemon;
pub mod devices;
pub mod labels;
pub mod lane;
pub mod ledger;
pub mod metrics;
pub mod mqtt;
pub mod orders;
pub mod own_thread;
pub mod read_only;
pub mod rfid;
pub mod sync;
pub mod telemetry;
