//! Built-in aggregates: one accumulator per aggregate per key and window,
//! fed the raw JSON text of a field (never a parsed tree), mergeable (a
//! session window that bridges two others merges them), and written out as
//! JSON.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::config::{AggregateFn, AggregateSpec};
use super::plugin::StateId;

/// What one aggregate has seen so far.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    First(Option<Box<Ordered>>),
    /// The latest value: (event time, arrival, raw JSON).
    Last(Option<Box<Ordered>>),
    /// The distinct raw values.
    #[allow(
        clippy::box_collection,
        reason = "a pointer keeps every accumulator to 32 bytes (a set is 48)"
    )]
    Distinct(Box<HashSet<Box<[u8]>>>),
    /// A plugin's state, and the records it has not seen yet.
    Plugin(StateId),
}

/// A value with where it stands in time: event time, then arrival order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ordered {
    time: i64,
    arrival: u64,
    raw: Box<[u8]>,
}

/// What one record gives an aggregate, read from its value beforehand
/// (in a lane, see `fields`): nothing, `null`, a number parsed once, or
/// where the field's raw JSON text is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// The field is absent (or the aggregate reads none).
    Absent,
    /// The field is `null`.
    Null,
    /// A numeric aggregate's number.
    Number(Number),
    /// The raw JSON text, as a byte range of its batch's packed bytes.
    Raw(Span),
}

/// A number as read: exactly if it is a short plain decimal (most are),
/// else as a float; small, so that a batch's arguments stay small.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number {
    /// The value times `10^scale`, if a plain decimal of at most 18 digits.
    mantissa: i64,
    /// [`Number::NOT_SHORT`]: not such a decimal (see `raw`).
    scale: u8,
    /// The value as a float, or NaN: not worked out yet (a short decimal
    /// that a sum adds exactly needs none).
    float: f64,
    /// Its text, in its batch's packed bytes.
    raw: Span,
}

impl Number {
    const NOT_SHORT: u8 = u8::MAX;

    /// Exactly, if it is a plain decimal (of up to 38 digits, at most
    /// [`Sum::MAX_SCALE`] decimals); `bytes` are its batch's packed bytes.
    #[inline]
    fn exact(&self, bytes: &[u8]) -> Option<(i128, u32)> {
        match self.scale {
            Self::NOT_SHORT => decimal(self.raw.of(bytes)),
            scale => Some((i128::from(self.mantissa), u32::from(scale))),
        }
    }

    /// As a float; `bytes` are its batch's packed bytes.
    #[inline]
    fn float(&self, bytes: &[u8]) -> f64 {
        if !self.float.is_nan() {
            return self.float;
        }
        Self::float_of(self.mantissa, self.scale, self.raw.of(bytes))
    }

    /// The float that `raw` parses to, quickly for a short decimal.
    #[inline]
    fn float_of(mantissa: i64, scale: u8, raw: &[u8]) -> f64 {
        if scale <= 22 && mantissa.unsigned_abs() < 1 << 53 {
            // Both exact in an f64: one correctly rounded division gives
            // the same float as parsing the text.
            return mantissa as f64 / 10f64.powi(i32::from(scale));
        }
        weir_guest::json::number(raw).unwrap_or(f64::NAN)
    }
}

/// A byte range of a record's value, or of its batch's packed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    from: u32,
    to: u32,
}

impl Span {
    /// The range `from..to`.
    pub fn new(from: usize, to: usize) -> Self {
        // Values are far below 4 GiB (`max_record_bytes`).
        Span {
            from: from as u32,
            to: to as u32,
        }
    }

    /// Its bytes in `bytes`.
    #[inline]
    pub fn of(self, bytes: &[u8]) -> &[u8] {
        &bytes[self.from as usize..self.to as usize]
    }

    /// Where it starts.
    #[inline]
    pub fn from(self) -> usize {
        self.from as usize
    }

    /// The same range `by` bytes further.
    #[inline]
    pub fn shifted(self, by: usize) -> Self {
        Span::new(self.from as usize + by, self.to as usize + by)
    }
}

