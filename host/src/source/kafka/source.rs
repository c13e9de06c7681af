//! Consumes with a `StreamConsumer`; commits synchronously on a blocking
//! worker once the pipeline hands back a checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{KafkaSourceConfig, StartFrom};
use crate::config::BatchConfig;
use crate::kafka::to_record;
use crate::source::{Checkpoint, Committer, Source, SourceBatch, SourceError};

/// Assigns partitions at explicit offsets, and logs rebalances so an
/// operator can see partitions move.
///
/// Each assigned partition starts at the group's committed offset, or, with
/// none, at the configured start. We set it ourselves rather than leave it
/// to `auto.offset.reset`: the test broker (noida-db 0.2.3) starts new
/// groups at the end whatever the reset policy says.
pub struct RebalanceLog {
    group: String,
    start: Offset,
}

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, partitions: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                match consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)) {
                    Ok(committed) => {
                        for element in committed.elements() {
                            let offset = match element.offset() {
                                Offset::Offset(offset) if offset >= 0 => Offset::Offset(offset),
                                _ => self.start,
                            };
                            let _ = partitions.set_partition_offset(element.topic(), element.partition(), offset);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(group = %self.group, %err, "Cannot read committed offsets; using the reset policy.");
                    }
                }
                if let Err(err) = consumer.assign(partitions) {
                    tracing::error!(group = %self.group, %err, "Cannot take the assigned partitions.");
                }
                tracing::info!(group = %self.group, partitions = partitions.count(), "Partitions assigned.");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Err(err) = consumer.unassign() {
                    tracing::warn!(group = %self.group, %err, "Cannot release the revoked partitions.");
                }
                tracing::info!(group = %self.group, partitions = partitions.count(), "Partitions revoked.");
            }
            other => {
                let code: rdkafka::error::RDKafkaErrorCode = other.into();
                tracing::warn!(group = %self.group, error = %code, "Rebalance failed.");
                let _ = consumer.unassign();
            }
        }
    }
}

/// The consumer, shared with an exactly-once transaction that commits the
/// group's offsets itself.
pub type GroupConsumer = StreamConsumer<RebalanceLog>;

/// Reads batches from Kafka.
pub struct KafkaSource {
    consumer: Arc<GroupConsumer>,
    topics: HashMap<String, Arc<str>>,
    max_records: usize,
    linger: Duration,
    commits: bool,
    what: String,
    unavailable_since: Option<std::time::Instant>,
    last_warning: Option<std::time::Instant>,
}

fn io(what: &str, err: KafkaError) -> SourceError {
    SourceError::Io {
        what: what.to_owned(),
        source: std::io::Error::other(err),
    }
}

