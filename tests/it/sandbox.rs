//! Hostile plugins against the sandbox: whatever a plugin does (many
//! memories, sleeping in host calls, floods of output, logs or counters), the
//! host stays inside its budget, and the plugin is stopped with an error that
//! names the limit.

use std::process::Command;
use std::time::Duration;

use weir::engine::{EngineOptions, Limits, PluginEngine, PluginErrorKind, WasiGrants};
use weir::testkit::{PluginHarness, TestRecord};

use crate::support::{
    Scratch, hostile, plugin, run_measured, stderr, weir_bin, weir_command as weir,
};

fn records(values: &[&str]) -> Vec<TestRecord> {
    values.iter().map(|v| TestRecord::new(*v)).collect()
}

/// Long enough for any honest run here; a run past it has hung.
const HANG: Duration = Duration::from_secs(120);

/// Runs the `many-memories` plugin (40 memories of 24 MiB, each under any
/// cap here) over one record, `before` the pipeline and `within` its
/// table; checks that the run failed, naming a cap of `cap_mib`, and that
/// weir stayed far under what the memories would take. Gives the log.
fn run_many_memories(before: &str, within: &str, cap_mib: u64) -> (std::path::PathBuf, String) {
    let scratch = Scratch::new();
    scratch.write("in.jsonl", "{\"n\":1}\n");
    let wasm = hostile("many-memories");
    let path = scratch.pipeline(&format!(
        r#"{before}
[[pipeline]]
name = "hostile"
source = {{ type = "file", path = "in.jsonl" }}
{within}

[[pipeline.plugin]]
wasm = "{}"

[[pipeline.sink]]
type = "file"
path = "out.jsonl"
"#,
        wasm.display()
    ));
    let run = run_measured(&mut weir(&scratch, &["run", path.to_str().unwrap()]), HANG);
    let err = stderr(&run.output);
    assert!(!run.output.status.success(), "{err}");
    assert!(
        err.contains(&format!("exceeded its memory cap of {cap_mib} MiB")),
        "{err}"
    );
    // 40 memories of 24 MiB would be 960 MiB.
    assert!(
        run.peak_rss_mib < 200,
        "weir reached {} MiB running a plugin capped at {cap_mib} MiB",
        run.peak_rss_mib
    );
    (path, err)
}

#[test]
fn a_component_with_many_memories_is_held_to_one_cap_for_the_whole_instance() {
    let (path, err) = run_many_memories("", "limits = { memory_mb = 32 }", 32);
    assert!(
        err.contains("all its memories and tables together"),
        "{err}"
    );
    assert!(err.contains(&format!("{}:8:", path.display())), "{err}");
}

/// A pipeline that sets no limits of its own runs under its tenant's: the
/// same hostile plugin is stopped at the tenant's 16 MiB.
#[test]
fn a_pipeline_without_limits_of_its_own_is_held_to_its_tenant_s() {
    run_many_memories(
        "[[tenant]]\nname = \"guests\"\nlimits = { memory_mb = 16 }\n",
        "tenant = \"guests\"",
        16,
    );
}

#[test]
fn a_plugin_sleeping_in_a_host_call_is_stopped_at_its_deadline() {
    let limits = Limits {
        batch_deadline: Duration::from_millis(300),
        wasi: WasiGrants {
            monotonic_clock: true,
            ..WasiGrants::default()
        },
        ..Limits::default()
    };
    let mut harness = PluginHarness::load_with_limits(plugin("misbehave"), "{}", &limits).unwrap();
    let err = harness.process(&records(&["ok", "sleep"])).unwrap_err();
    assert!(
        matches!(err.kind, PluginErrorKind::Deadline(d) if d == Duration::from_millis(300)),
        "expected a deadline error, got {err}"
    );
}

#[test]
fn check_and_run_end_when_a_plugin_sleeps_in_init() {
    let scratch = Scratch::new();
    scratch.write("in.jsonl", "{\"n\":1}\n");
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "sleepy"
source = { type = "file", path = "in.jsonl" }
limits = { batch_timeout_ms = 500, wasi = ["monotonic-clock"] }

[[pipeline.plugin]]
wasm = "{plugin:misbehave}"
config = { sleep_in_init = true }

[[pipeline.sink]]
type = "stdout"
"#,
    );
    for command in ["check", "run"] {
        let run = run_measured(
            &mut weir(&scratch, &[command, path.to_str().unwrap()]),
            HANG,
        );
        let err = stderr(&run.output);
        assert!(!run.output.status.success(), "weir {command}: {err}");
        assert!(
            err.contains("exceeded its deadline of 500ms") && err.contains("(in `init`)"),
            "weir {command}: {err}"
        );
    }
}

