//! Wiring and delivery: a pipeline reads batches from its source, runs them
//! through its plugin chain on a blocking worker (never on the reactor),
//! routes the outputs to sinks and failures to the dead-letter sink, and
//! commits source positions once every sink has flushed.
//!
//! Guarantees:
//! - Order: records keep source order through the chain and into each sink.
//! - At-least-once: a position is committed only after every sink, the
//!   dead-letter sink included, has durably written all that derives from it.
//! - Nothing silent: every input is counted as sent, dropped (a plugin
//!   emitted nothing) or dead-lettered (malformed, failed, or routed where no
//!   sink listens), with the reason in its headers.
//! - Backpressure: stages are joined by bounded channels, so a slow sink
//!   slows the source instead of growing memory.
//! - Control: [`Pipeline::handle`] swaps plugin versions (in every lane at
//!   the same source batch), runs candidates on trial (a shadow beside the
//!   serving version, or a canary rolled back when it fails too much),
//!   pauses and resumes reading, and reports status (`control`, `trial`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use weir::{config::PipelineFile, engine::{EngineOptions, PluginEngine}, pipeline::Pipeline};
//! let file = PipelineFile::load("examples/quickstart.toml".as_ref())?;
//! let engine = PluginEngine::new(EngineOptions::default())?;
//! let pipeline = Pipeline::build(&file, &file.pipelines[0], &engine).await?;
//! let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! let summary = pipeline.run(shutdown).await?;
//! println!("{} records out", summary.records_out);
//! # Ok(()) }
//! ```

mod chain;
mod control;
pub mod dead_letter;
mod lanes;
mod trial;
mod windowing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::batch::{Batch, Records};
use crate::config::{
    ConfigError, FileMode, PipelineConfig, PipelineFile, RecordFormat, SinkConfig,
};
use crate::engine::{Limits, MemoryMeter, Party, PluginEngine, PluginError, Scheduler};
use crate::kafka::KafkaTransaction;
use crate::metrics::events::{
    BatchProcessed, BatchRead, Checkpointed, CommitDeferred, CommitFailed, CommitSuperseded,
    Committed, RecordsDeadLettered, RecordsSent,
};
use crate::metrics::{MetricsSnapshot, PipelineMetrics};
use crate::plugin::{PluginSlot, VersionStore, locate};
use crate::record::{DEFAULT_ROUTE, Record};
use crate::sink::{self, Sink, SinkDefaults, SinkError};
use crate::source::{self, Checkpoint, Commit, Committer, Source, SourceBatch, SourceError};
use crate::state::{Claims, PartitionState, Snapshot};
use crate::window::{PluginAggregate, ReadBatch, WindowSpec};
use control::{ControlledPipeline, Controller, InstallOrder, RunControl};
use lanes::{ChainStop, FanIn, FanOut, IN_FLIGHT, LaneRun, Processed, run_lane};
use windowing::WindowStage;

pub use chain::{Chain, ChainOutput};
pub use control::{
    ControlError, Counters, PipelineHandle, PipelineStatus, PluginStatus, RunState, SwapReport,
    VersionInfo, Wasm,
};
pub use dead_letter::{DeadLetter, Stage};
pub use trial::{CanaryReport, CanaryRule, Difference, ShadowReport, Verdict};

/// Why a pipeline could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Its config (or a plugin it names) is at fault.
    #[error(transparent)]
    Setup(#[from] ConfigError),
    /// The source failed.
    #[error("pipeline `{pipeline}`: {source}")]
    Source {
        /// The pipeline.
        pipeline: String,
        /// What failed.
        source: SourceError,
    },
    /// A plugin trapped, hit a limit or replied garbage.
    #[error("pipeline `{pipeline}`: {source}")]
    Plugin {
        /// The pipeline.
        pipeline: String,
        /// What failed.
        source: PluginError,
    },
    /// Its plugins faulted too often: it stopped reading.
    #[error("pipeline `{pipeline}`: {reason}")]
    Quarantined {
        /// The pipeline.
        pipeline: String,
        /// Why, with the last fault.
        reason: String,
    },
    /// A sink failed.
    #[error("pipeline `{pipeline}`: {source}")]
    Sink {
        /// The pipeline.
        pipeline: String,
        /// What failed.
        source: SinkError,
    },
}

/// Builds (if needed), loads and starts every plugin of `pipeline`, with its
/// config: a plugin that is not a weir component, or rejects its config, is
/// reported at the line of the pipeline file that names it. Blocking: it may
/// run cargo and compile.
pub fn prepare_chain(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    engine: &PluginEngine,
) -> Result<Chain, ConfigError> {
    let wasm = locate_plugins(file, pipeline)?;
    start_chain(file, pipeline, engine, &wasm, &MemoryMeter::default())
}

fn start_chain(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    engine: &PluginEngine,
    wasm: &[PathBuf],
    meter: &MemoryMeter,
) -> Result<Chain, ConfigError> {
    let limits_config = pipeline.limits();
    let mut chain = Chain::new(start_plugins(file, pipeline, engine, wasm, meter, true)?);
    chain.quarantine_after(
        limits_config.faults_before_quarantine,
        limits_config.fault_window(),
    );
    Ok(chain)
}

