//! A thousand pipelines in one worker (generator, 100 records/s each ->
//! `identity` -> file, one lane each): the `weir run` process's peak RSS
//! (goal <= 256 MB), the time from its start until every pipeline has
//! written, and the time a SIGTERM takes to end them all, each file whole
//! and holding what its summary says was written.
//!
//! Run: `cargo bench -p weir-tests --bench density`
//! (`WEIR_BENCH_PIPELINES`, default 1,000).

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

use std::time::Duration;

fn main() {
    let count: usize = std::env::var("WEIR_BENCH_PIPELINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let scratch = support::Scratch::new();
    // Compiled into the cache first: start time is not compile time.
    support::run_fleet(&scratch, 1, Duration::ZERO);
    let fleet = support::run_fleet(&scratch, count, Duration::from_secs(10));
    assert!(fleet.status.success(), "{}", fleet.stderr);
    support::assert_fleet_output_complete(&scratch, &fleet, count);
    println!(
        "density: {count} pipelines in one worker: peak RSS {} MiB ({:.0} KiB per pipeline; goal <= 256 MB), every pipeline writing {:.2} s after the start, all ended {:.2} s after SIGTERM ({}), every file whole",
        fleet.peak_rss_mib,
        (fleet.peak_rss_mib << 10) as f64 / count as f64,
        fleet.all_writing_after.as_secs_f64(),
        fleet.stopped_after.as_secs_f64(),
        fleet.status,
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "density",
            "pipelines": count,
            "peak_rss_mib": fleet.peak_rss_mib,
            "all_writing_s": fleet.all_writing_after.as_secs_f64(),
            "sigterm_to_exit_s": fleet.stopped_after.as_secs_f64(),
        })
    );
}
