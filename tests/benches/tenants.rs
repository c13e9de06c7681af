//! Tenants in one worker, in process, on the engine's plugin threads (one
//! per core):
//!
//! - **beside hostile tenants**: a well-behaved tenant's pipeline
//!   (generator -> a plugin doing ~2 µs of work per record -> file, two
//!   lanes) timed alone, then beside six hostile tenants whose plugin
//!   commits one misdeed on every record: an infinite loop, a memory bomb,
//!   a trap, an output flood, opening a socket, opening a file, and a sleep
//!   in a host call. Each hostile is stopped by its own budget with its own
//!   error and quarantined; the well-behaved output must be complete. Goal:
//!   its throughput beside them >= 90% of alone.
//! - **weights**: two busy tenants of weight 3 and 1 running the same
//!   plugin: records each had processed when the heavier finished, and the
//!   plugin-thread time each held. Goal: about 3 to 1.
//!
//! Run: `cargo bench -p weir-tests --bench tenants` (`WEIR_BENCH_EVENTS`:
//! the well-behaved tenant's records, default 3 M; `WEIR_BENCH_RUNS`:
//! interleaved rounds, default 3).

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

use std::time::{Duration, Instant};

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::pipeline::{Pipeline, PipelineError};

/// The hostile tenants: name, misdeed, their limits, and the error each
/// must be stopped with.
const HOSTILE: &[(&str, &str, &str, &str)] = &[
    ("looping", "spin", "cpu_ms_per_batch = 20", "of CPU time per call"),
    ("bomb", "hog", "memory_mb = 16", "exceeded its memory cap of 16 MiB"),
    ("trapping", "panic", "", "asked for a panic"),
    ("flooding", "forward-flood", "outputs_per_record = 100", "outputs_per_record"),
    ("prying-net", "connect", "", "tried to open a TCP socket"),
    ("prying-fs", "read", "", "tried to open a file or folder"),
    ("sleeping", "sleep", "batch_timeout_ms = 100, wasi = [\"monotonic-clock\"]", "exceeded its deadline of 100ms"),
];

/// The well-behaved tenant's pipeline, writing `out`.
fn steady(events: u64, out: &str) -> String {
    format!(
        r#"
[[tenant]]
name = "steady"

[[pipeline]]
name = "steady"
tenant = "steady"
parallelism = 2
limits = {{ wasi = ["monotonic-clock"] }}
source = {{ type = "generator", kind = "payments", count = {events} }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
watch = false
config = {{ pace_us = 2 }}

[[pipeline.sink]]
type = "file"
path = "{{dir}}/{out}"
"#
    )
}

/// One hostile tenant and its pipeline, quarantined after 3 faults.
fn hostile(name: &str, deed: &str, limits: &str) -> String {
    let limits = if limits.is_empty() {
        "faults_before_quarantine = 3".to_owned()
    } else {
        format!("{limits}, faults_before_quarantine = 3")
    };
    format!(
        r#"
[[tenant]]
name = "{name}"
limits = {{ {limits} }}

[[pipeline]]
name = "{name}"
tenant = "{name}"
parallelism = 2
source = {{ type = "generator", kind = "payments", rate = 20000 }}
batch = {{ max_records = 64 }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
watch = false
config = {{ always = "{deed}", hog_mib = 64, flood = 100000 }}

[[pipeline.sink]]
type = "file"
path = "{{dir}}/{name}.txt"

[pipeline.dead_letter]
type = "file"
path = "{{dir}}/{name}-dead.txt"
"#
    )
}

fn main() {
    let setting = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (events, rounds) = (
        setting("WEIR_BENCH_EVENTS", 3_000_000),
        setting("WEIR_BENCH_RUNS", 3),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let scratch = support::Scratch::new();
        let engine = PluginEngine::new(EngineOptions {
            cache_dir: Some(scratch.path("cache")),
            ..Default::default()
        })
        .unwrap();
        engine.load(&support::plugin("misbehave")).unwrap();

        let mut body = steady(events, "beside.txt");
        for (name, deed, limits, _) in HOSTILE {
            body.push_str(&hostile(name, deed, limits));
        }
        // Interleaved rounds, which goes first alternating; medians.
        let (mut alone, mut beside, mut quarantined, mut after) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            for case in [round % 2, 1 - round % 2] {
                for out in ["alone.txt", "beside.txt"] {
                    let _ = std::fs::remove_file(scratch.path(out));
                }
                if case == 0 {
                    let file = PipelineFile::load(&scratch.pipeline(&steady(events, "alone.txt")))
                        .unwrap();
                    alone.push(run_all(&engine, &file).await.first);
                    count_lines(&scratch.path("alone.txt"), events);
                    continue;
                }
                let file = PipelineFile::load(&scratch.pipeline(&body)).unwrap();
                let ran = run_all(&engine, &file).await;
                count_lines(&scratch.path("beside.txt"), events);
                check_quarantined(&ran.ended[1..], round == 0);
                let (at, read) = ran.others_done;
                beside.push(ran.first);
                quarantined.push(at);
                after.push((events - read) as f64 / (ran.first - at).as_secs_f64());
            }
        }
        let (alone, beside) = (median(&alone), median(&beside));
        let quarantined = median(&quarantined);
        after.sort_by(f64::total_cmp);
        let after = after[after.len() / 2];
        let alone_rate = events as f64 / alone.as_secs_f64();
        let ratio = alone.as_secs_f64() / beside.as_secs_f64();

        println!("tenants: {events} records through the well-behaved tenant, 2 plugin threads, median of {rounds} interleaved rounds");
        let usage = engine.scheduler().usage();
        for (name, ..) in HOSTILE {
            let used = usage[*name];
            println!(
                "  {name:<11} held plugin threads {:>7.1} ms, CPU {:>7.1} ms, {} batches (per round)",
                used.held.as_secs_f64() * 1e3 / rounds as f64,
                used.cpu.as_secs_f64() * 1e3 / rounds as f64,
                used.jobs / rounds
            );
        }
        println!(
            "  well-behaved alone  {:.2} s ({alone_rate:.0} records/s)\n  beside 7 hostile    {:.2} s ({:.0} records/s)\n  throughput beside / alone: {:.1}% (goal >= 90%)",
            alone.as_secs_f64(),
            beside.as_secs_f64(),
            events as f64 / beside.as_secs_f64(),
            ratio * 100.0
        );
        println!(
            "  every hostile quarantined after {:.2} s; from then on, {:.1}% of alone",
            quarantined.as_secs_f64(),
            after / alone_rate * 100.0
        );

        let (heavy_share, held_share) = weights(&scratch, &engine, events / 2).await;
        println!(
            "weights 3:1, both busy: records processed {heavy_share:.2} : 1, plugin-thread time held {held_share:.2} : 1 (goal about 3)"
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "tenants",
                "events": events,
                "alone_s": alone.as_secs_f64(),
                "beside_hostile_s": beside.as_secs_f64(),
                "throughput_ratio": ratio,
                "hostiles_quarantined_after_s": quarantined.as_secs_f64(),
                "throughput_ratio_after_quarantine": after / alone_rate,
                "weight_3_to_1_records": heavy_share,
                "weight_3_to_1_thread_time": held_share,
            })
        );
    });
}

