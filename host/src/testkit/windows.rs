//! Window test kit: random keyed streams over several partitions, out of
//! order, with equal timestamps, late records and idle partitions, cut into
//! random batches; a way to feed them to a [`WindowOperator`]; and a
//! reference model that recomputes every window and late record from the
//! whole event list in the simplest way. The operator's property tests use
//! it with the built-in aggregates; a plugin aggregate is checked the same
//! way with [`check`] and its own expected value.
//!
//! Each event's value is `{"ts": time, "k": key, "v": number}`: a window
//! spec for them groups by `k` and reads the time from `ts`
//! ([`spec_for`]).
//!
//! ```no_run
//! use weir::testkit::windows::{check, random_stream, spec_for, Taken};
//! use weir::window::{WindowKind, WindowOperator};
//! let spec = spec_for(WindowKind::Tumbling { size: 1000 }, 500, 0, Vec::new());
//! let steps = random_stream(7);
//! # let expected = |events: &[Taken]| serde_json::json!({});
//! check(&spec, &steps, WindowOperator::new(spec.clone()), expected, "seed 7");
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use weir_guest::abi::RecordParts;

use crate::batch::Batch;
use crate::window::{
    AggregateSpec, WindowKind, WindowOperator, WindowOutput, WindowResult, WindowSpec,
};

/// One event of a stream.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its source partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its event time (ms).
    pub time: i64,
    /// Its key.
    pub key: String,
    /// Its number.
    pub v: i64,
}

/// A batch of events seen at `now` (ms after the start), then maybe a
/// tick at `tick`.
#[derive(Debug, Clone)]
pub struct Step {
    /// When the batch arrives (ms after the start).
    pub now: u64,
    /// Its events.
    pub events: Vec<Event>,
    /// A tick (ms after the start) after it, if any.
    pub tick: Option<u64>,
}

/// The idle timeout of [`spec_for`]: a tick this long after a partition's
/// last event makes it idle.
pub const IDLE_MS: u64 = 5_000;

/// A random stream: one to three partitions (some stop early, and go
/// idle), events out of order by up to 700 ms, often on the same
/// millisecond, three keys.
pub fn random_stream(seed: u64) -> Vec<Step> {
    let rng = &mut fastrand::Rng::with_seed(seed);
    let partitions = rng.i32(1..=3);
    let mut clocks = vec![0i64; partitions as usize];
    let mut offsets = vec![0i64; partitions as usize];
    // Some partitions stop early: idle, they must stop holding the mark.
    let stops: Vec<usize> = (0..partitions).map(|_| rng.usize(20..200)).collect();
    let mut now = 0u64;
    let mut steps = Vec::new();
    for _ in 0..rng.usize(5..40) {
        now += rng.u64(0..50);
        let mut events = Vec::new();
        for _ in 0..rng.usize(0..12) {
            let partition = rng.i32(0..partitions);
            let p = partition as usize;
            if offsets[p] as usize >= stops[p] {
                continue;
            }
            clocks[p] += rng.i64(0..400);
            // Out of order, often on the same millisecond.
            let time = (clocks[p] + rng.i64(-700..700)).max(0) / 50 * 50;
            events.push(Event {
                partition,
                offset: offsets[p],
                time,
                key: format!("k{}", rng.u8(0..3)),
                v: rng.i64(-5..100),
            });
            offsets[p] += 1;
        }
        let tick = rng.bool().then(|| {
            now += if rng.u8(0..6) == 0 {
                IDLE_MS + 1
            } else {
                rng.u64(0..100)
            };
            now
        });
        steps.push(Step { now, events, tick });
    }
    steps
}

/// A spec over the events of [`random_stream`]: keyed by `k`, timed by
/// `ts`, idle after [`IDLE_MS`], late records on the route `late`.
pub fn spec_for(
    kind: WindowKind,
    delay: i64,
    lateness: i64,
    aggregates: Vec<AggregateSpec>,
) -> WindowSpec {
    WindowSpec {
        kind,
        key: Some("k".into()),
        time: Some("ts".into()),
        watermark_delay: delay,
        allowed_lateness: lateness,
        idle_timeout: Duration::from_millis(IDLE_MS),
        late_route: "late".into(),
        aggregates,
    }
}

/// What the operator did: every result, and which events (partition,
/// offset) were late.
pub struct Fed {
    /// Every result, in order.
    pub results: Vec<WindowResult>,
    /// The late events.
    pub late: BTreeSet<(i32, i64)>,
}

