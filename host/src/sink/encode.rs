//! How line-oriented sinks (stdout, files) write a record.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::batch::RecordRef;
use crate::config::RecordFormat;

/// Appends `record` to `out` in `format`, ending with a newline.
pub fn encode(record: &RecordRef<'_>, format: RecordFormat, out: &mut Vec<u8>) {
    match format {
        RecordFormat::Value => out.extend_from_slice(record.value()),
        RecordFormat::Envelope => {
            let mut headers: BTreeMap<&str, HeaderValues<'_>> = BTreeMap::new();
            for (name, value) in record.headers() {
                let value = Text::of(value);
                match headers.get_mut(name) {
                    Some(HeaderValues::One(first)) => {
                        let first = std::mem::replace(first, Text::Utf8(""));
                        headers.insert(name, HeaderValues::Many(vec![first, value]));
                    }
                    Some(HeaderValues::Many(values)) => values.push(value),
                    None => {
                        headers.insert(name, HeaderValues::One(value));
                    }
                }
            }
            let (value, value_base64) = match Payload::of(record.value()) {
                Some(payload) => (Some(payload), None),
                None => (None, Some(STANDARD.encode(record.value()))),
            };
            let (key, key_base64) = match record.key().map(Text::of) {
                Some(Text::Base64(key)) => (None, Some(key)),
                other => (other, None),
            };
            let envelope = Envelope {
                key,
                key_base64,
                value,
                value_base64,
                tombstone: record.is_tombstone(),
                headers,
                timestamp: record.timestamp(),
                topic: record.topic(),
                partition: record.partition(),
                offset: record.offset(),
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
pub fn refuse_line_breaks(
    record: &RecordRef<'_>,
    format: RecordFormat,
    sink: &str,
) -> Option<String> {
    if format != RecordFormat::Value || memchr::memchr2(b'\n', b'\r', record.value()).is_none() {
        return None;
    }
    Some(format!(
        "the value holds a line break, and {sink} writes one value per line: it would read \
         back as two records (`format = \"envelope\"` escapes it)"
    ))
}

/// A record as one JSON object, keeping everything a reader needs to replay
/// or diagnose it, byte for byte: bytes that are not UTF-8 travel as base64
/// (`key_base64`, `value_base64`, `{"base64": ...}` for a header value), and
/// a header name given more than once maps to the list of its values.
#[derive(Serialize)]
struct Envelope<'a> {
    key: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Payload<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tombstone: bool,
    headers: BTreeMap<&'a str, HeaderValues<'a>>,
    timestamp: Option<i64>,
    topic: &'a str,
    partition: i32,
    offset: i64,
    route: &'a str,
}

/// Bytes as a JSON string when they are UTF-8, else as `{"base64": ...}`.
#[derive(Serialize)]
#[serde(untagged)]
enum Text<'a> {
    Utf8(&'a str),
    Base64(String),
}

impl<'a> Text<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Text::Utf8(text),
            Err(_) => Text::Base64(STANDARD.encode(bytes)),
        }
    }
}

/// One header value, or several for a name given more than once.
#[derive(Serialize)]
#[serde(untagged)]
enum HeaderValues<'a> {
    One(#[serde(serialize_with = "header_value")] Text<'a>),
    Many(#[serde(serialize_with = "header_values")] Vec<Text<'a>>),
}

fn header_value<S: serde::Serializer>(value: &Text<'_>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap as _;
    match value {
        Text::Utf8(text) => s.serialize_str(text),
        Text::Base64(encoded) => {
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry("base64", encoded)?;
            map.end()
        }
    }
}

fn header_values<S: serde::Serializer>(values: &[Text<'_>], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq as _;
    struct One<'b, 'a>(&'b Text<'a>);
    impl Serialize for One<'_, '_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            header_value(self.0, s)
        }
    }
    let mut seq = s.serialize_seq(Some(values.len()))?;
    for value in values {
        seq.serialize_element(&One(value))?;
    }
    seq.end()
}

/// A value embedded as JSON when it is JSON, else as a string.
#[derive(Serialize)]
#[serde(untagged)]
enum Payload<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

impl<'a> Payload<'a> {
    /// `None` when the value is not UTF-8.
    fn of(value: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        Some(match serde_json::from_str::<&RawValue>(text) {
            Ok(json) => Payload::Json(json),
            Err(_) => Payload::Text(text),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::record::{Record, SourcePosition};

    fn encode_all(records: &[Record], format: RecordFormat) -> Vec<u8> {
        let mut out = Vec::new();
        for record in Batch::from(records).iter() {
            encode(&record, format, &mut out);
        }
        out
    }

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
        let out = encode_all(
            &[record(br#"{"a":1}"#), record(b"{not json")],
            RecordFormat::Envelope,
        );
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
    fn envelope_keeps_repeated_headers_binary_bytes_and_tombstones() {
        let mut binary = record(b"\xff\xfe\x00");
        binary.key = Some(bytes::Bytes::from_static(b"\x80k"));
        binary.headers.push(("trace".into(), "a".into()));
        binary
            .headers
            .push(("trace".into(), bytes::Bytes::from_static(b"\xc3")));
        let mut tombstone = record(b"");
        tombstone.tombstone = true;
        let out = encode_all(&[binary, tombstone], RecordFormat::Envelope);
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let decode = |v: &serde_json::Value| STANDARD.decode(v.as_str().unwrap()).unwrap();
        assert_eq!(decode(&lines[0]["value_base64"]), b"\xff\xfe\x00");
        assert!(lines[0].get("value").is_none());
        assert_eq!(decode(&lines[0]["key_base64"]), b"\x80k");
        assert_eq!(lines[0]["headers"]["trace"][0], "a");
        assert_eq!(decode(&lines[0]["headers"]["trace"][1]["base64"]), b"\xc3");
        assert_eq!(lines[1]["tombstone"], true);
        assert_eq!(lines[1]["value"], "");
    }

    #[test]
    fn value_format_writes_the_value_alone() {
        let out = encode_all(&[record(b"hello")], RecordFormat::Value);
        assert_eq!(out, b"hello\n");
    }
}
