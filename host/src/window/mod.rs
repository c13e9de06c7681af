//! Event-time windows: tumbling, hopping and session windows over keyed
//! records, with per-partition watermarks, idle partitions, allowed
//! lateness and a late output; built-in aggregates computed from the raw
//! JSON of each record, and plugin aggregates.
//!
//! - `config`: `[pipeline.window]`, checked into a [`WindowSpec`].
//! - `watermark`: per-partition watermarks.
//! - `fields`: reads each record's key, time and aggregate arguments (in
//!   the lanes, in parallel).
//! - `aggregate`: the built-in aggregates' accumulators.
//! - `plugin`: plugin aggregates' states and the calls that settle them.
//! - `operator`: the [`WindowOperator`] that ties them together.
//! - `snapshot`: a window's state as a checkpoint keeps it.

mod aggregate;
mod config;
mod fields;
mod operator;
mod plugin;
mod snapshot;
mod watermark;

pub use config::{
    AggregateConfig, AggregateFn, AggregateSpec, WindowConfig, WindowKind, WindowKindName,
    WindowSpec, parse_duration,
};
pub use fields::{FieldReader, ReadBatch, ShortKey};
pub use operator::{WindowOperator, WindowOutput, WindowResult};
pub use plugin::{CALL_BYTES, PluginAggregate, SharedAggregate};
pub use snapshot::{RestoreError, WindowImage, decode as decode_image, encode as encode_image};

#[cfg(test)]
mod tests;
