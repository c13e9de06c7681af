//! How a record's JSON fields become a row: each column takes the field of
//! its name, as text the server casts to the column's type. Checked here,
//! per record, so that a record that does not fit is dead-lettered with the
//! column at fault instead of failing a whole transaction.

use std::collections::HashMap;

use serde_json::value::RawValue;

/// What a column's type takes from JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer in `min..=max`.
    Integer { min: i64, max: i64 },
    /// A number (`real`, `double precision`, `numeric`).
    Number,
    /// `true` or `false`.
    Bool,
    /// A string's text, or any other value's JSON.
    Text,
    /// The value's JSON text.
    Json,
    /// A string the server reads, or a number: milliseconds since the epoch.
    Timestamp,
    /// A string's text, or any other value's JSON, for the server to read.
    Other,
}

impl Kind {
    /// The kind of a type as `format_type` names it.
    pub fn of(sql_type: &str) -> Kind {
        let base = sql_type.split('(').next().unwrap_or(sql_type).trim();
        match base {
            "smallint" | "int2" => Kind::Integer {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            },
            "integer" | "int" | "int4" => Kind::Integer {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
            "bigint" | "int8" => Kind::Integer {
                min: i64::MIN,
                max: i64::MAX,
            },
            "real" | "float4" | "double precision" | "float8" | "numeric" | "decimal" => {
                Kind::Number
            }
            "boolean" | "bool" => Kind::Bool,
            "text" | "character varying" | "varchar" | "character" | "char" => Kind::Text,
            "json" | "jsonb" => Kind::Json,
            t if t.starts_with("timestamp") => Kind::Timestamp,
            _ => Kind::Other,
        }
    }
}

/// A column written: its name, SQL type and kind, and whether it is part
/// of the key.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
    pub kind: Kind,
    pub key: bool,
}

/// The text of `raw` for a column of `kind`; `None` for SQL `NULL`.
fn text(kind: Kind, raw: &RawValue) -> Result<Option<String>, String> {
    let json = raw.get();
    if json == "null" {
        return Ok(None);
    }
    let string = || -> Option<String> {
        json.starts_with('"')
            .then(|| serde_json::from_str::<String>(json).ok())
            .flatten()
    };
    match kind {
        Kind::Integer { min, max } => match json.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(json.to_owned())),
            Ok(_) => Err(format!("{json} is out of the column's range")),
            Err(_) => Err(format!("{json} is not an integer")),
        },
        Kind::Number => match json.as_bytes()[0] {
            b'-' | b'0'..=b'9' => Ok(Some(json.to_owned())),
            _ => Err(format!("{json} is not a number")),
        },
        Kind::Bool => match json {
            "true" | "false" => Ok(Some(json.to_owned())),
            _ => Err(format!("{json} is not true or false")),
        },
        Kind::Json => Ok(Some(json.to_owned())),
        Kind::Timestamp => match json.parse::<i64>() {
            Ok(millis) => Ok(Some(timestamp(millis))),
            Err(_) => string().map(Some).ok_or_else(|| {
                format!("{json} is neither a time string nor milliseconds since the epoch")
            }),
        },
        Kind::Text | Kind::Other => Ok(Some(string().unwrap_or_else(|| json.to_owned()))),
    }
}

/// `millis` since the epoch as a time the server reads (UTC).
fn timestamp(millis: i64) -> String {
    let seconds = millis.div_euclid(1000);
    let sub = millis.rem_euclid(1000);
    match u64::try_from(seconds) {
        Ok(seconds) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            let whole = humantime::format_rfc3339_seconds(at).to_string();
            // `...Z` -> `....mmmZ`
            format!("{}.{sub:03}Z", whole.trim_end_matches('Z'))
        }
        // Before 1970: let the server work it out.
        Err(_) => format!("epoch {seconds}s {sub}ms"),
    }
}

/// The row `value` (a JSON object) makes for `columns`: each column's text,
/// or why the record does not fit.
pub fn row(columns: &[Column], value: &[u8]) -> Result<Vec<Option<String>>, String> {
    let fields: HashMap<&str, &RawValue> = serde_json::from_slice(value)
        .map_err(|err| format!("the value is not a JSON object: {err}"))?;
    (columns.iter())
        .map(|column| {
            let Some(raw) = fields.get(column.name.as_str()) else {
                return match column.key {
                    true => Err(format!("key column `{}` has no field", column.name)),
                    false => Ok(None),
                };
            };
            match text(column.kind, raw) {
                Ok(None) if column.key => Err(format!("key column `{}` is null", column.name)),
                Ok(text) => Ok(text),
                Err(reason) => Err(format!(
                    "field `{}`: {reason} (column `{}` is {})",
                    column.name, column.name, column.sql_type
                )),
            }
        })
        .collect()
}

/// `name` quoted as an SQL identifier; `schema.name` quoted part by part.
pub fn quote(name: &str) -> String {
    (name.split('.'))
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, sql_type: &str, key: bool) -> Column {
        Column {
            name: name.into(),
            sql_type: sql_type.into(),
            kind: Kind::of(sql_type),
            key,
        }
    }

    #[test]
    fn fields_become_column_text_or_say_which_column_they_do_not_fit() {
        let columns = [
            column("k", "text", true),
            column("n", "integer", false),
            column("at", "timestamp with time zone", false),
            column("doc", "jsonb", false),
            column("amount", "numeric(12,2)", false),
        ];
        let row = |json: &str| row(&columns, json.as_bytes());
        assert_eq!(
            row(r#"{"k":"a\"b","n":7,"at":1500,"doc":{"x":[1]},"amount":12.5}"#).unwrap(),
            [
                Some("a\"b".into()),
                Some("7".into()),
                Some("1970-01-01T00:00:01.500Z".into()),
                Some(r#"{"x":[1]}"#.into()),
                Some("12.5".into()),
            ]
        );
        assert_eq!(row(r#"{"k":"a"}"#).unwrap()[1], None, "absent: NULL");
        let err = row(r#"{"k":"a","n":3000000000}"#).unwrap_err();
        assert!(
            err.contains("column `n` is integer") && err.contains("range"),
            "{err}"
        );
        let err = row(r#"{"k":"a","n":"7"}"#).unwrap_err();
        assert!(err.contains("not an integer"), "{err}");
        let err = row(r#"{"n":1}"#).unwrap_err();
        assert!(err.contains("key column `k` has no field"), "{err}");
        let err = row(r#"{"k":null}"#).unwrap_err();
        assert!(err.contains("key column `k` is null"), "{err}");
        assert!(row("[1]").unwrap_err().contains("not a JSON object"));
    }

    #[test]
    fn names_are_quoted_part_by_part() {
        assert_eq!(quote("public.my\"t"), "\"public\".\"my\"\"t\"");
    }
}
