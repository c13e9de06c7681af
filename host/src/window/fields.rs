//! Reading a window's inputs out of records: each record's key, event time
//! and the argument of each aggregate, from the raw JSON of its value (no
//! tree is built; the scan stops once the fields it needs are found), with
//! numbers parsed once.
//!
//! The pipeline's lanes read their batches in parallel, so the window
//! itself (one per pipeline, in source order) only groups and adds. A
//! record the window cannot use is found here, with the reason.

use std::hash::BuildHasher as _;

use super::aggregate::{Arg, Span};
use super::config::{AggregateFn, WindowSpec};
use crate::batch::{Batch, RecordRef};

/// Hashes keys: fast, and seeded per process.
pub type KeyHasher = hashbrown::DefaultHashBuilder;

/// Reads the fields a window needs; one per lane (cheap to clone: clones
/// hash keys alike).
#[derive(Debug, Clone)]
pub struct FieldReader {
    hasher: KeyHasher,
    /// The JSON fields read from each value, without repeats.
    fields: Vec<String>,
    /// Where the key and the time are in `fields`.
    key_field: Option<usize>,
    time_field: Option<usize>,
    /// Each aggregate's function, its field's place in `fields`, its name.
    aggregates: Vec<(AggregateFn, Option<usize>, String)>,
}

/// What a window reads of one record: all it needs but the record's
/// source (and, for plugin aggregates, the record itself). Spans are of
/// the batch's packed bytes ([`Batch::wire`]).
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Its event time (ms).
    pub time: i64,
    /// Its key: a JSON field's raw text, or the record key.
    pub key: Span,
    /// The key's hash, by [`FieldReader::hash`]'s hasher.
    pub hash: u64,
    /// The key in line, if short.
    pub short: ShortKey,
    /// Its offset in its partition.
    pub offset: i64,
    /// It comes from the same topic and partition as the record read
    /// before it in its batch (the last that the window can use).
    pub same_source: bool,
}

/// What a window read of a batch: per record its row (or why it has
/// none) and its aggregates' arguments.
#[derive(Debug, Default)]
pub struct ReadBatch {
    rows: Vec<Result<Row, String>>,
    /// `aggregates` arguments per record, record after record.
    args: Vec<Arg>,
    aggregates: usize,
}

/// A key of at most [`ShortKey::MAX`] bytes in line, zero-padded (most
/// keys are that short), so that the window compares keys as a whole,
/// with no pointer to follow; or the mark of a longer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortKey {
    bytes: [u8; ShortKey::MAX],
    len: u8,
}

impl ShortKey {
    /// The longest key held in line.
    pub const MAX: usize = 23;
    const LONG: u8 = u8::MAX;

    /// The key at `span` of `bytes`, in line, or the mark of a longer key.
    /// Copied as a whole when `bytes` goes on far enough past its start:
    /// a copy of the key's own length, then a read of the whole, would
    /// stall the processor (a store that cannot be forwarded).
    #[inline]
    pub fn at(bytes: &[u8], span: Span) -> Self {
        let (from, key) = (span.from(), span.of(bytes));
        match bytes.get(from..from + Self::MAX) {
            Some(window) if key.len() <= Self::MAX => {
                let mut padded = [0; Self::MAX];
                padded.copy_from_slice(window);
                for (at, byte) in padded.iter_mut().enumerate() {
                    if at >= key.len() {
                        *byte = 0;
                    }
                }
                ShortKey {
                    bytes: padded,
                    len: key.len() as u8,
                }
            }
            _ => Self::new(key),
        }
    }

    /// `key` in line, or the mark of a longer key.
    #[inline]
    pub fn new(key: &[u8]) -> Self {
        let mut bytes = [0; Self::MAX];
        match bytes.get_mut(..key.len()) {
            Some(prefix) => {
                prefix.copy_from_slice(key);
                ShortKey {
                    bytes,
                    len: key.len() as u8,
                }
            }
            None => ShortKey {
                bytes,
                len: Self::LONG,
            },
        }
    }

    /// The key, if it is short.
    #[inline]
    pub fn get(&self) -> Option<&[u8]> {
        self.bytes.get(..usize::from(self.len))
    }
}

impl ReadBatch {
    /// Record `at`'s row and arguments, or why the window cannot use it.
    #[inline]
    pub fn get(&self, at: usize) -> Result<(Row, &[Arg]), &str> {
        match &self.rows[at] {
            Ok(row) => Ok((*row, &self.args[at * self.aggregates..][..self.aggregates])),
            Err(reason) => Err(reason),
        }
    }

