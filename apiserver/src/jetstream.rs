//! Publishing accepted events to NATS JetStream, and reading their states.
//!
//! One message per event on `jobico.<namespace>.<event>.<id>` in the namespace's stream
//! `JOBICO-<namespace>` (created by the dispatcher, with the namespace's limits), with
//! `Nats-Msg-Id: <namespace>.<event>.<id>` so a retried request is deduplicated by the server
//! within the stream's duplicate window. All events of a request are published at once and
//! their acks awaited together; the answer is positive only when every ack arrived.
//!
//! Accepting an event is that one write: its `accepted` state is the stored message itself.
//! The dispatcher writes every later state to the KV bucket `jobico-events` before it acks
//! (and so removes) the message, so a status query finds an event in the bucket or, failing
//! that, in the stream by its subject; there is no moment when it is in neither. An event is
//! (namespace, event, id): asked by id alone, the lookup first finds which event types have
//! that id (the subject indexes of the bucket and the stream) and answers `Ambiguous` when
//! several do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use futures::TryStreamExt;
use futures::future::{BoxFuture, join_all};
use jobico_common::sink::{self, SinkMessage};
use jobico_common::subject::{self, STATE_BUCKET};
use jobico_common::{EventRecord, EventState, EventStatus};
use jobico_store::{BucketSettings, NatsAuth, StateStore, streams};

use crate::message;
use crate::metrics::Metrics;
use crate::publish::{
    Outcome, PublishError, PublishFailure, Published, Publisher, StatusLookup, StoredModule,
};
use crate::worker_connection::WorkerConnections;

/// Publish acks awaited at once on one connection (the shared one, or one HTTP worker's).
/// async-nats blocks the publisher beyond 5,000 un-awaited acks; staying below keeps a burst
/// from stalling a connection, and a request waiting for a slot is still bounded by the
/// publish timeout.
pub const MAX_ACKS_IN_FLIGHT: usize = 4096;

/// How long a client waits before retrying after a 503 caused by NATS.
const NATS_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Longest pause between reconnection attempts: NATS coming back is noticed within this.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How the ingress uses NATS: the state bucket it creates when missing, and how long a publish
/// may take. The event streams themselves are the dispatcher's ([`jobico_store::streams`]).
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// Replicas of the state bucket when the ingress creates it (3 for an R3 cluster).
    pub replicas: usize,
    /// How long event states are kept in the KV bucket (zero: forever).
    pub state_ttl: Duration,
    /// Upper bound on one request's publish (all events and their acks).
    pub publish_timeout: Duration,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            // A week: long after the Kubernetes Job and its logs are gone.
            state_ttl: Duration::from_secs(7 * 24 * 3600),
            // Acks take milliseconds; five seconds means NATS is not answering.
            publish_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The server cannot be reached.
    #[error("cannot connect to NATS at {url}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The KV bucket could not be opened or created.
    #[error("cannot open or create KV bucket {STATE_BUCKET}")]
    Bucket(#[source] jobico_store::StateError),
}

/// Publishes events to JetStream and reads states from the KV bucket.
pub struct JetStreamPublisher {
    client: async_nats::Client,
    context: jetstream::Context,
    workers: WorkerConnections,
    states: StateStore,
    /// The module store, opened (or created) by the first upload.
    modules: tokio::sync::OnceCell<jobico_store::ModuleStore>,
    settings: PublishSettings,
    metrics: Metrics,
}

impl JetStreamPublisher {
    /// Connects to `url` and opens (or creates) the state bucket. Every connection presents
    /// `auth` (see [`jobico_store::auth`]).
    pub async fn connect(
        url: &str,
        auth: &NatsAuth,
        settings: PublishSettings,
        metrics: Metrics,
    ) -> Result<Self, SetupError> {
        let (client, context) = connect_context(url, auth, &settings, "jobico-apiserver")
            .await
            .map_err(|source| SetupError::Connect {
                url: url.to_string(),
                source,
            })?;
        let bucket = BucketSettings {
            max_age: settings.state_ttl,
            replicas: settings.replicas,
        };
        let states = StateStore::open(&context, &bucket)
            .await
            .map_err(SetupError::Bucket)?;
        let (worker_url, worker_auth, worker_settings) =
            (url.to_string(), auth.clone(), settings.clone());
        let workers = WorkerConnections::new(Arc::new(move || {
            let (url, auth, settings) = (
                worker_url.clone(),
                worker_auth.clone(),
                worker_settings.clone(),
            );
            Box::pin(async move {
                connect_context(&url, &auth, &settings, "jobico-apiserver-worker").await
            })
        }));
        Ok(Self {
            client,
            context,
            workers,
            states,
            modules: tokio::sync::OnceCell::new(),
            settings,
            metrics,
        })
    }

