//! Plugin aggregates (world `weir:plugin/aggregator`), the host's side: a
//! state per key and window that the host keeps as the plugin's versioned
//! bytes, and the calls that bring states up to date.
//!
//! Records go, as they come, into one pending batch per aggregate, each
//! tagged with the state it is for; the plugin folds that batch into its
//! states in one call when it reaches [`CALL_BYTES`] or when a result is
//! needed (a window fires). Memory stays bounded by what a call carries,
//! however long a window is, and a call folds tens of thousands of
//! records. Sessions that merge keep their states apart until then (the
//! plugin merges them first), and their pending records follow the state
//! they merged into.
//!
//! The states are split by key among shards, one per lane, each with its
//! own instance: a call folds every shard's records at once, on as many
//! threads, so the plugin's work is spread over the cores as a transform's
//! is. A key's states (and so every session merge) stay in one shard.

use weir_guest::abi::{Entry, EntryWriter, read_entries};

use crate::batch::RecordRef;
use crate::engine::{AggregateState, Instance, Limits, LoadedPlugin, PluginError};

/// Where a packed record's timestamp is (`wit/README.md`).
const TIMESTAMP_AT: usize = 8;

/// How many bytes of records (or states) one call carries at most.
pub const CALL_BYTES: usize = 4 << 20;

/// A state of a plugin aggregate, by its place among the aggregate's.
pub type StateId = u32;

/// One plugin aggregate of a window: its shards.
pub struct PluginAggregate {
    shards: Vec<Shard>,
    /// `name version`, for errors.
    label: String,
}

/// Some of an aggregate's states (by key), their instance (restarted
/// after a fault), and the records not folded into them yet.
struct Shard {
    loaded: LoadedPlugin,
    limits: Limits,
    config: String,
    instance: Option<Instance>,
    /// The state of a window with no record, asked once.
    empty: AggregateState,
    /// Its states, by local id; ids of freed ones are in `free`.
    states: Vec<PluginState>,
    free: Vec<u32>,
    /// Records not folded in yet, in the batch layout after a 4-byte count
    /// written when they are sent, and the state each is for.
    pending: Vec<u8>,
    pending_for: Vec<u32>,
    /// States done with (their window gone, or merged into another), to
    /// free after the next fold: until then records for them may wait,
    /// and no other state may have their id.
    done: Vec<u32>,
    /// Scratch for a fold: each state's place among those it folds.
    place: Vec<u32>,
    /// How many bytes of records or states a call carries at most.
    call_bytes: usize,
}

