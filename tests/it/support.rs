//! Shared helpers: the workspace's plugins and the `weir` binary, built once
//! per test process (cargo itself makes later builds no-ops), and pipeline
//! files written to temporary folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Every plugin and fixture the tests load.
const PLUGINS: &[&str] = &[
    "identity",
    "json-filter",
    "pii-redactor",
    "router",
    "misbehave",
    "wrong-world",
    "future-version",
    "tag-a",
    "tag-b",
    "every-tenth",
    "fail-half",
    "top-n",
    "sum-count",
];

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

fn cargo() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(workspace());
    cargo
}

fn run_cargo(args: &[&str]) {
    let status = cargo().args(args).status().expect("cargo runs");
    assert!(status.success(), "cargo {args:?} failed");
}

/// The `.wasm` of workspace plugin `name`, built for wasm32-wasip2.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut args = vec!["build", "--quiet", "--release", "--target", "wasm32-wasip2"];
        for plugin in PLUGINS {
            args.extend(["-p", plugin]);
        }
        run_cargo(&args);
    });
    let file = if name == "wrong-world" {
        name.to_owned()
    } else {
        name.replace('-', "_")
    };
    target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{file}.wasm"))
}

/// The `.wasm` of a hand-written hostile component in `tests/hostile/`
/// (`NAME.wat`), assembled once per test process.
pub fn hostile(name: &str) -> PathBuf {
    let wat = workspace().join(format!("tests/hostile/{name}.wat"));
    let wasm = target_dir().join(format!("hostile/{name}.wasm"));
    let bytes = wat::parse_file(&wat).unwrap_or_else(|e| panic!("{}: {e}", wat.display()));
    std::fs::create_dir_all(wasm.parent().unwrap()).unwrap();
    // Written aside and renamed: tests in other processes may read it.
    let tmp = wasm.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &wasm).unwrap();
    wasm
}

/// A finished child process: its output and the peak resident memory it
/// (and only it) reached, measured by the kernel.
pub struct Measured {
    pub output: Output,
    pub peak_rss_mib: u64,
}

/// `weir ARGS` with a private compile cache, no stdin and warnings logged,
/// to adjust and run.
pub fn weir_command(scratch: &Scratch, args: &[&str]) -> Command {
    let mut command = Command::new(weir_bin());
    command
        .args(args)
        .env("WEIR_CACHE_DIR", scratch.path("cache"))
        .env("WEIR_LOG", "warn")
        .stdin(std::process::Stdio::null());
    command
}

/// Runs `command` to its end, with stdout and stderr captured, and reads its
/// peak RSS from `wait4`. Kills it and fails the test if it runs past
/// `limit`: a run that never ends is the failure some tests look for.
pub fn run_measured(command: &mut Command, limit: std::time::Duration) -> Measured {
    use std::io::Read as _;
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let pid = child.id() as libc::pid_t;
    let deadline = std::time::Instant::now() + limit;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child, with valid pointers.
        let done = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if done == pid {
            break;
        }
        assert!(done == 0, "wait4 failed");
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("still running after {limit:?}; killed. Its stderr:\n{output}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The status is reaped: build an ExitStatus from it.
    use std::os::unix::process::ExitStatusExt as _;
    let status = std::process::ExitStatus::from_raw(status);
    drop(child);
    Measured {
        output: Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        },
        peak_rss_mib: (usage.ru_maxrss as u64) >> 10,
    }
}

/// The `weir` binary. `cargo nextest run --workspace --release` builds it
/// (the host crate has integration tests); when it is missing or older than
/// any of its sources (only this crate's tests were run after a change), it
/// is built here: a test never runs a stale binary.
pub fn weir_bin() -> PathBuf {
    let bin = target_dir().join("release/weir");
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let sources = ["host", "wit", "Cargo.toml", "Cargo.lock"].map(|p| workspace().join(p));
        let newest = sources.iter().filter_map(|p| newest_change(p)).max();
        if built.is_none_or(|built| newest.is_some_and(|newest| newest > built)) {
            run_cargo(&[
                "build",
                "--quiet",
                "--release",
                "-p",
                "weir",
                "--bin",
                "weir",
            ]);
        }
    });
    bin
}

/// The latest modification time of `path` or anything under it.
fn newest_change(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let own = meta.modified().ok();
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path).ok()?;
    children
        .filter_map(|entry| newest_change(&entry.ok()?.path()))
        .chain(own)
        .max()
}

/// Runs `weir ARGS` with a private compile cache.
pub fn weir(args: &[&str], cache: &Path) -> Output {
    Command::new(weir_bin())
        .args(args)
        .env("WEIR_CACHE_DIR", cache)
        .env("WEIR_LOG", "warn")
        .output()
        .expect("weir runs")
}

