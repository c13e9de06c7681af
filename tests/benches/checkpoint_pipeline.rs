//! What checkpoints cost: Kafka -> 10 s tumbling window -> PostgreSQL over
//! 2 M events (6 partitions, 10,000 users, event time advancing ~10,000
//! events/s, sum and count per user), with checkpoints (positions and
//! window state in the sink's transaction, every second) and without
//! (`checkpoints = false`: rows only upserted, the source commits its own
//! positions, at-least-once), in interleaved rounds in one run, against the
//! same broker process (noida-db) and the local PostgreSQL. Beside them, a
//! native baseline: rdkafka consuming the same topic into serde and a
//! HashMap of windows, single-threaded, with no sink (the ceiling of
//! reading and windowing alone).
//!
//! Each weir run is timed from its first record in to the end of its last
//! commit, and its table checked against the model: every window, exact.
//! Printed: events/s end to end, on / off, and the pauses: how long each
//! commit held the sink writer (p50, p99, max; with checkpoints each commit
//! is a checkpoint, rows and state; without, it flushes the rows), and how
//! long taking the window images took within a checkpoint.
//!
//! Run: `cargo bench -p weir-tests --bench checkpoint_pipeline`
//! (`WEIR_BENCH_EVENTS`, `WEIR_BENCH_RUNS`). Needs PostgreSQL on
//! 127.0.0.1:5432 (database `test`, trust auth) and noida-db
//! (`scripts/test` installs it).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot unwrap has failed"
)]

#[path = "../it/broker.rs"]
#[allow(
    dead_code,
    reason = "shared with the tests; the benchmark uses part of it"
)]
mod broker;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio_postgres::NoTls;
use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::kafka::KafkaConnection;
use weir::pipeline::Pipeline;

const PARTITIONS: i32 = 6;
const WINDOW_MS: i64 = 10_000;
const POSTGRES: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
/// The broker ignores fetch size limits: a backlog of this size arrives as
/// one response, which librdkafka takes only if allowed to.
const RECEIVE_MAX: &str = "1000000000";

/// (user, window start) -> (sum, count).
type Windows = HashMap<(String, i64), (i64, i64)>;

#[derive(Deserialize)]
struct Event {
    user_id: String,
    ts: i64,
    amount: i64,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Produces `events` payments keyed by user (the same every run), then in
/// every partition one event an hour later that closes every window before
/// it; gives the windows of the payments.
async fn produce(connection: &KafkaConnection, events: usize) -> Windows {
    let producer: FutureProducer = connection
        .client_config(KafkaConnection::PRODUCER)
        .create()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut windows = Windows::new();
    let mut deliveries = std::collections::VecDeque::new();
    let base = 1_700_000_000_000i64;
    for i in 0..events as i64 {
        let user = format!("user-{:04}", rng.u32(0..10_000));
        let ts = base + i / 10 + rng.i64(-250..=250);
        let amount = rng.i64(1..100_000);
        let value = format!(
            r#"{{"user_id":"{user}","ts":{ts},"amount":{amount},"currency":"EUR","merchant":"m-{:03}"}}"#,
            rng.u32(0..1000)
        );
        let window =
            (windows.entry((user.clone(), ts.div_euclid(WINDOW_MS) * WINDOW_MS))).or_default();
        window.0 += amount;
        window.1 += 1;
        let record = FutureRecord::to("events").key(&user).payload(&value);
        deliveries.push_back(producer.send_result(record).unwrap());
        while deliveries.len() > 50_000 {
            deliveries.pop_front().unwrap().await.unwrap().unwrap();
        }
    }
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }
    let closer = format!(
        r#"{{"user_id":"closer","ts":{},"amount":0}}"#,
        base + 3_600_000_000
    );
    for partition in 0..PARTITIONS {
        let record = FutureRecord::to("events")
            .key("closer")
            .payload(&closer)
            .partition(partition);
        producer
            .send_result(record)
            .unwrap()
            .await
            .unwrap()
            .unwrap();
    }
    windows
}

