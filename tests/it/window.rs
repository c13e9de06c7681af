//! Event-time windows end to end: a file of keyed JSON events, out of
//! order, through a tumbling window to files; the results must be exactly
//! what a simple model of the watermark computes from the same events, late
//! records must reach the late route, and records the window cannot use
//! the dead-letter sink with the reason.

use std::collections::{BTreeMap, BTreeSet};

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::pipeline::Pipeline;

use crate::support::{Scratch, plugin};

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
    let summary = crate::pipeline::run_pipelines(&path).await.remove(0);

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

/// What a Kafka -> window -> Kafka run gave: the windows of the input,
/// (key, start) -> (total, n), and every result read for each.
struct WindowedRun {
    expected: BTreeMap<(String, i64), (i64, i64)>,
    got: BTreeMap<(String, i64), Vec<(i64, i64)>>,
    results: usize,
    late: usize,
    dead: usize,
}

/// Kafka (6 partitions) -> window -> Kafka with `delivery`: `drive` runs
/// the workers (given the scratch folder, the pipeline file, a watch on
/// the group and the number of inputs to commit) until every one is;
/// then the outputs are read, committed only with exactly-once. The input
/// is produced before (a backlog, which a consumer of the test broker
/// reads a partition at a time), or `live`, while the workers run.
async fn windowed_kafka_run(
    delivery: &str,
    live: bool,
    drive: impl FnOnce(&Scratch, &std::path::Path, &crate::kafka::Watcher, i64),
) -> WindowedRun {
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
    // One event far ahead in every partition closes every window before it
    // (its own stays open, holding its offset: nothing after is committed).
    let end = format!(r#"{{"user":"end","ts":{},"amount":0}}"#, base + 36_000_000);
    let producer = crate::broker::Broker::producer_for(&broker.connection());
    let producing = tokio::spawn(async move {
        // Live: 2,000 events every 400 ms (slower than the workers read),
        // so that every partition is under way whenever the test acts.
        let chunk = if live { 2_000 } else { input.len() };
        for events in input.chunks(chunk) {
            crate::broker::Broker::send_all(&producer, "in", events).await;
            if live {
                tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            }
        }
        for partition in 0..PARTITIONS {
            let record = rdkafka::producer::FutureRecord::to("in")
                .partition(partition)
                .key("end")
                .payload(&end);
            producer
                .send_result(record)
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
    });
    let mut producing = Some(producing);
    if !live && let Some(producing) = producing.take() {
        producing.await.unwrap();
    }

    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "windows"
delivery = "{delivery}"
commit_interval_ms = 100
source = {{ type = "kafka", brokers = "{b}", topics = ["in"], group = "windowers" }}
batch = {{ max_records = 200, linger_ms = 5 }}

# 150 us a record: the 60,000 events take 9 s, so every kill is mid-stream.
limits = {{ wasi = ["monotonic-clock"] }}

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
    let watch = crate::kafka::Watcher::new(&broker, "windowers", PARTITIONS);
    // Exactly-once commits the end events too (their windows are in the
    // state); at-least-once holds them back with their open windows.
    let inputs = match delivery {
        "exactly_once" => EVENTS as i64 + i64::from(PARTITIONS),
        _ => EVENTS as i64,
    };
    drive(&scratch, &path, &watch, inputs);
    if let Some(producing) = producing {
        producing.await.unwrap();
    }

    let mut expected: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for (user, ts, amount) in &events {
        let window = expected
            .entry((user.clone(), ts.div_euclid(1000) * 1000))
            .or_default();
        window.0 += amount;
        window.1 += 1;
    }
    let committed = delivery == "exactly_once";
    let results = tokio::task::block_in_place(|| broker.read_all("out", committed));
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
    WindowedRun {
        expected,
        got,
        results: results.len(),
        late: tokio::task::block_in_place(|| broker.read_all("late", committed)).len(),
        dead: tokio::task::block_in_place(|| broker.read_all("dlq", committed)).len(),
    }
}

/// Kafka -> window -> Kafka, the worker killed with SIGKILL three times
/// mid-stream and restarted: every window must come out with exactly the
/// sum and count of its events (at-least-once: a window may come out more
/// than once; those are counted and shown). No event may be late: the
/// watermark waits for every partition the consumer is still behind on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_windows_survive_sigkill_with_every_window_present() {
    let run = windowed_kafka_run("at_least_once", false, |scratch, path, watch, inputs| {
        let cache = scratch.path("cache");
        crate::kafka::kill_then_finish(path, &cache, watch, 3, (inputs, 1_500));
    })
    .await;
    let WindowedRun {
        expected,
        got,
        results,
        late,
        dead,
    } = &run;
    let mut missing = Vec::new();
    let (mut repeated, mut partial) = (0, 0);
    for (window, exact) in expected {
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
        "{} windows, {results} results: {repeated} exact repeats, {partial} partial repeats \
         (replayed records of a window that had fired)",
        expected.len(),
    );
    assert!(
        missing.is_empty(),
        "{} windows missing or never with their exact figures, e.g. {:?} ({late} late events, {dead} dead letters)",
        missing.len(),
        &missing[..missing.len().min(5)],
    );
    assert!(
        unexpected.is_empty(),
        "results for no window: {unexpected:?}"
    );
    assert_eq!(*late, 0, "events late after a restart");
    assert_eq!(*dead, 0, "dead letters");
}

/// Kafka -> window -> Kafka exactly-once, the worker killed with SIGKILL
/// six times mid-stream and restarted: read committed, every window comes
/// out exactly once with exactly the sum and count of its events. The
/// window state of each partition commits in the transaction that commits
/// its outputs and offsets (in a changelog topic the offsets point at), so
/// a restart takes each window up where the last commit left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_windows_exactly_once_survive_sigkills_each_window_once() {
    let run = windowed_kafka_run("exactly_once", false, |scratch, path, watch, inputs| {
        let cache = scratch.path("cache");
        crate::kafka::kill_then_finish(path, &cache, watch, 6, (inputs, 1_500));
    })
    .await;
    assert_each_window_once(&run);
}