#[test]
fn a_chatty_plugin_keeps_working_and_its_lines_reach_the_log_one_line_each() {
    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    // 20,000 lines of stderr: over a lifetime's worth of the old 64 KiB pipe.
    for batch in 0..20 {
        let outcomes = harness.process(&records(&["say"; 1000])).unwrap();
        assert!(
            outcomes.iter().all(|o| o.outputs().len() == 1),
            "batch {batch} lost records"
        );
    }

    // Through the CLI: lines reach the log, rate-limited, and a plugin
    // cannot forge a host log line with a newline or an escape sequence.
    let scratch = Scratch::new();
    let lines: String = (0..500).map(|_| "log\n").collect();
    scratch.write("in.jsonl", &lines);
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "chatty"
source = { type = "file", path = "in.jsonl", format = "lines" }
limits = { log_lines_per_s = 50 }

[[pipeline.plugin]]
wasm = "{plugin:misbehave}"

[[pipeline.sink]]
type = "file"
path = "out.jsonl"
"#,
    );
    let mut command = weir(&scratch, &["run", path.to_str().unwrap()]);
    command.env("WEIR_LOG", "info");
    let run = run_measured(&mut command, HANG);
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    assert!(err.contains("500 records in, 500 out"), "{err}");
    let logged = err.lines().filter(|l| l.contains("logged")).count();
    assert!(
        (1..=100).contains(&logged),
        "{logged} of 500 plugin lines logged at 50 a second"
    );
    assert!(
        err.contains("Plugin logs more than its limits allow"),
        "{err}"
    );
    assert!(
        !err.lines().any(|l| l.starts_with("INFO weir: forged")),
        "a plugin forged a host log line: {err}"
    );
    assert!(err.contains("logged\\nINFO weir: forged"), "{err}");
}

#[test]
fn counters_are_held_to_their_name_length_and_count() {
    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    let err = harness.process(&records(&["counter-long"])).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            &err.kind,
            PluginErrorKind::HostLimit {
                limit: "counter_name_bytes",
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("31457280 bytes, over the cap of 128"),
        "{message}"
    );

    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    let err = harness.process(&records(&["counter-many"])).unwrap_err();
    assert!(
        matches!(
            &err.kind,
            PluginErrorKind::HostLimit {
                limit: "counters",
                ..
            }
        ),
        "{err}"
    );
    // The failed call's increments are not kept.
    assert_eq!(harness.counters().len(), 0);
}

#[test]
fn randomness_is_the_same_in_every_instance_of_a_plugin_unless_granted() {
    let draw = |wasi: WasiGrants| {
        let limits = Limits {
            wasi,
            ..Limits::default()
        };
        let mut harness =
            PluginHarness::load_with_limits(plugin("misbehave"), "{}", &limits).unwrap();
        let outcomes = harness.process(&records(&["random"])).unwrap();
        outcomes[0].outputs()[0].value_str().into_owned()
    };
    let first = draw(WasiGrants::default());
    assert!(first.parse::<u64>().is_ok(), "{first}");
    assert_eq!(first, draw(WasiGrants::default()), "a replay sees the same random stream");
    let real = WasiGrants {
        random: true,
        ..WasiGrants::default()
    };
    // Host entropy: two instances draw alike with odds of 2^-64.
    assert_ne!(draw(real), draw(real), "`random` grants the host's entropy");
}

/// No clock is granted by default: reading one, or sleeping, stops the
/// plugin with an error naming the grant that would allow it; granted, it
/// reads the real clock.
#[test]
fn clocks_are_granted_one_by_one_and_none_by_default() {
    let run = |wasi: WasiGrants, deed: &str| {
        let limits = Limits {
            wasi,
            ..Limits::default()
        };
        let mut harness =
            PluginHarness::load_with_limits(plugin("misbehave"), "{}", &limits).unwrap();
        harness.process(&records(&[deed]))
    };
    let none = WasiGrants::default();
    for (deed, refusal) in [
        ("wall-clock", "tried to read the wall clock (`wasi:clocks/wall-clock`), which this pipeline does not grant (`limits.wasi = [\"wall-clock\"]` would)"),
        ("sleep", "tried to sleep (`wasi:clocks/monotonic-clock`), which this pipeline does not grant (`limits.wasi = [\"monotonic-clock\"]` would)"),
    ] {
        let err = run(none, deed).unwrap_err();
        assert!(
            matches!(err.kind, PluginErrorKind::NotGranted { .. }) && err.to_string().contains(refusal),
            "{deed}: {err}"
        );
    }
    let wall = WasiGrants {
        wall_clock: true,
        ..WasiGrants::default()
    };
    let seen = run(wall, "wall-clock").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let read: u64 = seen[0].outputs()[0].value_str().parse().unwrap();
    assert!(read.abs_diff(now) < 3600, "the plugin read {read}, the host {now}");
    // The wall clock does not grant the monotonic one.
    assert!(run(wall, "sleep").is_err());
}

