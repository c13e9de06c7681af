//! Control of a running pipeline: which plugin versions serve (deploy,
//! rollback), pausing and resuming, and its status.
//!
//! A [`PipelineHandle`] sends requests to the pipeline's controller task,
//! which handles them one at a time. A candidate is prepared off the data
//! path (read, hashed, compiled or taken from the compile cache or the kept
//! versions, one instance per lane, `init` run); a candidate that fails any
//! of it is refused with the reason and never reaches a lane. The run loop
//! then puts one install order in every lane's queue between two source
//! batches, and the answer comes once every lane serves the new version.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::lanes::Installed;
use crate::engine::{Instance, PluginEngine};
use crate::metrics::{MetricsSnapshot, PipelineMetrics};
use crate::plugin::{
    Candidate, PluginSlot, PluginVersion, SetupError, SlotRecipe, VersionHistory, VersionStore, hex,
};

/// Why a control request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The chain has no such position.
    #[error("pipeline `{pipeline}` has no plugin #{plugin} (it has {count})")]
    NoSuchPlugin {
        /// The pipeline.
        pipeline: String,
        /// The position asked for, from 1.
        plugin: usize,
        /// How many plugins it has.
        count: usize,
    },
    /// The candidate did not load, link or start.
    #[error(
        "pipeline `{pipeline}`, plugin #{plugin}: refused {candidate}: {reason}; {serving} keeps serving"
    )]
    Refused {
        /// The pipeline.
        pipeline: String,
        /// The position, from 1.
        plugin: usize,
        /// What was offered (its origin and hash).
        candidate: String,
        /// Why, as the loader or the plugin's `init` said.
        reason: String,
        /// The version still serving.
        serving: String,
    },
    /// Rollback with no earlier version kept.
    #[error("pipeline `{pipeline}`, plugin #{plugin}: no earlier version is kept to roll back to")]
    NoPrevious {
        /// The pipeline.
        pipeline: String,
        /// The position, from 1.
        plugin: usize,
    },
    /// Rollback to a hash no kept version has.
    #[error(
        "pipeline `{pipeline}`, plugin #{plugin}: no kept version's hash starts with `{prefix}` (kept: {kept})"
    )]
    UnknownVersion {
        /// The pipeline.
        pipeline: String,
        /// The position, from 1.
        plugin: usize,
        /// The hash prefix asked for.
        prefix: String,
        /// The kept versions.
        kept: String,
    },
    /// Rollback to a prefix several kept versions share.
    #[error(
        "pipeline `{pipeline}`, plugin #{plugin}: `{prefix}` starts the hash of {count} kept versions; give more digits"
    )]
    Ambiguous {
        /// The pipeline.
        pipeline: String,
        /// The position, from 1.
        plugin: usize,
        /// The hash prefix asked for.
        prefix: String,
        /// How many match.
        count: usize,
    },
    /// The pipeline no longer runs.
    #[error("pipeline `{pipeline}` is not running ({state})")]
    NotRunning {
        /// The pipeline.
        pipeline: String,
        /// Its last state, with the reason.
        state: String,
    },
}

/// What a pipeline is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Reading and processing.
    Running,
    /// Not reading (by request); batches in flight were finished.
    Paused,
    /// Stopped reading after too many plugin faults.
    Quarantined,
    /// Ended: its source was drained or it was asked to stop.
    Stopped,
    /// Ended with an error.
    Failed,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Quarantined => "quarantined",
            RunState::Stopped => "stopped",
            RunState::Failed => "failed",
        })
    }
}

/// A plugin version as status and reports show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The name the plugin reports.
    pub name: String,
    /// The semver it reports.
    pub version: String,
    /// The SHA-256 of its `.wasm`, in hex.
    pub hash: String,
}

impl VersionInfo {
    fn of(version: &PluginVersion) -> Self {
        VersionInfo {
            name: version.name().to_owned(),
            version: version.version().to_owned(),
            hash: version.hash().to_owned(),
        }
    }
}

impl std::fmt::Display for VersionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = self
            .hash
            .get(..crate::plugin::SHORT_HASH)
            .unwrap_or(&self.hash);
        write!(f, "{} {} ({short})", self.name, self.version)
    }
}

/// One plugin position of a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Its position in the chain, from 1.
    pub plugin: usize,
    /// Its label.
    pub label: String,
    /// The source topics it processes; all when empty.
    pub topics: Vec<String>,
    /// The version serving.
    pub serving: VersionInfo,
    /// The short hash each lane serves, lane by lane.
    pub lanes: Vec<String>,
    /// Earlier versions kept for rollback, newest first.
    pub previous: Vec<VersionInfo>,
    /// The file watched for new versions, if any.
    pub watching: Option<PathBuf>,
    /// Versions swapped in since the start.
    pub swaps: u64,
    /// Candidates refused since the start.
    pub refused: u64,
    /// Why the last candidate was refused.
    pub last_refusal: Option<String>,
}

