//! Kafka throughput: the broker's ceiling (rdkafka producing alone, and
//! consuming alone) and a native rdkafka pass-through (consume → produce, no
//! weir) against whole weir pipelines, Kafka → identity plugin →
//! Kafka and Kafka → json-filter plugin → Kafka, all against the same real
//! Kafka-protocol broker process (noida-db) in the same run.
//!
//! Run: `cargo bench -p weir-tests --bench kafka_pipeline`. Prints a table,
//! then one JSON summary line.

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

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::kafka::KafkaConnection;
use weir::pipeline::Pipeline;

const RECORDS: usize = 200_000;
const PARTITIONS: i32 = 6;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plugin(name: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            name,
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    target
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")))
}

fn value(i: usize) -> String {
    let mut value = format!(
        r#"{{"id":{i},"user":"user-{}","amount":{}.{:02},"pad":""#,
        i % 997,
        i % 200,
        i % 100
    );
    value.extend(std::iter::repeat_n('x', 98 - value.len()));
    value.push_str("\"}");
    value
}

async fn produce(connection: &KafkaConnection, topic: &str) -> f64 {
    let producer: FutureProducer = connection
        .client_config(KafkaConnection::PRODUCER)
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut deliveries = std::collections::VecDeque::new();
    for i in 0..RECORDS {
        let key = format!("user-{}", i % 997);
        let value = value(i);
        let delivery = producer
            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
            .expect("queued");
        deliveries.push_back(delivery);
        if deliveries.len() >= 50_000 {
            acknowledge(&mut deliveries, 25_000).await;
        }
    }
    acknowledge(&mut deliveries, 0).await;
    started.elapsed().as_secs_f64()
}

/// Waits until at most `keep` deliveries are unacknowledged.
async fn acknowledge(
    deliveries: &mut std::collections::VecDeque<rdkafka::producer::DeliveryFuture>,
    keep: usize,
) {
    while deliveries.len() > keep {
        if let Some(delivery) = deliveries.pop_front() {
            delivery.await.expect("not cancelled").expect("delivered");
        }
    }
}

/// A consumer assigned every partition of `topic` from its beginning.
fn reader_from_start(brokers: &str, topic: &str, group: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    consumer
}

fn consume(brokers: &str, topic: &str) -> f64 {
    let consumer = reader_from_start(brokers, topic, "bench-ceiling");
    let started = Instant::now();
    let mut read = 0;
    while read < RECORDS {
        if let Some(message) = consumer.poll(Duration::from_secs(10)) {
            message.expect("message");
            read += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "consumer stalled at {read}"
        );
    }
    started.elapsed().as_secs_f64()
}

/// Native pass-through: rdkafka consuming `topic` and producing every record
/// to `out`, acknowledged, with no weir in between.
async fn pass_through(connection: &KafkaConnection, topic: &str, out: &str) -> f64 {
    let consumer = reader_from_start(&connection.brokers, topic, "bench-pass-through");
    let producer: FutureProducer = connection
        .client_config(KafkaConnection::PRODUCER)
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut deliveries = std::collections::VecDeque::new();
    let mut read = 0;
    while read < RECORDS {
        let Some(message) = tokio::task::block_in_place(|| consumer.poll(Duration::from_secs(10)))
        else {
            continue;
        };
        let message = message.expect("message");
        use rdkafka::Message as _;
        let mut record = FutureRecord::to(out).payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        deliveries.push_back(producer.send_result(record).expect("queued"));
        read += 1;
        if deliveries.len() >= 50_000 {
            acknowledge(&mut deliveries, 25_000).await;
        }
    }
    acknowledge(&mut deliveries, 0).await;
    started.elapsed().as_secs_f64()
}

async fn pipeline(brokers: &str, name: &str, plugin_line: &str, out: &str) -> f64 {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bench.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[pipeline]]
name = "{name}"
source = {{ type = "kafka", brokers = "{brokers}", topics = ["in"] }}
batch = {{ max_records = 1024, linger_ms = 20 }}

[[pipeline.plugin]]
{plugin_line}