/// Feeds `steps` to `operator` batch by batch, ticking where they say,
/// then ends the input.
///
/// # Panics
///
/// If the operator dead-letters an event.
pub fn feed(operator: &mut WindowOperator, steps: &[Step]) -> Fed {
    feed_part(operator, steps, Instant::now(), true)
}

/// Feeds `steps` to `operator` as [`feed`] does, their times counted from
/// `start`; ends the input only if `end`.
///
/// # Panics
///
/// If the operator dead-letters an event.
pub fn feed_part(operator: &mut WindowOperator, steps: &[Step], start: Instant, end: bool) -> Fed {
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut out = WindowOutput::default();
    let mut late = BTreeSet::new();
    for step in steps {
        let mut batch = Batch::new();
        for event in &step.events {
            let value = format!(
                r#"{{"ts":{},"k":"{}","v":{}}}"#,
                event.time, event.key, event.v
            );
            batch.push(
                RecordParts {
                    key: None,
                    value: value.as_bytes(),
                    timestamp: None,
                    topic: "in",
                    partition: event.partition,
                    offset: event.offset,
                },
                std::iter::empty(),
            );
        }
        operator.push(&batch, at(step.now), &mut out);
        assert!(out.dead.is_empty(), "{:?}", out.dead);
        for index in out.late.drain(..) {
            let event = &step.events[index];
            late.insert((event.partition, event.offset));
        }
        if let Some(tick) = step.tick {
            operator.tick(at(tick), &mut out);
        }
    }
    if end {
        operator.finish(&mut out);
    }
    Fed {
        results: out.results,
        late,
    }
}

/// The watermark rule, recomputed from scratch: per partition the latest
/// time seen, the lowest over partitions seen within the idle timeout (all
/// of them if none is), minus the delay, never going back.
struct ReferenceMarks {
    delay: i64,
    seen: HashMap<i32, (i64, u64)>,
    mark: i64,
}

impl ReferenceMarks {
    fn observe(&mut self, partition: i32, time: i64, now: u64) {
        let entry = self.seen.entry(partition).or_insert((time, now));
        *entry = (entry.0.max(time), now);
        self.recompute(now);
    }

    fn recompute(&mut self, now: u64) {
        let active: Vec<i64> = (self.seen.values())
            .filter(|(_, last)| now - last < IDLE_MS)
            .map(|(latest, _)| *latest)
            .collect();
        let candidate = match active.iter().min() {
            Some(lowest) => *lowest,
            None => match self.seen.values().map(|(latest, _)| *latest).max() {
                Some(highest) => highest,
                None => return,
            },
        };
        self.mark = self.mark.max(candidate - self.delay);
    }
}

/// An event as a window holds it: its time, its arrival number and its
/// number `v`.
pub type Taken = (i64, usize, i64);

/// Per key, its sessions not yet purged: (start, end, events).
type OpenSessions = HashMap<String, Vec<(i64, i64, Vec<Taken>)>>;

/// (key, start, end) -> the events in that window, and the late events.
pub type Windows = BTreeMap<(String, i64, i64), Vec<Taken>>;

/// The windows (with their events) and the late events the model
/// computes for `spec` over `steps`.
pub fn reference(spec: &WindowSpec, steps: &[Step]) -> (Windows, BTreeSet<(i32, i64)>) {
    let mut marks = ReferenceMarks {
        delay: spec.watermark_delay,
        seen: HashMap::new(),
        mark: i64::MIN,
    };
    let lateness = spec.allowed_lateness;
    let mut windows: Windows = BTreeMap::new();
    let mut late = BTreeSet::new();
    // Sessions per key: open (not yet purged) ones, and those done.
    let mut open: OpenSessions = HashMap::new();
    let mut arrival = 0;
    let close_sessions = |open: &mut OpenSessions, windows: &mut Windows, mark: i64| {
        for (key, sessions) in open.iter_mut() {
            sessions.retain(|(start, end, events)| {
                let done = end.saturating_add(lateness) <= mark;
                if done {
                    windows.insert((key.clone(), *start, *end), events.clone());
                }
                !done
            });
        }
    };
    for step in steps {
        for event in &step.events {
            arrival += 1;
            let taken = (event.time, arrival, event.v);
            let mark = marks.mark;
            let mut accepted = false;
            match spec.kind {
                WindowKind::Tumbling { size } | WindowKind::Hopping { size, .. } => {
                    let slide = match spec.kind {
                        WindowKind::Hopping { slide, .. } => slide,
                        _ => size,
                    };
                    // Every window start that covers the time, from scratch.
                    let mut start = (event.time - size).div_euclid(slide) * slide;
                    while start <= event.time {
                        if start + size > event.time && start + size + lateness > mark {
                            accepted = true;
                            windows
                                .entry((event.key.clone(), start, start + size))
                                .or_default()
                                .push(taken);
                        }
                        start += slide;
                    }
                }
                WindowKind::Session { gap } => {
                    if event.time + gap + lateness > mark {
                        accepted = true;
                        let sessions = open.entry(event.key.clone()).or_default();
                        let (mut start, mut end, mut events) =
                            (event.time, event.time + gap, vec![taken]);
                        sessions.retain(|(s, e, evs)| {
                            let touches = *s <= event.time + gap && event.time <= *e;
                            if touches {
                                start = start.min(*s);
                                end = end.max(*e);
                                events.extend(evs.iter().copied());
                            }
                            !touches
                        });
                        sessions.push((start, end, events));
                    }
                }
            }
            if !accepted {
                late.insert((event.partition, event.offset));
            }
            marks.observe(event.partition, event.time, step.now);
            close_sessions(&mut open, &mut windows, marks.mark);
        }
        if let Some(tick) = step.tick {
            marks.recompute(tick);
            close_sessions(&mut open, &mut windows, marks.mark);
        }
    }
    close_sessions(&mut open, &mut windows, i64::MAX);
    (windows, late)
}