impl Arg {
    /// Reads the field `raw` (at `span`; `None`: absent) for
    /// aggregate `function`: numeric ones need a finite number (or `null`).
    #[inline]
    pub fn read(
        function: AggregateFn,
        raw: Option<&[u8]>,
        span: Span,
    ) -> Result<Arg, &'static str> {
        let raw = match raw {
            None => return Ok(Arg::Absent),
            Some(b"null") => return Ok(Arg::Null),
            Some(raw) => raw,
        };
        let numeric = match function {
            AggregateFn::Sum => false,
            AggregateFn::Min | AggregateFn::Max | AggregateFn::Avg => true,
            _ => return Ok(Arg::Raw(span)),
        };
        let number = match short_decimal(raw) {
            Some((mantissa, scale)) => Number {
                mantissa,
                scale,
                // A sum adds it exactly: no float needed, unless it is
                // one for every record.
                float: match numeric {
                    true => Number::float_of(mantissa, scale, raw),
                    false => f64::NAN,
                },
                raw: span,
            },
            None => Number {
                mantissa: 0,
                scale: Number::NOT_SHORT,
                float: (weir_guest::json::number(raw))
                    .filter(|n| n.is_finite())
                    .ok_or("is not a finite number")?,
                raw: span,
            },
        };
        Ok(Arg::Number(number))
    }
}

/// What one record gives an aggregate: its argument (with spans of
/// `bytes`: its batch's packed bytes), its event time and its arrival
/// number.
pub struct Input<'a> {
    pub arg: &'a Arg,
    pub bytes: &'a [u8],
    pub time: i64,
    pub arrival: u64,
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
            AggregateFn::CountDistinct => Accumulator::Distinct(Box::default()),
            // Its plugin gives it a state (`PluginAggregate::new_state`).
            AggregateFn::Plugin => Accumulator::Plugin(StateId::MAX),
        }
    }

    /// Takes one record. An absent or `null` field is skipped (as SQL skips
    /// NULL), but `count` counts a record whose field is absent.
    #[inline]
    pub fn add(&mut self, input: &Input<'_>) {
        let number = match (&mut *self, input.arg) {
            // Its plugin takes the record (`PluginAggregate::add`).
            (Accumulator::Plugin(_), _) => return,
            (Accumulator::Count(n), Arg::Absent | Arg::Number(_) | Arg::Raw(_)) => {
                *n += 1;
                return;
            }
            (_, Arg::Absent | Arg::Null) => return,
            (_, Arg::Number(number)) => number,
            (accumulator, Arg::Raw(span)) => {
                let raw = span.of(input.bytes);
                let at = (input.time, input.arrival);
                match accumulator {
                    Accumulator::First(first)
                        if first.as_ref().is_none_or(|f| at < (f.time, f.arrival)) =>
                    {
                        *first = Some(ordered(input, raw));
                    }
                    Accumulator::Last(last)
                        if last.as_ref().is_none_or(|l| at > (l.time, l.arrival)) =>
                    {
                        *last = Some(ordered(input, raw));
                    }
                    Accumulator::Distinct(seen) if !seen.contains(raw) => {
                        seen.insert(raw.into());
                    }
                    // Not earlier (later) than the first (last), seen
                    // before; `Arg::read` gives the numeric ones numbers.
                    _ => {}
                }
                return;
            }
        };
        let bytes = input.bytes;
        match self {
            Accumulator::Sum(sum) => sum.get_or_insert_with(Sum::default).add(number, bytes),
            Accumulator::Min(min) => {
                let float = number.float(bytes);
                *min = Some(min.map_or(float, |m| m.min(float)));
            }
            Accumulator::Max(max) => {
                let float = number.float(bytes);
                *max = Some(max.map_or(float, |m| m.max(float)));
            }
            Accumulator::Avg(sum, n) => {
                *sum += number.float(bytes);
                *n += 1;
            }
            _ => {}
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
            (Accumulator::Distinct(a), Accumulator::Distinct(b)) => a.extend(*b),
            // Their plugin merges them (`PluginAggregate::merge`).
            (Accumulator::Plugin(_), Accumulator::Plugin(_)) => {}
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
            // Written from its plugin's result (`PluginAggregate::settled`).
            Accumulator::Plugin(_) => out.push_str("null"),
        }
    }
}