/// The native baseline: every event consumed, parsed with serde and added
/// to its window; seconds from the first record to the last.
fn native(brokers: &str, events: usize) -> (f64, Windows) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-native")
        .set("enable.auto.commit", "false")
        .set("receive.message.max.bytes", RECEIVE_MAX)
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        (assignment.add_partition_offset("events", partition, Offset::Beginning)).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut windows = Windows::new();
    let (mut read, mut started) = (0, None);
    while read < events + PARTITIONS as usize {
        let Some(message) = consumer.poll(Duration::from_secs(30)) else {
            panic!("the native consumer stalled at {read}");
        };
        let message = message.unwrap();
        started.get_or_insert_with(Instant::now);
        read += 1;
        let event: Event = serde_json::from_slice(message.payload().unwrap()).unwrap();
        if event.user_id == "closer" {
            continue;
        }
        let start = event.ts.div_euclid(WINDOW_MS) * WINDOW_MS;
        let window = windows.entry((event.user_id, start)).or_default();
        window.0 += event.amount;
        window.1 += 1;
    }
    (started.unwrap().elapsed().as_secs_f64(), windows)
}

/// One weir run's figures.
struct Run {
    seconds: f64,
    /// How long each commit held the sink writer.
    pauses: Vec<Duration>,
    /// How long each checkpoint's window images took.
    snapshots: Vec<Duration>,
}

