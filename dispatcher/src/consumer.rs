//! JetStream consumers: one durable pull consumer per (namespace, event), pulling events,
//! grouping them into batches, handing each batch to a [`Backend`], recording states and
//! acking only once the backend has the batch.
//!
//! Entry points: [`Dispatcher::connect`] (streams, state bucket), [`run`] (one event type until
//! cancelled) and [`crate::consumers::ConsumerSet`] (one task per declared event, as resources
//! come and go).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, Message, consumer::pull, stream};
use futures::StreamExt;
use jobico_common::subject::{
    DEAD_LETTER_PREFIX, HEADER_EVENT_ID, STREAM, dead_letter_subject, event_filter,
};
use jobico_common::{EventRecord, EventState};
use jobico_model::Job as JobicoJob;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Backend, Batch, DispatchError, Dispatched};
use crate::metrics::Metrics;
use crate::state::{self, Advanced, Counters, StateStore, rank};

/// The stream holding dead-lettered events (subjects `jobico-dlq.>`), so they are durable.
pub const DEAD_LETTER_STREAM: &str = "JOBICO_DLQ";
/// Header on dead-lettered messages saying why.
pub const HEADER_DEAD_LETTER_REASON: &str = "Jobico-Dead-Letter-Reason";
/// How long dead-lettered events are kept: two weeks to notice and replay them.
const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Batches of one event type being dispatched at once. Bounds API-server load per event type
/// and the messages held unacked; 32 keeps a 10 ms create round trip at ~3k Jobs/s.
pub const MAX_IN_FLIGHT_BATCHES: usize = 32;
/// How long JetStream waits for an ack before redelivering. Dispatch retries send progress
/// acks, so only a dead dispatcher lets it expire.
pub const ACK_WAIT: Duration = Duration::from_secs(60);
/// Most unacked messages per consumer: in-flight batches of the largest size, plus prefetch.
const MAX_ACK_PENDING: i64 = 4_000;
/// A consumer nobody pulls from for this long is removed by the server (its event was
/// deleted); a replay after that is caught by the state records.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often to look again for the event stream while waiting for the ingress to create it.
const STREAM_POLL: Duration = Duration::from_secs(2);
/// How often to look at the active-Job count while at the concurrency cap.
const CAP_POLL: Duration = Duration::from_millis(200);
/// Pause before re-creating a consumer whose message stream failed.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Consecutive pull errors (missed heartbeats, server restarts) before the consumer is
/// re-created; single errors are normal and recovered by the client.
const MAX_PULL_ERRORS: u32 = 10;
/// Default wait for a batch to fill (the CRD's documented default).
const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(1000);
/// Default data bytes per batch (the CRD's documented default).
const DEFAULT_MAX_BYTES: usize = 262_144;

/// Why a consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// NATS refused or failed an operation.
    #[error("{what}: {message}")]
    Nats {
        /// What was being done.
        what: String,
        /// The NATS error.
        message: String,
    },
}

fn nats(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> ConsumerError {
    let what = what.into();
    move |e| ConsumerError::Nats {
        what,
        message: e.to_string(),
    }
}

/// Retry policy for dispatch attempts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before an event is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Delay after the first failure; doubled after each further one.
    pub base: Duration,
    /// Longest delay between attempts (a server's `Retry-After` may exceed it).
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 0.2 + 0.4 + ... + 6.4 s: about 13 s of API trouble before dead-lettering.
        Self {
            max_attempts: 6,
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        retry_after.map_or(backoff, |r| r.max(backoff))
    }
}

/// Everything the consumers share: NATS, the backend, the state bucket, metrics.
pub struct Dispatcher<B> {
    /// The JetStream context.
    pub js: jetstream::Context,
    /// What runs the batches.
    pub backend: B,
    /// Event states.
    pub states: StateStore,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Per-resource counters for the status.
    pub counters: Counters,
    /// Dispatch retries.
    pub retry: RetryPolicy,
    /// The consumers' ack wait (set when a consumer is created; [`ACK_WAIT`] by default).
    pub ack_wait: Duration,
}

