//! The WebAssembly engine: the only module that names wasmtime types.
//!
//! One [`PluginEngine`] per process holds the wasmtime `Engine`, the linker
//! with the few host imports a plugin gets (log, counters, and a WASI with no
//! filesystem, network, environment or stdin: see `sandbox`), the on-disk
//! cache of compiled components, and the epoch ticker that enforces
//! deadlines. [`PluginEngine::load`] checks that a `.wasm` is a
//! `weir:plugin@0.1.0` transformer; [`LoadedPlugin::instantiate`] gives an
//! [`Instance`] with its own `Store`, memory budget and deadline, whose
//! [`Instance::process`] runs one packed batch.
//!
//! Whatever a plugin does, the host stays inside the [`Limits`]: one memory
//! budget for the whole instance, a wall-clock deadline per call that holds
//! through host calls (sleeps end at it), bounded logs and counters. A
//! plugin that breaks one is stopped with a [`PluginError`] naming the
//! limit; the instance is then unusable and the caller makes a new one.
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
mod instance;
mod limits;
mod sandbox;
mod scheduler;

use std::path::{Path, PathBuf};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wasmtime::component::{HasSelf, Linker, Resource, Val};
use wasmtime::{Config, Engine, OptLevel, StoreContextMut};

pub use cache::{CacheError, CompileCache};
pub use instance::{Instance, PluginError, PluginErrorKind};
pub use limits::{Limits, MemoryMeter, WasiGrants};
pub use scheduler::{Party, Scheduler, Usage, THREADS_VAR};

use instance::StoreState;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "transformer",
        // A host import can stop the plugin: a counter past its cap traps.
        imports: { default: trappable },
    });
}

/// The `aggregator` world; its host imports are the transformer's.
mod aggregator_bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "aggregator",
        imports: { default: trappable },
        with: { "weir:plugin/host": super::bindings::weir::plugin::host },
    });
}

/// A window aggregate's state for one key and window, as the plugin
/// encoded it: its encoding's version and bytes.
pub use aggregator_bindings::exports::weir::plugin::aggregate::State as AggregateState;

use aggregator_bindings::AggregatorPre;
use bindings::TransformerPre;

/// The `weir:plugin` version this host speaks.
pub const WIT_VERSION: &str = "0.1.0";
/// The export a transformer must have.
pub const TRANSFORM_EXPORT: &str = "weir:plugin/transform@0.1.0";
/// The export an aggregator must have.
pub const AGGREGATE_EXPORT: &str = "weir:plugin/aggregate@0.1.0";

/// What a plugin is: a record transform or a window aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum World {
    /// `weir:plugin/transformer`: exports `transform`.
    Transformer,
    /// `weir:plugin/aggregator`: exports `aggregate`.
    Aggregator,
}

impl World {
    fn export(self) -> &'static str {
        match self {
            World::Transformer => TRANSFORM_EXPORT,
            World::Aggregator => AGGREGATE_EXPORT,
        }
    }

    fn name(self) -> &'static str {
        match self {
            World::Transformer => "weir:plugin/transformer",
            World::Aggregator => "weir:plugin/aggregator",
        }
    }
}

/// How often the epoch ticks; a deadline is never shorter than asked and at
/// most one tick longer.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The monotonic clock interface of the WASI that wasmtime-wasi links; its
/// sleeps are replaced by ones that end at the call's deadline.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";
/// The wall clock interface of the same WASI.
const WALL_CLOCK: &str = "wasi:clocks/wall-clock@0.2.12";

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
         expected `{export}` (world `{world}`)",
        export = wanted.export(),
        world = wanted.name(),
    )]
    WrongWorld {
        path: PathBuf,
        exports: String,
        wanted: World,
    },
    #[error(
        "`{path}` is a {found} plugin, but a {wanted} is wanted here ({hint})",
        found = found.name(),
        wanted = wanted.name(),
        hint = match wanted {
            World::Transformer => "an aggregator goes in `[pipeline.window]` `aggregates`",
            World::Aggregator => "a transformer goes in `[[pipeline.plugin]]`",
        }
    )]
    OtherWorld {
        path: PathBuf,
        found: World,
        wanted: World,
    },
    #[error("`{path}` needs imports weir does not provide: {reason}")]
    Imports { path: PathBuf, reason: String },
}

/// Engine-wide settings.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Where compiled components are cached; `None` for the default
    /// (`$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir/components`, else
    /// `~/.cache/weir/components`; with none of them set, nothing is cached).
    pub cache_dir: Option<PathBuf>,
    /// How many threads run plugin batches; `None` for
    /// [`Scheduler::default_threads`].
    pub plugin_threads: Option<usize>,
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
    scheduler: Scheduler,
    /// Components loaded and linked, by content hash, while any instance
    /// or slot holds them: a thousand pipelines of one plugin share one
    /// copy of its compiled code, not a thousand.
    loaded: Mutex<LoadedMemo>,
}

