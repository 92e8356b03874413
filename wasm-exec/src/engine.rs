//! The WebAssembly engine: code-generation settings, the pooling allocator and its instance
//! slots, the epoch ticker, and turning bytes into compiled modules.
//!
//! A leaf of this crate (it uses only the error type): the cache, the loaded [`Module`]s and
//! the [`Runtime`] all build on it, and none of them on each other in a circle.
//!
//! [`Module`]: crate::Module
//! [`Runtime`]: crate::Runtime

use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::Error;
use crate::error::boxed;

/// An engine with its epoch ticker and instance slots. The ticker thread stops when this is
/// dropped.
pub(crate) struct Engine {
    wasm: wasmtime::Engine,
    epoch_tick: Duration,
    slots: Slots,
    /// Dropping the sender stops the ticker thread.
    _ticker: mpsc::Sender<()>,
}

/// The target triple of this architecture and operating system, without any CPU feature
/// beyond the architecture's baseline: code compiled for it loads on every machine of the
/// architecture (wasmtime accepts features an artifact does not use).
fn portable_target() -> String {
    // wasmtime runs code only for a target equal to the host's triple, environment included.
    let environment = if cfg!(target_env = "gnu") {
        "-gnu"
    } else if cfg!(target_env = "musl") {
        "-musl"
    } else {
        ""
    };
    format!(
        "{}-unknown-{}{environment}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// The code-generation settings every engine shares: what a `.cwasm` depends on. A
/// `portable` engine compiles for the architecture's baseline instead of this CPU.
fn base_config(portable: bool) -> Result<Config, Error> {
    let mut config = Config::new();
    if portable {
        config
            .target(&portable_target())
            .map_err(|e| Error::Engine { source: boxed(e) })?;
    }
    config.epoch_interruption(true);
    // Fuel metering is always compiled in so that compiled modules do not depend on whether a
    // run sets `--fuel`; unlimited runs start with u64::MAX fuel.
    config.consume_fuel(true);
    Ok(config)
}

fn pooling_config(instances: u32) -> PoolingAllocationConfig {
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_core_instances(instances)
        .total_memories(instances)
        .total_tables(instances)
        // Everything else we never use: wasmtime's defaults (1000 of each) cost about a
        // thousand mprotect calls at every process start.
        .total_stacks(instances)
        .total_component_instances(instances)
        // Jobicolet and WASI guests use one memory and one table.
        .max_memories_per_module(1)
        .max_tables_per_module(1);
    pooling
}

impl Engine {
    /// An engine for `instances` concurrent instances (at least one), with the pooling
    /// allocator when `pooling` (falling back to on-demand allocation if its reservation
    /// fails), an epoch advancing every `epoch_tick`, and code for this CPU or (`portable`)
    /// for its architecture's baseline.
    pub(crate) fn new(
        instances: u32,
        pooling: bool,
        epoch_tick: Duration,
        portable: bool,
    ) -> Result<Self, Error> {
        let instances = instances.max(1);
        let on_demand = || {
            wasmtime::Engine::new(&base_config(portable)?)
                .map_err(|e| Error::Engine { source: boxed(e) })
        };
        let wasm = if pooling {
            let mut config = base_config(portable)?;
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(
                instances,
            )));
            match wasmtime::Engine::new(&config) {
                Ok(engine) => engine,
                Err(error) => {
                    tracing::warn!(error = %error, "pooling allocator unavailable, allocating on demand");
                    on_demand()?
                }
            }
        } else {
            on_demand()?
        };
        let ticker = spawn_ticker(wasm.clone(), epoch_tick)?;
        Ok(Self {
            wasm,
            epoch_tick,
            slots: Slots::new(instances),
            _ticker: ticker,
        })
    }

    /// The wasmtime engine.
    pub(crate) fn wasm(&self) -> &wasmtime::Engine {
        &self.wasm
    }

    /// How often the epoch advances: the granularity of deadlines.
    pub(crate) fn epoch_tick(&self) -> Duration {
        self.epoch_tick
    }

    /// Waits for a free instance slot.
    pub(crate) fn acquire_slot(&self) -> SlotGuard<'_> {
        self.slots.acquire()
    }

    /// Compiles WebAssembly (binary or text). Precompiled bytes are refused, never loaded.
    pub(crate) fn compile(&self, name: &str, bytes: &[u8]) -> Result<wasmtime::Module, Error> {
        if is_precompiled(bytes) {
            return Err(Error::Precompiled {
                name: name.to_owned(),
            });
        }
        wasmtime::Module::new(&self.wasm, bytes).map_err(|e| Error::Compile {
            name: name.to_owned(),
            source: boxed(e),
        })
    }

    /// Loads compiled code that the caller has established as trusted: an entry of our own
    /// verified cache, the dispatcher's verified artifact, or a file the operator vouched for
    /// (`--trust-precompiled`).
    #[allow(unsafe_code)]
    pub(crate) fn deserialize_trusted(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<wasmtime::Module, Error> {
        // SAFETY: compiled code is native code that runs outside the WebAssembly sandbox, so
        // only trusted bytes may come here: the callers are the cache, after checking the
        // entry's owner, permissions and MAC (see `cache`); the dispatcher's artifact, after
        // checking it hashes to the digest the dispatcher wrote into the Job and was compiled
        // from the module at hand (see `artifact`); and `wasm-exec run --trust-precompiled`,
        // an operator's explicit statement about a file. wasmtime still checks the header,
        // version, engine settings and CPU features.
        unsafe { wasmtime::Module::deserialize(&self.wasm, bytes) }.map_err(|e| {
            Error::Deserialize {
                name: name.to_owned(),
                source: boxed(e),
            }
        })
    }

    /// A digest of everything that makes compiled code fit this engine (wasmtime version,
    /// code-generation settings, CPU features).
    pub(crate) fn compatibility_hash(&self, hasher: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        self.wasm.precompile_compatibility_hash().hash(hasher);
    }
}

/// Whether `bytes` are compiled code (a wasmtime `.cwasm`, or any ELF file) rather than
/// WebAssembly.
pub(crate) fn is_precompiled(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF") || wasmtime::Engine::detect_precompiled(bytes).is_some()
}

/// Advances the engine's epoch every `tick` until the returned sender is dropped.
fn spawn_ticker(engine: wasmtime::Engine, tick: Duration) -> Result<mpsc::Sender<()>, Error> {
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