impl<B> std::fmt::Debug for Dispatcher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("retry", &self.retry)
            .finish()
    }
}

impl<B: Backend> Dispatcher<B> {
    /// Opens the state bucket and the dead-letter stream (creating them if missing).
    pub async fn connect(
        js: jetstream::Context,
        backend: B,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Result<Arc<Self>, ConsumerError> {
        Self::connect_with(js, backend, metrics, retry, ACK_WAIT).await
    }

    /// [`Dispatcher::connect`] with another ack wait (tests use a short one to see
    /// redeliveries quickly).
    pub async fn connect_with(
        js: jetstream::Context,
        backend: B,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
        ack_wait: Duration,
    ) -> Result<Arc<Self>, ConsumerError> {
        let states = StateStore::open(&js)
            .await
            .map_err(|e| ConsumerError::Nats {
                what: "opening the state bucket".into(),
                message: e.to_string(),
            })?;
        js.get_or_create_stream(stream::Config {
            name: DEAD_LETTER_STREAM.into(),
            subjects: vec![format!("{DEAD_LETTER_PREFIX}.>")],
            max_age: DEAD_LETTER_MAX_AGE,
            ..Default::default()
        })
        .await
        .map_err(|e| nats("creating the dead-letter stream")(&e))?;
        Ok(Arc::new(Self {
            js,
            backend,
            states,
            metrics,
            counters: Counters::default(),
            retry,
            ack_wait,
        }))
    }
}

/// The durable consumer name of an event type: `jobico-<namespace>-<event>` (event names have
/// no `-`, so the name is unambiguous).
pub fn consumer_name(namespace: &str, event: &str) -> String {
    format!("jobico-{namespace}-{event}")
}

/// Waits until the ingress has created the event stream. The dispatcher does not create it:
/// the ingress owns its configuration (retention, limits, duplicate window).
pub async fn wait_for_stream(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Option<jetstream::stream::Stream> {
    let mut warned = false;
    loop {
        match js.get_stream(STREAM).await {
            Ok(stream) => return Some(stream),
            Err(error) if !warned => {
                tracing::warn!(stream = STREAM, %error, "event stream not found, waiting for the ingress to create it");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(STREAM_POLL) => {}
        }
    }
}

/// Consumes one event type of `owner` until `shutdown`, re-creating the consumer after
/// failures. On shutdown, in-flight batches finish (and are acked) before it returns.
pub async fn run<B: Backend>(
    ctx: Arc<Dispatcher<B>>,
    owner: Arc<JobicoJob>,
    event: String,
    shutdown: CancellationToken,
) {
    let namespace = owner.metadata.namespace.clone().unwrap_or_default();
    let span = tracing::info_span!("consumer", namespace, event);
    async move {
        ctx.metrics.consumers.inc();
        while !shutdown.is_cancelled() {
            match consume(&ctx, &owner, &event, &shutdown).await {
                Ok(()) => {}
                Err(error) => tracing::warn!(%error, "consumer failed, restarting"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(RESTART_DELAY) => {}
            }
        }
        ctx.metrics.consumers.dec();
    }
    .instrument(span)
    .await
}

async fn consume<B: Backend>(
    ctx: &Arc<Dispatcher<B>>,
    owner: &Arc<JobicoJob>,
    event: &str,
    shutdown: &CancellationToken,
) -> Result<(), ConsumerError> {
    let namespace = owner.metadata.namespace.clone().unwrap_or_default();
    let Some(spec) = owner.event(event).cloned() else {
        return Ok(());
    };
    let max_events = spec.batch.as_ref().map_or(1, |b| b.max_events.max(1)) as usize;
    let max_wait = spec
        .batch
        .as_ref()
        .and_then(|b| b.max_wait_millis)
        .map_or(DEFAULT_MAX_WAIT, |m| Duration::from_millis(m.into()));
    let max_bytes = spec
        .batch
        .as_ref()
        .and_then(|b| b.max_bytes)
        .map_or(DEFAULT_MAX_BYTES, |b| b as usize);
    let cap = spec.concurrency.map(|c| c as usize);

    let Some(stream) = wait_for_stream(&ctx.js, shutdown).await else {
        return Ok(());
    };
    let name = consumer_name(&namespace, event);
    // Create or update: a consumer left by an earlier start (or version) takes this one's
    // filter subject and settings instead of keeping its own.
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: event_filter(&namespace, event),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ctx.ack_wait,
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            inactive_threshold: INACTIVE_THRESHOLD,
            ..Default::default()
        })
        .await
        .map_err(|e| nats(format!("creating or updating consumer {name}"))(&e))?;
    // Prefetch enough to keep every in-flight slot busy, but little when a concurrency cap
    // may hold messages back (held messages age towards their ack wait).
    let prefetch = match cap {
        Some(cap) => (cap * max_events).clamp(1, 1000),
        None => (MAX_IN_FLIGHT_BATCHES * max_events).clamp(1, 1000),
    };
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(prefetch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| nats(format!("pulling from {name}"))(&e))?;
    tracing::debug!(consumer = name, max_events, "consuming");

    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut carry: Option<Message> = None;
    let mut pull_errors = 0;
    let result = 'pull: loop {
        while tasks.try_join_next().is_some() {}
        if let Some(cap) = cap {
            while ctx.backend.active(&namespace, event)
                + in_flight.load(std::sync::atomic::Ordering::Relaxed)
                >= cap
            {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull Ok(()),
                    _ = tokio::time::sleep(CAP_POLL) => {}
                }
            }
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let first = match carry.take() {
            Some(message) => message,
            None => tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        pull_errors = 0;
                        message
                    }
                    Some(Err(error)) => {
                        pull_errors += 1;
                        tracing::debug!(%error, pull_errors, "pull error");
                        if pull_errors >= MAX_PULL_ERRORS {
                            break Err(ConsumerError::Nats { what: format!("pulling from {name}"), message: error.to_string() });
                        }
                        continue;
                    }
                    None => break Err(ConsumerError::Nats { what: format!("pulling from {name}"), message: "message stream ended".into() }),
                },
            },
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].payload.len();
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_events {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) if bytes + message.payload.len() > max_bytes => {
                    carry = Some(message);
                    break;
                }
                Some(Ok(message)) => {
                    bytes += message.payload.len();
                    batch.push(message);
                }
                Some(Err(error)) => tracing::debug!(%error, "pull error"),
                None => break,
            }
        }
        let ctx = ctx.clone();
        let owner = owner.clone();
        let event = event.to_owned();
        let shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(
            async move {
                process(&ctx, owner, event, batch, &shutdown).await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
            }
            .in_current_span(),
        );
    };
    // Drain: let every in-flight batch finish and ack; hand back what was pulled but not started.
    if let Some(message) = carry {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    while tasks.join_next().await.is_some() {}
    result
}

