//! The `file` sink: one record per line, appended (or, with `mode =
//! "truncate"`, written over); `flush` writes and `fsync`s. Appending is the
//! default when the source can replay (Kafka): a restarted worker keeps what
//! it wrote and committed before. A line torn by a crash is cut off at open:
//! its record was never committed, so it is written again.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::{Sink, SinkError, encode, refuse_line_breaks};
use crate::batch::{RecordRef, Records};
use crate::config::{FileMode, RecordFormat};

/// Writes records to a file, one per line.
pub struct FileSink {
    /// `file "PATH"`, for errors and dead-letter reasons.
    described: String,
    file: Arc<std::fs::File>,
    format: RecordFormat,
    /// Records encoded since the last write.
    buffer: Vec<u8>,
    /// The write under way, on a blocking thread, while the next records
    /// are encoded; it gives its buffer back.
    writing: Option<JoinHandle<(Vec<u8>, std::io::Result<()>)>>,
}

/// Bytes buffered before a write reaches the file. The buffers start empty
/// and grow to what the pipeline's rate needs (a thousand slow pipelines
/// in one worker must not hold a mebibyte each).
const BUFFER: usize = 1 << 20;

impl FileSink {
    /// Opens `path` (creating it and its parent folders) to append, or
    /// truncates it first.
    pub async fn open(
        path: &Path,
        format: RecordFormat,
        mode: FileMode,
    ) -> Result<Self, SinkError> {
        let describe = format!("file {:?}", path.display().to_string());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| SinkError::io(&describe, e))?;
        }
        let (path_owned, describe_owned) = (path.to_owned(), describe.clone());
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(mode == FileMode::Truncate)
                .open(&path_owned)?;
            let cut = cut_torn_line(&mut file)?;
            if cut > 0 {
                tracing::warn!(sink = %describe_owned, bytes = cut, "The file ended in a torn line (a crash mid-write); cut it off: its record is written again.");
            }
            file.seek(SeekFrom::End(0))?;
            Ok(file)
        })
        .await;
        let file = match opened {
            Ok(file) => file.map_err(|e| SinkError::io(&describe, e))?,
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        };
        Ok(FileSink {
            described: describe,
            file: Arc::new(file),
            format,
            buffer: Vec::new(),
            writing: None,
        })
    }

    /// Waits for the write under way, if any; its buffer becomes the spare.
    async fn written(&mut self) -> Result<Vec<u8>, SinkError> {
        let Some(writing) = self.writing.take() else {
            return Ok(Vec::new());
        };
        match writing.await {
            Ok((mut spare, result)) => {
                result.map_err(|e| SinkError::io(&self.described, e))?;
                spare.clear();
                Ok(spare)
            }
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }

    /// Starts writing what is buffered (after the write under way): the
    /// buffer moves to a blocking thread, not copied.
    async fn drain(&mut self) -> Result<(), SinkError> {
        let spare = self.written().await?;
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffer, spare);
        let file = self.file.clone();
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let result = (&*file).write_all(&full);
            (full, result)
        }));
        Ok(())
    }
}

#[async_trait]
impl Sink for FileSink {
    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError> {
        for record in records.iter() {
            encode(&record, self.format, &mut self.buffer);
        }
        if self.buffer.len() >= BUFFER {
            self.drain().await?;
        }
        Ok(())
    }

    fn refuses(&self, record: &RecordRef<'_>) -> Option<String> {
        refuse_line_breaks(record, self.format, &self.described)
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.drain().await?;
        self.buffer = self.written().await?;
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || file.sync_data()).await {
            Ok(synced) => synced.map_err(|e| SinkError::io(&self.described, e)),
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }
}

/// Whether a file sink could open `path`: it is not a folder, and the
/// deepest folder of it that exists is a folder this process may write in.
pub fn check(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("`{}` is a folder, not a file", path.display()));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|err| format!("cannot write `{}`: {err}", path.display()));
    }
    let mut folder = path.parent();
    while let Some(dir) = folder {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(format!(
                    "cannot create `{}`: `{}` is not a folder",
                    path.display(),
                    dir.display()
                ));
            }
            Ok(_) => {
                let c_path =
                    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
                        .map_err(|_| format!("`{}` holds a NUL byte", dir.display()))?;
                // SAFETY: a valid NUL-terminated path; access only reads it.
                let writable =
                    unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
                return if writable {
                    Ok(())
                } else {
                    Err(format!(
                        "cannot create `{}`: folder `{}` is not writable",
                        path.display(),
                        dir.display()
                    ))
                };
            }
            Err(_) => folder = dir.parent(),
        }
    }
    Ok(())
}

/// Truncates `file` after its last newline; returns how many bytes went.
fn cut_torn_line(file: &mut std::fs::File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(piece)?;
        if let Some(at) = piece.iter().rposition(|&b| b == b'\n') {
            end = start + at as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        file.set_len(end)?;
    }
    Ok(len - end)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_whole_lines_stay() {
        for (content, kept) in [
            (&b"a\nbb\ncc"[..], &b"a\nbb\n"[..]),
            (b"a\nbb\n", b"a\nbb\n"),
            (b"torn", b""),
            (b"", b""),
        ] {
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(content).unwrap();
            let cut = cut_torn_line(&mut file).unwrap();
            let mut now = Vec::new();
            file.seek(SeekFrom::Start(0)).unwrap();
            file.read_to_end(&mut now).unwrap();
            assert_eq!(now, kept);
            assert_eq!(cut as usize, content.len() - kept.len());
        }
    }
}