    /// How many records it read.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it read none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl FieldReader {
    /// The reader of `spec`'s key, time and aggregate fields.
    pub fn new(spec: &WindowSpec) -> Self {
        let mut fields: Vec<String> = Vec::new();
        let mut index_of = |name: &str| match fields.iter().position(|f| f == name) {
            Some(at) => at,
            None => {
                fields.push(name.to_owned());
                fields.len() - 1
            }
        };
        let time_field = spec.time.as_deref().map(&mut index_of);
        let key_field = spec.key.as_deref().map(&mut index_of);
        let aggregates = (spec.aggregates.iter())
            .map(|a| {
                let field = a.field.as_deref().map(&mut index_of);
                (a.function, field, a.name.clone())
            })
            .collect();
        FieldReader {
            hasher: KeyHasher::default(),
            fields,
            key_field,
            time_field,
            aggregates,
        }
    }

    /// The hash of a key, as rows carry it.
    #[inline]
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Reads every record of `batch`.
    pub fn read(&self, batch: &Batch) -> ReadBatch {
        self.read_all(batch, false)
            .unwrap_or_else(|| unreachable!("a read that does not check fails no batch"))
    }

    /// Reads every record of `batch` if every value is one well-formed
    /// JSON object (each is scanned to its end): what `format = "json"`
    /// checks, in the same pass. `None` if one is not: check the batch
    /// apart, then [`FieldReader::read`] it.
    pub fn read_checked(&self, batch: &Batch) -> Option<ReadBatch> {
        self.read_all(batch, true)
    }

    fn read_all(&self, batch: &Batch, check: bool) -> Option<ReadBatch> {
        let mut read = ReadBatch {
            rows: Vec::with_capacity(batch.len()),
            args: Vec::with_capacity(batch.len() * self.aggregates.len()),
            aggregates: self.aggregates.len(),
        };
        let mut found = vec![None; self.fields.len()];
        let mut source: Option<(&[u8], i32)> = None;
        for at in 0..batch.len() {
            let record = batch.get(at);
            let row = self.read_one(record, batch.wire(), check, &mut found, &mut read.args);
            if check && row.is_err() {
                return None;
            }
            let row = row.map(|mut row| {
                let this = (record.topic_bytes(), record.partition());
                row.same_source = source == Some(this);
                source = Some(this);
                row
            });
            if row.is_err() {
                // Arguments keep their stride whatever failed.
                let kept = read.rows.len() * self.aggregates.len();
                read.args.truncate(kept);
                read.args.resize(kept + self.aggregates.len(), Arg::Absent);
            }
            read.rows.push(row);
        }
        Some(read)
    }

    #[inline]
    fn read_one(
        &self,
        record: RecordRef<'_>,
        wire: &[u8],
        to_end: bool,
        found: &mut [Option<Span>],
        args: &mut Vec<Arg>,
    ) -> Result<Row, String> {
        let value = record.value();
        let base = wire.as_ptr() as usize;
        // Spans are of the batch's bytes; found ones of the value first.
        let value_at = value.as_ptr() as usize - base;
        if !self.fields.is_empty() || to_end {
            find_fields(&self.fields, value, to_end, found)?;
        }
        let time = match self.time_field {
            Some(at) => parse_time(found[at].map(|span| span.of(value)), &self.fields[at])?,
            None => record.timestamp().ok_or(
                "window: the record has no timestamp (set `time` to read the event time from a JSON field)",
            )?,
        };
        let (key, key_bytes) = match self.key_field {
            Some(at) => {
                let span = found[at].ok_or_else(|| {
                    format!(
                        "window: the value has no `{}` field to group by",
                        self.fields[at]
                    )
                })?;
                (span.shifted(value_at), span.of(value))
            }
            None => {
                let key = record.key().unwrap_or_default();
                let at = key.as_ptr() as usize - base;
                (Span::new(at, at + key.len()), key)
            }
        };
        for (function, field, name) in &self.aggregates {
            let span = field.and_then(|at| found[at]);
            let raw = span.map(|span| span.of(value));
            let span = span.unwrap_or(Span::new(0, 0)).shifted(value_at);
            let arg = Arg::read(*function, raw, span).map_err(|why| {
                let field = field.map_or("", |at| self.fields[at].as_str());
                format!("window: field `{field}` {why} (aggregate `{name}`)")
            })?;
            args.push(arg);
        }
        Ok(Row {
            time,
            hash: self.hash(key_bytes),
            short: ShortKey::at(wire, key),
            key,
            offset: record.offset(),
            same_source: false,
        })
    }
}

