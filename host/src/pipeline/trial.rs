//! Trials of a candidate version before it serves for good.
//!
//! - A **shadow** runs in every lane beside the serving version, on the same
//!   batches: its outputs are compared record by record with the serving
//!   version's and discarded. The tally says how many records' outputs
//!   differ, with a few examples, until it is promoted or discarded.
//! - A **canary** serves, with a failure budget over its first N records.
//!   The lanes count what it fails; once the budget is broken, every lane
//!   goes back to the instance it replaced at its next batch (kept aside,
//!   so nothing is compiled or started), and the controller is told why.
//!
//! Both tallies are shared by a pipeline's lanes and read by its status.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_guest::abi::{OutcomeReader, OutcomeView, OutputView};

use super::control::VersionInfo;
use crate::batch::{Batch, RecordRef};
use crate::engine::Instance;
use crate::plugin::{PluginVersion, SlotRecipe};

/// Differing records a shadow keeps as examples.
const EXAMPLES: usize = 5;
/// Bytes an example shows of the start and of the end of a long value.
const SHOWN_HEAD: usize = 80;
const SHOWN_TAIL: usize = 40;

/// What a shadow run has found so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShadowReport {
    /// The version running in the shadow.
    pub candidate: VersionInfo,
    /// Records both versions answered.
    pub compared: u64,
    /// Of those, records whose outputs differ: other values, keys,
    /// headers, timestamps, routes or number of outputs, or one version
    /// failed the record and the other did not. Two failures count as the
    /// same, whatever their reasons.
    pub differing: u64,
    /// Records of batches where either version faulted (trap, deadline,
    /// limit, garbage reply): no per-record answer to compare.
    pub not_compared: u64,
    /// Batches the candidate faulted on.
    pub candidate_faults: u64,
    /// The candidate's last fault.
    pub last_fault: Option<String>,
    /// The first few differing records.
    pub examples: Vec<Difference>,
}

/// One record the two versions answered differently.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Difference {
    /// The record's source topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// What the serving version made of it.
    pub serving: String,
    /// What the candidate made of it.
    pub candidate: String,
}

/// A shadow's tally, shared by the lanes.
pub struct ShadowTally(Mutex<ShadowReport>);

impl ShadowTally {
    /// An empty tally for `candidate`.
    pub(super) fn new(candidate: VersionInfo) -> Arc<Self> {
        Arc::new(ShadowTally(Mutex::new(ShadowReport {
            candidate,
            compared: 0,
            differing: 0,
            not_compared: 0,
            candidate_faults: 0,
            last_fault: None,
            examples: Vec::new(),
        })))
    }

    /// The tally now.
    pub fn report(&self) -> ShadowReport {
        lock(&self.0).clone()
    }
}

/// The shadow of one plugin position in one lane.
pub(super) struct Shadow {
    version: PluginVersion,
    /// `None` once a fault left it unable to start again.
    instance: Option<Instance>,
    tally: Arc<ShadowTally>,
}

impl Shadow {
    pub(super) fn new(version: PluginVersion, instance: Instance, tally: Arc<ShadowTally>) -> Self {
        Shadow {
            version,
            instance: Some(instance),
            tally,
        }
    }

    /// Runs the candidate on `input`, which the serving version answered
    /// with `serving` (`None`: it faulted), and tallies the differences.
    /// Blocking: one more plugin call per batch.
    pub(super) fn compare(&mut self, input: &Batch, serving: Option<&[u8]>, recipe: &SlotRecipe) {
        let records = input.len() as u64;
        let (Some(serving), Some(instance)) = (serving, self.instance.as_mut()) else {
            lock(&self.tally.0).not_compared += records;
            return;
        };
        let fault = match instance.process(input.wire()) {
            Ok(reply) => match tally_differences(input, serving, &reply, &self.tally) {
                Ok(()) => return,
                Err(reason) => format!(
                    "plugin `{}` {} replied garbage: {reason}",
                    self.version.name(),
                    self.version.version()
                ),
            },
            Err(err) => err.to_string(),
        };
        // A fault stops the instance: the next batch gets a fresh one.
        self.instance = match recipe.instantiate(self.version.loaded()) {
            Ok(fresh) => Some(fresh),
            Err(err) => {
                tracing::warn!(candidate = %self.version, %err, "The shadow could not start again; it compares nothing more.");
                None
            }
        };
        let mut tally = lock(&self.tally.0);
        tally.not_compared += records;
        tally.candidate_faults += 1;
        tally.last_fault = Some(fault);
    }

