//! Runs a batch of records through a pipeline's plugin chain: packs them,
//! calls each plugin once per batch, and unpacks the outcomes into the next
//! stage's records, dropped counts and dead letters.

use std::sync::Arc;

use bytes::Bytes;
use weir_guest::abi::{BatchWriter, OutcomeReader, OutcomeView, OutputView, RecordParts};

use super::dead_letter::{DeadLetter, Stage};
use crate::engine::{PluginError, PluginErrorKind};
use crate::plugin::PluginSlot;
use crate::record::Record;

/// What a batch became.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Records that came out of the last plugin.
    pub records: Vec<Record>,
    /// Records some plugin failed.
    pub dead: Vec<DeadLetter>,
    /// Records some plugin emitted nothing for.
    pub dropped: u64,
}

/// A pipeline's plugins, in order.
pub struct Chain {
    slots: Vec<PluginSlot>,
    batch: BatchWriter,
    routes: Vec<Arc<str>>,
}

impl Chain {
    /// A chain of these plugins; an empty chain passes records through.
    pub fn new(slots: Vec<PluginSlot>) -> Self {
        Chain {
            slots,
            batch: BatchWriter::new(),
            routes: Vec::new(),
        }
    }

    /// The plugins, in order.
    pub fn slots_mut(&mut self) -> &mut [PluginSlot] {
        &mut self.slots
    }

    /// Runs `records` through every plugin. A plugin error (trap, limit,
    /// malformed reply) stops the chain: the instance is gone.
    pub fn process(&mut self, mut records: Vec<Record>) -> Result<ChainOutput, PluginError> {
        let mut output = ChainOutput::default();
        for slot in &mut self.slots {
            if records.is_empty() {
                break;
            }
            if records.iter().all(|r| slot.takes_topic(&r.source.topic)) {
                records = run_slot(
                    slot,
                    &mut self.batch,
                    &mut self.routes,
                    records,
                    &mut output,
                )?;
                continue;
            }
            // Records of other topics pass this plugin; a partition belongs
            // to one topic, so each partition keeps its order.
            let (taken, mut passed): (Vec<Record>, Vec<Record>) = records
                .into_iter()
                .partition(|r| slot.takes_topic(&r.source.topic));
            if !taken.is_empty() {
                passed.extend(run_slot(
                    slot,
                    &mut self.batch,
                    &mut self.routes,
                    taken,
                    &mut output,
                )?);
            }
            records = passed;
        }
        output.records = records;
        Ok(output)
    }
}

fn run_slot(
    slot: &mut PluginSlot,
    batch: &mut BatchWriter,
    routes: &mut Vec<Arc<str>>,
    records: Vec<Record>,
    output: &mut ChainOutput,
) -> Result<Vec<Record>, PluginError> {
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
    let reply = Bytes::from(slot.instance().process(batch.as_bytes())?);
    let bad_reply = |err: weir_guest::abi::AbiError| PluginError {
        plugin: slot.name().to_owned(),
        version: slot.version().to_owned(),
        export: "process",
        kind: PluginErrorKind::BadReply(err.to_string()),
    };

    let mut next = Vec::with_capacity(records.len());
    let mut outcomes = OutcomeReader::new(&reply, records.len()).map_err(bad_reply)?;
    for input in records {
        let Some(outcome) = outcomes.next() else {
            break;
        };
        let outputs = match outcome.map_err(bad_reply)? {
            OutcomeView::Emit(outputs) => outputs,
            OutcomeView::Fail(reason) => {
                output.dead.push(DeadLetter {
                    record: input,
                    reason: reason.to_owned(),
                    stage: Stage::Plugin {
                        name: slot.name().to_owned(),
                        version: slot.version().to_owned(),
                    },
                });
                continue;
            }
        };
        if outputs.is_empty() {
            output.dropped += 1;
            continue;
        }
        // Every output but the last starts from a copy of the input; the
        // last takes the input itself (the common single output moves it).
        let mut outputs_left = outputs.iter();
        for _ in 1..outputs.len() {
            let Some(out) = outputs_left.next() else {
                break;
            };
            let mut record = input.clone();
            apply_output(&mut record, out.map_err(bad_reply)?, &reply, routes);
            next.push(record);
        }
        if let Some(out) = outputs_left.next() {
            let mut record = input;
            apply_output(&mut record, out.map_err(bad_reply)?, &reply, routes);
            next.push(record);
        }
    }
    outcomes.finish().map_err(bad_reply)?;
    Ok(next)
}

/// Turns `record` (a copy of the input) into the output `out` describes.
fn apply_output(
    record: &mut Record,
    out: OutputView<'_>,
    reply: &Bytes,
    routes: &mut Vec<Arc<str>>,
) {
    match out {
        OutputView::Forward { route } => {
            if let Some(route) = route {
                record.route = Some(intern(routes, route));
            }
        }
        OutputView::New(new) => {
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
