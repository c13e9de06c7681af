//! Window state of an exactly-once Kafka pipeline, kept in Kafka: each
//! checkpoint writes every partition's window image to a compacted
//! changelog topic inside the transaction that also carries the outputs and
//! the consumed offsets, and the offset committed for a source partition
//! carries, as its metadata, where that partition's image starts. Outputs,
//! offsets and state therefore commit together or not at all, and another
//! worker (no shared disk) that is assigned the partition reads its
//! committed offset and then exactly the records its metadata points at:
//! no replay of the whole changelog after a crash (Kafka Streams under
//! exactly-once restores a task by replaying its changelog).
//!
//! Layout: one partition per pipeline; an image is cut in chunks of at
//! most [`CHUNK_BYTES`] (under every broker's default message limit), keyed
//! `topic/partition/chunk` so compaction keeps the latest of each, and
//! tagged with the checkpoint's token so a reader takes only the chunks
//! of the checkpoint that was committed (not an aborted one's, which a
//! read-uncommitted reader also sees; reading uncommitted, a claim never
//! waits for a dead worker's open transaction to time out).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::KafkaConnection;
use crate::record::SourcePosition;
use crate::state::{Claimer, PartitionState, Snapshot};

/// The largest piece of an image in one record.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// How long a claim may take to read the state it points at.
const READ_LIMIT: Duration = Duration::from_secs(60);

/// The header naming the checkpoint a chunk belongs to.
const TOKEN_HEADER: &str = "weir-checkpoint";

/// The metadata of a committed offset: where its partition's image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pointer {
    /// The changelog partition and the offset of the first chunk.
    partition: i32,
    first: i64,
    /// How many chunks, each keyed with its index.
    chunks: usize,
    /// The checkpoint's token, on each of its chunks.
    token: u64,
}

impl Pointer {
    const PREFIX: &str = "weir-state/1";

    fn format(&self) -> String {
        format!(
            "{} {} {} {} {:016x}",
            Self::PREFIX,
            self.partition,
            self.first,
            self.chunks,
            self.token
        )
    }

    /// `None` for metadata that is not a pointer (none, or another
    /// client's).
    fn parse(metadata: &str) -> Option<Self> {
        let mut fields = metadata.strip_prefix(Self::PREFIX)?.split_whitespace();
        let pointer = Pointer {
            partition: fields.next()?.parse().ok()?,
            first: fields.next()?.parse().ok()?,
            chunks: fields.next()?.parse().ok()?,
            token: u64::from_str_radix(fields.next()?, 16).ok()?,
        };
        fields.next().is_none().then_some(pointer)
    }
}

/// Where a pipeline's window state is kept in Kafka.
#[derive(Debug, Clone)]
pub struct Changelog {
    /// The cluster (the source's: a transaction spans one cluster).
    pub connection: KafkaConnection,
    /// The changelog topic.
    pub topic: String,
    /// The consumer group whose committed offsets point into it.
    pub group: String,
}

impl Changelog {
    /// Creates the changelog topic (one partition, compacted) if it is
    /// missing.
    pub async fn ensure_topic(&self) -> Result<(), KafkaError> {
        (self.connection)
            .ensure_topics_with(&[&self.topic], 1, &[("cleanup.policy", "compact")])
            .await
    }

