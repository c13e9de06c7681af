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
//!
//! A candidate may also go on trial first (`trial`): as a shadow, beside
//! the serving version, until it is promoted or discarded; or as a canary,
//! which the lanes roll back on their own when it fails too many of its
//! first records, telling the controller why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::chain::Quarantine;
use super::lanes::Installed;
use super::trial::{
    CanaryEnded, CanaryReport, CanaryRule, CanaryTally, Change, ShadowReport, ShadowTally, Verdict,
};
use crate::engine::{MemoryMeter, PluginEngine};
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
    /// Promote or discard with no shadow running.
    #[error(
        "pipeline `{pipeline}`, plugin #{plugin}: no shadow is running (start one with `weir deploy --shadow`)"
    )]
    NoShadow {
        /// The pipeline.
        pipeline: String,
        /// The position, from 1.
        plugin: usize,
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
    /// The shadow running beside the serving version, with its tally.
    #[serde(default)]
    pub shadow: Option<ShadowReport>,
    /// The last canary: on trial, or how it ended.
    #[serde(default)]
    pub canary: Option<CanaryReport>,
    /// How the last shadow or canary ended, in a line.
    #[serde(default)]
    pub last_trial: Option<String>,
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
    /// The tenant it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What it is doing.
    pub state: RunState,
    /// Why it is quarantined, failed or paused, when it is.
    pub reason: Option<String>,
    /// Linear memory and tables its plugin instances hold now, in bytes.
    #[serde(default)]
    pub plugin_memory_bytes: u64,
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
    /// The new version serves as a canary, under this rule.
    #[serde(default)]
    pub canary: Option<CanaryRule>,
    /// The new version was a promoted shadow: what it found.
    #[serde(default)]
    pub shadow: Option<ShadowReport>,
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
        canary: Option<CanaryRule>,
        reply: Reply<SwapReport>,
    },
    Shadow {
        plugin: usize,
        wasm: Wasm,
        reply: Reply<ShadowReport>,
    },
    Promote {
        plugin: usize,
        reply: Reply<SwapReport>,
    },
    Discard {
        plugin: usize,
        reply: Reply<ShadowReport>,
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

/// What the controller has the run loop hand to the lanes: a change at
/// plugin `slot` (from 0) for each lane.
pub(super) struct InstallOrder {
    pub slot: usize,
    pub changes: Vec<Change>,
    pub done: Vec<oneshot::Sender<Installed>>,
}

/// The trials running at one plugin position, as status reads them.
#[derive(Default)]
struct Trials {
    shadow: Option<Arc<ShadowTally>>,
    canary: Option<Arc<CanaryTally>>,
    /// The canary's verdict once the controller has acted on it: status
    /// shows it with the version serving after it, never before.
    canary_verdict: Option<Verdict>,
}

/// Controls one pipeline, from anywhere (the admin API, the file watcher,
/// a test). Cheap to clone; keeps answering [`PipelineHandle::status`] after
/// the pipeline ends.
#[derive(Clone)]
pub struct PipelineHandle {
    name: String,
    memory: MemoryMeter,
    requests: mpsc::Sender<Request>,
    board: Arc<Mutex<PipelineStatus>>,
    trials: Arc<Mutex<Vec<Trials>>>,
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
            canary: None,
            reply,
        })
        .await
    }

    /// Like [`PipelineHandle::deploy`], but the new version serves as a
    /// canary: once it fails more of its first records than `rule`
    /// allows, the version it replaced serves again (status says why).
    pub async fn deploy_canary(
        &self,
        plugin: usize,
        wasm: Wasm,
        rule: CanaryRule,
    ) -> Result<SwapReport, ControlError> {
        self.ask(|reply| Request::Deploy {
            plugin,
            wasm,
            canary: Some(rule),
            reply,
        })
        .await
    }

    /// Runs `wasm` in the shadow of plugin `plugin` (from 1): on the same
    /// batches as the serving version, its outputs compared and discarded,
    /// until [`PipelineHandle::promote`] or [`PipelineHandle::discard`].
    /// A shadow already running there is replaced.
    pub async fn shadow(&self, plugin: usize, wasm: Wasm) -> Result<ShadowReport, ControlError> {
        self.ask(|reply| Request::Shadow {
            plugin,
            wasm,
            reply,
        })
        .await
    }

    /// The shadow's version serves plugin `plugin` from now on.
    pub async fn promote(&self, plugin: usize) -> Result<SwapReport, ControlError> {
        self.ask(|reply| Request::Promote { plugin, reply }).await
    }

    /// Stops the shadow of plugin `plugin`; gives what it found.
    pub async fn discard(&self, plugin: usize) -> Result<ShadowReport, ControlError> {
        self.ask(|reply| Request::Discard { plugin, reply }).await
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
        status.plugin_memory_bytes = self.memory.bytes();
        for (entry, trials) in status.plugins.iter_mut().zip(lock(&self.trials).iter()) {
            entry.shadow = trials.shadow.as_ref().map(|tally| tally.report());
            entry.canary = trials.canary.as_ref().map(|tally| CanaryReport {
                verdict: trials.canary_verdict,
                ..tally.report()
            });
        }
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
    /// The version running in the shadow, if one runs.
    shadow: Option<PluginVersion>,
    /// The canary awaiting its verdict: its id and the version it restores.
    canary: Option<(u64, PluginVersion)>,
}

