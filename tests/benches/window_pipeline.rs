//! A 10 s tumbling window, file to file, whole process: `weir run` over 2 M
//! payment events (~100 B of JSON, 10,000 users, event time advancing
//! ~10,000 events/s with +-250 ms of jitter, 1 s watermark delay, sum and
//! count per user) next to a naive native program (single-threaded, serde
//! and a HashMap) built into this binary and run as a process in the same
//! invocation. The native program's windows are the reference: weir's must
//! be the same, exactly (the jitter is within the delay, so no event is
//! late). Goals: weir <= 0.5x the native time, peak RSS <= 64 MB. Then the
//! same sum and count as a plugin aggregate (the `sum-count` fixture):
//! goal <= 1.5x the built-in's time.
//!
//! Run: `cargo bench -p weir-tests --bench window_pipeline`
//! (`WEIR_BENCH_EVENTS`, `WEIR_BENCH_RUNS`). Prints a table, then one JSON
//! summary line.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark that cannot unwrap has failed"
)]

#[path = "../it/support.rs"]
#[allow(
    dead_code,
    reason = "shared with the tests; the benchmark uses part of it"
)]
mod support;

#[path = "measure.rs"]
#[allow(
    dead_code,
    reason = "shared by the benchmarks; this one uses part of it"
)]
mod measure;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead as _, BufWriter, Write as _};
use std::path::Path;
use std::process::Command;

use measure::{Run, median, timed};
use serde::Deserialize;

const NATIVE_MODE: &str = "WEIR_BENCH_NATIVE";
const WINDOW_MS: i64 = 10_000;

fn main() {
    if measure::serve_as_spawner() {
        return;
    }
    if std::env::var_os(NATIVE_MODE).is_some() {
        let mut args = std::env::args_os().skip(1).filter(|a| a != "--bench");
        let (input, output) = (args.next().unwrap(), args.next().unwrap());
        native_window(input.as_ref(), output.as_ref());
        return;
    }
    let events = env_or("WEIR_BENCH_EVENTS", 2_000_000);
    let runs = env_or("WEIR_BENCH_RUNS", 5);
    let scratch = support::Scratch::new();
    let input = scratch.path("events.jsonl");
    let bytes = generate(&input, events);
    println!(
        "window_pipeline: {events} events, {:.1} MB, 10 s tumbling window, sum + count per user, file -> file, median of {runs} interleaved rounds",
        bytes as f64 / 1e6
    );
    let builtin =
        r#"{ fn = "sum", field = "amount", as = "sum_amount" }, { fn = "count", as = "cnt" }"#;
    let plugin = support::plugin("sum-count");
    let aggregate = format!(
        r#"{{ wasm = {:?}, as = "agg", config = {{ field = "amount" }} }}"#,
        plugin.display().to_string()
    );
    // Each round runs every case once, so that the machine's ups and
    // downs touch them alike; each case's figure is its median run.
    let cases: [(&str, Option<(&str, &str)>); 4] = [
        ("native", None),
        ("window-lines", Some(("lines", builtin))),
        ("window-json", Some(("json", builtin))),
        ("window-wasm", Some(("lines", &aggregate))),
    ];
    let mut all: [Vec<Run>; 4] = Default::default();
    for _ in 0..runs.max(1) {
        for ((name, weir), runs) in cases.iter().zip(&mut all) {
            runs.push(match weir {
                None => {
                    let output = scratch.path("native.jsonl");
                    let mut command = Command::new(std::env::current_exe().unwrap());
                    command.env(NATIVE_MODE, "1").arg(&input).arg(&output);
                    timed(&mut command, output)
                }
                Some((format, aggregates)) => {
                    weir_window(&scratch, name, &input, format, aggregates)
                }
            });
        }
    }
    let [native, lines, json, wasm] = all.map(median);
    let want = windows(&native.output);
    let mut summary = serde_json::Map::new();
    for (name, weir) in [("window-lines", &lines), ("window-json", &json)] {
        let got = windows(&weir.output);
        assert!(
            got == want,
            "{name}: weir's {} windows differ from the reference's {}",
            got.len(),
            want.len()
        );
        let ratio = weir.seconds / native.seconds;
        println!(
            "  {name:<13} weir {:.3} s, {:>3} MiB | native serde+HashMap {:.3} s, {:>3} MiB | {ratio:.2}x (goal <= 0.5x, RSS <= 64 MiB) | {} windows, exact",
            weir.seconds,
            weir.peak_rss_mib,
            native.seconds,
            native.peak_rss_mib,
            got.len()
        );
        summary.insert(
            name.into(),
            serde_json::json!({
                "weir_s": weir.seconds,
                "native_s": native.seconds,
                "ratio": ratio,
                "peak_rss_mib": weir.peak_rss_mib,
                "windows": got.len(),
            }),
        );
    }
    let name = "window-wasm";
    let got = windows(&wasm.output);
    assert!(
        got == want,
        "{name}: the plugin's windows differ from the reference's"
    );
    let builtin = lines.seconds;
    let ratio = wasm.seconds / builtin;
    println!(
        "  {name:<13} weir {:.3} s, {:>3} MiB | built-in sum + count (lines) {builtin:.3} s | {ratio:.2}x (goal <= 1.5x) | {:.2}x native | {} windows, exact",
        wasm.seconds,
        wasm.peak_rss_mib,
        wasm.seconds / native.seconds,
        got.len()
    );
    summary.insert(
        name.into(),
        serde_json::json!({
            "weir_s": wasm.seconds,
            "builtin_s": builtin,
            "ratio_to_builtin": ratio,
            "peak_rss_mib": wasm.peak_rss_mib,
            "windows": got.len(),
        }),
    );
    summary.insert("bench".into(), "window_pipeline".into());
    println!("{}", serde_json::Value::Object(summary));
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn weir_window(
    scratch: &support::Scratch,
    name: &str,
    input: &Path,
    format: &str,
    aggregates: &str,
) -> Run {
    let output = scratch.path(&format!("{name}.jsonl"));
    let _ = std::fs::remove_file(&output);
    let pipeline = scratch.path(&format!("{name}.toml"));
    std::fs::write(
        &pipeline,
        format!(
            r#"
[[pipeline]]
name = {name:?}
source = {{ type = "file", path = {input:?}, format = {format:?} }}

[pipeline.window]
kind = "tumbling"
size = "10s"
key = "user_id"
time = "ts"
watermark_delay = "1s"
aggregates = [ {aggregates} ]

[[pipeline.sink]]
type = "file"
path = {output:?}
"#,
            input = input.display().to_string(),
            output = output.display().to_string(),
        ),
    )
    .unwrap();
    let mut command = support::weir_command(scratch, &["run", pipeline.to_str().unwrap()]);
    timed(&mut command, output)
}

/// (user, window start, sum, count) of every window in a results file
/// (the built-ins' `sum_amount` and `cnt`, or the plugin's `agg`).
fn windows(path: &Path) -> BTreeSet<(String, i64, i64, u64)> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (sum, count) = match v.get("agg") {
                Some(agg) => (&agg["sum"], &agg["count"]),
                None => (&v["sum_amount"], &v["cnt"]),
            };
            (
                v["key"].as_str().unwrap().to_owned(),
                v["window_start"].as_i64().unwrap(),
                sum.as_i64().unwrap(),
                count.as_u64().unwrap(),
            )
        })
        .collect()
}