/// What one case exercised: late records, updates, windows.
#[derive(Debug, Default)]
pub struct Exercised {
    /// Late events.
    pub late: usize,
    /// Updated results.
    pub updates: usize,
    /// Windows.
    pub windows: usize,
}

impl std::ops::AddAssign for Exercised {
    fn add_assign(&mut self, other: Self) {
        self.late += other.late;
        self.updates += other.updates;
        self.windows += other.windows;
    }
}

/// Feeds `steps` to `operator` (running `spec`) and checks what it emits
/// against the model: exactly the late events, and each window's last
/// result equal to `expected` (the aggregates' fields, given the window's
/// events) with its bounds and key. `case` names the case in failures.
///
/// # Panics
///
/// At the first difference, saying what it is.
pub fn check(
    spec: &WindowSpec,
    steps: &[Step],
    mut operator: WindowOperator,
    expected: impl Fn(&[Taken]) -> serde_json::Value,
    case: &str,
) -> Exercised {
    let kind = spec.kind;
    let run = feed(&mut operator, steps);
    let (windows, late) = reference(spec, steps);
    let context = || {
        let (delay, lateness) = (spec.watermark_delay, spec.allowed_lateness);
        format!("{case}, {kind:?}, delay {delay}, lateness {lateness}")
    };
    assert_eq!(run.late, late, "late records, {}", context());
    // The last result per window is its whole content; the first is not an
    // update; a session result that is no final session was merged into
    // one that contains it.
    let mut last: BTreeMap<(String, i64, i64), serde_json::Value> = BTreeMap::new();
    for result in &run.results {
        let value: serde_json::Value =
            serde_json::from_str(&result.value).expect("a result is a JSON object");
        let key = (value["key"].as_str())
            .expect("the events' keys are strings")
            .to_owned();
        assert_eq!(&*result.key, key.as_bytes());
        let id = (key, result.window_start, result.window_end);
        assert_eq!(value["window_start"], id.1);
        assert_eq!(value["window_end"], id.2);
        if !last.contains_key(&id) && !matches!(kind, WindowKind::Session { .. }) {
            assert!(
                !result.update,
                "first result of {id:?} is an update, {}",
                context()
            );
        }
        last.insert(id, value);
    }
    for ((key, start, end), events) in &windows {
        let got = last
            .remove(&(key.clone(), *start, *end))
            .unwrap_or_else(|| panic!("window {key} {start}..{end} never emitted, {}", context()));
        let mut want = expected(events);
        want["window_start"] = (*start).into();
        want["window_end"] = (*end).into();
        want["key"] = key.as_str().into();
        assert_eq!(got, want, "window {key} {start}..{end}, {}", context());
    }
    for (key, start, end) in last.keys() {
        let merged = matches!(kind, WindowKind::Session { .. })
            && windows
                .keys()
                .any(|(k, s, e)| k == key && s <= start && end <= e);
        assert!(
            merged,
            "window {key} {start}..{end} emitted but not expected, {}",
            context()
        );
    }
    Exercised {
        late: late.len(),
        updates: run.results.iter().filter(|r| r.update).count(),
        windows: windows.len(),
    }
}
