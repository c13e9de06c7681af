//! Produces records and waits for the brokers' acknowledgements on `flush`.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
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
        Ok(Self::with_producer(config, producer))
    }

    /// A sink writing through `producer`: the pipeline's transactional
    /// producer, in exactly-once pipelines.
    pub fn with_producer(config: KafkaSinkConfig, producer: FutureProducer) -> Self {
        KafkaSink {
            producer,
            config,
            in_flight: VecDeque::new(),
        }
    }

    fn topic_for(&self, record: &Record) -> &str {
        self.config
            .route_topics
            .get(record.route_name())
            .unwrap_or(&self.config.topic)
    }

    async fn wait_oldest(&mut self) -> Result<(), SinkError> {
        if let Some(delivery) = self.in_flight.pop_front() {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _message))) => return Err(kafka_error(&self.describe(), err)),
                Err(_canceled) => {
                    return Err(kafka_error(&self.describe(), KafkaError::Canceled));
                }
            }
        }
        Ok(())
    }
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
