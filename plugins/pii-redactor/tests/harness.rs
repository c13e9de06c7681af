//! The built component in the real engine: masks, and reports what it
//! masked through the host's counters.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

use weir::testkit::{PluginHarness, TestRecord};

#[test]
fn masks_inside_the_sandbox_and_counts_through_the_host() {
    let wasm = PluginHarness::build(env!("CARGO_MANIFEST_DIR")).unwrap();
    let mut plugin = PluginHarness::load(&wasm, "{}").unwrap();
    let input = [
        r#"{"email":"customer9@example.com","card_number":"4242 4242 4242 4242"}"#,
        r#"{"email":"none"}"#,
    ];
    let outcomes = plugin.process(&input.map(TestRecord::new)).unwrap();
    assert_eq!(
        outcomes[0].outputs()[0].value_str(),
        r#"{"card_number":"**** **** **** 4242","email":"c***@example.com"}"#
    );
    assert_eq!(outcomes[1].outputs()[0].value_str(), input[1]);
    assert_eq!(plugin.counters().get("emails_masked"), 1);
    assert_eq!(plugin.counters().get("cards_masked"), 1);
}
