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
mod stdout;

use async_trait::async_trait;

use crate::config::{RecordFormat, SinkConfig};
use crate::record::Record;

pub use encode::encode;
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
    /// The reader went away (a closed stdout pipe): stop cleanly.
    #[error("sink {sink}: the reader closed the stream")]
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
    async fn write(&mut self, records: &[Record]) -> Result<(), SinkError>;

    /// Makes everything written so far durable.
    async fn flush(&mut self) -> Result<(), SinkError>;
}

/// Builds the sink `config` describes, writing `default_format` unless it
/// sets one (dead-letter sinks default to `envelope`, keeping the reason
/// headers).
/// Kafka sinks of an exactly-once pipeline write through its `transaction`.
pub async fn build(
    config: &SinkConfig,
    default_format: RecordFormat,
    transaction: Option<&crate::kafka::KafkaTransaction>,
) -> Result<Box<dyn Sink>, SinkError> {
    let format = config.format_or(default_format);
    Ok(match config {
        SinkConfig::Stdout { .. } => Box::new(StdoutSink::new(format)),
        SinkConfig::File { path, .. } => Box::new(FileSink::create(path, format).await?),
        SinkConfig::Kafka(kafka) => match transaction {
            Some(transaction) => Box::new(kafka::KafkaSink::with_producer(
                kafka.clone(),
                transaction.producer(),
            )),
            None => Box::new(kafka::KafkaSink::new(kafka.clone())?),
        },
    })
}

/// The sink for dead letters when a pipeline names none: stderr, as envelopes.
pub fn default_dead_letter() -> Box<dyn Sink> {
    Box::new(StderrSink::new(RecordFormat::Envelope))
}
