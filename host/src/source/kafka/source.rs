//! Consumes with a `StreamConsumer`; commits synchronously on a blocking
//! worker once the pipeline hands back a checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{KafkaSourceConfig, StartFrom};
use crate::batch::Batch;
use crate::config::BatchConfig;
use crate::kafka::pack_message;
use crate::source::{
    Backlog, Checkpoint, Commit, Committer, Rejected, Source, SourceBatch, SourceError, Spread,
};
use crate::state::Claims;

/// Per partition: the last offset handed to the pipeline and the last one
/// committed. A revoke waits on it until what was handed over from the
/// revoked partitions is committed, so the next owner starts exactly after
/// it: no record of an in-flight batch is processed twice.
#[derive(Default)]
pub struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProgressState {
    handed_over: HashMap<(String, i32), i64>,
    committed: HashMap<(String, i32), i64>,
    /// Bumped at every revoke, so a batch being read can drop the records
    /// it read before: their partitions are no longer its own.
    revokes: u64,
    /// The broker refused a commit for the current generation, or the
    /// source is closing: draining cannot succeed, so a revoke stops
    /// waiting.
    refused: bool,
    /// A revoke let partitions go before what was read from them was
    /// committed: with exactly-once, their outputs sit in the open
    /// transaction, which must never commit.
    released_uncommitted: bool,
}

/// How long a revoke waits for in-flight batches to commit before letting
/// the partitions go anyway (their records are then read again by the next
/// owner: at-least-once still holds). A broker that refuses commits once a
/// rebalance has begun (noida-db does; Kafka accepts them from the current
/// generation) ends the wait at once.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn handed_over(&self, checkpoint: &Checkpoint) {
        let mut state = self.lock();
        for p in &checkpoint.positions {
            state
                .handed_over
                .insert((p.topic.to_string(), p.partition), p.offset);
        }
    }

    /// The positions of `checkpoint` whose partitions this source holds:
    /// handed over since they were last assigned.
    fn owned(&self, checkpoint: &Checkpoint) -> Checkpoint {
        let state = self.lock();
        Checkpoint {
            positions: checkpoint
                .positions
                .iter()
                .filter(|p| {
                    state
                        .handed_over
                        .contains_key(&(p.topic.to_string(), p.partition))
                })
                .cloned()
                .collect(),
        }
    }

    /// No commit is coming: a revoke stops waiting for one.
    fn refused(&self) {
        self.lock().refused = true;
        self.changed.notify_all();
    }

    fn committed(&self, checkpoint: &Checkpoint) {
        let mut state = self.lock();
        for p in &checkpoint.positions {
            let slot = state
                .committed
                .entry((p.topic.to_string(), p.partition))
                .or_insert(p.offset);
            *slot = (*slot).max(p.offset);
        }
        self.changed.notify_all();
    }

    /// Blocks until every record handed over from `partitions` is committed,
    /// or `DRAIN_TIMEOUT`; then forgets them. Returns whether they drained.
    fn drain(&self, partitions: &[(String, i32)]) -> bool {
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        let mut state = self.lock();
        state.revokes += 1;
        let pending = |state: &ProgressState| {
            partitions.iter().any(|key| {
                let handed = state.handed_over.get(key);
                handed.is_some_and(|h| state.committed.get(key).is_none_or(|c| c < h))
            })
        };
        let mut drained = true;
        while pending(&state) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || state.refused {
                drained = false;
                break;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        for key in partitions {
            state.handed_over.remove(key);
            state.committed.remove(key);
        }
        state.released_uncommitted |= !drained;
        drained
    }

    /// After an assign, commits can succeed again.
    fn assigned(&self) {
        self.lock().refused = false;
    }

    fn revokes(&self) -> u64 {
        self.lock().revokes
    }
}

