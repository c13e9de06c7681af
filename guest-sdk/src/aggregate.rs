//! The aggregate author's side: the `Aggregate` trait, the state codec and
//! the loops the exported `accumulate`, `merge` and `finish` run, callable
//! natively so that an aggregate is tested like a `Transform`.
//!
//! The host keeps every state as bytes with a version (it stores them per
//! key and window, and will checkpoint them), so a state crosses the
//! boundary once per call, encoded by [`Aggregate::encode`]. The default
//! encoding is JSON, which any `serde` state gets for free; an aggregate
//! whose state is large or hot can write its own.

use std::any::Any;
use std::cell::RefCell;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{BatchReader, RecordView};
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

fn decode<A: Aggregate>(state: &EncodedState) -> Result<A::State> {
    A::decode(state.version, &state.bytes)
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

/// Folds a packed batch into `state`: what the exported `accumulate` does.
///
/// # Panics
///
/// If `batch` does not follow the layout: the host never sends one.
pub fn accumulate_batch<A: Aggregate>(
    aggregate: &mut A,
    state: &EncodedState,
    batch: &[u8],
) -> std::result::Result<EncodedState, String> {
    let reader = match BatchReader::new(batch) {
        Ok(reader) => reader,
        Err(err) => panic!("weir host sent a malformed batch: {err}"),
    };
    let mut decoded = decode::<A>(state).map_err(|e| e.to_string())?;
    for record in reader {
        let record = match record {
            Ok(record) => record,
            Err(err) => panic!("weir host sent a malformed batch: {err}"),
        };
        let offset = record.offset();
        aggregate
            .accumulate(&mut decoded, record)
            .map_err(|e| format!("record at offset {offset}: {e}"))?;
    }
    encode::<A>(&decoded).map_err(|e| e.to_string())
}

/// One state holding what all of `states` hold: what the exported `merge`
/// does.
pub fn merge_states<A: Aggregate>(
    aggregate: &mut A,
    states: &[EncodedState],
) -> std::result::Result<EncodedState, String> {
    let mut merged = A::State::default();
    for state in states {
        let state = decode::<A>(state).map_err(|e| e.to_string())?;
        aggregate.merge(&mut merged, state);
    }
    encode::<A>(&merged).map_err(|e| e.to_string())
}

/// The result of `state` as JSON text: what the exported `finish` does.
pub fn finish_state<A: Aggregate>(
    aggregate: &mut A,
    state: &EncodedState,
) -> std::result::Result<String, String> {
    let state = decode::<A>(state).map_err(|e| e.to_string())?;
    let output = aggregate.finish(&state).map_err(|e| e.to_string())?;
    serde_json::to_string(&output).map_err(|e| e.to_string())
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
