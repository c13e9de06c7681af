//! The `kafka` sink: records to Kafka topics through an idempotent producer,
//! acknowledged when the brokers have them.

mod config;
mod sink;

pub use config::KafkaSinkConfig;
pub use sink::KafkaSink;

use crate::kafka::KafkaConnection;

/// Whether librdkafka takes this sink's settings: an unknown or malformed
/// option fails here, not at the first write. Connects to nothing.
pub fn check(config: &KafkaSinkConfig) -> Result<(), String> {
    let producer: rdkafka::producer::BaseProducer = config
        .connection()
        .client_config(KafkaConnection::PRODUCER)
        .create()
        .map_err(|err| format!("kafka sink `{}`: {err}", config.topic))?;
    // The teardown waits on librdkafka's threads: off the caller's.
    std::thread::spawn(move || drop(producer));
    Ok(())
}
