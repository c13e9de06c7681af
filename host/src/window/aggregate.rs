//! Built-in aggregates: one accumulator per aggregate per key and window,
//! fed the raw JSON text of a field (never a parsed tree), mergeable (a
//! session window that bridges two others merges them), and written out as
//! JSON.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::config::{AggregateFn, AggregateSpec};
use super::plugin::PluginState;
use crate::batch::RecordRef;

/// What one aggregate has seen so far.
#[derive(Debug, Clone, PartialEq)]
pub enum Accumulator {
    /// Records counted.
    Count(u64),
    /// A running sum; `None` until a value comes.
    Sum(Option<Sum>),
    /// The smallest value so far.
    Min(Option<f64>),
    /// The largest value so far.
    Max(Option<f64>),
    /// Sum and count, for the mean.
    Avg(f64, u64),
    /// The earliest value: (event time, arrival, raw JSON).
    First(Option<Ordered>),
    /// The latest value: (event time, arrival, raw JSON).
    Last(Option<Ordered>),
    /// The distinct raw values.
    Distinct(HashSet<Box<[u8]>>),
    /// A plugin's state, and the records it has not seen yet.
    Plugin(Box<PluginState>),
}

/// A value with where it stands in time: event time, then arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordered {
    time: i64,
    arrival: u64,
    raw: Box<[u8]>,
}

/// What one record gives an aggregate: its field's raw JSON value
/// (`None`: absent), its event time and its arrival number, and (for a
/// plugin) the record itself.
pub struct Input<'a> {
    pub raw: Option<&'a [u8]>,
    pub time: i64,
    pub arrival: u64,
    pub record: Option<&'a RecordRef<'a>>,
}

impl Accumulator {
    /// The empty accumulator of `spec`.
    pub fn new(spec: &AggregateSpec) -> Self {
        match spec.function {
            AggregateFn::Count => Accumulator::Count(0),
            AggregateFn::Sum => Accumulator::Sum(None),
            AggregateFn::Min => Accumulator::Min(None),
            AggregateFn::Max => Accumulator::Max(None),
            AggregateFn::Avg => Accumulator::Avg(0.0, 0),
            AggregateFn::First => Accumulator::First(None),
            AggregateFn::Last => Accumulator::Last(None),
            AggregateFn::CountDistinct => Accumulator::Distinct(HashSet::new()),
            AggregateFn::Plugin => Accumulator::Plugin(Box::default()),
        }
    }

    /// Takes one record. An absent or `null` field is skipped (as SQL skips
    /// NULL); a numeric aggregate over a value that is not a number is the
    /// record's fault, reported before any accumulator of it changed (see
    /// [`check`]).
    #[inline]
    pub fn add(&mut self, input: &Input<'_>) {
        if let Accumulator::Plugin(state) = self {
            if let Some(record) = input.record {
                state.add(record, input.time);
            }
            return;
        }
        let raw = match input.raw {
            None => {
                if let Accumulator::Count(n) = self {
                    *n += 1;
                }
                return;
            }
            Some(b"null") => return,
            Some(raw) => raw,
        };
        match self {
            Accumulator::Count(n) => *n += 1,
            Accumulator::Sum(sum) => sum.get_or_insert_with(Sum::default).add(raw),
            Accumulator::Min(min) => {
                let value = number(raw);
                *min = Some(min.map_or(value, |m| m.min(value)));
            }
            Accumulator::Max(max) => {
                let value = number(raw);
                *max = Some(max.map_or(value, |m| m.max(value)));
            }
            Accumulator::Avg(sum, n) => {
                *sum += number(raw);
                *n += 1;
            }
            Accumulator::First(first) => {
                if first
                    .as_ref()
                    .is_none_or(|f| (input.time, input.arrival) < (f.time, f.arrival))
                {
                    *first = Some(ordered(input, raw));
                }
            }
            Accumulator::Last(last) => {
                if last
                    .as_ref()
                    .is_none_or(|l| (input.time, input.arrival) > (l.time, l.arrival))
                {
                    *last = Some(ordered(input, raw));
                }
            }
            Accumulator::Distinct(seen) => {
                if !seen.contains(raw) {
                    seen.insert(raw.into());
                }
            }
            Accumulator::Plugin(_) => {}
        }
    }