    /// Its instance (gone if a fault left none), to be dropped.
    pub(super) fn into_instance(self) -> Option<Instance> {
        self.instance
    }
}

/// Compares two replies to `input` outcome by outcome; an `Err` says why
/// the candidate's reply does not parse (nothing is counted then).
fn tally_differences(
    input: &Batch,
    serving: &[u8],
    candidate: &[u8],
    tally: &ShadowTally,
) -> Result<(), String> {
    let count = input.len();
    let candidates: Vec<OutcomeView<'_>> = OutcomeReader::new(candidate, count)
        .map_err(|err| err.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|err| err.to_string())?;
    // The serving reply was read once already: it parses.
    let servings = OutcomeReader::new(serving, count).map_err(|err| err.to_string())?;
    let mut differing = Vec::new();
    for (at, (serving, candidate)) in servings.zip(&candidates).enumerate() {
        let serving = serving.map_err(|err| err.to_string())?;
        let record = input.get(at);
        match same_outcome(record, &serving, candidate) {
            Ok(true) => {}
            Ok(false) => differing.push((at, serving)),
            Err(reason) => return Err(reason),
        }
    }
    let mut tally = lock(&tally.0);
    tally.compared += count as u64;
    tally.differing += differing.len() as u64;
    for (at, serving) in differing {
        if tally.examples.len() >= EXAMPLES {
            break;
        }
        let record = input.get(at);
        tally.examples.push(Difference {
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            serving: describe(record, &serving),
            candidate: describe(record, &candidates[at]),
        });
    }
    Ok(())
}

/// An output as sinks would see it: a forward resolved to the input it
/// repeats, a new record with the input's timestamp and route where it
/// sets none.
struct Resolved<'a> {
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp: Option<i64>,
    route: Option<&'a str>,
    headers: weir_guest::abi::HeaderIter<'a>,
}

fn resolve<'a>(record: RecordRef<'a>, output: OutputView<'a>) -> Resolved<'a> {
    match output {
        OutputView::Forward { route } => Resolved {
            key: record.key(),
            value: record.value(),
            timestamp: record.timestamp(),
            route: route.or(record.route()),
            headers: record.headers(),
        },
        OutputView::New(new) => Resolved {
            key: new.key,
            value: new.value,
            timestamp: new.timestamp.or(record.timestamp()),
            route: new.route.or(record.route()),
            headers: new.headers.iter(),
        },
    }
}

fn same_output(a: Resolved<'_>, b: Resolved<'_>) -> bool {
    a.key == b.key
        && a.value == b.value
        && a.timestamp == b.timestamp
        && a.route == b.route
        && a.headers.eq(b.headers)
}