#[test]
fn a_cache_folder_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let scratch = Scratch::new();
    let shared = scratch.path("shared-cache");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = PluginEngine::new(EngineOptions {
        cache_dir: Some(shared.clone()),
        ..Default::default()
    })
    .err()
    .expect("a world-writable cache is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains(&shared.display().to_string())
            && message.contains("others can write to it (mode 0777)"),
        "{message}"
    );
}

#[test]
fn a_compiled_artifact_planted_under_another_plugins_name_is_never_run() {
    let scratch = Scratch::new();
    let cache = scratch.path("cache");
    let engine = || {
        PluginEngine::new(EngineOptions {
            cache_dir: Some(cache.clone()),
            ..Default::default()
        })
        .unwrap()
    };
    // Compile both, then put identity's machine code under json-filter's name.
    let first = engine();
    first.load(&plugin("identity")).unwrap();
    let identity_entry = newest_entry(&cache);
    first.load(&plugin("json-filter")).unwrap();
    let filter_entry = newest_entry(&cache);
    assert_ne!(identity_entry, filter_entry);
    std::fs::copy(&identity_entry, &filter_entry).unwrap();

    let second = engine();
    let filter = second.load(&plugin("json-filter")).unwrap();
    assert_eq!(
        (second.cache().hits(), second.cache().misses()),
        (0, 1),
        "the planted artifact was not loaded"
    );
    let mut instance = filter
        .instantiate(&Limits::default(), r#"{"field":"amount","min":10}"#)
        .unwrap();
    assert_eq!(instance.name(), "json-filter");
    let input = records(&[r#"{"amount":1}"#]);
    let reply = instance
        .process(&weir_guest::testing::pack(&input))
        .unwrap();
    let outcomes = weir_guest::testing::unpack(&reply, &input).unwrap();
    assert!(outcomes[0].is_dropped(), "json-filter's own code ran");

    // A file that belongs to another user is not trusted either.
    let third_entry = newest_entry(&cache);
    std::os::unix::fs::chown(&third_entry, Some(4242), None).unwrap();
    let third = engine();
    third.load(&plugin("json-filter")).unwrap();
    assert_eq!((third.cache().hits(), third.cache().misses()), (0, 1));
}

/// The compiled artifact written last in `cache`.
fn newest_entry(cache: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "cwasm"))
        .max_by_key(|path| std::fs::metadata(path).unwrap().modified().unwrap())
        .expect("a compiled artifact")
}

#[test]
fn without_a_home_nothing_is_cached_and_no_shared_folder_is_used() {
    let scratch = Scratch::new();
    scratch.write("in.jsonl", "{\"n\":1}\n");
    let path = scratch.pipeline(
        r#"
[[pipeline]]
name = "homeless"
source = { type = "file", path = "in.jsonl" }
[[pipeline.plugin]]
wasm = "{plugin:identity}"
[[pipeline.sink]]
type = "stdout"
"#,
    );
    let output = Command::new(weir_bin())
        .args(["check", path.to_str().unwrap()])
        .env_remove("WEIR_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HOME")
        .env("TMPDIR", scratch.path("tmp"))
        .env("WEIR_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("No compile cache"),
        "{}",
        stderr(&output)
    );
    assert!(
        !scratch.path("tmp").exists(),
        "nothing written to a temp folder"
    );
}

/// `weir run` of a lines file through misbehave, with `limits`; returns the
/// run, the values written, and the dead letters as (line, reason).
fn run_lines(
    scratch: &Scratch,
    lines: &[&str],
    limits: &str,
    config: &str,
) -> (crate::support::Measured, Vec<String>, Vec<(i64, String)>) {
    let mut input = Vec::new();
    for line in lines {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    std::fs::write(scratch.path("in.txt"), input).unwrap();
    let path = scratch.pipeline(&format!(
        r#"
[[pipeline]]
name = "poison"
source = {{ type = "file", path = "in.txt", format = "lines" }}
limits = {{ {limits} }}

[[pipeline.plugin]]
wasm = "{{plugin:misbehave}}"
config = {{ {config} }}

[[pipeline.sink]]
type = "file"
path = "out.txt"

[pipeline.dead_letter]
type = "file"
path = "dead.jsonl"
"#
    ));
    let run = run_measured(&mut weir(scratch, &["run", path.to_str().unwrap()]), HANG);
    let out = std::fs::read_to_string(scratch.path("out.txt")).unwrap_or_default();
    let dead = scratch
        .json_lines("dead.jsonl")
        .iter()
        .map(|d| {
            let reason = d["headers"]["weir.error.reason"]
                .as_str()
                .unwrap_or_default();
            (d["offset"].as_i64().unwrap(), reason.to_owned())
        })
        .collect();
    (run, out.lines().map(str::to_owned).collect(), dead)
}

/// A CPU-time budget charges what a plugin runs, not what it waits: the
/// record that spins is stopped by `cpu_ms_per_batch` (long before the
/// deadline), the one that sleeps in a host call by the deadline, never by
/// the CPU budget; every other record goes on, in order.
#[test]
fn a_spinning_plugin_is_stopped_by_its_cpu_budget_and_a_waiting_one_is_not_charged() {
    let scratch = Scratch::new();
    let mut lines: Vec<String> = (0..200).map(|i| format!("line-{i}")).collect();
    lines[50] = "spin".into();
    lines[150] = "sleep".into();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (run, out, dead) = run_lines(
        &scratch,
        &lines,
        "batch_timeout_ms = 3000, cpu_ms_per_batch = 100, wasi = [\"monotonic-clock\"]",
        "",
    );
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    let kept: Vec<&str> = (lines.iter().enumerate())
        .filter(|(i, _)| ![50, 150].contains(i))
        .map(|(_, l)| *l)
        .collect();
    assert_eq!(out, kept, "every other line, in order");
    let offsets: Vec<i64> = dead.iter().map(|(line, _)| *line).collect();
    assert_eq!(offsets, [51, 151], "line numbers");
    assert!(
        dead[0]
            .1
            .contains("used more than its 100ms of CPU time per call"),
        "{:?}",
        dead[0]
    );
    assert!(
        dead[1].1.contains("exceeded its deadline of 3s"),
        "{:?}",
        dead[1]
    );
}

#[test]
fn poison_records_are_dead_lettered_alone_and_the_rest_go_on_in_order() {
    let scratch = Scratch::new();
    let big = "x".repeat(40 << 20);
    let mut lines: Vec<String> = (0..2000).map(|i| format!("line-{i}")).collect();
    lines[10] = "panic".into();
    lines[500] = "sleep".into();
    lines[1000] = "hog".into();
    lines[1500] = big;
    lines[1999] = "panic".into();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (run, out, dead) = run_lines(
        &scratch,
        &lines,
        // The 40 MiB line reaches the plugin: it is under `max_record_bytes`.
        "memory_mb = 32, batch_timeout_ms = 300, max_record_bytes = 67108864, wasi = [\"monotonic-clock\"]",
        "hog_mib = 64",
    );
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    let expected: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| ![10, 500, 1000, 1500, 1999].contains(i))
        .map(|(_, l)| *l)
        .collect();
    assert_eq!(out, expected, "every other line, in order");
    let offsets: Vec<i64> = dead.iter().map(|(line, _)| *line).collect();
    assert_eq!(offsets, [11, 501, 1001, 1501, 2000], "line numbers");
    assert!(
        dead[0].1.contains("trapped") && dead[0].1.contains("asked for a panic"),
        "{:?}",
        dead[0]
    );
    assert!(
        dead[1].1.contains("exceeded its deadline of 300ms"),
        "{:?}",
        dead[1]
    );
    assert!(
        dead[2].1.contains("exceeded its memory cap of 32 MiB"),
        "{:?}",
        dead[2]
    );
    assert!(
        dead[3].1.contains("exceeded its memory cap of 32 MiB"),
        "{:?}",
        dead[3]
    );
    assert!(
        err.contains("2,000 records in, 1,995 out, 0 dropped, 5 dead-lettered, 5 plugin faults"),
        "{err}"
    );
}

#[test]
fn a_record_whose_outputs_break_a_cap_is_dead_lettered_before_the_host_holds_them() {
    let scratch = Scratch::new();
    // Five million forwards of one record: 15 MB of reply, gigabytes of host
    // records if they were taken.
    let (run, out, dead) = run_lines(&scratch, &["a", "forward-flood", "b"], "", "");
    let err = stderr(&run.output);
    assert!(run.output.status.success(), "{err}");
    assert_eq!(out, ["a", "b"]);
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .1
            .contains("broke `limits.outputs_per_record` (1000): it emitted 5000000 outputs"),
        "{:?}",
        dead[0]
    );
    assert!(
        run.peak_rss_mib < 256,
        "weir reached {} MiB on an output flood",
        run.peak_rss_mib
    );

    // Within the count, the bytes of a batch are capped too.
    let scratch = Scratch::new();
    let (run, out, dead) = run_lines(
        &scratch,
        &["a", "forward-flood", "b"],
        "outputs_per_record = 100000, output_mb_per_batch = 1",
        "flood = 50000",
    );
    assert!(run.output.status.success(), "{}", stderr(&run.output));
    assert_eq!(out, ["a", "b"]);
    assert!(
        dead[0]
            .1
            .contains("broke `limits.output_mb_per_batch` (1 MiB)"),
        "{:?}",
        dead[0]
    );
}
