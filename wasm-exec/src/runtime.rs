//! The engine, its epoch ticker, the linker and module loading.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, Linker, PoolingAllocationConfig};

use crate::abi;
use crate::cache::ModuleCache;
use crate::error::boxed;
use crate::host::HostState;
use crate::module::Module;
use crate::{Error, jobicolet};

/// Engine-wide settings. Only `max_concurrent_instances`, `pooling`, `epoch_tick` and
/// `cache_dir` may vary: everything that affects generated code is fixed, so a `.cwasm` made by
/// `wasm-exec compile` loads in every `Runtime` of the same build on the same CPU.
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
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    slots: Slots,
    cache: Option<ModuleCache>,
    /// Dropping the sender stops the ticker thread.
    _ticker: mpsc::Sender<()>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The code-generation settings every engine shares (see [`RuntimeConfig`]).
fn base_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Fuel metering is always compiled in so that `.cwasm` files do not depend on whether a
    // run sets `--fuel`; unlimited runs start with u64::MAX fuel.
    config.consume_fuel(true);
    config
}

fn pooling_config(config: &RuntimeConfig) -> PoolingAllocationConfig {
    let count = config.max_concurrent_instances.max(1);
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_core_instances(count)
        .total_memories(count)
        .total_tables(count)
        // Everything else we never use: wasmtime's defaults (1000 of each) cost about a
        // thousand mprotect calls at every process start.
        .total_stacks(count)
        .total_component_instances(count)
        // Jobicolet and WASI guests use one memory and one table.
        .max_memories_per_module(1)
        .max_tables_per_module(1);
    pooling
}

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
        let engine = if config.pooling {
            let mut wasm = base_config();
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(&config)));
            match Engine::new(&wasm) {
                Ok(engine) => engine,
                Err(error) => {
                    tracing::warn!(error = %error, "pooling allocator unavailable, allocating on demand");
                    Engine::new(&base_config()).map_err(|e| Error::Engine { source: boxed(e) })?
                }
            }
        } else {
            Engine::new(&base_config()).map_err(|e| Error::Engine { source: boxed(e) })?
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(|e| Error::Engine { source: boxed(e) })?;
        refuse_sleeping(&mut linker).map_err(|e| Error::Engine { source: boxed(e) })?;
        jobicolet::add_to_linker(&mut linker).map_err(|e| Error::Engine { source: boxed(e) })?;
        let ticker = spawn_ticker(engine.clone(), config.epoch_tick)?;
        let cache = config.cache_dir.clone().map(ModuleCache::new);
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                slots: Slots::new(config.max_concurrent_instances.max(1)),
                config,
                cache,
                _ticker: ticker,
            }),
        })
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Loads a module file: `.wasm`, `.wat` or a precompiled `.cwasm` (recognised by content).
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<Module, Error> {
        let path = path.as_ref();
        let name = display_name(path);
        let read_error = |source| Error::ReadModule {
            path: path.to_owned(),
            source,
        };
        if starts_with_elf_magic(path).map_err(read_error)? {
            let module =
                deserialize_file(&self.inner.engine, path).map_err(|e| Error::Deserialize {
                    name: name.clone(),
                    source: boxed(e),
                })?;
            return self.prepare(name, module);
        }
        let bytes = std::fs::read(path).map_err(read_error)?;
        self.load_bytes(&name, &bytes)
    }

    /// Loads a module from memory: WebAssembly binary, WAT text or precompiled bytes.
    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<Module, Error> {
        let module = if Engine::detect_precompiled(bytes).is_some() {
            deserialize(&self.inner.engine, bytes).map_err(|e| Error::Deserialize {
                name: name.to_owned(),
                source: boxed(e),
            })?
        } else if let Some(cache) = &self.inner.cache {
            cache.load_or_compile(&self.inner.engine, name, bytes)?
        } else {
            compile(&self.inner.engine, name, bytes)?
        };
        self.prepare(name.to_owned(), module)
    }

    /// Compiles `bytes` (binary or WAT) and returns the `.cwasm` bytes, after checking that the
    /// module fits a guest ABI and links.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
        if Engine::detect_precompiled(bytes).is_some() {
            return Err(Error::AlreadyCompiled {
                name: name.to_owned(),
            });
        }
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
        Ok(Module::new(self.clone(), name, module, pre, detected))
    }

    /// Waits for a free instance slot.
    pub(crate) fn acquire_slot(&self) -> SlotGuard<'_> {
        self.inner.slots.acquire()
    }
}

pub(crate) fn compile(
    engine: &Engine,
    name: &str,
    bytes: &[u8],
) -> Result<wasmtime::Module, Error> {
    wasmtime::Module::new(engine, bytes).map_err(|e| Error::Compile {
        name: name.to_owned(),
        source: boxed(e),
    })
}

/// Loads a precompiled module from memory.
#[allow(unsafe_code)]
pub(crate) fn deserialize(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: a `.cwasm` is native code that runs outside the WebAssembly sandbox. We only load
    // artifacts this executor compiled (`wasm-exec compile`, our cache directory) or that the
    // operator ships in the image or a module ConfigMap, i.e. from the same trust domain as the
    // executor binary itself. wasmtime still checks the header, version and engine settings.
    unsafe { wasmtime::Module::deserialize(engine, bytes) }
}

/// Loads a precompiled module file by memory map.
#[allow(unsafe_code)]
pub(crate) fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: same trust model as `deserialize`: only artifacts we compiled or the operator
    // ships. The file must not be modified while mapped; ConfigMap volumes are replaced by
    // atomic symlink swaps and our cache writes by rename, never in place.
    unsafe { wasmtime::Module::deserialize_file(engine, path) }
}

/// Precompiled modules are ELF files; WebAssembly starts with `\0asm` and WAT with text.
fn starts_with_elf_magic(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read == magic.len() && &magic == b"\x7fELF")
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Advances the engine's epoch every `tick` until the returned sender is dropped.
fn spawn_ticker(engine: Engine, tick: Duration) -> Result<mpsc::Sender<()>, Error> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("wasm-exec-epoch".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                engine.increment_epoch();
            }
        })
        .map_err(|e| Error::Engine { source: e.into() })?;
    Ok(stop)
}

/// A counting semaphore bounding concurrent instances to the pool's size.
struct Slots {
    free: Mutex<u32>,
    released: Condvar,
}

/// A held instance slot, released on drop.
pub(crate) struct SlotGuard<'a> {
    slots: &'a Slots,
}

impl Slots {
    fn new(count: u32) -> Self {
        Self {
            free: Mutex::new(count),
            released: Condvar::new(),
        }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.released.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard { slots: self }
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.slots.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.slots.released.notify_one();
    }
}
