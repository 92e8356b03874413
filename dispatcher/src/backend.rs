//! The seam between the consumer loop and whatever runs events.
//!
//! [`Backend`] is implemented by [`crate::kubernetes::KubeBackend`] (one `batch/v1` Job per
//! batch) and, outside this crate, by the CLI's local executor (`jobico up --nats URL`). The
//! consumer loop ([`crate::consumer`]) is generic over it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jobico_common::EventRecord;
use jobico_model::{EventSpec, Job as JobicoJob};
use sha2::{Digest, Sha256};

/// Label and annotation keys the dispatcher puts on every Job and pod it creates.
pub mod keys {
    /// Label: the event name.
    pub const EVENT: &str = "event";
    /// Label: the Jobico `Job` resource that declares the event.
    pub const JOB: &str = "jobico.coeux.dev/job";
    /// Label: the event id, on single-event Jobs only.
    pub const EVENT_ID: &str = "jobico.coeux.dev/event-id";
    /// Annotation: the comma-separated ids of the batch's events, in batch order.
    pub const EVENT_IDS: &str = "jobico.coeux.dev/event-ids";
    /// Label: who manages the object; the state tracker watches Jobs and pods with it.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGER: &str = "jobico-dispatcher";
}

/// Events of one event type to run together, with the resource that declares them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The Jobico `Job` resource that declares the event (its namespace, name, uid and spec).
    pub owner: Arc<JobicoJob>,
    /// The event name.
    pub event: String,
    /// The events, in stream order; never empty.
    pub events: Vec<EventRecord>,
}

impl Batch {
    /// The namespace of the events.
    pub fn namespace(&self) -> &str {
        self.owner
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default")
    }

    /// The name of the owning resource.
    pub fn owner_name(&self) -> &str {
        self.owner.metadata.name.as_deref().unwrap_or_default()
    }

    /// The event's declaration in the owner, if it is still declared.
    pub fn spec(&self) -> Option<&EventSpec> {
        self.owner.event(&self.event)
    }

    /// The event ids, in batch order.
    pub fn ids(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.id.as_str()).collect()
    }

    /// The ids joined with commas, as in the [`keys::EVENT_IDS`] annotation.
    pub fn ids_annotation(&self) -> String {
        self.ids().join(",")
    }

    /// The deterministic Kubernetes Job name of this batch: `jobico-<event>-<hash>`, where the
    /// hash is the first 16 hex digits of the SHA-256 of the event name and the batch's first
    /// event id.
    ///
    /// Seeding by the first id rather than all of them means a batch regrouped after a
    /// redelivery (same first event, more or fewer followers) collides with the Job that
    /// already exists instead of running its events a second time; see
    /// [`DispatchError::Taken`]. At most 7 + 10 + 1 + 16 = 34 characters, lowercase.
    pub fn job_name(&self) -> String {
        let first = self
            .events
            .first()
            .map(|e| e.id.as_str())
            .unwrap_or_default();
        job_name(&self.event, first)
    }
}

/// The Job name for an event type and the first id of a batch; see [`Batch::job_name`]. The
/// hash covers the event name too: names are lowercased, and `Ev1` and `ev1` are two event
/// types whose events may share ids.
pub fn job_name(event: &str, first_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(event.as_bytes());
    // Event names are alphanumeric, so NUL separates them from the id unambiguously.
    hasher.update([0]);
    hasher.update(first_id.as_bytes());
    let digest = hasher.finalize();
    // 16 hex digits = 64 bits: collisions within one event type's live Jobs are negligible.
    format!(
        "jobico-{}-{}",
        event.to_ascii_lowercase(),
        &hex::encode(digest)[..16]
    )
}

/// What a backend did with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// The name of the Kubernetes Job (or the local run) that has the events.
    pub job: String,
    /// False when the Job already existed with the same events (a redelivery).
    pub created: bool,
}

