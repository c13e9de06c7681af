//! Typed telemetry events: each logs and counts in one place, once per batch.

use std::sync::atomic::Ordering;

use super::PipelineMetrics;

/// A batch was read from the source.
pub struct BatchRead {
    /// Records (and rejected inputs) in it.
    pub records: u64,
}

impl BatchRead {
    /// Counts its records in.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics
            .records_in
            .fetch_add(self.records, Ordering::Relaxed);
    }
}

/// A batch went through the plugin chain and reached the sinks.
pub struct BatchProcessed {
    /// Records dropped by a plugin.
    pub dropped: u64,
    /// Plugin faults and limit hits.
    pub faults: u64,
}

impl BatchProcessed {
    /// Counts the batch.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.batches.fetch_add(1, Ordering::Relaxed);
        metrics
            .records_dropped
            .fetch_add(self.dropped, Ordering::Relaxed);
        metrics
            .plugin_faults
            .fetch_add(self.faults, Ordering::Relaxed);
        tracing::trace!(
            pipeline = %metrics.pipeline,
            dropped = self.dropped,
            faults = self.faults,
            "Batch processed."
        );
    }
}

/// A batch went through the window.
pub struct BatchWindowed {
    /// Records taken into windows.
    pub windowed: u64,
    /// Records too late for any window.
    pub late: u64,
    /// Window results it made.
    pub results: u64,
}

impl BatchWindowed {
    /// Counts them.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        let counters = [
            (&metrics.records_windowed, self.windowed),
            (&metrics.records_late, self.late),
            (&metrics.window_results, self.results),
        ];
        for (counter, count) in counters {
            if count > 0 {
                counter.fetch_add(count, Ordering::Relaxed);
            }
        }
    }
}

/// Records written earlier are now durable in every sink they went to.
pub struct RecordsSent {
    /// How many.
    pub count: u64,
}

impl RecordsSent {
    /// Counts them out.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.records_out.fetch_add(self.count, Ordering::Relaxed);
    }
}

/// Records of a batch went to the dead-letter sink.
pub struct RecordsDeadLettered<'a> {
    /// How many.
    pub count: u64,
    /// The first one's reason, as an example for the log.
    pub first_reason: &'a str,
}

impl RecordsDeadLettered<'_> {
    /// Counts and logs them.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        if self.count == 0 {
            return;
        }
        metrics
            .records_dead_lettered
            .fetch_add(self.count, Ordering::Relaxed);
        tracing::warn!(
            pipeline = %metrics.pipeline,
            count = self.count,
            first_reason = self.first_reason,
            "Records sent to the dead-letter sink."
        );
    }
}

/// A source commit failed for good: the pipeline stops.
pub struct CommitFailed<'a> {
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl CommitFailed<'_> {
    /// Counts and logs it.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(pipeline = %metrics.pipeline, error = %self.error, "Source commit failed.");
    }
}

/// A rebalance moved partitions before their commit landed.
pub struct CommitSuperseded;

impl CommitSuperseded {
    /// Counts it (the source has logged why).
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.commits_superseded.fetch_add(1, Ordering::Relaxed);
    }
}

/// The cluster could not take a commit now; it goes with the next one.
pub struct CommitDeferred;

impl CommitDeferred {
    /// Counts it (the pipeline logs the first of a streak).
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.commits_deferred.fetch_add(1, Ordering::Relaxed);
    }
}

/// A commit that had something to commit is done.
pub struct Committed {
    /// How long it held the sink writer.
    pub pause: std::time::Duration,
}

impl Committed {
    /// Remembers its pause.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.commit_pauses.push(self.pause);
    }
}

/// A checkpoint committed.
pub struct Checkpointed {
    /// How long taking its window images took.
    pub snapshot: std::time::Duration,
    /// Bytes of window state in it.
    pub state_bytes: usize,
}

impl Checkpointed {
    /// Counts it.
    pub fn emit(&self, metrics: &PipelineMetrics) {
        metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
        metrics.state_snapshots.push(self.snapshot);
        tracing::debug!(
            pipeline = %metrics.pipeline,
            snapshot_ms = self.snapshot.as_secs_f64() * 1e3,
            state_bytes = self.state_bytes,
            "Checkpoint committed."
        );
    }
}
