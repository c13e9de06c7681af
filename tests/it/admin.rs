//! The admin API and the CLI commands that call it, against a running
//! `weir run`: status, deploy (plain, shadow, canary), promote, discard,
//! rollback, pause and resume, the refusals (400, 401, 404, 409, 413, 422)
//! with their messages, and a restart that comes back on the deployed
//! version.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{Scratch, plugin, stderr, stdout, weir_bin, weir_command};

const TOKEN: &str = "s3cret";

/// A `weir run` child and the admin address it reported.
struct Worker {
    child: Child,
    address: String,
    log: mpsc::Receiver<String>,
}

impl Worker {
    fn start(scratch: &Scratch, path: &std::path::Path) -> Worker {
        let mut child = Command::new(weir_bin())
            .args(["run", path.to_str().unwrap()])
            .env("WEIR_CACHE_DIR", scratch.path("cache"))
            .env("WEIR_LOG", "info")
            .env_remove("WEIR_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, log) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let address = loop {
            let line = log
                .recv_timeout(Duration::from_secs(120))
                .expect("the worker reports its admin address");
            if let Some(at) = line.find("address=") {
                break line[at + "address=".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned();
            }
        };
        Worker {
            child,
            address,
            log,
        }
    }

    /// `weir ARGS --admin ADDRESS [--token TOKEN]`.
    fn cli(&self, scratch: &Scratch, args: &[&str], token: Option<&str>) -> std::process::Output {
        let mut command = weir_command(scratch, args);
        command.args(["--admin", &self.address]);
        command.env_remove("WEIR_ADMIN_TOKEN");
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        command.output().unwrap()
    }

    fn ok(&self, scratch: &Scratch, args: &[&str]) -> String {
        let output = self.cli(scratch, args, Some(TOKEN));
        assert!(
            output.status.success(),
            "weir {args:?}: {}",
            stderr(&output)
        );
        stdout(&output)
    }

    fn refused(&self, scratch: &Scratch, args: &[&str], token: Option<&str>) -> String {
        let output = self.cli(scratch, args, token);
        assert!(!output.status.success(), "weir {args:?} should fail");
        stderr(&output)
    }

    fn status(&self, scratch: &Scratch) -> serde_json::Value {
        let text = self.ok(scratch, &["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&text).unwrap()[0].clone()
    }

    /// Polls the status until `done` holds; fails the test after a minute
    /// (a liveness bound, not a speed claim).
    fn wait_for(&self, scratch: &Scratch, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done(&self.status(scratch)) {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then its exit and the rest of its log.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.log.try_iter().collect();
        (status, rest.join("\n"))
    }
}

/// Sends a `Content-Length` over the limit and part of the body by hand:
/// the worker must answer 413 without taking the rest.
fn oversized_upload(address: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /v1/pipelines/live/plugins/1/deploy HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/wasm\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        3 << 20
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The worker may close before taking it all: that is its answer.
    let _ = stream.write_all(&vec![0u8; 64 << 10]);
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status_line = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status_line, body)
}

#[test]
fn every_admin_command_works_against_a_running_worker_and_a_restart_keeps_the_deployed_version() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[admin]
address = "127.0.0.1:0"
token = "s3cret"
max_upload_mb = 1

[[tenant]]
name = "payments"
limits = { memory_mb = 48 }

[[pipeline]]
name = "live"
tenant = "payments"
parallelism = 2
source = { type = "generator", kind = "payments", rate = 2000 }
batch = { max_records = 8, linger_ms = 1 }

[[pipeline.plugin]]
wasm = "{plugin:tag-a}"
watch = false

[[pipeline.sink]]
type = "file"
path = "{dir}/out.txt"
"#,
    );
    let worker = Worker::start(&scratch, &path);

    let shown = worker.ok(&scratch, &["status"]);
    assert!(
        shown.contains("pipeline `live` of tenant `payments`: running, 2 lane(s)")
            && shown.contains("tag-a 0.1.0"),
        "{shown}"
    );
    assert_eq!(worker.status(&scratch)["tenant"], "payments");

    // Refusals, each with its own message.
    let err = worker.refused(&scratch, &["status"], None);
    assert!(
        err.contains("missing `Authorization: Bearer TOKEN`") && err.contains("401"),
        "{err}"
    );
    let err = worker.refused(&scratch, &["status"], Some("nope"));
    assert!(
        err.contains("wrong admin token") && err.contains("401"),
        "{err}"
    );
    let err = worker.refused(&scratch, &["pause", "ghost"], Some(TOKEN));
    assert!(
        err.contains("no pipeline `ghost` (this worker runs: live)") && err.contains("404"),
        "{err}"
    );
    let err = worker.refused(
        &scratch,
        &[
            "deploy",
            "live",
            "--plugin",
            "2",
            plugin("tag-b").to_str().unwrap(),
        ],
        Some(TOKEN),
    );
    assert!(
        err.contains("has no plugin #2 (it has 1)") && err.contains("404"),
        "{err}"
    );
    let garbage = scratch.write("garbage.wasm", "\0asm\x0d\0\x01\0garbage");
    let err = worker.refused(
        &scratch,
        &["deploy", "live", garbage.to_str().unwrap()],
        Some(TOKEN),
    );
    assert!(
        err.contains("refused") && err.contains("tag-a 0.1.0") && err.contains("422"),
        "{err}"
    );
    let (status_line, body) = oversized_upload(&worker.address);
    assert!(status_line.contains("413"), "{status_line}: {body}");
    assert!(body.contains("larger than `max_upload_mb`"), "{body}");
    let err = worker.refused(&scratch, &["rollback", "live"], Some(TOKEN));
    assert!(
        err.contains("no earlier version is kept") && err.contains("409"),
        "{err}"
    );

    // Deploy, roll back, roll forward by hash.
    let out = worker.ok(
        &scratch,
        &["deploy", "live", plugin("tag-b").to_str().unwrap()],
    );
    assert!(
        out.contains("tag-a 0.1.0")
            && out.contains("-> tag-b 0.1.0")
            && out.contains("all 2 lane(s)"),
        "{out}"
    );
    let b_hash = worker.status(&scratch)["plugins"][0]["serving"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = worker.ok(&scratch, &["rollback", "live"]);
    assert!(out.contains("-> tag-a 0.1.0"), "{out}");
    let out = worker.ok(&scratch, &["rollback", "live", "--to", &b_hash[..10]]);
    assert!(out.contains("-> tag-b 0.1.0"), "{out}");
    let status = worker.status(&scratch);
    let plugin_status = &status["plugins"][0];
    assert_eq!(plugin_status["serving"]["hash"], b_hash.as_str());
    assert_eq!(plugin_status["lanes"].as_array().unwrap().len(), 2);
    assert_eq!(plugin_status["swaps"], 3);
    assert_eq!(plugin_status["refused"], 1);

    // A shadow: compared, shown, discarded; another, promoted.
    let tag_a = plugin("tag-a");
    let tag_a = tag_a.to_str().unwrap();
    let err = worker.refused(&scratch, &["discard", "live"], Some(TOKEN));
    assert!(
        err.contains("no shadow is running") && err.contains("409"),
        "{err}"
    );
    let out = worker.ok(&scratch, &["deploy", "live", "--shadow", tag_a]);
    assert!(
        out.contains("tag-a 0.1.0") && out.contains("runs in the shadow"),
        "{out}"
    );
    worker.wait_for(&scratch, "the shadow compares records", |status| {
        status["plugins"][0]["shadow"]["compared"].as_u64() > Some(20)
    });
    let shown = worker.ok(&scratch, &["status"]);
    assert!(
        shown.contains("shadow tag-a 0.1.0") && shown.contains("records compared differ"),
        "{shown}"
    );
    let out = worker.ok(&scratch, &["discard", "live"]);
    assert!(out.contains("shadow discarded"), "{out}");
    // tag-a and tag-b tag every record differently.
    let (differ, compared) = out
        .split_once(" of ")
        .and_then(|(head, tail)| {
            let differ = head.rsplit(' ').next()?.parse::<u64>().ok()?;
            let compared = tail.split(' ').next()?.parse::<u64>().ok()?;
            Some((differ, compared))
        })
        .unwrap_or_else(|| panic!("no tally in {out}"));
    assert!(differ == compared && compared > 20, "{out}");
    worker.ok(&scratch, &["deploy", "live", "--shadow", tag_a]);
    let out = worker.ok(&scratch, &["promote", "live"]);
    assert!(
        out.contains("-> tag-a 0.1.0") && out.contains("shadow tag-a 0.1.0"),
        "{out}"
    );

    // A canary that fails nothing passes; a bad rate is refused.
    let tag_b = plugin("tag-b");
    let tag_b = tag_b.to_str().unwrap();
    let err = worker.refused(
        &scratch,
        &[
            "deploy",
            "live",
            "--canary",
            "50",
            "--max-failure-rate",
            "2",
            tag_b,
        ],
        Some(TOKEN),
    );
    assert!(
        err.contains("between 0 and 1") && err.contains("400"),
        "{err}"
    );
    let out = worker.ok(&scratch, &["deploy", "live", "--canary", "50", tag_b]);
    assert!(
        out.contains("-> tag-b 0.1.0") && out.contains("a canary: back to tag-a 0.1.0"),
        "{out}"
    );
    worker.wait_for(&scratch, "the canary passes", |status| {
        status["plugins"][0]["canary"]["verdict"] == "passed"
    });
    let shown = worker.ok(&scratch, &["status"]);
    assert!(
        shown.contains("last trial: canary tag-b 0.1.0") && shown.contains("passed"),
        "{shown}"
    );

    // Pause: nothing more is read; resume: reading goes on.
    let out = worker.ok(&scratch, &["pause", "live"]);
    assert!(out.contains("pipeline `live`: paused"), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    let paused_at = worker.status(&scratch)["counters"]["records_in"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = worker.status(&scratch);
    assert_eq!(status["state"], "paused");
    assert_eq!(
        status["counters"]["records_in"].as_u64().unwrap(),
        paused_at,
        "read while paused"
    );
    let out = worker.ok(&scratch, &["resume", "live"]);
    assert!(out.contains("pipeline `live`: running"), "{out}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while worker.status(&scratch)["counters"]["records_in"]
        .as_u64()
        .unwrap()
        == paused_at
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never read again after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (exit, log) = worker.stop();
    assert!(exit.success(), "{log}");
    let first_run = std::fs::read_to_string(scratch.path("out.txt")).unwrap();
    assert!(first_run.lines().any(|line| line.starts_with("b ")));

    // A restart comes back on the deployed (uploaded) version, not the file's.
    let worker = Worker::start(&scratch, &path);
    let status = worker.status(&scratch);
    assert_eq!(
        status["plugins"][0]["serving"]["hash"],
        b_hash.as_str(),
        "{status}"
    );
    assert_eq!(status["plugins"][0]["serving"]["name"], "tag-b");
    let (exit, log) = worker.stop();
    assert!(exit.success(), "{log}");
}

#[test]
fn a_non_loopback_admin_address_without_a_token_is_refused_at_its_line() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[admin]
address = "0.0.0.0:0"

[[pipeline]]
name = "open"
source = { type = "generator", kind = "payments", count = 10 }
[[pipeline.sink]]
type = "stdout"
"#,
    );
    let output = weir_command(&scratch, &["run", path.to_str().unwrap()])
        .env_remove("WEIR_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = stderr(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("pipeline.toml:3:") && err.contains("needs a token"),
        "{err}"
    );
}

/// `GET path` with the token: the JSON body.
fn get_json(address: &str, path: &str) -> serde_json::Value {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

/// With an admin API, a quarantine pauses the pipeline for its operator
/// instead of ending it: status shows why, and the tenant's usage names
/// it; a rollback puts the previous version back and reads again; a
/// resume reads again with the faults counted afresh (here the bad version
/// quarantines it once more); a worker stopped while a pipeline is
/// quarantined exits non-zero.
#[test]
fn a_quarantined_pipeline_waits_for_its_operator_to_roll_back_or_resume() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[admin]
address = "127.0.0.1:0"
token = "s3cret"

[[tenant]]
name = "risky"
weight = 2
memory_mb_total = 256

[[pipeline]]
name = "live"
tenant = "risky"
parallelism = 2
source = { type = "generator", kind = "payments", rate = 2000 }
batch = { max_records = 8, linger_ms = 1 }
limits = { faults_before_quarantine = 3, fault_window_s = 600 }

[[pipeline.plugin]]
wasm = "{plugin:tag-a}"
watch = false
config = { always = "panic" }

[[pipeline.sink]]
type = "file"
path = "{dir}/out.txt"
"#,
    );
    let worker = Worker::start(&scratch, &path);
    let counter = |status: &serde_json::Value, name: &str| status["counters"][name].as_u64().unwrap();
    worker.wait_for(&scratch, "records out", |s| counter(s, "records_out") > 0);

    // A version that panics on every record: quarantined after 3 faults.
    let bad = plugin("misbehave");
    worker.ok(&scratch, &["deploy", "live", bad.to_str().unwrap()]);
    worker.wait_for(&scratch, "quarantined", |s| s["state"] == "quarantined");
    let status = worker.status(&scratch);
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("quarantined after 3 plugin faults within 600 s")
            && reason.contains("asked for a panic"),
        "{reason}"
    );
    let shown = worker.ok(&scratch, &["status"]);
    assert!(shown.contains("quarantined") && shown.contains("asked for a panic"), "{shown}");
    assert!(
        shown.contains("tenant `risky` (weight 2): 1 pipeline(s), quarantined: live; plugin memory")
            && shown.contains(" of 256 MiB"),
        "{shown}"
    );
    // The tenant's usage: what its pipeline did, and its instances' memory.
    let usage = &get_json(&worker.address, "/v1/tenants")[0];
    let status = worker.status(&scratch);
    assert_eq!(usage["name"], "risky");
    assert_eq!(usage["quarantined"], serde_json::json!(["live"]));
    assert_eq!(usage["memory_budget_bytes"], 256 << 20);
    let memory = usage["memory_bytes"].as_u64().unwrap();
    assert!(memory > 0 && memory <= 2 * (64 << 20), "{usage}");
    assert!(status["plugin_memory_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(usage["plugin_faults"].as_u64().unwrap() >= 3, "{usage}");
    assert!(usage["records_in"].as_u64().unwrap() >= counter(&status, "records_out"), "{usage}");
    assert!(usage["cpu_ms"].as_f64().unwrap() > 0.0, "{usage}");

    // Rolled back: the previous version serves and records flow again.
    let out = worker.ok(&scratch, &["rollback", "live"]);
    assert!(out.contains("-> tag-a 0.1.0"), "{out}");
    let before = counter(&worker.status(&scratch), "records_out");
    worker.wait_for(&scratch, "running and writing again", |s| {
        s["state"] == "running" && counter(s, "records_out") > before + 100
    });
    let faults = counter(&worker.status(&scratch), "plugin_faults");

    // Resumed under the bad version: its faults count afresh, and it is
    // quarantined again after 3 more.
    worker.ok(&scratch, &["deploy", "live", bad.to_str().unwrap()]);
    worker.wait_for(&scratch, "quarantined again", |s| s["state"] == "quarantined");
    let faults_then = counter(&worker.status(&scratch), "plugin_faults");
    assert!(faults_then >= faults + 3, "{faults} -> {faults_then}");
    worker.ok(&scratch, &["resume", "live"]);
    worker.wait_for(&scratch, "quarantined after the resume", |s| {
        s["state"] == "quarantined" && counter(s, "plugin_faults") >= faults_then + 3
    });

    let (status, log) = worker.stop();
    assert!(!status.success(), "a quarantined pipeline fails the run: {log}");
    assert!(log.contains("quarantined"), "{log}");
}
