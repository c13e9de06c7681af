//! Line sources: a file read to its end, or stdin until it closes. Each line
//! is a record whose offset is its 1-based line number; with `format =
//! "json"` a line that is not JSON is rejected with that line number.
//!
//! A reader thread reads large blocks, finds line ends with a vectorised
//! search and packs lines straight into batches; the pipeline receives whole
//! batches. A batch closes when it is full, or when the input has nothing
//! more ready: a line never waits on a read that may block (so `linger_ms`
//! does not apply here).
//!
//! Memory stays bounded whatever the input: a line longer than
//! `limits.max_record_bytes` is never held whole (it is rejected with its
//! first bytes and its line number), and at most `READ_AHEAD` batches wait
//! for the pipeline.

use std::io::Read;
use std::path::Path;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Rejected, Source, SourceBatch, SourceError, Validate, position};
use crate::batch::Batch;
use crate::config::{BatchConfig, LineFormat};
use crate::record::Record;

/// Batches read ahead of the pipeline, besides the one being filled.
const READ_AHEAD: usize = 2;

/// Bytes asked of the input per read.
const BLOCK: usize = 1 << 20;

/// How much of an over-long line its dead letter keeps.
const OVERLONG_KEPT: usize = 64 << 10;

/// Reads lines from a file or stdin.
pub struct LineSource {
    batches: mpsc::Receiver<Result<SourceBatch, SourceError>>,
}

impl LineSource {
    /// Reads the file at `path` to its end, from the line after line
    /// `after` (0: from the start; a checkpoint's position resumes there).
    pub fn file(
        path: &Path,
        format: LineFormat,
        batch: &BatchConfig,
        max_record_bytes: usize,
        after: i64,
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
        if after > 0 {
            tracing::info!(file = %what, line = after + 1, "Resuming at the checkpoint's line.");
        }
        Ok(Self::spawn(
            file,
            what,
            format,
            batch,
            max_record_bytes,
            after,
        ))
    }

    /// Reads standard input until it closes.
    pub fn stdin(format: LineFormat, batch: &BatchConfig, max_record_bytes: usize) -> Self {
        Self::spawn(
            std::io::stdin(),
            "stdin".into(),
            format,
            batch,
            max_record_bytes,
            0,
        )
    }

    fn spawn(
        input: impl Read + Send + 'static,
        what: String,
        format: LineFormat,
        batch: &BatchConfig,
        max_record_bytes: usize,
        after: i64,
    ) -> Self {
        let (tx, batches) = mpsc::channel(READ_AHEAD);
        let reader = LineReader {
            topic: what,
            format,
            batch: batch.clone(),
            max_record_bytes,
            number: 0,
            after,
            current: SourceBatch::default(),
            tx,
        };
        // A thread of its own: reads block (stdin may never end), and the
        // thread ends when the input does or the pipeline stops listening.
        let spawned = std::thread::Builder::new()
            .name("weir-lines".into())
            .spawn(move || reader.run(input));
        if let Err(err) = spawned {
            let (tx, batches) = mpsc::channel(1);
            let _ = tx.try_send(Err(SourceError::Io {
                what: "the line reader thread".into(),
                source: err,
            }));
            return LineSource { batches };
        }
        LineSource { batches }
    }
}

/// The reader thread's state: the batch being filled and where it is.
struct LineReader {
    topic: String,
    format: LineFormat,
    batch: BatchConfig,
    max_record_bytes: usize,
    /// The last line's number.
    number: i64,
    /// Lines up to this one were read by an earlier run: passed over.
    after: i64,
    current: SourceBatch,
    tx: mpsc::Sender<Result<SourceBatch, SourceError>>,
}

/// A line longer than `max_record_bytes`, being passed over.
struct Overlong {
    kept: Vec<u8>,
    length: usize,
}

impl LineReader {
    fn run(mut self, mut input: impl Read) {
        if let Err(source) = self.read_all(&mut input) {
            let what = self.topic.clone();
            let _ = self.send();
            let _ = self.tx.blocking_send(Err(SourceError::Io { what, source }));
        }
    }

