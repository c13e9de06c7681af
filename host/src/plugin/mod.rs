//! Plugins as a pipeline sees them: where each comes from (a `.wasm` or a
//! crate to build), which version is running, and the one place a version
//! is replaced.
//!
//! A [`PluginSlot`] holds the running [`Instance`] of one chain position.
//! The pipeline only calls it at batch boundaries, so records of one batch
//! never mix versions; [`PluginSlot::swap`] prepares the new version fully
//! (compile, instantiate, `init`) before replacing the old, and keeps the
//! old one when the new one is refused.

mod build;

use std::path::{Path, PathBuf};

use crate::config::{PluginConfig, PluginSource};
use crate::engine::{Instance, Limits, LoadError, LoadedPlugin, PluginEngine, PluginError};
use crate::pipeline::Stage;

pub use build::{BuildError, WASM_TARGET, build_crate};

/// Why a plugin of a pipeline could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Its crate did not build.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Its `.wasm` is not a weir plugin.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// It would not start (refused its config, trapped in `init`).
    #[error(transparent)]
    Start(#[from] PluginError),
}

/// Finds the `.wasm` of a plugin, building its crate first if it names one.
pub fn locate(source: &PluginSource) -> Result<PathBuf, BuildError> {
    match source {
        PluginSource::Wasm(path) => Ok(path.clone()),
        PluginSource::Crate(dir) => build_crate(dir),
    }
}

/// One position of a pipeline's plugin chain and the version running there.
pub struct PluginSlot {
    label: String,
    topics: Vec<String>,
    config: String,
    limits: Limits,
    loaded: LoadedPlugin,
    instance: Instance,
}

impl PluginSlot {
    /// Loads and starts the plugin `config` describes, from `wasm`.
    pub fn start(
        engine: &PluginEngine,
        wasm: &Path,
        config: &PluginConfig,
        limits: &Limits,
    ) -> Result<Self, SetupError> {
        let loaded = engine.load(wasm)?;
        let settings = config.config_json();
        let instance = loaded.instantiate(limits, &settings)?;
        Ok(PluginSlot {
            label: config
                .name
                .clone()
                .unwrap_or_else(|| instance.name().to_owned()),
            topics: config.topics.clone(),
            config: settings,
            limits: limits.clone(),
            loaded,
            instance,
        })
    }

    /// The label from the pipeline file, else the plugin's own name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether records of every source topic go through this plugin.
    pub fn takes_every_topic(&self) -> bool {
        self.topics.is_empty()
    }

    /// Whether records of source `topic` go through this plugin.
    pub fn takes_topic(&self, topic: &str) -> bool {
        self.topics.is_empty() || self.topics.iter().any(|t| t == topic)
    }

    /// The running instance.
    pub fn instance(&mut self) -> &mut Instance {
        &mut self.instance
    }

    /// The running plugin's name.
    pub fn name(&self) -> &str {
        self.instance.name()
    }

    /// The running plugin's version.
    pub fn version(&self) -> &str {
        self.instance.version()
    }

    /// The limits each of its instances runs under.
    pub fn limits(&self) -> Limits {
        self.limits.clone()
    }

    /// Where a record this plugin failed is said to have failed.
    pub fn stage(&self) -> Stage {
        Stage::Plugin {
            name: self.name().to_owned(),
            version: self.version().to_owned(),
        }
    }

    /// Replaces the running instance, stopped by a fault, by a fresh one of
    /// the same version (~15 µs plus `init`), which goes on counting where
    /// the old one stopped.
    pub fn restart(&mut self) -> Result<(), PluginError> {
        let mut fresh = self.loaded.instantiate(&self.limits, &self.config)?;
        fresh.inherit_counters(&self.instance);
        self.instance = fresh;
        Ok(())
    }

    /// The `.wasm` the running version came from.
    pub fn path(&self) -> &Path {
        self.loaded.path()
    }

    /// Replaces the running version with the one in `wasm`, with the same
    /// config and limits. Call between batches. On error the old version
    /// keeps running.
    pub fn swap(&mut self, engine: &PluginEngine, wasm: &Path) -> Result<(), SetupError> {
        let loaded = engine.load(wasm)?;
        let instance = loaded.instantiate(&self.limits, &self.config)?;
        tracing::info!(
            plugin = %self.label,
            from = %self.instance.version(),
            to = %instance.version(),
            "Plugin swapped at a batch boundary."
        );
        self.loaded = loaded;
        self.instance = instance;
        Ok(())
    }
}
