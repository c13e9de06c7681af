//! Lanes: a pipeline processes several batches at once, each lane with its
//! own plugin chain, run on the engine's plugin threads (`Scheduler`). The fan-out numbers every
//! source batch and hands it to a lane, or, for a source whose partitions
//! must each stay in one lane (Kafka), hands each lane its part of it. The
//! fan-in puts processed parts back in source order before the sinks see
//! them, so outputs, dead letters and commits are what one lane would give.
//!
//! Memory stays bounded: each lane takes at most `IN_FLIGHT` batches ahead,
//! and the fan-out waits for a lane with no room.
//!
//! A plugin swap travels in band: the fan-out puts one install order in
//! every lane's queue between two source batches, so every lane switches at
//! the same source batch, and no batch (nor any part of one) mixes versions.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::chain::Chain;
use super::dead_letter::{DeadLetter, Stage};
use super::trial::Change;
use crate::batch::Batch;
use crate::engine::{Instance, Party, PluginError, Scheduler};
use crate::source::{Checkpoint, Rejected, SourceBatch, Spread, Validate};
use crate::window::{FieldReader, ReadBatch};

/// Batches a lane takes ahead of the one it processes.
pub(super) const IN_FLIGHT: usize = 2;

/// A source batch, or one lane's part of it.
pub(super) struct Job {
    seq: u64,
    lane: usize,
    /// How many parts the source batch was split into.
    parts: usize,
    records: Batch,
    /// Input the source could not make a record of (with the first part).
    rejected: Vec<Rejected>,
    /// Where the source batch ends (with the first part).
    checkpoint: Option<Checkpoint>,
    /// What its records must still be checked for.
    validate: Validate,
}

/// What a lane is told to do next, in source order.
pub(super) enum Order {
    /// Process a batch (or a part of one).
    Process(Job),
    /// Change what serves (or shadows) a plugin from the next batch on
    /// (boxed: rare, and larger than a job).
    Install(Box<Install>),
}

/// Make `change` at plugin `slot`; say on `done` how long the lane spent
/// on it (the data path's pause), handing back the instances it no longer
/// runs, to be dropped elsewhere.
pub(super) struct Install {
    slot: usize,
    change: Change,
    done: oneshot::Sender<Installed>,
}

/// A lane's answer to an install order.
pub(super) struct Installed {
    /// How long the lane spent switching.
    pub pause: Duration,
    /// The instances it no longer runs.
    pub replaced: Vec<Instance>,
}

/// A part after its lane's chain, on its way to the sinks.
pub(super) struct Processed {
    seq: u64,
    lane: usize,
    parts: usize,
    pub records: Batch,
    /// What the pipeline's window reads of `records`, if it has one.
    pub read: Option<ReadBatch>,
    pub dead: Vec<DeadLetter>,
    pub dropped: u64,
    pub faults: u64,
    pub checkpoint: Option<Checkpoint>,
}

/// Why a lane stopped taking batches.
pub(super) enum ChainStop {
    /// A plugin could not be started again after a fault.
    Plugin(PluginError),
    /// Too many faults: the pipeline is quarantined.
    Quarantined(String),
}

/// Hands source batches to the lanes.
pub(super) struct FanOut {
    lanes: Vec<mpsc::Sender<Order>>,
    spread: Spread,
    seq: u64,
    next_lane: usize,
}

/// Every lane has stopped listening.
pub(super) struct LanesGone;

impl FanOut {
    /// A fan-out to these lanes.
    pub(super) fn new(lanes: Vec<mpsc::Sender<Order>>, spread: Spread) -> Self {
        FanOut {
            lanes,
            spread,
            seq: 0,
            next_lane: 0,
        }
    }

    /// Hands `batch` to the lanes, waiting while a lane it goes to is full.
    pub(super) async fn send(&mut self, batch: SourceBatch) -> Result<(), LanesGone> {
        for job in self.split(batch) {
            let lane = job.lane;
            self.lanes[lane]
                .send(Order::Process(job))
                .await
                .map_err(|_| LanesGone)?;
        }
        Ok(())
    }