/// Linked components by (content hash, world), held weakly.
type LoadedMemo = HashMap<([u8; 32], World), Weak<Pre>>;

impl PluginEngine {
    /// Builds the engine and starts its epoch ticker. Fails if the compile
    /// cache is not safe to load native code from (see [`CompileCache`]).
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
        link_granted_clocks(&mut linker)?;
        link_refused_capabilities(&mut linker)?;

        let cache = CompileCache::open(&engine, options.cache_dir)?;
        let threads = (options.plugin_threads).unwrap_or_else(Scheduler::default_threads);
        let inner = Arc::new(EngineInner {
            engine,
            linker,
            cache,
            scheduler: Scheduler::new(threads)?,
            loaded: Mutex::default(),
        });
        spawn_epoch_ticker(Arc::downgrade(&inner));
        Ok(PluginEngine { inner })
    }

    /// The compile cache.
    pub fn cache(&self) -> &CompileCache {
        &self.inner.cache
    }

    /// The threads that run plugin batches, shared between tenants.
    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    /// Loads `path`, compiling it (or reusing the cached compilation), and
    /// checks that it is a `weir:plugin` transformer this host can link.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.load_bytes(&bytes, path)
    }

    /// As [`PluginEngine::load`], for a component already in memory (an
    /// upload); `origin` names it in errors and logs.
    pub fn load_bytes(&self, bytes: &[u8], origin: &Path) -> Result<LoadedPlugin, LoadError> {
        self.load_world(bytes, origin, World::Transformer)
    }

    /// Loads `path` and checks that it is a `weir:plugin` aggregator.
    pub fn load_aggregate(&self, path: &Path) -> Result<LoadedPlugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.load_world(&bytes, path, World::Aggregator)
    }

    fn load_world(
        &self,
        bytes: &[u8],
        origin: &Path,
        wanted: World,
    ) -> Result<LoadedPlugin, LoadError> {
        let path = origin;
        let path_buf = || path.to_owned();
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(LoadError::CoreModule { path: path_buf() });
            }
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(LoadError::NotWasm { path: path_buf() }),
        }
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        let inner = &self.inner;
        let loaded = |pre| LoadedPlugin {
            engine: self.clone(),
            pre,
            path: path.to_owned(),
            hash,
        };
        if let Some(pre) = lock_loaded(&inner.loaded)
            .get(&(hash, wanted))
            .and_then(Weak::upgrade)
        {
            return Ok(loaded(pre));
        }
        let component = inner
            .cache
            .get_or_compile(&inner.engine, bytes, &hash)
            .map_err(|err| LoadError::Invalid {
                path: path_buf(),
                reason: format!("{err:#}"),
            })?;

        let ty = component.component_type();
        if ty.get_export(&inner.engine, wanted.export()).is_none() {
            let exports: Vec<&str> = ty.exports(&inner.engine).map(|(name, _)| name).collect();
            for other in [World::Transformer, World::Aggregator] {
                if other != wanted && exports.contains(&other.export()) {
                    return Err(LoadError::OtherWorld {
                        path: path_buf(),
                        found: other,
                        wanted,
                    });
                }
            }
            let prefix = wanted.export().split('@').next().unwrap_or_default();
            if let Some(found) = exports
                .iter()
                .find_map(|name| name.strip_prefix(prefix)?.strip_prefix('@'))
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
                wanted,
            });
        }
        let pre = inner
            .linker
            .instantiate_pre(&component)
            .map_err(|err| LoadError::Imports {
                path: path_buf(),
                reason: format!("{err:#}"),
            })?;
        let wrong = |err: wasmtime::Error| LoadError::WrongWorld {
            path: path_buf(),
            exports: format!("{err:#}"),
            wanted,
        };
        let pre = Arc::new(match wanted {
            World::Transformer => Pre::Transform(TransformerPre::new(pre).map_err(wrong)?),
            World::Aggregator => Pre::Aggregate(AggregatorPre::new(pre).map_err(wrong)?),
        });
        let mut memo = lock_loaded(&inner.loaded);
        memo.retain(|_, held| held.strong_count() > 0);
        memo.insert((hash, wanted), Arc::downgrade(&pre));
        drop(memo);
        Ok(loaded(pre))
    }
}

