//! The `stdout` sink, and the stderr sink that takes dead letters when a
//! pipeline names no dead-letter destination.

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Sink, SinkError, encode, refuse_line_breaks};
use crate::batch::{RecordRef, Records};
use crate::config::RecordFormat;

/// Writes records to a standard stream, one per line.
pub struct StreamSink<W> {
    name: &'static str,
    stream: W,
    format: RecordFormat,
    buffer: Vec<u8>,
}

/// Records to standard output.
pub type StdoutSink = StreamSink<tokio::io::Stdout>;
/// Records to standard error.
pub type StderrSink = StreamSink<tokio::io::Stderr>;

impl StdoutSink {
    /// A sink on this process's stdout.
    pub fn new(format: RecordFormat) -> Self {
        StreamSink::on("stdout", tokio::io::stdout(), format)
    }
}

impl StderrSink {
    /// A sink on this process's stderr.
    pub fn new(format: RecordFormat) -> Self {
        StreamSink::on("stderr", tokio::io::stderr(), format)
    }
}

impl<W> StreamSink<W> {
    fn on(name: &'static str, stream: W, format: RecordFormat) -> Self {
        StreamSink {
            name,
            stream,
            format,
            buffer: Vec::new(),
        }
    }
}

#[async_trait]
impl<W: AsyncWrite + Unpin + Send> Sink for StreamSink<W> {
    fn describe(&self) -> String {
        self.name.to_owned()
    }

    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError> {
        self.buffer.clear();
        for record in records.iter() {
            encode(&record, self.format, &mut self.buffer);
        }
        let written = self.stream.write_all(&self.buffer).await;
        written.map_err(|e| SinkError::io(self.name, e))
    }

    fn refuses(&self, record: &RecordRef<'_>) -> Option<String> {
        refuse_line_breaks(record, self.format, self.name)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        let flushed = self.stream.flush().await;
        flushed.map_err(|e| SinkError::io(self.name, e))
    }
}