/// The `.wasm` of each plugin of `pipeline`, building crates first.
pub fn locate_plugins(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
) -> Result<Vec<PathBuf>, ConfigError> {
    (pipeline.plugins.iter().enumerate())
        .map(|(index, plugin)| {
            let (source, at) = plugin.source();
            locate(&source).map_err(|e| blame(file, pipeline, index, at, &e))
        })
        .collect()
}

fn blame(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    index: usize,
    at: usize,
    err: &dyn std::fmt::Display,
) -> ConfigError {
    file.error_at(
        at,
        format!(
            "pipeline `{}`, plugin #{}: {err}",
            pipeline.name.get_ref(),
            index + 1
        ),
    )
}

/// The window of `pipeline`, if it has one, with its plugin aggregates
/// started (crates built first).
pub fn prepare_window(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    engine: &PluginEngine,
    meter: &MemoryMeter,
) -> Result<Option<(WindowSpec, Vec<PluginAggregate>)>, ConfigError> {
    let Some(window) = &pipeline.window else {
        return Ok(None);
    };
    let at = window.span().start;
    let blame = |message: String| {
        let name = pipeline.name.get_ref();
        file.error_at(at, format!("pipeline `{name}`, window: {message}"))
    };
    // `PipelineFile::load` checked it at its line.
    let spec = window.get_ref().spec().map_err(&blame)?;
    let limits = Limits {
        meter: meter.clone(),
        ..pipeline.limits().to_limits()
    };
    let mut plugins = Vec::new();
    for aggregate in &spec.aggregates {
        let Some((source, config)) = &aggregate.plugin else {
            continue;
        };
        let name = &aggregate.name;
        let wasm = locate(source).map_err(|e| blame(format!("aggregate `{name}`: {e}")))?;
        let loaded = (engine.load_aggregate(&wasm))
            .map_err(|e| blame(format!("aggregate `{name}`: {e}")))?;
        // One instance per lane: the window's states are shared among them.
        let lanes = pipeline.lanes();
        let plugin = PluginAggregate::start(loaded, limits.clone(), config.clone(), lanes)
            .map_err(|e| blame(format!("aggregate `{name}`: {e}")))?;
        tracing::info!(
            pipeline = %pipeline.name.get_ref(),
            aggregate = %name,
            plugin = %plugin.label(),
            wasm = %wasm.display(),
            "Aggregate plugin loaded."
        );
        plugins.push(plugin);
    }
    Ok(Some((spec, plugins)))
}

/// The chains of `pipeline`'s lanes, each plugin started from `wasm`: the
/// first as [`prepare_chain`] makes it, the others with their own plugin
/// instances (compiled once).
fn prepare_lanes(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    engine: &PluginEngine,
    wasm: &[PathBuf],
    meter: &MemoryMeter,
) -> Result<Vec<Chain>, ConfigError> {
    let count = pipeline.lanes();
    let mut lanes = Vec::with_capacity(count);
    lanes.push(start_chain(file, pipeline, engine, wasm, meter)?);
    for _ in 1..count {
        let slots = start_plugins(file, pipeline, engine, wasm, meter, false)?;
        lanes.push(lanes[0].lane(slots));
    }
    Ok(lanes)
}

/// Starts one instance of each plugin of `pipeline`, from `wasm`, its
/// memory counted on `meter`, logging each when `log` is set.
fn start_plugins(
    file: &PipelineFile,
    pipeline: &PipelineConfig,
    engine: &PluginEngine,
    wasm: &[PathBuf],
    meter: &MemoryMeter,
    log: bool,
) -> Result<Vec<PluginSlot>, ConfigError> {
    let limits = Limits {
        meter: meter.clone(),
        ..pipeline.limits().to_limits()
    };
    let mut slots = Vec::with_capacity(pipeline.plugins.len());
    for ((index, plugin), wasm) in pipeline.plugins.iter().enumerate().zip(wasm) {
        let (_, at) = plugin.source();
        let slot = PluginSlot::start(engine, wasm, plugin, &limits)
            .map_err(|e| blame(file, pipeline, index, at, &e))?;
        if log {
            tracing::info!(
                pipeline = %pipeline.name.get_ref(),
                plugin = %slot.label(),
                version = %slot.current(),
                wasm = %wasm.display(),
                lanes = pipeline.lanes(),
                "Plugin loaded."
            );
        }
        slots.push(slot);
    }
    Ok(slots)
}

struct SinkEntry {
    sink: Box<dyn Sink>,
}