/// Writes `events` payments, the same every run; returns the bytes.
fn generate(path: &Path, events: usize) -> u64 {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut rng = fastrand::Rng::with_seed(42);
    let mut bytes = 0;
    for i in 0..events as i64 {
        let ts = 1_700_000_000_000 + i / 10 + rng.i64(-250..=250);
        let line = format!(
            r#"{{"user_id":"user-{:04}","ts":{ts},"amount":{},"currency":"EUR","merchant":"m-{:03}"}}"#,
            rng.u32(0..10_000),
            rng.u32(1..100_000),
            rng.u32(0..1000),
        );
        writeln!(out, "{line}").unwrap();
        bytes += line.len() as u64 + 1;
    }
    out.flush().unwrap();
    bytes
}

/// The naive program: serde into a struct, a HashMap of windows, every
/// window written at the end.
fn native_window(input: &Path, output: &Path) {
    #[derive(Deserialize)]
    struct Event {
        user_id: String,
        ts: i64,
        amount: i64,
    }
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(input).unwrap());
    let mut windows: HashMap<(String, i64), (i64, u64)> = HashMap::new();
    for line in reader.lines() {
        let line = line.unwrap();
        let event: Event = serde_json::from_str(&line).unwrap();
        let start = event.ts.div_euclid(WINDOW_MS) * WINDOW_MS;
        let window = windows.entry((event.user_id, start)).or_default();
        window.0 += event.amount;
        window.1 += 1;
    }
    let mut out = BufWriter::new(std::fs::File::create(output).unwrap());
    for ((user, start), (sum, count)) in windows {
        writeln!(
            out,
            r#"{{"window_start":{start},"window_end":{},"key":"{user}","sum_amount":{sum},"cnt":{count}}}"#,
            start + WINDOW_MS
        )
        .unwrap();
    }
    out.flush().unwrap();
}
