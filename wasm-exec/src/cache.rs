//! A content-addressed directory of compiled modules.
//!
//! Key: SHA-256 over the module bytes and the engine's compatibility hash (wasmtime version,
//! code-generation settings, CPU features), so a changed module or a different engine never
//! reuses an entry. Entries are written to a temporary file and renamed into place, so a
//! reader never maps a half-written file. A cache failure only costs a compilation.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::Error;
use crate::runtime::{compile, deserialize_file};

/// A cache directory of `.cwasm` files.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

/// Feeds `Hash` data into SHA-256 (stable, unlike `DefaultHasher`).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        unreachable!("only the digest is read")
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ModuleCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The cache key of `bytes` compiled by `engine`.
    pub fn key(engine: &Engine, bytes: &[u8]) -> String {
        let mut hasher = ShaHasher(Sha256::new());
        hasher.0.update(b"wasm-exec module cache v1\0");
        engine.precompile_compatibility_hash().hash(&mut hasher);
        hasher.0.update((bytes.len() as u64).to_le_bytes());
        hasher.0.update(bytes);
        hex::encode(hasher.0.finalize())
    }

    /// The path of the entry for `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }

    /// Returns the cached compilation of `bytes`, compiling and storing it on a miss.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        name: &str,
        bytes: &[u8],
    ) -> Result<wasmtime::Module, Error> {
        let path = self.path(&Self::key(engine, bytes));
        if path.exists() {
            match deserialize_file(engine, &path) {
                Ok(module) => {
                    tracing::debug!(module = name, path = %path.display(), "compiled module found in cache");
                    return Ok(module);
                }
                Err(error) => {
                    tracing::warn!(module = name, path = %path.display(), error = %error, "unusable cache entry, recompiling");
                }
            }
        }
        let module = compile(engine, name, bytes)?;
        if let Err(error) = self.store(&path, &module) {
            tracing::warn!(module = name, path = %path.display(), error = %error, "cannot write cache entry");
        }
        Ok(module)
    }

    fn store(&self, path: &Path, module: &wasmtime::Module) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = module.serialize().map_err(anyhow::Error::from)?;
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, path)?;
        Ok(())
    }
}
