//! Files and standard streams from outside the process: what file sinks
//! keep and refuse, input that would not fit in memory, and outputs that
//! close or fill up.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{Scratch, run_measured, stderr, summary_figure, weir_command};

/// Long enough for any honest run here; a run past it has hung.
const HANG: Duration = Duration::from_secs(120);

fn lines_of(scratch: &Scratch, name: &str) -> Vec<String> {
    std::fs::read_to_string(scratch.path(name))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `weir run PATH` to its end, which must succeed; its stderr.
fn run_to_success(scratch: &Scratch, path: &std::path::Path) -> String {
    let run = run_measured(
        &mut weir_command(scratch, &["run", path.to_str().unwrap()]),
        HANG,
    );
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    err
}

#[test]
fn a_line_with_no_end_on_stdin_is_dead_lettered_with_its_position_in_bounded_memory() {
    let scratch = Scratch::new();
    // Three lines, then 200 MB of zeros and no newline: `yes`-style input
    // gone wrong, or a binary file piped in by mistake.
    let input = scratch.path("zeros");
    let mut file = std::fs::File::create(&input).unwrap();
    file.write_all(b"one\ntwo\nthree\n").unwrap();
    file.set_len(14 + (200 << 20)).unwrap();
    drop(file);
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "endless"
source = { type = "stdin", format = "lines" }

[[pipeline.sink]]
type = "file"
path = "out.txt"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    let mut command = weir_command(&scratch, &["run", path.to_str().unwrap()]);
    command.stdin(std::fs::File::open(&input).unwrap());
    let run = run_measured(&mut command, HANG);
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    assert_eq!(lines_of(&scratch, "out.txt"), ["one", "two", "three"]);
    let dead = scratch.json_lines("dead.jsonl");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["offset"], 4, "the line number");
    let reason = dead[0]["headers"]["weir.error.reason"].as_str().unwrap();
    assert!(
        reason.contains("209715200 bytes, over `limits.max_record_bytes` (4194304)"),
        "{reason}"
    );
    assert_eq!(dead[0]["value"].as_str().unwrap().len(), 64 << 10);
    assert!(
        run.peak_rss_mib < 150,
        "peak RSS {} MiB for a 200 MB line",
        run.peak_rss_mib
    );
}

#[test]
fn megabyte_lines_into_a_slow_plugin_are_read_ahead_by_bytes_not_by_count() {
    let scratch = Scratch::new();
    let line = "x".repeat(1 << 20);
    let mut file = std::fs::File::create(scratch.path("big.txt")).unwrap();
    for _ in 0..300 {
        writeln!(file, "{line}").unwrap();
    }
    drop(file);
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "slow"
source = { type = "file", path = "big.txt", format = "lines" }

limits = { wasi = ["monotonic-clock"] }

[[pipeline.plugin]]
wasm = "{plugin:misbehave}"
config = { pace_us = 5000 }

[[pipeline.sink]]
type = "file"
path = "out.txt"
"#,
    );
    let run = run_measured(
        &mut weir_command(&scratch, &["run", path.to_str().unwrap()]),
        HANG,
    );
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    let out = lines_of(&scratch, "out.txt");
    assert_eq!(out.len(), 300);
    assert!(out.iter().all(|l| *l == line));
    // 300 MB of input; read-ahead is bounded at 16 MiB.
    assert!(
        run.peak_rss_mib < 200,
        "peak RSS {} MiB for 300 MB of input",
        run.peak_rss_mib
    );
}

#[test]
fn a_value_holding_a_line_break_is_dead_lettered_instead_of_forging_a_record() {
    let scratch = Scratch::new();
    std::fs::write(scratch.path("in.txt"), "a\nnewline\nb\n").unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "forge"
source = { type = "file", path = "in.txt", format = "lines" }

[[pipeline.plugin]]
wasm = "{plugin:misbehave}"

[[pipeline.sink]]
type = "file"
path = "out.txt"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    run_to_success(&scratch, &path);
    assert_eq!(lines_of(&scratch, "out.txt"), ["a", "b"]);
    let dead = scratch.json_lines("dead.jsonl");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["value"], "forged\n{\"admin\":true}");
    assert_eq!(dead[0]["headers"]["weir.error.stage"], "sink");
    let reason = dead[0]["headers"]["weir.error.reason"].as_str().unwrap();
    assert!(reason.contains("holds a line break"), "{reason}");
    assert_eq!(dead[0]["offset"], 2);
}

