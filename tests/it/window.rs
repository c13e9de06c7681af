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

/// Kafka -> window -> Kafka, the worker killed with SIGKILL three times
/// mid-stream and restarted: every window must come out with exactly the
/// sum and count of its events (at-least-once: a window may come out more
/// than once; those are counted and shown). No event may be late: the
/// watermark waits for every partition the consumer is still behind on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_windows_survive_sigkill_with_every_window_present() {
    use crate::kafka::{Watcher, spawn_worker, still_running, stop_gracefully, wait_for};
    use std::time::Duration;

    const EVENTS: usize = 60_000;
    const PARTITIONS: i32 = 6;
    // Event time an hour ago: a broker's retention would delete results
    // stamped (at their window's end) much further back.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let base = now.unwrap().as_millis() as i64 / 1000 * 1000 - 600_000;
    let broker = crate::broker::Broker::start();
    broker.create_topic("in", PARTITIONS).await;
    broker.create_topic("out", 6).await;
    broker.create_topic("late", 1).await;
    broker.create_topic("dlq", 1).await;
    // 200 events a second of event time, each off by up to 250 ms, from
    // 100 users (keyed by user, so each user's events are in order of
    // production within one partition).
    let mut rng = fastrand::Rng::with_seed(9);
    let events: Vec<(String, i64, i64)> = (0..EVENTS as i64)
        .map(|i| {
            let ts = base + i * 5 + rng.i64(-250..=250);
            (format!("u{}", rng.u8(0..100)), ts, rng.i64(0..1000))
        })
        .collect();
    let input: Vec<(String, String)> = events
        .iter()
        .map(|(user, ts, amount)| {
            let value = format!(r#"{{"user":"{user}","ts":{ts},"amount":{amount}}}"#);
            (user.clone(), value)
        })
        .collect();
    broker.produce("in", &input).await;
    // One event far ahead in every partition closes every window before it
    // (its own stays open, holding its offset: nothing after is committed).
    for partition in 0..PARTITIONS {
        let end = base + 36_000_000;
        let value = format!(r#"{{"user":"end","ts":{end},"amount":0}}"#);
        broker
            .produce_to_partition("in", partition, &[("end".to_owned(), value)])
            .await;
    }

    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "windows"
delivery = "at_least_once"
commit_interval_ms = 100
source = {{ type = "kafka", brokers = "{b}", topics = ["in"], group = "windowers" }}
batch = {{ max_records = 200, linger_ms = 5 }}

# 150 us a record: the 60,000 events take 9 s, so every kill is mid-stream.
[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ pace_us = 150 }}

[pipeline.window]
kind = "tumbling"
size = "1s"
key = "user"
time = "ts"
watermark_delay = "1s"
idle_timeout = "3s"
aggregates = [ {{ fn = "sum", field = "amount", as = "total" }}, {{ fn = "count", as = "n" }} ]

[[pipeline.sink]]
type = "kafka"
brokers = "{b}"
topic = "out"

[[pipeline.sink]]
type = "kafka"
brokers = "{b}"
topic = "late"
routes = ["late"]

[pipeline.dead_letter]
type = "kafka"
brokers = "{b}"
topic = "dlq"
"#,
        b = broker.brokers()
    ));
    let cache = scratch.path("cache");
    let watch = Watcher::new(&broker, "windowers", PARTITIONS);
    tokio::task::block_in_place(|| {
        for kill in 1..=3 {
            let before = watch.size("out");
            let mut worker = spawn_worker(&path, &cache, "1");
            wait_for("new results before a kill", Duration::from_secs(90), || {
                still_running(&mut worker) && watch.size("out") > before + 1_500
            });
            worker.kill().unwrap();
            worker.wait().unwrap();
            let committed = watch.committed("in");
            eprintln!(
                "kill {kill}: {} results written, {committed} events committed",
                watch.size("out"),
            );
            assert!(
                committed < EVENTS as i64,
                "kill {kill} came after every event was committed: it tested nothing"
            );
        }
        let worker = spawn_worker(&path, &cache, "1");
        wait_for(
            "every event's offset committed",
            Duration::from_secs(180),
            || watch.committed("in") >= EVENTS as i64,
        );
        stop_gracefully(worker);
    });

    let mut expected: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for (user, ts, amount) in &events {
        let window = expected
            .entry((user.clone(), ts.div_euclid(1000) * 1000))
            .or_default();
        window.0 += amount;
        window.1 += 1;
    }
    let results = tokio::task::block_in_place(|| broker.read_all("out", false));
    let mut got: BTreeMap<(String, i64), Vec<(i64, i64)>> = BTreeMap::new();
    for result in &results {
        let value: serde_json::Value = serde_json::from_str(&result.value).unwrap();
        let key = value["key"].as_str().unwrap().to_owned();
        assert_eq!(
            result.key.as_deref(),
            Some(key.as_str()),
            "keyed by the window key"
        );
        let start = value["window_start"].as_i64().unwrap();
        let total = value["total"].as_i64().unwrap();
        let n = value["n"].as_i64().unwrap();
        got.entry((key, start)).or_default().push((total, n));
    }
    let late = tokio::task::block_in_place(|| broker.read_all("late", false));
    let dead = tokio::task::block_in_place(|| broker.read_all("dlq", false));
    let mut missing = Vec::new();
    let (mut repeated, mut partial) = (0, 0);
    for (window, exact) in &expected {
        let Some(emitted) = got.get(window) else {
            missing.push(window.clone());
            continue;
        };
        if !emitted.contains(exact) {
            missing.push(window.clone());
        }
        repeated += emitted.iter().filter(|v| *v == exact).count() - 1;
        partial += emitted.iter().filter(|v| *v != exact).count();
    }
    let unexpected: Vec<_> = got.keys().filter(|w| !expected.contains_key(*w)).collect();
    eprintln!(
        "{} windows, {} results: {repeated} exact repeats, {partial} partial repeats \
         (replayed records of a window that had fired)",
        expected.len(),
        results.len(),
    );
    assert!(
        missing.is_empty(),
        "{} windows missing or never with their exact figures, e.g. {:?} ({} late events, {} dead letters)",
        missing.len(),
        &missing[..missing.len().min(5)],
        late.len(),
        dead.len(),
    );
    assert!(
        unexpected.is_empty(),
        "results for no window: {unexpected:?}"
    );
    let late = tokio::task::block_in_place(|| broker.read_all("late", false));
    assert!(
        late.is_empty(),
        "{} events late after a restart",
        late.len()
    );
    assert!(dead.is_empty(), "{} dead letters", dead.len());
}
