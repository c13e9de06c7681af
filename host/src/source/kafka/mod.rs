//! The `kafka` source: one consumer group per pipeline over several topics,
//! batched by count and linger, committing only what the sinks have
//! acknowledged.

mod config;
mod source;

pub use config::{KafkaSourceConfig, StartFrom};
pub use source::{GroupConsumer, KafkaSource, RebalanceLog, next_offsets};
