//! The window stage: between the plugin chain and the sinks, in source
//! order (after the fan-in), so one window sees every record of the
//! pipeline whatever lane processed it. Records go into the window; out
//! come window results (on the default route), late records (on the late
//! route) and dead letters for records the window cannot use.
//!
//! A source that can say which partitions it still has records of (Kafka)
//! keeps the watermark from passing them while it works through a backlog.
//!
//! Delivery stays at-least-once without state checkpoints: a source
//! position is committed only as far as no open window still holds a record
//! at or after it, so after a crash the records of every unfired window are
//! read again (and their windows fire, maybe twice).
//!
//! The lanes read each record's key, time and aggregate arguments in
//! parallel ([`WindowStage::reader`]); the grouping and adding runs on the
//! sink writer's task, a batch at a time.

use std::sync::Arc;
use std::time::Instant;

use weir_guest::abi::RecordParts;

use super::dead_letter::{DeadLetter, Stage};
use crate::batch::Batch;
use crate::metrics::PipelineMetrics;
use crate::metrics::events::BatchWindowed;
use crate::source::{Backlog, Behind, Checkpoint};
use crate::window::{
    FieldReader, PluginAggregate, ReadBatch, RestoreError, WindowImage, WindowOperator,
    WindowOutput, WindowSpec,
};

/// The topic window results say they come from.
pub const RESULT_TOPIC: &str = "window";

/// A pipeline's window and what it has read.
pub(super) struct WindowStage {
    operator: WindowOperator,
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
        let late_route = spec.late_route.clone();
        let mut operator = WindowOperator::with_plugins(spec, plugins);
        if backlog.is_some() {
            operator.backlog(None, Instant::now(), &mut WindowOutput::default());
        }
        WindowStage {
            late_route,
            operator,
            backlog,
            reported: None,
            read: Checkpoint::default(),
            committed: None,
            results: 0,
            metrics,
        }
    }

    /// What the window holds now, as a checkpoint keeps it.
    pub(super) fn snapshot(&mut self) -> Vec<u8> {
        let image = self.operator.snapshot(Instant::now());
        StageImage {
            results: self.results,
            window: image,
        }
        .encode()
    }

    /// Takes back what a checkpoint's [`WindowStage::snapshot`] held.
    pub(super) fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let image = StageImage::decode(bytes)?;
        self.results = image.results;
        self.operator.restore(image.window, Instant::now())
    }

    /// A reader of what the window needs of each record, for a lane.
    pub(super) fn reader(&self) -> FieldReader {
        self.operator.reader()
    }

    /// Runs `records` through the window (`read`: what a lane read of
    /// them; read here if `None`): gives the results and late records to
    /// write, adding dead letters to `dead`.
    pub(super) fn apply(
        &mut self,
        records: Batch,
        read: Option<ReadBatch>,
        dead: &mut Vec<DeadLetter>,
    ) -> Batch {
        let mut out = WindowOutput::default();
        let now = Instant::now();
        self.read_backlog(now, &mut out);
        match read {
            Some(read) => self.operator.push_read(&records, &read, now, &mut out),
            None => self.operator.push(&records, now, &mut out),
        }
        let windowed = records.len() - out.late.len() - out.dead.len();
        self.emit(out, Some(&records), dead, windowed as u64)
    }

    /// Time passed: idle partitions stop holding the watermark back.
    pub(super) fn tick(&mut self, dead: &mut Vec<DeadLetter>) -> Batch {
        let mut out = WindowOutput::default();
        let now = Instant::now();
        self.read_backlog(now, &mut out);
        self.operator.tick(now, &mut out);
        self.emit(out, None, dead, 0)
    }

    /// Tells the window what the source last said it is behind on, if
    /// that changed.
    fn read_backlog(&mut self, now: Instant, out: &mut WindowOutput) {
        let Some(backlog) = &self.backlog else { return };
        let latest = backlog.latest();
        let same = match (&latest, &self.reported) {
            (Some(new), Some(old)) => Arc::ptr_eq(new, old),
            (new, old) => new.is_none() && old.is_none(),
        };
        if !same {
            self.operator.backlog(latest.as_deref(), now, out);
            self.reported = latest;
        }
    }

    /// The input ended: every open window fires.
    pub(super) fn finish(&mut self, dead: &mut Vec<DeadLetter>) -> Batch {
        let mut out = WindowOutput::default();
        self.operator.finish(&mut out);
        self.emit(out, None, dead, 0)
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
        for (topic, partition, lowest) in self.operator.held() {
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
        // Plain data: serialising it cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        postcard::from_bytes(bytes).map_err(|err| RestoreError::Corrupt(err.to_string()))
    }
}
