//! The `weir` command as an operator or plugin author meets it.

use std::process::Command;

use crate::support::{Scratch, plugin, stderr, stdout, weir, weir_bin, workspace};

fn pipeline_with_plugin(scratch: &Scratch, wasm: &str) -> std::path::PathBuf {
    scratch.write("in.jsonl", "{\"amount\": 5}\n");
    scratch.pipeline(&format!(
        r#"[[pipeline]]
name = "p"
source = {{ type = "file", path = "in.jsonl" }}

[[pipeline.plugin]]
wasm = "{wasm}"
config = {{ field = "amount", min = 1 }}

[[pipeline.sink]]
type = "stdout"
"#
    ))
}

#[test]
fn check_and_run_refuse_garbage_and_wrong_world_wasm_naming_file_and_line() {
    let scratch = Scratch::new();
    let cache = scratch.path("cache");
    let garbage = scratch.write("garbage.wasm", "\u{7f}ELF not a component");
    let wrong_world = plugin("wrong-world");
    for (wasm, says) in [
        (garbage.display().to_string(), "is not a WebAssembly file"),
        (
            wrong_world.display().to_string(),
            "is a component but not a weir plugin",
        ),
    ] {
        let path = pipeline_with_plugin(&scratch, &wasm);
        for command in ["check", "run"] {
            let output = weir(&[command, path.to_str().unwrap()], &cache);
            let err = stderr(&output);
            assert!(!output.status.success(), "weir {command} accepted {wasm}");
            assert!(
                err.contains(&format!("{}:6:", path.display())),
                "weir {command}: {err}"
            );
            assert!(
                err.contains(&wasm) && err.contains(says),
                "weir {command}: {err}"
            );
            assert!(stdout(&output).is_empty(), "nothing ran");
        }
    }
}

#[test]
fn check_starts_the_plugins_with_their_config_and_reports_them() {
    let scratch = Scratch::new();
    let path = pipeline_with_plugin(&scratch, "{plugin:json-filter}");
    let output = weir(&["check", path.to_str().unwrap()], &scratch.path("cache"));
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("ok: pipeline `p`: 1 plugin(s): json-filter 0.1.0"),
        "{}",
        stdout(&output)
    );

    // A config the plugin rejects is refused at check time, with its words.
    let bad = std::fs::read_to_string(&path)
        .unwrap()
        .replace("min = 1", "min = 5, max = 1");
    std::fs::write(&path, bad).unwrap();
    let output = weir(&["check", path.to_str().unwrap()], &scratch.path("cache"));
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("rejected its config: `min` (5) is above `max` (1)"),
        "{err}"
    );
}

#[test]
fn config_mistakes_are_reported_at_their_line_with_the_bad_key() {
    let scratch = Scratch::new();
    let path = scratch.write(
        "pipeline.toml",
        "[[pipeline]]\nname = \"p\"\nsorce = { type = \"stdin\" }\n\n[[pipeline.sink]]\ntype = \"stdout\"\n",
    );
    let output = weir(&["check", path.to_str().unwrap()], &scratch.path("cache"));
    let err = stderr(&output);
    assert!(!output.status.success());
    assert!(
        err.contains(&format!("{}:3:", path.display())) && err.contains("unknown field `sorce`"),
        "{err}"
    );

    let path = scratch.write(
        "pipeline.toml",
        "[[pipeline]]\nname = \"p\"\nsource = { type = \"stdin\" }\n\n[[pipeline.sink]]\ntype = \"kafka-ish\"\n",
    );
    let err = stderr(&weir(
        &["run", path.to_str().unwrap()],
        &scratch.path("cache"),
    ));
    assert!(
        err.contains(&format!("{}:6:", path.display())) && err.contains("kafka-ish"),
        "{err}"
    );
}

/// Two tenants, each granted its own topics: a pipeline of one that
/// would write the other's topic is refused by `run` before anything is
/// read, naming the sink's line, the tenant and the topic.
#[test]
fn a_tenant_cannot_write_another_tenant_s_topic() {
    let scratch = Scratch::new();
    let path = scratch.write(
        "pipeline.toml",
        r#"[[tenant]]
name = "payments"
topics = ["payments.*"]

[[tenant]]
name = "clicks"
topics = ["clicks.*"]

[[pipeline]]
name = "sneaky"
tenant = "clicks"
source = { type = "stdin" }

[[pipeline.sink]]
type = "kafka"
brokers = "127.0.0.1:9"
topic = "payments.large"
"#,
    );
    let output = weir(&["run", path.to_str().unwrap()], &scratch.path("cache"));
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}:14:", path.display()))
            && err.contains("tenant `clicks` may not write Kafka topic `payments.large`")
            && err.contains("its `topics` grant: clicks.*"),
        "{err}"
    );
}

