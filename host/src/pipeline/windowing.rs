//! The window stage: between the plugin chain and the sinks, in source
//! order (after the fan-in). Records go into the window; out come window
//! results (on the default route), late records (on the late route) and
//! dead letters for records the window cannot use.
//!
//! Each source partition has its own window (its own operator, watermark
//! and state), as a Kafka Streams task has: what a partition's windows
//! give depends only on that partition's records, in their order, so a
//! replay after a crash gives exactly what the first run gave, and a
//! partition's state can move to another worker on its own (a checkpoint
//! keeps it per partition). A key's records are expected in one partition
//! (Kafka routes by key): a key seen in several partitions gets a result
//! per partition. A partition that goes quiet for
//! `idle_timeout` (and that the source is not behind on) has its windows
//! closed by the watermark of the pipeline's other partitions.
//!
//! Delivery without checkpoints (no sink that keeps them, and not
//! exactly-once Kafka, whose transactions keep them) stays at-least-once: a
//! source position is committed only as far as no open window still holds
//! a record at or after it, so after a crash the records of every unfired
//! window are read again (and their windows fire, maybe twice).
//!
//! The lanes read each record's key, time and aggregate arguments in
//! parallel ([`WindowStage::reader`]); the grouping and adding runs on the
//! sink writer's task, a batch at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use weir_guest::abi::RecordParts;

use super::dead_letter::{DeadLetter, Stage};
use crate::batch::Batch;
use crate::metrics::PipelineMetrics;
use crate::metrics::events::BatchWindowed;
use crate::source::{Backlog, Behind, Checkpoint};
use crate::state::Claims;
use crate::window::{
    FieldReader, PluginAggregate, ReadBatch, RestoreError, SharedAggregate, WindowImage,
    WindowOperator, WindowOutput, WindowSpec, decode_image, encode_image,
};

/// The topic window results say they come from.
pub const RESULT_TOPIC: &str = "window";

/// A source partition: (topic, partition).
type PartitionKey = (Arc<str>, i32);

/// A pipeline's windows, one per source partition, and what they read.
pub(super) struct WindowStage {
    spec: WindowSpec,
    plugins: Vec<SharedAggregate>,
    /// Shared by every partition's operator and the lanes: keys hash alike.
    reader: FieldReader,
    /// Each partition's window, with the generation of the claim it was
    /// taken up under (0: unclaimed).
    windows: HashMap<PartitionKey, (u64, WindowOperator)>,
    /// The partitions this worker holds, when they are assigned (Kafka
    /// with a sink that keeps checkpoints): a partition claimed again
    /// starts from the state it was claimed with.
    claims: Option<Arc<Claims>>,
    late_route: String,
    /// Every source position read so far.
    read: Checkpoint,
    /// The source's report of what it is behind on, and the last one read.
    backlog: Option<Backlog>,
    reported: Option<Behind>,
    /// The last positions handed out to commit.
    committed: Option<Checkpoint>,
    /// Result records made so far (their offsets).
    results: i64,
    metrics: Arc<PipelineMetrics>,
}

impl WindowStage {
    /// `backlog`: what the source says it has still to deliver, if it can.
    pub(super) fn new(
        spec: WindowSpec,
        plugins: Vec<PluginAggregate>,
        backlog: Option<Backlog>,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        let plugins: Vec<SharedAggregate> = plugins.into_iter().map(SharedAggregate::new).collect();
        let reader = WindowOperator::with_shared(spec.clone(), plugins.clone()).reader();
        WindowStage {
            late_route: spec.late_route.clone(),
            spec,
            plugins,
            reader,
            windows: HashMap::new(),
            claims: None,
            backlog,
            reported: None,
            read: Checkpoint::default(),
            committed: None,
            results: 0,
            metrics,
        }
    }

    /// Takes up each partition's window from `claims`, if given.
    pub(super) fn claimed_by(mut self, claims: Option<Arc<Claims>>) -> Self {
        self.claims = claims;
        self
    }

    /// A reader of what the window needs of each record, for a lane.
    pub(super) fn reader(&self) -> FieldReader {
        self.reader.clone()
    }

    /// Forgets the windows of partitions this worker no longer holds.
    pub(super) fn forget_unowned(&mut self) {
        if let Some(claims) = &self.claims {
            (self.windows).retain(|(topic, partition), _| claims.owns(topic, *partition));
        }
    }

