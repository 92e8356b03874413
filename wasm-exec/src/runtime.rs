//! The runtime: one engine, the linker with the host functions, the cache, module loading.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobico_common::executor::{ArtifactRef, Sha256Digest, UploadedModuleRef};
use jobico_common::summary::{ModuleLoad, ModuleSource};

use wasmtime::Linker;

use crate::cache::ModuleCache;
use crate::engine::{Engine, is_precompiled};
use crate::error::boxed;
use crate::host::HostState;
use crate::module::Module;
use crate::{Error, abi, jobicolet};

/// Engine-wide settings. Only `max_concurrent_instances`, `pooling`, `epoch_tick`,
/// `cache_dir` and `portable` may vary: everything else that affects generated code is fixed,
/// so a `.cwasm` made by `wasm-exec compile` loads in every `Runtime` of the same build on the
/// same CPU, and one made by a `portable` runtime on every CPU of the architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Instances that may run at once; further [`Module::run`] calls wait for a free slot.
    pub max_concurrent_instances: u32,
    /// Use wasmtime's pooling allocator (faster instantiation; reserves virtual memory for
    /// `max_concurrent_instances` memories up front). Falls back to on-demand allocation if the
    /// reservation fails.
    pub pooling: bool,
    /// How often the epoch advances: the granularity of deadlines.
    pub epoch_tick: Duration,
    /// Directory of compiled modules keyed by module digest and engine settings.
    pub cache_dir: Option<PathBuf>,
    /// Compile for the architecture's baseline rather than this CPU's features, so that the
    /// code loads on any machine of the architecture (the dispatcher's artifacts, which run
    /// on whichever node the pod lands on).
    pub portable: bool,
}

/// Enough parallel events for local mode on a developer machine; one per pod otherwise.
const DEFAULT_MAX_CONCURRENT_INSTANCES: u32 = 16;
/// 10 ms makes a deadline late by at most 10 ms at a negligible cost (one wake-up per tick).
const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(10);

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_concurrent_instances: DEFAULT_MAX_CONCURRENT_INSTANCES,
            pooling: true,
            epoch_tick: DEFAULT_EPOCH_TICK,
            cache_dir: None,
            portable: false,
        }
    }
}

/// A WebAssembly engine with its epoch ticker and host functions. Cheap to clone; share one
/// per process. The ticker thread stops when the last clone (and the last [`Module`]) is
/// dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<Engine>,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    cache: Option<ModuleCache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Most characters of the reason an artifact was refused kept in the summary: enough for a
/// URL and an error, little against the termination message's 4 KiB.
const MAX_REFUSAL_TEXT: usize = 300;

/// WASI errno `NOTSUP`.
const ERRNO_NOTSUP: i32 = 58;

