//! A test kit for plugin authors: load a built `.wasm` into the real engine,
//! feed it records, and assert on what comes out; and, in [`windows`],
//! random out-of-order streams and a reference model to check a window
//! (with built-in or plugin aggregates) against.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use weir::testkit::{PluginHarness, TestRecord};
//! let wasm = PluginHarness::build(env!("CARGO_MANIFEST_DIR"))?;
//! let mut plugin = PluginHarness::load(&wasm, r#"{"field": "amount", "min": 10}"#)?;
//! let outcomes = plugin.process(&[TestRecord::new(r#"{"amount": 3}"#)])?;
//! assert!(outcomes[0].is_dropped());
//! # Ok(()) }
//! ```

pub mod windows;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::engine::{EngineOptions, Instance, Limits, PluginEngine, PluginError};
use crate::metrics::PluginCounters;

pub use weir_guest::testing::{TestOutcome, TestOutput, TestRecord};

/// A plugin running in the real engine, with the limits a pipeline would
/// give it.
pub struct PluginHarness {
    instance: Instance,
}

fn engine() -> anyhow::Result<&'static PluginEngine> {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine);
    }
    let engine = PluginEngine::new(EngineOptions::default())?;
    Ok(ENGINE.get_or_init(|| engine))
}

impl PluginHarness {
    /// Builds the plugin crate in `crate_dir` for `wasm32-wasip2` (as
    /// `weir plugin build` does) and returns its `.wasm`.
    pub fn build(crate_dir: impl AsRef<Path>) -> Result<PathBuf, crate::plugin::BuildError> {
        crate::plugin::build_crate(crate_dir.as_ref())
    }

    /// Loads `wasm` and calls its `init` with `config` (JSON), under the
    /// default limits.
    pub fn load(wasm: impl AsRef<Path>, config: &str) -> anyhow::Result<Self> {
        Self::load_with_limits(wasm, config, &Limits::default())
    }

    /// As [`PluginHarness::load`], with these limits.
    pub fn load_with_limits(
        wasm: impl AsRef<Path>,
        config: &str,
        limits: &Limits,
    ) -> anyhow::Result<Self> {
        let plugin = engine()?.load(wasm.as_ref())?;
        Ok(PluginHarness {
            instance: plugin.instantiate(limits, config)?,
        })
    }

    /// Runs `records` as one batch.
    pub fn process(&mut self, records: &[TestRecord]) -> Result<Vec<TestOutcome>, PluginError> {
        let reply = self.instance.process(&weir_guest::testing::pack(records))?;
        weir_guest::testing::unpack(&reply, records).map_err(|err| PluginError {
            plugin: self.instance.name().to_owned(),
            version: self.instance.version().to_owned(),
            export: "process",
            kind: crate::engine::PluginErrorKind::BadReply(err.to_string()),
        })
    }

    /// The plugin's name, as it describes itself.
    pub fn name(&self) -> &str {
        self.instance.name()
    }

    /// The plugin's version, as it describes itself.
    pub fn version(&self) -> &str {
        self.instance.version()
    }

    /// Counters the plugin bumped.
    pub fn counters(&self) -> &PluginCounters {
        self.instance.counters()
    }
}
