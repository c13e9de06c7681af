//! A real Kafka-protocol broker for tests: noida-db (from PyPI, installed by
//! `scripts/test`), started on a free port with a fresh data folder and
//! stopped when the test ends; plus helpers to create topics, produce and
//! read them back.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir::kafka::KafkaConnection;

/// The broker binary inside the noida-db Python package (its console script
/// is a wrapper that would outlive a kill).
fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_TEST_BROKER") {
        return path.into();
    }
    let found = Command::new("python3")
        .args(["-c", "import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), 'noida-db'))"])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    assert!(
        found.status.success() && path.is_file(),
        "the test broker is missing: run `python3 -m pip install noida-db==0.2.3` (scripts/test does)"
    );
    path
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

fn spawn(port: u16, data: &tempfile::TempDir) -> Child {
    let process = Command::new(broker_binary())
        .args(["start", "--only", "kafka", "--host", "127.0.0.1"])
        .args(["--kafka-port", &port.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the broker starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the broker did not listen on {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    process
}

/// One broker process, killed on drop.
pub struct Broker {
    pub port: u16,
    process: Child,
    data: tempfile::TempDir,
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub key: Option<String>,
    pub value: String,
    pub headers: HashMap<String, String>,
    pub partition: i32,
}

impl Broker {
    pub fn start() -> Self {
        let data = tempfile::tempdir().expect("a data dir");
        let port = free_port();
        let process = spawn(port, &data);
        Broker {
            port,
            process,
            data,
        }
    }

    /// Stops the broker (Ctrl-C, so it saves its data: noida-db writes its
    /// state to disk lazily, so a SIGKILL would lose acknowledged records,
    /// which no real Kafka would); [`Broker::resume`] starts it again on the
    /// same port and data. Clients see the broker vanish either way.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.process.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.process.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    pub fn resume(&mut self) {
        self.process = spawn(self.port, &self.data);
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn connection(&self) -> KafkaConnection {
        KafkaConnection {
            brokers: self.brokers(),
            options: Default::default(),
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        self.connection()
            .ensure_topics(&[topic], partitions)
            .await
            .expect("topic created");
    }

    /// Produces `(key, value)` pairs to `topic` and waits for every ack.
    pub async fn produce(&self, topic: &str, records: &[(String, String)]) {
        let producer = Self::producer_for(&self.connection());
        // In chunks: librdkafka queues at most 100 000 messages.
        for chunk in records.chunks(50_000) {
            Self::send_all(&producer, topic, chunk).await;
        }
    }

    /// Produces `(key, value)` pairs to one partition of `topic` and waits
    /// for every ack.
    pub async fn produce_to_partition(
        &self,
        topic: &str,
        partition: i32,
        records: &[(String, String)],
    ) {
        let producer = Self::producer_for(&self.connection());
        let deliveries: Vec<_> = records
            .iter()
            .map(|(key, value)| {
                let record = FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(value);
                producer.send_result(record).expect("queued")
            })
            .collect();
        for delivery in deliveries {
            delivery.await.expect("not cancelled").expect("delivered");
        }
    }

    /// A producer to the cluster of `connection`.
    pub fn producer_for(connection: &KafkaConnection) -> FutureProducer {
        connection
            .client_config(KafkaConnection::PRODUCER)
            .create()
            .expect("producer")
    }

    /// Sends `(key, value)` pairs to `topic` and waits for every ack.
    pub async fn send_all(producer: &FutureProducer, topic: &str, records: &[(String, String)]) {
        let deliveries: Vec<_> = records
            .iter()
            .map(|(key, value)| {
                producer
                    .send_result(FutureRecord::to(topic).key(key).payload(value))
                    .expect("queued")
            })
            .collect();
        for delivery in deliveries {
            delivery.await.expect("not cancelled").expect("delivered");
        }
    }

    /// Everything in `topic` now, in partition order; `read_committed`
    /// skips records of aborted or open transactions.
    pub fn read_all(&self, topic: &str, read_committed: bool) -> Vec<Consumed> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "weir-test-reader")
            .set("enable.auto.commit", "false")
            .set(
                "isolation.level",
                if read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut assignment = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for &partition in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .expect("watermarks");
            if high > low {
                ends.insert(partition, high);
            }
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("assignable");
        }
        consumer.assign(&assignment).expect("assigned");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        // With read_committed, the last offsets may be transaction markers
        // that are never returned: stop once a partition is idle near its end.
        let mut idle_polls = 0;
        while !ends.is_empty() && Instant::now() < deadline && idle_polls < 20 {
            match consumer.poll(Duration::from_millis(250)) {
                Some(Ok(message)) => {
                    idle_polls = 0;
                    let partition = message.partition();
                    if let Some(&end) = ends.get(&partition)
                        && message.offset() + 1 >= end
                    {
                        ends.remove(&partition);
                    }
                    out.push(Consumed {
                        key: message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        value: String::from_utf8_lossy(message.payload().unwrap_or_default())
                            .into_owned(),
                        headers: message
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| {
                                        let value =
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned();
                                        (h.key.to_owned(), value)
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                        partition,
                    });
                }
                Some(Err(err)) => panic!("reading {topic}: {err}"),
                None => {
                    idle_polls += 1;
                    // Transaction markers are never returned: a partition
                    // whose position passed its end is done.
                    if let Ok(positions) = consumer.position() {
                        for element in positions.elements() {
                            if let (Offset::Offset(at), Some(&end)) =
                                (element.offset(), ends.get(&element.partition()))
                                && at >= end
                            {
                                ends.remove(&element.partition());
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