    /// Takes in what `other` saw (of the same aggregate).
    pub fn merge(&mut self, other: Accumulator) {
        match (self, other) {
            (Accumulator::Count(a), Accumulator::Count(b)) => *a += b,
            (Accumulator::Sum(a), Accumulator::Sum(b)) => {
                *a = match (a.take(), b) {
                    (Some(mut a), Some(b)) => {
                        a.merge(b);
                        Some(a)
                    }
                    (a, b) => a.or(b),
                }
            }
            (Accumulator::Min(a), Accumulator::Min(b)) => *a = pick(*a, b, f64::min),
            (Accumulator::Max(a), Accumulator::Max(b)) => *a = pick(*a, b, f64::max),
            (Accumulator::Avg(sum, n), Accumulator::Avg(other_sum, other_n)) => {
                *sum += other_sum;
                *n += other_n;
            }
            (Accumulator::First(a), Accumulator::First(b)) => {
                if let Some(b) = b
                    && a.as_ref()
                        .is_none_or(|a| (b.time, b.arrival) < (a.time, a.arrival))
                {
                    *a = Some(b);
                }
            }
            (Accumulator::Last(a), Accumulator::Last(b)) => {
                if let Some(b) = b
                    && a.as_ref()
                        .is_none_or(|a| (b.time, b.arrival) > (a.time, a.arrival))
                {
                    *a = Some(b);
                }
            }
            (Accumulator::Distinct(a), Accumulator::Distinct(b)) => a.extend(b),
            (Accumulator::Plugin(a), Accumulator::Plugin(b)) => a.merge(*b),
            (a, b) => unreachable!("merging different aggregates: {a:?} and {b:?}"),
        }
    }

    /// Appends its result as a JSON value (a plugin's as last settled).
    pub fn write_json(&self, out: &mut String) {
        match self {
            Accumulator::Count(n) => {
                let _ = write!(out, "{n}");
            }
            Accumulator::Sum(None) => out.push_str("null"),
            Accumulator::Sum(Some(sum)) => sum.write_json(out),
            Accumulator::Min(value) | Accumulator::Max(value) => write_number(*value, out),
            Accumulator::Avg(sum, n) => write_number((*n > 0).then(|| sum / *n as f64), out),
            Accumulator::First(value) | Accumulator::Last(value) => match value {
                Some(value) => out.push_str(&String::from_utf8_lossy(&value.raw)),
                None => out.push_str("null"),
            },
            Accumulator::Distinct(seen) => {
                let _ = write!(out, "{}", seen.len());
            }
            Accumulator::Plugin(state) => match state.settled() {
                Some(Ok(json)) => out.push_str(json),
                _ => out.push_str("null"),
            },
        }
    }
}

/// A sum, exact while every value is a plain decimal (`12`, `-3.75`: no
/// exponent, at most [`Sum::MAX_SCALE`] decimals) and it fits: money adds
/// up to `13371.2`, not `13371.200000000003`. A value it cannot hold
/// exactly, or an overflow, makes it a float sum from then on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sum {
    /// The sum times `10^scale`, while exact.
    exact: Option<(i128, u32)>,
    /// The float sum, once it is not exact.
    float: f64,
}

impl Sum {
    const MAX_SCALE: u32 = 18;

    #[inline]
    fn add(&mut self, raw: &[u8]) {
        if let Some(sum) = self.exact {
            self.exact = decimal(raw).and_then(|value| add_exact(sum, value));
            if self.exact.is_some() {
                return;
            }
            self.float = as_float(sum);
        }
        self.float += number(raw);
    }

    fn merge(&mut self, other: Sum) {
        self.exact = match (self.exact, other.exact) {
            (Some(a), Some(b)) => add_exact(a, b),
            _ => None,
        };
        if self.exact.is_none() {
            self.float = self.value() + other.value();
        }
    }