    /// The window of `partition`: new (and told what the source is behind
    /// on) if it had none, or if the partition was claimed again since
    /// (then with the state it was claimed with).
    fn window_of(&mut self, partition: &PartitionKey, now: Instant) -> &mut WindowOperator {
        let claim = (self.claims.as_ref()).and_then(|c| c.take(&partition.0, partition.1));
        let stale = match (&claim, self.windows.get(partition)) {
            (Some((generation, _)), Some((taken_under, _))) => generation != taken_under,
            (_, None) => true,
            (None, Some(_)) => false,
        };
        if stale {
            let mut operator = WindowOperator::with_shared(self.spec.clone(), self.plugins.clone())
                .sharing_reader(self.reader.clone());
            if self.backlog.is_some() {
                let behind = self.reported.as_deref().map(|b| own(b, partition));
                let mut ignored = WindowOutput::default();
                operator.backlog(None, now, &mut ignored);
                if let Some(behind) = behind {
                    operator.backlog(Some(&behind), now, &mut ignored);
                }
            }
            let (generation, state) = claim.unwrap_or((0, None));
            if let Some(state) = state {
                let restored = StageImage::decode(&state).and_then(|image| {
                    self.results = self.results.max(image.results);
                    operator.restore(image.window, now)
                });
                operator.touch(now);
                // The checkpoint was this window's own: it reads back
                // unless it was damaged.
                if let Err(err) = restored {
                    tracing::error!(topic = %partition.0, partition = partition.1, %err, "The partition's window state cannot be taken up; its windows start empty.");
                }
            }
            self.windows
                .insert(partition.clone(), (generation, operator));
        }
        let (_, window) = self
            .windows
            .get_mut(partition)
            .unwrap_or_else(|| unreachable!("inserted above"));
        window
    }

    /// Runs `records` through the windows of their partitions (`read`:
    /// what a lane read of them; read here if `None`): gives the results
    /// and late records to write, adding dead letters to `dead`.
    pub(super) fn apply(
        &mut self,
        records: Batch,
        read: Option<ReadBatch>,
        dead: &mut Vec<DeadLetter>,
    ) -> Batch {
        let mut out = WindowOutput::default();
        let now = Instant::now();
        self.read_backlog(now, &mut out);
        let read = read.unwrap_or_else(|| self.reader.read(&records));
        // Runs of records of one partition go to its window together.
        let mut from = 0;
        let mut source: Option<PartitionKey> = None;
        for at in 0..records.len() {
            let same = matches!(read.get(at), Ok((row, _)) if row.same_source);
            if same && source.is_some() {
                continue;
            }
            let record = records.get(at);
            let this = (record.topic(), record.partition());
            if source.as_ref().is_some_and(|s| (&*s.0, s.1) == this) {
                continue;
            }
            if let Some(source) = source.take() {
                let window = self.window_of(&source, now);
                window.push_range(&records, &read, from..at, now, &mut out);
            }
            source = Some((this.0.into(), this.1));
            from = at;
        }
        if let Some(source) = source {
            let window = self.window_of(&source, now);
            window.push_range(&records, &read, from..records.len(), now, &mut out);
        }
        let windowed = records.len() - out.late.len() - out.dead.len();
        self.emit(out, Some(&records), dead, windowed as u64)
    }

    /// Time passed: idle partitions stop holding the watermark back.
    pub(super) fn tick(&mut self, dead: &mut Vec<DeadLetter>) -> Batch {
        let mut out = WindowOutput::default();
        let now = Instant::now();
        self.read_backlog(now, &mut out);
        for (_, window) in self.windows.values_mut() {
            window.tick(now, &mut out);
        }
        // A quiet partition's windows close as the others move on.
        let highest = self.windows.values().map(|(_, w)| w.watermark()).max();
        if let Some(highest) = highest {
            for (_, window) in self.windows.values_mut() {
                if window.is_idle(now) && window.watermark() < highest {
                    window.advance(highest, &mut out);
                }
            }
        }
        self.emit(out, None, dead, 0)
    }

    /// Tells each window what the source last said it is behind on, if
    /// that changed.
    fn read_backlog(&mut self, now: Instant, out: &mut WindowOutput) {
        let Some(backlog) = &self.backlog else { return };
        let latest = backlog.latest();
        let same = match (&latest, &self.reported) {
            (Some(new), Some(old)) => Arc::ptr_eq(new, old),
            (new, old) => new.is_none() && old.is_none(),
        };
        if same {
            return;
        }
        for (partition, (_, window)) in &mut self.windows {
            let behind = latest.as_deref().map(|behind| own(behind, partition));
            window.backlog(behind.as_deref(), now, out);
        }
        self.reported = latest;
    }

