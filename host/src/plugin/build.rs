//! Builds a plugin crate for `wasm32-wasip2` with cargo, and says exactly
//! what to do when the target or cargo is missing.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target plugins are built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// Why a plugin crate did not build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("`{0}` has no Cargo.toml: point at the plugin crate's folder")]
    NotACrate(PathBuf),
    #[error("the `{WASM_TARGET}` target is not installed; run `rustup target add {WASM_TARGET}`")]
    TargetMissing,
    #[error("cannot run cargo: {0}; install Rust with rustup (https://rustup.rs)")]
    NoCargo(std::io::Error),
    #[error("cargo could not build the plugin in `{dir}` (its errors are above)")]
    Failed { dir: PathBuf },
    #[error("cargo built `{dir}` but produced no .wasm: is it a `cdylib` crate?")]
    NoArtifact { dir: PathBuf },
}

/// Builds the crate in `dir` in release mode for [`WASM_TARGET`] and returns
/// the `.wasm`. Cargo's own output goes to stderr; up-to-date crates cost a
/// fraction of a second.
pub fn build_crate(dir: &Path) -> Result<PathBuf, BuildError> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(BuildError::NotACrate(dir.to_owned()));
    }
    if !target_installed() {
        return Err(BuildError::TargetMissing);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--target", WASM_TARGET])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BuildError::NoCargo)?;

    let mut wasm = None;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(path) = wasm_artifact(&line, &manifest) {
                wasm = Some(path);
            }
        }
    }
    let status = child.wait().map_err(BuildError::NoCargo)?;
    if !status.success() {
        return Err(BuildError::Failed {
            dir: dir.to_owned(),
        });
    }
    wasm.ok_or_else(|| BuildError::NoArtifact {
        dir: dir.to_owned(),
    })
}

/// The `.wasm` named by a cargo `compiler-artifact` message for `manifest`'s
/// package, if `line` is one.
fn wasm_artifact(line: &str, manifest: &Path) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let ours = message["manifest_path"]
        .as_str()
        .is_some_and(|p| same_file(Path::new(p), manifest));
    if !ours {
        return None;
    }
    message["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether rustup (or the sysroot) has the wasm target's standard library.
fn target_installed() -> bool {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            Path::new(&root)
                .join("lib/rustlib")
                .join(WASM_TARGET)
                .is_dir()
        }
        // Without rustc we cannot tell; let cargo report what is wrong.
        _ => true,
    }
}
