//! One running plugin: its store (memory budget, deadline, captured stdio,
//! counters), the calls into it, and the errors that say which limit or
//! fault stopped it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, WasmBacktrace};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::aggregator_bindings::Aggregator;
use super::bindings::Transformer;
use super::bindings::weir::plugin::host::{Host, Level};
use super::limits::InstanceBudget;
use super::sandbox::{self, Captured, Drained, LogBudget};
use super::{AggregateState, Pre};
use super::{EPOCH_TICK, Limits};
use crate::metrics::PluginCounters;

/// Frames of a trap's wasm backtrace quoted in its error.
const BACKTRACE_FRAMES: usize = 12;

/// A plugin that failed while running; names the plugin and what it was doing.
#[derive(Debug, Clone, thiserror::Error)]
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
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginErrorKind {
    /// `init` returned an error: the plugin's own message.
    #[error("rejected its config: {0}")]
    ConfigRejected(String),
    /// The plugin ran past its deadline (in its code or in a host call).
    #[error("exceeded its deadline of {0:?} per call and was stopped")]
    Deadline(Duration),
    /// The plugin used more CPU time in one call than its budget.
    #[error(
        "used more than its {0:?} of CPU time per call (`limits.cpu_ms_per_batch`) and was stopped"
    )]
    CpuTime(Duration),
    /// The plugin asked for more memory than its budget, counting every
    /// memory and table of the instance.
    #[error(
        "exceeded its memory cap of {cap_mib} MiB (all its memories and tables together would \
         have held {wanted_mib} MiB) and was stopped"
    )]
    Memory {
        /// The cap.
        cap_mib: u64,
        /// What the instance would have held.
        wanted_mib: u64,
    },
    /// A host call broke a limit of `[pipeline.limits]`.
    #[error("broke `limits.{limit}`: {detail}")]
    HostLimit {
        /// The limit's key in `[pipeline.limits]`.
        limit: &'static str,
        /// What the plugin did.
        detail: String,
    },
    /// The plugin reached for a capability it is not granted: the network
    /// or the filesystem (never granted), or a clock `limits.wasi` does not
    /// grant.
    #[error(
        "tried to {what} (`{interface}`), which {} and was stopped",
        match grant {
            Some(name) => format!("this pipeline does not grant (`limits.wasi = [\"{name}\"]` would),"),
            None => "plugins are not granted,".to_owned(),
        }
    )]
    NotGranted {
        /// What it tried.
        what: &'static str,
        /// The WASI interface it called.
        interface: &'static str,
        /// The `limits.wasi` name that would grant it, if one does.
        grant: Option<&'static str>,
    },
    /// The plugin trapped (a panic, `unreachable`, out-of-bounds access...).
    #[error("trapped: {trap}{panic}")]
    Trap {
        /// The trap and a bounded wasm backtrace.
        trap: String,
        /// What the plugin wrote to stderr during the call (a panic message).
        panic: String,
    },
    /// The plugin's reply did not follow the packed layout.
    #[error("returned a malformed reply: {0}")]
    BadReply(String),
    /// The host failed to set up the instance.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

impl PluginErrorKind {
    /// Whether a fresh instance should be tried on the same input: a fault
    /// of the plugin's (trap, limit, deadline, bad reply), not a refusal of
    /// its config or a failure to set up.
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            PluginErrorKind::ConfigRejected(_) | PluginErrorKind::Instantiate(_)
        )
    }
}

/// A limit a host call broke; travels through wasmtime as the trap's error.
#[derive(Debug, thiserror::Error)]
#[error("limits.{limit}: {detail}")]
struct HostLimitHit {
    limit: &'static str,
    detail: String,
}

/// A capability a plugin reached for that it is not granted; travels
/// through wasmtime as the trap's error.
#[derive(Debug, thiserror::Error)]
#[error("tried to {what} (`{interface}`)")]
pub(super) struct NotGranted {
    pub(super) what: &'static str,
    pub(super) interface: &'static str,
    /// The `limits.wasi` name that would grant it, if one does.
    pub(super) grant: Option<&'static str>,
}

