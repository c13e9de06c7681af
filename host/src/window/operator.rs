//! The window operator: takes records in order, groups them by key into
//! windows on event time, fires each window once the watermark passes its
//! end, and hands late records back.
//!
//! Each record's key, event time and aggregate arguments are read
//! beforehand ([`FieldReader`], in the lanes, in parallel); the operator
//! only groups and adds. The watermark moves after every record, so what
//! fires when depends on the records' order and on time passing, never on
//! how they were batched.
//!
//! State is kept per window: tumbling and hopping windows by their start,
//! each holding its keys' accumulators; sessions per key. Each window also
//! knows the lowest source offset it holds per partition, so that a source
//! commits nothing an open window still needs ([`WindowOperator::held`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;
use smallvec::SmallVec;

use super::aggregate::{Accumulator, Arg, Input};
use super::config::{AggregateFn, AggregateSpec, WindowKind, WindowSpec};
use super::fields::{FieldReader, ReadBatch, Row, ShortKey};
use super::plugin::{PluginAggregate, SharedAggregate, StateId};
use super::watermark::{PartitionId, Watermarks};
use crate::batch::{Batch, RecordRef};

/// A window's result for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowResult {
    /// Milliseconds since the epoch.
    pub window_start: i64,
    /// Milliseconds since the epoch (exclusive).
    pub window_end: i64,
    /// The key, as the result record's key: a JSON string field's text, or
    /// the records' key.
    pub key: Box<[u8]>,
    /// `{"window_start":..,"window_end":..,"key":..,"<as>":..}`.
    pub value: String,
    /// An update of a result already emitted (a late record within
    /// `allowed_lateness` changed it).
    pub update: bool,
    /// Plugin aggregates that could not give their part (written `null`),
    /// and why.
    pub errors: Vec<String>,
}

/// What a batch (or time passing) made.
#[derive(Debug, Default)]
pub struct WindowOutput {
    /// Windows fired, in order of their end.
    pub results: Vec<WindowResult>,
    /// Records (by index in their batch) too late for any window.
    pub late: Vec<usize>,
    /// Records (by index) the window cannot use, and why.
    pub dead: Vec<(usize, String)>,
}

/// Lowest offsets a window holds, per partition (few: searched in line).
#[derive(Debug, Default, Clone)]
pub(super) struct Held(pub(super) Vec<(PartitionId, i64)>);

impl Held {
    #[inline]
    pub(super) fn note(&mut self, partition: PartitionId, offset: i64) {
        match self.0.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, lowest)) => *lowest = (*lowest).min(offset),
            None => self.0.push((partition, offset)),
        }
    }

    fn absorb(&mut self, other: &Held) {
        for &(partition, offset) in &other.0 {
            self.note(partition, offset);
        }
    }
}

/// One key's accumulators in a tumbling or hopping window, in line: a
/// record touches one place in memory (two cache lines) for its window.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) hash: u64,
    pub(super) key: GroupKey,
    pub(super) accumulators: Accumulators,
}

/// A group's accumulators: up to two in line.
pub(super) type Accumulators = SmallVec<[Accumulator; 2]>;

/// A group's key: in line when short (most are), so that finding a group
/// compares words rather than following a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GroupKey {
    Short(ShortKey),
    Long(Box<[u8]>),
}

impl GroupKey {
    /// `key`, of which `short` is the in-line form (or the mark of a long
    /// key).
    pub(super) fn new(short: ShortKey, key: &[u8]) -> Self {
        match short.get() {
            Some(_) => GroupKey::Short(short),
            None => GroupKey::Long(key.into()),
        }
    }

    /// Whether it is `key` (`short`: its in-line form).
    #[inline]
    fn is(&self, short: &ShortKey, key: &[u8]) -> bool {
        match self {
            GroupKey::Short(mine) => mine == short,
            GroupKey::Long(mine) => **mine == *key,
        }
    }

    #[inline]
    pub(super) fn get(&self) -> &[u8] {
        match self {
            GroupKey::Short(key) => key.get().unwrap_or_default(),
            GroupKey::Long(key) => key,
        }
    }

