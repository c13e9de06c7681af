//! Runs a batch of records through a pipeline's plugin chain: packs them,
//! calls each plugin once per batch, and unpacks the outcomes into the next
//! stage's records, dropped counts and dead letters.
//!
//! A fault costs one record before it costs the pipeline. When a plugin
//! traps, runs past its deadline, breaks a limit or replies garbage on a
//! batch, a fresh instance replays the batch one record at a time: the
//! records that fault alone are dead-lettered with the fault as the reason,
//! the rest go on. A record whose outputs break `outputs_per_record` or
//! `output_mb_per_batch` is dead-lettered before the host materialises them.
//! Every fault is counted; `faults_before_quarantine` of them within
//! `fault_window_s` quarantine the pipeline: what is left of the batch is
//! dead-lettered, and the pipeline stops reading.
//!
//! Replaying record by record rather than bisecting: a record that runs to
//! the deadline then costs one more deadline, not one per bisection level,
//! and a batch with many bad records costs one call per record at most.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_guest::abi::{AbiError, OutcomeReader, OutcomeView, OutputView, RecordParts};

use super::dead_letter::{DeadLetter, Stage};
use super::trial::{Canary, Change, LaneTrials, Shadow, Verdict};
use crate::batch::{Batch, TooManyRoutes};
use crate::engine::{Instance, Limits, PluginError, PluginErrorKind};
use crate::plugin::PluginSlot;

/// Bytes a record costs the host beyond its key, value and headers.
const RECORD_OVERHEAD: u64 = 64;

/// What a batch became.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Records that came out of the last plugin.
    pub records: Batch,
    /// Records some plugin failed, faulted on, or whose outputs broke a limit.
    pub dead: Vec<DeadLetter>,
    /// Records some plugin emitted nothing for.
    pub dropped: u64,
    /// Plugin faults and limit hits in this batch.
    pub faults: u64,
    /// Set when this batch's faults quarantined the pipeline: why.
    pub quarantined: Option<String>,
}

impl ChainOutput {
    /// Dead-letters records `from..` of `batch` at `stage`.
    fn dead_letter_rest(&mut self, batch: &Batch, from: usize, reason: &str, stage: &Stage) {
        for index in from..batch.len() {
            self.dead.push(DeadLetter {
                record: batch.to_record(index),
                reason: reason.to_owned(),
                stage: stage.clone(),
            });
        }
    }
}

/// Counts faults over a sliding window; one per pipeline, shared by its
/// lanes.
#[derive(Debug)]
struct FaultLog {
    threshold: u32,
    window: Duration,
    recent: VecDeque<Instant>,
    /// Why the pipeline was quarantined, once it is.
    quarantined: Option<String>,
    /// Tells the run loop, the controller and the lanes when the
    /// quarantine starts (the reason) and when it is lifted (`None`).
    news: tokio::sync::watch::Sender<Option<String>>,
}

impl FaultLog {
    /// Counts one fault; returns the quarantine reason if this one reaches
    /// the threshold.
    fn record(&mut self, fault: &str) -> Option<String> {
        let reason = self.count(fault);
        if self.quarantined.is_none() && reason.is_some() {
            self.quarantined.clone_from(&reason);
            self.news.send_replace(reason.clone());
        }
        reason
    }

    fn count(&mut self, fault: &str) -> Option<String> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|at| now.duration_since(*at) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        (self.recent.len() >= self.threshold as usize).then(|| {
            format!(
                "quarantined after {} plugin faults within {} s (`limits.faults_before_quarantine`); the last: {fault}",
                self.recent.len(),
                self.window.as_secs()
            )
        })
    }
}

/// A pipeline's quarantine, shared by its lanes: watched by the run loop,
/// lifted by an operator (resume, or a rollback).
#[derive(Clone)]
pub struct Quarantine {
    log: Arc<Mutex<FaultLog>>,
}

