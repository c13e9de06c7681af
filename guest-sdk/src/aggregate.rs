//! The aggregate author's side: the `Aggregate` trait, the state codec and
//! the loops the exported `accumulate`, `merge` and `finish` run, callable
//! natively so that an aggregate is tested like a `Transform`.
//!
//! The host keeps every state as bytes with a version (it stores them per
//! key and window, and will checkpoint them), so a state crosses the
//! boundary encoded by [`Aggregate::encode`], many states to a call. The
//! default encoding is JSON, which any `serde` state gets for free; an
//! aggregate whose state is large or hot can write its own.

use std::any::Any;
use std::cell::RefCell;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{BatchReader, Entry, EntryWriter, RecordView, read_entries};
use crate::{Error, Result};

/// A window aggregate. Implement it on a struct that deserialises from the
/// aggregate's `config` table and export it with
/// [`crate::export_aggregate!`].
pub trait Aggregate: DeserializeOwned + 'static {
    /// What the aggregate keeps for one key in one window.
    type State: Default + Serialize + DeserializeOwned;

    /// The window's result, written as one JSON value.
    type Output: Serialize;

    /// The version of the encoding [`Aggregate::encode`] writes. Raise it
    /// when the state changes shape; [`Aggregate::decode`] is then given
    /// the version a state was written with.
    const STATE_VERSION: u32 = 1;

    /// Checks the settings once after they are deserialised. An `Err` stops
    /// the pipeline at start and its message reaches the operator verbatim.
    fn validate(&mut self) -> Result<()> {
        Ok(())
    }

    /// Takes one record of the state's key and window. `Err` fails the
    /// whole call: the host reports it with the window it was for.
    fn accumulate(&mut self, state: &mut Self::State, record: RecordView<'_>) -> Result<()>;

    /// Takes in what `other` holds (two session windows an event bridged,
    /// or two halves of one window).
    fn merge(&mut self, state: &mut Self::State, other: Self::State);

    /// The result of a window for its key. It may be asked again for the
    /// same window after later records (allowed lateness): the host keeps
    /// the state, not the result.
    fn finish(&mut self, state: &Self::State) -> Result<Self::Output>;

    /// Writes `state` as bytes; JSON unless overridden.
    fn encode(state: &Self::State, out: &mut Vec<u8>) -> Result<()> {
        serde_json::to_writer(out, state).map_err(Error::from)
    }

    /// Reads a state that [`Aggregate::encode`] wrote with `version`.
    fn decode(version: u32, bytes: &[u8]) -> Result<Self::State> {
        if version != Self::STATE_VERSION {
            return Err(Error::new(format!(
                "a state of version {version}; this aggregate reads version {}",
                Self::STATE_VERSION
            )));
        }
        serde_json::from_slice(bytes).map_err(Error::from)
    }
}

/// A state as it crosses the boundary: its encoding's version and bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedState {
    /// [`Aggregate::STATE_VERSION`] when it was written.
    pub version: u32,
    /// What [`Aggregate::encode`] wrote.
    pub bytes: Vec<u8>,
}

fn encode<A: Aggregate>(state: &A::State) -> Result<EncodedState> {
    let mut bytes = Vec::new();
    A::encode(state, &mut bytes)?;
    Ok(EncodedState {
        version: A::STATE_VERSION,
        bytes,
    })
}

/// Builds an aggregate from its settings (JSON) the way the host's `init`
/// does: deserialise, then [`Aggregate::validate`].
pub fn configure_aggregate<A: Aggregate>(config: &str) -> Result<A, String> {
    let mut aggregate: A =
        serde_json::from_str(config).map_err(|e| format!("invalid config: {e}"))?;
    aggregate.validate().map_err(|e| e.to_string())?;
    Ok(aggregate)
}

/// The encoded state of a window with no record yet.
pub fn create_state<A: Aggregate>() -> std::result::Result<EncodedState, String> {
    encode::<A>(&A::State::default()).map_err(|e| e.to_string())
}

fn malformed(err: impl std::fmt::Display) -> ! {
    panic!("weir host sent a malformed buffer: {err}")
}

