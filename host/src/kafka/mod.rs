//! What every Kafka client of weir shares: connection settings (with TLS
//! and SASL passed through to librdkafka) and the conversion between weir
//! records and Kafka messages.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};

use crate::record::{Record, SourcePosition};

pub mod transaction;

pub use transaction::KafkaTransaction;

/// How to reach a Kafka cluster: the `brokers` and `options` keys of a
/// Kafka source or sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka settings passed through unchanged: `security.protocol`,
    /// `ssl.ca.location`, `sasl.mechanism`, `sasl.username`, tuning...
    pub options: BTreeMap<String, String>,
}

impl KafkaConnection {
    /// A client config: the brokers, then `defaults` (what the client's role
    /// needs), then the pass-through options, which win.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        // librdkafka logs through `tracing` (rdkafka's `tracing` feature).
        config.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.options {
            config.set(key, value);
        }
        config
    }

    /// Settings of every producer weir makes: idempotent, acknowledged by
    /// all in-sync replicas, keys placed as the Java client places them.
    pub const PRODUCER: &[(&str, &str)] = &[
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("partitioner", "murmur2_random"),
        ("linger.ms", "5"),
    ];

    /// Creates each topic that does not exist yet, with `partitions`
    /// partitions (replication as the cluster's default); existing topics
    /// are left as they are.
    ///
    /// Create topics before producing to them idempotently: a broker that
    /// auto-creates a topic on the first idempotent produce may serve its
    /// first batches to no reader (seen with the test broker, noida-db).
    pub async fn ensure_topics(&self, topics: &[&str], partitions: i32) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config(&[]).create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(-1)))
            .collect();
        let mut created = false;
        for result in admin.create_topics(&new, &AdminOptions::new()).await? {
            match result {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    tracing::warn!(%topic, error = %code, "Could not create topic.");
                    return Err(KafkaError::AdminOp(code));
                }
            }
        }
        if created {
            // Let partition leadership settle before the first produce.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

/// A consumed message as a weir record; `topic` is the interned name.
pub fn to_record(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> Record {
    let mut record = Record::new(
        Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        SourcePosition {
            topic: topic.clone(),
            partition: message.partition(),
            offset: message.offset(),
        },
    );
    record.tombstone = message.payload().is_none();
    record.key = message.key().map(Bytes::copy_from_slice);
    record.timestamp = message.timestamp().to_millis();
    if let Some(headers) = message.headers() {
        record.headers = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    Bytes::copy_from_slice(h.value.unwrap_or_default()),
                )
            })
            .collect();
    }
    record
}

/// A record's headers as Kafka headers.
pub fn to_headers(record: &Record) -> Option<OwnedHeaders> {
    if record.headers.is_empty() {
        return None;
    }
    let headers = OwnedHeaders::new_with_capacity(record.headers.len());
    Some(
        record
            .headers
            .iter()
            .fold(headers, |headers, (name, value)| {
                headers.insert(Header {
                    key: name,
                    value: Some(&value[..]),
                })
            }),
    )
}
