//! The WebAssembly engine: the only module that names wasmtime types.
//!
//! One [`PluginEngine`] per process holds the wasmtime `Engine`, the linker
//! with the few host imports a plugin gets (log, counters, and a WASI with no
//! filesystem, network, environment or stdin), the on-disk cache of compiled
//! components, and the epoch ticker that enforces per-batch deadlines.
//! [`PluginEngine::load`] checks that a `.wasm` is a `weir:plugin@0.1.x`
//! transformer; [`LoadedPlugin::instantiate`] gives an [`Instance`] with its
//! own `Store`, memory cap and deadline, whose [`Instance::process`] runs one
//! packed batch.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use weir::engine::{EngineOptions, Limits, PluginEngine};
//! let engine = PluginEngine::new(EngineOptions::default())?;
//! let plugin = engine.load(std::path::Path::new("filter.wasm"))?;
//! let mut instance = plugin.instantiate(&Limits::default(), r#"{"field":"amount","min":10}"#)?;
//! let reply = instance.process(&weir_guest::testing::pack(&[]))?;
//! # Ok(()) }
//! ```

mod cache;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, OptLevel, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::metrics::PluginCounters;

pub use cache::CompileCache;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transformer",
    });
}

use bindings::TransformerPre;
use bindings::weir::plugin::host::{Host, Level};

/// The `weir:plugin` version this host speaks.
pub const WIT_VERSION: &str = "0.1.0";
/// The export a transformer must have.
pub const TRANSFORM_EXPORT: &str = "weir:plugin/transform@0.1.0";

/// How often the epoch ticks; deadlines are rounded up to it.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// What a plugin may write to stderr (panic messages) before writes fail.
const STDERR_CAPACITY: usize = 64 * 1024;

/// Why a `.wasm` could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a WebAssembly file (it does not start with the `\\0asm` magic bytes)")]
    NotWasm { path: PathBuf },
    #[error(
        "`{path}` is a core WebAssembly module, not a component: build the plugin for \
         `wasm32-wasip2` (`weir plugin build CRATE_DIR`)"
    )]
    CoreModule { path: PathBuf },
    #[error("`{path}` is not a valid WebAssembly component: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "`{path}` targets weir:plugin@{found}, but this weir speaks weir:plugin@{WIT_VERSION}: \
         rebuild the plugin against weir-guest {WIT_VERSION}"
    )]
    WrongVersion { path: PathBuf, found: String },
    #[error(
        "`{path}` is a component but not a weir plugin: it exports [{exports}], \
         expected `{TRANSFORM_EXPORT}` (world `weir:plugin/transformer`)"
    )]
    WrongWorld { path: PathBuf, exports: String },
    #[error("`{path}` needs imports weir does not provide: {reason}")]
    Imports { path: PathBuf, reason: String },
}

/// A plugin that failed while running; names the plugin and what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` {version}: {kind} (in `{export}`)")]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: String,
    /// The plugin's version.
    pub version: String,
    /// The export that was running.
    pub export: &'static str,
    /// What went wrong.
    pub kind: PluginErrorKind,
}

/// What went wrong inside a plugin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginErrorKind {
    /// `init` returned an error: the plugin's own message.
    #[error("rejected its config: {0}")]
    ConfigRejected(String),
    /// The plugin ran past its per-batch deadline.
    #[error("exceeded its deadline of {0:?} per batch and was stopped")]
    Deadline(Duration),
    /// The plugin asked for more memory than its cap.
    #[error(
        "exceeded its memory cap of {cap_mib} MiB (asked for {wanted_mib} MiB) and was stopped"
    )]
    Memory { cap_mib: u64, wanted_mib: u64 },
    /// The plugin trapped (a panic, `unreachable`, out-of-bounds access...).
    #[error("trapped: {trap}{panic}")]
    Trap { trap: String, panic: String },
    /// The plugin's reply did not follow the packed layout.
    #[error("returned a malformed reply: {0}")]
    BadReply(String),
    /// The host failed to set up the instance.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// Engine-wide settings.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Where compiled components are cached; `None` for the default
    /// (`$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir`, else `~/.cache/weir`).
    pub cache_dir: Option<PathBuf>,
}

