//! Keeps JSON records whose numeric `field` lies within `[min, max]`, and
//! optionally re-serialises only the `project`ed fields.
//!
//! ```toml
//! [[pipeline.plugin]]
//! crate = "plugins/json-filter"
//! config = { field = "amount", min = 100.0, project = ["txn_id", "user_id", "amount"] }
//! ```
//!
//! A record that is not a JSON object, or whose field is missing or not a
//! number, fails (and goes to the dead-letter sink) unless `missing =
//! "drop"`. The record is scanned once without building a tree: only the
//! filtered and projected fields are kept (borrowed), and only the filtered
//! one is read as a number.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

/// Most fields `project` may name: the picked values live on the stack.
const MAX_PROJECT: usize = 16;

/// What to do with a record whose field is missing or not a number.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Send it to the dead-letter sink with the reason.
    #[default]
    Fail,
    /// Drop it quietly (still counted as dropped).
    Drop,
}

/// The plugin's settings.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JsonFilter {
    /// Top-level field holding the number to compare.
    field: String,
    /// Keep records with `field >= min`.
    min: Option<f64>,
    /// Keep records with `field <= max`.
    max: Option<f64>,
    /// Re-serialise kept records with only these fields, in this order.
    #[serde(default)]
    project: Vec<String>,
    /// What to do when `field` is missing or not a number.
    #[serde(default)]
    missing: Missing,
    /// The projection being written, reused from record to record.
    #[serde(skip)]
    scratch: Vec<u8>,
}

/// What [`JsonFilter::apply`] decided for one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Drop the record.
    Drop,
    /// Keep it unchanged.
    Keep,
    /// Keep the projection appended to the output buffer.
    Projected,
}

impl JsonFilter {
    /// Decides on one JSON value; with `project`, appends the projection
    /// to `out`. The same code runs inside the component and natively.
    pub fn apply(&self, value: &[u8], out: &mut Vec<u8>) -> Result<Verdict> {
        let mut picked: [Option<&RawValue>; MAX_PROJECT + 1] = [None; MAX_PROJECT + 1];
        let mut de = serde_json::Deserializer::from_slice(value);
        Picker {
            filter: self,
            picked: &mut picked,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|err| Error::new(format!("not a JSON object: {err}")))?;

        let number = picked[0].and_then(|raw| raw.get().parse::<f64>().ok());
        let Some(number) = number else {
            return match self.missing {
                Missing::Drop => Ok(Verdict::Drop),
                Missing::Fail => Err(Error::new(format!(
                    "field `{}` is missing or not a number",
                    self.field
                ))),
            };
        };
        let keep =
            self.min.is_none_or(|min| number >= min) && self.max.is_none_or(|max| number <= max);
        if !keep {
            return Ok(Verdict::Drop);
        }
        if self.project.is_empty() {
            return Ok(Verdict::Keep);
        }
        out.push(b'{');
        let mut first = true;
        for (name, raw) in self.project.iter().zip(&picked[1..]) {
            let Some(raw) = raw else { continue };
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *out, name)?;
            out.push(b':');
            out.extend_from_slice(raw.get().as_bytes());
        }
        out.push(b'}');
        Ok(Verdict::Projected)
    }

    /// Slot 0 is the filtered field; slots 1.. follow `project`.
    fn slots<'s>(&'s self, key: &'s str) -> impl Iterator<Item = usize> + 's {
        std::iter::once(&self.field)
            .chain(&self.project)
            .enumerate()
            .filter(move |(_, name)| name.as_str() == key)
            .map(|(slot, _)| slot)
    }
}

/// Reads one JSON object, keeping (borrowed) only the fields the filter
/// needs and skipping the rest without building a map.
struct Picker<'f, 'p, 'de> {
    filter: &'f JsonFilter,
    picked: &'p mut [Option<&'de RawValue>; MAX_PROJECT + 1],
}

impl<'de> DeserializeSeed<'de> for Picker<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Picker<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let mut slots = self.filter.slots(&key).peekable();
            if slots.peek().is_none() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let raw: &'de RawValue = map.next_value()?;
            for slot in slots {
                self.picked[slot] = Some(raw);
            }
        }
        Ok(())
    }
}

