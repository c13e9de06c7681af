//! Weir: a stream processor whose host owns ingestion, delivery, state and
//! sinks, and whose every transformation is a sandboxed WebAssembly
//! component written against the `weir:plugin` WIT contract.
//!
//! The concerns, one module each:
//! - [`config`]: the pipeline file, with file:line errors.
//! - [`engine`]: wasmtime (compile cache, limits, instances); the only
//!   module that names wasmtime types.
//! - [`plugin`]: where plugins come from, their versions, the file watch
//!   and the store of deployed versions.
//! - [`source`], [`sink`]: where records come from and go to.
//! - [`kafka`]: what Kafka sources and sinks share, and exactly-once transactions.
//! - [`pipeline`]: wiring, dead letters and delivery; the handle that
//!   swaps, pauses and reports on a running pipeline.
//! - [`admin`]: the admin API over those handles.
//! - [`metrics`]: counters and typed telemetry events.
//! - [`cli`]: the `weir` command.
//! - [`window`]: event-time windows, watermarks and aggregates.
//! - [`state`]: checkpoints: positions and window state, and who keeps them.
//! - [`tenant`]: tenants' budgets and grants over their pipelines.
//! - [`testkit`]: run a built plugin in the real engine from a test.

pub mod admin;
pub mod batch;
pub mod cli;
pub mod config;
pub mod engine;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod plugin;
pub mod record;
pub mod sink;
pub mod source;
pub mod state;
pub mod tenant;
pub mod testkit;
pub mod window;