/// How a run of several pipelines went.
struct Ran {
    /// The first pipeline's time, from the start to its end.
    first: Duration,
    /// How each ended, in file order.
    ended: Vec<Result<(), PipelineError>>,
    /// When the last of the others had ended, and how many records the
    /// first had read by then.
    others_done: (Duration, u64),
}

/// Runs every pipeline of `file` at once.
async fn run_all(engine: &PluginEngine, file: &PipelineFile) -> Ran {
    let mut pipelines = Vec::new();
    for config in &file.pipelines {
        pipelines.push(Pipeline::build(file, config, engine).await.unwrap());
    }
    let first_metrics = pipelines[0].metrics();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut runs: Vec<_> = pipelines
        .into_iter()
        .map(|pipeline| tokio::spawn(pipeline.run(shutdown.clone())))
        .collect();
    let first_run = runs.remove(0);
    let mut ended = Vec::new();
    for run in runs {
        ended.push(run.await.unwrap().map(drop));
    }
    let others_done = (started.elapsed(), first_metrics.snapshot().records_in);
    ended.insert(0, first_run.await.unwrap().map(drop));
    Ran {
        first: started.elapsed().max(others_done.0),
        ended,
        others_done,
    }
}

/// Tenants `heavy` (weight 3) and `light` (weight 1) each run `events`
/// records through the same slow plugin at once: when `heavy` is done, how
/// many records each had processed and how long each held the plugin
/// threads, heavy to light.
async fn weights(scratch: &support::Scratch, engine: &PluginEngine, events: u64) -> (f64, f64) {
    let mut body = String::new();
    for (name, weight) in [("heavy", 3), ("light", 1)] {
        body.push_str(&format!(
            r#"
[[tenant]]
name = "{name}"
weight = {weight}

[[pipeline]]
name = "{name}"
tenant = "{name}"
parallelism = 4
limits = {{ wasi = ["monotonic-clock"] }}
source = {{ type = "generator", kind = "payments", count = {events} }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
watch = false
config = {{ pace_us = 4 }}

[[pipeline.sink]]
type = "file"
path = "{{dir}}/{name}.txt"
"#
        ));
    }
    let file = PipelineFile::load(&scratch.pipeline(&body)).unwrap();
    let mut pipelines = Vec::new();
    for config in &file.pipelines {
        pipelines.push(Pipeline::build(&file, config, engine).await.unwrap());
    }
    let light_metrics = pipelines[1].metrics();
    let before = engine.scheduler().usage();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut runs: Vec<_> = pipelines
        .into_iter()
        .map(|pipeline| tokio::spawn(pipeline.run(shutdown.clone())))
        .collect();
    let light = runs.pop().unwrap();
    let heavy = runs.pop().unwrap().await.unwrap().unwrap();
    let light_done = light_metrics.snapshot().records_in;
    let usage = engine.scheduler().usage();
    stop.send_replace(true);
    light.await.unwrap().unwrap();
    let held = |name: &str| {
        let was = before.get(name).map_or(Duration::ZERO, |u| u.held);
        (usage[name].held - was).as_secs_f64()
    };
    (
        heavy.records_in as f64 / light_done.max(1) as f64,
        held("heavy") / held("light").max(1e-9),
    )
}

/// Checks each hostile pipeline was quarantined with its own error;
/// prints the reasons if `show`.
fn check_quarantined(ended: &[Result<(), PipelineError>], show: bool) {
    for ((name, _, _, wanted), ended) in HOSTILE.iter().zip(ended) {
        let reason = match ended {
            Err(PipelineError::Quarantined { reason, .. }) => reason,
            other => panic!("hostile tenant `{name}` was not quarantined: {other:?}"),
        };
        assert!(reason.contains(wanted), "`{name}`: {reason}");
        if show {
            let last = reason.rsplit("the last: ").next().unwrap_or(reason);
            println!("  {name:<11} quarantined; its last fault: {last}");
        }
    }
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn count_lines(path: &std::path::Path, wanted: u64) {
    let text = std::fs::read(path).unwrap();
    let lines = text.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(lines, wanted, "the well-behaved tenant's output is incomplete");
}
