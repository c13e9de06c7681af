//! The `kafka` source: one consumer group per pipeline over several topics,
//! batched by count and linger, committing only what the sinks have
//! acknowledged.

mod config;
mod source;

pub use config::{KafkaSourceConfig, StartFrom};
pub use source::{GroupConsumer, KafkaSource, RebalanceLog, next_offsets};

use std::sync::Arc;

use crate::config::{Delivery, PipelineConfig, SinkConfig};
use crate::kafka::{ChangelogClaimer, KafkaTransaction};
use crate::source::{OpenSource, SourceError};
use crate::state::{Claimer, Claims};

/// What claims the partitions of an exactly-once `pipeline` with a
/// window, whose transactions keep its checkpoints (see
/// [`crate::kafka::changelog`]).
pub fn claimer(config: &KafkaSourceConfig, pipeline: &PipelineConfig) -> Option<Box<dyn Claimer>> {
    let keeps = pipeline.delivery == Delivery::ExactlyOnce && pipeline.window.is_some();
    keeps.then(|| {
        let changelog = config.changelog(pipeline.name.get_ref());
        Box::new(ChangelogClaimer::new(changelog)) as Box<dyn Claimer>
    })
}

/// Names this worker among the workers of one pipeline: static group
/// membership and, for exactly-once, the transactional id.
pub const WORKER_ID_VAR: &str = "WEIR_WORKER_ID";

/// Joins the group of `pipeline`; for exactly-once, also starts the
/// transactional producer its Kafka sinks share, with their `options`.
pub async fn open(
    config: &KafkaSourceConfig,
    pipeline: &PipelineConfig,
    claims: Option<Arc<Claims>>,
) -> Result<OpenSource, SourceError> {
    let name = pipeline.name.get_ref();
    let max_record = pipeline.limits().max_record_bytes;
    // A window waits for partitions with records still to come.
    let backlog = pipeline.window.is_some();
    if pipeline.delivery != Delivery::ExactlyOnce {
        let source = KafkaSource::new(
            config,
            name,
            &pipeline.batch,
            max_record,
            false,
            backlog,
            claims,
        )?;
        return Ok(OpenSource {
            source: Box::new(source),
            transaction: None,
        });
    }
    let transactions = |source: std::io::Error| SourceError::Io {
        what: format!("kafka transactions of pipeline `{name}`"),
        source,
    };
    // Two workers with one transactional id fence each other for ever; a
    // random one would leave a killed worker's transaction open until it
    // times out. The id must be unique per worker and survive restarts.
    let worker = match std::env::var(WORKER_ID_VAR) {
        Ok(worker) if !worker.trim().is_empty() => worker,
        _ => {
            return Err(transactions(std::io::Error::other(format!(
                "`delivery = \"exactly_once\"` needs {WORKER_ID_VAR} set to a name unique to \
                 this worker and the same across its restarts (1, 2, ... or the pod's ordinal): \
                 it makes the transactional id that fences this worker's previous incarnation"
            ))));
        }
    };
    // `check` made every kafka sink agree on the cluster and its options.
    let sinks = pipeline.sinks.iter().chain(&pipeline.dead_letter);
    let connection = sinks
        .filter_map(|sink| match sink.get_ref() {
            SinkConfig::Kafka(kafka) => Some(kafka.connection()),
            _ => None,
        })
        .next()
        .unwrap_or_else(|| config.connection());
    let source = KafkaSource::new(
        config,
        name,
        &pipeline.batch,
        max_record,
        true,
        backlog,
        claims,
    )?;
    let id = format!("{}-{worker}", config.group_for(name));
    let consumer = source.consumer();
    // With a window, checkpoints keep its state in a changelog topic.
    let changelog = pipeline.window.as_ref().map(|_| config.changelog(name));
    if let Some(changelog) = &changelog {
        changelog
            .ensure_topic()
            .await
            .map_err(|err| SourceError::Io {
                what: format!(
                    "window state topic `{}` of pipeline `{name}`",
                    changelog.topic
                ),
                source: std::io::Error::other(err),
            })?;
    }
    let started = tokio::task::spawn_blocking(move || {
        KafkaTransaction::start(&connection, &id, consumer, changelog)
    });
    let transaction = match started.await {
        Ok(started) => started.map_err(|err| transactions(std::io::Error::other(err)))?,
        Err(panic) => std::panic::resume_unwind(panic.into_panic()),
    };
    Ok(OpenSource {
        source: Box::new(source),
        transaction: Some(Arc::new(transaction)),
    })
}
