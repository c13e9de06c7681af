//! The `kafka` sink: records to Kafka topics through an idempotent producer,
//! acknowledged when the brokers have them.

mod config;
mod sink;

pub use config::KafkaSinkConfig;
pub use sink::KafkaSink;
