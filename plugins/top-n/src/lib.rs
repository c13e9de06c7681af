//! A window aggregate: the `n` largest values of the numeric field `field`
//! among a key's records in a window, largest first.
//!
//! ```toml
//! [pipeline.window]
//! kind = "tumbling"
//! size = "10s"
//! key = "user_id"
//! time = "ts"
//! aggregates = [ { wasm = "plugins/top-n", as = "top3", config = { field = "amount", n = 3 } } ]
//! ```
//!
//! A record without the field, or with `null`, is skipped; one whose field
//! is not a number fails the call, naming its offset.

use serde::{Deserialize, Serialize};
use weir_guest::{Aggregate, Error, RecordView, Result, export_aggregate};

/// The settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopN {
    /// The numeric field to rank by.
    field: String,
    /// How many values to keep.
    #[serde(default = "default_n")]
    n: usize,
}

fn default_n() -> usize {
    3
}

/// The largest values so far, largest first, at most `n`.
#[derive(Default, Serialize, Deserialize)]
pub struct Largest(Vec<f64>);

impl TopN {
    fn insert(&self, largest: &mut Largest, value: f64) {
        let values = &mut largest.0;
        if values.len() == self.n && values.last().is_some_and(|&least| value <= least) {
            return;
        }
        let at = values.partition_point(|&v| v >= value);
        values.insert(at, value);
        values.truncate(self.n);
    }
}

impl Aggregate for TopN {
    type State = Largest;
    /// Integral values as JSON integers.
    type Output = Vec<serde_json::Value>;

    fn validate(&mut self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::new("`n` must be at least 1"));
        }
        Ok(())
    }

    fn accumulate(&mut self, state: &mut Largest, record: RecordView<'_>) -> Result<()> {
        for field in weir_guest::json::fields(record.value()) {
            let (name, raw) = field.map_err(|e| Error::new(format!("not a JSON object: {e}")))?;
            if !name.is(&self.field) {
                continue;
            }
            if raw == b"null" {
                return Ok(());
            }
            let value = weir_guest::json::number(raw)
                .filter(|v| v.is_finite())
                .ok_or_else(|| Error::new(format!("`{}` is not a number", self.field)))?;
            self.insert(state, value);
            return Ok(());
        }
        Ok(())
    }

    fn merge(&mut self, state: &mut Largest, other: Largest) {
        for value in other.0 {
            self.insert(state, value);
        }
    }

    fn finish(&mut self, state: &Largest) -> Result<Vec<serde_json::Value>> {
        let integral = |v: f64| v.fract() == 0.0 && v.abs() < 9.0e15;
        Ok((state.0.iter())
            .map(|&v| match integral(v) {
                true => serde_json::Value::from(v as i64),
                false => serde_json::Value::from(v),
            })
            .collect())
    }
}

export_aggregate!(TopN);

#[cfg(test)]
mod tests {
    use weir_guest::testing::{TestRecord, aggregate, configure_aggregate};

    use super::*;

    fn amounts(values: &[&str]) -> Vec<TestRecord> {
        (values.iter().enumerate())
            .map(|(at, v)| TestRecord::new(format!(r#"{{"amount":{v}}}"#)).at("t", 0, at as i64))
            .collect()
    }

    #[test]
    fn keeps_the_largest_values_largest_first_across_merged_states() {
        let mut top: TopN = configure_aggregate(r#"{"field":"amount","n":3}"#).unwrap();
        let a = amounts(&["5", "1", "9", "null"]);
        let b = amounts(&["7", "2"]);
        assert_eq!(aggregate(&mut top, &[&a, &b]).unwrap(), "[9,7,5]");
        assert_eq!(aggregate(&mut top, &[&b]).unwrap(), "[7,2]");
        assert_eq!(aggregate(&mut top, &[]).unwrap(), "[]");
    }

    #[test]
    fn a_value_that_is_not_a_number_names_its_record() {
        let mut top: TopN = configure_aggregate(r#"{"field":"amount"}"#).unwrap();
        let bad = amounts(&["1", "\"lots\""]);
        let err = aggregate(&mut top, &[&bad]).unwrap_err();
        assert!(
            err.contains("offset 1") && err.contains("not a number"),
            "{err}"
        );
        let err = configure_aggregate::<TopN>(r#"{"field":"amount","n":0}"#).err();
        assert_eq!(err.as_deref(), Some("`n` must be at least 1"));
    }
}