    /// Writes `snapshot`'s window images through `producer` (inside its
    /// open transaction) and gives the offsets to commit in the same
    /// transaction: one past each partition's last position, with a pointer
    /// to its image as metadata.
    pub async fn write(
        &self,
        producer: &FutureProducer,
        snapshot: &Snapshot,
    ) -> Result<TopicPartitionList, KafkaError> {
        let token = fastrand::u64(..);
        let headers = OwnedHeaders::new().insert(Header {
            key: TOKEN_HEADER,
            value: Some(format!("{token:016x}").as_bytes()),
        });
        let mut offsets = TopicPartitionList::new();
        let mut written: Vec<(&SourcePosition, Vec<DeliveryFuture>)> = Vec::new();
        for part in &snapshot.partitions {
            let position = &part.position;
            offsets.add_partition_offset(
                &position.topic,
                position.partition,
                Offset::Offset(position.offset + 1),
            )?;
            let Some(image) = &part.window else { continue };
            // An empty image is still one (empty) chunk.
            let chunks = image
                .chunks(CHUNK_BYTES)
                .chain(image.is_empty().then_some(&[][..]));
            let mut deliveries = Vec::new();
            for (index, chunk) in chunks.enumerate() {
                let key = chunk_key(&position.topic, position.partition, index);
                deliveries.push(send(producer, &self.topic, &key, chunk, &headers).await?);
            }
            written.push((position, deliveries));
        }
        for (position, deliveries) in written {
            let chunks = deliveries.len();
            let mut first = None;
            for delivery in deliveries {
                let delivered = match delivery.await {
                    Ok(Ok(delivered)) => delivered,
                    Ok(Err((err, _))) => return Err(err),
                    Err(_canceled) => return Err(KafkaError::Canceled),
                };
                first.get_or_insert((delivered.partition, delivered.offset));
            }
            let Some((partition, first)) = first else {
                continue;
            };
            let pointer = Pointer {
                partition,
                first,
                chunks,
                token,
            };
            if let Some(mut element) = offsets.find_partition(&position.topic, position.partition) {
                element.set_metadata(pointer.format());
            }
        }
        Ok(offsets)
    }
}

/// Produces one chunk, waiting while the producer's queue is full.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    chunk: &[u8],
    headers: &OwnedHeaders,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(chunk)
            .headers(headers.clone());
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((err, _)) => return Err(err),
        }
    }
}

fn chunk_key(topic: &str, partition: i32, index: usize) -> String {
    format!("{topic}/{partition}/{index}")
}

/// Claims source partitions of an exactly-once pipeline: reads each one's
/// committed offset and, through its pointer, its window image. Fencing is
/// the transaction's (a worker that lost a partition cannot commit its
/// offsets any more), so claiming writes nothing.
pub struct ChangelogClaimer {
    changelog: Changelog,
}

impl ChangelogClaimer {
    /// Claims with the state kept in `changelog`.
    pub fn new(changelog: Changelog) -> Self {
        ChangelogClaimer { changelog }
    }

