//! What every Kafka client of weir shares: connection settings (with TLS
//! and SASL passed through to librdkafka) and the conversion between weir
//! records and Kafka messages.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};

use weir_guest::abi::RecordParts;

use crate::batch::{Batch, RecordRef};

pub mod changelog;
pub mod transaction;

pub use changelog::{Changelog, ChangelogClaimer};
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
        self.ensure_topics_with(topics, partitions, &[]).await
    }

    /// [`Self::ensure_topics`], with topic settings (`cleanup.policy`...)
    /// for the topics it creates.
    pub async fn ensure_topics_with(
        &self,
        topics: &[&str],
        partitions: i32,
        settings: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config(&[]).create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|name| {
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
                settings
                    .iter()
                    .fold(topic, |topic, (key, value)| topic.set(key, value))
            })
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

/// Packs a consumed message into `batch`: one copy of its bytes, out of
/// librdkafka's buffer and into the batch's.
pub fn pack_message(batch: &mut Batch, message: &BorrowedMessage<'_>) {
    let headers = message.headers();
    let count = headers.map_or(0, |h| h.count());
    let headers = (0..count).map(|index| {
        // `index` is under the count: `get` finds it.
        let header = headers.map(|h| h.get(index));
        header.map_or(("", &[][..]), |h| (h.key, h.value.unwrap_or_default()))
    });
    batch.push(
        RecordParts {
            key: message.key(),
            value: message.payload().unwrap_or_default(),
            timestamp: message.timestamp().to_millis(),
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
        },
        headers,
    );
    if message.payload().is_none() {
        batch.mark_last_tombstone();
    }
}

/// A record's headers as Kafka headers.
pub fn to_headers(record: &RecordRef<'_>) -> Option<OwnedHeaders> {
    if record.header_count() == 0 {
        return None;
    }
    let headers = OwnedHeaders::new_with_capacity(record.header_count());
    Some(record.headers().fold(headers, |headers, (name, value)| {
        headers.insert(Header {
            key: name,
            value: Some(value),
        })
    }))
}