    /// The sum as a float.
    fn value(&self) -> f64 {
        self.exact.map_or(self.float, as_float)
    }

    fn write_json(&self, out: &mut String) {
        let Some((mantissa, scale)) = self.exact else {
            return write_number(Some(self.float), out);
        };
        let digits = mantissa.unsigned_abs().to_string();
        let scale = scale as usize;
        let (whole, fraction) = match digits.len() > scale {
            true => digits.split_at(digits.len() - scale),
            false => ("", digits.as_str()),
        };
        let fraction = format!("{fraction:0>scale$}");
        let fraction = fraction.trim_end_matches('0');
        if mantissa < 0 {
            out.push('-');
        }
        out.push_str(if whole.is_empty() { "0" } else { whole });
        if !fraction.is_empty() {
            out.push('.');
            out.push_str(fraction);
        }
    }
}

impl Default for Sum {
    fn default() -> Self {
        Sum {
            exact: Some((0, 0)),
            float: 0.0,
        }
    }
}

/// A plain decimal's mantissa and scale (`-3.75` is `(-375, 2)`).
fn decimal(raw: &[u8]) -> Option<(i128, u32)> {
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, raw),
    };
    let (mut mantissa, mut scale, mut dot) = (0i128, 0u32, false);
    for &byte in digits {
        match byte {
            b'0'..=b'9' => {
                mantissa = mantissa
                    .checked_mul(10)?
                    .checked_add(i128::from(byte - b'0'))?;
                scale += u32::from(dot);
            }
            b'.' if !dot => dot = true,
            _ => return None,
        }
    }
    (scale <= Sum::MAX_SCALE).then_some((if negative { -mantissa } else { mantissa }, scale))
}

fn as_float((mantissa, scale): (i128, u32)) -> f64 {
    mantissa as f64 / 10f64.powi(scale as i32)
}

fn add_exact((a, a_scale): (i128, u32), (b, b_scale): (i128, u32)) -> Option<(i128, u32)> {
    let scale = a_scale.max(b_scale);
    let a = a.checked_mul(10i128.checked_pow(scale - a_scale)?)?;
    let b = b.checked_mul(10i128.checked_pow(scale - b_scale)?)?;
    Some((a.checked_add(b)?, scale))
}

/// Whether `raw` suits aggregate `function`: numeric ones need a number
/// (or `null`). Checked for every aggregate of a record before any takes it.
#[inline]
pub fn check(function: AggregateFn, raw: Option<&[u8]>) -> Result<(), &'static str> {
    match (function, raw) {
        (AggregateFn::Sum | AggregateFn::Min | AggregateFn::Max | AggregateFn::Avg, Some(raw))
            if raw != b"null" && weir_guest::json::number(raw).is_none_or(|n| !n.is_finite()) =>
        {
            Err("is not a finite number")
        }
        _ => Ok(()),
    }
}

fn number(raw: &[u8]) -> f64 {
    // `check` let only numbers through.
    weir_guest::json::number(raw).unwrap_or(0.0)
}

fn ordered(input: &Input<'_>, raw: &[u8]) -> Ordered {
    Ordered {
        time: input.time,
        arrival: input.arrival,
        raw: raw.into(),
    }
}

fn pick(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, b) => a.or(b),
    }
}