impl KafkaSource {
    /// Joins the group and subscribes. With `read_committed`, only records
    /// of committed transactions are read (exactly-once pipelines); then the
    /// transaction commits the offsets, not this source.
    pub fn new(
        config: &KafkaSourceConfig,
        pipeline: &str,
        batch: &BatchConfig,
        read_committed: bool,
    ) -> Result<Self, SourceError> {
        let group = config.group_for(pipeline);
        let what = format!("kafka topics {:?} at {} (group {group})", config.topics, config.brokers);
        let start = match config.start {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        };
        let isolation = if read_committed { "read_committed" } else { "read_uncommitted" };
        let mut client = config.connection().client_config(&[
                ("group.id", &group),
                ("enable.auto.commit", "false"),
                ("auto.offset.reset", start),
                ("isolation.level", isolation),
                // A worker that dies is noticed in 10 s, not 45: its
                // partitions move to the survivors (or its restart) sooner.
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "3000"),
            ]);
        if let Ok(worker) = std::env::var("WEIR_WORKER_ID") {
            // Static membership: a restarted worker takes its partitions back
            // at once instead of waiting out the session of its dead self.
            if !config.options.contains_key("group.instance.id") {
                client.set("group.instance.id", format!("{group}-{worker}"));
            }
        }
        let consumer: GroupConsumer = client
            .create_with_context(RebalanceLog {
                group: group.clone(),
                start: match config.start {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => Offset::End,
                },
            })
            .map_err(|e| io(&what, e))?;
        let names: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| io(&what, e))?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            topics: config.topics.iter().map(|t| (t.clone(), Arc::from(t.as_str()))).collect(),
            max_records: batch.max_records,
            linger: batch.linger(),
            commits: !read_committed,
            what,
            unavailable_since: None,
            last_warning: None,
        })
    }

    /// The consumer, for a transaction that commits this group's offsets.
    pub fn consumer(&self) -> Arc<GroupConsumer> {
        self.consumer.clone()
    }


    /// The next message. While the cluster is away librdkafka reconnects by
    /// itself and reports each failed attempt here; those are logged (at most
    /// every few seconds) and passed over, not slept on, so that a backlog of
    /// them does not delay reading once the cluster is back.
    async fn recv(&mut self) -> Result<(Arc<str>, crate::record::Record), SourceError> {
        loop {
            match self.consumer.recv().await {
                Ok(message) => {
                    if self.unavailable_since.take().is_some() {
                        tracing::info!(source = %self.what, "Kafka reachable again.");
                    }
                    let name = rdkafka::Message::topic(&message);
                    let topic = match self.topics.get(name) {
                        Some(topic) => topic.clone(),
                        None => Arc::from(name),
                    };
                    let record = to_record(&message, &topic);
                    return Ok((topic, record));
                }
                Err(err) if is_transient(&err) => {
                    let now = std::time::Instant::now();
                    let since = *self.unavailable_since.get_or_insert(now);
                    if self.last_warning.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                        self.last_warning = Some(now);
                        tracing::warn!(source = %self.what, %err, down_for = ?now.duration_since(since), "Kafka unavailable; librdkafka is reconnecting.");
                    }
                    tokio::task::yield_now().await;
                }
                Err(err) => return Err(io(&self.what, err)),
            }
        }
    }
}

/// How often an unavailable cluster is reported.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Errors librdkafka recovers from by itself: the broker is down or a
/// partition is moving.
fn is_transient(err: &KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as Code;
    match err.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::Resolve
                | Code::NotCoordinator
                | Code::CoordinatorNotAvailable
                | Code::CoordinatorLoadInProgress
                | Code::NetworkException
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::RequestTimedOut
                | Code::UnknownTopicOrPartition
                | Code::RebalanceInProgress
                | Code::OperationTimedOut
        ),
        None => false,
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let mut batch = SourceBatch::default();
        let (_, first) = self.recv().await?;
        batch.checkpoint.advance(&first.source);
        batch.records.push(first);
        let deadline = tokio::time::Instant::now() + self.linger;
        while batch.records.len() < self.max_records {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Ok(next) => {
                    let (_, record) = next?;
                    batch.checkpoint.advance(&record.source);
                    batch.records.push(record);
                }
                Err(_linger_over) => break,
            }
        }
        Ok(Some(batch))
    }

    fn committer(&self) -> Arc<dyn Committer> {
        Arc::new(KafkaCommitter {
            consumer: self.consumer.clone(),
            what: self.what.clone(),
            enabled: self.commits,
        })
    }
}

/// Commits a Kafka source's offsets while it goes on reading.
struct KafkaCommitter {
    consumer: Arc<GroupConsumer>,
    what: String,
    /// Off when a transaction commits the offsets (exactly-once).
    enabled: bool,
}

#[async_trait]
impl Committer for KafkaCommitter {
    async fn commit(&self, checkpoint: &Checkpoint) -> Result<(), SourceError> {
        if !self.enabled || checkpoint.positions.is_empty() {
            return Ok(());
        }
        let offsets = next_offsets(checkpoint).map_err(|e| io(&self.what, e))?;
        let consumer = self.consumer.clone();
        let committed = tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync)).await;
        match committed {
            Ok(Ok(())) => Ok(()),
            // After a rebalance the partitions may be someone else's: their
            // records will be read again there (at-least-once), not lost.
            Ok(Err(err)) => {
                tracing::warn!(source = %self.what, %err, "Offset commit refused; records since the last commit will be read again.");
                Ok(())
            }
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }
}

/// The offsets to commit for a checkpoint: one past the last record read.
pub fn next_offsets(checkpoint: &Checkpoint) -> Result<TopicPartitionList, KafkaError> {
    let mut offsets = TopicPartitionList::new();
    for position in &checkpoint.positions {
        offsets.add_partition_offset(&position.topic, position.partition, Offset::Offset(position.offset + 1))?;
    }
    Ok(offsets)
}
