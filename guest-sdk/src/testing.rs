//! Owned records and outcomes for tests, packed and unpacked with the same
//! codec as the host. `run` drives a plugin natively; the host's
//! `weir::testkit` returns the same [`TestOutcome`]s from the real engine.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::abi::{AbiError, BatchWriter, OutcomeReader, OutcomeView, OutputView, RecordParts};

/// An input record owned by a test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestRecord {
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// Event time, ms since the epoch.
    pub timestamp: Option<i64>,
    /// Source topic; `"test"` by default.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset; the record's position in the batch when `None`.
    pub offset: Option<i64>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestRecord {
    /// A record with this value and nothing else.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        TestRecord {
            value: value.into(),
            topic: "test".into(),
            ..TestRecord::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the event time.
    pub fn with_timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    /// Sets the source coordinates.
    pub fn at(mut self, topic: &str, partition: i32, offset: i64) -> Self {
        self.topic = topic.into();
        self.partition = partition;
        self.offset = Some(offset);
        self
    }
}

/// What a plugin did with one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestOutcome {
    /// It emitted these outputs (none: it dropped the record).
    Emit(Vec<TestOutput>),
    /// It failed the record with this reason.
    Fail(String),
}

impl TestOutcome {
    /// Whether the record was dropped (emitted nothing).
    pub fn is_dropped(&self) -> bool {
        matches!(self, TestOutcome::Emit(outputs) if outputs.is_empty())
    }

    /// The outputs; empty for a failure.
    pub fn outputs(&self) -> &[TestOutput] {
        match self {
            TestOutcome::Emit(outputs) => outputs,
            TestOutcome::Fail(_) => &[],
        }
    }

    /// The failure reason, if the record failed.
    pub fn failure(&self) -> Option<&str> {
        match self {
            TestOutcome::Fail(reason) => Some(reason),
            TestOutcome::Emit(_) => None,
        }
    }
}

/// One output record, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutput {
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// A new event time, or `None` to keep the input's.
    pub timestamp: Option<i64>,
    /// The named output, or `None` to keep the input's.
    pub route: Option<String>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl TestOutput {
    /// The value as text (lossy).
    pub fn value_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

/// Packs `records` into a batch.
pub fn pack(records: &[TestRecord]) -> Vec<u8> {
    let mut batch = BatchWriter::new();
    for (index, record) in records.iter().enumerate() {
        batch.push(
            RecordParts {
                key: record.key.as_deref(),
                value: &record.value,
                timestamp: record.timestamp,
                topic: &record.topic,
                partition: record.partition,
                offset: record.offset.unwrap_or(index as i64),
            },
            record
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice())),
        );
    }
    batch.as_bytes().to_vec()
}

/// Unpacks a plugin's reply to a batch of `inputs`; a forwarded input
/// becomes an output equal to it.
pub fn unpack(reply: &[u8], inputs: &[TestRecord]) -> Result<Vec<TestOutcome>, AbiError> {
    let mut reader = OutcomeReader::new(reply, inputs.len())?;
    let mut outcomes = Vec::with_capacity(inputs.len());
    for (outcome, input) in reader.by_ref().zip(inputs) {
        outcomes.push(match outcome? {
            OutcomeView::Fail(reason) => TestOutcome::Fail(reason.to_owned()),
            OutcomeView::Emit(outputs) => {
                let outputs = outputs.iter().map(|output| {
                    Ok(match output? {
                        OutputView::Forward { route } => TestOutput {
                            key: input.key.clone(),
                            value: input.value.clone(),
                            timestamp: None,
                            route: route.map(str::to_owned),
                            headers: input.headers.clone(),
                        },
                        OutputView::New(o) => TestOutput {
                            key: o.key.map(<[u8]>::to_vec),
                            value: o.value.to_vec(),
                            timestamp: o.timestamp,
                            route: o.route.map(str::to_owned),
                            headers: o
                                .headers
                                .iter()
                                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                                .collect(),
                        },
                    })
                });
                TestOutcome::Emit(outputs.collect::<Result<_, AbiError>>()?)
            }
        });
    }
    reader.finish()?;
    Ok(outcomes)
}

/// Runs `plugin` natively over `records`, through the same packing and
/// per-record loop as inside the sandbox.
#[cfg(feature = "bindings")]
pub fn run<T: crate::Transform>(plugin: &mut T, records: &[TestRecord]) -> Vec<TestOutcome> {
    let reply = crate::process_batch(plugin, &pack(records));
    match unpack(&reply, records) {
        Ok(outcomes) => outcomes,
        Err(err) => panic!("the SDK wrote a reply that does not unpack: {err}"),
    }
}

#[cfg(feature = "bindings")]
pub use crate::{configure, configure_aggregate};

/// Runs `aggregate` natively the way the host does: each group of records
/// folded into its own state (all groups in one `accumulate`, one packed
/// batch), the states merged, the result finished. Gives the result's JSON
/// text, or the error a call returned.
#[cfg(feature = "bindings")]
pub fn aggregate<A: crate::Aggregate>(
    aggregate: &mut A,
    groups: &[&[TestRecord]],
) -> Result<String, String> {
    use crate::abi::{Entry, EntryWriter, read_entries};
    let empty = crate::create_state::<A>()?;
    let mut states = EntryWriter::new();
    let (mut records, mut owners) = (Vec::new(), Vec::new());
    for (at, group) in groups.iter().enumerate() {
        states.push(empty.version, &empty.bytes);
        records.extend(group.iter().cloned());
        owners.extend(std::iter::repeat_n(at as u32, group.len()));
    }
    let folded = crate::accumulate_states(aggregate, &states.finish(), &pack(&records), &owners);
    let mut merged = EntryWriter::new();
    for entry in read_entries(&folded).map_err(|e| e.to_string())? {
        match entry {
            Entry::Ok { version, bytes } => merged.push(version, bytes),
            Entry::Failed(reason) => return Err(reason.to_owned()),
        }
    }
    let state = crate::merge_states(aggregate, &merged.finish())?;
    let mut one = EntryWriter::new();
    one.push(state.version, &state.bytes);
    let finished = crate::finish_states(aggregate, &one.finish());
    match read_entries(&finished).map_err(|e| e.to_string())?.first() {
        Some(Entry::Ok { bytes, .. }) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Some(Entry::Failed(reason)) => Err((*reason).to_owned()),
        None => Err("finish gave no entry".into()),
    }
}

thread_local! {
    static NATIVE_COUNTERS: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

#[cfg_attr(
    any(target_arch = "wasm32", not(feature = "bindings")),
    allow(dead_code, reason = "native stand-in for the host import")
)]
pub(crate) fn add_to_native_counter(name: &str, delta: u64) {
    NATIVE_COUNTERS.with(|c| *c.borrow_mut().entry(name.to_owned()).or_default() += delta);
}

/// The value of a counter bumped natively on this thread by
/// [`crate::counter`].
pub fn counter(name: &str) -> u64 {
    NATIVE_COUNTERS.with(|c| c.borrow().get(name).copied().unwrap_or(0))
}
