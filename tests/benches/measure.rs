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
    median((0..runs.max(1)).map(|_| once()).collect())
}

/// The run of `all` (at least one) with the median time.
pub fn median(mut all: Vec<Run>) -> Run {
    all.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    all.swap_remove(all.len() / 2)
}

/// Set in a process [`timed`] starts to spawn the measured one: the path
/// it writes its figures to.
const SPAWNER: &str = "WEIR_BENCH_SPAWNER";

/// Runs `command` to its end; its wall time from spawn to exit and its peak
/// RSS, from `wait4`.
///
/// The command is spawned by a small process of its own (this benchmark
/// again, see [`serve_as_spawner`]), not by this one: a process keeps,
/// as its peak RSS, the RSS of the process that spawned it at the spawn,
/// and the benchmark's own (the results it has read) would count as the
/// command's.
pub fn timed(command: &mut Command, output: PathBuf) -> Run {
    let log = output.with_extension("log");
    let report = output.with_extension("measured");
    let mut spawner = Command::new(std::env::current_exe().expect("the benchmark's path"));
    spawner
        .env(SPAWNER, &report)
        .arg(command.get_program())
        .args(command.get_args());
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => spawner.env(name, value),
            None => spawner.env_remove(name),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        spawner.current_dir(dir);
    }
    let status = spawner
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .status()
        .expect("starts");
    assert!(
        status.success(),
        "{command:?} failed (log: {})",
        log.display()
    );
    let figures = std::fs::read_to_string(&report).expect("the spawner's figures");
    let (seconds, kib) = figures.trim().split_once(' ').expect("two figures");
    Run {
        seconds: seconds.parse().expect("seconds"),
        peak_rss_mib: kib.parse::<u64>().expect("KiB") >> 10,
        output,
    }
}

/// In a process [`timed`] started to spawn the measured one: runs the
/// command its arguments give, writes its figures, and says so (`main`
/// then returns at once).
#[allow(
    clippy::zombie_processes,
    reason = "reaped by wait4, which gives its rusage too"
)]
pub fn serve_as_spawner() -> bool {
    let Some(report) = std::env::var_os(SPAWNER) else {
        return false;
    };
    let mut args = std::env::args_os().skip(1);
    let program = args.next().expect("a command to measure");
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .env_remove(SPAWNER)
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
        "the measured command failed"
    );
    let figures = format!("{seconds} {}\n", usage.ru_maxrss);
    std::fs::write(report, figures).expect("the figures written");
    true
}
