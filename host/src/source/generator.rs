//! A seeded generator of realistic events, keyed by user: click-stream,
//! payment transactions or application logs. The same seed gives the same
//! events, byte for byte, so tests and benchmarks can know what to expect.
//!
//! On request (`malformed`), a share of events is cut short so that it is
//! not valid JSON, to exercise dead-letter handling downstream.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::time::Instant;

use super::{Source, SourceBatch, SourceError, position};
use crate::config::BatchConfig;
use weir_guest::abi::RecordParts;

/// Which events to generate.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Page views, clicks, cart adds and purchases.
    Clickstream,
    /// Card payments with amounts, merchants, emails and card numbers.
    Payments,
    /// Application log lines from a handful of services.
    Logs,
}

impl EventKind {
    /// The kind's name, as in the config.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Clickstream => "clickstream",
            EventKind::Payments => "payments",
            EventKind::Logs => "logs",
        }
    }
}

/// The `generator` source's settings.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Which events.
    pub kind: EventKind,
    /// How many events before the run ends; unbounded when absent.
    pub count: Option<u64>,
    /// Events per second; as fast as possible when absent.
    pub rate: Option<f64>,
    /// The seed: same seed, same events.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// How many distinct users events are spread over.
    #[serde(default = "default_users")]
    pub users: u32,
    /// Share of events (0.0–1.0) deliberately cut short into invalid JSON.
    #[serde(default)]
    pub malformed: f64,
    /// Event time of the first event, ms since the epoch; the wall clock at
    /// start when absent. Events then advance 1–250 ms each. (A fixed time
    /// far in the past makes Kafka expire the records at once: retention
    /// goes by record time.)
    pub start_ms: Option<i64>,
}

fn default_seed() -> u64 {
    42
}

fn default_users() -> u32 {
    1000
}

impl GeneratorConfig {
    /// Slowest `rate`: one event every 1,000 s.
    const MIN_RATE: f64 = 0.001;
    /// Fastest `rate`: a billion events per second (unthrottled, in effect).
    const MAX_RATE: f64 = 1e9;

    /// What is wrong with the settings, naming the key and its value.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.malformed) {
            return Err(format!(
                "generator `malformed` must be within 0.0..=1.0, not {}",
                self.malformed
            ));
        }
        if let Some(rate) = self.rate
            && !(Self::MIN_RATE..=Self::MAX_RATE).contains(&rate)
        {
            return Err(format!(
                "generator `rate` is {rate:e}; it must be between {} and {} events per second",
                Self::MIN_RATE,
                Self::MAX_RATE
            ));
        }
        if self.users == 0 {
            return Err("generator `users` must be at least 1".into());
        }
        Ok(())
    }
}

/// One generated event.
pub struct Event {
    /// The user it belongs to, `user-N`.
    pub key: String,
    /// The JSON document (or, when malformed, a cut-short one).
    pub value: String,
    /// Event time, ms since the epoch.
    pub timestamp: i64,
}

/// Produces events from a seed; pure and synchronous.
pub struct EventGenerator {
    config: GeneratorConfig,
    rng: fastrand::Rng,
    sequence: u64,
    malformed: u64,
    clock_ms: i64,
}

impl EventGenerator {
    /// Starts the sequence for `config`.
    pub fn new(config: GeneratorConfig) -> Self {
        EventGenerator {
            clock_ms: config.start_ms.unwrap_or_else(now_ms),
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            sequence: 0,
            malformed: 0,
        }
    }

    /// How many events have been produced.
    pub fn produced(&self) -> u64 {
        self.sequence
    }

    /// How many of them were deliberately malformed.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Whether a bounded generator has produced all its events.
    pub fn is_done(&self) -> bool {
        self.config
            .count
            .is_some_and(|count| self.sequence >= count)
    }

