//! Plugins as a pipeline sees them: where each comes from (a `.wasm` or a
//! crate to build), its versions (by content hash), the file watch that
//! offers new ones, and the one place a version is replaced.
//!
//! A [`PluginSlot`] holds the running [`Instance`] of one chain position in
//! one lane. A new version is prepared in full first ([`SlotRecipe::start`]:
//! compile or cache, instantiate, `init`, one instance per lane), so a
//! refused one never reaches a lane; [`PluginSlot::install`] then switches
//! between two batches (see `pipeline::control`).

mod build;
mod store;
mod version;
pub mod watch;

use std::path::{Path, PathBuf};

use crate::config::{PluginConfig, PluginSource};
use crate::engine::{Instance, Limits, LoadError, LoadedPlugin, PluginEngine, PluginError};
use crate::pipeline::Stage;

pub use build::{BuildError, WASM_TARGET, build_crate};
pub use store::{VersionStore, file_hash};
pub use version::{PluginVersion, SHORT_HASH, VersionHistory, hex};

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

/// What a slot's instances are made with, whatever the version: for
/// preparing a candidate off the data path.
#[derive(Clone)]
pub struct SlotRecipe {
    /// The label from the pipeline file, if it gives one.
    name: Option<String>,
    topics: Vec<String>,
    /// Settings passed to `init`, as JSON.
    config: String,
    limits: Limits,
}

impl SlotRecipe {
    /// The recipe `config` describes, under `limits`.
    pub fn new(config: &PluginConfig, limits: &Limits) -> Self {
        SlotRecipe {
            name: config.name.clone(),
            topics: config.topics.clone(),
            config: config.config_json(),
            limits: limits.clone(),
        }
    }

    /// The source topics its plugin processes; all when empty.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// One initialised instance of `loaded`. Blocking: it runs `init`.
    pub fn instantiate(&self, loaded: &LoadedPlugin) -> Result<Instance, PluginError> {
        loaded.instantiate(&self.limits, &self.config)
    }

    /// `count` initialised instances of `loaded`: one per lane. Blocking:
    /// each runs `init`.
    pub fn start(&self, loaded: &LoadedPlugin, count: usize) -> Result<Candidate, PluginError> {
        let instances = (0..count.max(1))
            .map(|_| self.instantiate(loaded))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Candidate {
            version: PluginVersion::new(loaded.clone(), &instances[0]),
            instances,
        })
    }
}

/// A version ready to serve: checked, with an initialised instance per lane.
pub struct Candidate {
    /// The version.
    pub version: PluginVersion,
    /// One instance per lane, `init` done.
    pub instances: Vec<Instance>,
}

/// One position of a pipeline's plugin chain and the version running there.
pub struct PluginSlot {
    recipe: SlotRecipe,
    current: PluginVersion,
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
        let recipe = SlotRecipe::new(config, limits);
        let Candidate {
            version,
            mut instances,
        } = recipe.start(&loaded, 1)?;
        Ok(PluginSlot::with(recipe, version, instances.remove(0)))
    }

    /// A slot running `instance` of `version`.
    pub fn with(recipe: SlotRecipe, version: PluginVersion, instance: Instance) -> Self {
        PluginSlot {
            recipe,
            current: version,
            instance,
        }
    }

    /// What its instances are made with.
    pub fn recipe(&self) -> &SlotRecipe {
        &self.recipe
    }

    /// The version serving.
    pub fn current(&self) -> &PluginVersion {
        &self.current
    }

    /// The label from the pipeline file, else the plugin's own name.
    pub fn label(&self) -> &str {
        self.recipe.name.as_deref().unwrap_or(self.current.name())
    }

    /// Whether records of every source topic go through this plugin.
    pub fn takes_every_topic(&self) -> bool {
        self.recipe.topics.is_empty()
    }

    /// Whether records of source `topic` go through this plugin.
    pub fn takes_topic(&self, topic: &str) -> bool {
        self.takes_every_topic() || self.recipe.topics.iter().any(|t| t == topic)
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
        self.recipe.limits.clone()
    }

    /// Where a record this plugin failed is said to have failed.
    pub fn stage(&self) -> Stage {
        Stage::Plugin {
            name: self.name().to_owned(),
            version: self.version().to_owned(),
            hash: self.current.short_hash().to_owned(),
        }
    }

    /// Replaces the running instance, stopped by a fault, by a fresh one of
    /// the same version (~15 µs plus `init`), which goes on counting where
    /// the old one stopped.
    pub fn restart(&mut self) -> Result<(), PluginError> {
        let mut fresh = self.recipe.instantiate(self.current.loaded())?;
        fresh.inherit_counters(&self.instance);
        self.instance = fresh;
        Ok(())
    }

    /// The `.wasm` the running version came from.
    pub fn path(&self) -> &Path {
        self.current.loaded().path()
    }

    /// Serves `version` from now on, through `instance` (initialised), and
    /// gives back the instance it replaces, for the caller to drop off the
    /// data path (freeing its memory takes longer than the switch). Call
    /// between batches: records of one batch never mix versions.
    #[must_use = "the replaced instance is dropped wherever it goes"]
    pub fn install(&mut self, version: PluginVersion, instance: Instance) -> Instance {
        self.current = version;
        std::mem::replace(&mut self.instance, instance)
    }
}