    /// Orders every lane to make its change at plugin `slot` after the
    /// batches already handed out: one change (and one `done`) per lane.
    pub(super) async fn install(
        &mut self,
        slot: usize,
        changes: Vec<Change>,
        done: Vec<oneshot::Sender<Installed>>,
    ) -> Result<(), LanesGone> {
        for ((lane, change), done) in self.lanes.iter().zip(changes).zip(done) {
            let order = Order::Install(Box::new(Install { slot, change, done }));
            lane.send(order).await.map_err(|_| LanesGone)?;
        }
        Ok(())
    }

    fn split(&mut self, batch: SourceBatch) -> Vec<Job> {
        self.seq += 1;
        let lanes = self.lanes.len();
        let SourceBatch {
            records,
            mut rejected,
            checkpoint,
            validate,
        } = batch;
        let lane_of = |at: usize| records.get(at).partition().rem_euclid(lanes as i32) as usize;
        let whole_to = match self.spread {
            _ if lanes == 1 => Some(0),
            Spread::Batches => {
                let lane = self.next_lane;
                self.next_lane = (lane + 1) % lanes;
                Some(lane)
            }
            Spread::Partitions if records.is_empty() => Some(0),
            Spread::Partitions => {
                let first = lane_of(0);
                (1..records.len())
                    .all(|at| lane_of(at) == first)
                    .then_some(first)
            }
        };
        if let Some(lane) = whole_to {
            return vec![Job {
                seq: self.seq,
                lane,
                parts: 1,
                records,
                rejected,
                checkpoint: Some(checkpoint),
                validate,
            }];
        }
        let mut parts: Vec<Batch> = (0..lanes).map(|_| Batch::new()).collect();
        for at in 0..records.len() {
            if let Err(err) = parts[lane_of(at)].push_copy(&records, at) {
                rejected.push(Rejected {
                    record: records.to_record(at),
                    reason: err.to_string(),
                });
            }
        }
        let used = parts.iter().filter(|part| !part.is_empty()).count();
        let mut extras = Some((rejected, checkpoint));
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(lane, records)| {
                let (rejected, checkpoint) = match extras.take() {
                    Some((rejected, checkpoint)) => (rejected, Some(checkpoint)),
                    None => (Vec::new(), None),
                };
                Job {
                    seq: self.seq,
                    lane,
                    parts: used,
                    records,
                    rejected,
                    checkpoint,
                    validate,
                }
            })
            .collect()
    }
}

/// Where a lane runs its batches, and what it does under quarantine.
pub(super) struct LaneRun {
    pub pool: Scheduler,
    pub party: Party,
    /// Keep the batches that arrive while the pipeline is quarantined, to
    /// process once an operator lifts it (there is an admin API to); else
    /// the lane ends at the quarantine.
    pub hold: bool,
}