/// A pipeline ready to run.
pub struct Pipeline {
    name: String,
    source: Box<dyn Source>,
    lanes: Vec<Chain>,
    sinks: Vec<SinkEntry>,
    routes: HashMap<String, Vec<usize>>,
    dead_letter: Box<dyn Sink>,
    metrics: Arc<PipelineMetrics>,
    transaction: Option<Arc<KafkaTransaction>>,
    commit_interval: Duration,
    controller: Controller,
    handle: PipelineHandle,
    watching: Vec<Option<PathBuf>>,
    window: Option<WindowStage>,
    /// Where checkpoints are kept, if they are.
    keeper: Option<Keeper>,
    /// The positions its last checkpoint held (where the source resumed).
    resumed: Checkpoint,
    /// The source partitions this worker holds, when they are assigned.
    claims: Option<Arc<Claims>>,
    /// The plugin threads its lanes run on, and whom for.
    pool: (Scheduler, Party),
    /// Whether a quarantine pauses it for an operator (there is an admin
    /// API to lift it) rather than ending it.
    hold_quarantined: bool,
}

impl Pipeline {
    /// Prepares `pipeline` of `file`: plugins started, sinks opened, source
    /// opened.
    pub async fn build(
        file: &PipelineFile,
        pipeline: &PipelineConfig,
        engine: &PluginEngine,
    ) -> Result<Self, PipelineError> {
        let name = pipeline.name.get_ref().clone();
        let store = match file
            .admin
            .as_ref()
            .and_then(|admin| admin.state_dir.as_ref())
        {
            Some(dir) => Some(VersionStore::open(dir).map_err(|err| {
                PipelineError::Setup(file.error_at(
                    0,
                    format!("cannot open the state folder `{}`: {err}", dir.display()),
                ))
            })?),
            None => None,
        };
        let meter = MemoryMeter::default();
        let (lanes, named, window) = {
            // On a blocking worker: building may run cargo and compile.
            let (file, config, engine) = (file.clone(), pipeline.clone(), engine.clone());
            let (store, meter) = (store.clone(), meter.clone());
            let prepared = tokio::task::spawn_blocking(move || {
                let named = locate_plugins(&file, &config)?;
                // A version deployed through the admin API serves again.
                let wasm: Vec<PathBuf> = (named.iter().enumerate())
                    .map(|(index, path)| {
                        let name = config.name.get_ref();
                        (store.as_ref())
                            .and_then(|store| store.deployed(name, index + 1, path))
                            .unwrap_or_else(|| path.clone())
                    })
                    .collect();
                let lanes = prepare_lanes(&file, &config, &engine, &wasm, &meter)?;
                let window = prepare_window(&file, &config, &engine, &meter)?;
                Ok::<_, ConfigError>((lanes, named, window))
            });
            match prepared.await {
                Ok(prepared) => prepared?,
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            }
        };
        // A sink that cannot open is its config's fault: named at its line.
        let sink_error = |at: usize| {
            let name = &name;
            move |err: SinkError| {
                PipelineError::Setup(file.error_at(at, format!("pipeline `{name}`: {err}")))
            }
        };
        // What keeps checkpoints (a sink, or else the source's own
        // transactions), and the last one it kept: all of it, or (a source
        // whose partitions are assigned) each partition's as it is claimed.
        let source_config = pipeline.source.get_ref();
        let (keeper, claimer) =
            match (pipeline.sinks.iter()).position(|s| sink::keeps_checkpoints(s.get_ref())) {
                Some(at) => (
                    Some(Keeper::Sink(at)),
                    (source_config.assigns_partitions())
                        .then(|| sink::claimer(pipeline.sinks[at].get_ref(), &name))
                        .flatten(),
                ),
                None => match source::claimer(pipeline) {
                    Some(claimer) => (Some(Keeper::Transaction), Some(claimer)),
                    None => (None, None),
                },
            };
        let claims = claimer.map(Claims::new);
        let resume = match keeper {
            Some(_) if claims.is_some() => None,
            Some(Keeper::Sink(at)) => {
                let config = &pipeline.sinks[at];
                sink::last_checkpoint(config.get_ref(), &name)
                    .await
                    .map_err(sink_error(config.span().start))?
                    .and_then(|last| last.resume(pipeline.source.get_ref().can_replay()))
            }
            Some(Keeper::Transaction) | None => None,
        };
        if let Some(resume) = &resume {
            tracing::info!(
                pipeline = %name,
                partitions = resume.partitions.len(),
                window_state_bytes = (resume.partitions.iter())
                    .map(|p| p.window.as_ref().map_or(0, Vec::len))
                    .sum::<usize>(),
                "Resuming from the last checkpoint."
            );
        }
        let resume = resume.unwrap_or_default();
        let source::OpenSource {
            source,
            transaction,
        } = source::open(pipeline, &resume.positions(), claims.clone())
            .await
            .map_err(|source| PipelineError::Source {
                pipeline: name.clone(),
                source,
            })?;
        let outputs = SinkDefaults {
            pipeline: &name,
            format: RecordFormat::Value,
            file_mode: if pipeline.source.get_ref().can_replay() {
                FileMode::Append
            } else {
                FileMode::Truncate
            },
            transaction: transaction.as_deref(),
        };
        let mut sinks = Vec::new();
        let mut routes: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, spanned) in pipeline.sinks.iter().enumerate() {
            let config: &SinkConfig = spanned.get_ref();
            for route in config.routes() {
                routes.entry(route.clone()).or_default().push(index);
            }
            sinks.push(SinkEntry {
                sink: sink::build(config, &outputs)
                    .await
                    .map_err(sink_error(spanned.span().start))?,
            });
        }
        let dead_letter = match &pipeline.dead_letter {
            Some(config) => sink::build(
                config.get_ref(),
                &SinkDefaults {
                    format: RecordFormat::Envelope,
                    ..outputs
                },
            )
            .await
            .map_err(sink_error(config.span().start))?,
            None => sink::default_dead_letter(),
        };
        let metrics = Arc::new(PipelineMetrics::new(&name));
        let window = match window {
            Some((spec, plugins)) => {
                let mut stage = WindowStage::new(spec, plugins, source.backlog(), metrics.clone())
                    .claimed_by(claims.clone());
                for part in &resume.partitions {
                    let (Some(state), Some(config)) = (&part.window, &pipeline.window) else {
                        continue;
                    };
                    let position = &part.position;
                    let partition = (position.topic.clone(), position.partition);
                    stage.restore(partition, state).map_err(|err| {
                        PipelineError::Setup(file.error_at(
                            config.span().start,
                            format!(
                                "pipeline `{name}`, window of {} partition {}: {err}",
                                position.topic, position.partition
                            ),
                        ))
                    })?;
                }
                Some(stage)
            }
            None => None,
        };
        let watching: Vec<_> = (pipeline.plugins.iter().zip(&named))
            .map(|(config, path)| config.watch.then(|| path.clone()))
            .collect();
        let (controller, handle) = Controller::new(
            ControlledPipeline {
                name: &name,
                tenant: pipeline.tenant.as_ref().map(|t| t.get_ref().as_str()),
                engine,
                lanes: lanes.len(),
                slots: lanes[0].slots(),
                named,
                watching: &watching,
                keep_versions: pipeline.keep_versions,
                store,
                quarantine: lanes[0].quarantine(),
                memory: meter,
            },
            metrics.clone(),
        );
        Ok(Pipeline {
            window,
            metrics,
            controller,
            handle,
            watching,
            name,
            source,
            lanes,
            sinks,
            routes,
            dead_letter,
            transaction,
            keeper,
            resumed: resume.positions(),
            claims,
            commit_interval: Duration::from_millis(pipeline.commit_interval_ms),
            pool: (engine.scheduler().clone(), pipeline.party(file)),
            hold_quarantined: file.admin.is_some(),
        })
    }

    /// The pipeline's live counters.
    pub fn metrics(&self) -> Arc<PipelineMetrics> {
        self.metrics.clone()
    }

    /// A handle that swaps its plugin versions, pauses and resumes it, and
    /// reads its status, while it runs (and its status after).
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Runs until the source is drained (or `shutdown` turns true), then
    /// flushes every sink, commits, and returns the final counters.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future abandons records in flight
    /// without committing them. Use `shutdown` to stop cleanly.
    pub async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<MetricsSnapshot, PipelineError> {
        let Pipeline {
            name,
            source,
            lanes,
            sinks,
            routes,
            dead_letter,
            metrics,
            transaction,
            commit_interval,
            controller,
            handle,
            watching,
            window,
            keeper,
            resumed,
            claims,
            pool: (scheduler, party),
            hold_quarantined,
        } = self;
        let quarantine = lanes[0].quarantine();
        let mut quarantined = quarantine.watch();
        let (to_sinks, from_lanes) = mpsc::channel::<Processed>(IN_FLIGHT * lanes.len());
        let mut senders = Vec::with_capacity(lanes.len());
        let mut running = tokio::task::JoinSet::new();
        for chain in lanes {
            let (to_lane, orders) = mpsc::channel(IN_FLIGHT);
            senders.push(to_lane);
            let processed = to_sinks.clone();
            let reader = window.as_ref().map(WindowStage::reader);
            let run = LaneRun {
                pool: scheduler.clone(),
                party: party.clone(),
                hold: hold_quarantined,
            };
            running.spawn(run_lane(chain, reader, orders, processed, run));
        }
        drop(to_sinks);
        let mut fan_out = FanOut::new(senders, source.spread());
        // Ends at the first lane that stops with an error, or once all end.
        let mut processor = tokio::spawn(async move {
            while let Some(done) = running.join_next().await {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(stop)) => return Err(stop),
                    Err(panic) => std::panic::resume_unwind(panic.into_panic()),
                }
            }
            Ok(())
        });

        // Set once the source has no more records (not when it was stopped):
        // then, and only then, every open window fires.
        let drained = Arc::new(AtomicBool::new(false));
        let writer = SinkWriter {
            picks: vec![Vec::new(); sinks.len()],
            pipeline: name.clone(),
            sinks,
            routes,
            dead_letter,
            metrics: metrics.clone(),
            committer: source.committer(),
            commit_interval,
            transaction,
            unflushed_sent: 0,
            deferred: None,
            window,
            keeper,
            changed: false,
            handled: resumed,
            claims,
            finishing: false,
            drained: drained.clone(),
        };
        let mut writer = tokio::spawn(writer.run(from_lanes));
        let board = controller.board();
        let (
            control,
            RunControl {
                mut installs,
                mut paused,
            },
        ) = controller.start();
        let watcher = crate::plugin::watch::spawn(&name, &handle, &watching);
        let (reader, mut batches) = read_ahead(source);

        let stop = async move {
            if shutdown.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(stop);
        let mut source_result = Ok(());
        // A stage that ends early (a plugin trap, a sink error) ends the
        // loop at once, even while the source waits for records.
        let (mut processed, mut written) = (None, None);
        loop {
            let batch = tokio::select! {
                biased;
                () = &mut stop => {
                    tracing::info!(pipeline = %name, "Stopping: finishing the batches in flight.");
                    break;
                }
                done = &mut processor => {
                    processed = Some(done);
                    break;
                }
                done = &mut writer => {
                    written = Some(done);
                    break;
                }
                Some(order) = installs.recv() => {
                    let InstallOrder { slot, changes, done } = order;
                    if fan_out.install(slot, changes, done).await.is_err() {
                        break;
                    }
                    continue;
                }
                // Wakes the loop to look at the flag again.
                Ok(()) = paused.changed() => continue,
                Ok(()) = quarantined.changed() => {
                    if let Some(reason) = Controller::mark_quarantined(&board, &mut quarantined) {
                        tracing::error!(pipeline = %name, %reason, "Pipeline quarantined: it stopped reading until an operator resumes it or rolls it back.");
                    }
                    continue;
                }
                batch = batches.recv(), if !*paused.borrow() && quarantined.borrow().is_none() => batch,
            };
            match batch {
                Some(Ok(Some(batch))) if batch.is_empty() => {}
                Some(Ok(Some(batch))) => {
                    BatchRead {
                        records: batch.len() as u64,
                    }
                    .emit(&metrics);
                    if fan_out.send(batch).await.is_err() {
                        break;
                    }
                }
                Some(Ok(None)) | None => {
                    drained.store(true, Ordering::Release);
                    break;
                }
                Some(Err(err)) => {
                    source_result = Err(err);
                    break;
                }
            }
        }
        // No more swaps: the lanes are about to go.
        control.abort();
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        drop(batches);
        // The source lives until its last batch is written and committed.
        let _source = reader.finish().await;
        drop(fan_out);

        let processed = match processed {
            Some(done) => done,
            None => processor.await,
        };
        let written = match written {
            Some(done) => done,
            None => writer.await,
        };
        let still_quarantined = quarantine.watch().borrow().clone();
        let failed = failure(name, processed, written, source_result, still_quarantined);
        let (state, reason) = match &failed {
            None => (RunState::Stopped, None),
            Some(PipelineError::Quarantined { reason, .. }) => {
                (RunState::Quarantined, Some(reason.clone()))
            }
            Some(err) => (RunState::Failed, Some(err.to_string())),
        };
        Controller::finish(&board, state, reason);
        match failed {
            Some(err) => Err(err),
            None => Ok(metrics.snapshot()),
        }
    }
}

