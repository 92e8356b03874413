//! Where accepted events go: the [`Publisher`] seam between the HTTP API and the event store.
//!
//! The ingress answers 202 only once the publisher has said the events are kept. Local mode
//! uses [`MemoryQueue`], a bounded in-process queue (not durable); cluster mode publishes to
//! NATS JetStream.

use std::time::Duration;

use futures::future::BoxFuture;
use jobico_common::sink::SinkMessage;
use jobico_common::{EventId, EventRecord, EventStatus};
use tokio::sync::mpsc;

/// The outcome for one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event's id.
    pub id: EventId,
    /// True when the store already had this id and kept nothing new.
    pub duplicate: bool,
}

/// Why events could not be kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The store is unreachable, full or shutting down: the client should retry.
    #[error("{reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
}

/// What became of one event of a publish that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The event's id, as the ingress assigned it.
    pub id: EventId,
    /// True when the store acknowledged the event: it is kept. False: it may or may not have
    /// been kept (an ack that did not arrive in time), or it was refused.
    pub stored: bool,
}

/// A publish that did not keep every event: why, and what became of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// Why not every event was kept.
    pub error: PublishError,
    /// Every event of the call, in order.
    pub events: Vec<Outcome>,
}

impl PublishFailure {
    /// A failure before any of `events` could have been kept.
    pub fn nothing_stored(error: PublishError, events: &[EventRecord]) -> Self {
        Self {
            error,
            events: events
                .iter()
                .map(|e| Outcome {
                    id: e.id.clone(),
                    stored: false,
                })
                .collect(),
        }
    }
}

/// Keeps accepted events. Implementations must keep all of a call's events or say which were
/// acknowledged; they never drop an event after returning `Ok` or saying it was stored.
pub trait Publisher: Send + Sync + 'static {
    /// Keeps `events`, returning one [`Published`] per event in order.
    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>>;

    /// Whether the publisher can take events now (for readiness probes).
    fn is_ready(&self) -> bool {
        true
    }

    /// Keeps `module` in `namespace`'s module store (see [`jobico_store::modules`]): its digest
    /// and whether it was there already, or `None` when this publisher has no module store
    /// (local mode with the in-memory queue).
    fn store_module<'a>(
        &'a self,
        namespace: &'a str,
        module: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<StoredModule>, PublishError>> {
        let _ = (namespace, module);
        Box::pin(async { Ok(None) })
    }

    /// Adds the chain `links` names (parent, children, failed routes) to the record of its
    /// event, keeping the state; creates an `accepted` record when there is none. The default
    /// keeps nothing (no states are tracked).
    fn link<'a>(&'a self, links: &'a EventStatus) -> BoxFuture<'a, Result<(), PublishError>> {
        let _ = links;
        Box::pin(async { Ok(()) })
    }

    /// Keeps `record`, an event that can never run (a route's data its target refuses), as a
    /// dead letter, and records `status` (`dead-lettered`, why, its parent) under its id. The
    /// default, without a store, logs it.
    fn dead_letter<'a>(
        &'a self,
        record: &'a EventRecord,
        status: &'a EventStatus,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        tracing::error!(
            event = %format!("{}/{} {}", record.namespace, record.event, record.id),
            data = %record.data,
            reason = status.reason.as_deref().unwrap_or_default(),
            "dead letter (not kept: no event store)"
        );
        Box::pin(async { Ok(()) })
    }

    /// Keeps `message`, an outcome for its event's sink, until it is delivered (at least
    /// once: keeping the same event's outcome again keeps nothing more). The default, without
    /// an outbox, logs it undelivered.
    fn sink<'a>(&'a self, message: &'a SinkMessage) -> BoxFuture<'a, Result<(), PublishError>> {
        tracing::warn!(
            event = %format!("{}/{} {}", message.namespace, message.event, message.cloud_event.id),
            url = message.url,
            "outcome not delivered to its sink (no outbox)"
        );
        Box::pin(async { Ok(()) })
    }

    /// The recorded state of event `id` of type `event` in `namespace`, or of whichever type
    /// has an event `id` when `event` is `None`. The default says states are not tracked
    /// (local mode without NATS).
    fn status<'a>(
        &'a self,
        namespace: &'a str,
        event: Option<&'a str>,
        id: &'a str,
    ) -> BoxFuture<'a, Result<StatusLookup, PublishError>> {
        let _ = (namespace, event, id);
        Box::pin(async { Ok(StatusLookup::NotTracked) })
    }
}