/// A pipeline's counters, as status shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Records read.
    pub records_in: u64,
    /// Records durably written.
    pub records_out: u64,
    /// Records a plugin emitted nothing for.
    pub records_dropped: u64,
    /// Records dead-lettered.
    pub records_dead_lettered: u64,
    /// Plugin faults.
    pub plugin_faults: u64,
    /// Batches processed.
    pub batches: u64,
    /// Seconds since the start.
    pub elapsed_s: f64,
}

impl From<MetricsSnapshot> for Counters {
    fn from(s: MetricsSnapshot) -> Self {
        Counters {
            records_in: s.records_in,
            records_out: s.records_out,
            records_dropped: s.records_dropped,
            records_dead_lettered: s.records_dead_lettered,
            plugin_faults: s.plugin_faults,
            batches: s.batches,
            elapsed_s: s.elapsed.as_secs_f64(),
        }
    }
}

/// A pipeline at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineStatus {
    /// Its name.
    pub name: String,
    /// What it is doing.
    pub state: RunState,
    /// Why it is quarantined, failed or paused, when it is.
    pub reason: Option<String>,
    /// How many lanes it runs.
    pub lanes: usize,
    /// Its plugins, in chain order.
    pub plugins: Vec<PluginStatus>,
    /// Its counters.
    pub counters: Counters,
}

/// The outcome of a deploy or rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwapReport {
    /// The pipeline.
    pub pipeline: String,
    /// The plugin position, from 1.
    pub plugin: usize,
    /// The version that served before.
    pub from: VersionInfo,
    /// The version serving now.
    pub to: VersionInfo,
    /// The short hash each lane serves now.
    pub lanes: Vec<String>,
    /// The candidate was the version already serving: nothing changed.
    pub unchanged: bool,
    /// Microseconds spent preparing the candidate off the data path.
    pub prepare_us: u64,
    /// Microseconds from handing the install orders to the lanes until the
    /// last lane served the new version (batches queued before the swap
    /// are processed meanwhile).
    pub switch_us: u64,
    /// The longest time a lane spent switching instead of processing
    /// batches: the data path's pause, in microseconds.
    pub pause_us: u64,
}

/// A component offered as a new version.
pub enum Wasm {
    /// A file, read when the request is handled.
    File(PathBuf),
    /// A file's content, already read (by the watcher).
    Bytes {
        /// The component.
        bytes: Vec<u8>,
        /// The file it was read from, for messages.
        origin: PathBuf,
    },
    /// An upload: kept in the pipeline's version store (when it has one)
    /// so that a restart comes back on it.
    Upload(Vec<u8>),
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// What a handle asks of the controller.
pub(super) enum Request {
    Deploy {
        plugin: usize,
        wasm: Wasm,
        reply: Reply<SwapReport>,
    },
    Rollback {
        plugin: usize,
        to: Option<String>,
        reply: Reply<SwapReport>,
    },
    Pause {
        pause: bool,
        reply: Reply<()>,
    },
}

/// What the controller has the run loop hand to the lanes.
pub(super) struct InstallOrder {
    pub slot: usize,
    pub version: PluginVersion,
    pub instances: Vec<Instance>,
    pub done: Vec<oneshot::Sender<Installed>>,
}

/// Controls one pipeline, from anywhere (the admin API, the file watcher,
/// a test). Cheap to clone; keeps answering [`PipelineHandle::status`] after
/// the pipeline ends.
#[derive(Clone)]
pub struct PipelineHandle {
    name: String,
    requests: mpsc::Sender<Request>,
    board: Arc<Mutex<PipelineStatus>>,
    metrics: Arc<PipelineMetrics>,
}

impl PipelineHandle {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Swaps `wasm` in at plugin `plugin` (from 1), once every lane has it
    /// prepared; the old version keeps serving if it is refused.
    pub async fn deploy(&self, plugin: usize, wasm: Wasm) -> Result<SwapReport, ControlError> {
        self.ask(|reply| Request::Deploy {
            plugin,
            wasm,
            reply,
        })
        .await
    }

    /// Swaps a kept earlier version back in at plugin `plugin` (from 1): the
    /// one before the current, or the one whose hash starts with `to`.
    /// Nothing is compiled.
    pub async fn rollback(
        &self,
        plugin: usize,
        to: Option<String>,
    ) -> Result<SwapReport, ControlError> {
        self.ask(|reply| Request::Rollback { plugin, to, reply })
            .await
    }