/// Replaces WASI's `poll_oneoff` with one that answers `NOTSUP`. Epoch interruption stops only
/// running WebAssembly: a guest sleeping in `poll_oneoff` would hold its thread past the
/// deadline. Stdin is an in-memory pipe, so the only thing a guest could wait for is a clock,
/// and an event handler has no business sleeping.
fn refuse_sleeping(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        |_: wasmtime::Caller<'_, HostState>,
         _subscriptions: i32,
         _events: i32,
         _count: i32,
         _written: i32| { ERRNO_NOTSUP },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

impl Runtime {
    /// Creates the engine, the linker (WASI preview1 plus `env.log`) and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Self, Error> {
        let engine = Engine::new(
            config.max_concurrent_instances,
            config.pooling,
            config.epoch_tick,
            config.portable,
        )?;
        let mut linker = Linker::new(engine.wasm());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(|e| Error::Engine { source: boxed(e) })?;
        refuse_sleeping(&mut linker).map_err(|e| Error::Engine { source: boxed(e) })?;
        jobicolet::add_to_linker(&mut linker).map_err(|e| Error::Engine { source: boxed(e) })?;
        let cache = config.cache_dir.clone().map(ModuleCache::new);
        Ok(Self {
            inner: Arc::new(Inner {
                engine: Arc::new(engine),
                linker,
                config,
                cache,
            }),
        })
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Loads a module file: WebAssembly binary or text (`.wasm`, `.wat`, recognised by
    /// content). Precompiled native code (a `.cwasm`) is refused with
    /// [`Error::Precompiled`]: see [`Runtime::load_trusted_precompiled_file`].
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Module, Error> {
        let path = path.as_ref();
        let bytes = read(path)?;
        self.load_bytes(&display_name(path), &bytes)
    }

    /// Loads a module from memory: WebAssembly binary or text. Precompiled bytes are refused
    /// ([`Error::Precompiled`]). With a cache directory the compilation is looked up there
    /// first, and stored there after a miss.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Module, Error> {
        self.load_bytes_from(name, bytes).map(|(module, _)| module)
    }

    /// [`Runtime::load_bytes`], saying whether the code came from the cache or was compiled.
    fn load_bytes_from(&self, name: &str, bytes: &[u8]) -> Result<(Module, ModuleSource), Error> {
        let (module, source) = match &self.inner.cache {
            Some(cache) if !is_precompiled(bytes) => {
                match cache.load_or_compile(&self.inner.engine, name, bytes)? {
                    (module, true) => (module, ModuleSource::Cache),
                    (module, false) => (module, ModuleSource::Compiled),
                }
            }
            _ => (
                self.inner.engine.compile(name, bytes)?,
                ModuleSource::Compiled,
            ),
        };
        Ok((self.prepare(name.to_owned(), module)?, source))
    }

    /// [`Runtime::load_with_artifact`] for a module file.
    pub fn load_file_with_artifact(
        &self,
        path: impl AsRef<Path>,
        artifact: Option<&ArtifactRef>,
    ) -> Result<(Module, ModuleLoad), Error> {
        let path = path.as_ref();
        let bytes = read(path)?;
        self.load_with_artifact(&display_name(path), &bytes, artifact)
    }

    /// Loads WebAssembly `bytes` from the dispatcher's compiled `artifact` when it can be
    /// verified (see [`crate::artifact`]) and loads; otherwise as [`Runtime::load_bytes`]
    /// does (the cache, or compiling), with the reason the artifact was refused. Without an
    /// artifact, the same as `load_bytes`. The [`ModuleLoad`] says which happened.
    pub fn load_with_artifact(
        &self,
        name: &str,
        bytes: &[u8],
        artifact: Option<&ArtifactRef>,
    ) -> Result<(Module, ModuleLoad), Error> {
        self.load_preferring_artifact(name, Sha256Digest::of(bytes), artifact, || {
            Ok(std::borrow::Cow::Borrowed(bytes))
        })
    }

    /// Loads the uploaded `module` the Job names: from the dispatcher's compiled `artifact`
    /// when it is for that module and verifies; otherwise downloads the module (checked
    /// against its digest) and loads it as [`Runtime::load_bytes`] does, with the reason the
    /// artifact was refused.
    pub fn load_uploaded(
        &self,
        module: &UploadedModuleRef,
        artifact: Option<&ArtifactRef>,
    ) -> Result<(Module, ModuleLoad), Error> {
        let name = format!("sha256:{}", module.digest);
        self.load_preferring_artifact(&name, module.digest, artifact, || {
            crate::artifact::fetch_module(module)
                .map(std::borrow::Cow::Owned)
                .map_err(|reason| Error::Fetch {
                    module: name.clone(),
                    reason,
                })
        })
    }

    /// The module whose digest is `module`: from `artifact` when there is one and it verifies
    /// and loads; otherwise from the bytes `wasm` gives (read only then), through the cache or
    /// compiled, with the reason the artifact was refused.
    fn load_preferring_artifact<'b>(
        &self,
        name: &str,
        module: Sha256Digest,
        artifact: Option<&ArtifactRef>,
        wasm: impl FnOnce() -> Result<std::borrow::Cow<'b, [u8]>, Error>,
    ) -> Result<(Module, ModuleLoad), Error> {
        let started = Instant::now();
        let mut refused = None;
        if let Some(artifact) = artifact {
            match self.load_artifact(name, artifact, module) {
                Ok(loaded) => {
                    return Ok((loaded, ModuleLoad::since(ModuleSource::Artifact, started)));
                }
                Err(reason) => {
                    tracing::warn!(module = name, artifact = ?artifact.digest, reason, "artifact refused, loading the module itself");
                    refused = Some(jobico_common::summary::cut(&reason, MAX_REFUSAL_TEXT));
                }
            }
        }
        let (loaded, source) = self.load_bytes_from(name, &wasm()?)?;
        let load = ModuleLoad {
            artifact_refused: refused,
            ..ModuleLoad::since(source, started)
        };
        Ok((loaded, load))
    }

    /// The dispatcher's compiled `artifact` of the module whose digest is `module`, verified
    /// and loaded, or why not.
    fn load_artifact(
        &self,
        name: &str,
        artifact: &ArtifactRef,
        module: Sha256Digest,
    ) -> Result<Module, String> {
        let code = crate::artifact::fetch_for(artifact, module)?;
        let loaded = self
            .inner
            .engine
            .deserialize_trusted(name, &code)
            .map_err(|e| format!("it does not load: {:#}", anyhow::Error::new(e)))?;
        self.prepare(name.to_owned(), loaded)
            .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
    }

    /// Loads a precompiled module file (`wasm-exec compile` output) as native code, without
    /// any check that it came from WebAssembly. Only for files the operator vouches for (the
    /// binary's `--trust-precompiled`): a crafted file runs arbitrary code in this process.
    /// Files that are WebAssembly are compiled as by [`Runtime::load_file`].
    pub fn load_trusted_precompiled_file(&self, path: impl AsRef<Path>) -> Result<Module, Error> {
        let path = path.as_ref();
        let name = display_name(path);
        let bytes = read(path)?;
        if !is_precompiled(&bytes) {
            return self.load_bytes(&name, &bytes);
        }
        let module = self.inner.engine.deserialize_trusted(&name, &bytes)?;
        self.prepare(name, module)
    }

    /// Where the cache directory keeps (or would keep) the compilation of `bytes`, if this
    /// runtime has one.
    pub fn cache_entry(&self, bytes: &[u8]) -> Option<PathBuf> {
        let cache = self.inner.cache.as_ref()?;
        Some(cache.entry_path(&self.inner.engine, bytes))
    }

    /// 16 hex digits naming everything compiled code depends on (wasmtime version,
    /// code-generation settings, CPU features): code compiled by runtimes with the same tag
    /// is interchangeable.
    pub fn compatibility_tag(&self) -> String {
        use sha2::Digest;
        let mut hasher = crate::cache::ShaHasher(sha2::Sha256::new());
        self.inner.engine.compatibility_hash(&mut hasher);
        hex::encode(&hasher.0.finalize()[..8])
    }

    /// Compiles `bytes` (binary or WAT) and returns the `.cwasm` bytes, after checking that the
    /// module fits a guest ABI and links.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        self.load_bytes(name, bytes)?.serialize()
    }

    fn prepare(&self, name: String, module: wasmtime::Module) -> Result<Module, Error> {
        let detected = abi::detect(&module).map_err(|reason| Error::Abi {
            name: name.clone(),
            reason,
        })?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&module)
            .map_err(|e| Error::Link {
                name: name.clone(),
                source: boxed(e),
            })?;
        Ok(Module::new(
            self.inner.engine.clone(),
            name,
            module,
            pre,
            detected,
        ))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::ReadModule {
        path: path.to_owned(),
        source,
    })
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
