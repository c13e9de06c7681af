//! `[pipeline.window]`: the window kind and its sizes, where the key and the
//! event time come from, watermarks, lateness and the aggregates.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::PluginSource;

/// A pipeline's event-time window, as the file gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `tumbling`, `hopping` or `session`.
    pub kind: WindowKindName,
    /// Tumbling and hopping: how long a window lasts (`10s`, `500ms`, `1m`).
    pub size: Option<String>,
    /// Hopping: how far apart windows start.
    pub slide: Option<String>,
    /// Session: the quiet time that ends a key's session.
    pub gap: Option<String>,
    /// A top-level JSON field of the value to group by; the record key
    /// when omitted.
    pub key: Option<String>,
    /// A top-level JSON field holding the event time in epoch milliseconds;
    /// the record timestamp when omitted.
    pub time: Option<String>,
    /// Bounded out-of-orderness: the watermark trails the latest event time
    /// seen by this much.
    #[serde(default = "zero")]
    pub watermark_delay: String,
    /// How long after its end a window still takes late records (and
    /// emits an updated result for each).
    #[serde(default = "zero")]
    pub allowed_lateness: String,
    /// A partition (a Kafka partition, a file) without records for this
    /// long stops holding the watermark back.
    #[serde(default = "default_idle")]
    pub idle_timeout: String,
    /// The route late records go to (a sink takes it like any other).
    #[serde(default = "default_late_route")]
    pub late_route: String,
    /// What each window computes per key.
    pub aggregates: Vec<AggregateConfig>,
}

fn zero() -> String {
    "0s".into()
}

fn default_idle() -> String {
    "5s".into()
}

fn default_late_route() -> String {
    "late".into()
}

/// The kinds of window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKindName {
    /// Fixed, back to back.
    Tumbling,
    /// Fixed size, starting every `slide`.
    Hopping,
    /// Per key, until a gap in its events.
    Session,
}

/// One aggregate: built in, `{ fn = "sum", field = "amount", as =
/// "sum_amount" }`, or a plugin, `{ wasm = "top_n.wasm", as = "top3",
/// config = { field = "amount", n = 3 } }` (or `crate = "plugins/top-n"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// A built-in function.
    #[serde(rename = "fn")]
    pub function: Option<AggregateFn>,
    /// The top-level JSON field it reads; `count` counts records without one.
    pub field: Option<String>,
    /// The name of its output field; `FN_FIELD` (or `count`) by default,
    /// required for a plugin.
    #[serde(rename = "as")]
    pub name: Option<String>,
    /// A plugin aggregate's component (world `weir:plugin/aggregator`),
    /// relative to the pipeline file.
    pub wasm: Option<PathBuf>,
    /// A plugin aggregate's crate, built for `wasm32-wasip2` before the run.
    #[serde(rename = "crate")]
    pub crate_dir: Option<PathBuf>,
    /// A plugin aggregate's settings, passed to its `init` as JSON.
    pub config: Option<toml::Table>,
}

/// The built-in aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateFn {
    /// Records (with a field: records where it is present and not null).
    Count,
    /// The sum of a numeric field.
    Sum,
    /// The smallest value of a numeric field.
    Min,
    /// The largest value of a numeric field.
    Max,
    /// The mean of a numeric field.
    Avg,
    /// The field's value in the earliest record (by event time, then arrival).
    First,
    /// The field's value in the latest record (by event time, then arrival).
    Last,
    /// How many distinct values the field takes (exact).
    CountDistinct,
    /// A plugin's (never named in a file: a `wasm` or `crate` says it).
    #[serde(skip)]
    Plugin,
}

impl AggregateFn {
    fn name(self) -> &'static str {
        match self {
            AggregateFn::Count => "count",
            AggregateFn::Sum => "sum",
            AggregateFn::Min => "min",
            AggregateFn::Max => "max",
            AggregateFn::Avg => "avg",
            AggregateFn::First => "first",
            AggregateFn::Last => "last",
            AggregateFn::CountDistinct => "count_distinct",
            AggregateFn::Plugin => "plugin",
        }
    }
}

/// A window's shape on the time line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Windows `[k * size, (k + 1) * size)`.
    Tumbling {
        /// Milliseconds.
        size: i64,
    },
    /// Windows `[k * slide, k * slide + size)`.
    Hopping {
        /// Milliseconds.
        size: i64,
        /// Milliseconds.
        slide: i64,
    },
    /// Per key, `[first event, last event + gap)`.
    Session {
        /// Milliseconds.
        gap: i64,
    },
}

