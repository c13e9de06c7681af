//! Produces records and waits for the brokers' acknowledgements on `flush`.

use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _, PurgeConfig};

use super::KafkaSinkConfig;
use crate::batch::{RecordRef, Records};
use crate::kafka::{KafkaConnection, to_headers};
use crate::sink::{Sink, SinkError};

/// Deliveries in flight before `write` waits for the oldest.
const MAX_IN_FLIGHT: usize = 100_000;

/// Writes records to Kafka.
pub struct KafkaSink {
    /// Taken by `drop`, which retires it off the async workers.
    producer: ManuallyDrop<FutureProducer>,
    config: KafkaSinkConfig,
    /// Deliveries not yet acknowledged, oldest first.
    in_flight: VecDeque<DeliveryFuture>,
    /// False for the shared transactional producer of an exactly-once
    /// pipeline, whose failures fail the transaction instead.
    owns_producer: bool,
    /// Producers replaced since the last acknowledged delivery: one outage
    /// costs one or two; a cluster that fails every new producer at once is
    /// an error, not a loop.
    replacements_without_progress: u32,
    /// Producers replaced over the sink's life.
    replaced: u64,
}

/// How many producers in a row may fail before a single delivery succeeds.
const MAX_REPLACEMENTS_WITHOUT_PROGRESS: u32 = 5;

impl KafkaSink {
    /// An idempotent producer for `config`: retries never duplicate or
    /// reorder a partition's records.
    pub fn new(config: KafkaSinkConfig) -> Result<Self, SinkError> {
        let producer = Self::create_producer(&config)?;
        let mut sink = Self::with_producer(config, producer);
        sink.owns_producer = true;
        Ok(sink)
    }

    /// A sink writing through `producer`: the pipeline's transactional
    /// producer, in exactly-once pipelines.
    pub fn with_producer(config: KafkaSinkConfig, producer: FutureProducer) -> Self {
        KafkaSink {
            producer: ManuallyDrop::new(producer),
            config,
            in_flight: VecDeque::new(),
            owns_producer: false,
            replacements_without_progress: 0,
            replaced: 0,
        }
    }

    /// How many times a producer that failed for good was replaced.
    pub fn producers_replaced(&self) -> u64 {
        self.replaced
    }

    fn create_producer(config: &KafkaSinkConfig) -> Result<FutureProducer, SinkError> {
        config
            .connection()
            .client_config(KafkaConnection::PRODUCER)
            .create()
            .map_err(|e| kafka_error(&describe(config), e))
    }

    fn topic_for(&self, record: &RecordRef<'_>) -> &str {
        self.config
            .route_topics
            .get(record.route_name())
            .unwrap_or(&self.config.topic)
    }

    async fn wait_oldest(&mut self) -> Result<(), SinkError> {
        let Some(delivery) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match delivery.await {
            Ok(Ok(_)) => {
                self.replacements_without_progress = 0;
                Ok(())
            }
            // A message purged from its producer's queue, or refused by a
            // producer that can no longer deliver, was not written: it is
            // sent again, in its place, through a new producer.
            Ok(Err((err, message)))
                if self.owns_producer && (self.producer_lost(&err) || is_purged(&err)) =>
            {
                self.replace_producer(&err, vec![message]).await
            }
            Ok(Err((err, _message))) => Err(kafka_error(&self.describe(), err)),
            Err(_canceled) => Err(kafka_error(&self.describe(), KafkaError::Canceled)),
        }
    }

    /// Whether `err` means this idempotent producer can no longer deliver,
    /// though a new one could: a broker that came back without the
    /// producer's sequence state (the test broker, noida-db, after a
    /// restart) makes librdkafka's idempotent producer fail for good.
    fn producer_lost(&self, err: &KafkaError) -> bool {
        use rdkafka::error::RDKafkaErrorCode as Code;
        self.producer.client().fatal_error().is_some()
            || matches!(
                err.rdkafka_error_code(),
                Some(
                    Code::OutOfOrderSequenceNumber
                        | Code::UnknownProducerId
                        | Code::InvalidProducerEpoch
                        | Code::Fatal
                )
            )
    }

