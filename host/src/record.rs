//! The record as the host carries it between sources, plugins and sinks.
//!
//! Keys and values are [`Bytes`]: the outputs of a plugin call are slices of
//! the one reply buffer, so decoding a batch allocates once, not per record.

use std::sync::Arc;

use bytes::Bytes;

/// Where a record came from. Plugins see it read-only; it travels with every
/// output derived from the record, for dead-letter headers and offset commits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourcePosition {
    /// Kafka topic, file path or generator name.
    pub topic: Arc<str>,
    /// Partition (0 for files and generators).
    pub partition: i32,
    /// Offset (line number for files, sequence number for generators).
    pub offset: i64,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// Event time, ms since the Unix epoch.
    pub timestamp: Option<i64>,
    /// Where it came from.
    pub source: SourcePosition,
    /// The named output a plugin routed it to; `None` for the default.
    pub route: Option<Arc<str>>,
    /// A Kafka message with no value at all (a tombstone: "delete this key"
    /// in a compacted topic), not an empty one. Kept while the value stays
    /// empty, so a forwarding chain writes a tombstone to a Kafka sink.
    pub tombstone: bool,
}

impl Record {
    /// A record with this value from `source`, and nothing else.
    pub fn new(value: impl Into<Bytes>, source: SourcePosition) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp: None,
            source,
            route: None,
            tombstone: false,
        }
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The route name as sinks match it: `default` when unset.
    pub fn route_name(&self) -> &str {
        self.route.as_deref().unwrap_or(DEFAULT_ROUTE)
    }
}

/// The route of records no plugin routed elsewhere.
pub const DEFAULT_ROUTE: &str = "default";
