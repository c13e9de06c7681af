//! File → file throughput, whole process: `weir run` over 2 M JSON lines
//! (~100 B, 10,000 users) next to native single-threaded Rust programs doing
//! the same job, run as processes in the same invocation (this binary,
//! re-executed in a native mode), each timed from spawn to exit with its
//! peak RSS from `wait4`.
//!
//! | weir run                          | native baseline        | goal   |
//! |-----------------------------------|------------------------|--------|
//! | no plugin, `format = "lines"`     | line copy              | 1.25x  |
//! | no plugin, `format = "json"`      | weir with `lines`      | 1.3x   |
//! | identity plugin                   | line copy              | 1.5x   |
//! | json-filter (`amount >= 100`, 3 fields projected) | serde filter | 1.0x |
//!
//! Every weir output is checked against its baseline's, byte for byte.
//! Run: `cargo bench -p weir-tests --bench file_pipeline` (`WEIR_BENCH_LINES`
//! changes the line count, `WEIR_BENCH_RUNS` the runs per case, of which
//! the median is kept; `WEIR_BENCH_WEIR` runs another `weir` binary, e.g.
//! an earlier build). Prints a table, then one JSON summary line.

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
mod measure;

use std::io::{BufRead as _, BufWriter, Write as _};
use std::path::Path;
use std::process::Command;

use measure::{Run, best_of, timed};

use serde::Deserialize;
use serde_json::value::RawValue;

/// Set in a re-executed copy of this binary: which native baseline to run.
const NATIVE_MODE: &str = "WEIR_BENCH_NATIVE";

fn main() {
    if measure::serve_as_spawner() {
        return;
    }
    if let Ok(mode) = std::env::var(NATIVE_MODE) {
        let mut args = std::env::args_os().skip(1).filter(|a| a != "--bench");
        let (input, output) = (args.next().unwrap(), args.next().unwrap());
        match mode.as_str() {
            "copy" => native_copy(input.as_ref(), output.as_ref()),
            "filter" => native_filter(input.as_ref(), output.as_ref()),
            other => panic!("unknown native mode {other}"),
        }
        return;
    }
    let lines: usize = env_or("WEIR_BENCH_LINES", 2_000_000);
    let runs: usize = env_or("WEIR_BENCH_RUNS", 3);
    let scratch = support::Scratch::new();
    let input = scratch.path("in.jsonl");
    let bytes = generate(&input, lines);
    println!(
        "file_pipeline: {lines} JSON lines, {:.1} MB ({:.0} B/line), file -> file, whole process, median of {runs}",
        bytes as f64 / 1e6,
        bytes as f64 / lines as f64
    );
    let identity = support::plugin("identity");
    let json_filter = support::plugin("json-filter");

    let copy = best_of(runs, || native(&scratch, "copy", &input));
    let filter = best_of(runs, || native(&scratch, "filter", &input));
    let same = |weir: &Run, native: &Run| {
        assert!(
            same_bytes(&weir.output, &native.output),
            "weir's output {} differs from the baseline's {}",
            weir.output.display(),
            native.output.display()
        );
    };
    let lines_run = best_of(runs, || weir(&scratch, "lines", &input, "lines", None));
    same(&lines_run, &copy);
    let json_run = best_of(runs, || weir(&scratch, "json", &input, "json", None));
    same(&json_run, &copy);
    let identity_run = best_of(runs, || {
        weir(
            &scratch,
            "identity",
            &input,
            "lines",
            Some(plugin_line(&identity, "{}")),
        )
    });
    same(&identity_run, &copy);
    let filter_config =
        r#"{ field = "amount", min = 100.0, project = ["txn_id", "user_id", "amount"] }"#;
    let filter_run = best_of(runs, || {
        weir(
            &scratch,
            "json-filter",
            &input,
            "lines",
            Some(plugin_line(&json_filter, filter_config)),
        )
    });
    same(&filter_run, &filter);

    let rows = [
        (
            "no plugin (lines)",
            &lines_run,
            "native line copy",
            &copy,
            1.25,
        ),
        (
            "no plugin (json)",
            &json_run,
            "weir, lines",
            &lines_run,
            1.3,
        ),
        (
            "identity plugin",
            &identity_run,
            "native line copy",
            &copy,
            1.5,
        ),
        (
            "json-filter plugin",
            &filter_run,
            "native serde filter",
            &filter,
            1.0,
        ),
    ];
    println!(
        "{:<20} {:>8} {:>9}   {:<20} {:>8} {:>9}   {:>6} {:>5}",
        "weir", "s", "RSS MiB", "against", "s", "RSS MiB", "ratio", "goal"
    );
    let mut summary = serde_json::Map::new();
    for (name, weir, against, base, goal) in rows {
        let ratio = weir.seconds / base.seconds;
        println!(
            "{name:<20} {:>8.3} {:>9} {against:<20}   {:>8.3} {:>9}   {ratio:>5.2}x {goal:>4.2}x{}",
            weir.seconds,
            weir.peak_rss_mib,
            base.seconds,
            base.peak_rss_mib,
            if ratio <= goal && weir.peak_rss_mib <= 64 {
                ""
            } else {
                "  MISSED"
            }
        );
        summary.insert(
            name.into(),
            serde_json::json!({
                "seconds": weir.seconds,
                "peak_rss_mib": weir.peak_rss_mib,
                "baseline": against,
                "baseline_seconds": base.seconds,
                "ratio": ratio,
                "goal": goal,
            }),
        );
    }
    println!(
        "{}",
        serde_json::json!({ "bench": "file_pipeline", "lines": lines, "bytes": bytes, "cases": summary })
    );
}

