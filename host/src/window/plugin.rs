//! Plugin aggregates (world `weir:plugin/aggregator`), the host's side: a
//! state per key and window that the host keeps as the plugin's versioned
//! bytes, and the calls that bring states up to date.
//!
//! Records are packed into their state's pending batch as they come; the
//! plugin is called only when results are needed, for every state that
//! needs one at once (all the keys of a window that fires): merge what
//! session merges left apart, fold the pending records in, finish. A call
//! carries up to [`CALL_BYTES`] of records or states: a few calls per
//! window, not one per key. (Copying each record into its state's pending
//! batch is, measured, the larger cost today: the window benchmark's plugin
//! run is ~2.7x the built-in.)

use weir_guest::abi::{Entry, EntryWriter, read_entries};

use crate::batch::RecordRef;
use crate::engine::{AggregateState, Instance, Limits, LoadedPlugin, PluginError};

/// Where a packed record's timestamp is (`wit/README.md`).
const TIMESTAMP_AT: usize = 8;

/// How many bytes of records (or states) one call carries at most.
pub const CALL_BYTES: usize = 4 << 20;

/// One plugin aggregate of a window: its instance, restarted after a fault.
pub struct PluginAggregate {
    loaded: LoadedPlugin,
    limits: Limits,
    config: String,
    instance: Option<Instance>,
    /// The state of a window with no record, asked once.
    empty: AggregateState,
    /// `name version`, for errors.
    label: String,
}

impl std::fmt::Debug for PluginAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginAggregate")
            .field("plugin", &self.label)
            .finish_non_exhaustive()
    }
}

impl PluginAggregate {
    /// Starts `loaded` under `limits` with its settings `config` (JSON).
    pub fn start(
        loaded: LoadedPlugin,
        limits: Limits,
        config: String,
    ) -> Result<Self, PluginError> {
        let mut instance = loaded.instantiate(&limits, &config)?;
        let empty = instance.create_state()?;
        Ok(PluginAggregate {
            label: format!("{} {}", instance.name(), instance.version()),
            loaded,
            limits,
            config,
            instance: Some(instance),
            empty,
        })
    }

    /// The plugin's name and version.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn instance(&mut self) -> Result<&mut Instance, String> {
        let instance = match self.instance.take() {
            Some(instance) => instance,
            None => (self.loaded)
                .instantiate(&self.limits, &self.config)
                .map_err(|err| err.to_string())?,
        };
        Ok(self.instance.insert(instance))
    }

    /// Runs `call` on the instance; a fault (trap, limit, deadline) stops
    /// it, and the next call starts a fresh one.
    fn call<T>(
        &mut self,
        call: impl FnOnce(&mut Instance) -> Result<T, PluginError>,
    ) -> Result<T, String> {
        let instance = self.instance()?;
        call(instance).map_err(|fault| {
            self.instance = None;
            fault.to_string()
        })
    }

    /// Brings every state of `states` that needs it up to date: each then
    /// has its result's JSON, or why it has none.
    pub fn settle(&mut self, states: &mut [&mut PluginState]) {
        let mut due: Vec<&mut PluginState> = (states.iter_mut())
            .filter(|state| state.outcome.is_none())
            .map(|state| &mut **state)
            .collect();
        for state in &mut due {
            if state.parts.len() > 1 {
                let parts = entries(state.parts.iter().map(|p| (p.version, &p.bytes[..])));
                match self.call(|instance| instance.merge(&parts)) {
                    Ok(Ok(merged)) => state.parts = vec![Encoded::from_wit(merged)],
                    Ok(Err(reason)) | Err(reason) => state.outcome = Some(Err(reason)),
                }
            }
        }
        due.retain(|state| state.outcome.is_none());
        // Fold, a call's worth of records at a time.
        let mut from = 0;
        while from < due.len() {
            let (mut to, mut bytes) = (from, 0);
            while to < due.len() && (to == from || bytes + due[to].pending.len() <= CALL_BYTES) {
                bytes += due[to].pending.len();
                to += 1;
            }
            self.accumulate(&mut due[from..to]);
            from = to;
        }
        due.retain(|state| state.outcome.is_none());
        // Finish, a call's worth of states at a time.
        let mut from = 0;
        while from < due.len() {
            let (mut to, mut bytes) = (from, 0);
            while to < due.len() && (to == from || bytes + due[to].state_bytes() <= CALL_BYTES) {
                bytes += due[to].state_bytes();
                to += 1;
            }
            self.finish(&mut due[from..to]);
            from = to;
        }
    }

    /// Folds each state's pending records into it, in one call.
    fn accumulate(&mut self, states: &mut [&mut PluginState]) {
        let pending: usize = states.iter().map(|s| s.count as usize).sum();
        if pending == 0 {
            return;
        }
        let empty = (self.empty.version, &self.empty.bytes[..]);
        let current = entries(states.iter().map(|s| s.current().unwrap_or(empty)));
        let mut batch =
            Vec::with_capacity(4 + states.iter().map(|s| s.pending.len() - 4).sum::<usize>());
        batch.extend_from_slice(&(pending as u32).to_le_bytes());
        let mut groups = Vec::with_capacity(pending);
        for (at, state) in states.iter().enumerate() {
            batch.extend_from_slice(&state.pending[4..]);
            groups.extend(std::iter::repeat_n(at as u32, state.count as usize));
        }
        let reply = self.call(|instance| instance.accumulate(&current, &batch, &groups));
        let outcomes = reply.and_then(|reply| replies(&reply, states.len()));
        match outcomes {
            Ok(outcomes) => {
                for (state, outcome) in states.iter_mut().zip(outcomes) {
                    match outcome {
                        Ok(folded) => {
                            state.parts = vec![folded];
                            state.pending.truncate(4);
                            state.count = 0;
                        }
                        Err(reason) => state.outcome = Some(Err(reason)),
                    }
                }
            }
            Err(reason) => {
                for state in states {
                    state.outcome = Some(Err(reason.clone()));
                }
            }
        }
    }

    /// Finishes each state, in one call.
    fn finish(&mut self, states: &mut [&mut PluginState]) {
        let empty = (self.empty.version, &self.empty.bytes[..]);
        let current = entries(states.iter().map(|s| s.current().unwrap_or(empty)));
        let reply = self.call(|instance| instance.finish(&current));
        match reply.and_then(|reply| replies(&reply, states.len())) {
            Ok(outcomes) => {
                for (state, outcome) in states.iter_mut().zip(outcomes) {
                    let json = outcome.and_then(|result| {
                        let text = String::from_utf8(result.bytes)
                            .map_err(|_| "`finish` gave text that is not UTF-8".to_owned())?;
                        match weir_guest::json::validate(text.as_bytes()) {
                            Ok(()) => Ok(text.into_boxed_str()),
                            Err(err) => Err(format!("`finish` gave {text:?}, not JSON: {err}")),
                        }
                    });
                    state.outcome = Some(json);
                }
            }
            Err(reason) => {
                for state in states {
                    state.outcome = Some(Err(reason.clone()));
                }
            }
        }
    }
}