    fn read(&self, partitions: &[(String, i32)]) -> Result<Vec<PartitionState>, String> {
        let changelog = &self.changelog;
        let text = |err: KafkaError| err.to_string();
        // Read committed: the group's offsets are fetched as stable (a
        // transaction still committing them is waited for). The state is
        // read uncommitted (see the top of this module).
        let client = |isolation: &str| -> Result<BaseConsumer, String> {
            (changelog.connection)
                .client_config(&[
                    ("group.id", &changelog.group),
                    ("enable.auto.commit", "false"),
                    ("enable.partition.eof", "true"),
                    ("isolation.level", isolation),
                ])
                .create()
                .map_err(text)
        };
        let group = client("read_committed")?;
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        let committed = (group.committed_offsets(list, Duration::from_secs(30))).map_err(text)?;
        drop(group);
        let mut states = Vec::new();
        let mut pointers: Vec<(usize, Pointer)> = Vec::new();
        for element in committed.elements() {
            let Offset::Offset(next) = element.offset() else {
                continue;
            };
            if next <= 0 {
                continue;
            }
            if let Some(pointer) = Pointer::parse(element.metadata()) {
                pointers.push((states.len(), pointer));
            }
            states.push(PartitionState {
                position: SourcePosition {
                    topic: element.topic().into(),
                    partition: element.partition(),
                    offset: next - 1,
                },
                window: None,
            });
        }
        if pointers.is_empty() {
            return Ok(states);
        }
        // What each pointer still waits for: its chunks, by index.
        let mut wanted: HashMap<String, (usize, Pointer)> = HashMap::new();
        let mut images: Vec<Vec<Option<Vec<u8>>>> = vec![Vec::new(); states.len()];
        for &(at, pointer) in &pointers {
            let position = &states[at].position;
            images[at] = vec![None; pointer.chunks];
            for index in 0..pointer.chunks {
                let key = chunk_key(&position.topic, position.partition, index);
                wanted.insert(key, (at, pointer));
            }
        }
        // Each changelog partition from the first chunk pointed into it.
        let mut starts: HashMap<i32, i64> = HashMap::new();
        for (_, pointer) in &pointers {
            let start = starts.entry(pointer.partition).or_insert(pointer.first);
            *start = (*start).min(pointer.first);
        }
        let consumer = client("read_uncommitted")?;
        let mut assignment = TopicPartitionList::new();
        for (partition, first) in starts {
            (assignment.add_partition_offset(&changelog.topic, partition, Offset::Offset(first)))
                .map_err(text)?;
        }
        consumer.assign(&assignment).map_err(text)?;
        let deadline = Instant::now() + READ_LIMIT;
        while !wanted.is_empty() {
            if Instant::now() > deadline {
                return Err(missing(&wanted, "was not read within 60 s"));
            }
            let message = match consumer.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    return Err(missing(&wanted, "is not there (deleted?)"));
                }
                Some(Err(err)) => return Err(err.to_string()),
                Some(Ok(message)) => message,
            };
            let key = String::from_utf8_lossy(message.key().unwrap_or_default());
            let Some(&(at, pointer)) = wanted.get(&*key) else {
                continue;
            };
            let token = (message.headers())
                .and_then(|headers| headers.iter().find(|h| h.key == TOKEN_HEADER))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| u64::from_str_radix(v, 16).ok());
            if message.offset() < pointer.first || token != Some(pointer.token) {
                continue;
            }
            let index = key.rsplit('/').next().and_then(|i| i.parse::<usize>().ok());
            if let Some(index) = index.filter(|i| *i < pointer.chunks) {
                images[at][index] = Some(message.payload().unwrap_or_default().to_vec());
                wanted.remove(&*key);
            }
        }
        for (state, chunks) in states.iter_mut().zip(images) {
            if !chunks.is_empty() {
                state.window = Some(chunks.into_iter().flatten().flatten().collect());
            }
        }
        Ok(states)
    }
}

/// The error for state a pointer names but the changelog does not give.
fn missing(wanted: &HashMap<String, (usize, Pointer)>, why: &str) -> String {
    let mut keys: Vec<&String> = wanted.keys().collect();
    keys.sort();
    let (first, pointer) = keys
        .first()
        .map_or(("", None), |k| (k.as_str(), wanted.get(*k)));
    format!(
        "the window state a committed offset points at {why}: {} chunk(s) missing, the first \
         `{first}` of the checkpoint at offset {}",
        keys.len(),
        pointer.map_or(-1, |(_, p)| p.first)
    )
}

impl Claimer for ChangelogClaimer {
    fn claim(&self, partitions: &[(String, i32)]) -> Result<Vec<PartitionState>, String> {
        self.read(partitions).map_err(|err| {
            format!(
                "reading the committed offsets of group `{}` and their window state in `{}`: {err}",
                self.changelog.group, self.changelog.topic
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_reads_back_as_written_and_other_metadata_is_none() {
        let pointer = Pointer {
            partition: 0,
            first: 12_345,
            chunks: 3,
            token: 0xfeed_0000_beef,
        };
        assert_eq!(Pointer::parse(&pointer.format()), Some(pointer));
        assert_eq!(Pointer::parse(""), None);
        assert_eq!(Pointer::parse("weir-state/1 0 1"), None);
        assert_eq!(Pointer::parse("someone else's note"), None);
        assert_eq!(Pointer::parse(&(pointer.format() + " extra")), None);
    }
}