/// Runs the pipeline once, in this process, into a new table (and a new
/// consumer group), with or without checkpoints; checks the table.
async fn weir_run(
    brokers: &str,
    events: usize,
    checkpoints: bool,
    round: usize,
    expected: &Windows,
) -> Run {
    let name = format!(
        "bench_ckpt_{}_{round}_{}",
        if checkpoints { "on" } else { "off" },
        std::process::id()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[pipeline]]
name = "{name}"
source = {{ type = "kafka", brokers = "{brokers}", topics = ["events"], group = "{name}", options = {{ "receive.message.max.bytes" = "{RECEIVE_MAX}" }} }}
batch = {{ max_records = 1024, linger_ms = 20 }}

[pipeline.window]
kind = "tumbling"
size = "10s"
key = "user_id"
time = "ts"
watermark_delay = "1s"
aggregates = [ {{ fn = "sum", field = "amount", as = "total" }}, {{ fn = "count", as = "n" }} ]

[[pipeline.sink]]
type = "postgres"
url = "{POSTGRES}"
table = "{name}"
key = ["window_start", "key"]
create_table = true
checkpoints = {checkpoints}
columns = {{ window_start = "bigint", window_end = "bigint", key = "text", total = "bigint", n = "bigint" }}
"#
        ),
    )
    .unwrap();
    let file = PipelineFile::load(&path).unwrap();
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..Default::default()
    })
    .unwrap();
    let pipeline = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .unwrap();
    let metrics = pipeline.metrics();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pipeline.run(shutdown));
    while metrics.snapshot().records_in == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let all = (events + PARTITIONS as usize) as u64;
    let windows = expected.len() as u64;
    // Every event in and every window out (the closers close them all).
    while metrics.snapshot().records_in < all || metrics.snapshot().window_results < windows {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no end in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.send(true).unwrap();
    let summary = run.await.unwrap().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(summary.records_in, all);

    let (client, connection) = tokio_postgres::connect(POSTGRES, NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = client
        .query(
            &format!("SELECT key, window_start, total, n FROM {name}"),
            &[],
        )
        .await
        .unwrap();
    let got: Windows = rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    assert!(
        got == *expected,
        "{name}: {} rows, {} windows expected; the first that differs: {:?}",
        got.len(),
        expected.len(),
        expected.iter().find(|(k, v)| got.get(*k) != Some(*v))
    );
    client
        .batch_execute(&format!(
            "DROP TABLE {name}; DELETE FROM weir_offsets WHERE pipeline = '{name}'"
        ))
        .await
        .unwrap();
    Run {
        seconds,
        pauses: metrics.commit_pauses().all(),
        snapshots: metrics.state_snapshots().all(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = env_or("WEIR_BENCH_EVENTS", 2_000_000);
    let runs = env_or("WEIR_BENCH_RUNS", 5);
    let broker = broker::Broker::start();
    let connection = broker.connection();
    connection
        .ensure_topics(&["events"], PARTITIONS)
        .await
        .unwrap();
    let produced = Instant::now();
    let expected = produce(&connection, events).await;
    println!(
        "checkpoint_pipeline: {events} events produced in {:.1} s, {} windows of 10 s, \
         kafka ({PARTITIONS} partitions) -> window -> postgres, median of {runs} interleaved rounds",
        produced.elapsed().as_secs_f64(),
        expected.len()
    );
    // The broker rewrites its state after a burst of writes: let it settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let brokers = broker.brokers();
    let (native_s, native_windows) = tokio::task::block_in_place(|| native(&brokers, events));
    assert!(
        native_windows == expected,
        "the native baseline's windows differ"
    );

    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut on_pauses, mut off_pauses, mut snapshots) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs.max(1) {
        // Which goes first alternates: neither always meets a fresher
        // broker or database.
        for checkpoints in [round % 2 == 0, round % 2 == 1] {
            let run = weir_run(&brokers, events, checkpoints, round, &expected).await;
            if checkpoints {
                on.push(run.seconds);
                on_pauses.extend(run.pauses);
                snapshots.extend(run.snapshots);
            } else {
                off.push(run.seconds);
                off_pauses.extend(run.pauses);
            }
        }
    }
    let (on, off) = (median(on), median(off));
    let rate = |seconds: f64| events as f64 / seconds;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let spread = |mut pauses: Vec<Duration>| {
        pauses.sort();
        let max = pauses.last().copied().unwrap_or_default();
        let figures = [percentile(&pauses, 0.5), percentile(&pauses, 0.99), max].map(ms);
        (pauses.len(), figures)
    };
    let (on_commits, [on_p50, on_p99, on_max]) = spread(on_pauses);
    let (off_commits, [off_p50, off_p99, off_max]) = spread(off_pauses);
    let (_, [snap_p50, snap_p99, snap_max]) = spread(snapshots);
    println!(
        "  native rdkafka + serde + HashMap (no sink) {native_s:.2} s, {:.0} events/s",
        rate(native_s)
    );
    println!(
        "  weir, checkpoints off   {off:.2} s, {:.0} events/s ({:.2}x native) | commits ({off_commits}): \
         pause p50 {off_p50:.1} ms, p99 {off_p99:.1} ms, max {off_max:.1} ms",
        rate(off),
        off / native_s
    );
    println!(
        "  weir, checkpoints on    {on:.2} s, {:.0} events/s ({:.2}x native) | checkpoints ({on_commits}): \
         pause p50 {on_p50:.1} ms, p99 {on_p99:.1} ms, max {on_max:.1} ms; window images in them \
         p50 {snap_p50:.1} ms, p99 {snap_p99:.1} ms, max {snap_max:.1} ms",
        rate(on),
        on / native_s
    );
    println!(
        "  checkpoints on against off: {:+.1}% time (goal <= +10%)",
        (on / off - 1.0) * 100.0
    );
    let summary = serde_json::json!({
        "bench": "checkpoint_pipeline",
        "events": events,
        "windows": expected.len(),
        "native_s": native_s,
        "off_s": off,
        "on_s": on,
        "on_per_s": rate(on).round(),
        "off_per_s": rate(off).round(),
        "on_over_off": on / off,
        "checkpoints": on_commits,
        "checkpoint_pause_p50_ms": on_p50,
        "checkpoint_pause_p99_ms": on_p99,
        "checkpoint_pause_max_ms": on_max,
        "window_image_p99_ms": snap_p99,
        "commit_pause_off_p99_ms": off_p99,
        "goal_on_over_off": 1.1,
    });
    println!("{summary}");
}
