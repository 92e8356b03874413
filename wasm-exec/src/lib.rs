//! `wasm-exec`: runs a WebAssembly module once per event, each event in a fresh instance under
//! memory, time and (optionally) fuel limits, with no capabilities unless granted.
//!
//! The library serves both the `wasm-exec` binary (what every Job pod runs) and local mode
//! (`jobico up`), which calls it from a blocking thread pool:
//!
//! ```no_run
//! # fn main() -> Result<(), wasm_exec::Error> {
//! use wasm_exec::{Capabilities, Limits, Runtime, RuntimeConfig, VecSink};
//!
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let module = runtime.load_file("echo.wasm")?;
//! let event = jobico_common::ExecEvent { id: "e1".into(), data: serde_json::json!({"x": 1}) };
//! let mut sink = VecSink::new();
//! let outcome = module.run(&event, &Limits::default(), &Capabilities::default(), &mut sink);
//! println!("{} {:?}", outcome.id, outcome.status);
//! # Ok(())
//! # }
//! ```
//!
//! Two guest ABIs are detected from a module's exports (see [`Abi`]): WASI preview1 commands
//! and JobicoK8S's jobicolet modules.

mod abi;
pub mod artifact;
mod cache;
pub mod cli;
mod engine;
mod error;
mod host;
mod jobicolet;
pub mod limits;
mod module;
pub mod output;
pub mod results;
mod runtime;
pub mod summary;
mod wasi;

pub use abi::Abi;
pub use error::{BoxError, Error};
pub use limits::{Capabilities, DirGrant, EnvVar, Limits};
pub use module::Module;
pub use output::{LogLevel, OutputLine, OutputSink, StdoutSink, Stream, VecSink};
pub use runtime::{Runtime, RuntimeConfig};
pub use summary::{
    EXIT_GUEST_FAILED, EXIT_HOST_ERROR, EXIT_OK, ErrorKind, EventOutcome, RunSummary, Status,
    TERMINATION_MESSAGE_LIMIT, TerminationMessage, exit_code, run_exit_code,
    write_termination_message,
};
