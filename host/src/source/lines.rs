//! Line sources: a file read to its end, or stdin until it closes. Each line
//! is a record whose offset is its 1-based line number; with `format =
//! "json"` a line that is not JSON is rejected with that line number.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::{Rejected, Source, SourceBatch, SourceError, position};
use crate::config::{BatchConfig, LineFormat};
use crate::record::Record;

/// Lines read ahead of the pipeline, at most.
const READ_AHEAD: usize = 8192;

/// Reads lines from a file or stdin.
pub struct LineSource {
    lines: mpsc::Receiver<Result<(i64, Vec<u8>), SourceError>>,
    topic: Arc<str>,
    format: LineFormat,
    batch: BatchConfig,
}

impl LineSource {
    /// Reads the file at `path` to its end.
    pub fn file(path: &Path, format: LineFormat, batch: &BatchConfig) -> Result<Self, SourceError> {
        let what = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| SourceError::Io {
            what: what.clone(),
            source,
        })?;
        let reader = BufReader::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
        Ok(Self::spawn(reader, what, format, batch))
    }

    /// Reads standard input until it closes.
    pub fn stdin(format: LineFormat, batch: &BatchConfig) -> Self {
        Self::spawn(
            BufReader::new(tokio::io::stdin()),
            "stdin".into(),
            format,
            batch,
        )
    }

    fn spawn(
        mut reader: impl AsyncBufRead + Unpin + Send + 'static,
        what: String,
        format: LineFormat,
        batch: &BatchConfig,
    ) -> Self {
        let (tx, lines) = mpsc::channel(READ_AHEAD);
        let topic: Arc<str> = what.clone().into();
        // A reader task, so that a partial line is never lost to a linger
        // timeout: the channel is what `next_batch` waits on.
        tokio::spawn(async move {
            let mut number = 0i64;
            loop {
                let mut line = Vec::new();
                let read = reader.read_until(b'\n', &mut line).await;
                let item = match read {
                    Ok(0) => break,
                    Ok(_) => {
                        number += 1;
                        while matches!(line.last(), Some(b'\n' | b'\r')) {
                            line.pop();
                        }
                        if line.is_empty() {
                            continue;
                        }
                        Ok((number, line))
                    }
                    Err(source) => Err(SourceError::Io {
                        what: what.clone(),
                        source,
                    }),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        LineSource {
            lines,
            topic,
            format,
            batch: batch.clone(),
        }
    }

    fn push(&self, batch: &mut SourceBatch, number: i64, line: Vec<u8>) {
        let at = position(&self.topic, 0, number);
        batch.checkpoint.advance(&at);
        let record = Record::new(Bytes::from(line), at);
        if self.format == LineFormat::Json
            && let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(&record.value)
        {
            let reason = format!("malformed JSON at {}:{number}: {err}", self.topic);
            batch.rejected.push(Rejected { record, reason });
            return;
        }
        batch.records.push(record);
    }
}

#[async_trait]
impl Source for LineSource {
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let mut batch = SourceBatch::default();
        // Wait as long as it takes for the first line, then at most the linger.
        match self.lines.recv().await {
            None => return Ok(None),
            Some(line) => {
                let (number, line) = line?;
                self.push(&mut batch, number, line);
            }
        }
        let deadline = tokio::time::Instant::now() + self.batch.linger();
        let mut bytes = 0;
        while !self.batch.is_full(batch.len(), bytes) {
            let next = match self.lines.try_recv() {
                Ok(line) => Some(line),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                        Ok(line) => line,
                        Err(_elapsed) => break,
                    }
                }
            };
            let Some(line) = next else { break };
            let (number, line) = line?;
            bytes += line.len();
            self.push(&mut batch, number, line);
        }
        Ok(Some(batch))
    }
}
