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

/// The `weir` binary. `cargo nextest run --workspace --release` builds it
/// (the host crate has integration tests); when only this crate's tests are
/// run it is built here.
pub fn weir_bin() -> PathBuf {
    let bin = target_dir().join("release/weir");
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if !bin.is_file() {
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

/// Runs `weir ARGS` with a private compile cache.
pub fn weir(args: &[&str], cache: &Path) -> Output {
    Command::new(weir_bin())
        .args(args)
        .env("WEIR_CACHE_DIR", cache)
        .env("WEIR_LOG", "warn")
        .output()
        .expect("weir runs")
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
