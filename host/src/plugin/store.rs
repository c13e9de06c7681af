//! Deployed versions kept on disk, so a restart comes back on what was
//! deployed rather than on the file the pipeline names: uploaded components
//! stored by content hash (`components/SHA256.wasm`), and `serving.json`
//! saying, per pipeline and plugin, which stored version serves and what
//! the named file held when it was deployed. A file changed since (a new
//! build) wins over the record: the operator's newest act is the one kept.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::hex;

/// The store under one folder.
#[derive(Debug, Clone)]
pub struct VersionStore {
    dir: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Serving {
    /// By `PIPELINE#PLUGIN`.
    plugins: BTreeMap<String, Deployed>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Deployed {
    /// The stored version that serves.
    hash: String,
    /// The SHA-256 of the plugin's named file when it was deployed.
    file_hash: Option<String>,
}

fn key(pipeline: &str, plugin: usize) -> String {
    format!("{pipeline}#{plugin}")
}

/// The SHA-256 of `path`'s content, in hex; `None` if it cannot be read.
pub fn file_hash(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|bytes| hex(&Sha256::digest(bytes)))
}

impl VersionStore {
    /// The store in `dir`, created if missing (private to this user).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("components"))?;
        Ok(VersionStore {
            dir: dir.to_owned(),
        })
    }

    fn component(&self, hash: &str) -> PathBuf {
        self.dir.join("components").join(format!("{hash}.wasm"))
    }

    /// Keeps `bytes` (whose SHA-256 is `hash`), written aside then renamed
    /// so a crash never leaves half a component under its name.
    pub fn put(&self, hash: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.component(hash);
        if path.exists() {
            return Ok(());
        }
        write_atomically(&path, bytes)
    }

    /// Whether version `hash` is stored.
    pub fn has(&self, hash: &str) -> bool {
        self.component(hash).is_file()
    }

    /// Records that `plugin` (from 1) of `pipeline` serves stored version
    /// `hash` while its named file holds `file_hash`; `None` forgets the
    /// record (the named file serves after a restart).
    pub fn record(
        &self,
        pipeline: &str,
        plugin: usize,
        serving: Option<(&str, Option<String>)>,
    ) -> std::io::Result<()> {
        let mut all = self.load();
        let key = key(pipeline, plugin);
        let before = match serving {
            Some((hash, file_hash)) => all.plugins.insert(
                key.clone(),
                Deployed {
                    hash: hash.to_owned(),
                    file_hash,
                },
            ),
            None => all.plugins.remove(&key),
        };
        if before.as_ref() == all.plugins.get(&key) {
            // Nothing changed: a swap between files' versions rewrites nothing.
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join("serving.json"), &text)
    }

    /// The stored component `plugin` (from 1) of `pipeline` should start
    /// on, if one was deployed and its named `file` has not changed since.
    pub fn deployed(&self, pipeline: &str, plugin: usize, file: &Path) -> Option<PathBuf> {
        let all = self.load();
        let deployed = all.plugins.get(&key(pipeline, plugin))?;
        if deployed.file_hash.is_some() && deployed.file_hash != file_hash(file) {
            tracing::info!(pipeline, plugin, file = %file.display(), "The plugin file changed after a version was deployed: starting on the file.");
            return None;
        }
        let path = self.component(&deployed.hash);
        path.is_file().then_some(path)
    }

    fn load(&self) -> Serving {
        let path = self.dir.join("serving.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                tracing::warn!(file = %path.display(), %err, "Unreadable record of deployed versions; starting on the pipeline file's.");
                Serving::default()
            }),
            Err(_) => Serving::default(),
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let aside = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&aside)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)
}