fn keys(partitions: &TopicPartitionList) -> Vec<(String, i32)> {
    partitions
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Assigns partitions at explicit offsets, drains in-flight batches before
/// giving partitions up, and logs rebalances so an operator can see
/// partitions move.
///
/// Each assigned partition starts at the group's committed offset, or, with
/// none, at the configured start. We set it ourselves rather than leave it
/// to `auto.offset.reset`: the test broker (noida-db 0.2.3) starts new
/// groups at the end whatever the reset policy says.
pub struct RebalanceLog {
    group: String,
    start: Offset,
    /// With a sink that keeps checkpoints: claims each assigned partition
    /// there, and resumes it after the last offset its checkpoint handled
    /// (that wins over the group's commit, which may lag behind it).
    claims: Option<Arc<Claims>>,
    progress: Arc<Progress>,
    /// Reported from librdkafka's statistics, when a window needs it.
    backlog: Option<Backlog>,
}

impl ClientContext for RebalanceLog {
    /// Connection failures are what `recv` reports (as one warning every few
    /// seconds) while librdkafka reconnects; at error level they would flood
    /// the log with lines no operator must act on.
    fn error(&self, error: KafkaError, reason: &str) {
        if is_transient(&error) {
            tracing::debug!(group = %self.group, %error, reason, "librdkafka");
        } else {
            tracing::error!(group = %self.group, %error, reason, "Kafka client error.");
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as Level;
        match level {
            Level::Emerg | Level::Alert | Level::Critical => {
                tracing::error!(group = %self.group, facility, "librdkafka: {message}");
            }
            // Connection failures and timeouts, reported by `recv` instead.
            Level::Error | Level::Warning => {
                tracing::debug!(group = %self.group, facility, "librdkafka: {message}")
            }
            _ => tracing::trace!(group = %self.group, facility, "librdkafka: {message}"),
        }
    }

    /// A partition of ours is behind while librdkafka has records of it
    /// queued, records past its fetch position, or does not know yet.
    /// (Statistics come through the consumer's queue, so behind queued
    /// records: a stale report errs on the side of behind.)
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(backlog) = &self.backlog else { return };
        let (mut behind, mut owned) = (Vec::new(), false);
        for (name, topic) in &statistics.topics {
            let name: Arc<str> = name.as_str().into();
            for partition in topic.partitions.values() {
                // -1 is librdkafka's internal unassigned partition.
                if partition.partition < 0 || !partition.desired || partition.unknown {
                    continue;
                }
                owned = true;
                let unknown = partition.next_offset < 0 || partition.hi_offset < 0;
                if unknown
                    || partition.fetchq_cnt > 0
                    || partition.next_offset < partition.hi_offset
                {
                    behind.push((name.clone(), partition.partition));
                }
            }
        }
        // Owning nothing (not yet joined, or between rebalances), there is
        // nothing to go by: a window waits rather than guess.
        backlog.report(owned.then_some(behind));
    }
}

impl ConsumerContext for RebalanceLog {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned = keys(partitions);
                let resume = match &self.claims {
                    Some(claims) => blocking(|| claims.assign(&assigned)),
                    None => HashMap::new(),
                };
                match consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)) {
                    Ok(committed) => {
                        for element in committed.elements() {
                            let resume =
                                resume.get(&(element.topic().to_owned(), element.partition()));
                            let offset = match (resume, element.offset()) {
                                (Some(&handled), _) => Offset::Offset(handled + 1),
                                (None, Offset::Offset(offset)) if offset >= 0 => {
                                    Offset::Offset(offset)
                                }
                                _ => self.start,
                            };
                            let _ = partitions.set_partition_offset(
                                element.topic(),
                                element.partition(),
                                offset,
                            );
                        }
                    }
                    Err(err) => {
                        tracing::warn!(group = %self.group, %err, "Cannot read committed offsets; using the reset policy.");
                    }
                }
                self.progress.assigned();
                if let Err(err) = consumer.assign(partitions) {
                    tracing::error!(group = %self.group, %err, "Cannot take the assigned partitions.");
                }
                tracing::info!(group = %self.group, partitions = partitions.count(), "Partitions assigned.");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Runs inside the source's poll, so no new batch starts while
                // the pipeline finishes and commits the ones in flight.
                let revoked = keys(partitions);
                let drained = blocking(|| self.progress.drain(&revoked));
                if let Some(claims) = &self.claims {
                    claims.revoke(&revoked);
                }
                if !drained {
                    tracing::warn!(group = %self.group, "In-flight batches did not commit before the revoke; their records will be read again by the next owner.");
                }
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

