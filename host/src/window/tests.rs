//! Property tests: random keyed streams over several partitions, out of
//! order, with equal timestamps, late records and idle partitions, cut into
//! random batches, against a reference model that recomputes everything
//! from the whole event list in the simplest way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::*;
use crate::batch::Batch;
use weir_guest::abi::RecordParts;

#[derive(Debug, Clone)]
struct Event {
    partition: i32,
    offset: i64,
    time: i64,
    key: String,
    v: i64,
}

/// A batch of events seen at `now` (ms after the start), then maybe a
/// tick at `tick`.
#[derive(Debug, Clone)]
struct Step {
    now: u64,
    events: Vec<Event>,
    tick: Option<u64>,
}

const IDLE_MS: u64 = 5_000;

fn stream(rng: &mut fastrand::Rng) -> Vec<Step> {
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

fn spec(kind: WindowKind, delay: i64, lateness: i64) -> WindowSpec {
    let aggregates = [
        (AggregateFn::Count, None, "n"),
        (AggregateFn::Sum, Some("v"), "sum"),
        (AggregateFn::Min, Some("v"), "min"),
        (AggregateFn::Max, Some("v"), "max"),
        (AggregateFn::Avg, Some("v"), "avg"),
        (AggregateFn::First, Some("v"), "first"),
        (AggregateFn::Last, Some("v"), "last"),
        (AggregateFn::CountDistinct, Some("v"), "distinct"),
    ];
    WindowSpec {
        kind,
        key: Some("k".into()),
        time: Some("ts".into()),
        watermark_delay: delay,
        allowed_lateness: lateness,
        idle_timeout: Duration::from_millis(IDLE_MS),
        late_route: "late".into(),
        aggregates: aggregates
            .into_iter()
            .map(|(function, field, name)| AggregateSpec {
                function,
                field: field.map(str::to_owned),
                name: name.into(),
            })
            .collect(),
    }
}

/// What the operator did: every result, and which events were late.
struct Run {
    results: Vec<WindowResult>,
    late: BTreeSet<(i32, i64)>,
}

fn run_operator(spec: &WindowSpec, steps: &[Step]) -> Run {
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut operator = WindowOperator::new(spec.clone());
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
    operator.finish(&mut out);
    Run {
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

/// An event as aggregates see it.
type Taken = (i64, usize, i64);

/// Per key, its sessions not yet purged: (start, end, events).
type OpenSessions = HashMap<String, Vec<(i64, i64, Vec<Taken>)>>;

fn expected(events: &[Taken]) -> serde_json::Value {
    let values: Vec<i64> = events.iter().map(|e| e.2).collect();
    let sum: i64 = values.iter().sum();
    let first = events.iter().min_by_key(|e| (e.0, e.1)).map(|e| e.2);
    let last = events.iter().max_by_key(|e| (e.0, e.1)).map(|e| e.2);
    serde_json::json!({
        "n": events.len(),
        "sum": sum,
        "min": values.iter().min(),
        "max": values.iter().max(),
        "avg": json_number(sum as f64 / values.len() as f64),
        "first": first,
        "last": last,
        "distinct": values.iter().collect::<BTreeSet<_>>().len(),
    })
}

/// A number as the operator writes it (integral ones as integers).
fn json_number(value: f64) -> serde_json::Value {
    let mut text = String::new();
    super::aggregate::write_number(Some(value), &mut text);
    serde_json::from_str(&text).unwrap()
}

/// (key, start, end) -> the events in that window, and the late events.
type Windows = BTreeMap<(String, i64, i64), Vec<Taken>>;

fn reference(spec: &WindowSpec, steps: &[Step]) -> (Windows, BTreeSet<(i32, i64)>) {
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
#[derive(Default)]
struct Exercised {
    late: usize,
    updates: usize,
    windows: usize,
}

impl std::ops::AddAssign for Exercised {
    fn add_assign(&mut self, other: Self) {
        self.late += other.late;
        self.updates += other.updates;
        self.windows += other.windows;
    }
}

/// Checks a stream of enough cases for each thing to happen.
fn check_many(kind: impl Fn(u64) -> WindowKind) {
    let mut seen = Exercised::default();
    for seed in 0..400 {
        seen += check(kind(seed), seed);
    }
    assert!(
        seen.late > 100 && seen.updates > 100 && seen.windows > 1000,
        "the cases exercised too little: {} late, {} updates, {} windows",
        seen.late,
        seen.updates,
        seen.windows
    );
}

fn check(kind: WindowKind, seed: u64) -> Exercised {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (delay, lateness) = (
        rng.i64(0..1500),
        if rng.bool() { 0 } else { rng.i64(0..1500) },
    );
    let spec = spec(kind, delay, lateness);
    let steps = stream(&mut rng);
    let run = run_operator(&spec, &steps);
    let (windows, late) = reference(&spec, &steps);
    let context = || format!("seed {seed}, {kind:?}, delay {delay}, lateness {lateness}");
    assert_eq!(run.late, late, "late records, {}", context());
    // The last result per window is its whole content; the first is not an
    // update; a session result that is no final session was merged into
    // one that contains it.
    let mut last: BTreeMap<(String, i64, i64), serde_json::Value> = BTreeMap::new();
    for result in &run.results {
        let value: serde_json::Value = serde_json::from_str(&result.value).unwrap();
        let key = value["key"].as_str().unwrap().to_owned();
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

#[test]
fn tumbling_windows_match_the_reference_model() {
    check_many(|_| WindowKind::Tumbling { size: 1000 });
}

#[test]
fn hopping_windows_match_the_reference_model() {
    // Sizes that are and are not multiples of the slide.
    check_many(|seed| WindowKind::Hopping {
        size: [1000, 1500, 700][seed as usize % 3],
        slide: 500,
    });
}

#[test]
fn session_windows_match_the_reference_model() {
    check_many(|seed| WindowKind::Session {
        gap: [300, 800][seed as usize % 2],
    });
}
