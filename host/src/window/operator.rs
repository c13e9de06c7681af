//! The window operator: takes records in order, groups them by key into
//! windows on event time, fires each window once the watermark passes its
//! end, and hands late records back.
//!
//! Fields are read from the raw JSON of each value with the scanner of
//! `weir_guest::json` (no tree is built; the scan stops once the fields it
//! needs are found). The watermark moves after every record, so what fires
//! when depends on the records' order and on time passing, never on how
//! they were batched.
//!
//! State is kept per window: tumbling and hopping windows by their start,
//! each holding its keys' accumulators; sessions per key. Each window also
//! knows the lowest source offset it holds per partition, so that a source
//! commits nothing an open window still needs ([`WindowOperator::held`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

use super::aggregate::{Accumulator, Input, check};
use super::config::{AggregateFn, WindowKind, WindowSpec};
use super::plugin::{PluginAggregate, PluginState};
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
struct Held(Vec<(PartitionId, i64)>);

impl Held {
    #[inline]
    fn note(&mut self, partition: PartitionId, offset: i64) {
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

/// A tumbling or hopping window: every key's accumulators.
#[derive(Debug, Default)]
struct Pane {
    groups: HashMap<Box<[u8]>, Vec<Accumulator>>,
    held: Held,
    emitted: bool,
}

/// One session of one key.
#[derive(Debug)]
struct Session {
    start: i64,
    /// The last event's time plus the gap.
    end: i64,
    accumulators: Vec<Accumulator>,
    held: Held,
    /// Its result went out once.
    emitted: bool,
    /// It changed since its result last went out.
    pending: bool,
}

/// Where a record went.
enum Taken {
    Windowed,
    Late,
}

/// Writes results.
struct Results {
    /// `,"name":` of each aggregate, escaped once.
    names: Vec<String>,
    /// The key is a JSON field's raw text (else the record key's bytes).
    key_is_json: bool,
    /// Each plugin aggregate's plugin, by the aggregate's place.
    plugins: Vec<Option<PluginAggregate>>,
}

impl Results {
    /// Settles the plugin aggregates of every group in `groups` at once
    /// (a window firing): one call per plugin for all of them, not one per
    /// key.
    fn settle_all<K>(&mut self, groups: &mut [(K, &mut Vec<Accumulator>)]) {
        for (at, plugin) in self.plugins.iter_mut().enumerate() {
            let Some(plugin) = plugin else { continue };
            let mut states: Vec<&mut PluginState> = (groups.iter_mut())
                .filter_map(|(_, accumulators)| match &mut accumulators[at] {
                    Accumulator::Plugin(state) => Some(&mut **state),
                    _ => None,
                })
                .collect();
            plugin.settle(&mut states);
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
        for (at, accumulator) in accumulators.iter_mut().enumerate() {
            let Accumulator::Plugin(state) = accumulator else {
                continue;
            };
            let name = self.names[at].trim_start_matches(',').trim_end_matches(':');
            let Some(plugin) = self.plugins.get_mut(at).and_then(Option::as_mut) else {
                errors.push(format!("aggregate {name} (no plugin instance)"));
                continue;
            };
            plugin.settle(&mut [&mut **state]);
            if let Some(Err(reason)) = state.settled() {
                errors.push(format!("aggregate {name} ({}: {reason})", plugin.label()));
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
        for (name, accumulator) in self.names.iter().zip(accumulators) {
            value.push_str(name);
            accumulator.write_json(&mut value);
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
    spec: WindowSpec,
    /// The JSON fields read from each value, without repeats.
    fields: Vec<String>,
    /// Where the key, the time and each aggregate's field are in `fields`.
    key_field: Option<usize>,
    time_field: Option<usize>,
    aggregate_fields: Vec<Option<usize>>,
    results: Results,
    watermarks: Watermarks,
    partitions: HashMap<Box<str>, Vec<(i32, PartitionId)>>,
    /// Each partition's (topic, partition), by its id.
    partition_names: Vec<(Box<str>, i32)>,
    /// The last record's partition: most records follow one of theirs.
    last_partition: Option<(i32, PartitionId)>,
    last_topic: String,
    panes: BTreeMap<i64, Pane>,
    /// Panes starting before this have fired.
    fired_before: i64,
    sessions: HashMap<Box<[u8]>, Vec<Session>>,
    /// Sessions by when they next need attention (their end, or once
    /// emitted their end plus the lateness): (deadline, key, start).
    deadlines: BTreeSet<(i64, Box<[u8]>, i64)>,
    arrivals: u64,
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
        let mut plugins = plugins.into_iter();
        let plugins = (spec.aggregates.iter())
            .map(|a| match a.function {
                AggregateFn::Plugin => plugins.next(),
                _ => None,
            })
            .collect();
        let mut fields: Vec<String> = Vec::new();
        let mut index_of = |name: &str| match fields.iter().position(|f| f == name) {
            Some(at) => at,
            None => {
                fields.push(name.to_owned());
                fields.len() - 1
            }
        };
        let time_field = spec.time.as_deref().map(&mut index_of);
        let key_field = spec.key.as_deref().map(&mut index_of);
        let aggregate_fields = (spec.aggregates.iter())
            .map(|a| a.field.as_deref().map(&mut index_of))
            .collect();
        let results = Results {
            names: (spec.aggregates.iter())
                .map(|a| format!(",{}:", serde_json::Value::from(a.name.as_str())))
                .collect(),
            key_is_json: key_field.is_some(),
            plugins,
        };
        WindowOperator {
            watermarks: Watermarks::new(spec.watermark_delay, spec.idle_timeout),
            spec,
            fields,
            key_field,
            time_field,
            aggregate_fields,
            results,
            partitions: HashMap::new(),
            partition_names: Vec::new(),
            last_partition: None,
            last_topic: String::new(),
            panes: BTreeMap::new(),
            fired_before: i64::MIN,
            sessions: HashMap::new(),
            deadlines: BTreeSet::new(),
            arrivals: 0,
        }
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
            + self.sessions.values().map(Vec::len).sum::<usize>()
    }

    /// Takes `batch`'s records in order, as seen at `now`.
    pub fn push(&mut self, batch: &Batch, now: Instant, out: &mut WindowOutput) {
        let mut found: Vec<Option<(usize, usize)>> = vec![None; self.fields.len()];
        for at in 0..batch.len() {
            match self.take(batch.get(at), &mut found, now, out) {
                Ok(Taken::Windowed) => {}
                Ok(Taken::Late) => out.late.push(at),
                Err(reason) => out.dead.push((at, reason)),
            }
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
        let helds = (self.panes.values().map(|p| &p.held))
            .chain(self.sessions.values().flatten().map(|s| &s.held));
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

    fn take(
        &mut self,
        record: RecordRef<'_>,
        found: &mut [Option<(usize, usize)>],
        now: Instant,
        out: &mut WindowOutput,
    ) -> Result<Taken, String> {
        let value = record.value();
        if !self.fields.is_empty() {
            read_fields(&self.fields, value, found)?;
        }
        let field = |index: Option<usize>| {
            index
                .and_then(|i| found[i])
                .map(|(from, to)| &value[from..to])
        };
        let time = match self.time_field {
            Some(at) => parse_time(field(Some(at)), &self.fields[at])?,
            None => record.timestamp().ok_or(
                "window: the record has no timestamp (set `time` to read the event time from a JSON field)",
            )?,
        };
        let key: &[u8] = match self.key_field {
            Some(at) => field(Some(at)).ok_or_else(|| {
                format!(
                    "window: the value has no `{}` field to group by",
                    self.fields[at]
                )
            })?,
            None => record.key().unwrap_or_default(),
        };
        for (aggregate, at) in self.spec.aggregates.iter().zip(&self.aggregate_fields) {
            check(aggregate.function, field(*at)).map_err(|why| {
                let name = at.map_or("", |at| self.fields[at].as_str());
                format!(
                    "window: field `{name}` {why} (aggregate `{}`)",
                    aggregate.name
                )
            })?;
        }
        let partition = self.partition(record.topic(), record.partition());
        let watermark = self.watermarks.current();
        self.arrivals += 1;
        let input = Entry {
            record,
            found,
            value,
            fields: &self.aggregate_fields,
            time,
            arrival: self.arrivals,
            partition,
            offset: record.offset(),
        };
        let lateness = self.spec.allowed_lateness;
        let taken = match self.spec.kind {
            WindowKind::Tumbling { size } => {
                let start = time.div_euclid(size) * size;
                add_to_panes(
                    &mut self.panes,
                    &self.spec,
                    &mut self.results,
                    [start].into_iter(),
                    size,
                    key,
                    &input,
                    watermark,
                    out,
                )
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
                add_to_panes(
                    &mut self.panes,
                    &self.spec,
                    &mut self.results,
                    starts,
                    size,
                    key,
                    &input,
                    watermark,
                    out,
                )
            }
            WindowKind::Session { gap } => {
                if time.saturating_add(gap).saturating_add(lateness) <= watermark {
                    Taken::Late
                } else {
                    let state = SessionState {
                        sessions: &mut self.sessions,
                        deadlines: &mut self.deadlines,
                        spec: &self.spec,
                        results: &mut self.results,
                    };
                    state.add(key, gap, &input, watermark, out);
                    Taken::Windowed
                }
            }
        };
        let watermark = self.watermarks.observe(partition, time, now);
        self.fire(watermark, out);
        Ok(taken)
    }

    fn partition(&mut self, topic: &str, partition: i32) -> PartitionId {
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
                while let Some((&start, pane)) = self.panes.range_mut(self.fired_before..).next()
                    && start.saturating_add(size) <= watermark
                {
                    let mut groups: Vec<_> = pane.groups.iter_mut().collect();
                    groups.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    self.results.settle_all(&mut groups);
                    for (key, accumulators) in groups {
                        out.results.push(self.results.result(
                            (start, start + size),
                            key,
                            accumulators,
                            false,
                        ));
                    }
                    pane.emitted = true;
                    self.fired_before = start.saturating_add(1);
                }
                while let Some((&start, _)) = self.panes.first_key_value()
                    && start.saturating_add(size).saturating_add(lateness) <= watermark
                    && start < self.fired_before
                {
                    self.panes.pop_first();
                }
            }
            WindowKind::Session { .. } => {
                while let Some(first) = self.deadlines.first()
                    && first.0 <= watermark
                {
                    let Some((_, key, start)) = self.deadlines.pop_first() else {
                        break;
                    };
                    let Some(sessions) = self.sessions.get_mut(&key) else {
                        continue;
                    };
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
                        sessions.swap_remove(at);
                        if sessions.is_empty() {
                            self.sessions.remove(&key);
                        }
                    } else {
                        self.deadlines.insert((purge_at, key, start));
                    }
                }
            }
        }
    }
}

/// The session windows' state, borrowed apart from the rest.
struct SessionState<'a> {
    sessions: &'a mut HashMap<Box<[u8]>, Vec<Session>>,
    deadlines: &'a mut BTreeSet<(i64, Box<[u8]>, i64)>,
    spec: &'a WindowSpec,
    results: &'a mut Results,
}

impl SessionState<'_> {
    /// Adds a record to its key's session, merging the sessions it
    /// touches; a session already complete emits its update at once.
    fn add(self, key: &[u8], gap: i64, input: &Entry<'_>, watermark: i64, out: &mut WindowOutput) {
        let (start, end) = (input.time, input.time.saturating_add(gap));
        let sessions = self.sessions.entry(key.into()).or_default();
        let mut merged = Session {
            start,
            end,
            accumulators: self.spec.aggregates.iter().map(Accumulator::new).collect(),
            held: Held::default(),
            emitted: false,
            pending: true,
        };
        input.add_to(&mut merged.accumulators, &mut merged.held);
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
                for (mine, theirs) in merged.accumulators.iter_mut().zip(session.accumulators) {
                    mine.merge(theirs);
                }
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
        sessions.push(merged);
    }
}

/// One record's part in the windows it goes to.
struct Entry<'a> {
    record: RecordRef<'a>,
    found: &'a [Option<(usize, usize)>],
    value: &'a [u8],
    fields: &'a [Option<usize>],
    time: i64,
    arrival: u64,
    partition: PartitionId,
    offset: i64,
}

impl Entry<'_> {
    #[inline]
    fn add_to(&self, accumulators: &mut [Accumulator], held: &mut Held) {
        for (accumulator, at) in accumulators.iter_mut().zip(self.fields) {
            let raw = at
                .and_then(|i| self.found[i])
                .map(|(from, to)| &self.value[from..to]);
            accumulator.add(&Input {
                raw,
                time: self.time,
                arrival: self.arrival,
                record: Some(&self.record),
            });
        }
        held.note(self.partition, self.offset);
    }
}

/// Adds a record to the panes starting at `starts` (earliest first) that
/// are not past their lateness; late if there is none.
#[allow(
    clippy::too_many_arguments,
    reason = "the operator's fields, borrowed apart"
)]
fn add_to_panes(
    panes: &mut BTreeMap<i64, Pane>,
    spec: &WindowSpec,
    results: &mut Results,
    starts: impl Iterator<Item = i64>,
    size: i64,
    key: &[u8],
    input: &Entry<'_>,
    watermark: i64,
    out: &mut WindowOutput,
) -> Taken {
    let mut taken = Taken::Late;
    for start in starts {
        let end = start.saturating_add(size);
        if end.saturating_add(spec.allowed_lateness) <= watermark {
            continue;
        }
        taken = Taken::Windowed;
        let pane = panes.entry(start).or_default();
        let (accumulators, new) = match pane.groups.get_mut(key) {
            Some(accumulators) => (accumulators, false),
            None => (
                pane.groups
                    .entry(key.into())
                    .or_insert_with(|| spec.aggregates.iter().map(Accumulator::new).collect()),
                true,
            ),
        };
        input.add_to(accumulators, &mut pane.held);
        if pane.emitted {
            // Within the lateness of a window already fired: the key's
            // result goes out now (its first, if the key is new there).
            out.results
                .push(results.result((start, end), key, accumulators, !new));
        }
    }
    taken
}