    /// The next event.
    pub fn next_event(&mut self) -> Event {
        let rng = &mut self.rng;
        self.sequence += 1;
        self.clock_ms += rng.i64(1..250);
        let user = rng.u32(0..self.config.users);
        let key = format!("user-{user}");
        let ts = self.clock_ms;
        let id = self.sequence;
        let mut value = match self.config.kind {
            EventKind::Clickstream => clickstream(rng, id, &key, ts),
            EventKind::Payments => payment(rng, id, user, &key, ts),
            EventKind::Logs => log_line(rng, &key, ts),
        };
        if self.config.malformed > 0.0 && rng.f64() < self.config.malformed {
            // Cut inside the document: what remains never parses.
            let cut = rng.usize(1..value.len() / 2);
            value.truncate(cut);
            self.malformed += 1;
        }
        Event {
            key,
            value,
            timestamp: ts,
        }
    }
}

fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map_or(0, |d| d.as_millis() as i64)
}

const PAGES: &[&str] = &[
    "/",
    "/search",
    "/products",
    "/cart",
    "/checkout",
    "/account",
    "/help",
];
const ACTIONS: &[&str] = &[
    "view",
    "view",
    "view",
    "click",
    "click",
    "add_to_cart",
    "purchase",
];
const DEVICES: &[&str] = &["mobile", "desktop", "tablet"];
const COUNTRIES: &[&str] = &["DE", "FR", "GB", "US", "IN", "BR", "JP", "NL"];
const CURRENCIES: &[&str] = &["EUR", "EUR", "USD", "GBP", "INR"];
const MERCHANTS: &[&str] = &[
    "Bookshop",
    "GroceryHub",
    "StreamFlix",
    "CityCabs",
    "ElectroMart",
    "CafeCorner",
];
const SERVICES: &[&str] = &["checkout", "search", "auth", "inventory", "gateway"];

fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(0..items.len())]
}

fn clickstream(rng: &mut fastrand::Rng, id: u64, user: &str, ts: i64) -> String {
    let page = pick(rng, PAGES);
    let product = rng.u32(1..5000);
    format!(
        r#"{{"event_id":"c-{id}","user_id":"{user}","session_id":"s-{session}","ts":{ts},"action":"{action}","page":"{page}","product_id":{product},"device":"{device}","country":"{country}"}}"#,
        session = rng.u32(1..100_000),
        action = pick(rng, ACTIONS),
        device = pick(rng, DEVICES),
        country = pick(rng, COUNTRIES),
    )
}

fn payment(rng: &mut fastrand::Rng, id: u64, user_number: u32, user: &str, ts: i64) -> String {
    // Amounts skew small, with a long tail, like real card traffic.
    let amount = (rng.f64().powi(3) * 1500.0 + 0.5) * 100.0;
    let amount = amount.round() / 100.0;
    let mut card = String::with_capacity(19);
    for group in 0..4 {
        if group > 0 {
            card.push(' ');
        }
        let digits = if group == 0 {
            4000 + rng.u32(0..1000)
        } else {
            rng.u32(0..10_000)
        };
        let _ = write!(card, "{digits:04}");
    }
    format!(
        r#"{{"txn_id":"t-{id}","user_id":"{user}","ts":{ts},"amount":{amount:.2},"currency":"{currency}","merchant":"{merchant}","email":"customer{user_number}@example.com","card_number":"{card}","country":"{country}","status":"{status}"}}"#,
        currency = pick(rng, CURRENCIES),
        merchant = pick(rng, MERCHANTS),
        country = pick(rng, COUNTRIES),
        status = if rng.u8(0..100) < 97 {
            "approved"
        } else {
            "declined"
        },
    )
}

