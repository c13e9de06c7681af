//! Sources: where a pipeline's records come from, a batch at a time.
//!
//! Every source implements [`Source`]. A batch carries a [`Checkpoint`]: the
//! last position read per topic and partition. The pipeline hands the
//! checkpoint to the source's [`Committer`] only once every sink
//! (dead-letter sink included) has durably written everything derived from
//! the batch, so a source that can commit (Kafka) never commits a record
//! that could still be lost: at-least-once.
//!
//! Input a source cannot make into a record (a malformed JSON line) is not
//! dropped: it comes back in [`SourceBatch::rejected`] with the reason and
//! its position, for the dead-letter sink.

pub mod generator;
pub mod kafka;
mod lines;

use std::sync::Arc;

use async_trait::async_trait;

use crate::batch::Batch;
use crate::config::{PipelineConfig, SourceConfig};
use crate::kafka::KafkaTransaction;
use crate::record::{Record, SourcePosition};
use crate::state::Claims;

pub use generator::Generator;
pub use lines::LineSource;

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading failed.
    #[error("cannot read `{what}`: {source}")]
    Io {
        /// The file or stream.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Input the source could not turn into a record, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The raw input, as a record at its position.
    pub record: Record,
    /// Why, quoting the input's fault.
    pub reason: String,
}

/// The last position read per topic and partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// One entry per topic and partition.
    pub positions: Vec<SourcePosition>,
}

impl Checkpoint {
    /// Records that `position` has been read.
    pub fn advance(&mut self, position: &SourcePosition) {
        match self.position_of(&position.topic, position.partition) {
            Some(p) => p.offset = p.offset.max(position.offset),
            None => self.positions.push(position.clone()),
        }
    }

    /// Records that `offset` of `topic`'s `partition` has been read; as
    /// [`Checkpoint::advance`], allocating only for a partition new to it.
    #[inline]
    pub fn advance_to(&mut self, topic: &str, partition: i32, offset: i64) {
        match self.position_of(topic, partition) {
            Some(p) => p.offset = p.offset.max(offset),
            None => self.positions.push(SourcePosition {
                topic: topic.into(),
                partition,
                offset,
            }),
        }
    }

    fn position_of(&mut self, topic: &str, partition: i32) -> Option<&mut SourcePosition> {
        self.positions
            .iter_mut()
            .find(|p| p.partition == partition && &*p.topic == topic)
    }
}

/// One batch from a source.
#[derive(Debug, Default)]
pub struct SourceBatch {
    /// Records to process.
    pub records: Batch,
    /// Input that could not become a record.
    pub rejected: Vec<Rejected>,
    /// Where this batch ends.
    pub checkpoint: Checkpoint,
    /// What its records must still be checked for, in the pipeline's lanes
    /// (in parallel) rather than by the source.
    pub validate: Validate,
}

/// A check a source leaves to the pipeline's lanes: records that fail it
/// are rejected as if the source had, with the reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Validate {
    /// Nothing to check.
    #[default]
    Nothing,
    /// Each value must be one JSON document in UTF-8 (`format = "json"`).
    Json,
}

impl Validate {
    /// Checks `records`; those that fail come out of the batch and into
    /// `rejected`, in order.
    pub fn apply(self, records: Batch, rejected: &mut Vec<Rejected>) -> Batch {
        let check = match self {
            Validate::Nothing => return records,
            // One pass, no tree: the guest SDK's scanner, as plugins use.
            Validate::Json => weir_guest::json::validate,
        };
        let failed: Vec<(usize, weir_guest::json::JsonError)> = (0..records.len())
            .filter_map(|at| check(records.get(at).value()).err().map(|err| (at, err)))
            .collect();
        if failed.is_empty() {
            return records;
        }
        let mut kept = Batch::with_capacity(records.wire().len(), records.len());
        let mut failed = failed.into_iter().peekable();
        for at in 0..records.len() {
            let Some((_, err)) = failed.next_if(|(bad, _)| *bad == at) else {
                // A source batch has no routes: the copy always fits.
                let _ = kept.push_copy(&records, at);
                continue;
            };
            let record = records.get(at);
            rejected.push(Rejected {
                reason: format!(
                    "malformed JSON at {}:{}: {err}",
                    record.topic(),
                    record.offset()
                ),
                record: record.to_record(),
            });
        }
        kept
    }
}