/// Finds `fields` in a JSON object: each one's byte range in `value`.
/// Stops once all are found, unless `to_end`: then the whole object is
/// scanned (and so checked).
#[inline]
fn find_fields(
    fields: &[String],
    value: &[u8],
    to_end: bool,
    found: &mut [Option<Span>],
) -> Result<(), String> {
    found.fill(None);
    let mut missing = fields.len();
    let base = value.as_ptr() as usize;
    for field in weir_guest::json::fields(value) {
        let (name, raw) =
            field.map_err(|err| format!("window: the value is not a JSON object: {err}"))?;
        for (at, wanted) in fields.iter().enumerate() {
            if found[at].is_none() && name.is(wanted) {
                let from = raw.as_ptr() as usize - base;
                found[at] = Some(Span::new(from, from + raw.len()));
                missing -= 1;
                break;
            }
        }
        if missing == 0 && !to_end {
            break;
        }
    }
    Ok(())
}

/// An event time in epoch milliseconds from a JSON number.
#[inline]
fn parse_time(raw: Option<&[u8]>, field: &str) -> Result<i64, String> {
    let raw =
        raw.ok_or_else(|| format!("window: the value has no `{field}` field (the event time)"))?;
    let integer = match raw {
        [b'-', digits @ ..] => digits_value(digits).map(|v| -v),
        digits => digits_value(digits),
    };
    if let Some(time) = integer {
        return Ok(time);
    }
    match weir_guest::json::number(raw) {
        Some(ms) if ms.is_finite() && ms.abs() < 9.0e15 => Ok(ms.floor() as i64),
        _ => Err(format!(
            "window: `{field}` is {}, not an event time in epoch milliseconds",
            String::from_utf8_lossy(raw)
        )),
    }
}

#[inline]
fn digits_value(digits: &[u8]) -> Option<i64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(digit - b'0');
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::windows::spec_for;
    use crate::window::WindowKind;

    fn batch(values: &[&str]) -> Batch {
        let mut batch = Batch::new();
        for (offset, value) in values.iter().enumerate() {
            batch.push_value(value.as_bytes(), "in", 0, offset as i64);
        }
        batch
    }

    #[test]
    fn a_checked_read_is_the_plain_read_of_well_formed_objects_only() {
        let reader = FieldReader::new(&spec_for(
            WindowKind::Tumbling { size: 10 },
            0,
            0,
            Vec::new(),
        ));
        let good = batch(&[
            r#"{"ts":1,"k":"a","rest":[1,{"x":null}]}"#,
            r#"{"k":"b","ts":2}"#,
        ]);
        let (checked, plain) = (reader.read_checked(&good).unwrap(), reader.read(&good));
        for at in 0..2 {
            let (checked, plain) = (checked.get(at).unwrap().0, plain.get(at).unwrap().0);
            assert_eq!((checked.time, checked.hash), (plain.time, plain.hash));
        }
        // Broken after the fields the window needs, or JSON but not an
        // object: the batch is checked apart, then read.
        for broken in [
            r#"{"ts":1,"k":"a","rest":[1,}"#,
            r#"{"ts":1,"k":"a"} x"#,
            "[1, 2]",
        ] {
            let batch = batch(&[r#"{"ts":1,"k":"a"}"#, broken]);
            assert!(reader.read_checked(&batch).is_none(), "{broken}");
        }
        assert!(
            reader
                .read(&batch(&[r#"{"ts":1,"k":"a","rest":[1,}"#]))
                .get(0)
                .is_ok(),
            "a plain read stops at its fields"
        );
    }

    #[test]
    fn a_key_in_line_is_the_same_however_near_the_end_of_its_bytes() {
        let bytes: Vec<u8> = (0..64).map(|i| b'a' + i % 26).collect();
        for len in 0..=ShortKey::MAX + 1 {
            for from in 0..=bytes.len() - len {
                let span = Span::new(from, from + len);
                let key = &bytes[from..from + len];
                let short = ShortKey::at(&bytes, span);
                assert_eq!(short, ShortKey::new(key), "{len} bytes from {from}");
                match len <= ShortKey::MAX {
                    true => assert_eq!(short.get(), Some(key)),
                    false => assert_eq!(short.get(), None, "too long to hold in line"),
                }
            }
        }
    }
}
