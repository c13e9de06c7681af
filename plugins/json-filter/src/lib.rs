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
//! "drop"`. Values are borrowed from the input, not parsed into a tree:
//! only the filtered field is read as a number.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform};

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
}

impl Transform for JsonFilter {
    fn validate(&mut self) -> Result<()> {
        if self.field.is_empty() {
            return Err(Error::new("`field` must name a field"));
        }
        if self.min.is_none() && self.max.is_none() {
            return Err(Error::new("set `min`, `max` or both: without them every record passes"));
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                return Err(Error::new(format!("`min` ({min}) is above `max` ({max})")));
            }
        }
        Ok(())
    }

    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
        let doc: HashMap<std::borrow::Cow<'_, str>, &RawValue> = serde_json::from_slice(record.value())
            .map_err(|err| Error::new(format!("not a JSON object: {err}")))?;
        let number = doc.get(self.field.as_str()).and_then(|raw| raw.get().parse::<f64>().ok());
        let Some(number) = number else {
            return match self.missing {
                Missing::Drop => Ok(()),
                Missing::Fail => Err(Error::new(format!("field `{}` is missing or not a number", self.field))),
            };
        };
        let keep = self.min.is_none_or(|min| number >= min) && self.max.is_none_or(|max| number <= max);
        if !keep {
            return Ok(());
        }
        if self.project.is_empty() {
            out.forward(&record);
            return Ok(());
        }
        let emitted = out.emit_with(|buf| {
            buf.push(b'{');
            let mut first = true;
            for name in &self.project {
                if let Some(raw) = doc.get(name.as_str()) {
                    if !first {
                        buf.push(b',');
                    }
                    first = false;
                    serde_json::to_writer(&mut *buf, name)?;
                    buf.push(b':');
                    buf.extend_from_slice(raw.get().as_bytes());
                }
            }
            buf.push(b'}');
            Ok(())
        })?;
        match record.key() {
            Some(key) => drop(emitted.key(key)),
            None => drop(emitted),
        }
        Ok(())
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
        let input = [r#"{"amount": 5}"#, r#"{"amount": 10}"#, r#"{"amount": 50.5}"#, r#"{"amount": 101}"#];
        let outcomes = run(&mut plugin, &input.map(TestRecord::new));
        let kept: Vec<bool> = outcomes.iter().map(|o| !o.is_dropped()).collect();
        assert_eq!(kept, [false, true, true, false]);
        assert_eq!(outcomes[1].outputs()[0].value, input[1].as_bytes(), "kept records pass unchanged");
    }

    #[test]
    fn projects_fields_in_the_given_order_and_keeps_the_key() {
        let mut plugin = filter(r#"{"field": "amount", "min": 1, "project": ["user", "amount", "absent"]}"#);
        let input = TestRecord::new(r#"{"amount": 7, "card": "4111", "user": "u\"1"}"#).with_key("u1");
        let outcomes = run(&mut plugin, &[input]);
        let out = &outcomes[0].outputs()[0];
        assert_eq!(out.value_str(), r#"{"user":"u\"1","amount":7}"#);
        assert_eq!(out.key.as_deref(), Some(&b"u1"[..]));
    }

    #[test]
    fn fails_malformed_and_non_numeric_records_alone() {
        let mut plugin = filter(r#"{"field": "amount", "min": 1}"#);
        let input = [r#"{"amount": "#, r#"{"amount": "ten"}"#, r#"{"amount": 3}"#].map(TestRecord::new);
        let outcomes = run(&mut plugin, &input);
        assert!(outcomes[0].failure().unwrap().starts_with("not a JSON object"));
        assert_eq!(outcomes[1].failure(), Some("field `amount` is missing or not a number"));
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
            (r#"{"field": "amount", "min": 5, "max": 1}"#, "is above `max`"),
            (r#"{"field": "", "min": 1}"#, "must name a field"),
            (r#"{"feild": "amount", "min": 1}"#, "unknown field `feild`"),
        ] {
            let err = configure::<JsonFilter>(config).err().unwrap();
            assert!(err.contains(says), "{config}: {err}");
        }
    }
}
