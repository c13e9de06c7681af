//! The engine's promises: a plugin is stopped by each limit with an error
//! that says which, one bad record does not take its batch with it, and
//! only real weir components of this version load.

use std::time::Duration;

use weir::engine::{EngineOptions, Limits, LoadError, PluginEngine, PluginErrorKind};
use weir::testkit::{PluginHarness, TestRecord};

use crate::support::{Scratch, plugin};

fn records(values: &[&str]) -> Vec<TestRecord> {
    values.iter().map(|v| TestRecord::new(*v)).collect()
}

fn engine(scratch: &Scratch) -> PluginEngine {
    PluginEngine::new(EngineOptions {
        cache_dir: Some(scratch.path("cache")),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn one_failing_record_is_isolated_and_the_rest_of_the_batch_goes_on() {
    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    let outcomes = harness
        .process(&records(&["a", "fail", "b", "fail", "c"]))
        .unwrap();
    let emitted: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.outputs())
        .map(|o| o.value_str().into_owned())
        .collect();
    assert_eq!(emitted, ["a", "b", "c"]);
    assert_eq!(
        outcomes[1].failure(),
        Some("record at offset 1 is marked fail")
    );
    assert_eq!(
        outcomes[3].failure(),
        Some("record at offset 3 is marked fail")
    );
}

#[test]
fn a_trapping_plugin_is_stopped_with_its_panic_message() {
    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    let err = harness.process(&records(&["ok", "panic"])).unwrap_err();
    assert_eq!(err.plugin, "misbehave");
    assert_eq!(err.export, "process");
    let PluginErrorKind::Trap { panic, .. } = &err.kind else {
        panic!("expected a trap, got {err}");
    };
    assert!(
        panic.contains("record at offset 1 asked for a panic"),
        "{err}"
    );
    // The whole reason: the trap and where in the plugin it happened.
    let message = err.to_string();
    assert!(
        message.contains("unreachable")
            && message.contains("; in <misbehave::Misbehave as weir_guest::"),
        "{message}"
    );
    assert!(
        message.contains("misbehave"),
        "the plugin's own frames: {message}"
    );
    // The instance is gone: the next batch is refused, not run on a broken store.
    assert!(harness.process(&records(&["ok"])).is_err());
}

#[test]
fn a_plugin_over_its_memory_cap_is_stopped_with_a_memory_error() {
    let limits = Limits {
        memory_bytes: 32 << 20,
        batch_deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let mut harness =
        PluginHarness::load_with_limits(plugin("misbehave"), r#"{"hog_mib": 64}"#, &limits)
            .unwrap();
    let err = harness.process(&records(&["hog"])).unwrap_err();
    let PluginErrorKind::Memory {
        cap_mib,
        wanted_mib,
    } = err.kind
    else {
        panic!("expected a memory error, got {err}");
    };
    assert_eq!(cap_mib, 32);
    assert!(wanted_mib > 32, "asked for {wanted_mib} MiB");
    assert!(
        err.to_string()
            .contains("exceeded its memory cap of 32 MiB"),
        "{err}"
    );

    // Under the cap the same request succeeds.
    let mut roomy =
        PluginHarness::load_with_limits(plugin("misbehave"), r#"{"hog_mib": 8}"#, &limits).unwrap();
    assert_eq!(
        roomy.process(&records(&["hog"])).unwrap()[0]
            .outputs()
            .len(),
        1
    );
}

#[test]
fn a_plugin_past_its_batch_deadline_is_stopped_with_a_deadline_error() {
    let limits = Limits {
        batch_deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut harness = PluginHarness::load_with_limits(plugin("misbehave"), "{}", &limits).unwrap();
    let err = harness.process(&records(&["spin"])).unwrap_err();
    assert!(
        matches!(err.kind, PluginErrorKind::Deadline(d) if d == Duration::from_millis(200)),
        "expected a deadline error, got {err}"
    );
    assert!(err.to_string().contains("exceeded its deadline"), "{err}");
}

#[test]
fn garbage_core_modules_other_worlds_and_other_versions_are_refused_by_name() {
    let scratch = Scratch::new();
    let engine = engine(&scratch);

    let garbage = scratch.write("garbage.wasm", "this is not wasm at all");
    let err = engine.load(&garbage).err().unwrap();
    assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
    assert!(err.to_string().contains("garbage.wasm"), "{err}");

    let core = scratch.path("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = engine.load(&core).err().unwrap();
    assert!(
        err.to_string()
            .contains("core WebAssembly module, not a component"),
        "{err}"
    );

    let truncated = scratch.path("truncated.wasm");
    std::fs::write(&truncated, b"\0asm\x0d\0\x01\0\x01\x02").unwrap();
    let err = engine.load(&truncated).err().unwrap();
    assert!(matches!(err, LoadError::Invalid { .. }), "{err}");

    let err = engine.load(&plugin("wrong-world")).err().unwrap();
    let message = err.to_string();
    assert!(matches!(err, LoadError::WrongWorld { .. }), "{message}");
    assert!(
        message.contains("wrong-world.wasm") && message.contains("wasi:cli/run"),
        "{message}"
    );

    let err = engine.load(&plugin("future-version")).err().unwrap();
    let message = err.to_string();
    assert!(matches!(err, LoadError::WrongVersion { .. }), "{message}");
    assert!(
        message.contains("weir:plugin@1.0.0") && message.contains("weir:plugin@0.1.0"),
        "{message}"
    );
}

#[test]
fn compiled_components_are_reused_from_the_cache_across_engines() {
    let scratch = Scratch::new();
    let first = engine(&scratch);
    first.load(&plugin("identity")).unwrap();
    assert_eq!((first.cache().misses(), first.cache().hits()), (1, 0));

    // A new engine (a restart) loads the precompiled artifact instead.
    let second = engine(&scratch);
    let loaded = second.load(&plugin("identity")).unwrap();
    assert_eq!((second.cache().misses(), second.cache().hits()), (0, 1));
    let mut instance = loaded.instantiate(&Limits::default(), "{}").unwrap();
    let input = records(&["x"]);
    let reply = instance
        .process(&weir_guest::testing::pack(&input))
        .unwrap();
    let outcomes = weir_guest::testing::unpack(&reply, &input).unwrap();
    assert_eq!(outcomes[0].outputs()[0].value, b"x");
}

#[test]
fn plugins_have_no_environment_and_are_stopped_reaching_for_a_file_or_socket() {
    let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
    let seen = harness.process(&records(&["env"])).unwrap();
    let env = seen[0].outputs()[0].value_str().into_owned();
    assert!(env.starts_with("0 variables"), "{env}");
    for (deed, refusal) in [
        ("read", "tried to open a file or folder (`wasi:filesystem/preopens`)"),
        ("connect", "tried to open a TCP socket (`wasi:sockets/tcp-create-socket`)"),
    ] {
        let mut harness = PluginHarness::load(plugin("misbehave"), "{}").unwrap();
        let err = harness.process(&records(&[deed])).unwrap_err().to_string();
        assert!(
            err.contains(refusal) && err.contains("which plugins are not granted"),
            "{deed}: {err}"
        );
    }
}