    /// Reads `input` to its end, sending batches as they fill. Stops early,
    /// with `Ok`, once the pipeline no longer listens.
    fn read_all(&mut self, input: &mut impl Read) -> std::io::Result<()> {
        // A line up to `max_record_bytes` (and its `\r`) is held whole.
        let keep = self.max_record_bytes.saturating_add(1);
        let mut buf = vec![0u8; BLOCK];
        // Unread bytes lie in `buf[start..end]`.
        let (mut start, mut end) = (0, 0);
        let mut overlong: Option<Overlong> = None;
        loop {
            if end == buf.len() {
                if start > 0 {
                    buf.copy_within(start..end, 0);
                    (start, end) = (0, end - start);
                } else {
                    // One partial line fills the buffer; it is under `keep`.
                    let grown = (buf.len() * 2).min(keep.saturating_add(BLOCK));
                    buf.resize(grown, 0);
                }
            }
            let asked = buf.len() - end;
            let read = match input.read(&mut buf[end..]) {
                Ok(read) => read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            if read == 0 {
                // The end: a last line without its `\n` is a line too.
                if let Some(line) = overlong.take() {
                    self.overlong(line);
                } else if start < end {
                    self.line(&buf[start..end]);
                }
                self.send()?;
                return Ok(());
            }
            end += read;
            let mut from = start;
            while let Some(at) = memchr::memchr(b'\n', &buf[from..end]) {
                let line_end = from + at;
                match overlong.take() {
                    Some(mut line) => {
                        line.length += line_end - from;
                        self.overlong(line);
                    }
                    None => self.line(&buf[from..line_end]),
                }
                from = line_end + 1;
                if self.is_full() {
                    self.send()?;
                }
            }
            start = from;
            // What is left is a partial line.
            let partial = end - start;
            if let Some(line) = &mut overlong {
                line.length += partial;
                (start, end) = (0, 0);
            } else if partial > keep {
                let kept = buf[start..start + OVERLONG_KEPT.min(partial)].to_vec();
                overlong = Some(Overlong {
                    kept,
                    length: partial,
                });
                (start, end) = (0, 0);
            }
            // Nothing more was ready: what was read goes now, rather than
            // wait on a read that may block.
            if read < asked && !self.current.is_empty() {
                self.send()?;
            }
        }
    }

    fn is_full(&self) -> bool {
        self.batch
            .is_full(self.current.len(), self.current.records.payload_bytes())
    }

    /// Sends the batch being filled, if it holds anything; an error once
    /// the pipeline no longer listens.
    fn send(&mut self) -> std::io::Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        // The next batch starts with this one's room: grown from nothing,
        // its bytes would be copied a dozen times over as it fills.
        let room = SourceBatch {
            records: Batch::with_capacity(self.current.records.wire().len(), self.current.len()),
            ..SourceBatch::default()
        };
        let mut batch = std::mem::replace(&mut self.current, room);
        if self.format == LineFormat::Json {
            // Checked in the lanes, in parallel.
            batch.validate = Validate::Json;
        }
        let topic = self.topic.as_str().into();
        batch.checkpoint.advance(&position(&topic, 0, self.number));
        self.tx
            .blocking_send(Ok(batch))
            .map_err(|_| std::io::Error::other("the pipeline stopped reading"))
    }

    /// One whole line, without its `\n`.
    fn line(&mut self, mut line: &[u8]) {
        self.number += 1;
        if self.number <= self.after {
            return;
        }
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.is_empty() {
            return;
        }
        if line.len() > self.max_record_bytes {
            self.reject_overlong(&line[..OVERLONG_KEPT.min(line.len())], line.len());
            return;
        }
        self.current
            .records
            .push_value(line, &self.topic, 0, self.number);
    }

    /// A line past `max_record_bytes`: rejected with its first bytes.
    fn overlong(&mut self, line: Overlong) {
        self.number += 1;
        if self.number <= self.after {
            return;
        }
        self.reject_overlong(&line.kept, line.length);
    }

    fn reject_overlong(&mut self, kept: &[u8], length: usize) {
        let reason = format!(
            "line {}:{} is {length} bytes, over `limits.max_record_bytes` ({}); the dead \
             letter keeps its first {} bytes",
            self.topic,
            self.number,
            self.max_record_bytes,
            kept.len()
        );
        self.reject(kept, reason);
    }

    fn reject(&mut self, bytes: &[u8], reason: String) {
        let at = position(&self.topic.as_str().into(), 0, self.number);
        self.current.rejected.push(Rejected {
            record: Record::new(bytes.to_vec(), at),
            reason,
        });
    }
}

#[async_trait]
impl Source for LineSource {
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        self.batches.recv().await.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `input` in reads of at most `step` bytes, as a pipe would.
    struct Trickle<'a> {
        input: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input = &self.input[n..];
            Ok(n)
        }
    }

    /// Lines read (number, bytes) and lines rejected (number, reason).
    type ReadOut = (Vec<(i64, Vec<u8>)>, Vec<(i64, String)>);

    fn read(input: &[u8], step: usize, max_record_bytes: usize) -> ReadOut {
        let (tx, mut rx) = mpsc::channel(1 << 16);
        let reader = LineReader {
            topic: "t".into(),
            format: LineFormat::Lines,
            batch: BatchConfig::default(),
            max_record_bytes,
            number: 0,
            after: 0,
            current: SourceBatch::default(),
            tx,
        };
        reader.run(Trickle { input, step });
        let (mut lines, mut rejected) = (Vec::new(), Vec::new());
        while let Ok(batch) = rx.try_recv() {
            let batch = batch.unwrap();
            for record in batch.records.iter() {
                lines.push((record.offset(), record.value().to_vec()));
            }
            for reject in batch.rejected {
                rejected.push((reject.record.source.offset, reject.reason));
            }
        }
        (lines, rejected)
    }

    #[test]
    fn lines_split_across_reads_keep_their_numbers_and_bytes() {
        let input = b"one\r\ntwo\n\nthree-is-longer\nlast";
        for step in [1, 2, 3, 7, 64] {
            let (lines, rejected) = read(input, step, 1024);
            let expected: Vec<(i64, Vec<u8>)> =
                [(1, "one"), (2, "two"), (4, "three-is-longer"), (5, "last")]
                    .map(|(n, l)| (n, l.as_bytes().to_vec()))
                    .into();
            assert_eq!(lines, expected, "reads of {step} bytes");
            assert!(rejected.is_empty());
        }
    }

    #[test]
    fn an_overlong_line_is_rejected_with_its_number_and_length_across_reads() {
        let mut input = b"ok\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nafter\n");
        for step in [1, 10, 1000] {
            let (lines, rejected) = read(&input, step, 20);
            assert_eq!(lines, [(1, b"ok".to_vec()), (3, b"after".to_vec())]);
            assert_eq!(rejected.len(), 1);
            assert_eq!(rejected[0].0, 2);
            assert!(rejected[0].1.contains("is 100 bytes"), "{}", rejected[0].1);
        }
    }
}
