//! Many pipelines in one worker: lanes are tasks on a fixed pool of plugin
//! threads, so a worker runs more pipelines than tokio's blocking pool has
//! threads (512; before, 512+ pipelines deadlocked it and ignored SIGTERM),
//! and a SIGTERM ends every one of them cleanly. Memory and start time at
//! 1,000 pipelines are the `density` benchmark's.

use std::time::Duration;

use crate::support::{Scratch, assert_fleet_output_complete, run_fleet};

#[test]
fn six_hundred_pipelines_run_in_one_worker_and_stop_cleanly_on_sigterm() {
    let scratch = Scratch::new();
    let fleet = run_fleet(&scratch, 600, Duration::from_secs(1));
    assert!(fleet.status.success(), "{}", fleet.stderr);
    assert_fleet_output_complete(&scratch, &fleet, 600);
    // Reported, not asserted: speed and size are the benchmark's.
    eprintln!(
        "600 pipelines: all writing after {:?}, stopped {:?} after SIGTERM, peak RSS {} MiB",
        fleet.all_writing_after, fleet.stopped_after, fleet.peak_rss_mib
    );
}