impl std::fmt::Debug for PluginAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginAggregate")
            .field("plugin", &self.label)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl PluginAggregate {
    /// Starts `loaded` under `limits` with its settings `config` (JSON),
    /// in `shards` instances (at least one).
    pub fn start(
        loaded: LoadedPlugin,
        limits: Limits,
        config: String,
        shards: usize,
    ) -> Result<Self, PluginError> {
        let shards = (0..shards.max(1))
            .map(|_| Shard::start(loaded.clone(), limits.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let label = shards[0].label();
        Ok(PluginAggregate { shards, label })
    }

    /// The plugin's name and version.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Calls carry at most `bytes` of records or states (rather than
    /// [`CALL_BYTES`]): for tests, to fold and finish in many small calls.
    pub fn with_call_bytes(mut self, bytes: usize) -> Self {
        for shard in &mut self.shards {
            shard.call_bytes = bytes;
        }
        self
    }

    /// The shard and local id of state `id`.
    #[inline]
    fn locate(&self, id: StateId) -> (usize, u32) {
        let shards = self.shards.len() as u32;
        ((id % shards) as usize, id / shards)
    }

    /// A new state, empty, for a key whose hash is `hash`.
    pub fn new_state(&mut self, hash: u64) -> StateId {
        let shards = self.shards.len();
        // The high bits: the low ones place keys in hash tables.
        let shard = ((hash >> 40) % shards as u64) as usize;
        let local = self.shards[shard].new_state();
        // Fewer than 4 G states open at once.
        local * shards as u32 + shard as u32
    }

    /// Forgets state `id` (its window is gone).
    pub fn free_state(&mut self, id: StateId) {
        let (shard, local) = self.locate(id);
        self.shards[shard].free_state(local);
    }

    /// Takes one record for state `id`, stamped with its event time: its
    /// packed bytes as they are in its batch, the timestamp replaced.
    #[inline]
    pub fn add(&mut self, id: StateId, record: &RecordRef<'_>, time: i64) {
        let (shard, local) = self.locate(id);
        if self.shards[shard].add(local, record, time) {
            self.fold();
        }
    }

    /// State `from` (a session bridged to another, of the same key) joins
    /// state `into`: its parts are merged in at the next call, its pending
    /// records fold into `into`; `from` is freed once they have.
    pub fn merge(&mut self, into: StateId, from: StateId) {
        let ((shard, into), (from_shard, from)) = (self.locate(into), self.locate(from));
        if shard == from_shard {
            self.shards[shard].merge(into, from);
        }
    }

    /// The result's JSON of state `id` as of the last settle, or why there
    /// is none; `None` if something changed it since.
    pub fn settled(&self, id: StateId) -> Option<Result<&str, &str>> {
        let (shard, local) = self.locate(id);
        self.shards[shard].settled(local)
    }

    /// Brings every state of `ids` that needs it up to date: each then has
    /// its result's JSON, or why it has none ([`PluginAggregate::settled`]).
    /// The shards work at once, each on a thread.
    pub fn settle(&mut self, ids: &[StateId]) {
        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); self.shards.len()];
        for &id in ids {
            let (shard, local) = self.locate(id);
            by_shard[shard].push(local);
        }
        // A state changed since its last settle if records wait (for it
        // or not: a fold tells) or it was merged.
        self.each_shard(
            |shard, at| {
                !shard.pending_for.is_empty() || by_shard[at].iter().any(|&id| shard.unsettled(id))
            },
            |shard, at| {
                shard.fold();
                shard.settle(&by_shard[at]);
            },
        );
    }

    /// What states `ids` hold, every pending record folded in first: to
    /// checkpoint them ([`PluginAggregate::restore`] gives them back).
    pub fn save(&mut self, ids: &[StateId]) -> Vec<SavedState> {
        self.fold();
        (ids.iter())
            .map(|&id| {
                let (shard, local) = self.locate(id);
                let shard = &self.shards[shard];
                let state = shard.states.get(shard.resolve(local) as usize);
                SavedState {
                    parts: state.map_or_else(Vec::new, |s| {
                        (s.parts.iter())
                            .map(|p| (p.version, p.bytes.clone()))
                            .collect()
                    }),
                    failed: state.and_then(|s| s.failed.clone()),
                }
            })
            .collect()
    }

    /// A state holding what `saved` held, for a key whose hash is `hash`.
    pub fn restore(&mut self, hash: u64, saved: SavedState) -> StateId {
        let id = self.new_state(hash);
        let (shard, local) = self.locate(id);
        let state = &mut self.shards[shard].states[local as usize];
        state.parts = (saved.parts.into_iter())
            .map(|(version, bytes)| Encoded { version, bytes })
            .collect();
        state.failed = saved.failed;
        id
    }

    /// Folds every pending record into its state.
    fn fold(&mut self) {
        self.each_shard(
            |shard, _| !shard.pending_for.is_empty(),
            |shard, _| shard.fold(),
        );
    }

    /// Runs `work` on every shard that `needs` it, each on a thread of its
    /// own but the last (on this one).
    fn each_shard(
        &mut self,
        needs: impl Fn(&Shard, usize) -> bool,
        work: impl Fn(&mut Shard, usize) + Sync,
    ) {
        let mut due: Vec<(usize, &mut Shard)> = (self.shards.iter_mut().enumerate())
            .filter(|(at, shard)| needs(shard, *at))
            .collect();
        let Some((last_at, last)) = due.pop() else {
            return;
        };
        if due.is_empty() {
            return work(last, last_at);
        }
        std::thread::scope(|scope| {
            for (at, shard) in due {
                let work = &work;
                scope.spawn(move || work(shard, at));
            }
            work(last, last_at);
        });
    }
}

