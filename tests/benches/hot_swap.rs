//! Hot swap under load, in process (generator -> tag plugin -> file, two
//! lanes, unthrottled):
//!
//! - **pause**: how long a lane stops processing batches to switch version
//!   (install the prepared instance, drop the old one), as each lane
//!   measures it, over thousands of swaps between `tag-a` and `tag-b`;
//!   p50/p99/max. Goal: p99 <= 1 ms.
//! - **cost per swap**: the same run's wall time against a run without
//!   swaps (same records), divided by the swaps: what a swap costs the data
//!   path overall, preparation on the other core included.
//! - **shadow cost**: the same run with `tag-b` in the shadow of `tag-a`
//!   from the start (every batch runs through both, and their outputs are
//!   compared record by record) against the plain run.
//! - **file to served**: from an atomic rename of a new `.wasm` onto the
//!   watched path to every lane serving it, the compile already cached on
//!   disk (`keep_versions = 0`, so each version is loaded from the cache,
//!   not from memory); p50/p99. Goal: <= 100 ms.
//!
//! Run: `cargo bench -p weir-tests --bench hot_swap` (`WEIR_BENCH_SWAPS`
//! changes the swap count). Prints a table, then one JSON summary line.

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

use std::path::Path;
use std::time::{Duration, Instant};

use weir::config::PipelineFile;
use weir::engine::{EngineOptions, PluginEngine};
use weir::pipeline::{Pipeline, Wasm};

fn main() {
    let swaps: usize = std::env::var("WEIR_BENCH_SWAPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
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
        let (a, b) = (support::plugin("tag-a"), support::plugin("tag-b"));
        // Both compiled into the disk cache before anything is timed.
        engine.load(&a).unwrap();
        engine.load(&b).unwrap();
        println!("hot_swap: generator -> tag plugin -> file, 2 lanes, unthrottled");

        let records = 3_000_000;
        let (plain, _) = under_load(&scratch, &engine, records, 0, false).await;
        let (swapping, pauses) = under_load(&scratch, &engine, records, swaps, false).await;
        let (shadowed, _) = under_load(&scratch, &engine, records, 0, true).await;
        let mut pauses = pauses;
        pauses.sort_unstable();
        let cost_us = (swapping.as_secs_f64() - plain.as_secs_f64()) * 1e6 / pauses.len() as f64;
        println!(
            "  {records} records: {:.3} s without swaps, {:.3} s with {} swaps ({:.1} us of wall time per swap)",
            plain.as_secs_f64(),
            swapping.as_secs_f64(),
            pauses.len(),
            cost_us
        );
        let (p50, p99, max) = (
            percentile(&pauses, 0.50),
            percentile(&pauses, 0.99),
            pauses.last().copied().unwrap_or_default(),
        );
        println!(
            "  pause per lane and swap: p50 {p50} us, p99 {p99} us, max {max} us (goal: p99 <= 1000 us)"
        );
        let shadow_ratio = shadowed.as_secs_f64() / plain.as_secs_f64();
        println!(
            "  with a shadow compared on every batch: {:.3} s ({shadow_ratio:.2}x the run without)",
            shadowed.as_secs_f64()
        );

        let mut served = file_to_served(&scratch, &engine, &a, &b, 40).await;
        served.sort_unstable();
        let (s50, s99) = (percentile(&served, 0.50), percentile(&served, 0.99));
        println!(
            "  file renamed into place -> served by every lane (compile cached): p50 {:.1} ms, p99 {:.1} ms over {} swaps (goal: <= 100 ms)",
            s50 as f64 / 1e3,
            s99 as f64 / 1e3,
            served.len()
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "hot_swap",
                "swaps": pauses.len(),
                "pause_p50_us": p50,
                "pause_p99_us": p99,
                "pause_max_us": max,
                "wall_us_per_swap": cost_us,
                "shadow_ratio": shadow_ratio,
                "file_to_served_p50_us": s50,
                "file_to_served_p99_us": s99,
            })
        );
    });
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn load_pipeline(scratch: &support::Scratch, body: &str) -> PipelineFile {
    let path = scratch.pipeline(body);
    PipelineFile::load(&path).unwrap()
}

