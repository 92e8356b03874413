//! A content-addressed directory of compiled modules, used only as far as it can be verified.
//!
//! Compiled code is native code that runs outside the sandbox, so an entry planted in the
//! directory would run anything. The name of an entry is derived from the module bytes being
//! loaded (SHA-256 over them and the engine's compatibility hash: wasmtime version,
//! code-generation settings, CPU features), never taken from input. An entry is loaded only
//! when all of these hold, otherwise the module is compiled again and the entry replaced:
//!
//! - the directory is owned by this process's effective user and not writable by group or
//!   others, so only that user (or root) can add, replace or rename entries;
//! - the entry and the directory's key file are regular files owned by that user, not
//!   writable by group or others (the key not readable by them either);
//! - the entry starts with a valid HMAC-SHA256, under the directory's 32-byte random key
//!   (`key`, mode 0600, created by the first process that stores an entry), of the entry's
//!   name and the compiled bytes. So only this code path, after compiling exactly the module
//!   whose digest names the entry, can have written it: a `.cwasm` copied or crafted into the
//!   directory, an entry renamed to another module's name, or a corrupted one is refused.
//!
//! What it cannot stop: code running as the same user can read the key; that user is the
//! executor itself. Entries are written to a temporary file and renamed into place, so a
//! reader never sees a half-written one. A cache failure only costs a compilation.

use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::engine::Engine;

/// Bytes of the directory's secret key, and of each entry's MAC (HMAC-SHA256's output).
const KEY_LEN: usize = 32;
/// The key file's name; entries are `<64 hex digits>.cwasm`, so no entry can take it.
const KEY_FILE: &str = "key";
/// Permission bits that let group or others write.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Permission bits that let group or others read, write or search.
const OPEN_TO_OTHERS: u32 = 0o077;
/// Only the owner may use what the cache creates.
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

type EntryMac = Hmac<Sha256>;

/// A cache directory of compiled modules.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

