//! Sinks: where a pipeline's outputs and dead letters are written.
//!
//! Every sink implements [`Sink`]. `write` may buffer; `flush` returns only
//! once everything written before it is durable (for a file: written and
//! `fsync`ed). The pipeline commits source positions only after every sink's
//! `flush`, which is what makes delivery at-least-once.
//!
//! A new sink is one new file (or folder, for a connector with a client and
//! retries) here plus its variant in `config::SinkConfig`.

mod encode;
mod file;
pub mod kafka;
pub mod parquet;
pub mod postgres;
mod stdout;

use async_trait::async_trait;

use crate::batch::{RecordRef, Records};
use crate::config::{FileMode, RecordFormat, SinkConfig};
use crate::state::Snapshot;

pub use encode::{encode, refuse_line_breaks};
pub use file::FileSink;
pub use stdout::{StderrSink, StdoutSink};

/// Why a sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing failed.
    #[error("sink {sink}: {source}")]
    Io {
        /// Which sink.
        sink: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The reader went away (a closed stdout pipe): the pipeline stops with
    /// this error once its other sinks are flushed.
    #[error("sink {sink}: the reader closed the stream; nothing more is written")]
    Closed {
        /// Which sink.
        sink: String,
    },
}

impl SinkError {
    fn io(sink: &str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::BrokenPipe {
            SinkError::Closed {
                sink: sink.to_owned(),
            }
        } else {
            SinkError::Io {
                sink: sink.to_owned(),
                source,
            }
        }
    }
}

/// A destination for records.
#[async_trait]
pub trait Sink: Send {
    /// Names the sink in errors and logs: `stdout`, `file "out.jsonl"`.
    fn describe(&self) -> String;

    /// Writes records; may buffer until [`Sink::flush`].
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled write may have written part of the batch.
    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError>;

    /// Makes everything written so far durable.
    async fn flush(&mut self) -> Result<(), SinkError>;

    /// Why this sink cannot hold `record` as it is, if it cannot: the
    /// pipeline dead-letters its copy instead of writing it.
    fn refuses(&self, _record: &RecordRef<'_>) -> Option<String> {
        None
    }

    /// Whether the sink keeps the pipeline's checkpoints, committing each
    /// with its own writes in one transaction (see [`crate::state`]).
    fn keeps_checkpoints(&self) -> bool {
        false
    }

    /// Makes everything written so far durable together with `snapshot`,
    /// atomically: both or neither. Called only on a sink that
    /// [keeps checkpoints](Sink::keeps_checkpoints). `false`: nothing was
    /// made durable this time (a Parquet file not due to be finished yet):
    /// the checkpoint and its writes go with a later one.
    async fn commit(&mut self, _snapshot: &Snapshot) -> Result<bool, SinkError> {
        self.flush().await?;
        Ok(true)
    }

    /// Whether the sink holds so much for its next commit that the
    /// pipeline should commit now rather than at its interval.
    fn wants_commit(&self) -> bool {
        false
    }
}

/// What a sink's config leaves to its pipeline.
pub struct SinkDefaults<'a> {
    /// The pipeline's name (a sink that keeps checkpoints keeps them under
    /// it).
    pub pipeline: &'a str,
    /// How records are written unless the sink sets a `format`: values for
    /// outputs, envelopes (keeping the reason headers) for dead letters.
    pub format: RecordFormat,
    /// How a file sink opens its file unless it sets a `mode`.
    pub file_mode: FileMode,
    /// Exactly-once: the transaction Kafka sinks write through.
    pub transaction: Option<&'a crate::kafka::KafkaTransaction>,
}

/// Builds the sink `config` describes.
pub async fn build(
    config: &SinkConfig,
    defaults: &SinkDefaults<'_>,
) -> Result<Box<dyn Sink>, SinkError> {
    let format = config.format_or(defaults.format);
    Ok(match config {
        SinkConfig::Stdout { .. } => Box::new(StdoutSink::new(format)),
        SinkConfig::File { path, mode, .. } => {
            Box::new(FileSink::open(path, format, mode.unwrap_or(defaults.file_mode)).await?)
        }
        SinkConfig::Kafka(kafka) => match defaults.transaction {
            Some(transaction) => Box::new(kafka::KafkaSink::with_producer(
                kafka.clone(),
                transaction.producer(),
            )),
            None => Box::new(kafka::KafkaSink::new(kafka.clone())?),
        },
        SinkConfig::Postgres(postgres) => {
            Box::new(postgres::PostgresSink::open(postgres.clone(), defaults.pipeline).await?)
        }
        SinkConfig::Parquet(parquet) => Box::new(parquet::ParquetSink::open(parquet).await?),
    })
}

/// Whether the sink `config` describes keeps checkpoints (see
/// [`Sink::keeps_checkpoints`]).
pub fn keeps_checkpoints(config: &SinkConfig) -> bool {
    match config {
        SinkConfig::Postgres(postgres) => postgres.checkpoints,
        SinkConfig::Parquet(_) => true,
        SinkConfig::Stdout { .. } | SinkConfig::File { .. } | SinkConfig::Kafka(_) => false,
    }
}

/// What claims the partitions of `pipeline` in the checkpoints the sink
/// `config` describes keeps, if it keeps checkpoints.
pub fn claimer(config: &SinkConfig, pipeline: &str) -> Option<Box<dyn crate::state::Claimer>> {
    match config {
        SinkConfig::Postgres(postgres) => {
            Some(Box::new(postgres::PostgresClaimer::new(postgres, pipeline)))
        }
        SinkConfig::Stdout { .. }
        | SinkConfig::File { .. }
        | SinkConfig::Kafka(_)
        | SinkConfig::Parquet(_) => None,
    }
}

/// The last checkpoint of `pipeline` that the sink `config` describes
/// keeps, if it keeps checkpoints and has one.
pub async fn last_checkpoint(
    config: &SinkConfig,
    pipeline: &str,
) -> Result<Option<Snapshot>, SinkError> {
    match config {
        SinkConfig::Postgres(postgres) => postgres::last_checkpoint(postgres, pipeline).await,
        SinkConfig::Parquet(parquet) => parquet::last_checkpoint(parquet),
        SinkConfig::Stdout { .. } | SinkConfig::File { .. } | SinkConfig::Kafka(_) => Ok(None),
    }
}

/// What would stop the sink `config` describes from opening, found without
/// writing anything: a file whose folder cannot be created or written, a
/// path that is a folder, a Kafka option librdkafka does not know.
pub fn check(config: &SinkConfig) -> Result<(), String> {
    match config {
        SinkConfig::Stdout { .. } => Ok(()),
        SinkConfig::File { path, .. } => file::check(path),
        SinkConfig::Kafka(kafka) => kafka::check(kafka),
        SinkConfig::Postgres(postgres) => postgres.check(),
        SinkConfig::Parquet(parquet) => parquet.check(),
    }
}

/// The sink for dead letters when a pipeline names none: stderr, as envelopes.
pub fn default_dead_letter() -> Box<dyn Sink> {
    Box::new(StderrSink::new(RecordFormat::Envelope))
}
