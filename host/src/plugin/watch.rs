//! Watches a pipeline's plugin files and offers each new content to the
//! pipeline as a version to swap in: a `.wasm` rewritten in place, moved in
//! by an atomic rename, or rebuilt by `weir plugin build`.
//!
//! The folder is watched rather than the file, so a rename onto the path is
//! seen. Changes are taken once the file has been quiet for [`QUIET`]. A
//! file cut short (still being written) is not offered at all: it is looked
//! at again when it next changes. A complete file with the same content as
//! the last one offered is not offered again, so a broken version is
//! refused (and reported) once, not at every touch.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::pipeline::{PipelineHandle, Wasm};

/// How long a file must be left alone before it is read.
pub const QUIET: Duration = Duration::from_millis(20);

/// Starts watching the files in `watching` (one entry per plugin, `None`
/// for a plugin not watched) for `handle`'s pipeline. `None` when nothing
/// is watched, or the watch could not be set up (logged: the pipeline runs
/// on, without hot swap from files).
pub fn spawn(
    pipeline: &str,
    handle: &PipelineHandle,
    watching: &[Option<PathBuf>],
) -> Option<tokio::task::JoinHandle<()>> {
    let mut files: HashMap<PathBuf, Vec<usize>> = HashMap::new();
    for (index, path) in watching.iter().enumerate() {
        let Some(path) = path else { continue };
        match watched_name(path) {
            Ok(file) => files.entry(file).or_default().push(index),
            Err(err) => {
                tracing::warn!(pipeline, path = %path.display(), %err, "Cannot watch this plugin file; new versions must be deployed.");
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    let (events, changes) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events.send(event);
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            tracing::warn!(pipeline, %err, "Cannot watch plugin files; new versions must be deployed.");
            return None;
        }
    };
    let folders: HashSet<&Path> = files.keys().filter_map(|file| file.parent()).collect();
    for folder in folders {
        if let Err(err) = watcher.watch(folder, RecursiveMode::NonRecursive) {
            tracing::warn!(pipeline, folder = %folder.display(), %err, "Cannot watch this plugin folder; new versions must be deployed.");
        }
    }
    let status = handle.status();
    let last_offered = files
        .values()
        .flatten()
        .map(|&index| (index, status.plugins[index].serving.hash.clone()))
        .collect();
    let watch = FileWatch {
        handle: handle.clone(),
        files,
        last_offered,
    };
    Some(tokio::spawn(watch.run(watcher, changes)))
}

/// The absolute path of `file` as change events name it.
fn watched_name(file: &Path) -> std::io::Result<PathBuf> {
    let name = file
        .file_name()
        .ok_or_else(|| std::io::Error::other("it names no file"))?;
    let folder = match file.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    Ok(folder.canonicalize()?.join(name))
}

struct FileWatch {
    handle: PipelineHandle,
    /// Watched files, and the plugins (by index) each serves.
    files: HashMap<PathBuf, Vec<usize>>,
    /// Per plugin, the hash of the content last offered (or serving at
    /// the start).
    last_offered: HashMap<usize, String>,
}

impl FileWatch {
    async fn run(
        mut self,
        // Dropping it ends the watch.
        _watcher: notify::RecommendedWatcher,
        mut changes: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    ) {
        let mut changed: HashSet<PathBuf> = HashSet::new();
        while let Some(event) = changes.recv().await {
            if !self.note(event, &mut changed) {
                continue;
            }
            // Until the watched files have been quiet for a while (other
            // files of the folder may change all the time: a sink's output).
            let mut quiet_from = tokio::time::Instant::now() + QUIET;
            while let Ok(Some(event)) = tokio::time::timeout_at(quiet_from, changes.recv()).await {
                if self.note(event, &mut changed) {
                    quiet_from = tokio::time::Instant::now() + QUIET;
                }
            }
            for file in changed.drain() {
                self.offer(&file).await;
            }
        }
    }

    /// Notes the watched files `event` changed; whether there were any.
    fn note(&self, event: notify::Result<notify::Event>, changed: &mut HashSet<PathBuf>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(pipeline = %self.handle.name(), %err, "Plugin file watch error.");
                return false;
            }
        };
        if matches!(event.kind, EventKind::Access(_) | EventKind::Remove(_)) {
            return false;
        }
        let mut watched = false;
        for path in event.paths {
            if self.files.contains_key(&path) {
                changed.insert(path);
                watched = true;
            }
        }
        watched
    }

    /// Offers `file`'s content to every plugin it serves, if it is complete
    /// and new to that plugin.
    async fn offer(&mut self, file: &Path) {
        let pipeline = self.handle.name().to_owned();
        let bytes = match tokio::fs::read(file).await {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::debug!(pipeline, file = %file.display(), %err, "Plugin file changed but cannot be read (yet).");
                return;
            }
        };
        if let Err(cut) = complete(&bytes) {
            tracing::debug!(pipeline, file = %file.display(), %cut, "Plugin file is still being written; waiting for it to change again.");
            return;
        }
        let hash = super::hex(&Sha256::digest(&bytes));
        for &index in &self.files[file] {
            if self.last_offered.get(&index) == Some(&hash) {
                continue;
            }
            self.last_offered.insert(index, hash.clone());
            let wasm = Wasm::Bytes {
                bytes: bytes.clone(),
                origin: file.to_owned(),
            };
            // The controller logs the swap or the refusal with its reason.
            if let Ok(report) = self.handle.deploy(index + 1, wasm).await {
                tracing::debug!(pipeline, file = %file.display(), to = %report.to, "Watched plugin file served.");
            }
        }
    }
}

/// Whether `bytes` hold a whole WebAssembly binary: the preamble, then
/// sections each as long as it says, ending exactly at the end. A file cut
/// short while being written fails this; what it says is why.
pub fn complete(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(format!("{} bytes, no WebAssembly preamble", bytes.len()));
    }
    let mut at = 8;
    while at < bytes.len() {
        let section = at;
        at += 1;
        let mut size: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&byte) = bytes.get(at) else {
                return Err(format!(
                    "cut inside the header of the section at byte {section}"
                ));
            };
            at += 1;
            size |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
            if shift > 28 {
                // Not a cut: a malformed length, left for the loader to name.
                return Ok(());
            }
        }
        let remaining = (bytes.len() - at) as u64;
        if size > remaining {
            return Err(format!(
                "the section at byte {section} declares {size} bytes, {remaining} follow"
            ));
        }
        at += size as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn a_binary_cut_short_is_incomplete_and_a_whole_one_is_not() {
        // Preamble, a custom section of 5 bytes, a type section of 1.
        let whole = b"\0asm\x0d\0\x01\0\x00\x05\x01ab\x00\x00\x01\x01\x00".to_vec();
        assert_eq!(complete(&whole), Ok(()));
        for cut in 0..whole.len() {
            // Cuts at a section boundary leave a whole (shorter) binary.
            if [8, 15].contains(&cut) {
                assert_eq!(complete(&whole[..cut]), Ok(()));
            } else {
                assert!(complete(&whole[..cut]).is_err(), "cut at {cut}");
            }
        }
    }
}