impl Quarantine {
    /// The reason, while the pipeline is quarantined: `None` when it is not.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        lock_log(&self.log).news.subscribe()
    }

    /// Lifts the quarantine and forgets the faults that led to it; `false`
    /// if there was none.
    pub fn lift(&self) -> bool {
        let mut log = lock_log(&self.log);
        log.recent.clear();
        let lifted = log.quarantined.take().is_some();
        if lifted {
            log.news.send_replace(None);
        }
        lifted
    }
}

fn lock_log(log: &Mutex<FaultLog>) -> std::sync::MutexGuard<'_, FaultLog> {
    // A lane that panicked holding the log left counts, not broken state.
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pipeline's plugins, in order: one chain per lane.
pub struct Chain {
    slots: Vec<PluginSlot>,
    /// Per plugin, its shadow and canary in this lane, if any.
    trials: Vec<LaneTrials>,
    faults: Arc<Mutex<FaultLog>>,
}

/// What one plugin call made of its input.
enum Passed {
    /// Every record was forwarded as it was: the input is the output.
    All,
    /// The outputs were written to the next batch.
    Built,
}

impl Chain {
    /// A chain of these plugins; an empty chain passes records through. It
    /// is quarantined after 10 faults within a minute unless
    /// [`Chain::quarantine_after`] says otherwise.
    pub fn new(slots: Vec<PluginSlot>) -> Self {
        Chain {
            trials: slots.iter().map(|_| LaneTrials::default()).collect(),
            slots,
            faults: Arc::new(Mutex::new(FaultLog {
                threshold: 10,
                window: Duration::from_secs(60),
                recent: VecDeque::new(),
                quarantined: None,
                news: tokio::sync::watch::Sender::new(None),
            })),
        }
    }

    /// The pipeline's quarantine (the same for every lane).
    pub fn quarantine(&self) -> Quarantine {
        Quarantine {
            log: self.faults.clone(),
        }
    }

    /// Another lane of the same pipeline, with these plugin instances: its
    /// faults count towards the same quarantine.
    pub fn lane(&self, slots: Vec<PluginSlot>) -> Self {
        Chain {
            trials: slots.iter().map(|_| LaneTrials::default()).collect(),
            slots,
            faults: self.faults.clone(),
        }
    }

    /// Quarantines the pipeline after `faults` faults within `window`.
    pub fn quarantine_after(&mut self, faults: u32, window: Duration) -> &mut Self {
        let mut log = self.fault_log();
        log.threshold = faults.max(1);
        log.window = window;
        drop(log);
        self
    }

    /// Why the pipeline was quarantined (by any of its lanes), once it is.
    pub fn quarantined(&self) -> Option<String> {
        self.fault_log().quarantined.clone()
    }