/// Runs `work`, which blocks, from a rebalance callback (inside the
/// consumer's poll, on one of the runtime's workers if there is one):
/// the runtime moves its other tasks elsewhere meanwhile.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Reads batches from Kafka.
pub struct KafkaSource {
    consumer: Arc<GroupConsumer>,
    commits: bool,
    what: String,
    batch: BatchConfig,
    max_record_bytes: usize,
    unavailable_since: Option<std::time::Instant>,
    last_warning: Option<std::time::Instant>,
    progress: Arc<Progress>,
    /// A sink keeps the positions (the source claims its partitions there).
    checkpointed_elsewhere: bool,
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
        max_record_bytes: usize,
        read_committed: bool,
        track_backlog: bool,
        claims: Option<Arc<Claims>>,
    ) -> Result<Self, SourceError> {
        let group = config.group_for(pipeline);
        let what = format!(
            "kafka topics {:?} at {} (group {group})",
            config.topics, config.brokers
        );
        let start = match config.start {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        };
        let isolation = if read_committed {
            "read_committed"
        } else {
            "read_uncommitted"
        };
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
        if let Ok(worker) = std::env::var(super::WORKER_ID_VAR) {
            // Static membership: a restarted worker takes its partitions back
            // at once instead of waiting out the session of its dead self.
            if !config.options.contains_key("group.instance.id") {
                client.set("group.instance.id", format!("{group}-{worker}"));
            }
        }
        if track_backlog {
            client.set("statistics.interval.ms", "100");
        }
        let progress = Arc::new(Progress::default());
        let checkpointed_elsewhere = claims.is_some();
        let consumer: GroupConsumer = client
            .create_with_context(RebalanceLog {
                group: group.clone(),
                progress: progress.clone(),
                backlog: track_backlog.then(Backlog::default),
                claims,
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
            batch: batch.clone(),
            max_record_bytes,
            commits: !read_committed,
            what,
            unavailable_since: None,
            last_warning: None,
            progress,
            checkpointed_elsewhere,
        })
    }

    /// Adds `message` to `batch`, or, past `max_record_bytes`, its first
    /// bytes to the batch's rejects.
    fn take(&self, batch: &mut SourceBatch, message: &BorrowedMessage<'_>) {
        let (partition, offset) = (message.partition(), message.offset());
        batch
            .checkpoint
            .advance_to(message.topic(), partition, offset);
        let value = message.payload().unwrap_or_default();
        let length = value.len() + message.key().map_or(0, <[u8]>::len);
        if length <= self.max_record_bytes {
            pack_message(&mut batch.records, message);
            return;
        }
        let mut rejected = Batch::new();
        pack_message(&mut rejected, message);
        let mut record = rejected.to_record(0);
        record.value.truncate(64 << 10);
        batch.rejected.push(Rejected {
            reason: format!(
                "the message at {}/{partition}@{offset} is {length} bytes, over \
                 `limits.max_record_bytes` ({}); the dead letter keeps the first {} bytes of its \
                 value",
                message.topic(),
                self.max_record_bytes,
                record.value.len()
            ),
            record,
        });
    }

    /// The consumer, for a transaction that commits this group's offsets.
    pub fn consumer(&self) -> Arc<GroupConsumer> {
        self.consumer.clone()
    }

    /// The next message. While the cluster is away librdkafka reconnects by
    /// itself and reports each failed attempt here; those are logged (at most
    /// every few seconds) and passed over, not slept on, so that a backlog of
    /// them does not delay reading once the cluster is back.
    async fn recv<'c>(
        &mut self,
        consumer: &'c GroupConsumer,
    ) -> Result<BorrowedMessage<'c>, SourceError> {
        loop {
            match consumer.recv().await {
                Ok(message) => {
                    if self.unavailable_since.take().is_some() {
                        tracing::info!(source = %self.what, "Kafka reachable again.");
                    }
                    return Ok(message);
                }
                Err(err) if is_transient(&err) => {
                    let now = std::time::Instant::now();
                    let since = *self.unavailable_since.get_or_insert(now);
                    if self
                        .last_warning
                        .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
                    {
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
        let consumer = self.consumer.clone();
        let mut batch = SourceBatch::default();
        let first = self.recv(&consumer).await?;
        self.take(&mut batch, &first);
        drop(first);
        let mut revokes = self.progress.revokes();
        let deadline = tokio::time::Instant::now() + self.batch.linger();
        while !self
            .batch
            .is_full(batch.len(), batch.records.payload_bytes())
        {
            let message = match tokio::time::timeout_at(deadline, self.recv(&consumer)).await {
                Ok(next) => next?,
                Err(_linger_over) => break,
            };
            // A rebalance ran inside that read: every partition was revoked
            // (eager rebalancing) and those assigned again restart at their
            // last commit, so what this batch read before it is read again.
            let now = self.progress.revokes();
            if now != revokes {
                revokes = now;
                batch = SourceBatch::default();
            }
            self.take(&mut batch, &message);
        }
        self.progress.handed_over(&batch.checkpoint);
        Ok(Some(batch))
    }

    fn backlog(&self) -> Option<Backlog> {
        self.consumer.context().backlog.clone()
    }

    fn spread(&self) -> Spread {
        Spread::Partitions
    }

    fn committer(&self) -> Arc<dyn Committer> {
        Arc::new(KafkaCommitter {
            progress: self.progress.clone(),
            consumer: self.consumer.clone(),
            what: self.what.clone(),
            enabled: self.commits,
            checkpointed_elsewhere: self.checkpointed_elsewhere,
        })
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // Closing the consumer revokes its partitions: what the pipeline
        // did not commit by now never will be, so the revoke must not wait.
        self.progress.refused();
    }
}

/// Commits a Kafka source's offsets while it goes on reading.
struct KafkaCommitter {
    progress: Arc<Progress>,
    consumer: Arc<GroupConsumer>,
    what: String,
    /// Off when a transaction commits the offsets (exactly-once).
    enabled: bool,
    /// A sink keeps the positions (see [`crate::state`]): the group's
    /// commit only shows the lag, and a revoke waits for the sink's.
    checkpointed_elsewhere: bool,
}

#[async_trait]
impl Committer for KafkaCommitter {
    fn verify(&self) -> Result<(), SourceError> {
        if self.enabled || !self.progress.lock().released_uncommitted {
            return Ok(());
        }
        // Exactly-once: the partitions' next owner reads those records again
        // from the last commit, so the transaction holding their outputs is
        // aborted, and this worker stops; restarted, it resumes from its
        // last commit too.
        Err(SourceError::Io {
            what: self.what.clone(),
            source: std::io::Error::other(format!(
                "a rebalance took partitions away before their batches committed (within {} s); \
                 the open transaction holding their outputs is aborted and the pipeline stops, \
                 to resume from the last commit",
                DRAIN_TIMEOUT.as_secs()
            )),
        })
    }

    fn checkpointed(&self, checkpoint: &Checkpoint) {
        self.progress.committed(checkpoint);
    }

    async fn commit(&self, checkpoint: &Checkpoint) -> Result<Commit, SourceError> {
        if checkpoint.positions.is_empty() {
            return Ok(Commit::Done);
        }
        if !self.enabled {
            // The transaction committed these offsets already.
            self.progress.committed(checkpoint);
            return Ok(Commit::Done);
        }
        // Only partitions still this source's: a checkpoint (or a deferred
        // one) may predate a rebalance, and committing a partition that
        // moved would rewind its new owner.
        let owned = self.progress.owned(checkpoint);
        if owned.positions.is_empty() {
            return Ok(Commit::Done);
        }
        let checkpoint = &owned;
        let offsets = next_offsets(checkpoint).map_err(|e| io(&self.what, e))?;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1.. {
            let (consumer, offsets) = (self.consumer.clone(), offsets.clone());
            let committed =
                tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                    .await;
            let err = match committed {
                Ok(Ok(())) => {
                    self.progress.committed(checkpoint);
                    return Ok(Commit::Done);
                }
                Ok(Err(err)) => err,
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            };
            match classify_commit_error(&err) {
                CommitError::Superseded => {
                    if !self.checkpointed_elsewhere {
                        self.progress.refused();
                    }
                    tracing::warn!(source = %self.what, %err, "Offset commit refused after a rebalance; the partitions' new owner reads these records again.");
                    return Ok(Commit::Superseded(err.to_string()));
                }
                CommitError::Transient if attempt < COMMIT_ATTEMPTS => {
                    tracing::debug!(source = %self.what, %err, attempt, "Offset commit failed; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                // The cluster is away: these offsets go with the next commit.
                CommitError::Transient => return Ok(Commit::Deferred(err.to_string())),
                CommitError::Fatal => {
                    self.progress.refused();
                    return Err(SourceError::Io {
                        what: self.what.clone(),
                        source: std::io::Error::other(format!(
                            "offset commit failed after {attempt} attempt(s): {err}"
                        )),
                    });
                }
            }
        }
        unreachable!("the loop returns")
    }
}

/// Attempts at one commit when the coordinator is moving or slow, 100 ms,
/// 200 ms ... apart (about 3 s in all), before it is deferred to the next.
const COMMIT_ATTEMPTS: u32 = 5;

enum CommitError {
    /// The group rebalanced: the partitions are someone else's now.
    Superseded,
    /// The cluster is away or its coordinator moving: worth another try,
    /// then the next commit.
    Transient,
    /// Anything else: authorization, an unknown topic, a broken client.
    Fatal,
}

fn classify_commit_error(err: &KafkaError) -> CommitError {
    use rdkafka::error::RDKafkaErrorCode as Code;
    match err.rdkafka_error_code() {
        Some(
            Code::RebalanceInProgress
            | Code::IllegalGeneration
            | Code::UnknownMemberId
            | Code::AssignmentLost
            // A static member that rejoined (a broker restart) fences its
            // own previous incarnation; a true twin with this worker's id
            // is a fatal consumer error that reading reports.
            | Code::FencedInstanceId,
        ) => CommitError::Superseded,
        Some(
            Code::NotCoordinator
            | Code::CoordinatorNotAvailable
            | Code::CoordinatorLoadInProgress
            | Code::RequestTimedOut
            | Code::OperationTimedOut
            | Code::NetworkException
            | Code::BrokerTransportFailure
            | Code::AllBrokersDown
            | Code::WaitingForCoordinator,
        ) => CommitError::Transient,
        _ => CommitError::Fatal,
    }
}

/// The offsets to commit for a checkpoint: one past the last record read.
pub fn next_offsets(checkpoint: &Checkpoint) -> Result<TopicPartitionList, KafkaError> {
    let mut offsets = TopicPartitionList::new();
    for position in &checkpoint.positions {
        offsets.add_partition_offset(
            &position.topic,
            position.partition,
            Offset::Offset(position.offset + 1),
        )?;
    }
    Ok(offsets)
}
