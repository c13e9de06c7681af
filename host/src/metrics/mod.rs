//! Counters a pipeline keeps about itself, and the typed events that bump
//! them and log together (`events`).
//!
//! Counters are atomics read by the progress line and the end-of-run
//! summary; names follow `weir_<name>_<unit>_total` so that the Prometheus
//! endpoint can export them unchanged.

pub mod events;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One pipeline's counters.
#[derive(Debug)]
pub struct PipelineMetrics {
    /// The pipeline's name.
    pub pipeline: String,
    started: Instant,
    records_in: AtomicU64,
    records_out: AtomicU64,
    records_dropped: AtomicU64,
    records_dead_lettered: AtomicU64,
    plugin_faults: AtomicU64,
    batches: AtomicU64,
    commits_superseded: AtomicU64,
    commits_deferred: AtomicU64,
    commit_errors: AtomicU64,
    records_windowed: AtomicU64,
    records_late: AtomicU64,
    window_results: AtomicU64,
    checkpoints: AtomicU64,
    /// How long each recent commit held the sink writer (flushes, the
    /// checkpoint, the source's commit).
    commit_pauses: Recent,
    /// How long each recent checkpoint took to snapshot its windows.
    state_snapshots: Recent,
}

/// The most recent durations of something, oldest first: at most
/// [`Recent::KEPT`].
#[derive(Debug, Default)]
pub struct Recent(std::sync::Mutex<std::collections::VecDeque<Duration>>);

impl Recent {
    /// How many are kept.
    pub const KEPT: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Duration>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn push(&self, duration: Duration) {
        let mut kept = self.lock();
        if kept.len() == Self::KEPT {
            kept.pop_front();
        }
        kept.push_back(duration);
    }

    /// Every duration kept, oldest first.
    pub fn all(&self) -> Vec<Duration> {
        self.lock().iter().copied().collect()
    }
}

impl PipelineMetrics {
    /// Zeroed counters for `pipeline`, its clock starting now.
    pub fn new(pipeline: &str) -> Self {
        PipelineMetrics {
            pipeline: pipeline.to_owned(),
            started: Instant::now(),
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            records_dropped: AtomicU64::new(0),
            records_dead_lettered: AtomicU64::new(0),
            plugin_faults: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            commits_superseded: AtomicU64::new(0),
            commits_deferred: AtomicU64::new(0),
            commit_errors: AtomicU64::new(0),
            records_windowed: AtomicU64::new(0),
            records_late: AtomicU64::new(0),
            window_results: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            commit_pauses: Recent::default(),
            state_snapshots: Recent::default(),
        }
    }

    /// How long each recent commit that had something to commit held the
    /// sink writer (with checkpoints, each is one).
    pub fn commit_pauses(&self) -> &Recent {
        &self.commit_pauses
    }

    /// How long each recent checkpoint took to snapshot its windows.
    pub fn state_snapshots(&self) -> &Recent {
        &self.state_snapshots
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            pipeline: self.pipeline.clone(),
            elapsed: self.started.elapsed(),
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            records_dropped: self.records_dropped.load(Ordering::Relaxed),
            records_dead_lettered: self.records_dead_lettered.load(Ordering::Relaxed),
            plugin_faults: self.plugin_faults.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            commits_superseded: self.commits_superseded.load(Ordering::Relaxed),
            commits_deferred: self.commits_deferred.load(Ordering::Relaxed),
            commit_errors: self.commit_errors.load(Ordering::Relaxed),
            records_windowed: self.records_windowed.load(Ordering::Relaxed),
            records_late: self.records_late.load(Ordering::Relaxed),
            window_results: self.window_results.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
        }
    }
}

/// The counters of a pipeline at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// The pipeline's name.
    pub pipeline: String,
    /// Time since the pipeline started.
    pub elapsed: Duration,
    /// `weir_records_received_total`: records read from the source.
    pub records_in: u64,
    /// `weir_records_sent_total`: records durably written to every sink
    /// they were routed to (flushed; with exactly-once, committed); dead
    /// letters not counted.
    pub records_out: u64,
    /// `weir_records_dropped_total`: records a plugin emitted nothing for.
    pub records_dropped: u64,
    /// `weir_records_dead_lettered_total`: records sent to the dead-letter sink.
    pub records_dead_lettered: u64,
    /// `weir_plugin_faults_total`: traps, deadlines and limit hits, each of
    /// which cost the record that caused it.
    pub plugin_faults: u64,
    /// `weir_batches_processed_total`.
    pub batches: u64,
    /// `weir_commits_superseded_total`: commits refused because a
    /// rebalance moved the partitions; their new owner reads the records
    /// again.
    pub commits_superseded: u64,
    /// `weir_commits_deferred_total`: commits the cluster could not take
    /// then (away, coordinator moving); their positions went with the next.
    pub commits_deferred: u64,
    /// `weir_commit_errors_total`: commits that failed for good (the
    /// pipeline stops on the first).
    pub commit_errors: u64,
    /// `weir_records_windowed_total`: records taken into windows.
    pub records_windowed: u64,
    /// `weir_records_late_total`: records too late for any window, sent to
    /// the late route.
    pub records_late: u64,
    /// `weir_window_results_total`: window results emitted (updates
    /// included).
    pub window_results: u64,
    /// `weir_checkpoints_total`: checkpoints committed (positions and
    /// window state, with the outputs they led to).
    pub checkpoints: u64,
}

impl MetricsSnapshot {
    /// Records read per second since the start.
    pub fn rate_in(&self) -> f64 {
        self.records_in as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Counters a plugin bumps through the `add-to-counter` host import. The
/// engine holds each plugin to its `limits.counters` and
/// `limits.counter_name_bytes`.
#[derive(Debug, Default, Clone)]
pub struct PluginCounters {
    counts: BTreeMap<String, u64>,
}

impl PluginCounters {
    pub(crate) fn add(&mut self, name: &str, delta: u64) {
        match self.counts.get_mut(name) {
            Some(count) => *count = count.saturating_add(delta),
            None => {
                self.counts.insert(name.to_owned(), delta);
            }
        }
    }

    /// Moves every counter of `pending` into these, leaving it empty. Runs
    /// after every call: a plugin that counts nothing costs one check.
    #[inline]
    pub(crate) fn absorb(&mut self, pending: &mut PluginCounters) {
        if !pending.counts.is_empty() {
            self.absorb_counts(pending);
        }
    }

    fn absorb_counts(&mut self, pending: &mut PluginCounters) {
        for (name, delta) in std::mem::take(&mut pending.counts) {
            let count = self.counts.entry(name).or_default();
            *count = count.saturating_add(delta);
        }
    }

    /// The value of counter `name`.
    pub fn get(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    /// Whether counter `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.counts.contains_key(name)
    }

    /// How many distinct counters there are.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// All counters, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts
            .iter()
            .map(|(name, count)| (name.as_str(), *count))
    }
}