/// One lane: runs each job through `chain` on the plugin threads, in its
/// party's fair turn, reads what the pipeline's window needs of its outputs
/// (with `window`, if it has one) and sends them on. Stops when the jobs
/// end or the sinks stop listening; at a quarantine (by this lane or
/// another) it stops too, or, with `hold`, keeps its batches (and takes
/// swaps) until the quarantine is lifted. A lane is a task, not a thread:
/// it holds a plugin thread only while a batch runs.
pub(super) async fn run_lane(
    mut chain: Chain,
    mut window: Option<FieldReader>,
    mut orders: mpsc::Receiver<Order>,
    processed: mpsc::Sender<Processed>,
    run: LaneRun,
) -> Result<(), ChainStop> {
    let mut lifted = chain.quarantine().watch();
    let mut held = VecDeque::new();
    loop {
        let quarantined = chain.quarantined();
        let job = match held.pop_front() {
            Some(job) if quarantined.is_none() => job,
            Some(job) => {
                held.push_front(job);
                let order = tokio::select! {
                    order = orders.recv() => order,
                    Ok(()) = lifted.changed() => continue,
                };
                match order {
                    Some(Order::Process(job)) => {
                        held.push_back(job);
                        continue;
                    }
                    Some(Order::Install(install)) => {
                        install_in(&mut chain, *install);
                        continue;
                    }
                    // Held batches are neither processed nor committed.
                    None => break,
                }
            }
            None => match orders.recv().await {
                Some(Order::Process(job)) => job,
                Some(Order::Install(install)) => {
                    install_in(&mut chain, *install);
                    continue;
                }
                None => break,
            },
        };
        if let Some(reason) = quarantined {
            if run.hold {
                held.push_back(job);
                continue;
            }
            // The pipeline is quarantined and stops: this batch is neither
            // processed nor committed.
            return Err(ChainStop::Quarantined(reason));
        }
        let (back, done) = (run.pool)
            .run(&run.party, move || {
                let done = process(&mut chain, window.as_ref(), job);
                ((chain, window), done)
            })
            .await;
        (chain, window) = back;
        let (part, quarantined) = done.map_err(ChainStop::Plugin)?;
        if processed.send(part).await.is_err() {
            break;
        }
        if let (Some(reason), false) = (quarantined, run.hold) {
            // What was processed is written and committed; nothing more is.
            return Err(ChainStop::Quarantined(reason));
        }
    }
    Ok(())
}

/// Makes an install order's change in `chain` and answers it.
fn install_in(chain: &mut Chain, install: Install) {
    let Install { slot, change, done } = install;
    let started = Instant::now();
    let replaced = chain.apply(slot, change);
    let pause = started.elapsed();
    let _ = done.send(Installed { pause, replaced });
}

/// Runs `job` through `chain` (on a plugin thread): the processed part, and
/// the quarantine reason if its faults quarantined the pipeline.
fn process(
    chain: &mut Chain,
    window: Option<&FieldReader>,
    job: Job,
) -> Result<(Processed, Option<String>), PluginError> {
    let mut rejected = job.rejected;
    // With no plugin to change the records first, a window's read of
    // them checks them too (one pass, not two), when all pass.
    let checked = match (window, job.validate) {
        (Some(reader), Validate::Json) if chain.slots().is_empty() => {
            reader.read_checked(&job.records)
        }
        _ => None,
    };
    let records = match checked {
        Some(_) => job.records,
        None => job.validate.apply(job.records, &mut rejected),
    };
    let mut dead: Vec<DeadLetter> = rejected
        .into_iter()
        .map(|rejected| DeadLetter {
            record: rejected.record,
            reason: rejected.reason,
            stage: Stage::Source,
        })
        .collect();
    let output = chain.process(records)?;
    dead.extend(output.dead);
    let read = checked.or_else(|| window.map(|reader| reader.read(&output.records)));
    let part = Processed {
        seq: job.seq,
        lane: job.lane,
        parts: job.parts,
        records: output.records,
        read,
        dead,
        dropped: output.dropped,
        faults: output.faults,
        checkpoint: job.checkpoint,
    };
    Ok((part, output.quarantined))
}

/// Puts processed parts back in source order.
pub(super) struct FanIn {
    /// The next source batch to write.
    next: u64,
    waiting: BTreeMap<u64, Vec<Processed>>,
}

impl FanIn {
    /// Waiting for the first source batch.
    pub(super) fn new() -> Self {
        FanIn {
            next: 1,
            waiting: BTreeMap::new(),
        }
    }

    /// Takes a processed part.
    pub(super) fn push(&mut self, part: Processed) {
        self.waiting.entry(part.seq).or_default().push(part);
    }

    /// The parts of the next source batch, in lane order, once all have
    /// arrived.
    pub(super) fn pop_ready(&mut self) -> Option<Vec<Processed>> {
        let (&seq, parts) = self.waiting.first_key_value()?;
        if seq != self.next || parts.len() < parts[0].parts {
            return None;
        }
        let (seq, mut parts) = self.waiting.pop_first()?;
        self.next = seq + 1;
        parts.sort_by_key(|part| part.lane);
        Some(parts)
    }
}
