//! The effective spec: what a resource means once every default is applied. The dispatcher,
//! the renderer and local mode read these instead of repeating the CRD's documented defaults.

use std::time::Duration;

use jobico_common::executor::Sha256Digest;

use crate::crd::EventSpec;

/// How `wasm` names a module uploaded to the namespace's module store (`jobico module
/// upload`) rather than a key of the module ConfigMap: `sha256:` and the digest's hex.
pub const UPLOADED_MODULE_PREFIX: &str = "sha256:";

/// Where an event type's module comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleRef<'a> {
    /// A key of the resource's module ConfigMap (a file name).
    ConfigMap(&'a str),
    /// A module uploaded to the namespace's module store, by digest.
    Uploaded(Sha256Digest),
}

/// Wait for a batch to fill when `batch.maxWaitMillis` is not set.
pub const DEFAULT_BATCH_MAX_WAIT: Duration = Duration::from_millis(1000);
/// Bytes of event data per batch when `batch.maxBytes` is not set: a quarter of the largest
/// allowed, so a default batch stays far below Kubernetes' object size.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 262_144;

/// How an event type's events are grouped into Kubernetes Jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveBatch {
    /// Most events per Job (1 without `batch`).
    pub max_events: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Most bytes of event data per Job (a single larger event still gets a Job of its own).
    pub max_bytes: usize,
}

impl EventSpec {
    /// Whether something follows this event's outcomes (`then` routes or a `sink`), so its
    /// executor keeps the result and hands the outcomes on.
    pub fn hands_on_outcomes(&self) -> bool {
        !self.then.is_empty() || self.sink.is_some()
    }

    /// Where the module comes from: `wasm: sha256:<hex>` is an uploaded module, anything else
    /// a ConfigMap key. `None` for a `sha256:` value that is not a digest (validation refuses
    /// it).
    pub fn module_ref(&self) -> Option<ModuleRef<'_>> {
        match self.wasm.strip_prefix(UPLOADED_MODULE_PREFIX) {
            Some(hex) => Sha256Digest::parse(hex).ok().map(ModuleRef::Uploaded),
            None => Some(ModuleRef::ConfigMap(&self.wasm)),
        }
    }

    /// The batching of this event type, defaults applied.
    pub fn effective_batch(&self) -> EffectiveBatch {
        let batch = self.batch.as_ref();
        EffectiveBatch {
            max_events: batch.map_or(1, |b| b.max_events.max(1) as usize),
            max_wait: batch
                .and_then(|b| b.max_wait_millis)
                .map_or(DEFAULT_BATCH_MAX_WAIT, |m| Duration::from_millis(m.into())),
            max_bytes: batch
                .and_then(|b| b.max_bytes)
                .map_or(DEFAULT_BATCH_MAX_BYTES, |b| b as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BatchSpec, SchemaRef};

    #[test]
    fn batch_defaults_apply_where_the_spec_is_silent() {
        let mut spec = EventSpec {
            name: "ev1".into(),
            wasm: "echo.wasm".into(),
            script: None,
            schema: SchemaRef {
                key: "s".into(),
                name: None,
                optional: None,
            },
            batch: None,
            concurrency: None,
            limits: None,
            env: vec![],
            env_from: vec![],
            then: vec![],
            sink: None,
        };
        assert_eq!(
            spec.effective_batch(),
            EffectiveBatch {
                max_events: 1,
                max_wait: DEFAULT_BATCH_MAX_WAIT,
                max_bytes: DEFAULT_BATCH_MAX_BYTES
            }
        );
        spec.batch = Some(BatchSpec {
            max_events: 50,
            max_wait_millis: Some(0),
            max_bytes: Some(1024),
        });
        assert_eq!(
            spec.effective_batch(),
            EffectiveBatch {
                max_events: 50,
                max_wait: Duration::ZERO,
                max_bytes: 1024
            }
        );
    }
}