/// One aggregate, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateSpec {
    /// The function ([`AggregateFn::Plugin`] for a plugin).
    pub function: AggregateFn,
    /// The field it reads.
    pub field: Option<String>,
    /// Its output field.
    pub name: String,
    /// A plugin aggregate: where it comes from and its settings as JSON.
    pub plugin: Option<(PluginSource, String)>,
}

/// A window, checked: what the operator runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// Its shape.
    pub kind: WindowKind,
    /// The JSON field to group by, or the record key.
    pub key: Option<String>,
    /// The JSON field with the event time, or the record timestamp.
    pub time: Option<String>,
    /// Milliseconds.
    pub watermark_delay: i64,
    /// Milliseconds.
    pub allowed_lateness: i64,
    /// Processing time.
    pub idle_timeout: Duration,
    /// Where late records go.
    pub late_route: String,
    /// What it computes.
    pub aggregates: Vec<AggregateSpec>,
}

/// Reads `10s`, `500ms`, `1m30s` and the like.
pub fn parse_duration(text: &str, what: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        format!("`{what}` = {text:?} is not a duration like \"10s\" or \"500ms\": {err}")
    })
}

fn millis(text: &str, what: &str) -> Result<i64, String> {
    let duration = parse_duration(text, what)?;
    i64::try_from(duration.as_millis()).map_err(|_| format!("`{what}` = {text:?} is too long"))
}

fn positive_millis(text: Option<&str>, what: &str, kind: &str) -> Result<i64, String> {
    let text = text.ok_or_else(|| format!("a {kind} window needs `{what}`"))?;
    match millis(text, what)? {
        0 => Err(format!("`{what}` must be at least 1ms")),
        ms => Ok(ms),
    }
}

impl AggregateConfig {
    /// A plugin aggregate's source and settings (JSON), if it is one.
    fn plugin(&self) -> Result<Option<(PluginSource, String)>, String> {
        let source = match (&self.wasm, &self.crate_dir) {
            (Some(_), Some(_)) => {
                return Err("a plugin aggregate has `wasm` or `crate`, not both".into());
            }
            (Some(wasm), None) => PluginSource::Wasm(wasm.clone()),
            (None, Some(dir)) => PluginSource::Crate(dir.clone()),
            (None, None) => return Ok(None),
        };
        let config = toml::Value::Table(self.config.clone().unwrap_or_default());
        Ok(Some((
            source,
            crate::config::toml_to_json(&config).to_string(),
        )))
    }