/// Per-instance limits; each pipeline sets its own.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory cap, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock budget for one `process` call (one batch).
    pub batch_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            batch_deadline: Duration::from_secs(5),
        }
    }
}

/// The process-wide engine. Cheap to clone.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: CompileCache,
}

impl PluginEngine {
    /// Builds the engine and starts its epoch ticker.
    pub fn new(options: EngineOptions) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::weir::plugin::host::add_to_linker::<StoreState, HasSelf<StoreState>>(
            &mut linker,
            |state| state,
        )?;

        let cache = CompileCache::open(&engine, options.cache_dir)?;
        let inner = Arc::new(EngineInner {
            engine,
            linker,
            cache,
        });
        spawn_epoch_ticker(Arc::downgrade(&inner));
        Ok(PluginEngine { inner })
    }

    /// The compile cache.
    pub fn cache(&self) -> &CompileCache {
        &self.inner.cache
    }

    /// Loads `path`, compiling it (or reusing the cached compilation), and
    /// checks that it is a `weir:plugin` transformer this host can link.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let path_buf = || path.to_owned();
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(LoadError::CoreModule { path: path_buf() });
            }
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm { path: path_buf() }),
        }
        let inner = &self.inner;
        let component = inner
            .cache
            .get_or_compile(&inner.engine, &bytes)
            .map_err(|err| LoadError::Invalid {
                path: path_buf(),
                reason: format!("{err:#}"),
            })?;

        let ty = component.component_type();
        if ty.get_export(&inner.engine, TRANSFORM_EXPORT).is_none() {
            let exports: Vec<&str> = ty.exports(&inner.engine).map(|(name, _)| name).collect();
            if let Some(found) = exports
                .iter()
                .find_map(|name| name.strip_prefix("weir:plugin/transform@"))
            {
                return Err(LoadError::WrongVersion {
                    path: path_buf(),
                    found: found.to_owned(),
                });
            }
            return Err(LoadError::WrongWorld {
                path: path_buf(),
                exports: exports
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|err| LoadError::Imports {
                path: path_buf(),
                reason: format!("{err:#}"),
            })?;
        let pre = TransformerPre::new(pre).map_err(|err| LoadError::WrongWorld {
            path: path_buf(),
            exports: format!("{err:#}"),
        })?;
        Ok(LoadedPlugin {
            engine: self.clone(),
            pre,
            path: path.to_owned(),
        })
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is gone.
fn spawn_epoch_ticker(engine: Weak<EngineInner>) {
    std::thread::Builder::new()
        .name("weir-epoch".into())
        .spawn(move || {
            while let Some(inner) = engine.upgrade() {
                inner.engine.increment_epoch();
                drop(inner);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
        .unwrap_or_else(|err| tracing::error!(%err, "Could not start the epoch ticker; plugin deadlines are off"));
}

/// A compiled, checked plugin, ready to instantiate any number of times.
#[derive(Clone)]
pub struct LoadedPlugin {
    engine: PluginEngine,
    pre: TransformerPre<StoreState>,
    path: PathBuf,
}

impl LoadedPlugin {
    /// The `.wasm` it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new instance with its own store and limits, initialised with
    /// `config` (a JSON object).
    pub fn instantiate(&self, limits: &Limits, config: &str) -> Result<Instance, PluginError> {
        let mut instance = self.describe(limits)?;
        let Some(bindings) = &instance.bindings else {
            return Err(instance.fail("init", PluginErrorKind::Instantiate("no instance".into())));
        };
        instance.store.set_epoch_deadline(instance.deadline_ticks);
        match bindings
            .weir_plugin_transform()
            .call_init(&mut instance.store, config)
        {
            Ok(Ok(())) => Ok(instance),
            Ok(Err(message)) => {
                Err(instance.fail("init", PluginErrorKind::ConfigRejected(message)))
            }
            Err(err) => Err(instance.error("init", err)),
        }
    }

    /// A new instance that has told its name and version but has not been
    /// initialised: for `weir plugin build` and diagnostics.
    pub fn describe(&self, limits: &Limits) -> Result<Instance, PluginError> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = StoreState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                cap: limits.memory_bytes,
                exceeded: None,
            },
            plugin: self.path.display().to_string(),
            counters: PluginCounters::default(),
        };
        let mut store = Store::new(&self.engine.inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        let deadline_ticks = limits
            .batch_deadline
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis())
            .max(1) as u64;
        store.set_epoch_deadline(deadline_ticks);
        store.epoch_deadline_trap();

        let mut instance = Instance {
            bindings: None,
            store,
            stderr,
            name: self.path.display().to_string(),
            version: String::from("(unknown version)"),
            limits: limits.clone(),
            deadline_ticks,
        };
        let bindings = self
            .pre
            .instantiate(&mut instance.store)
            .map_err(|err| instance.error("instantiate", err))?;
        let info = bindings
            .weir_plugin_transform()
            .call_describe(&mut instance.store)
            .map_err(|err| instance.error("describe", err))?;
        instance.name = info.name;
        instance.version = info.version;
        instance.store.data_mut().plugin = format!("{} {}", instance.name, instance.version);
        instance.bindings = Some(bindings);
        Ok(instance)
    }
}

/// A running plugin: its own store, memory and deadline.
pub struct Instance {
    bindings: Option<bindings::Transformer>,
    store: Store<StoreState>,
    stderr: MemoryOutputPipe,
    name: String,
    version: String,
    limits: Limits,
    deadline_ticks: u64,
}

impl Instance {
    /// The plugin's name, as it describes itself.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version, as it describes itself.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Counters the plugin has bumped through the host import.
    pub fn counters(&self) -> &PluginCounters {
        &self.store.data().counters
    }

    /// Runs one packed batch and returns the packed reply. After an error the
    /// instance is unusable: make a new one.
    pub fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>, PluginError> {
        let Some(bindings) = &self.bindings else {
            return Err(self.fail(
                "process",
                PluginErrorKind::Instantiate("the instance was stopped by an earlier error".into()),
            ));
        };
        self.store.set_epoch_deadline(self.deadline_ticks);
        let result = bindings
            .weir_plugin_transform()
            .call_process(&mut self.store, batch);
        result.map_err(|err| {
            self.bindings = None;
            self.error("process", err)
        })
    }

    fn fail(&self, export: &'static str, kind: PluginErrorKind) -> PluginError {
        PluginError {
            plugin: self.name.clone(),
            version: self.version.clone(),
            export,
            kind,
        }
    }

    /// Turns a wasmtime error into the specific limit or trap it was.
    fn error(&self, export: &'static str, err: wasmtime::Error) -> PluginError {
        let kind = if let Some(wanted) = self.store.data().limiter.exceeded {
            PluginErrorKind::Memory {
                cap_mib: self.limits.memory_bytes >> 20,
                wanted_mib: wanted.div_ceil(1 << 20) as u64,
            }
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            if *trap == Trap::Interrupt {
                PluginErrorKind::Deadline(self.limits.batch_deadline)
            } else {
                let stderr = self.stderr.contents();
                let panic = String::from_utf8_lossy(&stderr);
                let panic = panic.trim();
                PluginErrorKind::Trap {
                    trap: format!("{err:#}")
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    panic: if panic.is_empty() {
                        String::new()
                    } else {
                        format!("; plugin stderr: {panic}")
                    },
                }
            }
        } else if export == "instantiate" {
            PluginErrorKind::Instantiate(format!("{err:#}"))
        } else {
            PluginErrorKind::Trap {
                trap: format!("{err:#}"),
                panic: String::new(),
            }
        };
        self.fail(export, kind)
    }
}

/// What each plugin store holds.
struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    /// "name version", for log lines.
    plugin: String,
    counters: PluginCounters,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host for StoreState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = self.plugin.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn add_to_counter(&mut self, name: String, delta: u64) {
        self.counters.add(&name, delta);
    }
}

/// Caps a store's linear memory and remembers when the cap was hit, so the
/// resulting trap can be reported as a memory limit.
struct MemoryCap {
    cap: u64,
    exceeded: Option<usize>,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.cap {
            self.exceeded = Some(desired);
            // Trap rather than fail the grow: a Rust guest would abort with
            // an opaque "memory allocation failed" instead.
            return Err(wasmtime::Error::msg("memory cap exceeded"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}