    /// Stops reading (`true`) or reads again (`false`). Batches already
    /// read are finished and committed either way.
    pub async fn pause(&self, pause: bool) -> Result<(), ControlError> {
        self.ask(|reply| Request::Pause { pause, reply }).await
    }

    /// The pipeline's state, versions and counters now.
    pub fn status(&self) -> PipelineStatus {
        let mut status = lock(&self.board).clone();
        status.counters = self.metrics.snapshot().into();
        status
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        let gone = || not_running(&self.board);
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The refusal for a pipeline that has ended, with its last state.
fn not_running(board: &Mutex<PipelineStatus>) -> ControlError {
    let status = lock(board);
    ControlError::NotRunning {
        pipeline: status.name.clone(),
        state: match &status.reason {
            Some(reason) => format!("{}: {reason}", status.state),
            None => status.state.to_string(),
        },
    }
}

fn lock<T>(board: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the board leaves a status, not broken state.
    board.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One plugin position, as the controller keeps it.
struct ControlledSlot {
    recipe: SlotRecipe,
    history: VersionHistory,
    /// The file the pipeline names for it.
    named: PathBuf,
}

/// The controller's side: built with the pipeline, started by its run.
pub(super) struct Controller {
    pipeline: String,
    engine: PluginEngine,
    lanes: usize,
    slots: Vec<ControlledSlot>,
    board: Arc<Mutex<PipelineStatus>>,
    requests: mpsc::Receiver<Request>,
    store: Option<VersionStore>,
}

/// What the controller of a pipeline starts from.
pub(super) struct ControlledPipeline<'a> {
    pub name: &'a str,
    pub engine: &'a PluginEngine,
    pub lanes: usize,
    /// The first lane's plugins.
    pub slots: &'a [PluginSlot],
    /// The file each plugin names (or its crate's artifact).
    pub named: Vec<PathBuf>,
    /// Per plugin, the file watched for new versions.
    pub watching: &'a [Option<PathBuf>],
    pub keep_versions: usize,
    /// Where uploads are kept, with the record of what serves.
    pub store: Option<VersionStore>,
}

/// The run loop's ends of the controller's channels.
pub(super) struct RunControl {
    pub installs: mpsc::Receiver<InstallOrder>,
    pub paused: watch::Receiver<bool>,
}

impl Controller {
    /// The controller of a pipeline whose first lane runs `slots`, and a
    /// handle to it.
    pub(super) fn new(
        setup: ControlledPipeline<'_>,
        metrics: Arc<PipelineMetrics>,
    ) -> (Self, PipelineHandle) {
        let ControlledPipeline {
            name: pipeline,
            engine,
            lanes,
            slots,
            named,
            watching,
            keep_versions,
            store,
        } = setup;
        let plugins = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| PluginStatus {
                plugin: index + 1,
                label: slot.label().to_owned(),
                topics: slot.recipe().topics().to_vec(),
                serving: VersionInfo::of(slot.current()),
                lanes: vec![slot.current().short_hash().to_owned(); lanes],
                previous: Vec::new(),
                watching: watching.get(index).cloned().flatten(),
                swaps: 0,
                refused: 0,
                last_refusal: None,
            })
            .collect();
        let board = Arc::new(Mutex::new(PipelineStatus {
            name: pipeline.to_owned(),
            state: RunState::Running,
            reason: None,
            lanes,
            plugins,
            counters: Counters::default(),
        }));
        let (send, requests) = mpsc::channel(16);
        let controller = Controller {
            pipeline: pipeline.to_owned(),
            engine: engine.clone(),
            lanes,
            slots: (slots.iter().zip(named))
                .map(|(slot, named)| ControlledSlot {
                    recipe: slot.recipe().clone(),
                    history: VersionHistory::new(slot.current().clone(), keep_versions),
                    named,
                })
                .collect(),
            board: board.clone(),
            requests,
            store,
        };
        let handle = PipelineHandle {
            name: pipeline.to_owned(),
            requests: send,
            board,
            metrics,
        };
        (controller, handle)
    }

    /// Marks the pipeline ended (or quarantined), with the reason.
    pub(super) fn finish(board: &Mutex<PipelineStatus>, state: RunState, reason: Option<String>) {
        let mut status = lock(board);
        status.state = state;
        status.reason = reason;
    }

    /// The status board, for the run loop to mark the end on.
    pub(super) fn board(&self) -> Arc<Mutex<PipelineStatus>> {
        self.board.clone()
    }

    /// Starts handling requests; returns the run loop's ends.
    pub(super) fn start(self) -> (tokio::task::JoinHandle<()>, RunControl) {
        let (installs_to, installs) = mpsc::channel(1);
        let (paused_to, paused) = watch::channel(false);
        let task = tokio::spawn(self.serve(installs_to, paused_to));
        (task, RunControl { installs, paused })
    }

    async fn serve(mut self, installs: mpsc::Sender<InstallOrder>, paused: watch::Sender<bool>) {
        while let Some(request) = self.requests.recv().await {
            match request {
                Request::Deploy {
                    plugin,
                    wasm,
                    reply,
                } => {
                    let result = self.deploy(plugin, wasm, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Rollback { plugin, to, reply } => {
                    let result = self.rollback(plugin, to, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Pause { pause, reply } => {
                    paused.send_replace(pause);
                    let mut status = lock(&self.board);
                    if matches!(status.state, RunState::Running | RunState::Paused) {
                        status.state = if pause {
                            RunState::Paused
                        } else {
                            RunState::Running
                        };
                        status.reason = pause.then(|| "paused by request".to_owned());
                    }
                    drop(status);
                    tracing::info!(pipeline = %self.pipeline, "{}", if pause { "Paused: no more records are read." } else { "Resumed." });
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn slot(&self, plugin: usize) -> Result<&ControlledSlot, ControlError> {
        plugin
            .checked_sub(1)
            .and_then(|index| self.slots.get(index))
            .ok_or_else(|| ControlError::NoSuchPlugin {
                pipeline: self.pipeline.clone(),
                plugin,
                count: self.slots.len(),
            })
    }

    async fn deploy(
        &mut self,
        plugin: usize,
        wasm: Wasm,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let slot = self.slot(plugin)?;
        let started = Instant::now();
        let (recipe, engine, lanes) = (slot.recipe.clone(), self.engine.clone(), self.lanes);
        let serving = slot.history.current().clone();
        let kept: Vec<PluginVersion> = std::iter::once(slot.history.current())
            .chain(slot.history.previous())
            .cloned()
            .collect();
        let store = self.store.clone();
        let prepared = blocking(move || -> Result<Option<Candidate>, (String, String)> {
            let upload = matches!(wasm, Wasm::Upload(_));
            let (bytes, origin) = match wasm {
                Wasm::Upload(bytes) => (bytes, PathBuf::from("upload")),
                Wasm::File(path) => match std::fs::read(&path) {
                    Ok(bytes) => (bytes, path),
                    Err(err) => {
                        let what = format!("`{}`", path.display());
                        return Err((what, format!("cannot read it: {err}")));
                    }
                },
                Wasm::Bytes { bytes, origin } => (bytes, origin),
            };
            let hash = hex(&Sha256::digest(&bytes));
            let what = format!(
                "`{}` ({})",
                origin.display(),
                &hash[..crate::plugin::SHORT_HASH]
            );
            if hash == serving.hash() {
                return Ok(None);
            }
            // A version kept for rollback is not loaded again.
            let loaded = match kept.iter().find(|v| v.hash() == hash) {
                Some(version) => version.loaded().clone(),
                None => engine
                    .load_bytes(&bytes, &origin)
                    .map_err(|err| (what.clone(), SetupError::from(err).to_string()))?,
            };
            let candidate = recipe
                .start(&loaded, lanes)
                .map_err(|err| (what.clone(), err.to_string()))?;
            if let (true, Some(store)) = (upload, &store) {
                store
                    .put(&hash, &bytes)
                    .map_err(|err| (what, format!("cannot keep it in the version store: {err}")))?;
            }
            Ok(Some(candidate))
        })
        .await;
        match prepared {
            Ok(Some(candidate)) => self.install(plugin, candidate, started, installs).await,
            Ok(None) => {
                let current = VersionInfo::of(self.slot(plugin)?.history.current());
                Ok(SwapReport {
                    pipeline: self.pipeline.clone(),
                    plugin,
                    from: current.clone(),
                    lanes: lock(&self.board).plugins[plugin - 1].lanes.clone(),
                    to: current,
                    unchanged: true,
                    prepare_us: micros(started),
                    switch_us: 0,
                    pause_us: 0,
                })
            }
            Err((candidate, reason)) => Err(self.refused(plugin, candidate, reason)),
        }
    }

    async fn rollback(
        &mut self,
        plugin: usize,
        to: Option<String>,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let slot = self.slot(plugin)?;
        let pipeline = || self.pipeline.clone();
        let version = match &to {
            None => slot
                .history
                .previous()
                .next()
                .ok_or(ControlError::NoPrevious {
                    pipeline: pipeline(),
                    plugin,
                })?,
            Some(prefix) => match slot.history.find(prefix) {
                Ok(Some(version)) => version,
                Ok(None) => {
                    return Err(ControlError::UnknownVersion {
                        pipeline: pipeline(),
                        plugin,
                        prefix: prefix.clone(),
                        kept: std::iter::once(slot.history.current())
                            .chain(slot.history.previous())
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                Err(count) => {
                    return Err(ControlError::Ambiguous {
                        pipeline: pipeline(),
                        plugin,
                        prefix: prefix.clone(),
                        count,
                    });
                }
            },
        }
        .clone();
        let started = Instant::now();
        let (recipe, lanes) = (slot.recipe.clone(), self.lanes);
        let what = format!("rollback to {version}");
        match blocking(move || recipe.start(version.loaded(), lanes)).await {
            Ok(candidate) => self.install(plugin, candidate, started, installs).await,
            Err(err) => Err(self.refused(plugin, what, err.to_string())),
        }
    }

    fn refused(&self, plugin: usize, candidate: String, reason: String) -> ControlError {
        let serving = self.slots[plugin - 1].history.current().to_string();
        tracing::warn!(pipeline = %self.pipeline, plugin, %candidate, %reason, %serving, "New plugin version refused; the current one keeps serving.");
        let mut status = lock(&self.board);
        let entry = &mut status.plugins[plugin - 1];
        entry.refused += 1;
        entry.last_refusal = Some(format!("{candidate}: {reason}"));
        ControlError::Refused {
            pipeline: self.pipeline.clone(),
            plugin,
            candidate,
            reason,
            serving,
        }
    }

    /// Has every lane serve `candidate` after the batches already read.
    async fn install(
        &mut self,
        plugin: usize,
        candidate: Candidate,
        started: Instant,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let prepare_us = micros(started);
        let switching = Instant::now();
        let Candidate { version, instances } = candidate;
        let (done, acks): (Vec<_>, Vec<_>) =
            (0..instances.len()).map(|_| oneshot::channel()).unzip();
        let order = InstallOrder {
            slot: plugin - 1,
            version: version.clone(),
            instances,
            done,
        };
        let not_running = || not_running(&self.board);
        installs.send(order).await.map_err(|_| not_running())?;
        let mut pause = Duration::ZERO;
        let mut replaced = Vec::with_capacity(acks.len());
        for ack in acks {
            let installed = ack.await.map_err(|_| not_running())?;
            pause = pause.max(installed.pause);
            replaced.push(installed.replaced);
        }
        // Freeing the old instances' memory is not the lanes' business.
        tokio::task::spawn_blocking(move || drop(replaced));
        let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        let switch_us = micros(switching);
        let history = &mut self.slots[plugin - 1].history;
        let from = VersionInfo::of(history.current());
        history.promote(version.clone());
        let previous = history.previous().map(VersionInfo::of).collect();
        let to = VersionInfo::of(&version);
        let lanes = vec![version.short_hash().to_owned(); self.lanes];
        {
            let mut status = lock(&self.board);
            let entry = &mut status.plugins[plugin - 1];
            entry.serving = to.clone();
            entry.lanes.clone_from(&lanes);
            entry.previous = previous;
            entry.swaps += 1;
        }
        tracing::info!(pipeline = %self.pipeline, plugin, %from, %to, prepare_us, switch_us, pause_us, "Plugin version swapped at a batch boundary in every lane.");
        self.remember(plugin, &version).await;
        Ok(SwapReport {
            pipeline: self.pipeline.clone(),
            plugin,
            from,
            to,
            lanes,
            unchanged: false,
            prepare_us,
            switch_us,
            pause_us,
        })
    }
}

impl Controller {
    /// Records in the version store which version serves `plugin`, so a
    /// restart comes back on it: a stored (uploaded) one is recorded, any
    /// other one (the named file's) clears the record.
    async fn remember(&self, plugin: usize, version: &PluginVersion) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let (pipeline, hash) = (self.pipeline.clone(), version.hash().to_owned());
        let named = self.slots[plugin - 1].named.clone();
        let recorded = blocking(move || {
            let serving = store
                .has(&hash)
                .then(|| (hash.as_str(), crate::plugin::file_hash(&named)));
            store.record(&pipeline, plugin, serving)
        })
        .await;
        if let Err(err) = recorded {
            tracing::warn!(pipeline = %self.pipeline, plugin, %err, "Cannot record the serving version; a restart starts on the pipeline file's.");
        }
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Runs `work` on a blocking worker: loading and `init` never run on the
/// reactor.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(panic) => std::panic::resume_unwind(panic.into_panic()),
    }
}
