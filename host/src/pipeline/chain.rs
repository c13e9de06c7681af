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
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_guest::abi::{
    AbiError, BatchWriter, NewRecordView, OutcomeReader, OutcomeView, OutputView, RecordParts,
};

use super::dead_letter::DeadLetter;
use crate::engine::{Limits, PluginError, PluginErrorKind};
use crate::plugin::PluginSlot;
use crate::record::Record;

/// Bytes a record costs the host beyond its key, value and headers.
const RECORD_OVERHEAD: u64 = 64;

/// What a batch became.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Records that came out of the last plugin.
    pub records: Vec<Record>,
    /// Records some plugin failed, faulted on, or whose outputs broke a limit.
    pub dead: Vec<DeadLetter>,
    /// Records some plugin emitted nothing for.
    pub dropped: u64,
    /// Plugin faults and limit hits in this batch.
    pub faults: u64,
    /// Set when this batch's faults quarantined the pipeline: why.
    pub quarantined: Option<String>,
}

/// Counts faults over a sliding window.
#[derive(Debug)]
struct FaultLog {
    threshold: u32,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl FaultLog {
    /// Counts one fault; returns the quarantine reason if this one reaches
    /// the threshold.
    fn record(&mut self, fault: &str) -> Option<String> {
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

/// A pipeline's plugins, in order.
pub struct Chain {
    slots: Vec<PluginSlot>,
    batch: BatchWriter,
    routes: Vec<Arc<str>>,
    faults: FaultLog,
}

impl Chain {
    /// A chain of these plugins; an empty chain passes records through. It
    /// is quarantined after 10 faults within a minute unless
    /// [`Chain::quarantine_after`] says otherwise.
    pub fn new(slots: Vec<PluginSlot>) -> Self {
        Chain {
            slots,
            batch: BatchWriter::new(),
            routes: Vec::new(),
            faults: FaultLog {
                threshold: 10,
                window: Duration::from_secs(60),
                recent: VecDeque::new(),
            },
        }
    }

    /// Quarantines the pipeline after `faults` faults within `window`.
    pub fn quarantine_after(&mut self, faults: u32, window: Duration) -> &mut Self {
        self.faults.threshold = faults.max(1);
        self.faults.window = window;
        self
    }

    /// The plugins, in order.
    pub fn slots_mut(&mut self) -> &mut [PluginSlot] {
        &mut self.slots
    }

    /// Runs `records` through every plugin. Faults cost the records that
    /// cause them (dead-lettered); only a plugin that cannot be started
    /// again ends the chain with an error.
    pub fn process(&mut self, mut records: Vec<Record>) -> Result<ChainOutput, PluginError> {
        let mut output = ChainOutput::default();
        for index in 0..self.slots.len() {
            if records.is_empty() {
                break;
            }
            if let Some(reason) = &output.quarantined {
                let reason = format!("not processed: the pipeline was {reason}");
                let stage = self.slots[index].stage();
                for record in records.drain(..) {
                    output.dead.push(DeadLetter {
                        record,
                        reason: reason.clone(),
                        stage: stage.clone(),
                    });
                }
                break;
            }
            let slot = &self.slots[index];
            if records.iter().all(|r| slot.takes_topic(&r.source.topic)) {
                records = self.run_slot(index, records, &mut output)?;
                continue;
            }
            // Records of other topics pass this plugin; a partition belongs
            // to one topic, so each partition keeps its order.
            let (taken, mut passed): (Vec<Record>, Vec<Record>) = records
                .into_iter()
                .partition(|r| slot.takes_topic(&r.source.topic));
            if !taken.is_empty() {
                passed.extend(self.run_slot(index, taken, &mut output)?);
            }
            records = passed;
        }
        output.records = records;
        Ok(output)
    }

    /// Runs one plugin over `records`; after a fault, replays them one by
    /// one on fresh instances.
    fn run_slot(
        &mut self,
        index: usize,
        records: Vec<Record>,
        output: &mut ChainOutput,
    ) -> Result<Vec<Record>, PluginError> {
        let mut next = Vec::with_capacity(records.len());
        let fault = match self.call(index, records, &mut next, output) {
            Ok(()) => return Ok(next),
            Err(Fault { error, unprocessed }) if error.kind.is_fault() => (error, unprocessed),
            Err(Fault { error, .. }) => return Err(*error),
        };
        let (error, mut unprocessed) = fault;
        self.slots[index].restart()?;
        // The batch's fault counts only if no record reproduces it alone.
        let faults_before = output.faults;
        let mut left = unprocessed.drain(..);
        while let Some(record) = left.next() {
            if let Some(reason) = &output.quarantined {
                let stage = self.slots[index].stage();
                let reason = format!("not processed: the pipeline was {reason}");
                for record in std::iter::once(record).chain(left.by_ref()) {
                    output.dead.push(DeadLetter {
                        record,
                        reason: reason.clone(),
                        stage: stage.clone(),
                    });
                }
                break;
            }
            match self.call(index, vec![record], &mut next, output) {
                Ok(()) => {}
                Err(Fault { error, unprocessed }) if error.kind.is_fault() => {
                    let reason = error.to_string();
                    let stage = self.slots[index].stage();
                    for record in unprocessed {
                        output.dead.push(DeadLetter {
                            record,
                            reason: reason.clone(),
                            stage: stage.clone(),
                        });
                    }
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
            output.quarantined = self.faults.record(fault);
        }
    }

    /// One call: packs `records`, runs the plugin, and turns the reply into
    /// `next` records and dead letters. On a fault, returns the records
    /// whose outcomes were not taken.
    fn call(
        &mut self,
        index: usize,
        records: Vec<Record>,
        next: &mut Vec<Record>,
        output: &mut ChainOutput,
    ) -> Result<(), Fault> {
        let batch = &mut self.batch;
        batch.clear();
        for record in &records {
            batch.push(
                RecordParts {
                    key: record.key.as_deref(),
                    value: &record.value,
                    timestamp: record.timestamp,
                    topic: &record.source.topic,
                    partition: record.source.partition,
                    offset: record.source.offset,
                },
                record
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), &value[..])),
            );
        }
        let slot = &mut self.slots[index];
        let reply = match slot.instance().process(batch.as_bytes()) {
            Ok(reply) => Bytes::from(reply),
            Err(error) => {
                return Err(Fault {
                    error: Box::new(error),
                    unprocessed: records,
                });
            }
        };
        let mut reading = ReplyReader {
            slot,
            routes: &mut self.routes,
            faults: &mut self.faults,
            reply: &reply,
            batch_bytes: 0,
        };
        reading.apply(records, next, output)
    }
}

/// A fault, and the inputs it left unprocessed. Boxed: faults are rare and
/// the result of every call carries room for one.
struct Fault {
    error: Box<PluginError>,
    unprocessed: Vec<Record>,
}

/// Turns one plugin reply into records, holding outputs to the limits.
struct ReplyReader<'a> {
    slot: &'a PluginSlot,
    routes: &'a mut Vec<Arc<str>>,
    faults: &'a mut FaultLog,
    reply: &'a Bytes,
    /// Bytes of outputs taken so far from this reply.
    batch_bytes: u64,
}

impl ReplyReader<'_> {
    fn apply(
        &mut self,
        records: Vec<Record>,
        next: &mut Vec<Record>,
        output: &mut ChainOutput,
    ) -> Result<(), Fault> {
        let limits = self.slot.limits();
        let mut inputs = records.into_iter();
        let mut outcomes = match OutcomeReader::new(self.reply, inputs.len()) {
            Ok(outcomes) => outcomes,
            Err(err) => return Err(self.bad_reply(err, inputs.collect())),
        };
        while let Some(input) = inputs.next() {
            let outcome = match outcomes.next() {
                Some(Ok(outcome)) => outcome,
                Some(Err(err)) => {
                    return Err(self.bad_reply(err, std::iter::once(input).chain(inputs).collect()));
                }
                None => unreachable!("the reader checked the outcome count"),
            };
            let outputs = match outcome {
                OutcomeView::Emit(outputs) => outputs,
                OutcomeView::Fail(reason) => {
                    output.dead.push(DeadLetter {
                        record: input,
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
                Some(Err(err)) => {
                    return Err(self.bad_reply(err, std::iter::once(input).chain(inputs).collect()));
                }
                None => None,
            };
            let bytes = match &single {
                Some(out) => output_bytes(&input, out),
                None => match outputs
                    .iter()
                    .map(|out| out.map(|out| output_bytes(&input, &out)))
                    .sum()
                {
                    Ok(bytes) => bytes,
                    Err(err) => {
                        return Err(
                            self.bad_reply(err, std::iter::once(input).chain(inputs).collect())
                        );
                    }
                },
            };
            if let Some(reason) = self.breaks_limits(&limits, outputs.len(), bytes) {
                output.faults += 1;
                if output.quarantined.is_none() {
                    output.quarantined = self.faults.record(&reason);
                }
                output.dead.push(DeadLetter {
                    record: input,
                    reason,
                    stage: self.slot.stage(),
                });
                continue;
            }
            self.batch_bytes += bytes;
            // Every output but the last starts from a copy of the input; the
            // last takes the input itself.
            if let Some(out) = single {
                push_output(next, input, &out, self.reply, self.routes);
                continue;
            }
            let mut outs = outputs.iter().flatten();
            for out in outs.by_ref().take(outputs.len() - 1) {
                push_output(next, input.clone(), &out, self.reply, self.routes);
            }
            if let Some(out) = outs.next() {
                push_output(next, input, &out, self.reply, self.routes);
            }
        }
        if let Err(err) = outcomes.finish() {
            return Err(self.bad_reply(err, Vec::new()));
        }
        Ok(())
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

    fn bad_reply(&self, err: AbiError, unprocessed: Vec<Record>) -> Fault {
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

/// What output `out` of `input` costs the host to hold.
#[inline]
fn output_bytes(input: &Record, out: &OutputView<'_>) -> u64 {
    match out {
        OutputView::Forward { .. } => record_bytes(input),
        OutputView::New(new) => {
            let headers: usize = new.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
            (new.value.len() + new.key.map_or(0, <[u8]>::len) + headers) as u64 + RECORD_OVERHEAD
        }
    }
}

/// What a record costs the host to hold.
#[inline]
fn record_bytes(record: &Record) -> u64 {
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (record.value.len() + record.key.as_ref().map_or(0, Bytes::len) + headers) as u64
        + RECORD_OVERHEAD
}

/// Pushes `record` (the input or a copy of it) onto `next` as the output
/// `out` describes. It is changed where it lies in `next`: a record is
/// big, and moving it costs more than the change does.
#[inline(always)]
fn push_output(
    next: &mut Vec<Record>,
    record: Record,
    out: &OutputView<'_>,
    reply: &Bytes,
    routes: &mut Vec<Arc<str>>,
) {
    next.push(record);
    let Some(record) = next.last_mut() else {
        return;
    };
    match out {
        OutputView::Forward { route: None } => {}
        OutputView::Forward { route: Some(route) } => record.route = Some(intern(routes, route)),
        OutputView::New(new) => apply_new(record, new, reply, routes),
    }
}

/// Turns `record` into the record `new` describes.
fn apply_new(
    record: &mut Record,
    new: &NewRecordView<'_>,
    reply: &Bytes,
    routes: &mut Vec<Arc<str>>,
) {
    record.key = new.key.map(|key| reply.slice_ref(key));
    record.value = reply.slice_ref(new.value);
    record.headers = new
        .headers
        .iter()
        .map(|(name, value)| (name.to_owned(), reply.slice_ref(value)))
        .collect();
    record.timestamp = new.timestamp.or(record.timestamp);
    if let Some(route) = new.route {
        record.route = Some(intern(routes, route));
    }
}

/// One shared `Arc<str>` per route name, so routing allocates nothing per record.
fn intern(routes: &mut Vec<Arc<str>>, route: &str) -> Arc<str> {
    if let Some(known) = routes.iter().find(|known| &***known == route) {
        return known.clone();
    }
    let route: Arc<str> = route.into();
    if routes.len() < 1024 {
        routes.push(route.clone());
    }
    route
}

#[cfg(test)]
mod tests {
    use super::FaultLog;
    use std::collections::VecDeque;
    use std::time::Duration;

    #[test]
    fn the_fault_log_quarantines_at_its_threshold() {
        let mut log = FaultLog {
            threshold: 3,
            window: Duration::from_secs(3600),
            recent: VecDeque::new(),
        };
        assert_eq!(log.record("a"), None);
        assert_eq!(log.record("b"), None);
        let reason = log.record("the third").unwrap();
        assert!(
            reason.starts_with("quarantined after 3 plugin faults within 3600 s")
                && reason.ends_with("the last: the third"),
            "{reason}"
        );
    }
}
