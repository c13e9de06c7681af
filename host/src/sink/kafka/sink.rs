//! Produces records and waits for the brokers' acknowledgements on `flush`.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use super::KafkaSinkConfig;
use crate::kafka::{KafkaConnection, to_headers};
use crate::record::Record;
use crate::sink::{Sink, SinkError};

/// Deliveries in flight before `write` waits for the oldest.
const MAX_IN_FLIGHT: usize = 100_000;

/// Writes records to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
    config: KafkaSinkConfig,
    in_flight: VecDeque<DeliveryFuture>,
    /// False for the shared transactional producer of an exactly-once
    /// pipeline, whose failures fail the transaction instead.
    owns_producer: bool,
    replacements: u32,
    replaced_for_current: bool,
}

impl KafkaSink {
    /// An idempotent producer for `config`: retries never duplicate or
    /// reorder a partition's records.
    pub fn new(config: KafkaSinkConfig) -> Result<Self, SinkError> {
        let producer = config
            .connection()
            .client_config(KafkaConnection::PRODUCER)
            .create()
            .map_err(|e| kafka_error(&config.topic, e))?;
        let mut sink = Self::with_producer(config, producer);
        sink.owns_producer = true;
        Ok(sink)
    }

    /// A sink writing through `producer`: the pipeline's transactional
    /// producer, in exactly-once pipelines.
    pub fn with_producer(config: KafkaSinkConfig, producer: FutureProducer) -> Self {
        KafkaSink {
            producer,
            config,
            in_flight: VecDeque::new(),
            owns_producer: false,
            replacements: 0,
            replaced_for_current: false,
        }
    }

    fn topic_for(&self, record: &Record) -> &str {
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
            Ok(Ok(_)) => Ok(()),
            // A message purged from a producer that was replaced (or whose
            // queue was purged) was not delivered: send it again.
            Ok(Err((err, message)))
                if self.owns_producer && (self.producer_lost(&err) || is_purged(&err)) =>
            {
                self.replace_producer(&err)?;
                self.resend(&message)
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

    /// Swaps in a fresh producer. Records not yet acknowledged are sent again
    /// through it (at-least-once: a record may then be written twice).
    fn replace_producer(&mut self, err: &KafkaError) -> Result<(), SinkError> {
        if self.replacements >= MAX_REPLACEMENTS {
            return Err(kafka_error(&self.describe(), err.clone()));
        }
        self.replacements += 1;
        if self.producer.client().fatal_error().is_none() && self.replaced_for_current {
            return Ok(());
        }
        tracing::warn!(sink = %self.describe(), %err, "Producer failed for good; replacing it and resending what was not acknowledged.");
        self.producer = self
            .config
            .connection()
            .client_config(KafkaConnection::PRODUCER)
            .create()
            .map_err(|e| kafka_error(&self.describe(), e))?;
        self.replaced_for_current = true;
        Ok(())
    }

    fn resend(&mut self, message: &OwnedMessage) -> Result<(), SinkError> {
        let mut record =
            FutureRecord::to(message.topic()).payload(message.payload().unwrap_or_default());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(timestamp) = message.timestamp().to_millis() {
            record = record.timestamp(timestamp);
        }
        if let Some(headers) = message.headers() {
            record = record.headers(headers.clone());
        }
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(err, _)| kafka_error(&self.describe(), err))?;
        self.in_flight.push_back(delivery);
        Ok(())
    }
}

/// Whether a delivery failed because its producer's queue was purged.
fn is_purged(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
    )
}

/// How many times one sink replaces a failed producer before giving up.
const MAX_REPLACEMENTS: u32 = 100_000;

fn kafka_error(sink: &str, err: KafkaError) -> SinkError {
    SinkError::Io {
        sink: sink.to_owned(),
        source: std::io::Error::other(err),
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn describe(&self) -> String {
        format!(
            "kafka topic {:?} at {}",
            self.config.topic, self.config.brokers
        )
    }

    async fn write(&mut self, records: &[Record]) -> Result<(), SinkError> {
        for record in records {
            let headers = to_headers(record);
            loop {
                let mut message =
                    FutureRecord::to(self.topic_for(record)).payload(&record.value[..]);
                if let Some(key) = &record.key {
                    message = message.key(&key[..]);
                }
                if let Some(timestamp) = record.timestamp {
                    message = message.timestamp(timestamp);
                }
                if let Some(headers) = &headers {
                    message = message.headers(headers.clone());
                }
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
                        self.replace_producer(&err)?;
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
        // Deliveries not awaited were never acknowledged to the source, so
        // nothing committed depends on them; give them a moment anyway.
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}
