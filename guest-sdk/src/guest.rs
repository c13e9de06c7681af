//! The plugin author's side: the `Transform` trait, the output builder, the
//! per-batch loop that the exported `process` runs, and the host imports.

use std::any::Any;
use std::cell::RefCell;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{BatchReader, OutcomeWriter, RecordView};
use crate::{Error, Result};

/// A record transform. Implement it on a struct that deserialises from the
/// plugin's `config` table and export it with [`crate::export_transform!`].
pub trait Transform: DeserializeOwned + 'static {
    /// Checks the settings once after they are deserialised. An `Err` stops
    /// the pipeline at start and its message reaches the operator verbatim.
    fn validate(&mut self) -> Result<()> {
        Ok(())
    }

    /// Turns one record into zero or more outputs written to `out`.
    /// Writing nothing drops the record; `Err` fails this record alone and
    /// discards what it had written.
    fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()>;
}

/// Where a plugin writes a record's outputs.
pub struct Output(OutcomeWriter);

impl Output {
    /// Passes the record being processed on unchanged: key, value, headers
    /// and timestamp. Nothing is copied; the host reuses its own copy, so
    /// this is the cheapest output there is.
    pub fn forward(&mut self, record: &RecordView<'_>) {
        let _ = record;
        self.0.forward(None);
    }

    /// Passes the record being processed on unchanged, to the named output
    /// `route`.
    pub fn forward_to(&mut self, record: &RecordView<'_>, route: &str) {
        let _ = record;
        self.0.forward(Some(route));
    }

    /// Emits a new record with this value. Set its key, route, timestamp
    /// and headers on the returned builder; it is written when the builder
    /// is dropped. It has no key unless one is set.
    pub fn emit<'a>(&mut self, value: &[u8]) -> Emit<'_, 'a> {
        let (start, buf) = self.0.begin_output();
        buf.extend_from_slice(value);
        Emit::new(&mut self.0, start)
    }

    /// Emits a new record whose value `write` appends to the buffer it is
    /// given: serialise straight into the reply, with no copy.
    pub fn emit_with<'a>(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<()>,
    ) -> Result<Emit<'_, 'a>> {
        let (start, buf) = self.0.begin_output();
        if let Err(err) = write(buf) {
            self.0.abandon_output(start);
            return Err(err);
        }
        Ok(Emit::new(&mut self.0, start))
    }

    /// Emits `value` serialised as JSON.
    pub fn emit_json<'a>(&mut self, value: &impl Serialize) -> Result<Emit<'_, 'a>> {
        self.emit_with(|buf| serde_json::to_writer(buf, value).map_err(Error::from))
    }
}

/// A record being emitted; written to the reply when dropped.
#[must_use = "the record is written when this builder is dropped; set its fields first"]
pub struct Emit<'o, 'a> {
    out: &'o mut OutcomeWriter,
    start: usize,
    key: Option<&'a [u8]>,
    timestamp: Option<i64>,
    route: Option<&'a str>,
    headers: Vec<(&'a str, &'a [u8])>,
}