/// An object key, borrowed unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl Transform for JsonFilter {
    fn validate(&mut self) -> Result<()> {
        if self.field.is_empty() {
            return Err(Error::new("`field` must name a field"));
        }
        if self.min.is_none() && self.max.is_none() {
            return Err(Error::new(
                "set `min`, `max` or both: without them every record passes",
            ));
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Err(Error::new(format!("`min` ({min}) is above `max` ({max})")));
        }
        if self.project.len() > MAX_PROJECT {
            return Err(Error::new(format!(
                "`project` names {} fields; at most {MAX_PROJECT} are supported",
                self.project.len()
            )));
        }
        Ok(())
    }

    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        let mut projection = std::mem::take(&mut self.scratch);
        projection.clear();
        let verdict = self.apply(record.value(), &mut projection);
        match verdict {
            Ok(Verdict::Keep) => out.forward(&record),
            Ok(Verdict::Projected) => {
                let emitted = out.emit(&projection);
                match record.key() {
                    Some(key) => drop(emitted.key(key)),
                    None => drop(emitted),
                }
            }
            Ok(Verdict::Drop) | Err(_) => {}
        }
        self.scratch = projection;
        verdict.map(drop)
    }
}

export_transform!(JsonFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_guest::testing::{TestRecord, configure, run};

    fn filter(config: &str) -> JsonFilter {
        configure(config).unwrap()
    }

    #[test]
    fn keeps_records_within_the_range_and_drops_the_rest() {
        let mut plugin = filter(r#"{"field": "amount", "min": 10, "max": 100}"#);
        let input = [
            r#"{"amount": 5}"#,
            r#"{"amount": 10}"#,
            r#"{"amount": 50.5}"#,
            r#"{"amount": 101}"#,
        ];
        let outcomes = run(&mut plugin, &input.map(TestRecord::new));
        let kept: Vec<bool> = outcomes.iter().map(|o| !o.is_dropped()).collect();
        assert_eq!(kept, [false, true, true, false]);
        assert_eq!(
            outcomes[1].outputs()[0].value,
            input[1].as_bytes(),
            "kept records pass unchanged"
        );
    }

    #[test]
    fn projects_fields_in_the_given_order_and_keeps_the_key() {
        let mut plugin =
            filter(r#"{"field": "amount", "min": 1, "project": ["user", "amount", "absent"]}"#);
        let input =
            TestRecord::new(r#"{"amount": 7, "card": "4111", "user": "u\"1"}"#).with_key("u1");
        let outcomes = run(&mut plugin, &[input]);
        let out = &outcomes[0].outputs()[0];
        assert_eq!(out.value_str(), r#"{"user":"u\"1","amount":7}"#);
        assert_eq!(out.key.as_deref(), Some(&b"u1"[..]));
    }

    #[test]
    fn fails_malformed_and_non_numeric_records_alone() {
        let mut plugin = filter(r#"{"field": "amount", "min": 1}"#);
        let input =
            [r#"{"amount": "#, r#"{"amount": "ten"}"#, r#"{"amount": 3}"#].map(TestRecord::new);
        let outcomes = run(&mut plugin, &input);
        assert!(
            outcomes[0]
                .failure()
                .unwrap()
                .starts_with("not a JSON object")
        );
        assert_eq!(
            outcomes[1].failure(),
            Some("field `amount` is missing or not a number")
        );
        assert_eq!(outcomes[2].outputs().len(), 1);
    }

    #[test]
    fn missing_drop_drops_instead_of_failing() {
        let mut plugin = filter(r#"{"field": "amount", "min": 1, "missing": "drop"}"#);
        assert!(run(&mut plugin, &[TestRecord::new("{}")])[0].is_dropped());
    }

    #[test]
    fn rejects_settings_that_cannot_work() {
        for (config, says) in [
            (r#"{"field": "amount"}"#, "set `min`, `max` or both"),
            (
                r#"{"field": "amount", "min": 5, "max": 1}"#,
                "is above `max`",
            ),
            (r#"{"field": "", "min": 1}"#, "must name a field"),
            (r#"{"feild": "amount", "min": 1}"#, "unknown field `feild`"),
        ] {
            let err = configure::<JsonFilter>(config).err().unwrap();
            assert!(err.contains(says), "{config}: {err}");
        }
    }
}
