//! Event-time windows end to end: a file of keyed JSON events, out of
//! order, through a tumbling window to files; the results must be exactly
//! what a simple model of the watermark computes from the same events, late
//! records must reach the late route, and records the window cannot use
//! the dead-letter sink with the reason.

use std::collections::{BTreeMap, BTreeSet};

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::pipeline::Pipeline;

use crate::support::Scratch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tumbling_window_over_a_file_gives_exactly_the_model_s_results() {
    let scratch = Scratch::new();
    let mut rng = fastrand::Rng::with_seed(11);
    let mut lines = Vec::new();
    // Event time moves 10 ms per event, each off by up to 700 ms: with a
    // 500 ms watermark delay some arrive after their window closed.
    let events: Vec<(String, i64, i64)> = (0..5000)
        .map(|i| {
            let ts = 1_700_000_000_000 + i * 10 + rng.i64(-700..700);
            (format!("u{}", rng.u8(0..20)), ts, rng.i64(0..1000))
        })
        .collect();
    for (user, ts, amount) in &events {
        lines.push(format!(
            r#"{{"user_id":"{user}","ts":{ts},"amount":{amount}}}"#
        ));
    }
    // Three the window cannot use.
    lines.insert(100, "not json".into());
    lines.insert(200, r#"{"user_id":"u1","amount":3}"#.into());
    lines.insert(
        300,
        r#"{"user_id":"u1","ts":1700000000000,"amount":"lots"}"#.into(),
    );
    std::fs::write(scratch.path("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "windowed"
parallelism = 2
source = { type = "file", path = "{dir}/events.jsonl" }
batch = { max_records = 97 }

[pipeline.window]
kind = "tumbling"
size = "1s"
key = "user_id"
time = "ts"
watermark_delay = "500ms"
aggregates = [ { fn = "sum", field = "amount", as = "total" }, { fn = "count", as = "n" } ]

[[pipeline.sink]]
type = "file"
path = "{dir}/windows.jsonl"

[[pipeline.sink]]
type = "file"
path = "{dir}/late.jsonl"
routes = ["late"]

[pipeline.dead_letter]
type = "file"
path = "{dir}/dead.jsonl"
"#,
    );
    let file = PipelineFile::load(&path).unwrap();
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: Some(scratch.path("cache")),
    })
    .unwrap();
    let pipeline = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let summary = pipeline.run(shutdown).await.unwrap();

    // The model: one partition (the file), the watermark the latest time
    // so far minus 500 ms; an event is late if its window ended by then.
    let mut latest = i64::MIN;
    let mut windows: BTreeMap<(String, i64), (i64, u64)> = BTreeMap::new();
    let mut late = BTreeSet::new();
    for (user, ts, amount) in &events {
        let start = ts.div_euclid(1000) * 1000;
        if start + 1000 <= latest.saturating_sub(500) {
            late.insert((user.clone(), *ts, *amount));
        } else {
            let window = windows.entry((user.clone(), start)).or_default();
            window.0 += amount;
            window.1 += 1;
        }
        latest = latest.max(*ts);
    }
    assert!(
        late.len() > 10,
        "the input must have late events: {}",
        late.len()
    );

    let mut got = BTreeMap::new();
    let mut ends = Vec::new();
    for result in scratch.json_lines("windows.jsonl") {
        let start = result["window_start"].as_i64().unwrap();
        assert_eq!(result["window_end"].as_i64().unwrap(), start + 1000);
        ends.push(start + 1000);
        let key = (result["key"].as_str().unwrap().to_owned(), start);
        let value = (
            result["total"].as_i64().unwrap(),
            result["n"].as_u64().unwrap(),
        );
        assert!(
            got.insert(key.clone(), value).is_none(),
            "{key:?} emitted twice"
        );
    }
    assert_eq!(got, windows, "every window, exactly");
    assert!(ends.is_sorted(), "results come out in order of their end");

    let got_late: BTreeSet<(String, i64, i64)> = scratch
        .json_lines("late.jsonl")
        .iter()
        .map(|line| {
            let user = line["user_id"].as_str().unwrap().to_owned();
            (
                user,
                line["ts"].as_i64().unwrap(),
                line["amount"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got_late, late, "late events go to the late route");

    let dead = scratch.json_lines("dead.jsonl");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["headers"]["weir.error.reason"].as_str().unwrap())
        .collect();
    assert_eq!(dead.len(), 3, "{reasons:?}");
    // The file source checks JSON first; the window, what it needs.
    assert!(reasons[0].contains("malformed JSON"), "{}", reasons[0]);
    assert_eq!(dead[0]["headers"]["weir.error.stage"], "source");
    assert!(reasons[1].contains("no `ts` field"), "{}", reasons[1]);
    assert!(
        reasons[2].contains("`amount` is not a finite number"),
        "{}",
        reasons[2]
    );
    assert!(
        dead[1..]
            .iter()
            .all(|d| d["headers"]["weir.error.stage"] == "window")
    );

    assert_eq!(summary.records_in, lines.len() as u64);
    assert_eq!(summary.records_windowed, (events.len() - late.len()) as u64);
    assert_eq!(summary.records_late, late.len() as u64);
    assert_eq!(summary.window_results, windows.len() as u64);
    assert_eq!(summary.records_dead_lettered, 3);
    assert_eq!(summary.records_out, (windows.len() + late.len()) as u64);
}

#[test]
fn a_window_that_makes_no_sense_is_refused_at_its_line() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "bad"
source = { type = "generator", kind = "payments", count = 10 }

[pipeline.window]
kind = "hopping"
size = "1s"
slide = "5s"
aggregates = [ { fn = "count" } ]

[[pipeline.sink]]
type = "stdout"
"#,
    );
    let err = PipelineFile::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("pipeline.toml:6:") && err.contains("would skip events"),
        "{err}"
    );
}