impl<'o, 'a> Emit<'o, 'a> {
    fn new(out: &'o mut OutcomeWriter, start: usize) -> Self {
        Emit {
            out,
            start,
            key: None,
            timestamp: None,
            route: None,
            headers: Vec::new(),
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: &'a [u8]) -> Self {
        self.key = Some(key);
        self
    }

    /// Routes the record to the pipeline's output named `route`.
    pub fn to(mut self, route: &'a str) -> Self {
        self.route = Some(route);
        self
    }

    /// Sets a new event time (ms since the epoch); by default the input's
    /// is kept.
    pub fn timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &'a str, value: &'a [u8]) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl Drop for Emit<'_, '_> {
    fn drop(&mut self) {
        let headers = std::mem::take(&mut self.headers);
        self.out.end_output(
            self.start,
            self.key,
            self.timestamp,
            self.route,
            headers.into_iter(),
        );
    }
}

/// Builds a plugin from its settings (JSON) the way the host's `init` does:
/// deserialise, then [`Transform::validate`].
pub fn configure<T: Transform>(config: &str) -> Result<T, String> {
    let mut plugin: T = serde_json::from_str(config).map_err(|e| format!("invalid config: {e}"))?;
    plugin.validate().map_err(|e| e.to_string())?;
    Ok(plugin)
}

/// Runs `plugin` over a packed batch and returns the packed outcomes: what
/// the exported `process` does, callable natively.
///
/// # Panics
///
/// If `batch` does not follow the layout: the host never sends one, and
/// inside the sandbox the panic is a trap that the host reports.
pub fn process_batch<T: Transform>(plugin: &mut T, batch: &[u8]) -> Vec<u8> {
    let reader = match BatchReader::new(batch) {
        Ok(reader) => reader,
        Err(err) => panic!("weir host sent a malformed batch: {err}"),
    };
    let mut out = Output(OutcomeWriter::with_capacity(batch.len() + 64));
    for record in reader {
        let record = match record {
            Ok(record) => record,
            Err(err) => panic!("weir host sent a malformed batch: {err}"),
        };
        out.0.begin();
        match plugin.process(record, &mut out) {
            Ok(()) => out.0.commit(),
            Err(err) => out.0.fail(err.message()),
        }
    }
    out.0.finish()
}

thread_local! {
    /// The one plugin instance of this component, set by `init`.
    static PLUGIN: RefCell<Option<Box<dyn Any>>> = RefCell::new(None);
}

#[doc(hidden)]
pub fn init_exported<T: Transform>(config: &str) -> Result<(), String> {
    let plugin = configure::<T>(config)?;
    PLUGIN.with(|slot| *slot.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

#[doc(hidden)]
pub fn process_exported<T: Transform>(batch: &[u8]) -> Vec<u8> {
    PLUGIN.with(|slot| {
        let mut slot = slot.borrow_mut();
        match slot.as_mut().and_then(|p| p.downcast_mut::<T>()) {
            Some(plugin) => process_batch(plugin, batch),
            None => panic!("weir host called process before a successful init"),
        }
    })
}

/// Writes to the host's log, tagged with the pipeline and this plugin.
/// Natively (in `cargo test`), lines go to stderr.
pub mod log {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::weir::plugin::host::{Level, log as host_log};

    macro_rules! level_fn {
        ($name:ident, $level:ident) => {
            #[doc = concat!("Logs `message` at ", stringify!($name), " level.")]
            pub fn $name(message: &str) {
                #[cfg(target_arch = "wasm32")]
                host_log(Level::$level, message);
                #[cfg(not(target_arch = "wasm32"))]
                eprintln!("[{}] {message}", stringify!($name));
            }
        };
    }

    level_fn!(trace, Trace);
    level_fn!(debug, Debug);
    level_fn!(info, Info);
    level_fn!(warn, Warn);
    level_fn!(error, Error);
}

/// Adds `delta` to this plugin's counter `name`, exported by the host as
/// `weir_plugin_events_total{plugin, name}`. Natively, it adds to a
/// per-thread tally that [`crate::testing::counter`] reads.
pub fn counter(name: &str, delta: u64) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::weir::plugin::host::add_to_counter(name, delta);
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::add_to_native_counter(name, delta);
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::testing::{TestOutcome, TestRecord, run};

    /// Emits per the record's value: the edge cases of the output builder.
    #[derive(Deserialize)]
    struct Edges;

    impl Transform for Edges {
        fn process(&mut self, record: RecordView<'_>, out: &mut Output) -> Result<()> {
            match record.value() {
                b"handled" => {
                    // A serialiser that fails half way, handled by the plugin.
                    let failed = out
                        .emit_with(|buf| {
                            buf.extend_from_slice(b"{\"half");
                            Err(Error::new("cannot serialise"))
                        })
                        .is_err();
                    assert!(failed);
                    drop(out.emit(b"after"));
                }
                b"long-route" => drop(out.emit(b"x").to(&"r".repeat(70_000))),
                b"long-forward" => out.forward_to(&record, &"r".repeat(70_000)),
                b"many-headers" => {
                    let mut emit = out.emit(b"x");
                    for _ in 0..70_000 {
                        emit = emit.header("h", b"v");
                    }
                }
                _ => out.forward(&record),
            }
            Ok(())
        }
    }

    fn outcome(value: &str) -> TestOutcome {
        run(
            &mut Edges,
            &[TestRecord::new(value), TestRecord::new("next")],
        )
        .into_iter()
        .next()
        .unwrap()
    }

    #[test]
    fn a_handled_emit_with_error_leaves_no_trace_in_the_reply() {
        let outcome = outcome("handled");
        let values: Vec<_> = outcome.outputs().iter().map(|o| o.value_str()).collect();
        assert_eq!(values, ["after"]);
    }

    #[test]
    fn fields_past_their_length_limit_fail_the_record_instead_of_being_cut() {
        for (value, what) in [
            ("long-route", "route name's length is 70000"),
            ("long-forward", "route name's length is 70000"),
            ("many-headers", "header count is 65536"),
        ] {
            let failure = outcome(value).failure().map(str::to_owned);
            assert!(
                failure.as_deref().is_some_and(|f| f.contains(what)),
                "{value}: {failure:?}"
            );
        }
    }
}