/// Two exactly-once workers of one Kafka -> window -> Kafka pipeline, the
/// input produced while they run: the second joins mid-stream and the
/// group moves some of the 6 partitions to it, each with its open windows,
/// read from the changelog topic the first worker's transactions wrote
/// them to (no shared disk). Then the first is killed with SIGKILL and
/// restarted. Read committed, every window comes out exactly once with its
/// exact figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_windows_exactly_once_move_with_their_state_to_a_joining_worker() {
    use crate::kafka::{LoggedWorker, wait_for_workers};
    use std::time::Duration;

    let run = windowed_kafka_run("exactly_once", true, |scratch, path, watch, inputs| {
        tokio::task::block_in_place(|| {
            let limit = Duration::from_secs(90);
            let mut workers = vec![LoggedWorker::spawn(scratch, path, "1")];
            wait_for_workers("the first worker at work", limit, &mut workers, || {
                watch.committed("in") > inputs / 6
            });
            let joined_at = watch.committed("in");
            let second =
                LoggedWorker::spawn_logging(scratch, path, "2", "warn,weir::source=info");
            let second_log = second.log.clone();
            workers.push(second);
            // Given partitions (and their windows), the second commits too.
            let assigned = || {
                let log = std::fs::read_to_string(&second_log).unwrap_or_default();
                (log.lines().rev())
                    .filter(|line| line.contains("Partitions assigned"))
                    .filter_map(|line| line.split("partitions=").nth(1))
                    .find_map(|n| n.split_whitespace().next()?.parse::<usize>().ok())
                    .unwrap_or(0)
            };
            wait_for_workers("partitions moved to the second", limit, &mut workers, || {
                assigned() > 0 && watch.committed("in") > joined_at + inputs / 6
            });
            eprintln!(
                "the second worker joined at {joined_at} of {inputs} committed and took {} partitions",
                assigned()
            );
            assert!(
                assigned() < 6,
                "the second worker took every partition: nothing was shared"
            );
            let mut first = workers.remove(0);
            first.child.kill().unwrap();
            first.child.wait().unwrap();
            let killed_at = watch.committed("in");
            eprintln!("the first worker killed at {killed_at} of {inputs} committed");
            assert!(killed_at < inputs, "the kill came after the end: it tested nothing");
            workers.insert(0, LoggedWorker::spawn(scratch, path, "1"));
            wait_for_workers("every input committed", Duration::from_secs(180), &mut workers, || {
                watch.committed("in") >= inputs
            });
            for worker in workers {
                worker.stop();
            }
        });
    })
    .await;
    assert_each_window_once(&run);
}