#[test]
fn a_closed_stdout_fails_the_run_and_the_file_sink_keeps_every_record_counted_out() {
    let scratch = Scratch::new();
    let input: String = (0..200_000).map(|i| format!("line-{i}\n")).collect();
    std::fs::write(scratch.path("in.txt"), input).unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "head"
source = { type = "file", path = "in.txt", format = "lines" }

[[pipeline.sink]]
type = "stdout"

[[pipeline.sink]]
type = "file"
path = "out.txt"
"#,
    );
    // `weir run | head -1`.
    let mut child = weir_command(&scratch, &["run", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "line-0\n");
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("sink stdout: the reader closed the stream"),
        "{err}"
    );
    let out = lines_of(&scratch, "out.txt");
    assert!(!out.is_empty(), "the file sink was flushed");
    // Counted out: what reached both sinks and was flushed. The file may
    // hold more (what stdout no longer took), never less.
    assert!(
        out.len() >= summary_figure(&err, "head", "out") as usize,
        "{err}"
    );
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, l)| *l == format!("line-{i}"))
    );
}

#[test]
fn a_full_stderr_does_not_crash_the_run_and_a_full_stdout_is_an_error_not_output() {
    let scratch = Scratch::new();
    std::fs::write(scratch.path("in.txt"), "a\nb\nc\n").unwrap();
    let to_file = scratch.pipeline(
        r#"
[[pipeline]]
name = "quiet"
source = { type = "file", path = "in.txt", format = "lines" }

[[pipeline.sink]]
type = "file"
path = "out.txt"
"#,
    );
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let status = weir_command(&scratch, &["run", to_file.to_str().unwrap()])
        .env("WEIR_LOG", "info")
        .stderr(full())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(lines_of(&scratch, "out.txt"), ["a", "b", "c"]);

    let to_stdout = scratch.write(
        "stdout.toml",
        r#"
[[pipeline]]
name = "loud"
source = { type = "file", path = "in.txt", format = "lines" }

[[pipeline.sink]]
type = "stdout"
"#,
    );
    let output = weir_command(&scratch, &["run", to_stdout.to_str().unwrap()])
        .stdout(full())
        .output()
        .unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("sink stdout") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(summary_figure(&err, "loud", "out"), 0, "{err}");
    assert!(
        err.contains("pipeline `loud`: 3 records in, 0 out"),
        "the failed batch was read: {err}"
    );
}

#[test]
fn a_sink_onto_its_own_input_is_refused_and_the_input_stays_intact() {
    let scratch = Scratch::new();
    std::fs::write(scratch.path("in.txt"), "keep\nme\n").unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "ouroboros"
source = { type = "file", path = "in.txt", format = "lines" }

[[pipeline.sink]]
type = "file"
path = "./in.txt"
"#,
    );
    for command in ["check", "run"] {
        let output = weir_command(&scratch, &[command, path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = stderr(&output);
        assert!(!output.status.success(), "weir {command}: {err}");
        assert!(
            err.contains("pipeline.toml:6: this sink writes")
                && err.contains("would destroy its own input"),
            "weir {command}: {err}"
        );
    }
    assert_eq!(lines_of(&scratch, "in.txt"), ["keep", "me"]);
}

#[test]
fn check_tells_a_missing_input_from_a_folder_and_reads_a_fifo() {
    let scratch = Scratch::new();
    std::fs::create_dir(scratch.path("folder")).unwrap();
    let pipeline = |input: &str| {
        scratch.write(
            "p.toml",
            &format!(
                r#"
[[pipeline]]
name = "p"
source = {{ type = "file", path = "{input}", format = "lines" }}

[[pipeline.sink]]
type = "file"
path = "out.txt"
"#
            ),
        )
    };
    let check = |path: &std::path::Path| {
        let output = weir_command(&scratch, &["check", path.to_str().unwrap()])
            .output()
            .unwrap();
        (output.status.success(), stderr(&output))
    };
    let (ok, err) = check(&pipeline("missing.txt"));
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, err) = check(&pipeline("folder"));
    assert!(!ok && err.contains("is a folder"), "{err}");

    let fifo = scratch.path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let (ok, err) = check(&pipeline("fifo"));
    assert!(ok, "{err}");
    let mut run = weir_command(&scratch, &["run", pipeline("fifo").to_str().unwrap()])
        .spawn()
        .unwrap();
    std::fs::write(&fifo, "through\na fifo\n").unwrap();
    assert!(run.wait().unwrap().success());
    assert_eq!(lines_of(&scratch, "out.txt"), ["through", "a fifo"]);
}

