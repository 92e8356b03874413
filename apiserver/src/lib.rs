//! Jobico's ingress: validates events against their JSON Schema and hands them on durably.
//!
//! The same code serves local mode (`jobico up`, catalog from manifest files, in-memory queue)
//! and the cluster (`jobico-apiserver`, catalog from watched resources, NATS JetStream).

pub mod args;
pub mod auth;
pub mod body;
pub mod catalog;
pub mod chain;
pub mod error;
pub mod http;
pub mod jetstream;
pub mod message;
pub mod metrics;
pub mod publish;
pub mod schema;
pub mod server;
pub mod watch;
pub mod worker_connection;

pub use catalog::Catalog;
pub use error::ApiError;
pub use http::{AppState, configure};
pub use metrics::Metrics;
pub use publish::{
    MemoryQueue, NullPublisher, Outcome, PublishError, PublishFailure, Published, Publisher,
    StatusLookup,
};