/// Whether two files hold the same bytes, read a block at a time: this
/// process stays small, since a child's peak RSS counts what it shared
/// with this process before it started.
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read as _;
    let (mut a, mut b) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        if n == 0 {
            return b.read(&mut y).unwrap() == 0;
        }
        if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
            return false;
        }
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn native(scratch: &support::Scratch, mode: &str, input: &Path) -> Run {
    let output = scratch.path(&format!("native-{mode}.jsonl"));
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.env(NATIVE_MODE, mode).arg(input).arg(&output);
    timed(&mut command, output)
}

fn plugin_line(wasm: &Path, config: &str) -> String {
    format!(
        "[[pipeline.plugin]]\nwasm = {:?}\nconfig = {config}\n",
        wasm.display().to_string()
    )
}

fn weir(
    scratch: &support::Scratch,
    name: &str,
    input: &Path,
    format: &str,
    plugin: Option<String>,
) -> Run {
    let output = scratch.path(&format!("weir-{name}.jsonl"));
    let pipeline = scratch.path(&format!("{name}.toml"));
    std::fs::write(
        &pipeline,
        format!(
            "[[pipeline]]\nname = {name:?}\nsource = {{ type = \"file\", path = {:?}, format = {format:?} }}\n\
             {}\n[[pipeline.sink]]\ntype = \"file\"\npath = {:?}\n",
            input.display().to_string(),
            plugin.unwrap_or_default(),
            output.display().to_string(),
        ),
    )
    .unwrap();
    let mut command = support::weir_command(scratch, &["run", pipeline.to_str().unwrap()]);
    // Compile the plugin into the cache outside the timed run.
    if !scratch.path(&format!("{name}.warm")).exists() {
        timed(
            &mut support::weir_command(scratch, &["run", pipeline.to_str().unwrap()]),
            output.clone(),
        );
        std::fs::write(scratch.path(&format!("{name}.warm")), "").unwrap();
    }
    timed(&mut command, output)
}

/// Writes `lines` card payments as JSON lines, ~100 bytes each, spread over
/// 10,000 users, the same every run; returns the bytes written.
fn generate(path: &Path, lines: usize) -> u64 {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
    for txn in 0..lines {
        let r = next();
        writeln!(
            out,
            r#"{{"txn_id":{},"user_id":"user-{:05}","amount":{}.{:02},"currency":"{}","merchant":"m-{:04}","ts":{}}}"#,
            1_000_000 + txn,
            r % 10_000,
            (r >> 16) % 200,
            (r >> 24) % 100,
            CURRENCIES[((r >> 32) % 4) as usize],
            (r >> 40) % 5_000,
            1_700_000_000_000_u64 + txn as u64 * 7,
        )
        .unwrap();
    }
    out.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// Native baseline: copies the lines of `input` to `output`, one buffered
/// reader and writer.
fn native_copy(input: &Path, output: &Path) {
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(input).unwrap());
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(output).unwrap());
    for line in reader.split(b'\n') {
        let line = line.unwrap();
        if line.is_empty() {
            continue;
        }
        out.write_all(&line).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
    out.get_ref().sync_data().unwrap();
}

/// What the native filter reads of a payment; the rest is skipped.
#[derive(Deserialize)]
struct Payment<'a> {
    #[serde(borrow)]
    txn_id: &'a RawValue,
    #[serde(borrow)]
    user_id: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
}

/// Native baseline: keeps payments with `amount >= 100`, written as their
/// `txn_id`, `user_id` and `amount` (values as they were written).
fn native_filter(input: &Path, output: &Path) {
    let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(input).unwrap());
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(output).unwrap());
    for line in reader.split(b'\n') {
        let line = line.unwrap();
        let Ok(payment) = serde_json::from_slice::<Payment<'_>>(&line) else {
            continue;
        };
        let amount: f64 = payment.amount.get().parse().unwrap_or(f64::NAN);
        if amount >= 100.0 {
            write!(
                out,
                r#"{{"txn_id":{},"user_id":{},"amount":{}}}"#,
                payment.txn_id.get(),
                payment.user_id.get(),
                payment.amount.get()
            )
            .unwrap();
            out.write_all(b"\n").unwrap();
        }
    }
    out.flush().unwrap();
    out.get_ref().sync_data().unwrap();
}