    /// Whether the calling thread publishes through a connection of its own (see
    /// [`crate::worker_connection`]); asking starts one where none is being made.
    pub fn worker_connected(&self) -> bool {
        self.workers.local().is_some()
    }

    /// The JetStream context (for tests and the benchmark).
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    fn unavailable(reason: impl Into<String>) -> PublishError {
        PublishError::Unavailable {
            reason: reason.into(),
            retry_after: NATS_RETRY_AFTER,
        }
    }

    /// Publishes one event through `context` and waits for its ack.
    async fn publish_one(
        context: &jetstream::Context,
        record: &EventRecord,
    ) -> Result<Published, PublishError> {
        // Checked by the ingress before anything of the request was published; an error here
        // would be a gap in that check, and is refused rather than sent.
        let headers = message::headers(record).map_err(|e| {
            Self::unavailable(format!("event {} cannot be published: {e}", record.id))
        })?;
        let payload = serde_json::to_vec(record).expect("an event record always serialises");
        let subject = subject::event_subject(&record.namespace, &record.event, record.id.as_str());
        let ack = context
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| Self::unavailable(format!("cannot publish to NATS: {e}")))?
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::TimedOut => Self::unavailable("NATS did not acknowledge in time"),
                PublishErrorKind::StreamNotFound => Self::unavailable(format!(
                    "namespace {} has no event stream yet (the dispatcher creates it when it \
                     starts serving the namespace's events)",
                    record.namespace
                )),
                // Discard-new: this namespace's stream is at its byte or message limit.
                _ if streams::is_full(&e) => Self::unavailable(format!(
                    "namespace {} holds as many undispatched events as its limit allows",
                    record.namespace
                )),
                _ => Self::unavailable(format!("NATS refused the event: {e}")),
            })?;
        Ok(Published {
            id: record.id.clone(),
            duplicate: ack.duplicate,
        })
    }

    /// Bounds one NATS read by the publish timeout.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        read: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, PublishError> {
        tokio::time::timeout(self.settings.publish_timeout, read)
            .await
            .map_err(|_| Self::unavailable("NATS did not answer in time"))?
            .map_err(|e| Self::unavailable(format!("{what}: {e}")))
    }

    /// The state record of event `namespace/event/id` in the bucket, if any.
    async fn recorded(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
    ) -> Result<Option<EventStatus>, PublishError> {
        self.bounded(
            "cannot read the event state",
            self.states.get(namespace, event, id),
        )
        .await
    }

    /// Event `namespace/event/id` as stored in the stream and not yet dispatched: its
    /// `accepted` state.
    async fn stored(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
    ) -> Result<Option<EventStatus>, PublishError> {
        let subject = subject::event_subject(namespace, event, id);
        let stream = self.namespace_stream(namespace).await?;
        let lookup = stream.get_last_raw_message_by_subject(&subject);
        let message = match tokio::time::timeout(self.settings.publish_timeout, lookup)
            .await
            .map_err(|_| Self::unavailable("NATS did not answer in time"))?
        {
            Ok(message) => message,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            // No stream for the namespace yet: nothing of it was ever accepted.
            Err(e) if streams::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(Self::unavailable(format!("cannot look up the event: {e}"))),
        };
        let record: EventRecord = match serde_json::from_slice(&message.payload) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "unreadable event in the stream");
                return Ok(None);
            }
        };
        let stored_at = jiff::Timestamp::from_nanosecond(message.time.unix_timestamp_nanos())
            .unwrap_or_else(|_| jiff::Timestamp::now());
        Ok(Some(EventStatus::new(
            &record.namespace,
            &record.event,
            record.id.as_str(),
            EventState::Accepted,
            stored_at.to_string(),
        )))
    }

    /// The event types of `namespace` with an event `id`, in the bucket or the stream
    /// (sorted), from the subject indexes alone.
    async fn events_with(&self, namespace: &str, id: &str) -> Result<Vec<String>, PublishError> {
        let mut events = self
            .bounded(
                "cannot look up the event state",
                self.states.events_with(namespace, id),
            )
            .await?;
        let filter = subject::id_filter(namespace, id);
        let stream = self.namespace_stream(namespace).await?;
        let subjects: Vec<(String, usize)> = self
            .bounded("cannot look up the event", async {
                match stream.info_with_subjects(&filter).await {
                    Ok(info) => info.try_collect().await.map_err(|e| e.to_string()),
                    // No stream for the namespace yet: nothing of it was ever accepted.
                    Err(e) if streams::is_not_found(&e) => Ok(Vec::new()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await?;
        events.extend(subjects.iter().filter_map(|(subject, _)| {
            subject::parse_event_subject(subject).map(|(_, event, _)| event.to_owned())
        }));
        events.sort();
        events.dedup();
        Ok(events)
    }

    /// The event stream of `namespace` (a handle only: no request is made).
    async fn namespace_stream(&self, namespace: &str) -> Result<stream::Stream<()>, PublishError> {
        self.context
            .get_stream_no_info(subject::stream_name(namespace))
            .await
            .map_err(|e| Self::unavailable(format!("cannot look up the event: {e}")))
    }

    /// The state of one event: the bucket first (every state after `accepted`), then the
    /// stream (`accepted`), then the bucket again: the dispatcher may have written the record
    /// and acked the message between the first two reads.
    async fn lookup(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
    ) -> Result<Option<EventStatus>, PublishError> {
        if let Some(status) = self.recorded(namespace, event, id).await? {
            return Ok(Some(status));
        }
        if let Some(status) = self.stored(namespace, event, id).await? {
            return Ok(Some(status));
        }
        self.recorded(namespace, event, id).await
    }
}

/// Connects to `url` as `name` with `auth` and builds the JetStream context every publish uses.
async fn connect_context(
    url: &str,
    auth: &NatsAuth,
    settings: &PublishSettings,
    name: &str,
) -> Result<(async_nats::Client, jetstream::Context), async_nats::ConnectError> {
    let client = auth
        .options(name, subject::INGRESS_INBOX)
        .reconnect_delay_callback(|attempts| {
            (Duration::from_millis(50) * attempts.min(20) as u32).min(MAX_RECONNECT_DELAY)
        })
        .connect(jobico_store::Servers(url))
        .await?;
    let context = jetstream::ContextBuilder::new()
        .timeout(settings.publish_timeout)
        .ack_timeout(settings.publish_timeout)
        .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok((client, context))
}

impl JetStreamPublisher {
    /// Publishes `record` to its dead-letter subject and waits for the ack.
    async fn publish_dead_letter(
        &self,
        record: &EventRecord,
        reason: &str,
    ) -> Result<(), PublishError> {
        let (namespace, event, id) = (&record.namespace, &record.event, record.id.as_str());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(subject::HEADER_EVENT_ID, id);
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            subject::dead_letter_message_id(namespace, event, id).as_str(),
        );
        headers.insert(
            subject::HEADER_DEAD_LETTER_REASON,
            subject::header_text(reason).as_str(),
        );
        let payload = serde_json::to_vec(record).expect("an event record always serialises");
        self.publish_acked(
            "cannot publish the dead letter",
            subject::dead_letter_subject(namespace, event),
            headers,
            payload,
        )
        .await
    }

    /// Publishes one message to JetStream on the shared connection and waits for its ack,
    /// bounded by the publish timeout; `what` names it in the error.
    async fn publish_acked(
        &self,
        what: &str,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let publish = async {
            self.context
                .publish_with_headers(subject, headers, payload.into())
                .await?
                .await
        };
        self.bounded(what, publish).await.map(drop)
    }
}

impl Publisher for JetStreamPublisher {
    fn sink<'a>(&'a self, message: &'a SinkMessage) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let (namespace, event, id) = (
                &message.namespace,
                &message.event,
                message.cloud_event.id.as_str(),
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(subject::HEADER_NAMESPACE, namespace.as_str());
            headers.insert(subject::HEADER_EVENT, event.as_str());
            headers.insert(subject::HEADER_EVENT_ID, id);
            headers.insert(sink::HEADER_SINK_URL, message.url.as_str());
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                sink::sink_message_id(namespace, event, id).as_str(),
            );
            let payload =
                serde_json::to_vec(&message.cloud_event).expect("a CloudEvent serialises");
            self.publish_acked(
                "cannot keep the outcome for its sink",
                sink::sink_subject(namespace, event),
                headers,
                payload,
            )
            .await
        })
    }

    fn link<'a>(&'a self, links: &'a EventStatus) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            self.bounded("cannot record the chain", self.states.link(links))
                .await
                .map(drop)
        })
    }

    fn dead_letter<'a>(
        &'a self,
        record: &'a EventRecord,
        status: &'a EventStatus,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let reason = status.reason.as_deref().unwrap_or_default();
            tracing::error!(
                event = %format!("{}/{} {}", record.namespace, record.event, record.id),
                reason,
                "dead-lettering a routed event"
            );
            self.publish_dead_letter(record, reason).await?;
            self.bounded(
                "cannot record the dead-lettered state",
                self.states.advance(status.clone()),
            )
            .await
            .map(drop)
        })
    }

    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        Box::pin(async move {
            // This worker's own connection when it has one (and it is connected), else the
            // shared one.
            let local = self.workers.local();
            let context = match &local {
                Some(local) => &local.context,
                None if self.client.connection_state() == State::Connected => &self.context,
                None => {
                    let error = Self::unavailable("NATS is not connected");
                    return Err(PublishFailure::nothing_stored(error, &events));
                }
            };
            let started = Instant::now();
            // One deadline for the whole request, applied to each event, so that when it
            // passes the acks that did arrive are still known: those events are kept.
            let deadline = tokio::time::Instant::now() + self.settings.publish_timeout;
            let results = join_all(events.iter().map(|e| async move {
                tokio::time::timeout_at(deadline, Self::publish_one(context, e))
                    .await
                    .unwrap_or_else(|_| Err(Self::unavailable("NATS did not acknowledge in time")))
            }))
            .await;
            if let Some(error) = results.iter().find_map(|r| r.as_ref().err()) {
                let outcomes = events
                    .iter()
                    .zip(&results)
                    .map(|(event, result)| Outcome {
                        id: event.id.clone(),
                        stored: result.is_ok(),
                    })
                    .collect();
                return Err(PublishFailure {
                    error: error.clone(),
                    events: outcomes,
                });
            }
            self.metrics.observe_publish(started.elapsed());
            Ok(results.into_iter().flatten().collect())
        })
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn store_module<'a>(
        &'a self,
        namespace: &'a str,
        module: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<StoredModule>, PublishError>> {
        Box::pin(async move {
            if self.client.connection_state() != State::Connected {
                return Err(Self::unavailable("NATS is not connected"));
            }
            let store = self
                .modules
                .get_or_try_init(|| {
                    jobico_store::ModuleStore::open(&self.context, self.settings.replicas)
                })
                .await
                .map_err(|e| Self::unavailable(e.to_string()))?;
            let (digest, existed) = store
                .put(namespace, module)
                .await
                .map_err(|e| Self::unavailable(e.to_string()))?;
            Ok(Some(StoredModule { digest, existed }))
        })
    }

    fn status<'a>(
        &'a self,
        namespace: &'a str,
        event: Option<&'a str>,
        id: &'a str,
    ) -> BoxFuture<'a, Result<StatusLookup, PublishError>> {
        Box::pin(async move {
            if self.client.connection_state() != State::Connected {
                return Err(Self::unavailable("NATS is not connected"));
            }
            let found = match event {
                Some(event) => self.lookup(namespace, event, id).await?,
                None => match self.events_with(namespace, id).await?.as_slice() {
                    [] => None,
                    [event] => self.lookup(namespace, event, id).await?,
                    several => return Ok(StatusLookup::Ambiguous(several.to_vec())),
                },
            };
            Ok(found.map_or(StatusLookup::NotFound, |status| {
                StatusLookup::Found(Box::new(status))
            }))
        })
    }
}
