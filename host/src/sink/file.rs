//! The `file` sink: JSON lines appended to a file created (or truncated) at
//! start; `flush` writes and `fsync`s.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::{Sink, SinkError, encode};
use crate::config::RecordFormat;
use crate::record::Record;

/// Writes records to a file, one per line.
pub struct FileSink {
    path: PathBuf,
    file: tokio::fs::File,
    format: RecordFormat,
    buffer: Vec<u8>,
}

/// Bytes buffered before a write reaches the file.
const BUFFER: usize = 1 << 20;

impl FileSink {
    /// Creates (or truncates) `path`, and its parent folders.
    pub async fn create(path: &Path, format: RecordFormat) -> Result<Self, SinkError> {
        let describe = format!("file {:?}", path.display().to_string());
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| SinkError::io(&describe, e))?;
        }
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| SinkError::io(&describe, e))?;
        Ok(FileSink {
            path: path.to_owned(),
            file,
            format,
            buffer: Vec::with_capacity(BUFFER),
        })
    }

    async fn drain(&mut self) -> Result<(), SinkError> {
        if !self.buffer.is_empty() {
            let written = self.file.write_all(&self.buffer).await;
            written.map_err(|e| SinkError::io(&self.describe(), e))?;
            self.buffer.clear();
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for FileSink {
    fn describe(&self) -> String {
        format!("file {:?}", self.path.display().to_string())
    }

    async fn write(&mut self, records: &[Record]) -> Result<(), SinkError> {
        for record in records {
            encode(record, self.format, &mut self.buffer);
        }
        if self.buffer.len() >= BUFFER {
            self.drain().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        self.drain().await?;
        let synced = self.file.sync_data().await;
        synced.map_err(|e| SinkError::io(&self.describe(), e))
    }
}
