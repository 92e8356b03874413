//! The Jobico dispatcher: validated events from JetStream become Kubernetes Jobs running
//! wasm-exec, exactly one Job per event (or per batch).
//!
//! - [`backend`]: the [`Backend`](backend::Backend) seam and the [`Batch`](backend::Batch) type.
//! - [`consumer`]: durable JetStream pull consumers, batching, retries, dead letters, acks;
//!   [`consumers`]: one consumer task per declared event.
//! - [`render`]: the handlebars Job template; [`template`]: its bounds; [`policy`]: what a
//!   rendered Job may be.
//! - [`kubernetes`]: the Kubernetes backend (Job creation).
//! - [`state`]: event state records in the NATS KV bucket.
//! - [`metrics`]: Prometheus metrics; [`admin`]: the admin port.
//! - [`controller`]: the Job resource controller; [`tracker`]: Job and pod watches for states.
//! - [`sinks`]: delivering outcomes to the events' sinks as CloudEvents.
//! - [`leader`]: Lease-based leader election; [`app`]: the binary's wiring.

pub mod admin;
pub mod app;
pub mod artifacts;
pub mod backend;
pub mod consumer;
pub mod consumers;
pub mod controller;
pub mod dead_letter;
pub mod dispatch;
pub mod inputs;
pub mod kubernetes;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod render;
pub mod sinks;
pub mod state;
pub mod template;
pub mod tracker;
pub mod trust;

pub use backend::{Backend, Batch, DispatchError, Dispatched};
pub use consumer::{Dispatcher, RetryPolicy};
pub use consumers::ConsumerSet;