/// What each plugin store holds.
pub(super) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    budget: InstanceBudget,
    /// When the current call must end; `None` between calls.
    pub(super) deadline: Option<Instant>,
    /// Raised when a sleep was cut by the deadline: the call has failed even
    /// if the plugin goes on to return.
    pub(super) deadline_hit: Arc<AtomicBool>,
    /// The calling thread's CPU time when the current call started.
    cpu_started: Duration,
    /// Raised when the current call used up its CPU time.
    cpu_hit: bool,
    /// Zero of the plugin's monotonic clock.
    pub(super) clock_start: Instant,
    /// "name version", for log lines.
    plugin: String,
    limits: Limits,
    log_budget: LogBudget,
    /// Counters as of the last call that succeeded.
    counters: PluginCounters,
    /// Counter increments of the current call: kept only if it succeeds, so
    /// a batch that is replayed after a fault is not counted twice.
    pending: PluginCounters,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl StoreState {
    /// A pollable for a sleep of `duration`, cut at the current call's
    /// deadline.
    /// The limits the instance runs under.
    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(super) fn sleep(
        &mut self,
        duration: Duration,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        sandbox::bounded_sleep(&mut self.table, duration, self.deadline, &self.deadline_hit)
    }

    fn log_line(&mut self, level: Level, line: &str) {
        if !self.log_budget.allow() {
            return;
        }
        let line = sandbox::neutralise(&sandbox::truncate(line, self.limits.log_line_bytes));
        let plugin = self.plugin.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{line}"),
            Level::Debug => tracing::debug!(plugin, "{line}"),
            Level::Info => tracing::info!(plugin, "{line}"),
            Level::Warn => tracing::warn!(plugin, "{line}"),
            Level::Error => tracing::error!(plugin, "{line}"),
        }
    }

    /// Logs what the plugin wrote to stdout (info) and stderr (warn) during
    /// a call, and what the log budget dropped.
    #[inline]
    fn log_output(&mut self, drained: &Drained) {
        if !drained.is_empty() || self.log_budget.suppressed > 0 {
            self.log_drained(drained);
        }
    }

    fn log_drained(&mut self, drained: &Drained) {
        for (bytes, level) in [
            (&drained.stdout, Level::Info),
            (&drained.stderr, Level::Warn),
        ] {
            for line in String::from_utf8_lossy(bytes).lines() {
                if !line.trim().is_empty() {
                    self.log_line(level, line);
                }
            }
        }
        let suppressed = std::mem::take(&mut self.log_budget.suppressed);
        if suppressed > 0 || drained.dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                lines_dropped = suppressed,
                output_bytes_dropped = drained.dropped,
                per_second = self.limits.log_lines_per_s,
                "Plugin logs more than its limits allow; the excess was dropped."
            );
        }
    }
}

impl Host for StoreState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.log_line(level, &message);
        Ok(())
    }

    fn add_to_counter(&mut self, name: String, delta: u64) -> wasmtime::Result<()> {
        let cap = self.limits.counter_name_bytes;
        if name.len() > cap {
            return Err(wasmtime::Error::new(HostLimitHit {
                limit: "counter_name_bytes",
                detail: format!(
                    "a counter name of {} bytes, over the cap of {cap}: `{}`",
                    name.len(),
                    sandbox::neutralise(&sandbox::truncate(&name, 64))
                ),
            }));
        }
        let known = self.counters.contains(&name) || self.pending.contains(&name);
        if !known {
            let new_names = self
                .pending
                .iter()
                .filter(|(n, _)| !self.counters.contains(n))
                .count();
            if self.counters.len() + new_names >= self.limits.counters {
                return Err(wasmtime::Error::new(HostLimitHit {
                    limit: "counters",
                    detail: format!(
                        "counter `{}` would be one more than the {} distinct names allowed",
                        sandbox::neutralise(&name),
                        self.limits.counters
                    ),
                }));
            }
        }
        self.pending.add(&name, delta);
        Ok(())
    }
}

/// A running plugin: its own store, memory and deadline.
pub struct Instance {
    bindings: Option<Bindings>,
    store: Store<StoreState>,
    capture: Captured,
    name: String,
    version: String,
    deadline_ticks: u64,
}