/// The states of an entries list, decoded: each, or why it could not be.
fn decode_entries<A: Aggregate>(states: &[u8]) -> Vec<std::result::Result<A::State, String>> {
    let entries = read_entries(states).unwrap_or_else(|err| malformed(err));
    (entries.into_iter())
        .map(|entry| match entry {
            Entry::Ok { version, bytes } => A::decode(version, bytes).map_err(|e| e.to_string()),
            Entry::Failed(reason) => Err(reason.to_owned()),
        })
        .collect()
}

/// Folds a packed batch into states, each record into the state `groups`
/// names: what the exported `accumulate` does. Returns one entry per state.
///
/// # Panics
///
/// If a buffer does not follow the layout, or a group names no state: the
/// host never sends one.
pub fn accumulate_states<A: Aggregate>(
    aggregate: &mut A,
    states: &[u8],
    batch: &[u8],
    groups: &[u32],
) -> Vec<u8> {
    let mut decoded = decode_entries::<A>(states);
    let reader = BatchReader::new(batch).unwrap_or_else(|err| malformed(err));
    if reader.remaining() as usize != groups.len() {
        malformed("a group per record");
    }
    for (record, &group) in reader.zip(groups) {
        let record = record.unwrap_or_else(|err| malformed(err));
        let Some(slot) = decoded.get_mut(group as usize) else {
            malformed(format!("group {group} names no state"));
        };
        if let Ok(state) = slot {
            let offset = record.offset();
            if let Err(err) = aggregate.accumulate(state, record) {
                *slot = Err(format!("record at offset {offset}: {err}"));
            }
        }
    }
    let mut out = EntryWriter::new();
    for state in &decoded {
        let encoded = state.as_ref().map_err(Clone::clone).and_then(|state| {
            let mut bytes = Vec::new();
            A::encode(state, &mut bytes).map_err(|e| e.to_string())?;
            Ok(bytes)
        });
        match encoded {
            Ok(bytes) => out.push(A::STATE_VERSION, &bytes),
            Err(reason) => out.push_failure(&reason),
        }
    }
    out.finish()
}

/// One state holding what all of `states` (entries) hold: what the
/// exported `merge` does.
pub fn merge_states<A: Aggregate>(
    aggregate: &mut A,
    states: &[u8],
) -> std::result::Result<EncodedState, String> {
    let mut merged = A::State::default();
    for state in decode_entries::<A>(states) {
        aggregate.merge(&mut merged, state?);
    }
    encode::<A>(&merged).map_err(|e| e.to_string())
}

/// The results of `states` (entries) as JSON text, one entry each: what
/// the exported `finish` does.
pub fn finish_states<A: Aggregate>(aggregate: &mut A, states: &[u8]) -> Vec<u8> {
    let mut out = EntryWriter::new();
    for state in decode_entries::<A>(states) {
        let result = state.and_then(|state| {
            let output = aggregate.finish(&state).map_err(|e| e.to_string())?;
            serde_json::to_string(&output).map_err(|e| e.to_string())
        });
        match result {
            Ok(json) => out.push(0, json.as_bytes()),
            Err(reason) => out.push_failure(&reason),
        }
    }
    out.finish()
}

thread_local! {
    /// The one aggregate of this component, set by `init`.
    static AGGREGATE: RefCell<Option<Box<dyn Any>>> = RefCell::new(None);
}

#[doc(hidden)]
pub fn init_aggregate_exported<A: Aggregate>(config: &str) -> std::result::Result<(), String> {
    let aggregate = configure_aggregate::<A>(config)?;
    AGGREGATE.with(|slot| *slot.borrow_mut() = Some(Box::new(aggregate)));
    Ok(())
}

#[doc(hidden)]
pub fn with_aggregate<A: Aggregate, R>(call: impl FnOnce(&mut A) -> R) -> R {
    AGGREGATE.with(|slot| {
        let mut slot = slot.borrow_mut();
        match slot.as_mut().and_then(|a| a.downcast_mut::<A>()) {
            Some(aggregate) => call(aggregate),
            None => panic!("weir host called an aggregate before a successful init"),
        }
    })
}