#[test]
fn a_quarantined_pipeline_stops_and_the_others_finish() {
    let scratch = Scratch::new();
    scratch.write("bad.jsonl", "ok\npanic\nok\npanic\npanic\nok\n");
    scratch.write("good.jsonl", "{\"n\":1}\n{\"n\":2}\n");
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "bad"
source = { type = "file", path = "bad.jsonl", format = "lines" }
limits = { faults_before_quarantine = 2 }
[[pipeline.plugin]]
wasm = "{plugin:misbehave}"
[[pipeline.sink]]
type = "file"
path = "bad-out.jsonl"
[pipeline.dead_letter]
type = "file"
path = "bad-dead.jsonl"

[[pipeline]]
name = "good"
source = { type = "file", path = "good.jsonl" }
[[pipeline.plugin]]
wasm = "{plugin:identity}"
[[pipeline.sink]]
type = "file"
path = "good-out.jsonl"
"#,
    );
    let output = weir(&["run", path.to_str().unwrap()], &scratch.path("cache"));
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("pipeline `bad`: quarantined after 2 plugin faults within 60 s")
            && err.contains("plugin `misbehave` 0.1.0: trapped"),
        "{err}"
    );
    assert!(err.contains("asked for a panic"), "{err}");
    assert!(
        err.contains("pipeline `good`: 2 records in, 2 out"),
        "{err}"
    );
    assert_eq!(scratch.json_lines("good-out.jsonl").len(), 2);
    // Every input of the quarantined pipeline is accounted for: out, or
    // dead-lettered with its fault or with the quarantine.
    let out = std::fs::read_to_string(scratch.path("bad-out.jsonl")).unwrap();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["ok", "ok"]);
    let dead = scratch.json_lines("bad-dead.jsonl");
    let reasons: Vec<(i64, &str)> = dead
        .iter()
        .map(|d| {
            let reason = d["headers"]["weir.error.reason"].as_str().unwrap();
            (d["offset"].as_i64().unwrap(), reason)
        })
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons[0].1.contains("asked for a panic") && reasons[0].0 == 2);
    assert!(reasons[1].1.contains("asked for a panic") && reasons[1].0 == 4);
    for (offset, reason) in &reasons[2..] {
        assert!(
            reason.starts_with("not processed: the pipeline was quarantined"),
            "line {offset}: {reason}"
        );
    }
}

#[test]
fn the_quickstart_prints_redacted_payments() {
    let quickstart = workspace().join("examples/quickstart.toml");
    let scratch = Scratch::new();
    let output = weir(
        &["run", quickstart.to_str().unwrap()],
        &scratch.path("cache"),
    );
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 50, "{} records printed", lines.len());
    for line in &lines {
        assert!(line["amount"].as_f64().unwrap() >= 100.0);
        assert!(line["email"].as_str().unwrap().contains("***@"), "{line}");
    }
    assert!(err.contains("pipeline `payments`: 200 records in"), "{err}");
}