/// The exports of a running plugin, by its world.
enum Bindings {
    Transform(Transformer),
    Aggregate(Aggregator),
}

impl Instance {
    /// Instantiates `pre` and asks it who it is, under `limits`.
    pub(super) fn start(
        engine: &Engine,
        pre: &Pre,
        path: &Path,
        hash: [u8; 32],
        limits: &Limits,
    ) -> Result<Self, PluginError> {
        let capture = Captured::default();
        let clock_start = Instant::now();
        let label = path.display().to_string();
        let state = StoreState {
            wasi: sandbox::wasi_ctx(&capture, clock_start, hash, limits.wasi),
            table: ResourceTable::new(),
            budget: InstanceBudget::new(limits.memory_bytes, limits.meter.clone()),
            deadline: None,
            deadline_hit: Arc::default(),
            cpu_started: Duration::ZERO,
            cpu_hit: false,
            clock_start,
            plugin: label.clone(),
            limits: limits.clone(),
            log_budget: LogBudget::new(limits.log_lines_per_s),
            counters: PluginCounters::default(),
            pending: PluginCounters::default(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.budget);
        match limits.cpu_per_call {
            // Checked at every epoch tick: the CPU time used, and the
            // deadline (the epoch deadline is one tick at a time).
            Some(budget) => store.epoch_deadline_callback(move |mut store| {
                let state = store.data_mut();
                if state.deadline.is_some_and(|end| Instant::now() >= end) {
                    return Ok(wasmtime::UpdateDeadline::Interrupt);
                }
                if thread_cpu_time().saturating_sub(state.cpu_started) >= budget {
                    state.cpu_hit = true;
                    return Ok(wasmtime::UpdateDeadline::Interrupt);
                }
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }),
            None => store.epoch_deadline_trap(),
        }
        // Never shorter than asked: the epoch may tick right after it is set.
        let tick = EPOCH_TICK.as_micros().max(1);
        let deadline_ticks = u64::try_from(limits.batch_deadline.as_micros().div_ceil(tick))
            .unwrap_or(u64::MAX / 2)
            + 1;
        let mut instance = Instance {
            bindings: None,
            store,
            capture,
            name: label,
            version: String::from("(unknown version)"),
            deadline_ticks,
        };
        arm(&mut instance.store, instance.deadline_ticks);
        let bindings = match pre {
            Pre::Transform(pre) => pre
                .instantiate(&mut instance.store)
                .map(Bindings::Transform),
            Pre::Aggregate(pre) => pre
                .instantiate(&mut instance.store)
                .map(Bindings::Aggregate),
        };
        let bindings = instance.finish_call("instantiate", bindings)?;
        arm(&mut instance.store, instance.deadline_ticks);
        let info = match &bindings {
            Bindings::Transform(b) => (b.weir_plugin_transform())
                .call_describe(&mut instance.store)
                .map(|info| (info.name, info.version)),
            Bindings::Aggregate(b) => (b.weir_plugin_aggregate())
                .call_describe(&mut instance.store)
                .map(|info| (info.name, info.version)),
        };
        (instance.name, instance.version) = instance.finish_call("describe", info)?;
        instance.store.data_mut().plugin = format!("{} {}", instance.name, instance.version);
        instance.bindings = Some(bindings);
        Ok(instance)
    }

    /// Calls `init` with the plugin's settings.
    pub(super) fn init(&mut self, config: &str) -> Result<(), PluginError> {
        let Some(bindings) = &self.bindings else {
            return Err(self.stopped("init"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = match bindings {
            Bindings::Transform(b) => b.weir_plugin_transform().call_init(&mut self.store, config),
            Bindings::Aggregate(b) => b.weir_plugin_aggregate().call_init(&mut self.store, config),
        };
        match self.finish_call("init", result)? {
            Ok(()) => Ok(()),
            Err(message) => Err(self.fail("init", PluginErrorKind::ConfigRejected(message))),
        }
    }

    /// The plugin's name, as it describes itself.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version, as it describes itself.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Counters the plugin has bumped through the host import, in calls
    /// that succeeded.
    pub fn counters(&self) -> &PluginCounters {
        &self.store.data().counters
    }

    /// Takes the counters of another instance of the same plugin (one that
    /// failed), so that a replacement goes on counting where it stopped.
    pub fn inherit_counters(&mut self, from: &Instance) {
        self.store.data_mut().counters = from.counters().clone();
    }

    /// Runs one packed batch and returns the packed reply. After an error the
    /// instance is unusable: make a new one.
    pub fn process(&mut self, batch: &[u8]) -> Result<Vec<u8>, PluginError> {
        let Some(Bindings::Transform(bindings)) = &self.bindings else {
            return Err(self.stopped("process"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = bindings
            .weir_plugin_transform()
            .call_process(&mut self.store, batch);
        let reply = self.finish_call("process", result)?;
        let state = self.store.data_mut();
        state.counters.absorb(&mut state.pending);
        Ok(reply)
    }

    /// An aggregator's state for a window with no record yet.
    pub fn create_state(&mut self) -> Result<AggregateState, PluginError> {
        let Some(Bindings::Aggregate(bindings)) = &self.bindings else {
            return Err(self.stopped("create-state"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = (bindings.weir_plugin_aggregate()).call_create_state(&mut self.store);
        self.finish_aggregate_call("create-state", result)
    }

    /// An aggregator folds the packed `batch` into `states` (entries),
    /// each record into the state `groups` names; gives the entries it
    /// returned (checked by the caller).
    pub fn accumulate(
        &mut self,
        states: &[u8],
        batch: &[u8],
        groups: &[u32],
    ) -> Result<Vec<u8>, PluginError> {
        let Some(Bindings::Aggregate(bindings)) = &self.bindings else {
            return Err(self.stopped("accumulate"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = (bindings.weir_plugin_aggregate()).call_accumulate(
            &mut self.store,
            states,
            batch,
            groups,
        );
        self.finish_aggregate_call("accumulate", result)
    }

    /// An aggregator merges `states` (entries) into one. The `Err` of the
    /// outer result stopped the instance; of the inner one, the plugin
    /// gave (the instance goes on).
    pub fn merge(&mut self, states: &[u8]) -> Result<Result<AggregateState, String>, PluginError> {
        let Some(Bindings::Aggregate(bindings)) = &self.bindings else {
            return Err(self.stopped("merge"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = (bindings.weir_plugin_aggregate()).call_merge(&mut self.store, states);
        self.finish_aggregate_call("merge", result)
    }

    /// An aggregator's results for `states` (entries): entries of JSON text.
    pub fn finish(&mut self, states: &[u8]) -> Result<Vec<u8>, PluginError> {
        let Some(Bindings::Aggregate(bindings)) = &self.bindings else {
            return Err(self.stopped("finish"));
        };
        arm(&mut self.store, self.deadline_ticks);
        let result = (bindings.weir_plugin_aggregate()).call_finish(&mut self.store, states);
        self.finish_aggregate_call("finish", result)
    }

    /// Ends an aggregator's call, keeping the counters it bumped.
    fn finish_aggregate_call<T>(
        &mut self,
        export: &'static str,
        result: wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let reply = self.finish_call(export, result)?;
        let state = self.store.data_mut();
        state.counters.absorb(&mut state.pending);
        Ok(reply)
    }

    /// The error of a call on an instance an earlier error stopped.
    fn stopped(&self, export: &'static str) -> PluginError {
        self.fail(
            export,
            PluginErrorKind::Instantiate("the instance was stopped by an earlier error".into()),
        )
    }

    /// Ends a call: logs its output, and turns a wasmtime error into the
    /// limit or fault it was (the instance is then stopped: its bindings
    /// are dropped).
    fn finish_call<T>(
        &mut self,
        export: &'static str,
        result: wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let drained = self.capture.drain();
        let state = self.store.data_mut();
        state.deadline = None;
        let cpu_hit = std::mem::take(&mut state.cpu_hit);
        if state.deadline_hit.swap(false, Ordering::Relaxed) {
            state.pending = PluginCounters::default();
            let deadline = state.limits.batch_deadline;
            self.bindings = None;
            return Err(self.fail(export, PluginErrorKind::Deadline(deadline)));
        }
        match result {
            Ok(value) => {
                state.log_output(&drained);
                Ok(value)
            }
            Err(err) => {
                state.pending = PluginCounters::default();
                self.bindings = None;
                Err(self.error(export, &err, &drained, cpu_hit))
            }
        }
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
    /// `cpu_hit`: the call used up its CPU time.
    fn error(
        &self,
        export: &'static str,
        err: &wasmtime::Error,
        drained: &Drained,
        cpu_hit: bool,
    ) -> PluginError {
        let state = self.store.data();
        let kind = if let Some(wanted) = state.budget.exceeded {
            PluginErrorKind::Memory {
                cap_mib: state.limits.memory_bytes >> 20,
                wanted_mib: wanted.div_ceil(1 << 20),
            }
        } else if let Some(hit) = err.downcast_ref::<HostLimitHit>() {
            PluginErrorKind::HostLimit {
                limit: hit.limit,
                detail: hit.detail.clone(),
            }
        } else if let Some(refused) = err.downcast_ref::<NotGranted>() {
            PluginErrorKind::NotGranted {
                what: refused.what,
                interface: refused.interface,
                grant: refused.grant,
            }
        } else if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            match state.limits.cpu_per_call.filter(|_| cpu_hit) {
                Some(budget) => PluginErrorKind::CpuTime(budget),
                None => PluginErrorKind::Deadline(state.limits.batch_deadline),
            }
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            let panic = drained.stderr_tail();
            PluginErrorKind::Trap {
                trap: describe_trap(trap, err.downcast_ref::<WasmBacktrace>()),
                panic: if panic.is_empty() {
                    String::new()
                } else {
                    format!("; plugin stderr: {panic}")
                },
            }
        } else if export == "instantiate" {
            PluginErrorKind::Instantiate(sandbox::neutralise(&format!("{err:#}")))
        } else {
            PluginErrorKind::Trap {
                trap: sandbox::neutralise(&format!("{err:#}")),
                panic: drained.stderr_tail(),
            }
        };
        self.fail(export, kind)
    }
}

/// Starts the clock of a call: the epoch deadline, and the deadline that
/// bounds the plugin's sleeps and waits in host calls. A free function so
/// that a call can hold the bindings while the store is armed.
fn arm(store: &mut Store<StoreState>, ticks: u64) {
    // With a CPU budget, the epoch callback looks every tick.
    let counts_cpu = store.data().limits.cpu_per_call.is_some();
    store.set_epoch_deadline(if counts_cpu { 1 } else { ticks });
    let state = store.data_mut();
    let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    state.deadline = Some(Instant::now() + EPOCH_TICK * ticks);
    state.cpu_hit = false;
    if counts_cpu {
        state.cpu_started = thread_cpu_time();
    }
}

/// CPU time the calling thread has used.
pub(super) fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let done = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if done != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The trap and where it happened in the plugin's own code: innermost frame
/// first, demangled, without the frames of Rust's panic machinery, bounded.
fn describe_trap(trap: &Trap, backtrace: Option<&WasmBacktrace>) -> String {
    let mut text = trap.to_string();
    let Some(backtrace) = backtrace else {
        return text;
    };
    let is_machinery = |name: &str| {
        name == "abort"
            || [
                "std::",
                "core::",
                "alloc::",
                "__rustc::",
                "rust_panic",
                "wit_bindgen::",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
    };
    let names: Vec<String> = backtrace
        .frames()
        .iter()
        .map(|frame| match frame.func_name() {
            Some(name) => format!("{:#}", rustc_demangle::demangle(name)),
            None => format!("func #{}", frame.func_index()),
        })
        .skip_while(|name| is_machinery(name))
        .collect();
    if !names.is_empty() {
        let shown: Vec<String> = names
            .iter()
            .take(BACKTRACE_FRAMES)
            .map(|name| sandbox::neutralise(&sandbox::truncate(name, 160)))
            .collect();
        text.push_str("; in ");
        text.push_str(&shown.join(" <- "));
        if names.len() > BACKTRACE_FRAMES {
            text.push_str(&format!(" <- … ({} more)", names.len() - BACKTRACE_FRAMES));
        }
    }
    text
}
