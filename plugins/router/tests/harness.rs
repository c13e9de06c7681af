//! The built component in the real engine routes as it does natively.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

use weir::testkit::{PluginHarness, TestRecord};

#[test]
fn routes_inside_the_sandbox() {
    let wasm = PluginHarness::build(env!("CARGO_MANIFEST_DIR")).unwrap();
    let config = r#"{"field": "level", "routes": {"ERROR": "alerts", "WARN": "alerts"}}"#;
    let mut plugin = PluginHarness::load(&wasm, config).unwrap();
    let input = [r#"{"level":"ERROR"}"#, r#"{"level":"INFO"}"#, "not json"];
    let outcomes = plugin.process(&input.map(TestRecord::new)).unwrap();
    assert_eq!(outcomes[0].outputs()[0].route.as_deref(), Some("alerts"));
    assert_eq!(outcomes[1].outputs()[0].route, None);
    assert!(
        outcomes[2]
            .failure()
            .unwrap()
            .starts_with("not a JSON object")
    );
}