#[test]
fn plugin_new_scaffolds_a_crate_that_passes_its_tests_and_builds() {
    let scratch = Scratch::new();
    let dir = scratch.path("my-plugin");
    let cache = scratch.path("cache");
    let output = weir(
        &["plugin", "new", "my-plugin", "--dir", dir.to_str().unwrap()],
        &cache,
    );
    assert!(output.status.success(), "{}", stderr(&output));

    // Share the workspace's target folder so dependencies are not rebuilt.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), Into::into);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let test = Command::new(&cargo)
        .args(["test", "--release", "--quiet"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    let test_out = stdout(&test);
    assert!(test.status.success(), "{test_out}\n{}", stderr(&test));
    assert!(test_out.contains("3 passed"), "{test_out}");

    let built = Command::new(weir_bin())
        .args(["plugin", "build", dir.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", &cache)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        stdout(&built).contains("built my-plugin 0.1.0"),
        "{}",
        stdout(&built)
    );

    let again = weir(
        &["plugin", "new", "my-plugin", "--dir", dir.to_str().unwrap()],
        &cache,
    );
    assert!(stderr(&again).contains("already exists"));
}

#[test]
fn stdin_lines_flow_to_stdout_until_stdin_closes() {
    use std::io::Write as _;
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "pipe"
source = { type = "stdin" }
[[pipeline.plugin]]
wasm = "{plugin:router}"
config = { field = "level", routes = { ERROR = "alerts" } }
[[pipeline.sink]]
type = "stdout"
routes = ["alerts"]
format = "envelope"
[[pipeline.sink]]
type = "file"
path = "rest.jsonl"
"#,
    );
    let mut child = run_reading_stdin(&scratch, &path);
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"level\":\"ERROR\",\"n\":1}\n{\"level\":\"INFO\",\"n\":2}\n{oops\n{\"level\":\"ERROR\",\"n\":3}\n")
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let alerts: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let numbers: Vec<i64> = alerts
        .iter()
        .map(|a| a["value"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 3]);
    assert_eq!(alerts[0]["route"], "alerts");
    assert_eq!(alerts[1]["offset"], 4, "offsets are stdin line numbers");
    assert_eq!(scratch.json_lines("rest.jsonl").len(), 1);
    // No dead-letter sink configured: the malformed line reaches stderr as an envelope.
    let err = stderr(&output);
    assert!(
        err.contains(r#""value":"{oops""#) && err.contains("malformed JSON at stdin:3"),
        "{err}"
    );
}

#[test]
fn a_quarantine_stops_the_run_even_while_the_source_waits_for_input() {
    use std::io::Write as _;
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "waiting"
source = { type = "stdin", format = "lines" }
batch = { linger_ms = 10 }
limits = { faults_before_quarantine = 1 }
[[pipeline.plugin]]
wasm = "{plugin:misbehave}"
[[pipeline.sink]]
type = "stdout"
"#,
    );
    let mut child = run_reading_stdin(&scratch, &path);
    // Stdin stays open: only the quarantine can end this run.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ok\npanic\n").unwrap();
    stdin.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run kept waiting for input after its plugin trapped");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    drop(stdin);
    let err = stderr(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("pipeline `waiting`: quarantined after 1 plugin faults")
            && err.contains("plugin `misbehave` 0.1.0: trapped"),
        "{err}"
    );
}

/// `weir run PATH` with stdin, stdout and stderr piped to the test.
fn run_reading_stdin(scratch: &Scratch, path: &std::path::Path) -> std::process::Child {
    Command::new(weir_bin())
        .args(["run", path.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", scratch.path("cache"))
        .env("WEIR_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn exactly_once_without_a_worker_id_is_refused_before_anything_is_read() {
    let scratch = Scratch::new();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "eo"
delivery = "exactly_once"
source = { type = "kafka", brokers = "127.0.0.1:9", topics = ["in"] }

[[pipeline.sink]]
type = "kafka"
brokers = "127.0.0.1:9"
topic = "out"

[pipeline.dead_letter]
type = "kafka"
brokers = "127.0.0.1:9"
topic = "dlq"
"#,
    );
    let output = std::process::Command::new(weir_bin())
        .args(["run", path.to_str().unwrap()])
        .env("WEIR_CACHE_DIR", scratch.path("cache"))
        .env_remove("WEIR_WORKER_ID")
        .output()
        .unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("needs WEIR_WORKER_ID") && err.contains("pipeline `eo`"),
        "{err}"
    );
}

#[test]
fn check_opens_nothing_but_finds_sinks_that_could_not_open_at_their_line() {
    let scratch = Scratch::new();
    scratch.write("in.jsonl", "{}\n");
    let check = |sink: &str| {
        let path = scratch.pipeline(&format!(
            r#"
[[pipeline]]
name = "p"
source = {{ type = "file", path = "in.jsonl" }}

[[pipeline.sink]]
type = "stdout"

[[pipeline.sink]]
{sink}
"#
        ));
        let output = weir(&["check", path.to_str().unwrap()], &scratch.path("cache"));
        (output.status.success(), stderr(&output))
    };
    let (ok, err) = check("type = \"file\"\npath = \"in.jsonl/out.jsonl\"");
    assert!(
        !ok && err.contains("pipeline.toml:9:") && err.contains("is not a folder"),
        "{err}"
    );
    let (ok, err) = check(
        "type = \"kafka\"\nbrokers = \"127.0.0.1:9\"\ntopic = \"t\"\noptions = { \"no.such.option\" = \"1\" }",
    );
    assert!(
        !ok && err.contains("pipeline.toml:9:") && err.contains("no.such.option"),
        "{err}"
    );
    let (ok, err) = check("type = \"file\"\npath = \"fresh/dir/out.jsonl\"");
    assert!(ok, "{err}");
    assert!(!scratch.path("fresh").exists(), "check created nothing");
}

/// `weir plugin build` builds a window aggregate as it does a transform,
/// and `weir check` starts the aggregates a window names.
#[test]
fn plugin_build_and_check_know_a_window_aggregate() {
    let scratch = Scratch::new();
    let cache = scratch.path("cache");
    let dir = workspace().join("plugins/top-n");
    let built = weir(&["plugin", "build", dir.to_str().unwrap()], &cache);
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(
        stdout(&built).contains("built top-n 0.1.0 (window aggregate)"),
        "{}",
        stdout(&built)
    );
    std::fs::write(scratch.path("in.jsonl"), "").unwrap();
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "ranked"
source = { type = "file", path = "{dir}/in.jsonl" }
[pipeline.window]
kind = "tumbling"
size = "1s"
aggregates = [ { crate = "PLUGIN", as = "top", config = { field = "v" } } ]
[[pipeline.sink]]
type = "stdout"
"#
        .replace("PLUGIN", dir.to_str().unwrap())
        .as_str(),
    );
    let checked = weir(&["check", path.to_str().unwrap()], &cache);
    assert!(checked.status.success(), "{}", stderr(&checked));
    assert!(
        stdout(&checked).contains("window with aggregate plugin(s): top-n 0.1.0"),
        "{}",
        stdout(&checked)
    );
}