impl SourceBatch {
    /// How many inputs the batch holds, records and rejects.
    pub fn len(&self) -> usize {
        self.records.len() + self.rejected.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A source of records.
#[async_trait]
pub trait Source: Send {
    /// The next batch, or `None` once a bounded source is drained.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: records read into a batch that is cancelled are
    /// lost. They were never committed, so a committing source reads them
    /// again; the pipeline cancels only on shutdown.
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError>;

    /// How the pipeline may spread this source's batches over its lanes.
    fn spread(&self) -> Spread {
        Spread::Batches
    }

    /// What the source has not delivered yet, per partition, if it knows:
    /// a window's watermark waits for a partition with records still to
    /// come, however long since its last one (a consumer working through a
    /// backlog reads some partitions long before others).
    fn backlog(&self) -> Option<Backlog> {
        None
    }

    /// What the pipeline calls, concurrently with `next_batch`, once every
    /// sink has durably written everything up to a checkpoint.
    fn committer(&self) -> Arc<dyn Committer> {
        Arc::new(NothingToCommit)
    }
}

/// The partitions a source has records of still to deliver, as it last
/// reported them; shared between the source, which reports, and a window,
/// which reads. While there is no report, every partition may be behind.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<std::sync::Mutex<Option<Behind>>>);

/// The (topic, partition)s a source has records of still to deliver.
pub type Behind = Arc<[(Arc<str>, i32)]>;

impl Backlog {
    /// The source's partitions with records still to come are `behind`;
    /// `None`: the source cannot tell now.
    pub fn report(&self, behind: Option<Vec<(Arc<str>, i32)>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = behind.map(Arc::from);
    }

    /// The last report: `None` before the first one, or when the source
    /// could not tell. A report not changed since is the same `Arc`.
    pub fn latest(&self) -> Option<Behind> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How a source's records may be spread over a pipeline's lanes. Either way
/// outputs are written in the order the source read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Any batch in any lane (a file: its lines have no key or partition).
    Batches,
    /// Every record of one partition in the same lane (Kafka): a plugin
    /// instance, and the state kept for a partition, see all of its records.
    Partitions,
}

/// Commits a source's positions.
#[async_trait]
pub trait Committer: Send + Sync {
    /// Everything up to `checkpoint` is durably written by every sink.
    /// An error means positions cannot be committed: the pipeline stops
    /// rather than run on replaying everything after a restart.
    async fn commit(&self, checkpoint: &Checkpoint) -> Result<Commit, SourceError>;

    /// A sink that keeps checkpoints committed everything up to
    /// `checkpoint` with its own writes (see [`crate::state`]): the
    /// positions are safe, whatever becomes of [`Committer::commit`].
    fn checkpointed(&self, _checkpoint: &Checkpoint) {}

    /// Called before a transaction commits outputs with these positions: an
    /// error means they are no longer this source's to commit, and the
    /// transaction is aborted instead.
    fn verify(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// What became of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The positions are committed (or there was nothing to commit).
    Done,
    /// The partitions moved to another reader before the commit landed (a
    /// rebalance): that reader starts at the previous commit and reads
    /// these records again. At-least-once holds; they are counted.
    Superseded(String),
    /// The cluster could not take the commit now (it is away or its
    /// coordinator is moving): the pipeline commits these positions with
    /// the next ones.
    Deferred(String),
}

/// For sources that cannot replay (files, stdin, generators): nothing to
/// remember.
pub struct NothingToCommit;

#[async_trait]
impl Committer for NothingToCommit {
    async fn commit(&self, _checkpoint: &Checkpoint) -> Result<Commit, SourceError> {
        Ok(Commit::Done)
    }
}

/// A pipeline's source, open, with the transaction its Kafka sinks write
/// through when its delivery is exactly-once.
pub struct OpenSource {
    /// The source.
    pub source: Box<dyn Source>,
    /// Exactly-once only: the transaction that commits the sinks' outputs
    /// with the source's positions.
    pub transaction: Option<Arc<KafkaTransaction>>,
}

/// Opens the source `pipeline` describes, resuming a file after the line
/// `resume` (a checkpoint's) holds; a source whose partitions are assigned
/// (Kafka) claims them with `claims` as they come, and resumes each from
/// its own checkpoint.
pub async fn open(
    pipeline: &PipelineConfig,
    resume: &Checkpoint,
    claims: Option<Arc<Claims>>,
) -> Result<OpenSource, SourceError> {
    let batch = &pipeline.batch;
    let max_record = pipeline.limits().max_record_bytes;
    let source: Box<dyn Source> = match pipeline.source.get_ref() {
        SourceConfig::File { path, format } => {
            // Off the async workers: opening a FIFO waits for its writer.
            let topic = path.display().to_string();
            let after = (resume.positions.iter())
                .find(|p| *p.topic == *topic && p.partition == 0)
                .map_or(0, |p| p.offset);
            let (path, format, batch) = (path.clone(), *format, batch.clone());
            let opened = tokio::task::spawn_blocking(move || {
                LineSource::file(&path, format, &batch, max_record, after)
            });
            match opened.await {
                Ok(source) => Box::new(source?),
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            }
        }
        SourceConfig::Stdin { format } => Box::new(LineSource::stdin(*format, batch, max_record)),
        SourceConfig::Generator(generator) => Box::new(Generator::new(generator.clone(), batch)),
        SourceConfig::Kafka(kafka) => return kafka::open(kafka, pipeline, claims).await,
    };
    Ok(OpenSource {
        source,
        transaction: None,
    })
}

/// What claims the partitions of `pipeline`'s source when the source's
/// own transactions keep the checkpoints (exactly-once Kafka with a
/// window); `None` for every other source.
pub fn claimer(pipeline: &PipelineConfig) -> Option<Box<dyn crate::state::Claimer>> {
    match pipeline.source.get_ref() {
        SourceConfig::Kafka(kafka) => kafka::claimer(kafka, pipeline),
        SourceConfig::File { .. } | SourceConfig::Stdin { .. } | SourceConfig::Generator(_) => None,
    }
}

fn position(topic: &Arc<str>, partition: i32, offset: i64) -> SourcePosition {
    SourcePosition {
        topic: topic.clone(),
        partition,
        offset,
    }
}
