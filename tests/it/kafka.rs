//! Kafka end to end, against a real Kafka-protocol broker process: what
//! reaches the output and dead-letter topics, what is committed, and what
//! survives a worker killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::metrics::MetricsSnapshot;
use weir::pipeline::Pipeline;

use crate::broker::Broker;
use crate::support::{Scratch, summary_figure, weir_bin};

/// Runs the pipelines of `path` in process until `done` says so (checked
/// every 100 ms, for at most two minutes), then stops them cleanly.
async fn run_until(
    path: &std::path::Path,
    done: impl Fn(&[MetricsSnapshot]) -> bool,
) -> Vec<MetricsSnapshot> {
    let file = PipelineFile::load(path).unwrap();
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    let mut metrics = Vec::new();
    for config in &file.pipelines {
        let pipeline = Pipeline::build(&file, config, &engine).await.unwrap();
        metrics.push(pipeline.metrics());
        runs.push(tokio::spawn(pipeline.run(shutdown.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now: Vec<MetricsSnapshot> = metrics.iter().map(|m| m.snapshot()).collect();
        if done(&now) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    let mut summaries = Vec::new();
    for run in runs {
        summaries.push(run.await.unwrap().unwrap());
    }
    summaries
}

fn payment(i: usize) -> (String, String) {
    let amount = (i * 37) % 500;
    (
        format!("user-{}", i % 17),
        format!(r#"{{"id":{i},"amount":{amount}}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_reach_the_dead_letter_topic_with_the_documented_headers() {
    let broker = Broker::start();
    for (topic, partitions) in [("in", 3), ("out", 3), ("dlq", 1)] {
        broker.create_topic(topic, partitions).await;
    }
    let mut input: Vec<(String, String)> = (0..200).map(payment).collect();
    for i in (0..200).step_by(20) {
        input[i].1 = format!("{{oops {i}");
    }
    broker.produce("in", &input).await;

    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "payments"
source = {{ type = "kafka", brokers = "{b}", topics = ["in"] }}

[[pipeline.plugin]]
wasm = "{{plugin:json-filter}}"
config = {{ field = "amount", min = 0 }}

[[pipeline.sink]]
type = "kafka"
brokers = "{b}"
topic = "out"

[pipeline.dead_letter]
type = "kafka"
brokers = "{b}"
topic = "dlq"
"#,
        b = broker.brokers()
    ));
    let summary = run_until(&path, |m| m[0].records_in >= 200).await.remove(0);
    assert_eq!(
        (
            summary.records_in,
            summary.records_out,
            summary.records_dead_lettered
        ),
        (200, 190, 10)
    );

    let out = broker.read_all("out", false);
    let sent: BTreeSet<(Option<String>, String)> = out
        .iter()
        .map(|r| (r.key.clone(), r.value.clone()))
        .collect();
    let expected: BTreeSet<(Option<String>, String)> = input
        .iter()
        .filter(|(_, v)| !v.starts_with("{oops"))
        .map(|(k, v)| (Some(k.clone()), v.clone()))
        .collect();
    assert_eq!(sent, expected);
    assert_eq!(out.len(), 190);

    let dead = broker.read_all("dlq", false);
    assert_eq!(dead.len(), 10);
    for letter in &dead {
        assert!(
            letter.value.starts_with("{oops "),
            "original value kept: {letter:?}"
        );
        let i: usize = letter.value["{oops ".len()..].parse().unwrap();
        assert_eq!(
            letter.key.as_deref(),
            Some(input[i].0.as_str()),
            "original key kept"
        );
        let h = &letter.headers;
        assert!(
            h["weir.error.reason"].starts_with("not a JSON object"),
            "{h:?}"
        );
        assert_eq!(h["weir.error.stage"], "plugin");
        assert_eq!(h["weir.error.plugin"], "json-filter");
        assert_eq!(h["weir.error.plugin.version"], "0.1.0");
        assert_eq!(h["weir.pipeline"], "payments");
        assert_eq!(h["weir.source.topic"], "in");
        assert!(h["weir.source.partition"].parse::<i32>().unwrap() < 3);
        assert!(h["weir.source.offset"].parse::<i64>().unwrap() >= 0);
    }
    let offsets: BTreeSet<(String, String)> = dead
        .iter()
        .map(|d| {
            (
                d.headers["weir.source.partition"].clone(),
                d.headers["weir.source.offset"].clone(),
            )
        })
        .collect();
    assert_eq!(
        offsets.len(),
        10,
        "each dead letter names its own source position"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_topics_in_one_pipeline_go_through_their_own_plugins() {
    let broker = Broker::start();
    broker.create_topic("clicks", 2).await;
    broker.create_topic("payments", 2).await;
    let clicks: Vec<(String, String)> = (0..100)
        .map(|i| {
            let action = if i % 10 == 0 { "purchase" } else { "view" };
            (
                format!("user-{i}"),
                format!(r#"{{"n":{i},"action":"{action}"}}"#),
            )
        })
        .collect();
    let payments: Vec<(String, String)> = (0..100).map(payment).collect();
    broker.produce("clicks", &clicks).await;
    broker.produce("payments", &payments).await;

    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "two-topics"
source = {{ type = "kafka", brokers = "{b}", topics = ["clicks", "payments"] }}

[[pipeline.plugin]]
wasm = "{{plugin:router}}"
topics = ["clicks"]
config = {{ field = "action", routes = {{ purchase = "purchases" }} }}

[[pipeline.plugin]]
wasm = "{{plugin:json-filter}}"
topics = ["payments"]
config = {{ field = "amount", min = 250 }}

[[pipeline.sink]]
type = "file"
path = "default.jsonl"

[[pipeline.sink]]
type = "file"
path = "purchases.jsonl"
routes = ["purchases"]

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        b = broker.brokers()
    ));
    let summary = run_until(&path, |m| m[0].records_in >= 200).await.remove(0);
    assert_eq!(summary.records_in, 200);

    let purchases = scratch.json_lines("purchases.jsonl");
    let default = scratch.json_lines("default.jsonl");
    assert!(
        scratch.json_lines("dead.jsonl").is_empty(),
        "the filter never saw a click"
    );
    assert_eq!(purchases.len(), 10);
    assert!(purchases.iter().all(|p| p["action"] == "purchase"));
    let views = default.iter().filter(|r| r["action"] == "view").count();
    let kept_payments: Vec<&serde_json::Value> = default
        .iter()
        .filter(|r| r.get("amount").is_some())
        .collect();
    assert_eq!(views, 90);
    let expected = payments.iter().filter(|(_, v)| {
        let doc: serde_json::Value = serde_json::from_str(v).unwrap();
        doc["amount"].as_i64().unwrap() >= 250
    });
    assert_eq!(kept_payments.len(), expected.count());
    assert!(
        kept_payments
            .iter()
            .all(|p| p["amount"].as_i64().unwrap() >= 250)
    );
}

/// A `weir run` child process whose log goes to the test's output.
fn spawn_worker(path: &std::path::Path, cache: &std::path::Path, worker: &str) -> Child {
    spawn(path, cache, worker, Stdio::inherit(), "warn")
}

/// A `weir run` child process whose log (and summary) the test reads. The
/// log goes to a file, not a pipe: a pipe nobody reads until the end would
/// stall a worker that logs more than the pipe holds.
pub(crate) struct LoggedWorker {
    pub(crate) child: Child,
    pub(crate) log: std::path::PathBuf,
}

impl LoggedWorker {
    pub(crate) fn spawn(scratch: &Scratch, path: &std::path::Path, worker: &str) -> Self {
        Self::spawn_logging(scratch, path, worker, "warn")
    }

    /// A worker whose log goes by `filter` (`WEIR_LOG`); each start of a
    /// worker appends to its log.
    pub(crate) fn spawn_logging(
        scratch: &Scratch,
        path: &std::path::Path,
        worker: &str,
        filter: &str,
    ) -> Self {
        let log = scratch.path(&format!("worker-{worker}.log"));
        let file = (std::fs::OpenOptions::new().create(true).append(true))
            .open(&log)
            .unwrap();
        let child = spawn(
            path,
            &scratch.path("cache"),
            worker,
            Stdio::from(file),
            filter,
        );
        LoggedWorker { child, log }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM and returns its log, which ends with its
    /// summary; fails if it did not exit cleanly.
    pub(crate) fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        let log = self.log();
        assert!(status.success(), "the worker exited with {status}: {log}");
        log
    }
}

/// Waits for `check` while every worker runs. If one exits, or the time is
/// up, kills them all and fails with each one's log.
pub(crate) fn wait_for_workers(
    what: &str,
    limit: Duration,
    workers: &mut [LoggedWorker],
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !check() {
        let exited = workers
            .iter_mut()
            .any(|worker| matches!(worker.child.try_wait(), Ok(Some(_))));
        if exited || Instant::now() >= deadline {
            let mut logs = String::new();
            for (n, worker) in workers.iter_mut().enumerate() {
                let _ = worker.child.kill();
                let status = worker.child.wait().unwrap();
                logs += &format!("\n--- worker {} ({status}):\n{}", n + 1, worker.log());
            }
            let why = if exited {
                "a worker exited".to_owned()
            } else {
                format!("gave up after {limit:?}")
            };
            panic!("waiting for {what}: {why}{logs}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn(
    path: &std::path::Path,
    cache: &std::path::Path,
    worker: &str,
    stderr: Stdio,
    log: &str,
) -> Child {
    Command::new(weir_bin())
        .args(["run", path.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", cache)
        .env("WEIR_LOG", log)
        .env("WEIR_WORKER_ID", worker)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

fn stop_gracefully(mut child: Child) {
    // A worker signalled before it has installed its handlers (the first
    // milliseconds of its life) dies of the signal, as any process would.
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "worker exited with {status}");
}

/// Watches a group's committed offsets and a topic's size with one client,
/// so that checks are cheap enough to kill a worker mid-stream.
pub(crate) struct Watcher {
    consumer: rdkafka::consumer::BaseConsumer,
    partitions: i32,
}

impl Watcher {
    pub(crate) fn new(broker: &Broker, group: &str, partitions: i32) -> Self {
        let consumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.brokers())
            .set("group.id", group)
            .create()
            .unwrap();
        Watcher {
            consumer,
            partitions,
        }
    }

    pub(crate) fn committed(&self, topic: &str) -> i64 {
        use rdkafka::consumer::Consumer as _;
        let mut list = rdkafka::TopicPartitionList::new();
        for p in 0..self.partitions {
            list.add_partition(topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap();
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    }

    pub(crate) fn size(&self, topic: &str) -> i64 {
        use rdkafka::consumer::Consumer as _;
        (0..self.partitions)
            .map(|p| {
                let watermarks = self
                    .consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10));
                watermarks.map_or(0, |(_, high)| high)
            })
            .sum()
    }
}

/// Fails the test at once if the worker has exited: it must ride out
/// whatever the test does to the broker.
fn still_running(worker: &mut Child) -> bool {
    if let Ok(Some(status)) = worker.try_wait() {
        panic!("the worker exited ({status}) instead of riding out the outage; its log is above");
    }
    true
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `weir run path` as a worker and kills it with SIGKILL `kills`
/// times, each time once it has written `outputs` more records to `out`
/// (checking that not every one of the `inputs` on `in` was committed by
/// then: the kill came mid-stream); then runs it until every input is
/// committed and stops it cleanly.
pub(crate) fn kill_then_finish(
    path: &std::path::Path,
    cache: &std::path::Path,
    watch: &Watcher,
    kills: usize,
    (inputs, outputs): (i64, i64),
) {
    tokio::task::block_in_place(|| {
        for kill in 1..=kills {
            let before = watch.size("out");
            let mut worker = spawn_worker(path, cache, "1");
            wait_for("new output before a kill", Duration::from_secs(90), || {
                still_running(&mut worker) && watch.size("out") > before + outputs
            });
            worker.kill().unwrap();
            worker.wait().unwrap();
            let committed = watch.committed("in");
            eprintln!(
                "kill {kill}: {} outputs written, {committed} inputs committed",
                watch.size("out"),
            );
            assert!(
                committed < inputs,
                "kill {kill} came after every input was committed: it tested nothing"
            );
        }
        let worker = spawn_worker(path, cache, "1");
        wait_for(
            "every input offset committed",
            Duration::from_secs(180),
            || watch.committed("in") >= inputs,
        );
        stop_gracefully(worker);
    });
}

/// Kills a worker running `lanes` lanes with SIGKILL three times as soon as
/// it has written more output, restarts it each time, and finally lets it
/// finish. Returns the input ids and the output topic as read (committed
/// only, if asked).
///
/// The plugin takes 50 us a record, so the 100,000 records take at least
/// 5 s of plugin time: each kill, which comes once 2,000 more outputs are
/// out, lands mid-stream, and the test checks that it did.
async fn kill_and_restart(
    delivery: &str,
    read_committed: bool,
    lanes: usize,
) -> (Vec<usize>, Vec<crate::broker::Consumed>) {
    const RECORDS: usize = 100_000;
    let broker = broker_with_input(RECORDS).await;
    let scratch = Scratch::new();
    let path = paced_survivor_pipeline(&scratch, &broker, delivery, 50, Some(lanes));
    let cache = scratch.path("cache");
    let watch = Watcher::new(&broker, "survivors", 6);
    kill_then_finish(&path, &cache, &watch, 3, (RECORDS as i64, 2_000));

    (
        (0..RECORDS).collect(),
        tokio::task::block_in_place(|| broker.read_all("out", read_committed)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_a_worker_killed_mid_stream_loses_nothing_with_one_lane() {
    at_least_once_after_kills(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_a_worker_killed_mid_stream_loses_nothing_with_two_lanes() {
    at_least_once_after_kills(2).await;
}

async fn at_least_once_after_kills(lanes: usize) {
    let (input, output) = kill_and_restart("at_least_once", false, lanes).await;
    let output = ids(&output);
    let seen: BTreeSet<usize> = output.iter().copied().collect();
    let missing: Vec<usize> = input
        .iter()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} inputs missing from the output, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Kills replay what was not committed: duplicates are allowed here, and
    // show the kills did land mid-stream.
    eprintln!("{} outputs for {} inputs", output.len(), input.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_a_worker_killed_mid_stream_neither_loses_nor_doubles_with_one_lane() {
    exactly_once_after_kills(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_a_worker_killed_mid_stream_neither_loses_nor_doubles_with_two_lanes() {
    exactly_once_after_kills(2).await;
}

/// Exactly once, and in order: a key's records are in one input partition,
/// so they reach its output partition in the order they were produced.
async fn exactly_once_after_kills(lanes: usize) {
    let (input, records) = kill_and_restart("exactly_once", true, lanes).await;
    let output = ids(&records);
    let mut last_of_key: HashMap<String, usize> = HashMap::new();
    for (record, id) in records.iter().zip(&output) {
        let key = record.key.clone().expect("payments are keyed");
        if let Some(last) = last_of_key.insert(key.clone(), *id) {
            assert!(last < *id, "key {key}: id {id} came after {last}");
        }
    }
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for id in &output {
        *counts.entry(*id).or_default() += 1;
    }
    let doubled: Vec<usize> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    let missing: Vec<usize> = input
        .iter()
        .filter(|id| !counts.contains_key(id))
        .copied()
        .collect();
    assert!(
        doubled.is_empty(),
        "{} inputs written twice, e.g. {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(10)]
    );
    assert!(
        missing.is_empty(),
        "{} inputs missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(output.len(), input.len());
}

fn survivor_pipeline(scratch: &Scratch, broker: &Broker, delivery: &str) -> std::path::PathBuf {
    paced_survivor_pipeline(scratch, broker, delivery, 0, None)
}

/// The survivor pipeline through a plugin that spends `pace_us` on each
/// record (identity when 0): slow enough that a kill lands mid-stream. It
/// runs `lanes` lanes, or the default when `None`.
fn paced_survivor_pipeline(
    scratch: &Scratch,
    broker: &Broker,
    delivery: &str,
    pace_us: u64,
    lanes: Option<usize>,
) -> std::path::PathBuf {
    let parallelism = lanes.map_or(String::new(), |n| format!("parallelism = {n}\n"));
    let plugin = if pace_us == 0 {
        "wasm = \"{plugin:identity}\"".to_owned()
    } else {
        format!("wasm = \"{{plugin:misbehave}}\"\nconfig = {{ pace_us = {pace_us} }}")
    };
    scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "survivor"
delivery = "{delivery}"
{parallelism}commit_interval_ms = 100
limits = {{ wasi = ["monotonic-clock"] }}
source = {{ type = "kafka", brokers = "{b}", topics = ["in"], group = "survivors" }}
batch = {{ max_records = 200, linger_ms = 5 }}

[[pipeline.plugin]]
{plugin}

[[pipeline.sink]]
type = "kafka"
brokers = "{b}"
topic = "out"

[pipeline.dead_letter]
type = "kafka"
brokers = "{b}"
topic = "dlq"
"#,
        b = broker.brokers()
    ))
}

async fn broker_with_input(records: usize) -> Broker {
    let broker = Broker::start();
    broker.create_topic("in", 6).await;
    broker.create_topic("out", 6).await;
    broker.create_topic("dlq", 1).await;
    let input: Vec<(String, String)> = (0..records).map(payment).collect();
    broker.produce("in", &input).await;
    broker
}

/// Every message of partition 0 of `topic`, from its start to its end as it
/// is now: each one's value, `None` for a tombstone.
fn partition_payloads(brokers: &str, topic: &str) -> Vec<Option<Vec<u8>>> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "weir-test-partition-reader")
        .create()
        .unwrap();
    let (_, end) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let (mut payloads, mut next) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < end {
        assert!(
            Instant::now() < deadline,
            "{topic} not read to offset {end} in 60 s"
        );
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            next = message.offset() + 1;
            payloads.push(message.payload().map(<[u8]>::to_vec));
        }
    }
    payloads
}

fn ids(records: &[crate::broker::Consumed]) -> Vec<usize> {
    records
        .iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.value).unwrap()["id"]
                .as_u64()
                .unwrap() as usize
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_the_partitions_and_together_write_each_record_once() {
    const RECORDS: usize = 60_000;
    let broker = broker_with_input(RECORDS).await;
    let scratch = Scratch::new();
    let path = survivor_pipeline(&scratch, &broker, "exactly_once");
    let watch = Watcher::new(&broker, "survivors", 6);
    let summaries = tokio::task::block_in_place(|| {
        let mut workers: Vec<LoggedWorker> = ["1", "2"]
            .into_iter()
            .map(|id| LoggedWorker::spawn(&scratch, &path, id))
            .collect();
        wait_for_workers(
            "every input offset committed",
            Duration::from_secs(120),
            &mut workers,
            || watch.committed("in") >= RECORDS as i64,
        );
        workers
            .into_iter()
            .map(LoggedWorker::stop)
            .collect::<Vec<String>>()
    });
    let output = tokio::task::block_in_place(|| ids(&broker.read_all("out", true)));
    let distinct: BTreeSet<usize> = output.iter().copied().collect();
    assert_eq!(distinct.len(), RECORDS, "every input once");
    assert_eq!(output.len(), RECORDS, "no input twice");
    for summary in &summaries {
        // Each worker's summary: both took part.
        let records_in = summary_figure(summary, "survivor", "records in");
        assert!(records_in > 0, "a worker took no partition: {summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_start_and_gone_for_ten_seconds_loses_nothing() {
    const RECORDS: usize = 50_000;
    let mut broker = broker_with_input(RECORDS).await;
    let scratch = Scratch::new();
    let path = survivor_pipeline(&scratch, &broker, "at_least_once");
    let cache = scratch.path("cache");
    tokio::task::block_in_place(|| {
        broker.stop();
        let mut worker = spawn_worker(&path, &cache, "1");
        std::thread::sleep(Duration::from_secs(3));
        broker.resume();
        let watch = Watcher::new(&broker, "survivors", 6);
        wait_for(
            "output after the broker came up",
            Duration::from_secs(60),
            || still_running(&mut worker) && watch.size("out") > 0,
        );
        drop(watch);
        broker.stop();
        std::thread::sleep(Duration::from_secs(10));
        assert!(still_running(&mut worker));
        broker.resume();
        let watch = Watcher::new(&broker, "survivors", 6);
        wait_for(
            "every input offset committed",
            Duration::from_secs(120),
            || still_running(&mut worker) && watch.committed("in") >= RECORDS as i64,
        );
        stop_gracefully(worker);
    });
    let output = tokio::task::block_in_place(|| ids(&broker.read_all("out", false)));
    let seen: BTreeSet<usize> = output.iter().copied().collect();
    let missing: Vec<usize> = (0..RECORDS).filter(|id| !seen.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} inputs missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_mid_stream_takes_over_partitions_and_together_they_lose_nothing() {
    // On revoke the source waits for its in-flight batches to commit, so the
    // next owner starts right after them. The test broker refuses commits
    // once a rebalance has begun, so here the wait ends early and the
    // revoked batches are read twice: at-least-once, as promised, but not
    // the duplicate-free hand-over Kafka itself allows.
    const RECORDS: usize = 200_000;
    let broker = broker_with_input(RECORDS).await;
    let scratch = Scratch::new();
    let path = survivor_pipeline(&scratch, &broker, "at_least_once");
    let watch = Watcher::new(&broker, "survivors", 6);
    let summaries = tokio::task::block_in_place(|| {
        let mut workers = vec![LoggedWorker::spawn(&scratch, &path, "1")];
        wait_for_workers(
            "the first worker's output",
            Duration::from_secs(60),
            &mut workers,
            || watch.size("out") > 5_000,
        );
        workers.push(LoggedWorker::spawn(&scratch, &path, "2"));
        wait_for_workers(
            "every input offset committed",
            Duration::from_secs(120),
            &mut workers,
            || watch.committed("in") >= RECORDS as i64,
        );
        workers
            .into_iter()
            .map(LoggedWorker::stop)
            .collect::<Vec<String>>()
    });
    for summary in &summaries {
        for line in summary.lines().filter(|l| !l.contains("librdkafka")) {
            eprintln!("{line}");
        }
    }
    let second_in = summary_figure(&summaries[1], "survivor", "records in");
    assert!(
        second_in > 0,
        "the joining worker took no partition: {}",
        summaries[1]
    );
    let output = tokio::task::block_in_place(|| ids(&broker.read_all("out", false)));
    let distinct: BTreeSet<usize> = output.iter().copied().collect();
    assert_eq!(distinct.len(), RECORDS, "every input present");
    eprintln!(
        "{} outputs for {RECORDS} inputs across the rebalance",
        output.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_produce_writes_the_counted_events_keyed_by_user() {
    let broker = Broker::start();
    let output = tokio::task::block_in_place(|| {
        Command::new(weir_bin())
            .args([
                "produce",
                "--brokers",
                &broker.brokers(),
                "--topic",
                "events",
            ])
            .args([
                "--kind",
                "clickstream",
                "--count",
                "500",
                "--seed",
                "3",
                "--malformed",
                "0.1",
                "--partitions",
                "3",
            ])
            .output()
            .unwrap()
    });
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let malformed: usize = said
        .split_once("events (")
        .and_then(|(_, rest)| rest.split_once(" malformed"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no final count in {said:?}"));
    assert!(
        said.starts_with("produced 500 clickstream events"),
        "{said}"
    );

    let events = tokio::task::block_in_place(|| broker.read_all("events", false));
    assert_eq!(events.len(), 500);
    let broken = events
        .iter()
        .filter(|e| serde_json::from_str::<serde_json::Value>(&e.value).is_err())
        .count();
    assert_eq!(
        broken, malformed,
        "the final count matches what was written"
    );
    assert!(malformed > 0 && malformed < 500);
    assert!(
        events
            .iter()
            .all(|e| e.key.as_deref().is_some_and(|k| k.starts_with("user-")))
    );
    assert_eq!(
        events
            .iter()
            .map(|e| e.partition)
            .collect::<BTreeSet<_>>()
            .len(),
        3,
        "spread by key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_kafka_to_file_worker_keeps_the_output_it_wrote_before() {
    let broker = Broker::start();
    broker.create_topic("in", 2).await;
    let first: Vec<(String, String)> = (0..500).map(payment).collect();
    broker.produce("in", &first).await;
    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "to-file"
commit_interval_ms = 100
source = {{ type = "kafka", brokers = "{b}", topics = ["in"] }}

[[pipeline.sink]]
type = "file"
path = "out.jsonl"
"#,
        b = broker.brokers()
    ));
    let records = |summaries: &[MetricsSnapshot]| summaries[0].records_in;
    let done = run_until(&path, |now| records(now) >= 500).await;
    assert_eq!(records(&done), 500);
    assert_eq!(scratch.json_lines("out.jsonl").len(), 500);

    // The restarted worker resumes after the committed offsets and appends.
    let second: Vec<(String, String)> = (500..800).map(payment).collect();
    broker.produce("in", &second).await;
    let done = run_until(&path, |now| records(now) >= 300).await;
    assert_eq!(records(&done), 300, "only the new records are read");
    let ids: BTreeSet<u64> = scratch
        .json_lines("out.jsonl")
        .iter()
        .map(|line| line["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (0..800).collect(),
        "the first run's output is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_offset_commits_fail_stops_with_the_error_and_counts_it() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    // The mock cluster is for fault injection: every offset commit is
    // refused as unauthorised.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("in", 1, 1).unwrap();
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 50],
    );
    let brokers = cluster.bootstrap_servers();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for i in 0..100 {
        let (key, value) = payment(i);
        producer
            .send(
                FutureRecord::to("in").key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "refused"
commit_interval_ms = 100
source = {{ type = "kafka", brokers = "{brokers}", topics = ["in"] }}

[[pipeline.sink]]
type = "file"
path = "out.jsonl"
"#
    ));
    let file = PipelineFile::load(&path).unwrap();
    let engine = PluginEngine::new(EngineOptions::default()).unwrap();
    let pipeline = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .unwrap();
    let metrics = pipeline.metrics();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let ended = tokio::time::timeout(Duration::from_secs(120), pipeline.run(shutdown))
        .await
        .expect("the pipeline stopped by itself");
    let err = ended
        .expect_err("a pipeline that cannot commit must not run on")
        .to_string();
    assert!(
        err.contains("offset commit failed") && err.contains("uthoriz"),
        "{err}"
    );
    assert_eq!(metrics.snapshot().commit_errors, 1);
    // What was written before the failed commit stays written.
    assert_eq!(scratch.json_lines("out.jsonl").len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_fails_for_good_is_replaced_and_what_it_held_is_resent_in_order() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use weir::batch::{Batch, Records};
    use weir::sink::Sink as _;
    use weir::sink::kafka::{KafkaSink, KafkaSinkConfig};

    // The mock cluster is for fault injection: it answers produce requests
    // with errors that leave an idempotent producer unable to go on.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("out", 1, 1).unwrap();
    let mut sink = KafkaSink::new(KafkaSinkConfig {
        brokers: cluster.bootstrap_servers(),
        options: Default::default(),
        topic: "out".into(),
        route_topics: Default::default(),
        routes: vec!["default".into()],
    })
    .unwrap();
    let records = |ids: std::ops::Range<usize>| -> Batch {
        let mut batch = Batch::new();
        for id in ids {
            batch.push_value(id.to_string().as_bytes(), "in", 0, id as i64);
        }
        batch
    };
    sink.write(Records::all(&records(0..2_000))).await.unwrap();
    sink.flush().await.unwrap();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 3],
    );
    for chunk in (2_000..10_000).step_by(500) {
        sink.write(Records::all(&records(chunk..chunk + 500)))
            .await
            .unwrap();
    }
    sink.flush().await.unwrap();
    assert!(sink.producers_replaced() >= 1, "the fault was not injected");

    let mut first_seen = Vec::new();
    let mut seen = BTreeSet::new();
    for payload in partition_payloads(&cluster.bootstrap_servers(), "out") {
        let id: usize = String::from_utf8(payload.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        if seen.insert(id) {
            first_seen.push(id);
        }
    }
    assert_eq!(seen.len(), 10_000, "every record written");
    let out_of_order = first_seen.windows(2).find(|pair| pair[0] > pair[1]);
    assert_eq!(
        out_of_order, None,
        "records first appear in the order written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_forwarded_by_a_plugin_is_still_a_tombstone() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let broker = Broker::start();
    broker.create_topic("in", 1).await;
    broker.create_topic("out", 1).await;
    let producer: FutureProducer = broker
        .connection()
        .client_config(weir::kafka::KafkaConnection::PRODUCER)
        .create()
        .unwrap();
    for record in [
        FutureRecord::<str, str>::to("in")
            .key("user-1")
            .payload("{}"),
        FutureRecord::<str, str>::to("in").key("user-1"),
        FutureRecord::<str, str>::to("in").key("user-2").payload(""),
    ] {
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let scratch = Scratch::new();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "compact"
source = {{ type = "kafka", brokers = "{b}", topics = ["in"] }}

[[pipeline.plugin]]
wasm = "{{plugin:identity}}"

[[pipeline.sink]]
type = "kafka"
brokers = "{b}"
topic = "out"
"#,
        b = broker.brokers()
    ));
    run_until(&path, |now| now[0].records_out >= 3).await;
    let payloads = partition_payloads(&broker.brokers(), "out");
    assert_eq!(
        payloads,
        [Some(b"{}".to_vec()), None, Some(Vec::new())],
        "value, tombstone, empty value"
    );
}
