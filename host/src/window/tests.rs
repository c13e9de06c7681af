//! Property tests: the window test kit's random streams against its
//! reference model, with every built-in aggregate.

use std::collections::BTreeSet;

use super::*;
use crate::testkit::windows::{Exercised, Taken, check, random_stream, spec_for};

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
    let aggregates = (aggregates.into_iter())
        .map(|(function, field, name)| AggregateSpec {
            function,
            field: field.map(str::to_owned),
            name: name.into(),
            plugin: None,
        })
        .collect();
    spec_for(kind, delay, lateness, aggregates)
}

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

/// Checks a stream of enough cases for each thing to happen.
fn check_many(kind: impl Fn(u64) -> WindowKind) {
    let mut seen = Exercised::default();
    for seed in 0..400 {
        seen += check_seed(kind(seed), seed);
    }
    assert!(
        seen.late > 100 && seen.updates > 100 && seen.windows > 1000,
        "the cases exercised too little: {} late, {} updates, {} windows",
        seen.late,
        seen.updates,
        seen.windows
    );
}

fn check_seed(kind: WindowKind, seed: u64) -> Exercised {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (delay, lateness) = (
        rng.i64(0..1500),
        if rng.bool() { 0 } else { rng.i64(0..1500) },
    );
    let spec = spec(kind, delay, lateness);
    let steps = random_stream(seed);
    let operator = WindowOperator::new(spec.clone());
    check(&spec, &steps, operator, expected, &format!("seed {seed}"))
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

/// A window that gets its first record only after a later window fired,
/// within the lateness, fires at once (it was once kept unfired and then
/// forgotten).
#[test]
fn a_window_first_reached_after_a_later_one_fired_still_fires() {
    use crate::testkit::windows::{Event, Step, feed};
    let spec = spec(WindowKind::Tumbling { size: 10 }, 0, 100);
    let event = |offset, time| Event {
        partition: 0,
        offset,
        time,
        key: "k".into(),
        v: 1,
    };
    let steps = [Step {
        now: 0,
        events: vec![event(0, 25), event(1, 35), event(2, 5)],
        tick: None,
    }];
    let fed = feed(&mut WindowOperator::new(spec.clone()), &steps);
    let fired: Vec<(i64, bool)> = (fed.results.iter())
        .map(|r| (r.window_start, r.update))
        .collect();
    assert_eq!(fired, [(20, false), (0, false), (30, false)]);
    assert!(fed.late.is_empty());
    check(
        &spec,
        &steps,
        WindowOperator::new(spec.clone()),
        expected,
        "first after a later fired",
    );
}

/// A window checkpointed at any step and restored into a new operator (as
/// after a crash) goes on to give exactly the results of one that never
/// stopped: every kind, every built-in aggregate, late records included.
#[test]
fn a_window_restored_from_a_snapshot_goes_on_as_if_it_never_stopped() {
    use crate::testkit::windows::feed_part;
    use std::time::{Duration, Instant};
    let kinds = [
        WindowKind::Tumbling { size: 1000 },
        WindowKind::Hopping {
            size: 1500,
            slide: 500,
        },
        WindowKind::Session { gap: 300 },
    ];
    let mut restored_open = 0;
    for seed in 0..150 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let kind = kinds[seed as usize % kinds.len()];
        let spec = spec(kind, rng.i64(0..1500), rng.i64(0..1500));
        let steps = random_stream(seed);
        let start = Instant::now();
        let whole = feed_part(&mut WindowOperator::new(spec.clone()), &steps, start, true);

        let split = rng.usize(0..=steps.len());
        let mut before = WindowOperator::new(spec.clone());
        let first = feed_part(&mut before, &steps[..split], start, false);
        let at = start + Duration::from_millis(steps[..split].last().map_or(0, |s| s.now));
        let bytes = super::snapshot::encode(&before.snapshot(at));
        drop(before);
        let mut after = WindowOperator::new(spec.clone());
        after
            .restore(super::snapshot::decode(&bytes).unwrap(), at)
            .unwrap();
        restored_open += after.open_windows();
        let rest = feed_part(&mut after, &steps[split..], start, true);

        let mut results = first.results;
        results.extend(rest.results);
        assert_eq!(results, whole.results, "seed {seed}, split at step {split}");
        let late: BTreeSet<_> = first.late.union(&rest.late).copied().collect();
        assert_eq!(late, whole.late, "seed {seed}, split at step {split}");
    }
    assert!(
        restored_open > 1000,
        "too few open windows restored: {restored_open}"
    );
}

/// An image of one window does not come back into another.
#[test]
fn a_snapshot_of_another_window_is_refused() {
    let tumbling = spec(WindowKind::Tumbling { size: 1000 }, 0, 0);
    let image = WindowOperator::new(tumbling).snapshot(std::time::Instant::now());
    let mut other = WindowOperator::new(spec(WindowKind::Tumbling { size: 2000 }, 0, 0));
    let err = other.restore(image, std::time::Instant::now()).unwrap_err();
    assert!(err.to_string().contains("another window"), "{err}");
}