/// Why the run failed, from how its stages ended; `None` if it did not.
fn failure(
    name: String,
    processed: Result<Result<(), ChainStop>, tokio::task::JoinError>,
    written: Result<Result<(), SinkError>, tokio::task::JoinError>,
    source_result: Result<(), SourceError>,
    quarantined: Option<String>,
) -> Option<PipelineError> {
    let pipeline = name;
    let sink_failed = match written {
        Ok(Err(source)) => Some(source),
        Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        Ok(Ok(())) => None,
    };
    // The plugin's error explains a closed channel better than the sink's,
    // and a sink's error better than the quarantine it cut short.
    match (processed, sink_failed) {
        (Err(panic), _) => std::panic::resume_unwind(panic.into_panic()),
        (Ok(Err(ChainStop::Plugin(source))), _) => Some(PipelineError::Plugin { pipeline, source }),
        (_, Some(source)) => Some(PipelineError::Sink { pipeline, source }),
        (Ok(Err(ChainStop::Quarantined(reason))), None) => {
            tracing::error!(pipeline = %pipeline, %reason, "Pipeline quarantined: it stopped reading.");
            Some(PipelineError::Quarantined { pipeline, reason })
        }
        // Stopped while quarantined, waiting for an operator.
        (Ok(Ok(())), None) if quarantined.is_some() => Some(PipelineError::Quarantined {
            pipeline,
            reason: quarantined.unwrap_or_default(),
        }),
        (Ok(Ok(())), None) => source_result
            .err()
            .map(|source| PipelineError::Source { pipeline, source }),
    }
}

