//! Exactly-once for Kafka → Kafka: every sink of the pipeline writes through
//! one transactional producer, and the consumed offsets are committed inside
//! the same transaction. A reader with `isolation.level=read_committed` sees
//! a batch's outputs if and only if its offsets were committed; a worker
//! killed mid-transaction is fenced when it restarts with the same
//! transactional id, and its open transaction is aborted. A pipeline with a
//! window also writes the window state of each checkpoint in the
//! transaction (see [`super::changelog`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer as _};

use super::{Changelog, KafkaConnection};
use crate::source::Checkpoint;
use crate::source::kafka::{GroupConsumer, next_offsets};
use crate::state::Snapshot;

/// How long one transactional call may take before the pipeline fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One open transaction at a time, committed with the source's offsets.
pub struct KafkaTransaction {
    producer: FutureProducer,
    consumer: Arc<GroupConsumer>,
    id: String,
    /// Where checkpoints put their window state, with a window.
    changelog: Option<Changelog>,
}

impl KafkaTransaction {
    /// Initialises the transactional producer `id` (aborting whatever a
    /// previous incarnation left open) and begins the first transaction;
    /// checkpoints put their window state in `changelog`. Blocking.
    pub fn start(
        connection: &KafkaConnection,
        id: &str,
        consumer: Arc<GroupConsumer>,
        changelog: Option<Changelog>,
    ) -> Result<Self, KafkaError> {
        let mut config = connection.client_config(KafkaConnection::PRODUCER);
        let producer: FutureProducer = config.set("transactional.id", id).create()?;
        producer.init_transactions(TIMEOUT)?;
        producer.begin_transaction()?;
        tracing::info!(transactional_id = id, "Exactly-once transactions started.");
        Ok(KafkaTransaction {
            producer,
            consumer,
            id: id.to_owned(),
            changelog,
        })
    }

    /// The producer every Kafka sink of the pipeline writes through.
    pub fn producer(&self) -> FutureProducer {
        self.producer.clone()
    }

    /// Commits what was produced since the last commit together with the
    /// offsets up to `checkpoint`, then opens the next transaction. Call
    /// once every sink has flushed.
    pub async fn commit(self: &Arc<Self>, checkpoint: &Checkpoint) -> Result<(), KafkaError> {
        self.commit_offsets(next_offsets(checkpoint)?).await
    }

    /// Commits what was produced since the last commit together with
    /// `snapshot`: its positions, and its window state in the changelog,
    /// pointed at by the offsets' metadata. Call once every sink has
    /// flushed.
    pub async fn commit_snapshot(self: &Arc<Self>, snapshot: &Snapshot) -> Result<(), KafkaError> {
        let offsets = match &self.changelog {
            Some(changelog) => changelog.write(&self.producer, snapshot).await?,
            None => next_offsets(&snapshot.positions())?,
        };
        self.commit_offsets(offsets).await
    }

    async fn commit_offsets(
        self: &Arc<Self>,
        offsets: rdkafka::TopicPartitionList,
    ) -> Result<(), KafkaError> {
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let group = this.consumer.group_metadata().ok_or_else(|| {
                KafkaError::Subscription("the consumer has no group metadata yet".into())
            })?;
            this.producer
                .send_offsets_to_transaction(&offsets, &group, TIMEOUT)?;
            this.producer.commit_transaction(TIMEOUT)?;
            this.producer.begin_transaction()
        })
        .await;
        match done {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }

    /// Aborts the open transaction: its outputs are never read committed and
    /// its offsets stay where they were. Blocking.
    pub fn abort(&self) {
        if let Err(err) = self.producer.abort_transaction(TIMEOUT) {
            tracing::warn!(transactional_id = %self.id, %err, "Could not abort the open transaction; the broker will time it out.");
        }
    }
}