/// Why a batch could not be dispatched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// Worth trying again (API unavailable, throttled, conflict).
    #[error("{reason}")]
    Retryable {
        /// What happened.
        reason: String,
        /// How long the server asked us to wait (HTTP 429 `Retry-After`), if it did.
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help (events too large, an object the API server rejects):
    /// dead-letter at once.
    #[error("{reason}")]
    Permanent {
        /// What happened.
        reason: String,
    },
    /// This resource cannot run events now, through no fault of the events: its module is
    /// missing, its template is refused, breaks a rendering bound or renders a Job the pod
    /// policy refuses, or its template ConfigMap is missing. Keep the messages in the stream
    /// (do not dead-letter them), record them as held: they run once the resource is fixed,
    /// which its `Ready` condition asks for.
    #[error("{reason}")]
    Held {
        /// What is missing or wrong, and how to fix it.
        reason: String,
    },
    /// The Job name is taken by a Job holding other event ids. Events in `ids` are in that
    /// Job already (so they count as dispatched to it); the others must be dispatched again.
    #[error("job {job} exists with other events")]
    Taken {
        /// The existing Job.
        job: String,
        /// The ids the existing Job holds.
        ids: Vec<String>,
    },
}

impl DispatchError {
    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Runs batches of events. Implementations must be idempotent per [`Batch::job_name`]: a batch
/// dispatched twice (after a crash or redelivery) must run once.
pub trait Backend: Send + Sync + 'static {
    /// Hands the batch to whatever runs it. Returns once the work is durably accepted (for
    /// Kubernetes: the Job exists); the consumer acks the messages only after `Ok`.
    fn dispatch(
        &self,
        batch: &Batch,
    ) -> impl Future<Output = Result<Dispatched, DispatchError>> + Send;

    /// Whether the run named `job` (an earlier [`Dispatched::job`]) exists and holds event
    /// `id`. Asked for a redelivered or replayed event whose state record names a Job, to tell
    /// a Job that exists from a claim whose create never happened. Backends that cannot tell
    /// return `Ok(true)`, trusting the record.
    fn holds(
        &self,
        namespace: &str,
        job: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, DispatchError>> + Send {
        let _ = (namespace, job, id);
        async { Ok(true) }
    }

    /// Whether the batch's resource can run events now, asked before they are claimed:
    /// [`DispatchError::Held`] when an input is missing or invalid (the events are then kept
    /// and recorded as held), [`DispatchError::Retryable`] when that cannot be told now.
    fn ready(&self, batch: &Batch) -> impl Future<Output = Result<(), DispatchError>> + Send {
        let _ = batch;
        async { Ok(()) }
    }

    /// How long after a claim the Job it names may still appear (a create sent before a crash
    /// or a timeout can still land). A claim naming a Job that does not exist is taken over
    /// only once it is older than this. Zero for backends whose runs end with their process.
    fn claim_settle(&self) -> Duration {
        Duration::ZERO
    }

    /// How many Jobs of this event are currently active, for the per-event `concurrency` cap.
    /// Backends that cannot tell return 0 (no cap).
    fn active(&self, namespace: &str, event: &str) -> usize {
        let _ = (namespace, event);
        0
    }
}

impl<B: Backend> Backend for Arc<B> {
    fn dispatch(
        &self,
        batch: &Batch,
    ) -> impl Future<Output = Result<Dispatched, DispatchError>> + Send {
        (**self).dispatch(batch)
    }

    fn holds(
        &self,
        namespace: &str,
        job: &str,
        id: &str,
    ) -> impl Future<Output = Result<bool, DispatchError>> + Send {
        (**self).holds(namespace, job, id)
    }

    fn ready(&self, batch: &Batch) -> impl Future<Output = Result<(), DispatchError>> + Send {
        (**self).ready(batch)
    }

    fn claim_settle(&self) -> Duration {
        (**self).claim_settle()
    }

    fn active(&self, namespace: &str, event: &str) -> usize {
        (**self).active(namespace, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_deterministic_lowercase_and_short() {
        let a = job_name("Ev1", "0190c5a1-7b7e-7c3e-9f00-000000000001");
        assert_eq!(a, job_name("Ev1", "0190c5a1-7b7e-7c3e-9f00-000000000001"));
        assert_ne!(a, job_name("Ev1", "0190c5a1-7b7e-7c3e-9f00-000000000002"));
        // Event names differing only in case are different event types.
        assert_ne!(a, job_name("ev1", "0190c5a1-7b7e-7c3e-9f00-000000000001"));
        assert!(a.starts_with("jobico-ev1-"));
        assert_eq!(a.len(), "jobico-ev1-".len() + 16);
        let longest = job_name("abcdefghij", &"x".repeat(63));
        assert!(longest.len() <= 63);
        assert!(
            longest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