    /// The input ended: every open window fires.
    pub(super) fn finish(&mut self, dead: &mut Vec<DeadLetter>) -> Batch {
        let mut out = WindowOutput::default();
        for (_, window) in self.windows.values_mut() {
            window.finish(&mut out);
        }
        self.emit(out, None, dead, 0)
    }

    /// What each partition's window holds now, as a checkpoint keeps it.
    pub(super) fn snapshot(&mut self) -> Vec<(PartitionKey, Vec<u8>)> {
        let now = Instant::now();
        let results = self.results;
        (self.windows.iter_mut())
            .map(|(partition, (_, window))| {
                let image = StageImage {
                    results,
                    window: window.snapshot(now),
                };
                (partition.clone(), image.encode())
            })
            .collect()
    }

    /// Takes back what a checkpoint's [`WindowStage::snapshot`] held of
    /// `partition`.
    pub(super) fn restore(
        &mut self,
        partition: PartitionKey,
        bytes: &[u8],
    ) -> Result<(), RestoreError> {
        let image = StageImage::decode(bytes)?;
        self.results = self.results.max(image.results);
        let now = Instant::now();
        self.windows.remove(&partition);
        let window = self.window_of(&partition, now);
        window.restore(image.window, now)?;
        window.touch(now);
        Ok(())
    }

    fn emit(
        &mut self,
        out: WindowOutput,
        input: Option<&Batch>,
        dead: &mut Vec<DeadLetter>,
        windowed: u64,
    ) -> Batch {
        let mut batch = Batch::new();
        for result in &out.results {
            batch.push(
                RecordParts {
                    key: Some(&result.key),
                    value: result.value.as_bytes(),
                    timestamp: Some(result.window_end),
                    topic: RESULT_TOPIC,
                    partition: 0,
                    offset: self.results,
                },
                std::iter::empty(),
            );
            self.results += 1;
            // A plugin aggregate that failed is `null` in the result; a
            // copy of it goes to the dead letters with the reason.
            if !result.errors.is_empty() {
                dead.push(DeadLetter {
                    record: batch.to_record(batch.len() - 1),
                    reason: format!("window: {}", result.errors.join("; ")),
                    stage: Stage::Window,
                });
            }
        }
        let mut late = 0;
        if let Some(input) = input {
            for &at in &out.late {
                let routed = batch
                    .push_copy(input, at)
                    .and_then(|()| batch.route_last(Some(&self.late_route)));
                match routed {
                    Ok(()) => late += 1,
                    Err(err) => dead.push(DeadLetter {
                        record: input.to_record(at),
                        reason: err.to_string(),
                        stage: Stage::Route,
                    }),
                }
            }
            for (at, reason) in out.dead {
                dead.push(DeadLetter {
                    record: input.to_record(at),
                    reason,
                    stage: Stage::Window,
                });
            }
        }
        BatchWindowed {
            windowed,
            late,
            results: out.results.len() as u64,
        }
        .emit(&self.metrics);
        batch
    }

    /// Notes that `read` was read; gives the positions that may be
    /// committed now (none if they did not change): every position read,
    /// but none past a record an open window holds.
    pub(super) fn committable(&mut self, read: Option<Checkpoint>) -> Option<Checkpoint> {
        for position in read.iter().flat_map(|read| &read.positions) {
            self.read.advance(position);
        }
        let mut capped = self.read.clone();
        let held = self.windows.values().flat_map(|(_, w)| w.held());
        for (topic, partition, lowest) in held {
            if let Some(position) = (capped.positions.iter_mut())
                .find(|p| p.partition == partition && &*p.topic == topic)
            {
                position.offset = position.offset.min(lowest - 1);
            }
        }
        if capped.positions.is_empty() || self.committed.as_ref() == Some(&capped) {
            return None;
        }
        self.committed = Some(capped.clone());
        Some(capped)
    }
}

/// A window stage's state: the operator's and how many results it made
/// (the offsets of the next ones).
#[derive(serde::Serialize, serde::Deserialize)]
struct StageImage {
    results: i64,
    window: WindowImage,
}

impl StageImage {
    fn encode(&self) -> Vec<u8> {
        encode_image(self)
    }

    fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        decode_image(bytes)
    }
}

/// Of the partitions the source is `behind` on, `partition` if it is one.
fn own(behind: &[PartitionKey], partition: &PartitionKey) -> Vec<PartitionKey> {
    behind.iter().filter(|p| *p == partition).cloned().collect()
}