/// Read committed, every window came out exactly once, with its exact
/// figures, and nothing else did.
fn assert_each_window_once(run: &WindowedRun) {
    let wrong: Vec<String> = (run.expected.iter())
        .filter(|(window, exact)| run.got.get(*window) != Some(&vec![**exact]))
        .map(|(window, exact)| {
            format!(
                "{window:?}: {:?}, expected [{exact:?}]",
                run.got.get(window)
            )
        })
        .collect();
    let unexpected: Vec<_> = (run.got.keys())
        .filter(|w| !run.expected.contains_key(*w))
        .collect();
    eprintln!(
        "{} windows, {} committed results",
        run.expected.len(),
        run.results
    );
    assert!(
        wrong.is_empty(),
        "{} of {} windows not out exactly once with their figures ({} late events, {} dead \
         letters), e.g. {:#?}",
        wrong.len(),
        run.expected.len(),
        run.late,
        run.dead,
        &wrong[..wrong.len().min(5)],
    );
    assert!(
        unexpected.is_empty(),
        "results for no window: {unexpected:?}"
    );
    assert_eq!(run.results, run.expected.len());
    assert_eq!(run.late, 0, "events late after a restart");
    assert_eq!(run.dead, 0, "dead letters");
}

/// The window test kit's random streams against its reference model, with
/// a plugin aggregate (top-n, the three largest `v`) beside a built-in
/// count, for every window kind.
#[test]
fn a_plugin_aggregate_gives_exactly_the_model_s_windows() {
    use weir::engine::Limits;
    use weir::testkit::windows::{Taken, check, random_stream, spec_for};
    use weir::window::{
        AggregateFn, AggregateSpec, CALL_BYTES, PluginAggregate, WindowKind, WindowOperator,
    };

    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let loaded = engine.load_aggregate(&plugin("top-n")).unwrap();
    let config = r#"{"field":"v","n":3}"#;
    let aggregates = vec![
        AggregateSpec {
            function: AggregateFn::Count,
            field: None,
            name: "n".into(),
            plugin: None,
        },
        AggregateSpec {
            function: AggregateFn::Plugin,
            field: None,
            name: "top".into(),
            plugin: Some((
                weir::config::PluginSource::Wasm(plugin("top-n")),
                config.into(),
            )),
        },
    ];
    let expected = |events: &[Taken]| {
        let mut values: Vec<i64> = events.iter().map(|e| e.2).collect();
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.truncate(3);
        serde_json::json!({ "n": events.len(), "top": values })
    };
    let kinds = [
        WindowKind::Tumbling { size: 1000 },
        WindowKind::Hopping {
            size: 1500,
            slide: 500,
        },
        WindowKind::Session { gap: 800 },
    ];
    let (mut late, mut updates, mut windows) = (0, 0, 0);
    for kind in kinds {
        for seed in 0..60 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (delay, lateness) = (rng.i64(0..1500), [0, rng.i64(0..1500)][seed as usize % 2]);
            let spec = spec_for(kind, delay, lateness, aggregates.clone());
            // States shared among one to three instances, as lanes share them.
            let shards = 1 + seed as usize % 3;
            let top =
                PluginAggregate::start(loaded.clone(), Limits::default(), config.into(), shards);
            // Some cases fold after every few records (states merged,
            // freed and given out again between folds), some only when a
            // window fires.
            let call_bytes = [CALL_BYTES, 300, 1][seed as usize / 3 % 3];
            let top = top.unwrap().with_call_bytes(call_bytes);
            let operator = WindowOperator::with_plugins(spec.clone(), vec![top]);
            let steps = random_stream(seed);
            let seen = check(&spec, &steps, operator, expected, &format!("seed {seed}"));
            (late, updates, windows) = (
                late + seen.late,
                updates + seen.updates,
                windows + seen.windows,
            );
        }
    }
    assert!(
        late > 20 && updates > 20 && windows > 300,
        "the cases exercised too little: {late} late, {updates} updates, {windows} windows"
    );
}

