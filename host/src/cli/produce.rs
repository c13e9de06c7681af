//! `weir produce`: the event generator as a Kafka producer, for demos,
//! load and tests. Paced by `--rate`, bounded by `--count`, with progress on
//! a terminal and a final count.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::kafka::KafkaConnection;
use crate::source::generator::{EventGenerator, GeneratorConfig};

/// Deliveries awaited at most at once.
const IN_FLIGHT: usize = 50_000;

/// What `weir produce` was asked for.
pub struct ProduceArgs {
    pub connection: KafkaConnection,
    pub topic: String,
    pub generator: GeneratorConfig,
    pub partitions: i32,
    pub progress: bool,
}

pub fn produce(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    if let Err(message) = args.generator.check() {
        bail!("{message}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    args.connection
        .ensure_topics(&[&args.topic], args.partitions)
        .await
        .with_context(|| {
            format!(
                "cannot create topic `{}` at {}",
                args.topic, args.connection.brokers
            )
        })?;
    let producer: FutureProducer = args
        .connection
        .client_config(KafkaConnection::PRODUCER)
        .create()
        .with_context(|| format!("cannot create a producer for {}", args.connection.brokers))?;
    let kind = args.generator.kind;
    let rate = args.generator.rate;
    let mut events = EventGenerator::new(args.generator);
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());

    while !events.is_done() {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(events.produced() as f64 / rate);
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                _ = &mut stop => break,
            }
        }
        let event = events.next_event();
        let record = FutureRecord::to(&args.topic)
            .key(&event.key)
            .payload(&event.value)
            .timestamp(event.timestamp);
        let delivery = producer
            .send_result(record)
            .map_err(|(err, _)| err)
            .with_context(|| {
                format!(
                    "cannot queue event {} for `{}`",
                    events.produced(),
                    args.topic
                )
            })?;
        in_flight.push_back(delivery);
        if in_flight.len() >= IN_FLIGHT {
            acknowledge(&mut in_flight, IN_FLIGHT / 2, &args.topic).await?;
        }
        if args.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            say!(
                stderr_partial,
                "\r\x1b[2Kproduced {} {} events",
                events.produced(),
                kind.name()
            );
        }
    }
    acknowledge(&mut in_flight, 0, &args.topic).await?;
    if args.progress {
        say!(stderr_partial, "\r\x1b[2K");
    }
    let elapsed = started.elapsed().as_secs_f64();
    say!(
        stdout,
        "produced {} {} events ({} malformed) to `{}` in {:.2} s ({:.0} events/s)",
        events.produced(),
        kind.name(),
        events.malformed(),
        args.topic,
        elapsed,
        events.produced() as f64 / elapsed.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits until at most `keep` deliveries are in flight; a failed delivery
/// (after librdkafka's own retries) is an error.
async fn acknowledge(
    in_flight: &mut VecDeque<DeliveryFuture>,
    keep: usize,
    topic: &str,
) -> anyhow::Result<()> {
    while in_flight.len() > keep {
        let Some(delivery) = in_flight.pop_front() else {
            break;
        };
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => bail!("delivery to `{topic}` failed: {err}"),
            Err(_) => bail!("delivery to `{topic}` was cancelled: the producer shut down"),
        }
    }
    Ok(())
}