    fn fault_log(&self) -> std::sync::MutexGuard<'_, FaultLog> {
        lock_log(&self.faults)
    }

    /// The plugins, in order.
    pub fn slots(&self) -> &[PluginSlot] {
        &self.slots
    }

    /// The plugins, in order.
    pub fn slots_mut(&mut self) -> &mut [PluginSlot] {
        &mut self.slots
    }

    /// Makes `change` at plugin `slot` (from 0); call between batches.
    /// Gives back the instances it no longer runs, for the caller to drop
    /// off the data path (freeing their memory takes longer than this).
    pub(super) fn apply(&mut self, slot: usize, change: Change) -> Vec<Instance> {
        let (plugin, trials) = (&mut self.slots[slot], &mut self.trials[slot]);
        let mut retired = Vec::new();
        match change {
            Change::Serve(version, instance) => {
                retired.extend(trials.end_all());
                retired.push(plugin.install(version, instance));
            }
            Change::Canary(version, instance, tally) => {
                retired.extend(trials.end_all());
                let restore = plugin.current().clone();
                let replaced = plugin.install(version, instance);
                trials.canary = Some(Canary::new(tally, (restore, replaced)));
            }
            Change::Shadow(version, instance, tally) => {
                let shadow = Shadow::new(version, instance, tally);
                retired.extend(
                    trials
                        .shadow
                        .replace(shadow)
                        .and_then(Shadow::into_instance),
                );
            }
            Change::Discard => {
                retired.extend(trials.shadow.take().and_then(Shadow::into_instance));
            }
        }
        retired
    }

    /// Ends the canaries that have a verdict: a rolled-back one gives way
    /// to the instance it replaced, a passed one lets that instance go.
    /// Rare, so the instance let go is dropped here.
    fn settle_canaries(&mut self) {
        for (plugin, trials) in self.slots.iter_mut().zip(&mut self.trials) {
            let Some(verdict) = trials.canary.as_ref().and_then(Canary::verdict) else {
                continue;
            };
            let Some((version, instance)) = trials.canary.take().map(Canary::into_restore) else {
                continue;
            };
            match verdict {
                Verdict::RolledBack => drop(plugin.install(version, instance)),
                Verdict::Passed => drop(instance),
            }
        }
    }

    /// Runs `records` through every plugin. Faults cost the records that
    /// cause them (dead-lettered); only a plugin that cannot be started
    /// again ends the chain with an error.
    pub fn process(&mut self, mut records: Batch) -> Result<ChainOutput, PluginError> {
        self.settle_canaries();
        let mut output = ChainOutput::default();
        for index in 0..self.slots.len() {
            if records.is_empty() {
                break;
            }
            if let Some(reason) = &output.quarantined {
                let reason = format!("not processed: the pipeline was {reason}");
                let stage = self.slots[index].stage();
                output.dead_letter_rest(&records, 0, &reason, &stage);
                records = Batch::new();
                break;
            }
            let slot = &self.slots[index];
            if slot.takes_every_topic() || records.iter().all(|r| slot.takes_topic(r.topic())) {
                records = self.run_slot(index, records, &mut output)?;
                continue;
            }
            // Records of other topics pass this plugin; a partition belongs
            // to one topic, so each partition keeps its order.
            let (mut taken, mut passed) = (Batch::new(), Batch::new());
            for at in 0..records.len() {
                let side = match slot.takes_topic(records.get(at).topic()) {
                    true => &mut taken,
                    false => &mut passed,
                };
                keep_copy(side, &records, at, &mut output);
            }
            records = if taken.is_empty() {
                passed
            } else {
                let mut out = self.run_slot(index, taken, &mut output)?;
                if out.append(&passed).is_err() {
                    for at in 0..passed.len() {
                        keep_copy(&mut out, &passed, at, &mut output);
                    }
                }
                out
            };
        }
        output.records = records;
        Ok(output)
    }

    /// Runs one plugin over `records`, counting what a canary there fails.
    fn run_slot(
        &mut self,
        index: usize,
        records: Batch,
        output: &mut ChainOutput,
    ) -> Result<Batch, PluginError> {
        let (count, dead_before) = (records.len(), output.dead.len());
        let out = self.run_plugin(index, records, output)?;
        if let Some(canary) = &self.trials[index].canary {
            canary.count(count, output.dead.len() - dead_before);
        }
        Ok(out)
    }

    /// Runs one plugin over `records` (and its shadow, if it has one);
    /// after a fault, replays them one by one on fresh instances.
    fn run_plugin(
        &mut self,
        index: usize,
        records: Batch,
        output: &mut ChainOutput,
    ) -> Result<Batch, PluginError> {
        let mut next = Batch::new();
        let first = self.call(index, &records, &mut next, output);
        if let Some(shadow) = &mut self.trials[index].shadow {
            let serving = first.as_ref().ok().map(|(_, reply)| reply.as_slice());
            shadow.compare(&records, serving, self.slots[index].recipe());
        }
        let (error, from) = match first {
            Ok((Passed::All, _)) => return Ok(records),
            Ok((Passed::Built, _)) => return Ok(next),
            Err(Fault { error, unprocessed }) if error.kind.is_fault() => (error, unprocessed),
            Err(Fault { error, .. }) => return Err(*error),
        };
        self.slots[index].restart()?;
        // The batch's fault counts only if no record reproduces it alone.
        let faults_before = output.faults;
        let mut single = Batch::new();
        for at in from..records.len() {
            if let Some(reason) = &output.quarantined {
                let stage = self.slots[index].stage();
                let reason = format!("not processed: the pipeline was {reason}");
                output.dead_letter_rest(&records, at, &reason, &stage);
                break;
            }
            single.clear();
            keep_copy(&mut single, &records, at, output);
            match self.call(index, &single, &mut next, output) {
                Ok((Passed::All, _)) => keep_copy(&mut next, &single, 0, output),
                Ok((Passed::Built, _)) => {}
                Err(Fault { error, unprocessed }) if error.kind.is_fault() => {
                    let reason = error.to_string();
                    let stage = self.slots[index].stage();
                    output.dead_letter_rest(&single, unprocessed, &reason, &stage);
                    self.note_fault(&reason, output);
                    self.slots[index].restart()?;
                }
                Err(Fault { error, .. }) => return Err(*error),
            }
        }
        if output.faults == faults_before {
            let error = error.to_string();
            tracing::warn!(plugin = %self.slots[index].label(), %error, "A batch faulted but none of its records did alone; counted as one fault.");
            self.note_fault(&error, output);
        }
        Ok(next)
    }

    fn note_fault(&mut self, fault: &str, output: &mut ChainOutput) {
        output.faults += 1;
        if output.quarantined.is_none() {
            output.quarantined = self.fault_log().record(fault);
        }
    }

    /// One call: the plugin takes `input` as it is packed, and its reply
    /// becomes records on `next` and dead letters; the reply itself comes
    /// back too. On a fault, says from which record on the outcomes were
    /// not taken.
    fn call(
        &mut self,
        index: usize,
        input: &Batch,
        next: &mut Batch,
        output: &mut ChainOutput,
    ) -> Result<(Passed, Vec<u8>), Fault> {
        let slot = &mut self.slots[index];
        let reply = match slot.instance().process(input.wire()) {
            Ok(reply) => reply,
            Err(error) => {
                return Err(Fault {
                    error: Box::new(error),
                    unprocessed: 0,
                });
            }
        };
        let mut reading = ReplyReader {
            slot,
            faults: &self.faults,
            batch_bytes: 0,
        };
        let passed = reading.apply(&reply, input, next, output)?;
        Ok((passed, reply))
    }
}