impl Shard {
    fn start(loaded: LoadedPlugin, limits: Limits, config: String) -> Result<Self, PluginError> {
        let mut instance = loaded.instantiate(&limits, &config)?;
        let empty = instance.create_state()?;
        Ok(Shard {
            loaded,
            limits,
            config,
            instance: Some(instance),
            empty,
            states: Vec::new(),
            free: Vec::new(),
            pending: vec![0; 4],
            pending_for: Vec::new(),
            done: Vec::new(),
            place: Vec::new(),
            call_bytes: CALL_BYTES,
        })
    }

    /// `name version` of its instance.
    fn label(&self) -> String {
        match &self.instance {
            Some(instance) => format!("{} {}", instance.name(), instance.version()),
            None => "an aggregate plugin".into(),
        }
    }

    fn new_state(&mut self) -> u32 {
        if self.free.is_empty() && !self.done.is_empty() && self.pending_for.is_empty() {
            self.recycle();
        }
        match self.free.pop() {
            Some(id) => {
                self.states[id as usize] = PluginState::default();
                id
            }
            None => {
                self.states.push(PluginState::default());
                (self.states.len() - 1) as u32
            }
        }
    }

    fn free_state(&mut self, id: u32) {
        self.done.push(id);
    }

    /// Takes one record for state `id` (see [`PluginAggregate::add`]);
    /// says whether its pending batch is full. The state itself is not
    /// touched (a fold marks what it changed), so that adding a record
    /// costs no trip to memory for it.
    #[inline]
    fn add(&mut self, id: u32, record: &RecordRef<'_>, time: i64) -> bool {
        let at = self.pending.len();
        self.pending.extend_from_slice(record.packed());
        self.pending[at + TIMESTAMP_AT..at + TIMESTAMP_AT + 8].copy_from_slice(&time.to_le_bytes());
        self.pending_for.push(id);
        self.pending.len() >= self.call_bytes
    }

    fn merge(&mut self, into: u32, from: u32) {
        if into == from {
            return;
        }
        let Some(mut taken) = self.states.get_mut(from as usize).map(std::mem::take) else {
            return;
        };
        let Some(state) = self.states.get_mut(into as usize) else {
            return;
        };
        state.parts.append(&mut taken.parts);
        if state.failed.is_none() {
            state.failed = taken.failed.take();
        }
        state.outcome = None;
        // Its pending records follow it.
        taken.forward = Some(into);
        self.states[from as usize] = taken;
        self.done.push(from);
    }

    /// The state `id` ends in, following merges.
    fn resolve(&self, mut id: u32) -> u32 {
        while let Some(next) = self.states.get(id as usize).and_then(|s| s.forward) {
            id = next;
        }
        id
    }