/// Processes one pulled batch: parse, skip what is already dispatched, dispatch the rest.
#[tracing::instrument(level = "debug", skip_all, fields(messages = messages.len()))]
async fn process<B: Backend>(
    ctx: &Dispatcher<B>,
    owner: Arc<JobicoJob>,
    event: String,
    messages: Vec<Message>,
    shutdown: &CancellationToken,
) {
    let namespace = owner.metadata.namespace.clone().unwrap_or_default();
    let checks = messages.into_iter().map(|message| {
        let namespace = namespace.clone();
        let event = event.clone();
        async move {
            let record: EventRecord = match serde_json::from_slice(&message.payload) {
                Ok(record) => record,
                Err(error) => {
                    let reason = format!("unreadable event message: {error}");
                    dead_letter_raw(ctx, &namespace, &event, &message, &reason).await;
                    return None;
                }
            };
            // A redelivery, or a replay to a re-created consumer: the state says whether the
            // event was claimed for a Job, and the backend whether that Job really holds it
            // (a crash between the claim and the create leaves a claim without a Job).
            let id = record.id.as_str();
            let status = match ctx.states.get(&namespace, id).await {
                Ok(status) => status,
                Err(error) => {
                    tracing::warn!(%error, "cannot read event state, dispatching anyway (the Job name deduplicates)");
                    None
                }
            };
            let done = match &status {
                Some(s) if rank(s.state) > rank(EventState::Dispatched) => true,
                Some(s) if s.state == EventState::Dispatched => {
                    let job = s.job.as_deref().unwrap_or_default();
                    match ctx.backend.holds(&namespace, job, id).await {
                        Ok(held) => held,
                        Err(error) => {
                            // Unknown: do not risk a second Job; try again later.
                            tracing::warn!(%error, job, "cannot check the claimed Job, retrying the event later");
                            let _ = message.ack_with(AckKind::Nak(Some(RESTART_DELAY * 5))).await;
                            return None;
                        }
                    }
                }
                _ => false,
            };
            if done {
                tracing::debug!(id, "already dispatched, acking");
                ctx.metrics.events_skipped.inc();
                ack(&message).await;
                return None;
            }
            Some((message, record))
        }
    });
    let mut pending: Vec<(Message, EventRecord)> = futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut attempt = 0;
    while !pending.is_empty() {
        attempt += 1;
        let batch = Batch {
            owner: owner.clone(),
            event: event.clone(),
            events: pending.iter().map(|(_, r)| r.clone()).collect(),
        };
        // Claim every event for this Job name before creating it, so a crash after the
        // create is recognised on redelivery however the events are regrouped.
        let name = batch.job_name();
        let claims = pending.iter().map(|(_, record)| {
            ctx.states
                .claim(&namespace, &event, record.id.as_str(), &name)
        });
        let claims = futures::future::join_all(claims).await;
        let mut kept = Vec::with_capacity(pending.len());
        for ((message, record), claim) in std::mem::take(&mut pending).into_iter().zip(claims) {
            match claim {
                Ok(None) => kept.push((message, record)),
                Ok(Some(current)) => {
                    tracing::debug!(id = %record.id, state = ?current.state, "already running or done, acking");
                    ctx.metrics.events_skipped.inc();
                    ack(&message).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot claim the event, dispatching anyway (the Job name deduplicates)");
                    kept.push((message, record));
                }
            }
        }
        pending = kept;
        if pending.is_empty() {
            return;
        }
        let batch = Batch {
            owner: owner.clone(),
            event: event.clone(),
            events: pending.iter().map(|(_, r)| r.clone()).collect(),
        };
        let started = Instant::now();
        let outcome = ctx.backend.dispatch(&batch).await;
        match outcome {
            Ok(dispatched) => {
                ctx.metrics
                    .dispatch_seconds
                    .observe(started.elapsed().as_secs_f64());
                if dispatched.created {
                    ctx.metrics.jobs_created.inc();
                }
                finish(ctx, &batch, std::mem::take(&mut pending), &dispatched).await;
            }
            Err(DispatchError::Taken { job, ids }) => {
                let (inside, outside): (Vec<_>, Vec<_>) = std::mem::take(&mut pending)
                    .into_iter()
                    .partition(|(_, r)| ids.iter().any(|id| id == r.id.as_str()));
                if inside.is_empty() {
                    let reason = format!("job name {job} is taken by a Job with other events");
                    dead_letter(ctx, &batch, outside, &reason).await;
                    return;
                }
                tracing::info!(
                    job,
                    moved = inside.len(),
                    left = outside.len(),
                    "part of the batch is in an existing Job"
                );
                let dispatched = Dispatched {
                    job,
                    created: false,
                };
                finish(ctx, &batch, inside, &dispatched).await;
                pending = outside;
            }
            Err(DispatchError::Retryable {
                reason,
                retry_after,
            }) if attempt < ctx.retry.max_attempts => {
                ctx.metrics.dispatch_retries.inc();
                let delay = ctx.retry.delay(attempt, retry_after);
                tracing::warn!(
                    job = batch.job_name(),
                    attempt,
                    ?delay,
                    reason,
                    "dispatch failed, retrying"
                );
                for (message, _) in &pending {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Draining: hand the events back for the next leader rather than wait.
                        for (message, _) in &pending {
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                        }
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                let reason = format!("dispatch failed after {attempt} attempt(s): {error}");
                dead_letter(ctx, &batch, std::mem::take(&mut pending), &reason).await;
            }
        }
    }
}

async fn ack(message: &Message) {
    if let Err(error) = message.double_ack_with(AckKind::Ack).await {
        // The message comes back; its state record (or the Job name) deduplicates it.
        tracing::warn!(%error, "ack failed; the event will be redelivered and deduplicated");
    }
}

/// Acks the events of a dispatched batch (their `dispatched` state was written by the claim).
async fn finish<B: Backend>(
    ctx: &Dispatcher<B>,
    batch: &Batch,
    events: Vec<(Message, EventRecord)>,
    dispatched: &Dispatched,
) {
    let acks = events.iter().map(|(message, _)| {
        ctx.counters.add(
            batch.namespace(),
            batch.owner_name(),
            EventState::Dispatched,
        );
        ack(message)
    });
    futures::future::join_all(acks).await;
    ctx.metrics.events_dispatched.inc_by(events.len() as u64);
    tracing::debug!(
        job = dispatched.job,
        events = events.len(),
        created = dispatched.created,
        "dispatched"
    );
}

/// Moves events to the dead-letter subject, records why, and acks them. An event whose
/// dead-letter publish fails is not acked (it stays in the stream and comes back).
async fn dead_letter<B: Backend>(
    ctx: &Dispatcher<B>,
    batch: &Batch,
    events: Vec<(Message, EventRecord)>,
    reason: &str,
) {
    tracing::error!(
        job = batch.job_name(),
        events = events.len(),
        reason,
        "dead-lettering events"
    );
    let namespace = batch.namespace();
    for (message, record) in events {
        if !publish_dead_letter(
            ctx,
            namespace,
            &batch.event,
            Some(record.id.as_str()),
            &message,
            reason,
        )
        .await
        {
            continue;
        }
        let mut status = state::status(
            namespace,
            &batch.event,
            record.id.as_str(),
            EventState::DeadLettered,
        );
        status.reason = Some(reason.to_owned());
        match ctx.states.advance(status).await {
            Ok(Advanced::Moved) => {
                ctx.metrics.state_updates.inc();
                ctx.counters
                    .add(namespace, batch.owner_name(), EventState::DeadLettered);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot record the dead-lettered state"),
        }
        ctx.metrics.events_dead_lettered.inc();
        ack(&message).await;
    }
}

async fn dead_letter_raw<B: Backend>(
    ctx: &Dispatcher<B>,
    namespace: &str,
    event: &str,
    message: &Message,
    reason: &str,
) {
    tracing::error!(subject = %message.subject, reason, "dead-lettering an unreadable message");
    if publish_dead_letter(ctx, namespace, event, None, message, reason).await {
        ctx.metrics.events_dead_lettered.inc();
        ack(message).await;
    }
}

async fn publish_dead_letter<B: Backend>(
    ctx: &Dispatcher<B>,
    namespace: &str,
    event: &str,
    id: Option<&str>,
    message: &Message,
    reason: &str,
) -> bool {
    let mut headers = HeaderMap::new();
    if let Some(id) = id {
        headers.insert(HEADER_EVENT_ID, id);
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("dlq-{id}").as_str(),
        );
    }
    // Header values are single lines.
    headers.insert(
        HEADER_DEAD_LETTER_REASON,
        reason.replace(['\r', '\n'], " ").as_str(),
    );
    let subject = dead_letter_subject(namespace, event);
    let published = match ctx
        .js
        .publish_with_headers(subject.clone(), headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match published {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(
                subject,
                error,
                "cannot publish to the dead-letter subject; the event stays in the stream"
            );
            let _ = message
                .ack_with(AckKind::Nak(Some(RESTART_DELAY * 5)))
                .await;
            false
        }
    }
}