    /// Swaps in a fresh producer and sends through it, in their original
    /// order and before anything newer, every message the old one had not
    /// acknowledged: `unacknowledged` (the oldest), then the rest of what
    /// was in flight. Per-partition order holds; a message whose
    /// acknowledgement was lost may be written twice (at-least-once).
    async fn replace_producer(
        &mut self,
        err: &KafkaError,
        mut unacknowledged: Vec<OwnedMessage>,
    ) -> Result<(), SinkError> {
        self.replacements_without_progress += 1;
        self.replaced += 1;
        if self.replacements_without_progress > MAX_REPLACEMENTS_WITHOUT_PROGRESS {
            return Err(SinkError::Io {
                sink: self.describe(),
                source: std::io::Error::other(format!(
                    "{MAX_REPLACEMENTS_WITHOUT_PROGRESS} new producers in a row failed before \
                     delivering anything; last error: {err}"
                )),
            });
        }
        tracing::warn!(sink = %self.describe(), %err, in_flight = self.in_flight.len() + unacknowledged.len(), "Producer failed for good; replacing it and resending what it had not acknowledged.");
        let fresh = Self::create_producer(&self.config)?;
        let old = std::mem::replace(&mut *self.producer, fresh);
        // Everything the old producer still holds comes back as purged.
        old.purge(PurgeConfig::default().queue().inflight());
        for delivery in std::mem::take(&mut self.in_flight) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((_, message))) => unacknowledged.push(message),
                Err(_canceled) => {
                    return Err(kafka_error(&self.describe(), KafkaError::Canceled));
                }
            }
        }
        retire(old, false);
        for message in &unacknowledged {
            self.resend(message).await?;
        }
        Ok(())
    }

    async fn resend(&mut self, message: &OwnedMessage) -> Result<(), SinkError> {
        loop {
            let record = future_record(
                message.topic(),
                message.payload(),
                message.key(),
                message.timestamp().to_millis(),
                message.headers(),
            );
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back(delivery);
                    return Ok(());
                }
                // The new producer's queue holds as many as the old one's, so
                // this is brief; the oldest cannot be awaited here without
                // breaking the order being restored.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((err, _)) => return Err(kafka_error(&self.describe(), err)),
            }
        }
    }
}

/// Drops a producer off the async workers: librdkafka's teardown joins
/// threads and waits for the brokers.
/// `flush` first gives what it holds a few seconds to be delivered.
fn retire(producer: FutureProducer, flush: bool) {
    let finish = move || {
        if flush {
            let _ = producer.flush(Duration::from_secs(5));
        }
        drop(producer);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(finish)),
        Err(_) => finish(),
    }
}

/// Whether a delivery failed because its producer's queue was purged.
fn is_purged(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
    )
}

fn describe(config: &KafkaSinkConfig) -> String {
    format!("kafka topic {:?} at {}", config.topic, config.brokers)
}

fn kafka_error(sink: &str, err: KafkaError) -> SinkError {
    SinkError::Io {
        sink: sink.to_owned(),
        source: std::io::Error::other(err),
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn describe(&self) -> String {
        describe(&self.config)
    }

    async fn write(&mut self, records: Records<'_>) -> Result<(), SinkError> {
        for record in records.iter() {
            let headers = to_headers(&record);
            loop {
                let message = future_record(
                    self.topic_for(&record),
                    (!record.is_tombstone()).then_some(record.value()),
                    record.key(),
                    record.timestamp(),
                    headers.as_ref(),
                );
                match self.producer.send_result(message) {
                    Ok(delivery) => {
                        self.in_flight.push_back(delivery);
                        break;
                    }
                    // The local queue is full: wait for the brokers to catch up.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        if self.in_flight.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        } else {
                            self.wait_oldest().await?;
                        }
                    }
                    Err((err, _)) if self.owns_producer && self.producer_lost(&err) => {
                        self.replace_producer(&err, Vec::new()).await?;
                    }
                    Err((err, _)) => return Err(kafka_error(&self.describe(), err)),
                }
            }
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                self.wait_oldest().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        while !self.in_flight.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // SAFETY: `producer` is not used again: this is the sink's drop.
        let producer = unsafe { ManuallyDrop::take(&mut self.producer) };
        // Deliveries not awaited were never acknowledged to the source, so
        // nothing committed depends on them; they get a moment to land, on a
        // blocking thread like the teardown itself.
        retire(producer, self.owns_producer && !self.in_flight.is_empty());
    }
}

/// One message for the producer; `payload` `None` is a tombstone.
fn future_record<'a>(
    topic: &'a str,
    payload: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    timestamp: Option<i64>,
    headers: Option<&OwnedHeaders>,
) -> FutureRecord<'a, [u8], [u8]> {
    let mut message = FutureRecord::to(topic);
    if let Some(payload) = payload {
        message = message.payload(payload);
    }
    if let Some(key) = key {
        message = message.key(key);
    }
    if let Some(timestamp) = timestamp {
        message = message.timestamp(timestamp);
    }
    if let Some(headers) = headers {
        message = message.headers(headers.clone());
    }
    message
}
