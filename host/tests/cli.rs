//! The `weir` binary's own basics. (Its presence here also makes cargo build
//! the binary with the test build, for the end-to-end tests in `tests/`.)

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

use std::process::Command;

fn weir(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .expect("weir runs")
}

#[test]
fn a_missing_pipeline_file_is_named_and_fails() {
    let output = weir(&["check", "no/such/pipeline.toml"]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.starts_with("weir: no/such/pipeline.toml:0: cannot read the pipeline file"),
        "{err}"
    );
}

#[test]
fn plugin_build_of_a_folder_without_a_crate_says_so() {
    let dir = std::env::temp_dir();
    let output = weir(&["plugin", "build", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("has no Cargo.toml: point at the plugin crate's folder"),
        "{err}"
    );
}