    /// The first 16 bytes, zero-padded, as a number that sorts as they
    /// do: most keys sort without a byte-by-byte comparison.
    fn prefix(&self) -> u128 {
        let key = self.get();
        let mut bytes = [0; 16];
        let len = key.len().min(16);
        bytes[..len].copy_from_slice(&key[..len]);
        u128::from_be_bytes(bytes)
    }
}

/// A tumbling or hopping window: every key's accumulators.
///
/// The hash table holds only each key's place in `groups`: it is small
/// enough to stay in cache, so finding a key costs one trip to memory
/// (its group), not two.
#[derive(Debug, Default)]
pub(super) struct Pane {
    pub(super) index: HashTable<u32>,
    pub(super) groups: Vec<Group>,
    pub(super) held: Held,
    pub(super) emitted: bool,
}

/// One key's sessions.
#[derive(Debug)]
pub(super) struct KeySessions {
    pub(super) hash: u64,
    pub(super) key: Box<[u8]>,
    pub(super) sessions: Vec<Session>,
}

/// One session of one key.
#[derive(Debug)]
pub(super) struct Session {
    pub(super) start: i64,
    /// The last event's time plus the gap.
    pub(super) end: i64,
    pub(super) accumulators: Accumulators,
    pub(super) held: Held,
    /// Its result went out once.
    pub(super) emitted: bool,
    /// It changed since its result last went out.
    pub(super) pending: bool,
}

/// How many records ahead [`WindowOperator::prefetch`] looks.
const PREFETCH_AHEAD: usize = 8;