    fn settled(&self, id: u32) -> Option<Result<&str, &str>> {
        let state = self.states.get(id as usize)?;
        if let Some(reason) = &state.failed {
            return Some(Err(reason));
        }
        (state.outcome.as_ref()).map(|o| o.as_ref().map(|json| &**json).map_err(String::as_str))
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

    /// Whether state `id` changed since it was last settled.
    fn unsettled(&self, id: u32) -> bool {
        (self.states.get(id as usize))
            .is_some_and(|s| s.outcome.is_none() && s.failed.is_none() && !s.freed)
    }

    /// Brings every state of `ids` (folded) that needs it up to date.
    fn settle(&mut self, ids: &[u32]) {
        let due: Vec<u32> = (ids.iter().copied())
            .filter(|&id| self.unsettled(id))
            .collect();
        self.merge_parts(&due);
        let due: Vec<u32> = (due.into_iter())
            .filter(|&id| self.states[id as usize].failed.is_none())
            .collect();
        // Finish, a call's worth of states at a time.
        let mut from = 0;
        while from < due.len() {
            let (mut to, mut bytes) = (from, 0);
            while to < due.len()
                && (to == from
                    || bytes + self.states[due[to] as usize].state_bytes() <= self.call_bytes)
            {
                bytes += self.states[due[to] as usize].state_bytes();
                to += 1;
            }
            self.finish(&due[from..to]);
            from = to;
        }
    }

    /// Merges the parts of each state of `ids` that has several (sessions
    /// bridged) into one.
    fn merge_parts(&mut self, ids: &[u32]) {
        for &id in ids {
            let state = &self.states[id as usize];
            if state.parts.len() < 2 || state.failed.is_some() {
                continue;
            }
            let parts = entries(state.parts.iter().map(|p| (p.version, &p.bytes[..])));
            let merged = self.call(|instance| instance.merge(&parts));
            let state = &mut self.states[id as usize];
            match merged {
                Ok(Ok(merged)) => state.parts = vec![Encoded::from_wit(merged)],
                Ok(Err(reason)) | Err(reason) => state.failed = Some(reason),
            }
        }
    }

    /// Folds every pending record into its state, in one call (states
    /// with several parts are merged first).
    fn fold(&mut self) {
        if self.pending_for.is_empty() {
            return;
        }
        // Taken for the call, given back (emptied, its room kept) after.
        let mut pending = std::mem::take(&mut self.pending);
        let pending_for = std::mem::take(&mut self.pending_for);
        // Each state the records are for, once, in the order first seen;
        // a record's group is that state's place.
        let mut touched: Vec<u32> = Vec::new();
        let mut place = std::mem::take(&mut self.place);
        place.resize(self.states.len(), u32::MAX);
        let groups: Vec<u32> = (pending_for.iter())
            .map(|&id| {
                let id = self.resolve(id);
                let at = &mut place[id as usize];
                if *at == u32::MAX {
                    *at = touched.len() as u32;
                    touched.push(id);
                }
                *at
            })
            .collect();
        // The fold changes them: their results are to be worked out again.
        for &id in &touched {
            place[id as usize] = u32::MAX;
            self.states[id as usize].outcome = None;
        }
        self.place = place;
        self.merge_parts(&touched);
        pending[..4].copy_from_slice(&(groups.len() as u32).to_le_bytes());
        let empty = (self.empty.version, &self.empty.bytes[..]);
        let current = entries(
            (touched.iter()).map(|&id| self.states[id as usize].current().unwrap_or(empty)),
        );
        let reply = self.call(|instance| instance.accumulate(&current, &pending, &groups));
        pending.truncate(4);
        self.pending = pending;
        let reply = reply.and_then(|reply| {
            let outcomes = replies(&reply, touched.len())?;
            for (&id, outcome) in touched.iter().zip(outcomes) {
                let state = &mut self.states[id as usize];
                match outcome {
                    Entry::Ok { version, bytes } => state.fold_into(version, bytes),
                    Entry::Failed(reason) => state.failed = Some(reason.to_owned()),
                }
            }
            Ok(())
        });
        if let Err(reason) = reply {
            for &id in &touched {
                self.states[id as usize].failed = Some(reason.clone());
            }
        }
        self.recycle();
    }

    /// Frees the states done with: no record waits for them any more.
    fn recycle(&mut self) {
        for id in std::mem::take(&mut self.done) {
            if let Some(state) = self.states.get_mut(id as usize)
                && !state.freed
            {
                *state = PluginState {
                    freed: true,
                    ..PluginState::default()
                };
                self.free.push(id);
            }
        }
    }

    /// Finishes each state of `ids`, in one call.
    fn finish(&mut self, ids: &[u32]) {
        let empty = (self.empty.version, &self.empty.bytes[..]);
        let current =
            entries((ids.iter()).map(|&id| self.states[id as usize].current().unwrap_or(empty)));
        let reply = self.call(|instance| instance.finish(&current));
        let reply = reply.and_then(|reply| {
            let outcomes = replies(&reply, ids.len())?;
            Ok(outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    Entry::Ok { bytes, .. } => Ok(bytes.to_vec()),
                    Entry::Failed(reason) => Err(reason.to_owned()),
                })
                .collect::<Vec<_>>())
        });
        match reply {
            Ok(outcomes) => {
                for (&id, outcome) in ids.iter().zip(outcomes) {
                    let json = outcome.and_then(|bytes| {
                        let text = String::from_utf8(bytes)
                            .map_err(|_| "`finish` gave text that is not UTF-8".to_owned())?;
                        match weir_guest::json::validate(text.as_bytes()) {
                            Ok(()) => Ok(text.into_boxed_str()),
                            Err(err) => Err(format!("`finish` gave {text:?}, not JSON: {err}")),
                        }
                    });
                    self.states[id as usize].outcome = Some(json);
                }
            }
            Err(reason) => {
                for &id in ids {
                    self.states[id as usize].outcome = Some(Err(reason.clone()));
                }
            }
        }
    }
}