/// Copies record `at` of `from` onto `to`; one whose route does not fit
/// `to`'s route table is dead-lettered instead.
fn keep_copy(to: &mut Batch, from: &Batch, at: usize, output: &mut ChainOutput) {
    if let Err(err) = to.push_copy(from, at) {
        output.dead.push(DeadLetter {
            record: from.to_record(at),
            reason: err.to_string(),
            stage: Stage::Route,
        });
    }
}

/// A fault, and the first input whose outcome was not taken. Boxed: faults
/// are rare and the result of every call carries room for one.
struct Fault {
    error: Box<PluginError>,
    unprocessed: usize,
}

/// Turns one plugin reply into records, holding outputs to the limits.
struct ReplyReader<'a> {
    slot: &'a PluginSlot,
    faults: &'a Mutex<FaultLog>,
    /// Bytes of outputs taken so far from this reply.
    batch_bytes: u64,
}

impl ReplyReader<'_> {
    fn apply(
        &mut self,
        reply: &[u8],
        input: &Batch,
        next: &mut Batch,
        output: &mut ChainOutput,
    ) -> Result<Passed, Fault> {
        let limits = self.slot.limits();
        let mut outcomes = match OutcomeReader::new(reply, input.len()) {
            Ok(outcomes) => outcomes,
            Err(err) => return Err(self.bad_reply(err, 0)),
        };
        // While every record so far was forwarded as it was, nothing is
        // copied: the input is the output. The first that was not copies
        // those before it to `next`.
        let mut forwarding = true;
        for at in 0..input.len() {
            let outcome = match outcomes.next() {
                Some(Ok(outcome)) => outcome,
                Some(Err(err)) => {
                    stop_forwarding(&mut forwarding, input, at, next, output);
                    return Err(self.bad_reply(err, at));
                }
                None => unreachable!("the reader checked the outcome count"),
            };
            if forwarding {
                if let OutcomeView::Emit(outputs) = &outcome
                    && let Some(Ok(OutputView::Forward { route: None })) = outputs.only()
                {
                    let bytes = record_bytes(input, at);
                    if self.breaks_limits(&limits, 1, bytes).is_none() {
                        self.batch_bytes += bytes;
                        continue;
                    }
                }
                stop_forwarding(&mut forwarding, input, at, next, output);
            }
            let outputs = match outcome {
                OutcomeView::Emit(outputs) => outputs,
                OutcomeView::Fail(reason) => {
                    output.dead.push(DeadLetter {
                        record: input.to_record(at),
                        reason: reason.to_owned(),
                        stage: self.slot.stage(),
                    });
                    continue;
                }
            };
            if outputs.is_empty() {
                output.dropped += 1;
                continue;
            }
            // Every output is parsed and costed before any is used: a
            // malformed one leaves the input untouched, and outputs that
            // break a limit are never held. A single output (the usual
            // case) is parsed once; several are parsed again as they are
            // taken, so that a flood of them is never held at once.
            let single = match outputs.only() {
                Some(Ok(out)) => Some(out),
                Some(Err(err)) => return Err(self.bad_reply(err, at)),
                None => None,
            };
            let bytes = match &single {
                Some(out) => output_bytes(input, at, out),
                None => match outputs
                    .iter()
                    .map(|out| out.map(|out| output_bytes(input, at, &out)))
                    .sum()
                {
                    Ok(bytes) => bytes,
                    Err(err) => return Err(self.bad_reply(err, at)),
                },
            };
            if let Some(reason) = self.breaks_limits(&limits, outputs.len(), bytes) {
                output.faults += 1;
                if output.quarantined.is_none() {
                    let mut log = self
                        .faults
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    output.quarantined = log.record(&reason);
                }
                output.dead.push(DeadLetter {
                    record: input.to_record(at),
                    reason,
                    stage: self.slot.stage(),
                });
                continue;
            }
            self.batch_bytes += bytes;
            let pushed = match single {
                Some(out) => push_output(next, input, at, &out),
                None => outputs
                    .iter()
                    .flatten()
                    .try_for_each(|out| push_output(next, input, at, &out)),
            };
            if let Err(err) = pushed {
                output.dead.push(DeadLetter {
                    record: input.to_record(at),
                    reason: err.to_string(),
                    stage: Stage::Route,
                });
            }
        }
        if let Err(err) = outcomes.finish() {
            stop_forwarding(&mut forwarding, input, input.len(), next, output);
            return Err(self.bad_reply(err, input.len()));
        }
        Ok(if forwarding {
            Passed::All
        } else {
            Passed::Built
        })
    }

    /// The limit these outputs break, as a dead-letter reason. This runs
    /// for every record: the check is inline, the reason is built apart.
    #[inline]
    fn breaks_limits(&self, limits: &Limits, count: usize, bytes: u64) -> Option<String> {
        if count <= limits.outputs_per_record as usize
            && self.batch_bytes + bytes <= limits.output_bytes_per_batch
        {
            return None;
        }
        Some(self.broken_limit(limits, count, bytes))
    }

    #[cold]
    #[inline(never)]
    fn broken_limit(&self, limits: &Limits, count: usize, bytes: u64) -> String {
        let plugin = format!("plugin `{}` {}", self.slot.name(), self.slot.version());
        if count > limits.outputs_per_record as usize {
            return format!(
                "{plugin}: broke `limits.outputs_per_record` ({}): it emitted {count} outputs for this record",
                limits.outputs_per_record
            );
        }
        format!(
            "{plugin}: broke `limits.output_mb_per_batch` ({} MiB): this record's {count} outputs ({bytes} bytes) would take its batch to {} bytes",
            limits.output_bytes_per_batch >> 20,
            self.batch_bytes + bytes
        )
    }

    fn bad_reply(&self, err: AbiError, unprocessed: usize) -> Fault {
        Fault {
            error: Box::new(PluginError {
                plugin: self.slot.name().to_owned(),
                version: self.slot.version().to_owned(),
                export: "process",
                kind: PluginErrorKind::BadReply(err.to_string()),
            }),
            unprocessed,
        }
    }
}