/// A sum, exact while every value is a plain decimal (`12`, `-3.75`: no
/// exponent, at most [`Sum::MAX_SCALE`] decimals) and it fits: money adds
/// up to `13371.2`, not `13371.200000000003`. A value it cannot hold
/// exactly, or an overflow, makes it a float sum from then on.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sum {
    /// While exact, the sum times `10^scale`: an i128 cut in two halves,
    /// so that a sum keeps to 8-byte alignment (and an accumulator to 32
    /// bytes: a window's keys stay close in memory).
    halves: [u64; 2],
    /// `Some(scale)` while exact.
    scale: Option<u8>,
    /// The float sum, once it is not exact.
    float: f64,
}

impl Sum {
    const MAX_SCALE: u32 = 18;

    #[inline]
    fn exact(&self) -> Option<(i128, u32)> {
        let [low, high] = self.halves;
        let mantissa = (i128::from(high as i64) << 64) | i128::from(low);
        self.scale.map(|scale| (mantissa, u32::from(scale)))
    }

    #[inline]
    fn set_exact(&mut self, exact: Option<(i128, u32)>) {
        match exact {
            Some((mantissa, scale)) => {
                self.halves = [mantissa as u64, (mantissa >> 64) as u64];
                // `add_exact` keeps to `MAX_SCALE`.
                self.scale = Some(scale as u8);
            }
            None => self.scale = None,
        }
    }

    /// Adds `number` (`bytes`: its batch's packed bytes).
    #[inline]
    fn add(&mut self, number: &Number, bytes: &[u8]) {
        if let Some(sum) = self.exact() {
            let added = number
                .exact(bytes)
                .and_then(|number| add_exact(sum, number));
            self.set_exact(added);
            if added.is_some() {
                return;
            }
            self.float = as_float(sum);
        }
        self.float += number.float(bytes);
    }

    fn merge(&mut self, other: Sum) {
        if let (Some(a), Some(b)) = (self.exact(), other.exact())
            && let Some(sum) = add_exact(a, b)
        {
            return self.set_exact(Some(sum));
        }
        self.float = self.value() + other.value();
        self.scale = None;
    }

    /// The sum as a float.
    fn value(&self) -> f64 {
        self.exact().map_or(self.float, as_float)
    }

    fn write_json(&self, out: &mut String) {
        let Some((mantissa, scale)) = self.exact() else {
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
            halves: [0; 2],
            scale: Some(0),
            float: 0.0,
        }
    }
}

/// A plain decimal of at most 18 digits: its mantissa and scale (`-3.75`
/// is `(-375, 2)`), with no wide arithmetic.
#[inline]
fn short_decimal(raw: &[u8]) -> Option<(i64, u8)> {
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, raw),
    };
    if digits.len() > 19 {
        return None;
    }
    let (mut mantissa, mut scale, mut dot, mut count) = (0i64, 0u8, false, 0);
    for &byte in digits {
        match byte {
            b'0'..=b'9' if count < 18 => {
                mantissa = mantissa * 10 + i64::from(byte - b'0');
                scale += u8::from(dot);
                count += 1;
            }
            b'.' if !dot => dot = true,
            _ => return None,
        }
    }
    // 18 digits cannot overflow, and keep to `Sum::MAX_SCALE`.
    Some((if negative { -mantissa } else { mantissa }, scale))
}

/// A plain decimal's mantissa and scale (`-3.75` is `(-375, 2)`), of up
/// to 38 digits: the slow path, for what [`short_decimal`] does not take.
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

#[inline]
fn add_exact((a, a_scale): (i128, u32), (b, b_scale): (i128, u32)) -> Option<(i128, u32)> {
    if a_scale == b_scale {
        return Some((a.checked_add(b)?, a_scale));
    }
    let scale = a_scale.max(b_scale);
    let a = a.checked_mul(10i128.checked_pow(scale - a_scale)?)?;
    let b = b.checked_mul(10i128.checked_pow(scale - b_scale)?)?;
    Some((a.checked_add(b)?, scale))
}