[[pipeline.sink]]
type = "kafka"
brokers = "{brokers}"
topic = "{out}"

[pipeline.dead_letter]
type = "kafka"
brokers = "{brokers}"
topic = "dlq"
"#
        ),
    )
    .expect("write");
    let file = PipelineFile::load(&path).expect("config");
    let engine = PluginEngine::new(EngineOptions {
        cache_dir: Some(dir.path().join("cache")),
        ..Default::default()
    })
    .expect("engine");
    let pipeline = Pipeline::build(&file, &file.pipelines[0], &engine)
        .await
        .expect("pipeline");
    let metrics = pipeline.metrics();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pipeline.run(shutdown));
    // Time from the first record in to the last record acknowledged out.
    while metrics.snapshot().records_in == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while metrics.snapshot().records_in < RECORDS as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.send(true).expect("stop");
    let summary = run.await.expect("joined").expect("ran");
    assert_eq!(summary.records_in, RECORDS as u64);
    // `run` returns after the last flush: every output is acknowledged.
    started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let identity = plugin("identity");
    let json_filter = plugin("json-filter");
    let broker = broker::Broker::start();
    let connection = broker.connection();
    for (topic, partitions) in [
        ("in", PARTITIONS),
        ("out-native", PARTITIONS),
        ("out-identity", PARTITIONS),
        ("out-json", PARTITIONS),
        ("dlq", 1),
    ] {
        connection
            .ensure_topics(&[topic], partitions)
            .await
            .expect("topic");
    }
    let rate = |seconds: f64| RECORDS as f64 / seconds;

    // noida-db rewrites its whole state file after changes, which takes CPU
    // from whatever runs next: let it settle before each measured phase.
    let settle = || tokio::time::sleep(Duration::from_secs(3));
    let produced = rate(produce(&connection, "in").await);
    let brokers = broker.brokers();
    settle().await;
    let consumed = rate(tokio::task::block_in_place(|| consume(&brokers, "in")));
    let ceiling = produced.min(consumed);
    settle().await;
    let native = rate(pass_through(&connection, "in", "out-native").await);
    settle().await;
    let identity_rate = rate(
        pipeline(
            &brokers,
            "bench-identity",
            &format!("wasm = {:?}", identity.display().to_string()),
            "out-identity",
        )
        .await,
    );
    let json_line = format!(
        "wasm = {:?}\nconfig = {{ field = \"amount\", min = 0.0, project = [\"id\", \"user\", \"amount\"] }}",
        json_filter.display().to_string()
    );
    settle().await;
    let json_rate = rate(pipeline(&brokers, "bench-json", &json_line, "out-json").await);

    println!(
        "kafka throughput, {RECORDS} records of 100 bytes, {PARTITIONS} partitions, one broker process"
    );
    println!(
        "{:<36} {:>14} {:>12} {:>16}",
        "case", "records/s", "of ceiling", "of pass-through"
    );
    for (case, value) in [
        ("broker ceiling: produce only", produced),
        ("broker ceiling: consume only", consumed),
        ("rdkafka pass-through (native)", native),
        ("kafka -> identity -> kafka", identity_rate),
        ("kafka -> json-filter -> kafka", json_rate),
    ] {
        println!(
            "{case:<36} {value:>14.0} {:>11.0}% {:>15.0}%",
            value / ceiling * 100.0,
            value / native * 100.0
        );
    }
    let summary = serde_json::json!({
        "bench": "kafka_pipeline",
        "records": RECORDS,
        "produce_per_s": produced.round(),
        "consume_per_s": consumed.round(),
        "identity_per_s": identity_rate.round(),
        "json_filter_per_s": json_rate.round(),
        "identity_of_ceiling": (identity_rate / ceiling * 100.0).round() / 100.0,
        "json_of_ceiling": (json_rate / ceiling * 100.0).round() / 100.0,
        "pass_through_per_s": native.round(),
        "identity_of_pass_through": (identity_rate / native * 100.0).round() / 100.0,
        "goal_of_ceiling": 0.8,
    });
    println!("{summary}");
}
