//! The `jobico.coeux.dev/v1` `Job` custom resource and the manifests around it.
//!
//! A `Job` declares events. Each event names a WebAssembly module and a JSON Schema kept in a
//! ConfigMap. This crate holds the Rust types the CRD is generated from ([`crd`]), the checks
//! the API server cannot express ([`validate`]), and a reader for YAML manifests ([`manifest`])
//! that local mode and the tests use.

pub mod crd;
pub mod effective;
pub mod env;
pub mod manifest;
pub mod routes;
pub mod sink;
pub mod validate;

pub use crd::{
    BatchSpec, EnvFromSource, EnvVar, EventLimits, EventSpec, Job, JobSpec, JobStatus, SchemaRef,
    TemplateRef,
};
pub use effective::{EffectiveBatch, ModuleRef, UPLOADED_MODULE_PREFIX};
pub use env::{SECRET_GRANT_LABEL, SourceKind};
pub use manifest::{Manifest, ManifestError};
pub use routes::{Route, RouteWhen};
pub use sink::Sink;
pub use validate::{InvalidJob, MAX_NAME_LEN, validate_job};