/// Packs `(version, bytes)` states as entries.
fn entries<'a>(states: impl Iterator<Item = (u32, &'a [u8])>) -> Vec<u8> {
    let mut out = EntryWriter::new();
    for (version, bytes) in states {
        out.push(version, bytes);
    }
    out.finish()
}

/// A reply of entries, one per state asked about: each an encoded state
/// (or result), or why not. A reply that breaks the layout or has another
/// count is the plugin's fault, for every state of the call.
fn replies(reply: &[u8], expected: usize) -> Result<Vec<Result<Encoded, String>>, String> {
    let entries = read_entries(reply).map_err(|err| format!("the plugin's reply: {err}"))?;
    if entries.len() != expected {
        return Err(format!(
            "the plugin's reply has {} entries for {expected} states",
            entries.len()
        ));
    }
    Ok((entries.into_iter())
        .map(|entry| match entry {
            Entry::Ok { version, bytes } => Ok(Encoded {
                version,
                bytes: bytes.to_vec(),
            }),
            Entry::Failed(reason) => Err(reason.to_owned()),
        })
        .collect())
}

/// A state as the host keeps it: the plugin's version and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Encoded {
    version: u32,
    bytes: Vec<u8>,
}

impl Encoded {
    fn from_wit(state: AggregateState) -> Self {
        Encoded {
            version: state.version,
            bytes: state.bytes,
        }
    }
}

/// A plugin aggregate's state for one key and window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginState {
    /// States still to merge into one (sessions merged); none: empty.
    parts: Vec<Encoded>,
    /// Records not folded in yet, in the batch layout after a 4-byte count
    /// written when they are sent.
    pending: Vec<u8>,
    count: u32,
    /// The result's JSON (or why there is none) as of the last settle,
    /// until a record or a merge changes it.
    outcome: Option<Result<Box<str>, String>>,
}

impl Default for PluginState {
    fn default() -> Self {
        PluginState {
            parts: Vec::new(),
            pending: vec![0; 4],
            count: 0,
            outcome: None,
        }
    }
}

impl PluginState {
    /// The result's JSON as of the last settle (or why there is none);
    /// `None` if something changed it since.
    pub fn settled(&self) -> Option<Result<&str, &str>> {
        (self.outcome.as_ref()).map(|o| o.as_ref().map(|json| &**json).map_err(String::as_str))
    }

    /// The state to fold into or finish: the one part (`None`: empty).
    fn current(&self) -> Option<(u32, &[u8])> {
        self.parts.first().map(|p| (p.version, &p.bytes[..]))
    }

    fn state_bytes(&self) -> usize {
        self.parts.first().map_or(0, |p| p.bytes.len()) + 9
    }

    /// Takes one record, stamped with its event time: its packed bytes as
    /// they are in its batch, the timestamp replaced.
    pub fn add(&mut self, record: &RecordRef<'_>, time: i64) {
        let at = self.pending.len();
        self.pending.extend_from_slice(record.packed());
        self.pending[at + TIMESTAMP_AT..at + TIMESTAMP_AT + 8].copy_from_slice(&time.to_le_bytes());
        self.count += 1;
        self.outcome = None;
    }

    /// Takes in what `other` holds: its parts to merge (the empty state
    /// merges as nothing), its records to fold.
    pub fn merge(&mut self, other: PluginState) {
        self.parts.extend(other.parts);
        self.pending.extend_from_slice(&other.pending[4..]);
        self.count += other.count;
        self.outcome = None;
    }
}