#[test]
fn a_json_line_with_bytes_that_are_not_utf8_is_dead_lettered_as_malformed() {
    let scratch = Scratch::new();
    std::fs::write(
        scratch.path("in.jsonl"),
        b"{\"a\":\"ok\"}\n{\"a\":\"\xff\xfe\"}\n",
    )
    .unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "strict"
source = { type = "file", path = "in.jsonl" }

[[pipeline.sink]]
type = "file"
path = "out.jsonl"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    run_to_success(&scratch, &path);
    assert_eq!(lines_of(&scratch, "out.jsonl"), [r#"{"a":"ok"}"#]);
    let dead = scratch.json_lines("dead.jsonl");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["offset"], 2);
    let reason = dead[0]["headers"]["weir.error.reason"].as_str().unwrap();
    assert!(
        reason.contains("malformed JSON") && reason.contains("not UTF-8"),
        "{reason}"
    );
    // The envelope keeps the bytes as they were.
    assert_eq!(dead[0]["value_base64"], "eyJhIjoi//4ifQ==");
}

#[test]
fn lanes_write_in_input_order_with_exact_counts_and_dead_letters() {
    let scratch = Scratch::new();
    // Many small batches over three lanes: kept, filtered out, failed by
    // the plugin (no amount) and malformed (rejected before it).
    let mut input = String::new();
    let (mut kept, mut dropped, mut dead) = (Vec::new(), 0, Vec::new());
    for line in 1..=30_000_u64 {
        let text = if line % 1000 == 999 {
            dead.push(line);
            "{broken".to_owned()
        } else if line % 10 == 3 {
            dead.push(line);
            format!(r#"{{"id":{line}}}"#)
        } else {
            let text = format!(r#"{{"id":{line},"amount":{}}}"#, line % 200);
            if line % 200 >= 100 {
                kept.push(text.clone());
            } else {
                dropped += 1;
            }
            text
        };
        input.push_str(&text);
        input.push('\n');
    }
    std::fs::write(scratch.path("in.jsonl"), input).unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "lanes"
parallelism = 3
source = { type = "file", path = "in.jsonl", format = "json" }
batch = { max_records = 64 }

[[pipeline.plugin]]
wasm = "{plugin:json-filter}"
config = { field = "amount", min = 100.0 }

[[pipeline.sink]]
type = "file"
path = "out.jsonl"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#,
    );
    let err = run_to_success(&scratch, &path);
    assert_eq!(
        lines_of(&scratch, "out.jsonl"),
        kept,
        "outputs in input order"
    );
    // Within a batch, records the source rejected come before those the
    // plugin failed (as with one lane); each kind stays in input order.
    let letters = scratch.json_lines("dead.jsonl");
    let offsets_at = |stage: &str| -> Vec<u64> {
        letters
            .iter()
            .filter(|d| d["headers"]["weir.error.stage"] == stage)
            .map(|d| d["offset"].as_u64().unwrap())
            .collect()
    };
    let (source, plugin) = (offsets_at("source"), offsets_at("plugin"));
    assert!(
        source.is_sorted() && plugin.is_sorted(),
        "dead letters out of order"
    );
    let mut all: Vec<u64> = source.iter().chain(&plugin).copied().collect();
    all.sort_unstable();
    assert_eq!(all.len(), letters.len());
    assert!(
        all == dead,
        "dead letters differ from the malformed and failed lines"
    );
    assert_eq!(summary_figure(&err, "lanes", "records in"), 30_000);
    assert_eq!(summary_figure(&err, "lanes", "out"), kept.len() as u64);
    assert_eq!(summary_figure(&err, "lanes", "dropped"), dropped);
    assert_eq!(
        summary_figure(&err, "lanes", "dead-lettered"),
        dead.len() as u64
    );
}