/// A number as JSON: an integral value as an integer, `null` for none.
pub fn write_number(value: Option<f64>, out: &mut String) {
    match value {
        Some(v) if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 => {
            let _ = write!(out, "{}", v as i64);
        }
        Some(v) if v.is_finite() => {
            let _ = write!(out, "{v}");
        }
        _ => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(function: AggregateFn) -> AggregateSpec {
        AggregateSpec {
            function,
            field: Some("v".into()),
            name: "out".into(),
            plugin: None,
        }
    }

    fn run(function: AggregateFn, values: &[(&str, i64)]) -> String {
        let mut acc = Accumulator::new(&spec(function));
        for (arrival, (raw, time)) in values.iter().enumerate() {
            let raw = (*raw != "-").then_some(raw.as_bytes());
            check(function, raw).unwrap();
            acc.add(&Input {
                raw,
                time: *time,
                arrival: arrival as u64,
                record: None,
            });
        }
        let mut out = String::new();
        acc.write_json(&mut out);
        out
    }

    #[test]
    fn each_aggregate_computes_its_result() {
        let values = [("3", 5), ("1.5", 2), ("-", 9), ("null", 1), ("3", 2)];
        assert_eq!(
            run(AggregateFn::Count, &values),
            "4",
            "absent skipped, null too"
        );
        assert_eq!(run(AggregateFn::Sum, &values), "7.5");
        assert_eq!(run(AggregateFn::Min, &values), "1.5");
        assert_eq!(run(AggregateFn::Max, &values), "3");
        assert_eq!(run(AggregateFn::Avg, &values), "2.5");
        assert_eq!(
            run(AggregateFn::First, &values),
            "1.5",
            "earliest event time, first arrival"
        );
        assert_eq!(run(AggregateFn::Last, &values), "3", "latest event time");
        assert_eq!(run(AggregateFn::CountDistinct, &values), "2");
        assert_eq!(run(AggregateFn::Min, &[]), "null");
        assert_eq!(
            run(AggregateFn::First, &[("\"a\"", 1), ("\"b\"", 1)]),
            "\"a\""
        );
        assert_eq!(
            run(AggregateFn::Last, &[("\"a\"", 1), ("\"b\"", 1)]),
            "\"b\""
        );
    }

    #[test]
    fn a_sum_of_decimals_is_exact_until_it_cannot_be() {
        let money = [("13371.19", 1), ("0.01", 2), ("-0.5", 3), ("100", 4)];
        assert_eq!(run(AggregateFn::Sum, &money), "13470.7");
        assert_eq!(run(AggregateFn::Sum, &[("0.1", 1), ("0.2", 2)]), "0.3");
        assert_eq!(run(AggregateFn::Sum, &[("-0.25", 1), ("0.05", 2)]), "-0.2");
        assert_eq!(run(AggregateFn::Sum, &[("1.5", 1), ("-1.5", 2)]), "0");
        // An exponent: a float sum from then on.
        assert_eq!(run(AggregateFn::Sum, &[("1e2", 1), ("0.5", 2)]), "100.5");
    }

    #[test]
    fn merging_two_halves_gives_the_whole() {
        let values = [("3", 5), ("1.5", 2), ("7", 9), ("2", 1), ("3", 2)];
        for function in [
            AggregateFn::Count,
            AggregateFn::Sum,
            AggregateFn::Min,
            AggregateFn::Max,
            AggregateFn::Avg,
            AggregateFn::First,
            AggregateFn::Last,
            AggregateFn::CountDistinct,
        ] {
            let whole = run(function, &values);
            let mut halves = [
                Accumulator::new(&spec(function)),
                Accumulator::new(&spec(function)),
            ];
            for (arrival, (raw, time)) in values.iter().enumerate() {
                halves[arrival % 2].add(&Input {
                    raw: Some(raw.as_bytes()),
                    time: *time,
                    arrival: arrival as u64,
                    record: None,
                });
            }
            let [mut a, b] = halves;
            a.merge(b);
            let mut merged = String::new();
            a.write_json(&mut merged);
            assert_eq!(merged, whole, "{function:?}");
        }
    }

    #[test]
    fn a_value_that_is_not_a_number_is_refused_by_numeric_aggregates_only() {
        assert!(check(AggregateFn::Sum, Some(b"\"12\"")).is_err());
        assert!(check(AggregateFn::Avg, Some(b"1e400")).is_err());
        assert!(check(AggregateFn::Sum, Some(b"null")).is_ok());
        assert!(check(AggregateFn::CountDistinct, Some(b"\"12\"")).is_ok());
    }
}