/// Runs `records` generated records through two lanes while swapping
/// `swaps` times (with `tag-b` in the shadow throughout, if `shadow`); the
/// wall time and each swap's pause (the slowest lane's).
async fn under_load(
    scratch: &support::Scratch,
    engine: &PluginEngine,
    records: u64,
    swaps: usize,
    shadow: bool,
) -> (Duration, Vec<u64>) {
    let file = load_pipeline(
        scratch,
        &format!(
            r#"
[[pipeline]]
name = "load"
parallelism = 2
source = {{ type = "generator", kind = "payments", count = {records} }}

[[pipeline.plugin]]
wasm = "{{plugin:tag-a}}"
watch = false

[[pipeline.sink]]
type = "file"
path = "{{dir}}/out.txt"
"#
        ),
    );
    let pipeline = Pipeline::build(&file, &file.pipelines[0], engine)
        .await
        .unwrap();
    let handle = pipeline.handle();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let run = tokio::spawn(pipeline.run(shutdown));
    let wasm: Vec<Vec<u8>> = ["tag-b", "tag-a"]
        .iter()
        .map(|name| std::fs::read(support::plugin(name)).unwrap())
        .collect();
    if shadow {
        handle
            .shadow(1, Wasm::Upload(wasm[0].clone()))
            .await
            .unwrap();
    }
    let mut pauses = Vec::with_capacity(swaps);
    for swap in 0..swaps {
        let bytes = wasm[swap % 2].clone();
        match handle.deploy(1, Wasm::Upload(bytes)).await {
            Ok(report) => pauses.push(report.pause_us),
            // The run ended first: fewer swaps than asked, all counted.
            Err(_) => break,
        }
    }
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.records_out, records);
    if shadow {
        let found = handle.status().plugins[0].shadow.clone().unwrap();
        // tag-a and tag-b differ on every record.
        assert!(found.compared > records / 2 && found.differing == found.compared);
    }
    (started.elapsed(), pauses)
}

/// Renames `a` and `b` in turn onto a watched path under traffic; the time
/// from each rename to every lane serving it, in microseconds.
async fn file_to_served(
    scratch: &support::Scratch,
    engine: &PluginEngine,
    a: &Path,
    b: &Path,
    trials: usize,
) -> Vec<u64> {
    let watched = scratch.path("watched.wasm");
    std::fs::copy(a, &watched).unwrap();
    let file = load_pipeline(
        scratch,
        r#"
[[pipeline]]
name = "watched"
parallelism = 2
keep_versions = 0
source = { type = "generator", kind = "payments", rate = 100000 }
batch = { max_records = 64, linger_ms = 1 }

[[pipeline.plugin]]
wasm = "{dir}/watched.wasm"

[[pipeline.sink]]
type = "file"
path = "{dir}/watched.txt"
"#,
    );
    let pipeline = Pipeline::build(&file, &file.pipelines[0], engine)
        .await
        .unwrap();
    let handle = pipeline.handle();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(pipeline.run(shutdown));
    // The watch starts with the run: a rename before it would not be seen.
    while handle.status().counters.records_in == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut served = Vec::with_capacity(trials);
    for trial in 0..trials {
        let (next, name) = if trial % 2 == 0 {
            (b, "tag-b")
        } else {
            (a, "tag-a")
        };
        let aside = scratch.path("aside.wasm");
        std::fs::copy(next, &aside).unwrap();
        let started = Instant::now();
        std::fs::rename(&aside, &watched).unwrap();
        while handle.status().plugins[0].serving.name != name {
            assert!(started.elapsed() < Duration::from_secs(30), "never served");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        served.push(started.elapsed().as_micros() as u64);
        // Let the watcher's quiet period pass before the next rename.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
    served
}