/// A plugin aggregate in a pipeline: results carry its JSON; a window it
/// fails on is written with it `null` and dead-lettered with the reason; a
/// transformer is refused where an aggregator is wanted, and the other way
/// round, at the line that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_aggregate_runs_in_a_pipeline_and_its_failures_are_dead_lettered() {
    let scratch = Scratch::new();
    let mut lines = Vec::new();
    for i in 0..40 {
        let user = ["a", "b"][i % 2];
        lines.push(format!(
            r#"{{"user":"{user}","ts":{},"amount":{i}}}"#,
            i * 100
        ));
    }
    // User c's only window has an amount top-n cannot rank.
    lines.push(r#"{"user":"c","ts":3950,"amount":"lots"}"#.into());
    std::fs::write(scratch.path("events.jsonl"), lines.join("\n") + "\n").unwrap();
    let pipeline = |aggregate: &str, plugins: &str| {
        scratch.pipeline(&format!(
            r#"
[[pipeline]]
name = "top"
source = {{ type = "file", path = "{{dir}}/events.jsonl" }}
{plugins}
[pipeline.window]
kind = "tumbling"
size = "2s"
key = "user"
time = "ts"
aggregates = [ {{ fn = "count", as = "n" }}, {aggregate} ]

[[pipeline.sink]]
type = "file"
path = "{{dir}}/windows.jsonl"

[pipeline.dead_letter]
type = "file"
path = "{{dir}}/dead.jsonl"
"#
        ))
    };
    let top = r#"{ wasm = "{plugin:top-n}", as = "top2", config = { field = "amount", n = 2 } }"#;
    let summary = crate::pipeline::run_pipelines(&pipeline(top, ""))
        .await
        .remove(0);
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: Some(scratch.path("cache")),
        ..Default::default()
    })
    .unwrap();
    let got: Vec<String> = (scratch.json_lines("windows.jsonl").iter())
        .map(|w| {
            format!(
                "{} {} {} {}",
                w["key"], w["window_start"], w["n"], w["top2"]
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            r#""a" 0 10 [18,16]"#,
            r#""b" 0 10 [19,17]"#,
            r#""a" 2000 10 [38,36]"#,
            r#""b" 2000 10 [39,37]"#,
            r#""c" 2000 1 null"#,
        ]
    );
    let dead = scratch.json_lines("dead.jsonl");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["headers"]["weir.error.reason"].as_str().unwrap();
    assert!(
        reason.contains("aggregate \"top2\" (top-n 0.1.0: record at offset")
            && reason.contains("`amount` is not a number"),
        "{reason}"
    );
    assert_eq!(dead[0]["headers"]["weir.error.stage"], "window");
    // The copy is the result as written: the key's window, `top2` null.
    let copy = &dead[0]["value"];
    assert_eq!(
        (&copy["key"], &copy["n"], &copy["top2"]),
        (&"c".into(), &1.into(), &serde_json::Value::Null),
        "{copy}"
    );
    assert_eq!(summary.window_results, 5);

    // The wrong world on either side, refused at its line.
    let path = pipeline(r#"{ wasm = "{plugin:identity}", as = "x" }"#, "");
    let file = PipelineFile::load(&path).unwrap();
    let err = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pipeline.toml:6:")
            && err.contains(
                "is a weir:plugin/transformer plugin, but a weir:plugin/aggregator is wanted here"
            ),
        "{err}"
    );
    let path = pipeline(
        "{ fn = \"count\", as = \"m\" }",
        "[[pipeline.plugin]]\nwasm = \"{plugin:top-n}\"\n",
    );
    let file = PipelineFile::load(&path).unwrap();
    let err = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "is a weir:plugin/aggregator plugin, but a weir:plugin/transformer is wanted here"
        ),
        "{err}"
    );
}