/// Reads `source` on its own task, one batch ahead, so that the run loop
/// can wait for a batch and for control orders at once: a channel receive
/// is cancel safe, `next_batch` is not.
fn read_ahead(
    mut source: Box<dyn Source>,
) -> (
    SourceReader,
    mpsc::Receiver<Result<Option<SourceBatch>, SourceError>>,
) {
    let (to_loop, batches) = mpsc::channel(1);
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = &mut stopped => break,
                next = source.next_batch() => next,
            };
            let last = !matches!(next, Ok(Some(_)));
            if to_loop.send(next).await.is_err() || last {
                break;
            }
        }
        source
    });
    (SourceReader { stop, task }, batches)
}

/// The task [`read_ahead`] started.
struct SourceReader {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Box<dyn Source>>,
}

impl SourceReader {
    /// Stops reading (a batch being read is abandoned, uncommitted) and
    /// gives the source back.
    async fn finish(self) -> Option<Box<dyn Source>> {
        drop(self.stop);
        match self.task.await {
            Ok(source) => Some(source),
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => None,
        }
    }
}

/// Where a pipeline's checkpoints are kept (see [`crate::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keeper {
    /// A sink, by its place, in its own transaction with its writes.
    Sink(usize),
    /// The exactly-once Kafka transaction, with the outputs and offsets
    /// (window state in a changelog topic, see [`crate::kafka::changelog`]).
    Transaction,
}