fn ordered(input: &Input<'_>, raw: &[u8]) -> Box<Ordered> {
    Box::new(Ordered {
        time: input.time,
        arrival: input.arrival,
        raw: raw.into(),
    })
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

    /// Adds `raw` (`-`: absent) as the value of a record's only field.
    fn add(acc: &mut Accumulator, function: AggregateFn, raw: &str, time: i64, arrival: usize) {
        let field = (raw != "-").then_some(raw.as_bytes());
        let arg = Arg::read(function, field, Span::new(0, raw.len())).unwrap();
        acc.add(&Input {
            arg: &arg,
            bytes: raw.as_bytes(),
            time,
            arrival: arrival as u64,
        });
    }

    fn run(function: AggregateFn, values: &[(&str, i64)]) -> String {
        let mut acc = Accumulator::new(&spec(function));
        for (arrival, (raw, time)) in values.iter().enumerate() {
            add(&mut acc, function, raw, *time, arrival);
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
        assert_eq!(
            run(
                AggregateFn::Sum,
                &[("170141183460469231731687303715884105727", 1), ("1", 2)]
            ),
            "170141183460469230000000000000000000000",
            "an overflow: a float sum"
        );
        assert_eq!(
            run(
                AggregateFn::Sum,
                &[("-170141183460469231731687303715884105727", 1), ("-0.5", 2)]
            ),
            "-170141183460469230000000000000000000000"
        );
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
                add(&mut halves[arrival % 2], function, raw, *time, arrival);
            }
            let [mut a, b] = halves;
            a.merge(b);
            // A float half merges into an exact one, and the other way round.
            let mut exact = Accumulator::new(&spec(AggregateFn::Sum));
            let mut float = Accumulator::new(&spec(AggregateFn::Sum));
            add(&mut exact, AggregateFn::Sum, "0.5", 1, 0);
            add(&mut float, AggregateFn::Sum, "1e2", 1, 1);
            let mut both = [exact.clone(), float.clone()];
            both[0].merge(float);
            both[1].merge(exact);
            for sum in both {
                let mut text = String::new();
                sum.write_json(&mut text);
                assert_eq!(text, "100.5");
            }
            let mut merged = String::new();
            a.write_json(&mut merged);
            assert_eq!(merged, whole, "{function:?}");
        }
    }

    #[test]
    fn a_value_that_is_not_a_number_is_refused_by_numeric_aggregates_only() {
        let read = |function, raw: &str| Arg::read(function, Some(raw.as_bytes()), Span::new(0, 0));
        assert!(read(AggregateFn::Sum, "\"12\"").is_err());
        assert!(read(AggregateFn::Avg, "1e400").is_err());
        assert_eq!(read(AggregateFn::Sum, "null"), Ok(Arg::Null));
        assert!(read(AggregateFn::CountDistinct, "\"12\"").is_ok());
    }

    #[test]
    fn a_number_reads_as_the_float_its_text_parses_to() {
        for text in [
            "0.1",
            "-3.75",
            "12345678.9",
            "9007199254740993",
            "1.000000000000000001",
            "123456789012345678901234",
            "1e-7",
            "0",
        ] {
            let Ok(Arg::Number(number)) =
                Arg::read(AggregateFn::Min, Some(text.as_bytes()), Span::new(0, 0))
            else {
                panic!("{text} is a number");
            };
            assert_eq!(number.float, text.parse::<f64>().unwrap(), "{text}");
        }
        assert_eq!(decimal(b"-3.75"), Some((-375, 2)));
        assert_eq!(
            decimal(b"123456789012345678901234"),
            Some((123456789012345678901234, 0))
        );
        assert_eq!(decimal(b"1.5e3"), None);
        assert_eq!(short_decimal(b"-3.75"), Some((-375, 2)));
        assert_eq!(
            short_decimal(b"999999999999999999"),
            Some((999_999_999_999_999_999, 0))
        );
        assert_eq!(short_decimal(b"9999999999999999999"), None, "19 digits");
        let mut sum = Accumulator::new(&spec(AggregateFn::Sum));
        add(&mut sum, AggregateFn::Sum, "9999999999999999999", 1, 0);
        add(&mut sum, AggregateFn::Sum, "0.5", 1, 1);
        let mut text = String::new();
        sum.write_json(&mut text);
        assert_eq!(
            text, "9999999999999999999.5",
            "a long decimal is still added exactly"
        );
    }
}