/// Ends a forwarding run: the records before `at`, forwarded as they were,
/// are copied to `next`.
#[cold]
fn stop_forwarding(
    forwarding: &mut bool,
    input: &Batch,
    at: usize,
    next: &mut Batch,
    output: &mut ChainOutput,
) {
    if std::mem::take(forwarding) {
        for before in 0..at {
            keep_copy(next, input, before, output);
        }
    }
}

/// Routes the record just pushed onto `next`, or takes it back off when
/// its batch has no room for one more route name.
fn route_last(next: &mut Batch, route: Option<&str>) -> Result<(), TooManyRoutes> {
    next.route_last(route).inspect_err(|_| next.pop())
}

/// What output `out` of record `at` costs the host to hold.
#[inline]
fn output_bytes(input: &Batch, at: usize, out: &OutputView<'_>) -> u64 {
    match out {
        OutputView::Forward { .. } => record_bytes(input, at),
        OutputView::New(new) => {
            let headers: usize = new.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            (new.value.len() + new.key.map_or(0, <[u8]>::len) + headers) as u64 + RECORD_OVERHEAD
        }
    }
}

/// What record `at` costs the host to hold.
#[inline]
fn record_bytes(batch: &Batch, at: usize) -> u64 {
    batch.held_bytes_of(at) as u64
}

