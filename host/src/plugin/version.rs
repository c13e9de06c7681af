//! Plugin versions: a version is the SHA-256 of its `.wasm`, with the name
//! and semver the plugin reports. A slot keeps its current version and a
//! few previous ones compiled and checked, so a rollback only instantiates.

use std::collections::VecDeque;
use std::fmt::Write as _;

use crate::engine::{Instance, LoadedPlugin};

/// Hex digits of the hash shown in logs, dead-letter headers and status.
pub const SHORT_HASH: usize = 12;

/// One version of a plugin, compiled and checked, ready to instantiate.
#[derive(Clone)]
pub struct PluginVersion {
    loaded: LoadedPlugin,
    hash: String,
    name: String,
    version: String,
}

impl PluginVersion {
    /// The version `loaded` is, as `instance` (one of its instances)
    /// describes itself.
    pub fn new(loaded: LoadedPlugin, instance: &Instance) -> Self {
        PluginVersion {
            hash: hex(loaded.hash()),
            loaded,
            name: instance.name().to_owned(),
            version: instance.version().to_owned(),
        }
    }

    /// The compiled plugin.
    pub fn loaded(&self) -> &LoadedPlugin {
        &self.loaded
    }

    /// The SHA-256 of its `.wasm`, in hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The first [`SHORT_HASH`] hex digits of its hash.
    pub fn short_hash(&self) -> &str {
        &self.hash[..SHORT_HASH]
    }

    /// The name it reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The semver it reports.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether `prefix` (at least 4 hex digits) starts its hash.
    pub fn matches(&self, prefix: &str) -> bool {
        prefix.len() >= 4 && self.hash.starts_with(&prefix.to_ascii_lowercase())
    }
}

impl std::fmt::Display for PluginVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.name, self.version, self.short_hash())
    }
}

/// The versions one slot has run, newest first: the current one and up to
/// `keep` before it.
pub struct VersionHistory {
    versions: VecDeque<PluginVersion>,
    keep: usize,
}

impl VersionHistory {
    /// A history that starts at `current` and keeps `keep` previous
    /// versions.
    pub fn new(current: PluginVersion, keep: usize) -> Self {
        VersionHistory {
            versions: VecDeque::from([current]),
            keep,
        }
    }

    /// The version serving now.
    pub fn current(&self) -> &PluginVersion {
        &self.versions[0]
    }

    /// The previous versions kept, newest first.
    pub fn previous(&self) -> impl Iterator<Item = &PluginVersion> {
        self.versions.iter().skip(1)
    }

    /// A kept version whose hash starts with `prefix`. `Err` when more than
    /// one does.
    pub fn find(&self, prefix: &str) -> Result<Option<&PluginVersion>, usize> {
        let mut found = self.versions.iter().filter(|v| v.matches(prefix));
        match (found.next(), found.count()) {
            (first, 0) => Ok(first),
            (_, more) => Err(more + 1),
        }
    }

    /// `version` serves now; the one before it becomes the newest previous
    /// one (a version already kept moves to the front instead of appearing
    /// twice), and the oldest beyond `keep` is forgotten.
    pub fn promote(&mut self, version: PluginVersion) {
        self.versions.retain(|kept| kept.hash != version.hash);
        self.versions.push_front(version);
        self.versions.truncate(self.keep + 1);
    }
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}
