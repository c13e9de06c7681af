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
//! "drop"`. The record is scanned once with `weir_guest::json`, checked but
//! never built into a tree: the filtered and projected fields are kept as
//! borrowed raw text, and only the filtered one is read as a number.

use serde::Deserialize;
use weir_guest::{Error, Output, RecordView, Result, Transform, export_transform, json};

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
    /// `project`'s names as JSON strings, quoted and escaped once.
    #[serde(skip)]
    quoted: Vec<Vec<u8>>,
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
        let mut picked: [Option<&[u8]>; MAX_PROJECT + 1] = [None; MAX_PROJECT + 1];
        for field in json::fields(value) {
            let (key, raw) =
                field.map_err(|err| Error::new(format!("not a JSON object: {err}")))?;
            if key.is(&self.field) {
                picked[0] = Some(raw);
            }
            for (name, slot) in self.project.iter().zip(&mut picked[1..]) {
                if key.is(name) {
                    *slot = Some(raw);
                }
            }
        }

        let number = picked[0].and_then(json::number);
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
        for (name, raw) in self.quoted.iter().zip(&picked[1..]) {
            let Some(raw) = raw else { continue };
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(name);
            out.push(b':');
            out.extend_from_slice(raw);
        }
        out.push(b'}');
        Ok(Verdict::Projected)
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
        self.quoted = self
            .project
            .iter()
            .map(serde_json::to_vec)
            .collect::<std::result::Result<_, _>>()?;
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