fn transaction_failed(err: impl std::fmt::Display) -> SinkError {
    SinkError::Io {
        sink: "kafka transaction".into(),
        source: std::io::Error::other(err.to_string()),
    }
}

/// How often a window looks at the clock when no record comes.
const WINDOW_TICK: Duration = Duration::from_millis(200);

/// Writes processed batches to sinks and hands checkpoints back once all
/// sinks have flushed.
struct SinkWriter {
    pipeline: String,
    sinks: Vec<SinkEntry>,
    routes: HashMap<String, Vec<usize>>,
    dead_letter: Box<dyn Sink>,
    metrics: Arc<PipelineMetrics>,
    committer: Arc<dyn Committer>,
    commit_interval: Duration,
    /// Exactly-once: commits outputs and offsets together instead of the
    /// source committing.
    transaction: Option<Arc<KafkaTransaction>>,
    /// Records written but not yet flushed: counted out once every sink
    /// has them durably (a write that only reached a buffer is not out).
    unflushed_sent: u64,
    /// Positions whose commit the cluster could not take yet.
    deferred: Option<Checkpoint>,
    /// Per sink, the records of the batch being written that it takes;
    /// kept from batch to batch.
    picks: Vec<Vec<u32>>,
    /// The pipeline's window, if it has one.
    window: Option<WindowStage>,
    /// Where checkpoints are kept: each commit is then a checkpoint
    /// (positions and window state) in its transaction.
    keeper: Option<Keeper>,
    /// Something was written since the last commit.
    changed: bool,
    /// With a keeper of checkpoints: every position handled so far (a
    /// checkpoint holds each partition's).
    handled: Checkpoint,
    /// The source partitions this worker holds, when they are assigned: a
    /// checkpoint holds only those.
    claims: Option<Arc<Claims>>,
    /// The last commit is under way, and the source ended.
    finishing: bool,
    /// The source had no more records.
    drained: Arc<AtomicBool>,
}

impl SinkWriter {
    async fn run(mut self, batches: mpsc::Receiver<Processed>) -> Result<(), SinkError> {
        let result = self.write_all(batches).await;
        if result.is_err() {
            match &self.transaction {
                Some(transaction) => {
                    let transaction = transaction.clone();
                    let _ = tokio::task::spawn_blocking(move || transaction.abort()).await;
                }
                // One sink failing (a closed stdout) does not take what the
                // others were given with it: it is flushed, not committed.
                None => self.flush_sinks_after_failure().await,
            }
        }
        result
    }

    async fn flush_sinks_after_failure(&mut self) {
        // Not the keeper of checkpoints: what it holds commits only with
        // its checkpoint, or it would be written again after a restart.
        let keeper = self.keeper;
        let sinks = (self.sinks.iter_mut().enumerate())
            .filter(|(at, _)| keeper != Some(Keeper::Sink(*at)))
            .map(|(_, entry)| &mut entry.sink);
        for sink in sinks.chain(std::iter::once(&mut self.dead_letter)) {
            if let Err(err) = sink.flush().await {
                tracing::debug!(pipeline = %self.pipeline, %err, "Flush after a sink failure failed too.");
            }
        }
    }

