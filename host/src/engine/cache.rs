//! On-disk cache of compiled components, so a restart or a rollback loads
//! machine code in a fraction of a millisecond instead of compiling for
//! 30–65 ms.
//!
//! A cached artifact is native code that weir runs, so the cache trusts
//! nothing it did not write itself:
//! - the folder must belong to this user and be writable by no one else
//!   (weir creates it `0700`); otherwise the engine refuses to start, naming
//!   the folder and what is wrong with it. With no cache folder configured
//!   and no home, nothing is cached: there is no shared temporary fallback.
//! - each file must be a regular file of this user's, writable by no one
//!   else; anything else is ignored (and the component compiled in memory).
//! - each file names the SHA-256 of the `.wasm` it was compiled from and of
//!   its own machine code; both are checked on load, so an artifact copied
//!   under another plugin's name, or cut short, is never run.
//!
//! We use `Component::serialize`/`deserialize` rather than wasmtime's
//! `cache` feature: it needs no config file, the key is explicit, and
//! `weir plugin build` can precompile into it.

use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// First bytes of every artifact weir writes.
const MAGIC: &[u8; 16] = b"weir-artifact-v1";
/// Magic, the `.wasm`'s SHA-256, the machine code's SHA-256.
const HEADER: usize = MAGIC.len() + 32 + 32;

/// Why the compile cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The folder could not be created or inspected.
    #[error("compile cache `{dir}`: {source}")]
    Io {
        /// The folder.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Someone else could plant native code in it.
    #[error(
        "compile cache `{dir}` is not safe to run code from: {fault}; weir runs the files in it \
         as native code, so it must belong to you and be writable by no one else \
         (`chmod 700 {dir}`), or set WEIR_CACHE_DIR to another folder"
    )]
    Unsafe {
        /// The folder.
        dir: PathBuf,
        /// What is wrong with it, with the values found.
        fault: String,
    },
}

/// Where compiled components live, and how often they were reused.
pub struct CompileCache {
    /// `None`: nothing is cached (no home, no configured folder).
    dir: Option<PathBuf>,
    engine_key: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `meta` (of the folder or file at `what`) is not safe, if it is not.
fn ownership_fault(meta: &std::fs::Metadata) -> Option<String> {
    let uid = effective_uid();
    if meta.uid() != uid {
        return Some(format!(
            "it belongs to uid {}, not to you (uid {uid})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!("others can write to it (mode {mode:04o})"));
    }
    None
}

impl CompileCache {
    pub(super) fn open(engine: &Engine, dir: Option<PathBuf>) -> Result<Self, CacheError> {
        let dir = dir.or_else(default_dir);
        if let Some(dir) = &dir {
            let io = |source| CacheError::Io {
                dir: dir.clone(),
                source,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            let meta = std::fs::symlink_metadata(dir).map_err(io)?;
            let fault = if meta.file_type().is_symlink() {
                Some("it is a symbolic link".to_owned())
            } else if !meta.is_dir() {
                Some("it is not a folder".to_owned())
            } else {
                ownership_fault(&meta)
            };
            if let Some(fault) = fault {
                return Err(CacheError::Unsafe {
                    dir: dir.clone(),
                    fault,
                });
            }
        } else {
            tracing::warn!(
                "No compile cache: neither WEIR_CACHE_DIR, XDG_CACHE_HOME nor HOME is set; plugins are compiled at every start."
            );
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir,
            engine_key: hasher.finish(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The cache folder, if there is one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How many loads reused a compiled component.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// How many loads had to compile.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    fn entry(&self, dir: &Path, wasm_hash: &[u8; 32]) -> PathBuf {
        let digest = Sha256::new()
            .chain_update(wasm_hash)
            .chain_update(self.engine_key.to_le_bytes())
            .finalize();
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        dir.join(format!("{name}.cwasm"))
    }

    pub(super) fn get_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        wasm_hash: &[u8; 32],
    ) -> anyhow::Result<Component> {
        let Some(dir) = &self.dir else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(Component::new(engine, wasm)?);
        };
        let entry = self.entry(dir, wasm_hash);
        match read_artifact(&entry, wasm_hash) {
            Ok(Some(code)) => {
                // SAFETY: the file is this user's, writable by no one else,
                // in a folder with the same guarantees; its header binds it
                // to this `.wasm` and its machine code to the hash weir
                // wrote, and its name to this engine's compatibility hash.
                match unsafe { Component::deserialize(engine, &code) } {
                    Ok(component) => {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(component);
                    }
                    Err(err) => {
                        tracing::warn!(entry = %entry.display(), %err, "Discarding a compiled component wasmtime cannot load.");
                    }
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(entry = %entry.display(), %reason, "Ignoring a compiled component weir cannot trust; compiling instead.");
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let component = Component::new(engine, wasm)?;
        match component.serialize() {
            Ok(code) => {
                if let Err(err) = write_artifact(&entry, wasm_hash, &code) {
                    tracing::warn!(entry = %entry.display(), %err, "Could not cache a compiled component.");
                }
            }
            Err(err) => tracing::warn!(%err, "Could not serialise a compiled component."),
        }
        Ok(component)
    }
}

/// The machine code in `entry`, if it is there and weir can trust it;
/// `Err` says why a file that is there cannot be trusted.
fn read_artifact(entry: &Path, wasm_hash: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(entry);
    let mut file = match file {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot open it: {err}")),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    if let Some(fault) = ownership_fault(&meta) {
        return Err(fault);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
        return Err("it is not a weir artifact".into());
    }
    let (header, code) = bytes.split_at(HEADER);
    if &header[MAGIC.len()..MAGIC.len() + 32] != wasm_hash {
        return Err("it was compiled from another .wasm".into());
    }
    if header[MAGIC.len() + 32..] != Sha256::digest(code)[..] {
        return Err("its machine code does not match its checksum".into());
    }
    Ok(Some(code.to_vec()))
}

/// Writes `code` with its header to a private temporary file, then renames
/// it into place, so a concurrent reader never sees half a file.
fn write_artifact(entry: &Path, wasm_hash: &[u8; 32], code: &[u8]) -> std::io::Result<()> {
    let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(MAGIC)?;
    file.write_all(wasm_hash)?;
    file.write_all(&Sha256::digest(code))?;
    file.write_all(code)?;
    drop(file);
    std::fs::rename(&tmp, entry)
}

/// `$WEIR_CACHE_DIR`, else `$XDG_CACHE_HOME/weir/components`, else
/// `$HOME/.cache/weir/components`; `None` when none is set.
fn default_dir() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = non_empty("WEIR_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("weir").join("components"))
}
