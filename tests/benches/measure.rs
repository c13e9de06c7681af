//! Timing a whole process, shared by the benchmarks that run `weir` next
//! to a native baseline: wall time from spawn to exit, peak RSS from
//! `wait4`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// One timed process and what it wrote.
pub struct Run {
    pub seconds: f64,
    pub peak_rss_mib: u64,
    pub output: PathBuf,
}

/// The run with the median time of `runs` (its own RSS kept with it).
pub fn best_of(runs: usize, mut once: impl FnMut() -> Run) -> Run {
    let mut all: Vec<Run> = (0..runs.max(1)).map(|_| once()).collect();
    all.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    all.swap_remove(all.len() / 2)
}

/// Runs `command` to its end; its wall time from spawn to exit and its peak
/// RSS, from `wait4`.
#[allow(
    clippy::zombie_processes,
    reason = "reaped by wait4, which gives its rusage too"
)]
pub fn timed(command: &mut Command, output: PathBuf) -> Run {
    let log = output.with_extension("log");
    let started = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("starts");
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers.
    let done = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        done > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} failed"
    );
    Run {
        seconds,
        peak_rss_mib: (usage.ru_maxrss as u64) >> 10,
        output,
    }
}