/// The controller's side: built with the pipeline, started by its run.
pub(super) struct Controller {
    pipeline: String,
    engine: PluginEngine,
    lanes: usize,
    slots: Vec<ControlledSlot>,
    board: Arc<Mutex<PipelineStatus>>,
    trials: Arc<Mutex<Vec<Trials>>>,
    requests: mpsc::Receiver<Request>,
    store: Option<VersionStore>,
    quarantine: Quarantine,
    /// Where the lanes tell canary verdicts, and the id of the last canary.
    canary_verdicts: (
        mpsc::UnboundedSender<CanaryEnded>,
        mpsc::UnboundedReceiver<CanaryEnded>,
    ),
    canaries: u64,
}

/// What the controller of a pipeline starts from.
pub(super) struct ControlledPipeline<'a> {
    pub name: &'a str,
    pub tenant: Option<&'a str>,
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
    /// The pipeline's quarantine, which a resume or a rollback lifts.
    pub quarantine: Quarantine,
    /// What its plugin instances hold.
    pub memory: MemoryMeter,
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
            tenant,
            engine,
            lanes,
            slots,
            named,
            watching,
            keep_versions,
            store,
            quarantine,
            memory,
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
                shadow: None,
                canary: None,
                last_trial: None,
            })
            .collect();
        let board = Arc::new(Mutex::new(PipelineStatus {
            name: pipeline.to_owned(),
            tenant: tenant.map(str::to_owned),
            state: RunState::Running,
            reason: None,
            plugin_memory_bytes: 0,
            lanes,
            plugins,
            counters: Counters::default(),
        }));
        let (send, requests) = mpsc::channel(16);
        let trials = Arc::new(Mutex::new(
            slots.iter().map(|_| Trials::default()).collect(),
        ));
        let controller = Controller {
            pipeline: pipeline.to_owned(),
            engine: engine.clone(),
            lanes,
            slots: (slots.iter().zip(named))
                .map(|(slot, named)| ControlledSlot {
                    recipe: slot.recipe().clone(),
                    history: VersionHistory::new(slot.current().clone(), keep_versions),
                    named,
                    shadow: None,
                    canary: None,
                })
                .collect(),
            board: board.clone(),
            trials: trials.clone(),
            requests,
            store,
            quarantine,
            canary_verdicts: mpsc::unbounded_channel(),
            canaries: 0,
        };
        let handle = PipelineHandle {
            memory,
            name: pipeline.to_owned(),
            requests: send,
            board,
            trials,
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

    /// Marks the pipeline quarantined if it still is, with the reason. The
    /// news is read under the board's lock, so a lift racing with this
    /// (which changes the board after lifting) is never overwritten.
    pub(super) fn mark_quarantined(
        board: &Mutex<PipelineStatus>,
        news: &mut watch::Receiver<Option<String>>,
    ) -> Option<String> {
        let mut status = lock(board);
        let reason = news.borrow_and_update().clone()?;
        status.state = RunState::Quarantined;
        status.reason = Some(reason.clone());
        Some(reason)
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
        loop {
            // The verdict branch never ends: the controller holds a sender.
            let request = tokio::select! {
                request = self.requests.recv() => request,
                Some(verdict) = self.canary_verdicts.1.recv() => {
                    self.canary_ended(verdict).await;
                    continue;
                }
            };
            let Some(request) = request else { break };
            match request {
                Request::Deploy {
                    plugin,
                    wasm,
                    canary,
                    reply,
                } => {
                    let result = self.deploy(plugin, wasm, canary, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Shadow {
                    plugin,
                    wasm,
                    reply,
                } => {
                    let result = self.shadow(plugin, wasm, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Promote { plugin, reply } => {
                    let result = self.promote(plugin, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Discard { plugin, reply } => {
                    let result = self.discard(plugin, &installs).await;
                    let _ = reply.send(result);
                }
                Request::Rollback { plugin, to, reply } => {
                    let result = self.rollback(plugin, to, &installs).await;
                    if result.is_ok() {
                        // The operator's fix: the pipeline reads again.
                        self.lift_quarantine(*paused.borrow(), "rolled back");
                    }
                    let _ = reply.send(result);
                }
                Request::Pause { pause, reply } => {
                    paused.send_replace(pause);
                    if !pause {
                        self.lift_quarantine(false, "resumed");
                    }
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

    /// Lifts the pipeline's quarantine, if it is quarantined: it reads
    /// again (unless `paused`), its faults counted afresh.
    fn lift_quarantine(&self, paused: bool, how: &str) {
        if !self.quarantine.lift() {
            return;
        }
        let mut status = lock(&self.board);
        if status.state == RunState::Quarantined {
            status.state = if paused {
                RunState::Paused
            } else {
                RunState::Running
            };
            status.reason = paused.then(|| "paused by request".to_owned());
        }
        drop(status);
        tracing::info!(pipeline = %self.pipeline, "Quarantine lifted ({how}): reading again.");
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
        canary: Option<CanaryRule>,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let started = Instant::now();
        match self.prepare(plugin, wasm).await? {
            Some(candidate) => {
                self.serve_version(plugin, candidate, started, canary, installs)
                    .await
            }
            None => {
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
                    canary: None,
                    shadow: None,
                })
            }
        }
    }

    /// Reads, checks and starts `wasm` for plugin `plugin`, one instance
    /// per lane, off the data path; `None` when it is the version serving.
    async fn prepare(
        &mut self,
        plugin: usize,
        wasm: Wasm,
    ) -> Result<Option<Candidate>, ControlError> {
        let slot = self.slot(plugin)?;
        let (recipe, engine, lanes) = (slot.recipe.clone(), self.engine.clone(), self.lanes);
        let serving = slot.history.current().clone();
        let kept: Vec<PluginVersion> = std::iter::once(slot.history.current())
            .chain(slot.history.previous())
            .chain(slot.shadow.as_ref())
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
            // A version kept for rollback (or shadowing) is not loaded again.
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
        prepared.map_err(|(candidate, reason)| self.refused(plugin, candidate, reason))
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
        let candidate = self
            .restart(plugin, &version, format!("rollback to {version}"))
            .await?;
        self.serve_version(plugin, candidate, started, None, installs)
            .await
    }

    /// Instances of a version already loaded, one per lane (nothing is
    /// compiled), off the data path.
    async fn restart(
        &mut self,
        plugin: usize,
        version: &PluginVersion,
        what: String,
    ) -> Result<Candidate, ControlError> {
        let (recipe, lanes) = (self.slot(plugin)?.recipe.clone(), self.lanes);
        let version = version.clone();
        match blocking(move || recipe.start(version.loaded(), lanes)).await {
            Ok(candidate) => Ok(candidate),
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

    /// Hands every lane its change at `plugin` after the batches already
    /// read, and waits until all have made it; gives the longest pause a
    /// lane took and the microseconds until the last one was done.
    async fn switch(
        &self,
        plugin: usize,
        changes: Vec<Change>,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<(Duration, u64), ControlError> {
        let switching = Instant::now();
        let (done, acks): (Vec<_>, Vec<_>) = (0..changes.len()).map(|_| oneshot::channel()).unzip();
        let order = InstallOrder {
            slot: plugin - 1,
            changes,
            done,
        };
        let not_running = || not_running(&self.board);
        installs.send(order).await.map_err(|_| not_running())?;
        let mut pause = Duration::ZERO;
        let mut replaced = Vec::with_capacity(acks.len());
        for ack in acks {
            let installed = ack.await.map_err(|_| not_running())?;
            pause = pause.max(installed.pause);
            replaced.extend(installed.replaced);
        }
        // Freeing the old instances' memory is not the lanes' business.
        tokio::task::spawn_blocking(move || drop(replaced));
        Ok((pause, micros(switching)))
    }

    /// Has every lane serve `candidate` after the batches already read (as
    /// a canary under `canary`, if given); a trial running there ends.
    async fn serve_version(
        &mut self,
        plugin: usize,
        candidate: Candidate,
        started: Instant,
        canary: Option<CanaryRule>,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let prepare_us = micros(started);
        let Candidate { version, instances } = candidate;
        let from_version = self.slots[plugin - 1].history.current().clone();
        let tally = canary.map(|rule| {
            self.canaries += 1;
            let report = CanaryReport {
                candidate: VersionInfo::of(&version),
                restores: VersionInfo::of(&from_version),
                rule,
                records: 0,
                failed: 0,
                verdict: None,
            };
            CanaryTally::new(
                plugin - 1,
                self.canaries,
                report,
                self.canary_verdicts.0.clone(),
            )
        });
        let changes = (instances.into_iter())
            .map(|instance| match &tally {
                Some(tally) => Change::Canary(version.clone(), instance, tally.clone()),
                None => Change::Serve(version.clone(), instance),
            })
            .collect();
        let (pause, switch_us) = self.switch(plugin, changes, installs).await?;
        let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        self.end_trials(plugin, &format!("{version} serves instead"));
        if let Some(tally) = tally {
            self.slots[plugin - 1].canary = Some((self.canaries, from_version));
            let mut trials = lock(&self.trials);
            trials[plugin - 1].canary = Some(tally);
            trials[plugin - 1].canary_verdict = None;
        }
        let from = self.now_serving(plugin, &version);
        let to = VersionInfo::of(&version);
        tracing::info!(pipeline = %self.pipeline, plugin, %from, %to, prepare_us, switch_us, pause_us, canary = canary.is_some(), "Plugin version swapped at a batch boundary in every lane.");
        self.remember(plugin, &version).await;
        Ok(SwapReport {
            pipeline: self.pipeline.clone(),
            plugin,
            from,
            to,
            lanes: vec![version.short_hash().to_owned(); self.lanes],
            unchanged: false,
            prepare_us,
            switch_us,
            pause_us,
            canary,
            shadow: None,
        })
    }

    /// Records that `version` serves `plugin` now (every lane switched);
    /// gives the version that served before.
    fn now_serving(&mut self, plugin: usize, version: &PluginVersion) -> VersionInfo {
        let history = &mut self.slots[plugin - 1].history;
        let from = VersionInfo::of(history.current());
        history.promote(version.clone());
        let previous = history.previous().map(VersionInfo::of).collect();
        let mut status = lock(&self.board);
        let entry = &mut status.plugins[plugin - 1];
        entry.serving = VersionInfo::of(version);
        entry.lanes = vec![version.short_hash().to_owned(); self.lanes];
        entry.previous = previous;
        entry.swaps += 1;
        from
    }

    /// Ends the shadow and the pending canary of `plugin` (the lanes have
    /// dropped them), saying `why` in the status.
    fn end_trials(&mut self, plugin: usize, why: &str) {
        self.slots[plugin - 1].shadow = None;
        self.slots[plugin - 1].canary = None;
        let (shadow, canary) = {
            let mut trials = lock(&self.trials);
            let trials = &mut trials[plugin - 1];
            (trials.shadow.take(), trials.canary.take())
        };
        let mut ended = Vec::new();
        if let Some(shadow) = shadow {
            let report = shadow.report();
            ended.push(format!(
                "shadow {} ended, {why}: {}",
                report.candidate,
                shadow_summary(&report)
            ));
        }
        if let Some(report) = canary.map(|tally| tally.report())
            && report.verdict.is_none()
        {
            ended.push(format!(
                "canary {} ended before its verdict, {why}: {} of {} records failed",
                report.candidate, report.failed, report.records
            ));
        }
        if !ended.is_empty() {
            lock(&self.board).plugins[plugin - 1].last_trial = Some(ended.join("; "));
        }
    }

    async fn shadow(
        &mut self,
        plugin: usize,
        wasm: Wasm,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<ShadowReport, ControlError> {
        let Some(Candidate { version, instances }) = self.prepare(plugin, wasm).await? else {
            let serving = self.slot(plugin)?.history.current().to_string();
            return Err(self.refused(
                plugin,
                format!("a shadow of {serving}"),
                "it is the version serving; its outputs could not differ".into(),
            ));
        };
        let tally = ShadowTally::new(VersionInfo::of(&version));
        let changes = (instances.into_iter())
            .map(|instance| Change::Shadow(version.clone(), instance, tally.clone()))
            .collect();
        self.switch(plugin, changes, installs).await?;
        let earlier = lock(&self.trials)[plugin - 1].shadow.replace(tally.clone());
        if let Some(earlier) = earlier {
            let report = earlier.report();
            lock(&self.board).plugins[plugin - 1].last_trial = Some(format!(
                "shadow {} replaced by {version}: {}",
                report.candidate,
                shadow_summary(&report)
            ));
        }
        self.slots[plugin - 1].shadow = Some(version.clone());
        let serving = self.slots[plugin - 1].history.current();
        tracing::info!(pipeline = %self.pipeline, plugin, candidate = %version, %serving, "Shadow started: the candidate runs on the same batches, its outputs compared and discarded.");
        Ok(tally.report())
    }

    /// The shadow of `plugin`, with its tally.
    fn running_shadow(
        &self,
        plugin: usize,
    ) -> Result<(PluginVersion, Arc<ShadowTally>), ControlError> {
        let version = self.slot(plugin)?.shadow.clone();
        let tally = lock(&self.trials)[plugin - 1].shadow.clone();
        version.zip(tally).ok_or_else(|| ControlError::NoShadow {
            pipeline: self.pipeline.clone(),
            plugin,
        })
    }

    async fn promote(
        &mut self,
        plugin: usize,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<SwapReport, ControlError> {
        let (version, tally) = self.running_shadow(plugin)?;
        let started = Instant::now();
        let candidate = self
            .restart(
                plugin,
                &version,
                format!("promotion of the shadow {version}"),
            )
            .await?;
        let mut report = self
            .serve_version(plugin, candidate, started, None, installs)
            .await?;
        let found = tally.report();
        lock(&self.board).plugins[plugin - 1].last_trial = Some(format!(
            "shadow {version} promoted: {}",
            shadow_summary(&found)
        ));
        report.shadow = Some(found);
        Ok(report)
    }

    async fn discard(
        &mut self,
        plugin: usize,
        installs: &mpsc::Sender<InstallOrder>,
    ) -> Result<ShadowReport, ControlError> {
        let (version, tally) = self.running_shadow(plugin)?;
        let changes = (0..self.lanes).map(|_| Change::Discard).collect();
        self.switch(plugin, changes, installs).await?;
        self.slots[plugin - 1].shadow = None;
        lock(&self.trials)[plugin - 1].shadow = None;
        let found = tally.report();
        let line = format!("shadow {version} discarded: {}", shadow_summary(&found));
        tracing::info!(pipeline = %self.pipeline, plugin, "{line}");
        lock(&self.board).plugins[plugin - 1].last_trial = Some(line);
        Ok(found)
    }

    /// A lane decided a canary: a passed one serves on; a rolled-back one
    /// no longer serves in any lane from its next batch, and the version it
    /// replaced is the current one again.
    async fn canary_ended(&mut self, ended: CanaryEnded) {
        let CanaryEnded {
            slot,
            id,
            verdict,
            reason,
        } = ended;
        let plugin = slot + 1;
        // A canary a later swap replaced was already ended by it.
        let Some((_, restores)) = self.slots[slot].canary.take_if(|(live, _)| *live == id) else {
            return;
        };
        match verdict {
            Verdict::Passed => {
                tracing::info!(pipeline = %self.pipeline, plugin, "{reason}");
            }
            Verdict::RolledBack => {
                tracing::warn!(pipeline = %self.pipeline, plugin, "{reason}");
                // The lanes keep their shadow, if any: it now compares
                // against the restored version.
                self.now_serving(plugin, &restores);
                self.remember(plugin, &restores).await;
            }
        }
        lock(&self.board).plugins[slot].last_trial = Some(reason);
        lock(&self.trials)[slot].canary_verdict = Some(verdict);
    }
}

/// A shadow's tally in a line.
fn shadow_summary(report: &ShadowReport) -> String {
    let mut line = format!(
        "{} of {} records compared differ",
        report.differing, report.compared
    );
    if report.not_compared > 0 {
        line.push_str(&format!(
            ", {} not compared (a fault in {} candidate batch(es))",
            report.not_compared, report.candidate_faults
        ));
    }
    line
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