/// Appends output `out` of record `at` of `input` to `next`: the input
/// copied (a forward) or the record the plugin wrote, which keeps the
/// input's source position and, unless it sets its own, its timestamp and
/// route.
#[inline]
fn push_output(
    next: &mut Batch,
    input: &Batch,
    at: usize,
    out: &OutputView<'_>,
) -> Result<(), TooManyRoutes> {
    match out {
        OutputView::Forward { route } => {
            next.push_copy(input, at)?;
            if route.is_some() {
                route_last(next, *route)?;
            }
        }
        OutputView::New(new) => {
            let record = input.get(at);
            next.push(
                RecordParts {
                    key: new.key,
                    value: new.value,
                    timestamp: new.timestamp.or(record.timestamp()),
                    topic: record.topic(),
                    partition: record.partition(),
                    offset: record.offset(),
                },
                new.headers.iter(),
            );
            route_last(next, new.route.or(record.route()))?;
            if record.tombstone_mark() {
                next.mark_last_tombstone();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{lock_log, FaultLog, Quarantine};
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn the_fault_log_quarantines_at_its_threshold_and_a_lift_starts_it_afresh() {
        let log = Arc::new(Mutex::new(FaultLog {
            threshold: 3,
            window: Duration::from_secs(3600),
            recent: VecDeque::new(),
            quarantined: None,
            news: tokio::sync::watch::Sender::new(None),
        }));
        let quarantine = Quarantine { log: log.clone() };
        let news = quarantine.watch();
        assert_eq!(lock_log(&log).record("a"), None);
        assert_eq!(lock_log(&log).record("b"), None);
        let reason = lock_log(&log).record("the third").unwrap();
        assert!(
            reason.starts_with("quarantined after 3 plugin faults within 3600 s")
                && reason.ends_with("the last: the third"),
            "{reason}"
        );
        assert_eq!(news.borrow().as_deref(), Some(reason.as_str()));
        assert!(quarantine.lift());
        assert_eq!(*news.borrow(), None);
        assert!(!quarantine.lift());
        // The faults before the lift no longer count.
        assert_eq!(lock_log(&log).record("d"), None);
        assert_eq!(lock_log(&log).record("e"), None);
        assert!(lock_log(&log).record("f").is_some());
    }
}