/// Feeds `Hash` data into SHA-256 (stable, unlike `DefaultHasher`).
pub(crate) struct ShaHasher(pub(crate) Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        unreachable!("only the digest is read")
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ModuleCache {
    /// A cache in `dir` (created, mode 0700, on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The entry name of `bytes` compiled by `engine`.
    pub(crate) fn key(engine: &Engine, bytes: &[u8]) -> String {
        let mut hasher = ShaHasher(Sha256::new());
        hasher.0.update(b"wasm-exec module cache v2\0");
        engine.compatibility_hash(&mut hasher);
        hasher.0.update((bytes.len() as u64).to_le_bytes());
        hasher.0.update(bytes);
        hex::encode(hasher.0.finalize())
    }

    /// The path of the entry for `bytes` compiled by `engine`.
    pub(crate) fn entry_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        self.dir.join(format!("{}.cwasm", Self::key(engine, bytes)))
    }

    /// Returns the verified cached compilation of `bytes` (and `true`), compiling and storing
    /// it when there is none or none that verifies (and `false`).
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        name: &str,
        bytes: &[u8],
    ) -> Result<(wasmtime::Module, bool), Error> {
        let key = Self::key(engine, bytes);
        let path = self.dir.join(format!("{key}.cwasm"));
        match self.load(engine, name, &key, &path) {
            Ok(Some(module)) => {
                tracing::debug!(module = name, path = %path.display(), "compiled module found in cache");
                return Ok((module, true));
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(module = name, path = %path.display(), reason, "cache entry refused, compiling");
            }
        }
        let module = engine.compile(name, bytes)?;
        if let Err(reason) = self.store(&key, &path, &module) {
            tracing::warn!(module = name, path = %path.display(), reason, "cannot write cache entry");
        }
        Ok((module, false))
    }

    /// The entry for `key`: `None` when there is none, an error saying why it is refused.
    fn load(
        &self,
        engine: &Engine,
        name: &str,
        key: &str,
        path: &Path,
    ) -> Result<Option<wasmtime::Module>, String> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == IoErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.to_string()),
        };
        check_dir(&self.dir)?;
        check_file(&file, WRITABLE_BY_OTHERS).map_err(|r| format!("entry {r}"))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| e.to_string())?;
        let secret = self
            .read_secret()?
            .ok_or("the directory has no key, so no entry can be verified")?;
        if data.len() < KEY_LEN {
            return Err("entry too short to hold a MAC".into());
        }
        let (tag, code) = data.split_at(KEY_LEN);
        entry_mac(&secret, key, code)
            .verify_slice(tag)
            .map_err(|_| "entry was not written by this cache (its MAC does not verify)")?;
        engine
            .deserialize_trusted(name, code)
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    }

    fn store(&self, key: &str, path: &Path, module: &wasmtime::Module) -> Result<(), String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR)
            .create(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        check_dir(&self.dir)?;
        let secret = match self.read_secret()? {
            Some(secret) => secret,
            None => self.create_secret()?,
        };
        let code = module.serialize().map_err(|e| format!("{e:#}"))?;
        let tag = entry_mac(&secret, key, &code).finalize().into_bytes();
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = private_file(&temp, false)?;
            file.write_all(&tag)?;
            file.write_all(&code)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            e.to_string()
        })
    }

    /// The directory's key, if it has a valid one.
    fn read_secret(&self) -> Result<Option<[u8; KEY_LEN]>, String> {
        let mut file = match File::open(self.dir.join(KEY_FILE)) {
            Ok(file) => file,
            Err(error) if error.kind() == IoErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("cannot open the key: {error}")),
        };
        check_file(&file, OPEN_TO_OTHERS).map_err(|r| format!("key {r}"))?;
        let mut secret = [0u8; KEY_LEN];
        let mut rest = Vec::new();
        file.read_exact(&mut secret)
            .and_then(|()| file.read_to_end(&mut rest))
            .map_err(|e| format!("cannot read the key: {e}"))?;
        if !rest.is_empty() {
            return Err("the key file is not a key".into());
        }
        Ok(Some(secret))
    }

    /// Creates the key, or reads the one another process created meanwhile.
    fn create_secret(&self) -> Result<[u8; KEY_LEN], String> {
        let mut secret = [0u8; KEY_LEN];
        rustix::rand::getrandom(&mut secret, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| format!("no random key: {e}"))
            .and_then(|n| {
                (n == KEY_LEN)
                    .then_some(())
                    .ok_or_else(|| "short random read".to_owned())
            })?;
        let temp = self
            .dir
            .join(format!("{KEY_FILE}.tmp{}", std::process::id()));
        let created = private_file(&temp, true)
            .and_then(|mut file| file.write_all(&secret).and_then(|()| file.sync_all()))
            // A link, unlike a rename, never replaces a key another process made first.
            .and_then(|()| std::fs::hard_link(&temp, self.dir.join(KEY_FILE)));
        let _ = std::fs::remove_file(&temp);
        match created {
            Ok(()) => Ok(secret),
            Err(error) if error.kind() == IoErrorKind::AlreadyExists => self
                .read_secret()?
                .ok_or_else(|| "the key vanished".to_owned()),
            Err(error) => Err(format!("cannot create the key: {error}")),
        }
    }
}

/// The MAC of an entry: its name and its compiled bytes.
fn entry_mac(secret: &[u8; KEY_LEN], key: &str, code: &[u8]) -> EntryMac {
    let mut mac = EntryMac::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"wasm-exec cache entry v2\0");
    mac.update(key.as_bytes());
    mac.update(b"\0");
    mac.update(code);
    mac
}

fn private_file(path: &Path, create_new: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(!create_new)
        .create_new(create_new)
        .truncate(!create_new)
        .mode(PRIVATE_FILE)
        .open(path)
}

fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The directory must be ours and closed to writers other than us.
fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != effective_uid() || meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "directory {} must be owned by uid {} and writable by it alone (it is owned by uid {} with mode {:o})",
            dir.display(),
            effective_uid(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// An opened file must be a regular file of ours, without the permission bits in `closed`.
fn check_file(file: &File, closed: u32) -> Result<(), String> {
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.uid() != effective_uid() || meta.mode() & closed != 0 {
        return Err(format!(
            "must be owned by uid {} without permissions {closed:o} for others (it is owned by uid {} with mode {:o})",
            effective_uid(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}
