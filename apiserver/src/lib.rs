//! Jobico's ingress: validates events against their JSON Schema and hands them on durably.
//!
//! The same code serves local mode (`jobico up`, catalog from manifest files, in-memory queue)
//! and the cluster (`jobico-apiserver`, catalog from watched resources, NATS JetStream).

pub mod body;
pub mod catalog;
pub mod error;
pub mod http;
pub mod publish;
pub mod schema;
pub mod server;

pub use catalog::Catalog;
pub use error::ApiError;
pub use http::{AppState, configure};
pub use publish::{MemoryQueue, PublishError, Published, Publisher};