fn same_outcome(
    record: RecordRef<'_>,
    a: &OutcomeView<'_>,
    b: &OutcomeView<'_>,
) -> Result<bool, String> {
    match (a, b) {
        (OutcomeView::Fail(_), OutcomeView::Fail(_)) => Ok(true),
        (OutcomeView::Emit(a), OutcomeView::Emit(b)) if a.len() == b.len() => {
            for (a, b) in a.iter().zip(b.iter()) {
                let (a, b) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
                if !same_output(resolve(record, a), resolve(record, b)) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// One outcome in a line, for an example.
fn describe(record: RecordRef<'_>, outcome: &OutcomeView<'_>) -> String {
    let outputs = match outcome {
        OutcomeView::Fail(reason) => return format!("failed: {reason}"),
        OutcomeView::Emit(outputs) if outputs.is_empty() => return "dropped".to_owned(),
        OutcomeView::Emit(outputs) => outputs,
    };
    let shown: Vec<String> = outputs
        .iter()
        .map(|output| match output {
            Ok(output) => {
                let out = resolve(record, output);
                let mut line = format!("value {}", shown(out.value));
                if let Some(key) = out.key {
                    line.push_str(&format!(", key {}", shown(key)));
                }
                if let Some(route) = out.route {
                    line.push_str(&format!(", route `{route}`"));
                }
                if let Some(timestamp) = out.timestamp {
                    line.push_str(&format!(", timestamp {timestamp}"));
                }
                match out.headers.len() {
                    0 => {}
                    n => line.push_str(&format!(", {n} header(s)")),
                }
                line
            }
            Err(err) => format!("unreadable output: {err}"),
        })
        .collect();
    format!("{} output(s): {}", shown.len(), shown.join("; "))
}

/// Bytes as a quoted string; a long one shows its start and its end.
fn shown(bytes: &[u8]) -> String {
    let text = |bytes| format!("{:?}", String::from_utf8_lossy(bytes));
    if bytes.len() <= SHOWN_HEAD + SHOWN_TAIL {
        return text(bytes);
    }
    format!(
        "{} … {} ({} bytes)",
        text(&bytes[..SHOWN_HEAD]),
        text(&bytes[bytes.len() - SHOWN_TAIL..]),
        bytes.len()
    )
}

/// When a canary is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CanaryRule {
    /// Records the canary is judged on (its first ones).
    pub records: u64,
    /// The share of them it may fail (0 to 1); more rolls it back.
    pub max_failure_rate: f64,
}

impl CanaryRule {
    /// The share of records a canary may fail unless told otherwise.
    pub const DEFAULT_MAX_FAILURE_RATE: f64 = 0.01;

    /// A rule, checked: at least one record, a rate from 0 to 1.
    pub fn new(records: u64, max_failure_rate: f64) -> Result<Self, String> {
        if records == 0 {
            return Err("a canary needs at least one record to be judged on".into());
        }
        if !(0.0..=1.0).contains(&max_failure_rate) {
            return Err(format!(
                "the canary's failure rate must be between 0 and 1, not {max_failure_rate}"
            ));
        }
        Ok(CanaryRule {
            records,
            max_failure_rate,
        })
    }

    /// Failures it may have in its first `records`.
    pub fn allowed_failures(&self) -> u64 {
        (self.records as f64 * self.max_failure_rate).floor() as u64
    }
}

/// How a canary ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Its first records failed within the budget: it serves on.
    Passed,
    /// It failed too many: the version before it serves again.
    RolledBack,
}

/// A canary as status shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryReport {
    /// The version on trial.
    pub candidate: VersionInfo,
    /// The version it replaced, restored if it fails.
    pub restores: VersionInfo,
    /// When it is rolled back.
    pub rule: CanaryRule,
    /// Records it has processed (counted per batch).
    pub records: u64,
    /// Of those, records it failed or faulted on (dead-lettered).
    pub failed: u64,
    /// How it ended, once it has.
    pub verdict: Option<Verdict>,
}

/// Tells the controller a canary's verdict.
pub(super) struct CanaryEnded {
    /// The plugin position, from 0.
    pub slot: usize,
    /// Which canary (a later one may have replaced it).
    pub id: u64,
    pub verdict: Verdict,
    /// Why, in a line.
    pub reason: String,
}

const PENDING: u8 = 0;
const PASSED: u8 = 1;
const ROLLED_BACK: u8 = 2;

/// A canary's counts, shared by the lanes; the lane whose batch decides
/// it tells the controller.
pub struct CanaryTally {
    slot: usize,
    id: u64,
    counts: Mutex<CanaryReport>,
    /// The verdict, read by every lane before each batch.
    verdict: AtomicU8,
    ended: mpsc::UnboundedSender<CanaryEnded>,
}

impl CanaryTally {
    pub(super) fn new(
        slot: usize,
        id: u64,
        report: CanaryReport,
        ended: mpsc::UnboundedSender<CanaryEnded>,
    ) -> Arc<Self> {
        Arc::new(CanaryTally {
            slot,
            id,
            counts: Mutex::new(report),
            verdict: AtomicU8::new(PENDING),
            ended,
        })
    }

    /// The canary now.
    pub fn report(&self) -> CanaryReport {
        lock(&self.counts).clone()
    }

    fn verdict(&self) -> Option<Verdict> {
        match self.verdict.load(Ordering::Acquire) {
            PASSED => Some(Verdict::Passed),
            ROLLED_BACK => Some(Verdict::RolledBack),
            _ => None,
        }
    }

    /// Counts a batch of `records` of which `failed` were failed or
    /// faulted on; decides the canary once its budget breaks or its
    /// records are in.
    fn count(&self, records: u64, failed: u64) {
        let mut counts = lock(&self.counts);
        if counts.verdict.is_some() {
            return;
        }
        counts.records += records;
        counts.failed += failed;
        let rule = counts.rule;
        let allowed = rule.allowed_failures();
        let (verdict, reason) = if counts.failed > allowed {
            let reason = format!(
                "canary {} rolled back to {}: {} of its first {} records failed, more than the {} allowed ({}% of {})",
                counts.candidate,
                counts.restores,
                counts.failed,
                counts.records,
                allowed,
                rule.max_failure_rate * 100.0,
                rule.records
            );
            (Verdict::RolledBack, reason)
        } else if counts.records >= rule.records {
            let reason = format!(
                "canary {} passed: {} of its first {} records failed ({} allowed)",
                counts.candidate, counts.failed, counts.records, allowed
            );
            (Verdict::Passed, reason)
        } else {
            return;
        };
        counts.verdict = Some(verdict);
        self.verdict.store(
            match verdict {
                Verdict::Passed => PASSED,
                Verdict::RolledBack => ROLLED_BACK,
            },
            Ordering::Release,
        );
        drop(counts);
        // The controller is gone only once the pipeline stops.
        let _ = self.ended.send(CanaryEnded {
            slot: self.slot,
            id: self.id,
            verdict,
            reason,
        });
    }
}

/// A canary in one lane: the candidate serves; the version it replaced
/// waits aside, started, to be restored.
pub(super) struct Canary {
    tally: Arc<CanaryTally>,
    restore: (PluginVersion, Instance),
}

impl Canary {
    pub(super) fn new(tally: Arc<CanaryTally>, restore: (PluginVersion, Instance)) -> Self {
        Canary { tally, restore }
    }

    /// Counts a batch the candidate processed.
    pub(super) fn count(&self, records: usize, failed: usize) {
        self.tally.count(records as u64, failed as u64);
    }

    /// The verdict, once there is one.
    pub(super) fn verdict(&self) -> Option<Verdict> {
        self.tally.verdict()
    }

    /// The version and instance to restore.
    pub(super) fn into_restore(self) -> (PluginVersion, Instance) {
        self.restore
    }
}

/// What the lanes are told to change at one plugin position, each lane
/// with its own instance.
pub(super) enum Change {
    /// Serve this version from the next batch on (a deploy, a rollback,
    /// a promoted shadow's version); a trial there ends.
    Serve(PluginVersion, Instance),
    /// Serve this version as a canary, the one it replaces kept aside.
    Canary(PluginVersion, Instance, Arc<CanaryTally>),
    /// Run this version in the shadow of the serving one.
    Shadow(PluginVersion, Instance, Arc<ShadowTally>),
    /// The shadow stops.
    Discard,
}

/// A plugin position's trials in one lane.
#[derive(Default)]
pub(super) struct LaneTrials {
    pub shadow: Option<Shadow>,
    pub canary: Option<Canary>,
}

impl LaneTrials {
    /// Ends both trials (the serving version changes); gives back the
    /// instances they held.
    pub(super) fn end_all(&mut self) -> impl Iterator<Item = Instance> + use<> {
        let shadow = self.shadow.take().and_then(Shadow::into_instance);
        let restore = self.canary.take().map(|canary| canary.into_restore().1);
        shadow.into_iter().chain(restore)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A lane that panicked holding a tally left counts, not broken state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