fn log_line(rng: &mut fastrand::Rng, user: &str, ts: i64) -> String {
    let roll = rng.u8(0..100);
    let (level, status, message) = match roll {
        0..=59 => ("INFO", 200, "request served"),
        60..=79 => ("DEBUG", 200, "cache lookup"),
        80..=93 => ("WARN", 429, "rate limit close"),
        _ => ("ERROR", 500, "upstream timed out"),
    };
    format!(
        r#"{{"ts":{ts},"level":"{level}","service":"{service}","user_id":"{user}","status":{status},"latency_ms":{latency},"message":"{message}"}}"#,
        service = pick(rng, SERVICES),
        latency = rng.u32(1..2000),
    )
}

/// The `generator` source: events from an [`EventGenerator`], paced at
/// `rate` if one is set.
pub struct Generator {
    events: EventGenerator,
    topic: Arc<str>,
    max_records: usize,
    linger: Duration,
    started: Instant,
}

impl Generator {
    /// A generator source for `config`.
    pub fn new(config: GeneratorConfig, batch: &BatchConfig) -> Self {
        Generator {
            topic: format!("generator:{}", config.kind.name()).into(),
            events: EventGenerator::new(config),
            max_records: batch.max_records,
            linger: batch.linger(),
            started: Instant::now(),
        }
    }

    /// When the next event is due under the configured rate.
    fn due(&self) -> Option<Instant> {
        let rate = self.events.config.rate?;
        let due = Duration::try_from_secs_f64(self.events.produced() as f64 / rate)
            .unwrap_or(Duration::MAX);
        self.started.checked_add(due)
    }
}

#[async_trait]
impl Source for Generator {
    async fn next_batch(&mut self) -> Result<Option<SourceBatch>, SourceError> {
        if self.events.is_done() {
            return Ok(None);
        }
        let mut batch = SourceBatch::default();
        let mut last = None;
        let cut_at = Instant::now() + self.linger;
        while batch.records.len() < self.max_records && !self.events.is_done() {
            if let Some(due) = self.due() {
                if !batch.records.is_empty() && due > cut_at {
                    break;
                }
                tokio::time::sleep_until(due).await;
            }
            let event = self.events.next_event();
            let offset = self.events.produced() as i64 - 1;
            last = Some(offset);
            batch.records.push(
                RecordParts {
                    key: Some(event.key.as_bytes()),
                    value: event.value.as_bytes(),
                    timestamp: Some(event.timestamp),
                    topic: &self.topic,
                    partition: 0,
                    offset,
                },
                std::iter::empty(),
            );
        }
        if let Some(offset) = last {
            batch.checkpoint.advance(&position(&self.topic, 0, offset));
        }
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kind: EventKind, malformed: f64) -> GeneratorConfig {
        GeneratorConfig {
            kind,
            count: Some(500),
            rate: None,
            seed: 7,
            users: 50,
            malformed,
            start_ms: Some(1_767_225_600_000),
        }
    }

    #[test]
    fn same_seed_same_events_and_all_valid_json() {
        for kind in [EventKind::Clickstream, EventKind::Payments, EventKind::Logs] {
            let mut a = EventGenerator::new(config(kind, 0.0));
            let mut b = EventGenerator::new(config(kind, 0.0));
            while !a.is_done() {
                let (x, y) = (a.next_event(), b.next_event());
                assert_eq!(x.value, y.value);
                let doc: serde_json::Value = serde_json::from_str(&x.value).unwrap();
                assert_eq!(
                    doc.get("user_id").and_then(|u| u.as_str()),
                    Some(x.key.as_str()),
                    "{kind:?} keyed by user"
                );
            }
            assert_eq!(a.produced(), 500);
        }
    }

    #[test]
    fn malformed_share_is_invalid_json_and_roughly_as_asked() {
        let mut events = EventGenerator::new(config(EventKind::Payments, 0.1));
        let mut bad = 0;
        while !events.is_done() {
            if serde_json::from_str::<serde_json::Value>(&events.next_event().value).is_err() {
                bad += 1;
            }
        }
        assert!((20..=80).contains(&bad), "{bad} of 500 malformed at 10%");
    }
}
