//! Contracts shared by Jobico's binaries.
//!
//! Everything that crosses a process boundary lives here: the event envelope that travels from the
//! ingress through JetStream to the executor, event ids, subject and header names, the
//! executor's run summary and termination message, plus the
//! process plumbing every binary shares (telemetry and shutdown). This crate depends on neither
//! kube nor wasmtime so that every binary, including the small `wasm-exec` image, can use it.

pub mod chain;
pub mod envelope;
pub mod executor;
pub mod id;
pub mod shutdown;
pub mod sink;
pub mod state;
pub mod subject;
pub mod summary;
pub mod telemetry;

pub use envelope::{EventRecord, ExecEvent};
pub use id::{EventId, InvalidEventId};
pub use state::{EventLink, EventState, EventStatus, RouteFailure};
