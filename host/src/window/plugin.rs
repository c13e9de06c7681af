//! Plugin aggregates (world `weir:plugin/aggregator`), the host's side: a
//! state per key and window that the host keeps as the plugin's versioned
//! bytes, and the calls that bring it up to date.
//!
//! Records are packed into their state's pending batch as they come; the
//! plugin is called only when a result is needed (the window fires, or a
//! late record updates it): once to merge what session merges left apart,
//! once to fold the pending records in, once to finish. So a result costs
//! at most three calls however many records it covers, and a state the
//! plugin never saw needs no call at all.

use weir_guest::abi::{RecordParts, pack_record};

use crate::batch::RecordRef;
use crate::engine::{AggregateState, Instance, Limits, LoadedPlugin, PluginError};

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
        call: impl FnOnce(&mut Instance) -> Result<Result<T, String>, PluginError>,
    ) -> Result<T, String> {
        let instance = self.instance()?;
        match call(instance) {
            Ok(reply) => reply,
            Err(fault) => {
                self.instance = None;
                Err(fault.to_string())
            }
        }
    }

    /// Brings `state` up to date and gives its result's JSON; on an error
    /// (the plugin's, or a fault), the state is left as it was before.
    pub fn settle<'s>(&mut self, state: &'s mut PluginState) -> Result<&'s str, String> {
        if state.result.is_none() {
            let merged = match state.parts.len() {
                0 => self.empty.clone(),
                1 => state.parts[0].to_wit(),
                _ => {
                    let parts: Vec<AggregateState> =
                        state.parts.iter().map(Encoded::to_wit).collect();
                    self.call(|instance| instance.merge(&parts))?
                }
            };
            let folded = match state.count {
                0 => merged,
                count => {
                    state.pending[..4].copy_from_slice(&count.to_le_bytes());
                    let batch = &state.pending;
                    self.call(|instance| instance.accumulate(&merged, batch))?
                }
            };
            let result = self.call(|instance| instance.finish(&folded))?;
            if let Err(err) = weir_guest::json::validate(result.as_bytes()) {
                return Err(format!(
                    "`finish` gave {result:?}, which is not JSON: {err}"
                ));
            }
            state.parts = vec![Encoded::from_wit(folded)];
            state.pending.truncate(4);
            state.count = 0;
            state.result = Some(result.into());
        }
        Ok(state.result.as_deref().unwrap_or("null"))
    }
}

/// A state as the host keeps it: the plugin's version and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Encoded {
    version: u32,
    bytes: Vec<u8>,
}

impl Encoded {
    fn to_wit(&self) -> AggregateState {
        AggregateState {
            version: self.version,
            bytes: self.bytes.clone(),
        }
    }

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
    /// The result as of the last settle, until a record or merge changes it.
    result: Option<Box<str>>,
}

impl Default for PluginState {
    fn default() -> Self {
        PluginState {
            parts: Vec::new(),
            pending: vec![0; 4],
            count: 0,
            result: None,
        }
    }
}

impl PluginState {
    /// The result as of the last settle, if nothing changed it since.
    pub fn settled(&self) -> Option<&str> {
        self.result.as_deref()
    }

    /// Takes one record, stamped with its event time.
    pub fn add(&mut self, record: &RecordRef<'_>, time: i64) {
        let parts = RecordParts {
            key: record.key(),
            value: record.value(),
            timestamp: Some(time),
            topic: record.topic(),
            partition: record.partition(),
            offset: record.offset(),
        };
        pack_record(&mut self.pending, parts, record.headers());
        self.count += 1;
        self.result = None;
    }

    /// Takes in what `other` holds: its parts to merge (the empty state
    /// merges as nothing), its records to fold.
    pub fn merge(&mut self, other: PluginState) {
        self.parts.extend(other.parts);
        self.pending.extend_from_slice(&other.pending[4..]);
        self.count += other.count;
        self.result = None;
    }
}
