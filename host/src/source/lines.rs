//! Line sources: a file read to its end, or stdin until it closes. Each line
//! is a record whose offset is its 1-based line number; with `format =
//! "json"` a line that is not JSON is rejected with that line number.
//!
//! Memory stays bounded whatever the input: a line longer than
//! `limits.max_record_bytes` is never held whole (it is rejected with its
//! first bytes and its line number), and the lines read ahead of the
//! pipeline hold at most `READ_AHEAD_BYTES` between them.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Rejected, Source, SourceBatch, SourceError, position};
use crate::config::{BatchConfig, LineFormat};
use crate::record::Record;

/// Bytes of lines read ahead of the pipeline, at least; more when
/// `max_record_bytes` is larger, so that two whole records always fit.
const READ_AHEAD_BYTES: usize = 16 << 20;

/// How much of an over-long line its dead letter keeps.
const OVERLONG_KEPT: usize = 64 << 10;

/// A line read, with the read-ahead budget it holds until taken.
struct Line {
    number: i64,
    bytes: Vec<u8>,
    /// Its whole length: more than `bytes` holds when it was over-long.
    length: usize,
    _budget: OwnedSemaphorePermit,
}

/// Reads lines from a file or stdin.
pub struct LineSource {
    lines: mpsc::Receiver<Result<Line, SourceError>>,
    topic: Arc<str>,
    format: LineFormat,
    batch: BatchConfig,
    max_record_bytes: usize,
}

impl LineSource {
    /// Reads the file at `path` to its end.
    pub fn file(
        path: &Path,
        format: LineFormat,
        batch: &BatchConfig,
        max_record_bytes: usize,
    ) -> Result<Self, SourceError> {
        let what = path.display().to_string();
        let fail = |message: String| SourceError::Io {
            what: what.clone(),
            source: std::io::Error::other(message),
        };
        let file = std::fs::File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => fail("no such file".into()),
            _ => SourceError::Io {
                what: what.clone(),
                source,
            },
        })?;
        let kind = file.metadata().map(|m| m.file_type()).ok();
        if kind.is_some_and(|kind| kind.is_dir()) {
            return Err(fail("is a folder, not a file of records".into()));
        }
        let reader = BufReader::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
        Ok(Self::spawn(reader, what, format, batch, max_record_bytes))
    }

    /// Reads standard input until it closes.
    pub fn stdin(format: LineFormat, batch: &BatchConfig, max_record_bytes: usize) -> Self {
        Self::spawn(
            BufReader::new(tokio::io::stdin()),
            "stdin".into(),
            format,
            batch,
            max_record_bytes,
        )
    }

    fn spawn(
        mut reader: impl AsyncBufRead + Unpin + Send + 'static,
        what: String,
        format: LineFormat,
        batch: &BatchConfig,
        max_record_bytes: usize,
    ) -> Self {
        let budget_bytes = READ_AHEAD_BYTES.max(2 * max_record_bytes);
        let budget = Arc::new(Semaphore::new(budget_bytes));
        // Enough slots for the byte budget to be what binds, even for short
        // lines; each slot is a few words.
        let (tx, lines) = mpsc::channel(budget_bytes / 64);
        let topic: Arc<str> = what.clone().into();
        // A reader task, so that a partial line is never lost to a linger
        // timeout: the channel is what `next_batch` waits on.
        tokio::spawn(async move {
            let mut number = 0i64;
            loop {
                let mut bytes = Vec::new();
                let item = match read_line(&mut reader, &mut bytes, max_record_bytes).await {
                    Ok(None) => break,
                    Ok(Some(mut length)) => {
                        number += 1;
                        if bytes.len() == length && bytes.last() == Some(&b'\r') {
                            bytes.pop();
                            length -= 1;
                        }
                        if length == 0 {
                            continue;
                        }
                        if length > max_record_bytes {
                            bytes.truncate(OVERLONG_KEPT);
                        }
                        let held = u32::try_from(bytes.len().max(1)).unwrap_or(u32::MAX);
                        let Ok(permit) = budget.clone().acquire_many_owned(held).await else {
                            break;
                        };
                        Ok(Line {
                            number,
                            bytes,
                            length,
                            _budget: permit,
                        })
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
            max_record_bytes,
        }
    }

    fn push(&self, batch: &mut SourceBatch, line: Line) {
        let number = line.number;
        let at = position(&self.topic, 0, number);
        batch.checkpoint.advance(&at);
        let record = Record::new(Bytes::from(line.bytes), at);
        if line.length > self.max_record_bytes {
            let reason = format!(
                "line {}:{number} is {} bytes, over `limits.max_record_bytes` ({}); the dead \
                 letter keeps its first {} bytes",
                self.topic,
                line.length,
                self.max_record_bytes,
                record.value.len()
            );
            batch.rejected.push(Rejected { record, reason });
            return;
        }
        if self.format == LineFormat::Json
            && let Err(err) = check_json(&record.value)
        {
            let reason = format!("malformed JSON at {}:{number}: {err}", self.topic);
            batch.rejected.push(Rejected { record, reason });
            return;
        }
        batch.records.push(record);
    }
}

/// Whether `line` is one JSON document in UTF-8 (strings included, which
/// skipping them unread would not check).
fn check_json(line: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(line).map_err(|err| format!("not UTF-8: {err}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(drop)
        .map_err(|err| err.to_string())
}

/// Reads one line into `line`, without its `\n`, keeping at most `max` + 1
/// bytes of it (room for a `\r`) and passing over the rest. Returns the
/// line's whole length without the `\n`, or `None` at the end of the input.
async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    let keep = max.saturating_add(1);
    let mut length = 0;
    let mut read_any = false;
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(read_any.then_some(length));
        }
        read_any = true;
        let (content, ends) = match memchr::memchr(b'\n', buffer) {
            Some(at) => (&buffer[..at], true),
            None => (buffer, false),
        };
        let room = keep.saturating_sub(line.len()).min(content.len());
        line.extend_from_slice(&content[..room]);
        length += content.len();
        let taken = content.len() + usize::from(ends);
        reader.consume(taken);
        if ends {
            return Ok(Some(length));
        }
    }
}

#[async_trait]
impl Source for LineSource {
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        let mut batch = SourceBatch::default();
        // Wait as long as it takes for the first line, then at most the linger.
        match self.lines.recv().await {
            None => return Ok(None),
            Some(line) => self.push(&mut batch, line?),
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
            let line = line?;
            bytes += line.bytes.len();
            self.push(&mut batch, line);
        }
        Ok(Some(batch))
    }
}