/// A plugin aggregate shared by the windows of several partitions (one
/// window operator per partition, see `pipeline::windowing`): their states
/// live in one set of instances. The windows run on one task, so the lock
/// is never contended.
#[derive(Debug, Clone)]
pub struct SharedAggregate(std::sync::Arc<std::sync::Mutex<PluginAggregate>>);

impl SharedAggregate {
    /// `plugin`, to share.
    pub fn new(plugin: PluginAggregate) -> Self {
        SharedAggregate(std::sync::Arc::new(std::sync::Mutex::new(plugin)))
    }

    /// The aggregate (a panic while it was held left it as it was).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, PluginAggregate> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
fn replies(reply: &[u8], expected: usize) -> Result<Vec<Entry<'_>>, String> {
    let entries = read_entries(reply).map_err(|err| format!("the plugin's reply: {err}"))?;
    if entries.len() != expected {
        return Err(format!(
            "the plugin's reply has {} entries for {expected} states",
            entries.len()
        ));
    }
    Ok(entries)
}

/// A plugin aggregate's state as a checkpoint keeps it: the plugin's
/// encoded parts (several: sessions merged, not yet merged by the plugin)
/// and, if it failed for good, why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    parts: Vec<(u32, Vec<u8>)>,
    failed: Option<String>,
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PluginState {
    /// States still to merge into one (sessions merged); none: empty.
    parts: Vec<Encoded>,
    /// The result's JSON (or why there is none) as of the last settle,
    /// until a record or a merge changes it.
    outcome: Option<Result<Box<str>, String>>,
    /// Why it failed for good (a record the plugin refused, a fault): its
    /// window's result has this aggregate `null`.
    failed: Option<String>,
    /// It was merged into this state: its pending records go there.
    forward: Option<StateId>,
    /// Freed: its id may be given out again.
    freed: bool,
}

impl PluginState {
    /// Its state is now `version` and `bytes` (what a fold gave): kept in
    /// the room the last one had.
    fn fold_into(&mut self, version: u32, bytes: &[u8]) {
        self.parts.truncate(1);
        match self.parts.first_mut() {
            Some(part) => {
                part.version = version;
                part.bytes.clear();
                part.bytes.extend_from_slice(bytes);
            }
            None => self.parts.push(Encoded {
                version,
                bytes: bytes.to_vec(),
            }),
        }
    }

    /// The state to fold into or finish: the one part (`None`: empty).
    fn current(&self) -> Option<(u32, &[u8])> {
        self.parts.first().map(|p| (p.version, &p.bytes[..]))
    }

    fn state_bytes(&self) -> usize {
        self.parts.first().map_or(0, |p| p.bytes.len()) + 9
    }
}