/// A figure of pipeline `name`'s summary line in a `weir run` log, which
/// must be there: `summary_figure(log, "p", "records in")` reads
/// "pipeline `p`: 1,024 records in, ...".
pub fn summary_figure(log: &str, name: &str, figure: &str) -> u64 {
    let prefix = format!("pipeline `{name}`: ");
    let line = log
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no summary line for pipeline `{name}` in:\n{log}"));
    let before = line[prefix.len()..]
        .split(&format!(" {figure}"))
        .next()
        .unwrap();
    let number = before.rsplit(", ").next().unwrap();
    number.replace(',', "").parse().unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A temporary folder holding `pipeline.toml` with `body`, where
/// `{plugin:NAME}` is replaced by that plugin's `.wasm` and `{dir}` by the
/// folder itself.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, body).expect("write scratch file");
        path
    }

    /// Writes `pipeline.toml`, filling in `{plugin:NAME}` placeholders.
    pub fn pipeline(&self, body: &str) -> PathBuf {
        let mut body = body.replace("{dir}", &self.dir.path().display().to_string());
        while let Some(start) = body.find("{plugin:") {
            let end = start + body[start..].find('}').expect("closing brace");
            let name = &body[start + "{plugin:".len()..end];
            let wasm = plugin(name).display().to_string();
            body.replace_range(start..=end, &wasm);
        }
        self.write("pipeline.toml", &body)
    }

    /// The `weir.error.reason` of each dead letter in `name` (a file the
    /// pipeline wrote, as envelopes).
    pub fn dead_letter_reasons(&self, name: &str) -> Vec<String> {
        (self.json_lines(name).iter())
            .map(|d| {
                d["headers"]["weir.error.reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Checks that `name` holds exactly as many dead letters as `expected`,
    /// in order, each one's reason containing its text.
    pub fn assert_dead_letter_reasons(&self, name: &str, expected: &[&str]) {
        let reasons = self.dead_letter_reasons(name);
        assert_eq!(reasons.len(), expected.len(), "{reasons:?}");
        for (reason, wanted) in reasons.iter().zip(expected) {
            assert!(reason.contains(wanted), "{reason:?} should say {wanted:?}");
        }
    }

    /// The JSON lines of a file the pipeline wrote.
    pub fn json_lines(&self, name: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
        text.lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"))
            })
            .collect()
    }
}

/// How a worker running many pipelines went (see [`run_fleet`]).
pub struct Fleet {
    /// From the spawn until every pipeline had written output.
    pub all_writing_after: std::time::Duration,
    /// From the SIGTERM to the exit.
    pub stopped_after: std::time::Duration,
    pub status: std::process::ExitStatus,
    /// Peak RSS over the whole run, from `wait4`.
    pub peak_rss_mib: u64,
    pub stderr: String,
}

/// Runs one worker with `count` pipelines (generator, 100 records/s ->
/// `identity` -> file `p{i}.txt`, one lane each) until every pipeline has
/// written, then `running` longer, then SIGTERM. Fails the test if the
/// worker is not writing everywhere within five minutes or does not exit
/// within two after the signal (liveness bounds, not speed claims).
pub fn run_fleet(scratch: &Scratch, count: usize, running: std::time::Duration) -> Fleet {
    use std::time::{Duration, Instant};
    let mut body = String::new();
    for i in 0..count {
        body.push_str(&format!(
            "[[pipeline]]\nname = \"p{i}\"\nparallelism = 1\n\
             source = {{ type = \"generator\", kind = \"clickstream\", rate = 100 }}\n\
             [[pipeline.plugin]]\nwasm = \"{{plugin:identity}}\"\nwatch = false\n\
             [[pipeline.sink]]\ntype = \"file\"\npath = \"{{dir}}/p{i}.txt\"\n\n"
        ));
    }
    let path = scratch.pipeline(&body);
    let log = std::fs::File::create(scratch.path("fleet.log")).unwrap();
    let started = Instant::now();
    #[allow(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also gives its peak RSS"
    )]
    let mut child = weir_command(scratch, &["run", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut waiting = 0;
    while waiting < count {
        let written = std::fs::metadata(scratch.path(&format!("p{waiting}.txt")))
            .is_ok_and(|meta| meta.len() > 0);
        if written {
            waiting += 1;
            continue;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "pipeline p{waiting} wrote nothing in five minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "the worker ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_writing_after = started.elapsed();
    std::thread::sleep(running);
    let pid = child.id() as libc::pid_t;
    let stopping = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child, with valid pointers.
        let done = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if done == pid {
            break;
        }
        if stopping.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("still running two minutes after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_after = stopping.elapsed();
    use std::os::unix::process::ExitStatusExt as _;
    Fleet {
        all_writing_after,
        stopped_after,
        status: std::process::ExitStatus::from_raw(status),
        peak_rss_mib: (usage.ru_maxrss as u64) >> 10,
        stderr: std::fs::read_to_string(scratch.path("fleet.log")).unwrap(),
    }
}

/// Checks that each of the fleet's `count` pipelines reported records out
/// in its summary and that its file holds exactly those lines, each whole.
pub fn assert_fleet_output_complete(scratch: &Scratch, fleet: &Fleet, count: usize) {
    for i in 0..count {
        let prefix = format!("pipeline `p{i}`: ");
        let summary = (fleet.stderr.lines())
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no summary for p{i}"));
        let out: u64 = (summary.split(" records in, ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .map(|n| n.replace(',', "").parse().unwrap())
            .unwrap_or_else(|| panic!("no count out in: {summary}"));
        let text = std::fs::read_to_string(scratch.path(&format!("p{i}.txt"))).unwrap();
        assert!(text.ends_with('\n'), "p{i}.txt ends with a cut line");
        assert_eq!(text.lines().count() as u64, out, "p{i}: {summary}");
        assert!(out > 0, "p{i} wrote nothing: {summary}");
    }
}