/// Finds `fields` in a JSON object: each one's byte range in `value`.
#[inline]
fn read_fields(
    fields: &[String],
    value: &[u8],
    found: &mut [Option<(usize, usize)>],
) -> Result<(), String> {
    found.fill(None);
    let mut missing = fields.len();
    let base = value.as_ptr() as usize;
    for field in weir_guest::json::fields(value) {
        let (name, raw) =
            field.map_err(|err| format!("window: the value is not a JSON object: {err}"))?;
        for (at, wanted) in fields.iter().enumerate() {
            if found[at].is_none() && name.is(wanted) {
                let from = raw.as_ptr() as usize - base;
                found[at] = Some((from, from + raw.len()));
                missing -= 1;
                break;
            }
        }
        if missing == 0 {
            break;
        }
    }
    Ok(())
}

/// An event time in epoch milliseconds from a JSON number.
#[inline]
fn parse_time(raw: Option<&[u8]>, field: &str) -> Result<i64, String> {
    let raw =
        raw.ok_or_else(|| format!("window: the value has no `{field}` field (the event time)"))?;
    let integer = match raw {
        [b'-', digits @ ..] => digits_value(digits).map(|v| -v),
        digits => digits_value(digits),
    };
    if let Some(time) = integer {
        return Ok(time);
    }
    match weir_guest::json::number(raw) {
        Some(ms) if ms.is_finite() && ms.abs() < 9.0e15 => Ok(ms.floor() as i64),
        _ => Err(format!(
            "window: `{field}` is {}, not an event time in epoch milliseconds",
            String::from_utf8_lossy(raw)
        )),
    }
}

#[inline]
fn digits_value(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(digit - b'0');
    }
    Some(value)
}
