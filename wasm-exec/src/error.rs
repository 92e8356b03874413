//! The library's error type.

use std::path::PathBuf;

/// A boxed error cause; wasmtime's own error type converts into it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a module could not be prepared, or a configuration value was refused.
///
/// Failures of a single event are not errors: they are reported in that event's
/// [`EventOutcome`](crate::EventOutcome).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebAssembly engine could not be created from the configuration.
    #[error("cannot create the WebAssembly engine")]
    Engine {
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
    /// The module file could not be read.
    #[error("cannot read module {path}")]
    ReadModule {
        /// The module file.
        path: PathBuf,
        /// The underlying cause.
        #[source]
        source: std::io::Error,
    },
    /// The uploaded module the Job names could not be downloaded (or was not the one named).
    #[error("cannot fetch uploaded module {module}: {reason}")]
    Fetch {
        /// The module (`sha256:<digest>`).
        module: String,
        /// Why.
        reason: String,
    },
    /// The module is not valid WebAssembly (or WAT) or could not be compiled.
    #[error("cannot compile module {name}")]
    Compile {
        /// The module's name (its file name).
        name: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
    /// A trusted precompiled module was refused, usually because another wasmtime version,
    /// engine configuration or CPU produced it.
    #[error("cannot load precompiled module {name}; recompile it with this wasm-exec for this CPU")]
    Deserialize {
        /// The module's name (its file name).
        name: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
    /// The module fits neither guest ABI.
    #[error("module {name} fits no supported guest ABI: {reason}")]
    Abi {
        /// The module's name (its file name).
        name: String,
        /// What is missing or mistyped.
        reason: String,
    },
    /// The module imports something the executor does not provide.
    #[error("module {name} cannot be linked")]
    Link {
        /// The module's name (its file name).
        name: String,
        /// The underlying cause (names the import).
        #[source]
        source: BoxError,
    },
    /// A precompiled module (native code, such as a `.cwasm`) was given where WebAssembly is
    /// required: everywhere but a trusted load.
    #[error(
        "module {name} is precompiled native code (a .cwasm), not WebAssembly: only .wasm and \
         .wat modules are accepted"
    )]
    Precompiled {
        /// The module's name (its file name).
        name: String,
    },
    /// A module could not be serialised.
    #[error("cannot serialise module {name}")]
    Serialize {
        /// The module's name (its file name).
        name: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying cause.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value could not be parsed.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What was being parsed (`--dir`, `--env`, a size ...).
        what: &'static str,
        /// The rejected text.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// Turns wasmtime's error type (which does not implement `std::error::Error`) into a cause.
pub(crate) fn boxed(error: wasmtime::Error) -> BoxError {
    error.into()
}