/// A module kept by [`Publisher::store_module`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredModule {
    /// Its SHA-256 digest: what a resource's `wasm: sha256:<digest>` names.
    pub digest: jobico_common::executor::Sha256Digest,
    /// True when it had been uploaded before.
    pub existed: bool,
}

/// The answer to a status query.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusLookup {
    /// The event's record.
    Found(Box<EventStatus>),
    /// No record under that id.
    NotFound,
    /// Asked by id alone, and events of several types have it: these (sorted).
    Ambiguous(Vec<String>),
    /// This publisher keeps no states (the in-memory queue of local mode).
    NotTracked,
}

/// A bounded in-memory queue. Events in it are lost if the process stops: local mode only.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    sender: mpsc::Sender<EventRecord>,
}

/// How long a client should wait before retrying when the in-memory queue is full; the local
/// executor works through a full queue in about that time for small modules.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(1);

impl MemoryQueue {
    /// A queue of `capacity` events and the receiving end for the executor.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<EventRecord>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        (Self { sender }, receiver)
    }
}

impl Publisher for MemoryQueue {
    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        Box::pin(async move {
            // All or nothing: reserve a slot for every event before sending any.
            let permits = self.sender.try_reserve_many(events.len()).map_err(|e| {
                let reason = match e {
                    mpsc::error::TrySendError::Full(()) => "the local queue is full",
                    mpsc::error::TrySendError::Closed(()) => "the local executor is shutting down",
                };
                let error = PublishError::Unavailable {
                    reason: reason.into(),
                    retry_after: QUEUE_FULL_RETRY,
                };
                PublishFailure::nothing_stored(error, &events)
            })?;
            let published = events
                .iter()
                .map(|e| Published {
                    id: e.id.clone(),
                    duplicate: false,
                })
                .collect();
            for (permit, event) in permits.zip(events) {
                permit.send(event);
            }
            Ok(published)
        })
    }

    fn is_ready(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Accepts everything and keeps nothing: only for measuring the HTTP ceiling in the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullPublisher;

impl Publisher for NullPublisher {
    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        Box::pin(async move {
            Ok(events
                .into_iter()
                .map(|e| Published {
                    id: e.id,
                    duplicate: false,
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str) -> EventRecord {
        EventRecord {
            id: EventId::parse(id).unwrap(),
            namespace: "default".into(),
            event: "ev1".into(),
            data: json!({}),
            attributes: Default::default(),
        }
    }

    #[tokio::test]
    async fn memory_queue_is_all_or_nothing() {
        let (queue, mut receiver) = MemoryQueue::new(3);
        let ok = queue.publish(vec![record("a"), record("b")]).await.unwrap();
        assert_eq!(
            ok.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let full = queue
            .publish(vec![record("c"), record("d")])
            .await
            .unwrap_err();
        assert!(matches!(full.error, PublishError::Unavailable { .. }));
        let ids: Vec<_> = full
            .events
            .iter()
            .map(|o| (o.id.as_str(), o.stored))
            .collect();
        assert_eq!(ids, [("c", false), ("d", false)]);
        assert_eq!(receiver.recv().await.unwrap().id.as_str(), "a");
        assert_eq!(receiver.recv().await.unwrap().id.as_str(), "b");
        assert!(
            receiver.try_recv().is_err(),
            "nothing of the refused batch was queued"
        );
        drop(receiver);
        assert!(!queue.is_ready());
        assert!(queue.publish(vec![record("e")]).await.is_err());
    }
}