    async fn write_all(&mut self, mut batches: mpsc::Receiver<Processed>) -> Result<(), SinkError> {
        let mut pending: Option<Checkpoint> = None;
        let mut fan_in = FanIn::new();
        // Commits at least every interval while records flow, and once more
        // when they stop, so an idle pipeline does not sit on uncommitted
        // positions.
        let mut tick = tokio::time::interval(self.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Idle partitions stop holding a window's watermark back even while
        // no record comes.
        let mut window_tick = tokio::time::interval(WINDOW_TICK);
        window_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                part = batches.recv() => {
                    let Some(part) = part else { break };
                    fan_in.push(part);
                    while let Some(parts) = fan_in.pop_ready() {
                        for part in parts {
                            let counts = BatchProcessed {
                                dropped: part.dropped,
                                faults: part.faults,
                            };
                            self.write(part.records, part.read, part.dead, counts).await?;
                            let Some(done) = part.checkpoint else { continue };
                            let checkpoint = pending.get_or_insert_with(Checkpoint::default);
                            for position in &done.positions {
                                checkpoint.advance(position);
                            }
                        }
                    }
                    if let Some(Keeper::Sink(at)) = self.keeper
                        && self.sinks[at].sink.wants_commit()
                    {
                        self.commit(pending.take()).await?;
                    }
                }
                _ = tick.tick() => {
                    // With a window, closing one may let a commit go further.
                    if pending.is_some() || self.window.is_some() || self.changed {
                        self.commit(pending.take()).await?;
                    }
                }
                _ = window_tick.tick(), if self.window.is_some() => {
                    if let Some(window) = &mut self.window {
                        let mut dead = Vec::new();
                        let results = window.tick(&mut dead);
                        if !results.is_empty() || !dead.is_empty() {
                            self.write_out(results, dead).await?;
                        }
                    }
                }
            }
        }
        // Everything is written: the last commit says whether the source
        // ended (rather than was stopped).
        self.finishing = self.drained.load(Ordering::Acquire);
        if self.finishing
            && let Some(window) = &mut self.window
        {
            let mut dead = Vec::new();
            let results = window.finish(&mut dead);
            self.write_out(results, dead).await?;
        }
        self.commit(pending.take()).await?;
        if self.deferred.is_some() {
            tracing::warn!(pipeline = %self.pipeline, "The last source positions could not be committed before stopping; their records will be read again.");
        }
        Ok(())
    }

    /// Writes a processed part (`read`: what the window read of it).
    async fn write(
        &mut self,
        records: Batch,
        read: Option<ReadBatch>,
        mut dead: Vec<DeadLetter>,
        counts: BatchProcessed,
    ) -> Result<(), SinkError> {
        let records = match &mut self.window {
            Some(window) => window.apply(records, read, &mut dead),
            None => records,
        };
        self.write_out(records, dead).await?;
        counts.emit(&self.metrics);
        Ok(())
    }

    /// Writes `records` to the sinks their routes name, and `dead` (with
    /// any record no sink takes) to the dead-letter sink.
    async fn write_out(
        &mut self,
        records: Batch,
        mut dead: Vec<DeadLetter>,
    ) -> Result<(), SinkError> {
        // Each route name of the batch resolves to its sinks once.
        let targets: Vec<Option<&Vec<usize>>> = std::iter::once(DEFAULT_ROUTE)
            .chain(records.routes().iter().map(|route| &**route))
            .map(|route| self.routes.get(route))
            .collect();
        let picks = &mut self.picks;
        picks.iter_mut().for_each(Vec::clear);
        let mut sent = 0;
        for at in 0..records.len() {
            let record = records.get(at);
            let Some(sinks) = targets[records.route_of(at)] else {
                dead.push(DeadLetter {
                    reason: format!("no sink takes route `{}`", record.route_name()),
                    record: record.to_record(),
                    stage: Stage::Route,
                });
                continue;
            };
            // Each sink that takes the route gets the record; a sink that
            // cannot hold it as it is has that copy dead-lettered.
            let mut taken = false;
            for &sink in sinks {
                match self.sinks[sink].sink.refuses(&record) {
                    Some(reason) => dead.push(DeadLetter {
                        reason,
                        record: record.to_record(),
                        stage: Stage::Sink,
                    }),
                    None => {
                        picks[sink].push(at as u32);
                        taken = true;
                    }
                }
            }
            sent += u64::from(taken);
        }
        for (entry, picked) in self.sinks.iter_mut().zip(picks.iter()) {
            if picked.len() == records.len() {
                entry.sink.write(Records::all(&records)).await?;
            } else if !picked.is_empty() {
                entry.sink.write(Records::picked(&records, picked)).await?;
            }
        }
        if let Some(first) = dead.first() {
            let first_reason = first.reason.clone();
            let count = dead.len() as u64;
            let dead: Vec<Record> = dead
                .into_iter()
                .map(|d| d.into_record(&self.pipeline))
                .collect();
            let dead = Batch::from(&dead[..]);
            self.dead_letter.write(Records::all(&dead)).await?;
            RecordsDeadLettered {
                count,
                first_reason: &first_reason,
            }
            .emit(&self.metrics);
        }
        self.unflushed_sent += sent;
        self.changed = true;
        Ok(())
    }

    /// Exactly-once: the open transaction, once it is checked that no
    /// partition was taken away before its batches committed. An error
    /// (here or committing) ends the writer, which aborts the transaction.
    fn transaction_to_commit(&self) -> Result<Option<Arc<KafkaTransaction>>, SinkError> {
        let Some(transaction) = &self.transaction else {
            return Ok(None);
        };
        self.committer.verify().map_err(transaction_failed)?;
        Ok(Some(transaction.clone()))
    }

    fn count_sent(&mut self) {
        RecordsSent {
            count: std::mem::take(&mut self.unflushed_sent),
        }
        .emit(&self.metrics);
    }

    /// Commits, timing the pause when there was something to commit.
    async fn commit(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), SinkError> {
        let busy = checkpoint.is_some() || self.changed;
        let started = std::time::Instant::now();
        self.commit_now(checkpoint).await?;
        if busy {
            Committed {
                pause: started.elapsed(),
            }
            .emit(&self.metrics);
        }
        Ok(())
    }

    async fn commit_now(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), SinkError> {
        for (at, entry) in self.sinks.iter_mut().enumerate() {
            if self.keeper != Some(Keeper::Sink(at)) {
                entry.sink.flush().await?;
            }
        }
        self.dead_letter.flush().await?;
        let checkpoint = match (self.keeper, &mut self.window) {
            // A checkpoint: the positions with the state that reflects
            // them, in the keeper's transaction with its writes.
            (Some(keeper), window) => {
                if keeper == Keeper::Transaction && checkpoint.is_none() && !self.changed {
                    // Nothing new: no empty transaction.
                    return Ok(());
                }
                for position in checkpoint.iter().flat_map(|c| &c.positions) {
                    self.handled.advance(position);
                }
                if let Some(claims) = &self.claims {
                    // Partitions given up are the next owner's to write.
                    (self.handled.positions).retain(|p| claims.owns(&p.topic, p.partition));
                    if let Some(window) = window.as_mut() {
                        window.forget_unowned();
                    }
                }
                let imaging = std::time::Instant::now();
                let mut windows: HashMap<_, _> = window
                    .as_mut()
                    .map(|w| w.snapshot())
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let imaging = imaging.elapsed();
                let partitions = (self.handled.positions.iter())
                    .map(|position| PartitionState {
                        window: windows.remove(&(position.topic.clone(), position.partition)),
                        position: position.clone(),
                    })
                    .collect();
                let snapshot = Snapshot {
                    partitions,
                    finished: self.finishing,
                };
                let state_bytes = (snapshot.partitions.iter())
                    .map(|p| p.window.as_ref().map_or(0, Vec::len))
                    .sum();
                let durable = match keeper {
                    Keeper::Sink(at) => self.sinks[at].sink.commit(&snapshot).await?,
                    Keeper::Transaction => {
                        if let Some(transaction) = self.transaction_to_commit()? {
                            let committed = transaction.commit_snapshot(&snapshot).await;
                            committed.map_err(transaction_failed)?;
                        }
                        true
                    }
                };
                if !durable {
                    // Not durable yet: these positions go with a later
                    // checkpoint, nothing is committed before, and the
                    // next tick tries again.
                    if let Some(checkpoint) = checkpoint {
                        let waiting = self.deferred.get_or_insert_with(Checkpoint::default);
                        for position in &checkpoint.positions {
                            waiting.advance(position);
                        }
                    }
                    self.changed = true;
                    return Ok(());
                }
                // Everything handled is durable now, what waited included.
                Checkpointed {
                    snapshot: imaging,
                    state_bytes,
                }
                .emit(&self.metrics);
                self.committer.checkpointed(&self.handled);
                checkpoint
            }
            // With a window, only as far as no open window holds records.
            (None, Some(window)) => window.committable(checkpoint),
            (None, None) => checkpoint,
        };
        self.changed = false;
        // What a deferred commit left goes with this one (offsets are
        // cumulative, so the later position of each partition wins).
        let checkpoint = match (self.deferred.clone(), checkpoint) {
            (Some(mut earlier), Some(later)) => {
                for position in &later.positions {
                    earlier.advance(position);
                }
                Some(earlier)
            }
            (earlier, later) => later.or(earlier),
        };
        let Some(checkpoint) = checkpoint else {
            self.count_sent();
            return Ok(());
        };
        if self.keeper != Some(Keeper::Transaction)
            && let Some(transaction) = self.transaction_to_commit()?
        {
            let committed = transaction.commit(&checkpoint).await;
            committed.map_err(transaction_failed)?;
        }
        self.count_sent();
        // With a transaction this only tells the source what is committed.
        match self.committer.commit(&checkpoint).await {
            Ok(Commit::Done) => {
                if self.deferred.take().is_some() {
                    tracing::info!(pipeline = %self.pipeline, "Source commits go through again.");
                }
                Ok(())
            }
            Ok(Commit::Deferred(reason)) => {
                if self.deferred.is_none() {
                    tracing::warn!(pipeline = %self.pipeline, %reason, "Source commit deferred until the cluster takes it; reading goes on.");
                }
                CommitDeferred.emit(&self.metrics);
                self.deferred = Some(checkpoint);
                Ok(())
            }
            Ok(Commit::Superseded(_)) => {
                // Those partitions are another reader's now.
                self.deferred = None;
                CommitSuperseded.emit(&self.metrics);
                Ok(())
            }
            Err(err) => {
                CommitFailed { error: &err }.emit(&self.metrics);
                Err(SinkError::Io {
                    sink: "source commit".into(),
                    source: std::io::Error::other(err),
                })
            }
        }
    }
}