fn lock_loaded<T>(memo: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only inserts and lookups happen under it: never half-updated.
    memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The stop of a plugin that called `interface` to `what`, which it is not
/// granted (`grant`: the `limits.wasi` name that would).
fn not_granted(what: &'static str, interface: &'static str, grant: Option<&'static str>) -> wasmtime::Error {
    wasmtime::Error::new(instance::NotGranted {
        what,
        interface: interface.split('@').next().unwrap_or(interface),
        grant,
    })
}

/// Replaces the WASI clocks by ones that answer only when `limits.wasi`
/// grants them (see `WasiGrants`), and the sleeps (`subscribe-duration`,
/// `subscribe-instant`) by ones that also end at the current call's
/// deadline, so that no host call can hold a plugin past it: the epoch
/// check stops the plugin as soon as it runs again.
fn link_granted_clocks(linker: &mut Linker<StoreState>) -> anyhow::Result<()> {
    type Store<'a> = StoreContextMut<'a, StoreState>;
    let monotonic = |store: &Store<'_>, what| {
        if store.data().limits().wasi.monotonic_clock {
            Ok(())
        } else {
            Err(not_granted(what, MONOTONIC_CLOCK, Some("monotonic-clock")))
        }
    };
    let wall = move |store: &Store<'_>| {
        if store.data().limits().wasi.wall_clock {
            Ok(())
        } else {
            Err(not_granted("read the wall clock", WALL_CLOCK, Some("wall-clock")))
        }
    };
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("now", move |store: Store<'_>, (): ()| {
        monotonic(&store, "read the monotonic clock")?;
        Ok((sandbox::nanos_since(store.data().clock_start),))
    })?;
    clock.func_wrap("resolution", move |store: Store<'_>, (): ()| {
        monotonic(&store, "read the monotonic clock")?;
        Ok((1u64,))
    })?;
    clock.func_wrap(
        "subscribe-duration",
        move |mut store: Store<'_>, (nanos,): (u64,)| {
            monotonic(&store, "sleep")?;
            let sleep = store.data_mut().sleep(Duration::from_nanos(nanos));
            sleep.map(|pollable: Resource<_>| (pollable,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        move |mut store: Store<'_>, (when,): (u64,)| {
            monotonic(&store, "sleep")?;
            let state = store.data_mut();
            let now = sandbox::nanos_since(state.clock_start);
            let sleep = state.sleep(Duration::from_nanos(when.saturating_sub(now)));
            sleep.map(|pollable: Resource<_>| (pollable,))
        },
    )?;
    // A datetime record: seconds and nanoseconds since the Unix epoch.
    let datetime = |since: Duration| {
        Val::Record(vec![
            ("seconds".to_owned(), Val::U64(since.as_secs())),
            ("nanoseconds".to_owned(), Val::U32(since.subsec_nanos())),
        ])
    };
    let mut clock = linker.instance(WALL_CLOCK)?;
    clock.func_new("now", move |store, _, _, results| {
        wall(&store)?;
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        results[0] = datetime(since);
        Ok(())
    })?;
    clock.func_new("resolution", move |store, _, _, results| {
        wall(&store)?;
        results[0] = datetime(Duration::from_nanos(1));
        Ok(())
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The WASI functions through which a plugin would reach the network or
/// the filesystem, and what calling one is called in its error. Weir
/// grants neither (the WASI context has no preopened folder and no
/// network), so reaching for one is the plugin misbehaving: it is stopped
/// there with [`PluginErrorKind::NotGranted`], a fault like any other,
/// rather than handed an error it could retry in a loop or ignore.
const REFUSED: &[(&str, &str, &str)] = &[
    ("wasi:sockets/tcp-create-socket@0.2.12", "create-tcp-socket", "open a TCP socket"),
    ("wasi:sockets/udp-create-socket@0.2.12", "create-udp-socket", "open a UDP socket"),
    ("wasi:sockets/ip-name-lookup@0.2.12", "resolve-addresses", "resolve a host name"),
    ("wasi:filesystem/preopens@0.2.12", "get-directories", "open a file or folder"),
];

/// Replaces the functions of [`REFUSED`] by ones that stop the plugin.
fn link_refused_capabilities(linker: &mut Linker<StoreState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    for &(interface, function, what) in REFUSED {
        linker.instance(interface)?.func_new(function, move |_, _, _, _| {
            Err(not_granted(what, interface, None))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
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
    pre: Arc<Pre>,
    path: PathBuf,
    hash: [u8; 32],
}

/// A checked component, ready to instantiate as what it is.
#[derive(Clone)]
enum Pre {
    Transform(TransformerPre<StoreState>),
    Aggregate(AggregatorPre<StoreState>),
}

impl LoadedPlugin {
    /// The `.wasm` it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 of the `.wasm`: what identifies this version.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// A new instance with its own store and limits, initialised with
    /// `config` (a JSON object). `init` runs under the same deadline as a
    /// batch.
    pub fn instantiate(&self, limits: &Limits, config: &str) -> Result<Instance, PluginError> {
        let mut instance = self.describe(limits)?;
        instance.init(config)?;
        Ok(instance)
    }

    /// A new instance that has told its name and version but has not been
    /// initialised: for `weir plugin build` and diagnostics.
    pub fn describe(&self, limits: &Limits) -> Result<Instance, PluginError> {
        Instance::start(
            &self.engine.inner.engine,
            &self.pre,
            &self.path,
            self.hash,
            limits,
        )
    }
}
