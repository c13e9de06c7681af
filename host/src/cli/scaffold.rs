//! `weir plugin new`: writes a plugin crate that builds for wasm32-wasip2
//! and passes its own tests, from the templates in `host/templates/plugin`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};

const CARGO_TOML: &str = include_str!("../../templates/plugin/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../../templates/plugin/lib.rs.tmpl");
/// The SDK beside this weir's source, found at build time.
const BUNDLED_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-sdk");

pub fn new_plugin(
    name: &str,
    dir: Option<PathBuf>,
    sdk: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}` is not a usable crate name: start with a letter, then letters, digits, `-` or `_`"
        );
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() {
        bail!(
            "`{}` already exists; choose another name or --dir",
            dir.display()
        );
    }
    let sdk = sdk.unwrap_or_else(|| PathBuf::from(BUNDLED_SDK));
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "cannot find the weir-guest SDK at `{}`; pass --sdk PATH",
            sdk.display()
        )
    })?;

    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create `{}`", dir.display()))?;
    // A crate outside any workspace gets its own, so cargo does not adopt it
    // into an enclosing one by accident.
    let workspace = if inside_workspace(&dir) {
        ""
    } else {
        "\n[workspace]\n"
    };
    let manifest = CARGO_TOML
        .replace("{{name}}", name)
        .replace("{{sdk}}", &sdk.display().to_string().replace('\\', "/"))
        .replace("{{workspace}}", workspace);
    std::fs::write(dir.join("Cargo.toml"), manifest)?;
    std::fs::write(dir.join("src/lib.rs"), LIB_RS)?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    say!(stdout, "created plugin `{name}` in {}", dir.display());
    say!(stdout, "  test it:   cd {} && cargo test", dir.display());
    say!(stdout, "  build it:  weir plugin build {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Whether a folder above `dir` has a Cargo.toml with a `[workspace]`.
fn inside_workspace(dir: &Path) -> bool {
    let Ok(start) = std::path::absolute(dir) else {
        return false;
    };
    start.ancestors().skip(1).any(|folder| {
        std::fs::read_to_string(folder.join("Cargo.toml"))
            .is_ok_and(|manifest| manifest.contains("[workspace]"))
    })
}
