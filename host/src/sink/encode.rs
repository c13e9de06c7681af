//! How line-oriented sinks (stdout, files) write a record.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::config::RecordFormat;
use crate::record::Record;

/// Appends `record` to `out` in `format`, ending with a newline.
pub fn encode(record: &Record, format: RecordFormat, out: &mut Vec<u8>) {
    match format {
        RecordFormat::Value => out.extend_from_slice(&record.value),
        RecordFormat::Envelope => {
            let envelope = Envelope {
                key: record.key.as_deref().map(String::from_utf8_lossy),
                value: Payload::of(&record.value),
                headers: record
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value)))
                    .collect(),
                timestamp: record.timestamp,
                topic: &record.source.topic,
                partition: record.source.partition,
                offset: record.source.offset,
                route: record.route_name(),
            };
            // Serialising borrowed strings and numbers into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &envelope);
        }
    }
    out.push(b'\n');
}

/// Why `format` cannot write `record` on one line of `sink`, if it cannot: a
/// value holding a line break would read back as two records. Envelopes
/// escape them.
pub fn refuse_line_breaks(record: &Record, format: RecordFormat, sink: &str) -> Option<String> {
    if format != RecordFormat::Value || !record.value.iter().any(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    Some(format!(
        "the value holds a line break, and {sink} writes one value per line: it would read \
         back as two records (`format = \"envelope\"` escapes it)"
    ))
}

/// A record as one JSON object, keeping everything a reader needs to replay
/// or diagnose it.
#[derive(Serialize)]
struct Envelope<'a> {
    key: Option<std::borrow::Cow<'a, str>>,
    value: Payload<'a>,
    headers: std::collections::BTreeMap<&'a str, std::borrow::Cow<'a, str>>,
    timestamp: Option<i64>,
    topic: &'a str,
    partition: i32,
    offset: i64,
    route: &'a str,
}

/// A value embedded as JSON when it is JSON, else as a string.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload<'a> {
    Json(&'a RawValue),
    Text(std::borrow::Cow<'a, str>),
}

impl<'a> Payload<'a> {
    fn of(value: &'a [u8]) -> Self {
        std::str::from_utf8(value)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .map_or_else(
                || Payload::Text(String::from_utf8_lossy(value)),
                Payload::Json,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourcePosition;

    fn record(value: &'static [u8]) -> Record {
        let mut record = Record::new(
            value,
            SourcePosition {
                topic: "in.jsonl".into(),
                partition: 0,
                offset: 7,
            },
        );
        record
            .headers
            .push(("weir.error.reason".into(), "bad".into()));
        record
    }

    #[test]
    fn envelope_embeds_json_values_and_quotes_the_rest() {
        let mut out = Vec::new();
        encode(&record(br#"{"a":1}"#), RecordFormat::Envelope, &mut out);
        encode(&record(b"{not json"), RecordFormat::Envelope, &mut out);
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["value"]["a"], 1);
        assert_eq!(lines[1]["value"], "{not json");
        assert_eq!(lines[1]["offset"], 7);
        assert_eq!(lines[1]["headers"]["weir.error.reason"], "bad");
    }

    #[test]
    fn value_format_writes_the_value_alone() {
        let mut out = Vec::new();
        encode(&record(b"hello"), RecordFormat::Value, &mut out);
        assert_eq!(out, b"hello\n");
    }
}
