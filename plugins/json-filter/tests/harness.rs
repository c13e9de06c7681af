//! The built component in the real engine: same answers as natively.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

use weir::testkit::{PluginHarness, TestRecord};

#[test]
fn filters_and_dead_letters_inside_the_sandbox() {
    let wasm = PluginHarness::build(env!("CARGO_MANIFEST_DIR")).unwrap();
    let mut plugin = PluginHarness::load(&wasm, r#"{"field": "amount", "min": 100}"#).unwrap();
    assert_eq!(
        (plugin.name(), plugin.version()),
        ("json-filter", env!("CARGO_PKG_VERSION"))
    );

    let input = [
        r#"{"amount": 250}"#,
        r#"{"amount": 99.99}"#,
        "{broken",
        r#"{"amount": 100}"#,
    ];
    let outcomes = plugin.process(&input.map(TestRecord::new)).unwrap();
    assert_eq!(outcomes[0].outputs()[0].value_str(), input[0]);
    assert!(outcomes[1].is_dropped());
    assert!(
        outcomes[2]
            .failure()
            .unwrap()
            .starts_with("not a JSON object")
    );
    assert_eq!(outcomes[3].outputs().len(), 1);
}

#[test]
fn a_bad_config_is_refused_with_the_plugins_message() {
    let wasm = PluginHarness::build(env!("CARGO_MANIFEST_DIR")).unwrap();
    let err = PluginHarness::load(&wasm, r#"{"field": "amount"}"#)
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(err.contains("json-filter"), "{err}");
    assert!(
        err.contains("rejected its config: set `min`, `max` or both"),
        "{err}"
    );
}