    /// Makes a plugin aggregate's relative path relative to `base` (the
    /// pipeline file's folder).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for path in [&mut self.wasm, &mut self.crate_dir].into_iter().flatten() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

impl WindowConfig {
    /// The window this config describes, or what is wrong with it.
    pub fn spec(&self) -> Result<WindowSpec, String> {
        let unused = |field: &str, set: bool| -> Result<(), String> {
            match set {
                true => Err(format!(
                    "a {} window takes no `{field}`",
                    match self.kind {
                        WindowKindName::Tumbling => "tumbling",
                        WindowKindName::Hopping => "hopping",
                        WindowKindName::Session => "session",
                    }
                )),
                false => Ok(()),
            }
        };
        let kind = match self.kind {
            WindowKindName::Tumbling => {
                unused("slide", self.slide.is_some())?;
                unused("gap", self.gap.is_some())?;
                WindowKind::Tumbling {
                    size: positive_millis(self.size.as_deref(), "size", "tumbling")?,
                }
            }
            WindowKindName::Hopping => {
                unused("gap", self.gap.is_some())?;
                let size = positive_millis(self.size.as_deref(), "size", "hopping")?;
                let slide = positive_millis(self.slide.as_deref(), "slide", "hopping")?;
                if slide > size {
                    return Err(format!(
                        "a hopping window's `slide` ({slide} ms) longer than its `size` ({size} ms) would skip events"
                    ));
                }
                WindowKind::Hopping { size, slide }
            }
            WindowKindName::Session => {
                unused("size", self.size.is_some())?;
                unused("slide", self.slide.is_some())?;
                WindowKind::Session {
                    gap: positive_millis(self.gap.as_deref(), "gap", "session")?,
                }
            }
        };
        if self.aggregates.is_empty() {
            return Err(
                "a window needs at least one aggregate, e.g. `aggregates = [{ fn = \"count\" }]`"
                    .into(),
            );
        }
        let mut aggregates = Vec::with_capacity(self.aggregates.len());
        for aggregate in &self.aggregates {
            let plugin = aggregate.plugin()?;
            let function = match (aggregate.function, &plugin) {
                (Some(function), None) => function,
                (None, Some(_)) => AggregateFn::Plugin,
                (Some(_), Some(_)) => {
                    return Err(
                        "an aggregate is built in (`fn`) or a plugin (`wasm` or `crate`), not both"
                            .into(),
                    );
                }
                (None, None) => {
                    return Err("an aggregate needs `fn` (a built-in: count, sum, min, max, avg, first, last, count_distinct) or `wasm`/`crate` (a plugin)".into());
                }
            };
            if plugin.is_some() && (aggregate.field.is_some() || aggregate.name.is_none()) {
                return Err("a plugin aggregate needs `as` (its output field) and takes no `field`: its `config` says what it reads".into());
            }
            if plugin.is_none() && aggregate.config.is_some() {
                return Err(format!(
                    "built-in aggregate `{}` takes no `config`",
                    function.name()
                ));
            }
            if function != AggregateFn::Count && plugin.is_none() && aggregate.field.is_none() {
                return Err(format!("aggregate `{}` needs a `field`", function.name()));
            }
            let name = match (&aggregate.name, &aggregate.field) {
                (Some(name), _) => name.clone(),
                (None, Some(field)) => format!("{}_{field}", function.name()),
                (None, None) => function.name().to_owned(),
            };
            if ["window_start", "window_end", "key"].contains(&name.as_str()) {
                return Err(format!(
                    "aggregate output `{name}` would hide the window's own `{name}`"
                ));
            }
            if aggregates.iter().any(|a: &AggregateSpec| a.name == name) {
                return Err(format!(
                    "two aggregates are called `{name}`; set `as` on one"
                ));
            }
            aggregates.push(AggregateSpec {
                function,
                field: aggregate.field.clone(),
                name,
                plugin,
            });
        }
        Ok(WindowSpec {
            kind,
            key: self.key.clone(),
            time: self.time.clone(),
            watermark_delay: millis(&self.watermark_delay, "watermark_delay")?,
            allowed_lateness: millis(&self.allowed_lateness, "allowed_lateness")?,
            idle_timeout: parse_duration(&self.idle_timeout, "idle_timeout")?,
            late_route: self.late_route.clone(),
            aggregates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<WindowSpec, String> {
        toml::from_str::<WindowConfig>(text)
            .map_err(|e| e.to_string())?
            .spec()
    }

    #[test]
    fn a_tumbling_window_reads_its_durations_and_names_its_aggregates() {
        let spec = config(
            r#"
kind = "tumbling"
size = "10s"
key = "user_id"
time = "ts"
watermark_delay = "1s"
aggregates = [ { fn = "sum", field = "amount", as = "total" }, { fn = "count" }, { fn = "max", field = "amount" } ]
"#,
        )
        .unwrap();
        assert_eq!(spec.kind, WindowKind::Tumbling { size: 10_000 });
        assert_eq!(spec.watermark_delay, 1000);
        assert_eq!(spec.idle_timeout, Duration::from_secs(5));
        let names: Vec<&str> = spec.aggregates.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["total", "count", "max_amount"]);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (r#"kind = "tumbling""#, "needs `size`"),
            (
                r#"kind = "hopping"
size = "10s""#,
                "needs `slide`",
            ),
            (
                r#"kind = "hopping"
size = "1s"
slide = "2s""#,
                "would skip events",
            ),
            (
                r#"kind = "session"
size = "1s""#,
                "takes no `size`",
            ),
            (
                r#"kind = "tumbling"
size = "ten""#,
                "not a duration",
            ),
            (
                r#"kind = "tumbling"
size = "0s""#,
                "at least 1ms",
            ),
        ];
        for (kind, expected) in cases {
            let err = config(&format!("{kind}\naggregates = [{{ fn = \"count\" }}]")).unwrap_err();
            assert!(err.contains(expected), "{kind}: {err}");
        }
        let err = config("kind = \"session\"\ngap = \"1s\"\naggregates = []").unwrap_err();
        assert!(err.contains("at least one aggregate"), "{err}");
        let err = config("kind = \"session\"\ngap = \"1s\"\naggregates = [{ fn = \"sum\" }]")
            .unwrap_err();
        assert!(err.contains("needs a `field`"), "{err}");
        let err = config("kind = \"session\"\ngap = \"1s\"\naggregates = [{ fn = \"count\" }, { fn = \"count\" }]")
            .unwrap_err();
        assert!(err.contains("two aggregates are called `count`"), "{err}");
    }
}