/// Asks for the cache lines of `value` (a hint: nothing on other targets).
#[inline]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let at = std::ptr::from_ref(value).cast::<i8>();
        for line in (0..std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: SSE is part of every x86_64 CPU, and a prefetch
            // reads nothing and cannot fault, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Where a record went.
enum Taken {
    Windowed,
    Late,
}

/// Writes results.
pub(super) struct Results {
    /// `,"name":` of each aggregate, escaped once.
    names: Vec<String>,
    /// The key is a JSON field's raw text (else the record key's bytes).
    key_is_json: bool,
    /// Each plugin aggregate's plugin, by the aggregate's place.
    pub(super) plugins: Vec<Option<SharedAggregate>>,
    /// Some plugin aggregate takes the records themselves.
    takes_records: bool,
}

impl Results {
    /// A group's accumulators, empty: built-in ones, and a new state of
    /// each plugin aggregate (for a key whose hash is `hash`).
    fn accumulators(&mut self, aggregates: &[AggregateSpec], hash: u64) -> Accumulators {
        (aggregates.iter().zip(&mut self.plugins))
            .map(|(spec, plugin)| match plugin {
                Some(plugin) => Accumulator::Plugin(plugin.lock().new_state(hash)),
                None => Accumulator::new(spec),
            })
            .collect()
    }

    /// Takes one record into `accumulators`.
    #[inline]
    fn add(&mut self, accumulators: &mut [Accumulator], input: &Entry<'_>) {
        if !self.takes_records {
            for (accumulator, arg) in accumulators.iter_mut().zip(input.args) {
                input.add_to(accumulator, arg);
            }
            return;
        }
        let plugins = &mut self.plugins;
        for ((accumulator, arg), plugin) in accumulators.iter_mut().zip(input.args).zip(plugins) {
            match (accumulator, plugin, &input.record) {
                (Accumulator::Plugin(id), Some(plugin), Some(record)) => {
                    plugin.lock().add(*id, record, input.time);
                }
                (accumulator, _, _) => input.add_to(accumulator, arg),
            }
        }
    }

    /// Takes what `theirs` (of a session bridged to) holds into `mine`.
    fn merge(&mut self, mine: &mut [Accumulator], theirs: Accumulators) {
        for ((mine, theirs), plugin) in mine.iter_mut().zip(theirs).zip(&mut self.plugins) {
            match (mine, theirs, plugin) {
                (Accumulator::Plugin(into), Accumulator::Plugin(from), Some(plugin)) => {
                    plugin.lock().merge(*into, from);
                }
                (mine, theirs, _) => mine.merge(theirs),
            }
        }
    }

    /// Forgets `accumulators` (their window is gone): plugin states are
    /// freed.
    fn free(&mut self, accumulators: &[Accumulator]) {
        for (accumulator, plugin) in accumulators.iter().zip(&mut self.plugins) {
            if let (Accumulator::Plugin(id), Some(plugin)) = (accumulator, plugin) {
                plugin.lock().free_state(*id);
            }
        }
    }

    /// Settles the plugin aggregates of every group in `groups` at once
    /// (a window firing): one call per plugin for all of them, not one per
    /// key.
    fn settle_all(&mut self, groups: &mut [(u128, &mut Group)]) {
        for (at, plugin) in self.plugins.iter_mut().enumerate() {
            let Some(plugin) = plugin else { continue };
            let ids: Vec<StateId> = (groups.iter())
                .filter_map(|(_, group)| match group.accumulators[at] {
                    Accumulator::Plugin(id) => Some(id),
                    _ => None,
                })
                .collect();
            plugin.lock().settle(&ids);
        }
    }

    fn result(
        &mut self,
        (window_start, window_end): (i64, i64),
        key: &[u8],
        accumulators: &mut [Accumulator],
        update: bool,
    ) -> WindowResult {
        let mut errors = Vec::new();
        // Each plugin aggregate's result, or why there is none.
        let mut settled: Vec<Option<String>> = vec![None; accumulators.len()];
        for (at, accumulator) in accumulators.iter().enumerate() {
            let Accumulator::Plugin(id) = *accumulator else {
                continue;
            };
            let name = self.names[at].trim_start_matches(',').trim_end_matches(':');
            let Some(plugin) = self.plugins.get(at).and_then(Option::as_ref) else {
                errors.push(format!("aggregate {name} (no plugin instance)"));
                continue;
            };
            let mut plugin = plugin.lock();
            plugin.settle(&[id]);
            match plugin.settled(id) {
                Some(Ok(json)) => settled[at] = Some(json.to_owned()),
                Some(Err(reason)) => {
                    errors.push(format!("aggregate {name} ({}: {reason})", plugin.label()));
                }
                None => {}
            }
        }
        let mut value = String::with_capacity(64 + 24 * accumulators.len());
        let _ = write!(
            value,
            "{{\"window_start\":{window_start},\"window_end\":{window_end},\"key\":"
        );
        let record_key: Box<[u8]> = if self.key_is_json {
            // The scanner checked it is JSON.
            value.push_str(&String::from_utf8_lossy(key));
            match key {
                [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => inner.into(),
                _ => key.into(),
            }
        } else {
            value.push_str(&serde_json::Value::from(String::from_utf8_lossy(key)).to_string());
            key.into()
        };
        for ((name, accumulator), settled) in self.names.iter().zip(accumulators).zip(settled) {
            value.push_str(name);
            match (accumulator, settled) {
                (Accumulator::Plugin(_), Some(json)) => value.push_str(&json),
                (accumulator, _) => accumulator.write_json(&mut value),
            }
        }
        value.push('}');
        WindowResult {
            window_start,
            window_end,
            key: record_key,
            value,
            update,
            errors,
        }
    }
}

/// Runs one pipeline's window.
pub struct WindowOperator {
    pub(super) spec: WindowSpec,
    pub(super) reader: FieldReader,
    pub(super) results: Results,
    pub(super) watermarks: Watermarks,
    partitions: HashMap<Box<str>, Vec<(i32, PartitionId)>>,
    /// Each partition's (topic, partition), by its id.
    pub(super) partition_names: Vec<(Box<str>, i32)>,
    /// The last record's partition: most records follow one of theirs.
    last_partition: Option<(i32, PartitionId)>,
    last_topic: String,
    pub(super) panes: BTreeMap<i64, Pane>,
    pub(super) sessions: HashTable<KeySessions>,
    /// Sessions by when they next need attention (their end, or once
    /// emitted their end plus the lateness): (deadline, key, start).
    pub(super) deadlines: BTreeSet<(i64, Box<[u8]>, i64)>,
    /// No window fires, and none is forgotten, before the watermark
    /// reaches this (it may be early, never late).
    pub(super) next_due: i64,
    pub(super) arrivals: u64,
}

impl WindowOperator {
    /// An operator with no state yet, for a spec with built-in aggregates
    /// only (see [`WindowOperator::with_plugins`]).
    pub fn new(spec: WindowSpec) -> Self {
        Self::with_plugins(spec, Vec::new())
    }

    /// An operator with no state yet; `plugins` are the spec's plugin
    /// aggregates, started, in the order of the spec.
    pub fn with_plugins(spec: WindowSpec, plugins: Vec<PluginAggregate>) -> Self {
        Self::with_shared(
            spec,
            plugins.into_iter().map(SharedAggregate::new).collect(),
        )
    }

    /// An operator with no state yet; `plugins` are the spec's plugin
    /// aggregates, started, in the order of the spec, maybe shared with
    /// other operators.
    pub fn with_shared(spec: WindowSpec, plugins: Vec<SharedAggregate>) -> Self {
        let mut plugins = plugins.into_iter();
        let plugins: Vec<_> = (spec.aggregates.iter())
            .map(|a| match a.function {
                AggregateFn::Plugin => plugins.next(),
                _ => None,
            })
            .collect();
        let results = Results {
            names: (spec.aggregates.iter())
                .map(|a| format!(",{}:", serde_json::Value::from(a.name.as_str())))
                .collect(),
            key_is_json: spec.key.is_some(),
            takes_records: plugins.iter().any(Option::is_some),
            plugins,
        };
        WindowOperator {
            watermarks: Watermarks::new(spec.watermark_delay, spec.idle_timeout),
            reader: FieldReader::new(&spec),
            spec,
            results,
            partitions: HashMap::new(),
            partition_names: Vec::new(),
            last_partition: None,
            last_topic: String::new(),
            panes: BTreeMap::new(),
            sessions: HashTable::new(),
            deadlines: BTreeSet::new(),
            next_due: i64::MAX,
            arrivals: 0,
        }
    }

    /// Reads with `reader` (another operator's: keys hash alike in both).
    pub fn sharing_reader(mut self, reader: FieldReader) -> Self {
        self.reader = reader;
        self
    }

    /// Raises the watermark to `watermark` (if it is higher) and fires
    /// what that completes: a window of a partition gone quiet closes as
    /// the pipeline's others move on.
    pub fn advance(&mut self, watermark: i64, out: &mut WindowOutput) {
        let watermark = self.watermarks.raise(watermark);
        self.fire(watermark, out);
    }

    /// Counts every partition it has seen as heard from `now`: a window
    /// taken up from a checkpoint after a restart (or from another worker)
    /// gives each partition a whole idle timeout before it stops holding
    /// the watermark, however quiet it was before: its records may be on
    /// their way.
    pub fn touch(&mut self, now: Instant) {
        self.watermarks.touch(now);
    }

    /// Whether every partition it has seen is quiet (idle, and not behind)
    /// as of `now`.
    pub fn is_idle(&self, now: Instant) -> bool {
        self.watermarks.is_idle(now)
    }

    /// A reader of the fields this window needs, to read batches with
    /// before [`WindowOperator::push_read`] (on other threads).
    pub fn reader(&self) -> FieldReader {
        self.reader.clone()
    }

    /// What the source says is behind (see [`Watermarks`]): `None` until
    /// it has said, `Some` with the partitions it has records of still to
    /// deliver. Fires what a watermark that moved completes.
    pub fn backlog(
        &mut self,
        behind: Option<&[(std::sync::Arc<str>, i32)]>,
        now: Instant,
        out: &mut WindowOutput,
    ) {
        let Some(behind) = behind else {
            self.watermarks.hold();
            return;
        };
        let ids: Vec<PartitionId> = (behind.iter())
            .map(|(topic, partition)| self.partition(topic, *partition))
            .collect();
        let watermark = self.watermarks.behind(&ids, now);
        self.fire(watermark, out);
    }

    /// The watermark now.
    pub fn watermark(&self) -> i64 {
        self.watermarks.current()
    }

    /// Open windows: keys in tumbling or hopping windows, sessions.
    pub fn open_windows(&self) -> usize {
        self.panes.values().map(|p| p.groups.len()).sum::<usize>()
            + self
                .sessions
                .iter()
                .map(|s| s.sessions.len())
                .sum::<usize>()
    }

    /// Takes `batch`'s records in order, as seen at `now`.
    pub fn push(&mut self, batch: &Batch, now: Instant, out: &mut WindowOutput) {
        let read = self.reader.read(batch);
        self.push_read(batch, &read, now, out);
    }

    /// Takes `batch`'s records in order, as seen at `now`, with what
    /// [`WindowOperator::reader`] read of them.
    pub fn push_read(
        &mut self,
        batch: &Batch,
        read: &ReadBatch,
        now: Instant,
        out: &mut WindowOutput,
    ) {
        self.push_range(batch, read, 0..batch.len(), now, out);
    }

    /// Takes the records of `batch` at `range`, in order, as
    /// [`WindowOperator::push_read`] does (results and indices as in the
    /// whole batch).
    pub fn push_range(
        &mut self,
        batch: &Batch,
        read: &ReadBatch,
        range: std::ops::Range<usize>,
        now: Instant,
        out: &mut WindowOutput,
    ) {
        debug_assert_eq!(batch.len(), read.len());
        let end = range.end;
        for at in range {
            if at + PREFETCH_AHEAD < end
                && let Ok((ahead, _)) = read.get(at + PREFETCH_AHEAD)
            {
                self.prefetch(ahead);
            }
            match read.get(at) {
                Ok((row, args)) => {
                    if let Taken::Late = self.take(batch, at, row, args, now, out) {
                        out.late.push(at);
                    }
                }
                Err(reason) => out.dead.push((at, reason.to_owned())),
            }
        }
    }

    /// Asks the memory for the group a record coming soon probably goes
    /// to (its tumbling window, or its latest hopping one): a window's
    /// groups outgrow the caches, and waiting for one is most of what
    /// adding a record costs. A hint only: it changes nothing.
    #[inline]
    fn prefetch(&self, row: Row) {
        let (WindowKind::Tumbling { size: slide } | WindowKind::Hopping { slide, .. }) =
            self.spec.kind
        else {
            return;
        };
        let Some(pane) = self.panes.get(&(row.time.div_euclid(slide) * slide)) else {
            return;
        };
        // The first index entry with the key's hash tag: the key is not
        // compared, as that would wait for the very memory asked for.
        if let Some(&at) = pane.index.find(row.hash, |_| true)
            && let Some(group) = pane.groups.get(at as usize)
        {
            prefetch(group);
        }
    }

    /// Time passed (`now`) without records: idle partitions stop holding
    /// the watermark back, and windows it passes fire.
    pub fn tick(&mut self, now: Instant, out: &mut WindowOutput) {
        let watermark = self.watermarks.tick(now);
        self.fire(watermark, out);
    }

    /// The input ended: every open window fires.
    pub fn finish(&mut self, out: &mut WindowOutput) {
        self.fire(i64::MAX, out);
    }

    /// Per source partition (topic, partition), the lowest offset an open
    /// window holds: a commit must not pass it.
    pub fn held(&self) -> Vec<(&str, i32, i64)> {
        let mut lowest: HashMap<PartitionId, i64> = HashMap::new();
        let helds = (self.panes.values().map(|p| &p.held)).chain(
            self.sessions
                .iter()
                .flat_map(|s| &s.sessions)
                .map(|s| &s.held),
        );
        for held in helds {
            for &(partition, offset) in &held.0 {
                let entry = lowest.entry(partition).or_insert(offset);
                *entry = (*entry).min(offset);
            }
        }
        let mut held: Vec<(&str, i32, i64)> = (lowest.into_iter())
            .map(|(id, offset)| {
                let (topic, partition) = &self.partition_names[id as usize];
                (&**topic, *partition, offset)
            })
            .collect();
        held.sort_unstable();
        held
    }

    #[inline]
    fn take(
        &mut self,
        batch: &Batch,
        at: usize,
        row: Row,
        args: &[Arg],
        now: Instant,
        out: &mut WindowOutput,
    ) -> Taken {
        let bytes = batch.wire();
        let (time, hash, key) = (row.time, row.hash, row.key.of(bytes));
        // The record itself only when it is needed: its source changed, or
        // a plugin aggregate takes it.
        let record = (!row.same_source || self.results.takes_records).then(|| batch.get(at));
        let partition = match self.last_partition {
            Some((_, id)) if row.same_source => id,
            _ => {
                let record = record.unwrap_or_else(|| batch.get(at));
                self.partition(record.topic(), record.partition())
            }
        };
        let watermark = self.watermarks.current();
        self.arrivals += 1;
        let input = Entry {
            record: record.filter(|_| self.results.takes_records),
            args,
            bytes,
            time,
            arrival: self.arrivals,
            partition,
            offset: row.offset,
        };
        let lateness = self.spec.allowed_lateness;
        let taken = match self.spec.kind {
            WindowKind::Tumbling { size } => {
                let start = time.div_euclid(size) * size;
                let key = (hash, &row.short, key);
                self.add_to_panes([start].into_iter(), size, key, &input, watermark, out)
            }
            WindowKind::Hopping { size, slide } => {
                // Earliest first, so results come out in order of their end.
                let last = time.div_euclid(slide) * slide;
                let mut first = last;
                while first - slide + size > time {
                    first -= slide;
                }
                let starts = std::iter::successors(Some(first), |start| Some(start + slide))
                    .take_while(|start| *start <= last);
                let key = (hash, &row.short, key);
                self.add_to_panes(starts, size, key, &input, watermark, out)
            }
            WindowKind::Session { gap } => {
                if time.saturating_add(gap).saturating_add(lateness) <= watermark {
                    Taken::Late
                } else {
                    let state = SessionState {
                        sessions: &mut self.sessions,
                        deadlines: &mut self.deadlines,
                        next_due: &mut self.next_due,
                        spec: &self.spec,
                        results: &mut self.results,
                    };
                    state.add((hash, key), gap, &input, watermark, out);
                    Taken::Windowed
                }
            }
        };
        let watermark = self.watermarks.observe(partition, time, now);
        if watermark >= self.next_due {
            self.fire(watermark, out);
        }
        taken
    }

    /// Adds a record to the panes starting at `starts` (earliest first)
    /// that are not past their lateness; late if there is none.
    #[inline]
    fn add_to_panes(
        &mut self,
        starts: impl Iterator<Item = i64>,
        size: i64,
        (hash, short, key): (u64, &ShortKey, &[u8]),
        input: &Entry<'_>,
        watermark: i64,
        out: &mut WindowOutput,
    ) -> Taken {
        let mut taken = Taken::Late;
        for start in starts {
            let end = start.saturating_add(size);
            if end.saturating_add(self.spec.allowed_lateness) <= watermark {
                continue;
            }
            taken = Taken::Windowed;
            let pane = self.panes.entry(start).or_insert_with(|| {
                self.next_due = self.next_due.min(end);
                Pane::default()
            });
            let aggregates = &self.spec.aggregates;
            let groups = &mut pane.groups;
            let found = (pane.index).entry(
                hash,
                |&at| groups[at as usize].key.is(short, key),
                |&at| groups[at as usize].hash,
            );
            let (at, new) = match found {
                TableEntry::Occupied(at) => (*at.get() as usize, false),
                TableEntry::Vacant(vacant) => {
                    // Fewer than 4 G keys in one window.
                    vacant.insert(groups.len() as u32);
                    groups.push(Group {
                        hash,
                        key: GroupKey::new(*short, key),
                        accumulators: self.results.accumulators(aggregates, hash),
                    });
                    (groups.len() - 1, true)
                }
            };
            let group = &mut groups[at];
            self.results.add(&mut group.accumulators, input);
            pane.held.note(input.partition, input.offset);
            if pane.emitted {
                // Within the lateness of a window already fired: the key's
                // result goes out now (its first, if the key is new there).
                let result =
                    (self.results).result((start, end), key, &mut group.accumulators, !new);
                out.results.push(result);
            }
        }
        taken
    }

    pub(super) fn partition(&mut self, topic: &str, partition: i32) -> PartitionId {
        if let Some((last, id)) = self.last_partition
            && last == partition
            && self.last_topic == topic
        {
            return id;
        }
        let ids = self.partitions.entry(topic.into()).or_default();
        let id = match ids.iter().find(|(p, _)| *p == partition) {
            Some(&(_, id)) => id,
            None => {
                let id = self.partition_names.len() as PartitionId;
                self.partition_names.push((topic.into(), partition));
                ids.push((partition, id));
                id
            }
        };
        self.last_partition = Some((partition, id));
        topic.clone_into(&mut self.last_topic);
        id
    }

    /// Fires what `watermark` completes, and forgets what it puts past
    /// the lateness.
    fn fire(&mut self, watermark: i64, out: &mut WindowOutput) {
        let lateness = self.spec.allowed_lateness;
        match self.spec.kind {
            WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => {
                // Panes are in order of their start, so of their end too.
                for (&start, pane) in &mut self.panes {
                    let end = start.saturating_add(size);
                    if end > watermark {
                        break;
                    }
                    if pane.emitted {
                        continue;
                    }
                    // In order of their keys, so that a run's output is
                    // the same every time.
                    let mut groups: Vec<(u128, &mut Group)> = pane
                        .groups
                        .iter_mut()
                        .map(|g| (g.key.prefix(), g))
                        .collect();
                    groups.sort_unstable_by(|(a_prefix, a), (b_prefix, b)| {
                        (a_prefix.cmp(b_prefix)).then_with(|| a.key.get().cmp(b.key.get()))
                    });
                    self.results.settle_all(&mut groups);
                    for (_, group) in groups {
                        let key = group.key.get();
                        let result = (self.results).result(
                            (start, end),
                            key,
                            &mut group.accumulators,
                            false,
                        );
                        out.results.push(result);
                    }
                    pane.emitted = true;
                }
                while let Some((&start, _)) = self.panes.first_key_value()
                    && start.saturating_add(size).saturating_add(lateness) <= watermark
                {
                    for group in self.panes.pop_first().iter().flat_map(|(_, p)| &p.groups) {
                        self.results.free(&group.accumulators);
                    }
                }
                // Every pane that ends by the watermark has fired (above):
                // the next to fire is the first that has not, and the next
                // to forget the first.
                let first_forgotten = (self.panes.keys().next()).map_or(i64::MAX, |start| {
                    start.saturating_add(size).saturating_add(lateness)
                });
                let first_fired = (self.panes.iter().find(|(_, pane)| !pane.emitted))
                    .map_or(i64::MAX, |(start, _)| start.saturating_add(size));
                self.next_due = first_forgotten.min(first_fired);
            }
            WindowKind::Session { .. } => {
                while let Some(first) = self.deadlines.first()
                    && first.0 <= watermark
                {
                    let Some((_, key, start)) = self.deadlines.pop_first() else {
                        break;
                    };
                    let hash = self.reader.hash(&key);
                    let Ok(mut entry) = self.sessions.find_entry(hash, |s| s.key == key) else {
                        continue;
                    };
                    let sessions = &mut entry.get_mut().sessions;
                    let Some(at) = sessions.iter().position(|s| s.start == start) else {
                        continue;
                    };
                    let session = &mut sessions[at];
                    if session.pending {
                        out.results.push(self.results.result(
                            (session.start, session.end),
                            &key,
                            &mut session.accumulators,
                            session.emitted,
                        ));
                        session.pending = false;
                        session.emitted = true;
                    }
                    let purge_at = session.end.saturating_add(lateness);
                    if purge_at <= watermark {
                        let gone = sessions.swap_remove(at);
                        self.results.free(&gone.accumulators);
                        if sessions.is_empty() {
                            entry.remove();
                        }
                    } else {
                        self.deadlines.insert((purge_at, key, start));
                    }
                }
                self.next_due = self.deadlines.first().map_or(i64::MAX, |first| first.0);
            }
        }
    }
}

/// The session windows' state, borrowed apart from the rest.
struct SessionState<'a> {
    sessions: &'a mut HashTable<KeySessions>,
    deadlines: &'a mut BTreeSet<(i64, Box<[u8]>, i64)>,
    next_due: &'a mut i64,
    spec: &'a WindowSpec,
    results: &'a mut Results,
}

impl SessionState<'_> {
    /// Adds a record to its key's session, merging the sessions it
    /// touches; a session already complete emits its update at once.
    fn add(
        self,
        (hash, key): (u64, &[u8]),
        gap: i64,
        input: &Entry<'_>,
        watermark: i64,
        out: &mut WindowOutput,
    ) {
        let (start, end) = (input.time, input.time.saturating_add(gap));
        let sessions = &mut (self.sessions)
            .entry(hash, |s| *s.key == *key, |s| s.hash)
            .or_insert_with(|| KeySessions {
                hash,
                key: key.into(),
                sessions: Vec::new(),
            })
            .into_mut()
            .sessions;
        let mut merged = Session {
            start,
            end,
            accumulators: self.results.accumulators(&self.spec.aggregates, hash),
            held: Held::default(),
            emitted: false,
            pending: true,
        };
        self.results.add(&mut merged.accumulators, input);
        merged.held.note(input.partition, input.offset);
        // Sessions that touch or overlap the new event's merge into one.
        let mut at = 0;
        while at < sessions.len() {
            let session = &sessions[at];
            if session.start <= end && start <= session.end {
                let session = sessions.swap_remove(at);
                let deadline = match session.emitted && !session.pending {
                    true => session.end.saturating_add(self.spec.allowed_lateness),
                    false => session.end,
                };
                self.deadlines
                    .remove(&(deadline, key.into(), session.start));
                merged.start = merged.start.min(session.start);
                merged.end = merged.end.max(session.end);
                merged.emitted |= session.emitted;
                self.results
                    .merge(&mut merged.accumulators, session.accumulators);
                merged.held.absorb(&session.held);
            } else {
                at += 1;
            }
        }
        let deadline = if merged.end <= watermark {
            // Within the lateness of a session already complete: its
            // updated result goes out now.
            merged.pending = false;
            merged.emitted = true;
            out.results.push(self.results.result(
                (merged.start, merged.end),
                key,
                &mut merged.accumulators,
                true,
            ));
            merged.end.saturating_add(self.spec.allowed_lateness)
        } else {
            merged.end
        };
        self.deadlines.insert((deadline, key.into(), merged.start));
        *self.next_due = (*self.next_due).min(deadline);
        sessions.push(merged);
    }
}

/// One record's part in the windows it goes to.
struct Entry<'a> {
    /// The record, for plugin aggregates.
    record: Option<RecordRef<'a>>,
    args: &'a [Arg],
    bytes: &'a [u8],
    time: i64,
    arrival: u64,
    partition: PartitionId,
    offset: i64,
}

impl Entry<'_> {
    /// Gives `accumulator` (a built-in one) its argument `arg`.
    #[inline]
    fn add_to(&self, accumulator: &mut Accumulator, arg: &Arg) {
        accumulator.add(&Input {
            arg,
            bytes: self.bytes,
            time: self.time,
            arrival: self.arrival,
        });
    }
}
