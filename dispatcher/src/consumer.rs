//! JetStream consumers: one durable pull consumer per (namespace, event), pulling events and
//! grouping them into batches; each batch goes through the claim → create → ack protocol of
//! [`crate::dispatch`]. Pulling stops while the event type is at its `concurrency` cap or a
//! batch is failing transiently (the [`Gate`]).
//!
//! Entry points: [`Dispatcher::connect`] (state bucket, dead letters), [`run`] (one event type until
//! cancelled) and [`crate::consumers::ConsumerSet`] (one task per declared event, as resources
//! come and go).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer::pull, stream};
use futures::StreamExt;
use jobico_common::subject::{DEAD_LETTER_PREFIX, event_filter};
use jobico_model::Job as JobicoJob;
use jobico_store::StreamSettings;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::Backend;
use crate::dead_letter::DEAD_LETTER_MAX_AGE;
pub use crate::dead_letter::{DEAD_LETTER_STREAM, HEADER_DEAD_LETTER_REASON};
use crate::dispatch::{Gate, process};
use crate::metrics::Metrics;
use crate::state::{BucketSettings, Counters, StateStore};
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
/// How often to look at the active-Job count while at the concurrency cap.
const CAP_POLL: Duration = Duration::from_millis(200);
/// Pause before re-creating a consumer whose message stream failed.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Consecutive pull errors (missed heartbeats, server restarts) before the consumer is
/// re-created; single errors are normal and recovered by the client or by [`Pull::recover`].
const MAX_PULL_ERRORS: u32 = 10;

/// Idle heartbeat asked of the server for each pull request it holds.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a pull request waits at the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// A consumer's message stream that cannot stall.
///
/// async-nats counts the messages its pull requests are still owed and asks for more only when
/// that count runs low. The count can run ahead of the server's: a message answering a request
/// can reach the client before the client has counted the request, so the message is not
/// subtracted from it (with one message per request, as a concurrency cap of 1 pulls, the
/// client then believes one is still owed). It sends no further request while the server holds
/// none, and nothing arrives until the request's expiry, 35 s later. The server sends idle
/// heartbeats only for requests it holds, so missing heartbeats mean exactly that state:
/// [`Pull::recover`] replaces the stream by a fresh one, with a fresh count and a new request.
struct Pull {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    prefetch: usize,
    stream: pull::Stream,
}

impl Pull {
    async fn open(
        consumer: jetstream::consumer::Consumer<pull::Config>,
        prefetch: usize,
    ) -> Result<Self, jetstream::consumer::StreamError> {
        let stream = Self::stream(&consumer, prefetch).await?;
        Ok(Self {
            consumer,
            prefetch,
            stream,
        })
    }

    async fn stream(
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        prefetch: usize,
    ) -> Result<pull::Stream, jetstream::consumer::StreamError> {
        consumer
            .stream()
            .max_messages_per_batch(prefetch)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
    }

    /// The next message, or the stream's error. Cancel-safe.
    async fn next(&mut self) -> Option<Result<Message, pull::MessagesError>> {
        self.stream.next().await
    }

    /// Answers an error of [`Pull::next`]: after missed heartbeats, pulls with a fresh stream
    /// (see the type). Messages the old stream had in hand and not yet handed out are
    /// delivered again after their ack wait.
    async fn recover(&mut self, error: &pull::MessagesError) {
        if error.kind() != pull::MessagesErrorKind::MissingHeartbeat {
            return;
        }
        match Self::stream(&self.consumer, self.prefetch).await {
            Ok(stream) => {
                tracing::info!("no heartbeat from the server's pull requests: pulling afresh");
                self.stream = stream;
            }
            Err(error) => tracing::debug!(%error, "cannot pull afresh yet"),
        }
    }
}

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

/// Backoff between dispatch attempts after transient failures. There is no attempt limit:
/// a transient failure lasts as long as the outage, and the events wait in hand meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay after the first failure; doubled after each further one.
    pub base: Duration,
    /// Longest delay between attempts (a server's `Retry-After` may exceed it).
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // 0.2, 0.4, ... then every 10 s: an API back after an outage is used within 10 s.
        Self {
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
    /// The settings of the namespaces' event streams, applied when a consumer starts.
    pub streams: StreamSettings,
}

impl<B> std::fmt::Debug for Dispatcher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("retry", &self.retry)
            .finish()
    }
}

impl<B: Backend> Dispatcher<B> {
    /// Opens the state bucket and the dead-letter stream (creating them if missing); event
    /// streams get the default settings.
    pub async fn connect(
        js: jetstream::Context,
        backend: B,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Result<Arc<Self>, ConsumerError> {
        Self::connect_with(
            js,
            backend,
            metrics,
            retry,
            ACK_WAIT,
            StreamSettings::default(),
        )
        .await
    }

    /// [`Dispatcher::connect`] with another ack wait (tests use a short one to see
    /// redeliveries quickly) and the event streams' settings.
    pub async fn connect_with(
        js: jetstream::Context,
        backend: B,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
        ack_wait: Duration,
        streams: StreamSettings,
    ) -> Result<Arc<Self>, ConsumerError> {
        let bucket = BucketSettings {
            replicas: streams.replicas,
            ..BucketSettings::default()
        };
        let states = StateStore::open(&js, &bucket)
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
            streams,
        }))
    }
}

/// The durable consumer name of an event type: `jobico-<namespace>-<event>` (event names have
/// no `-`, so the name is unambiguous).
pub fn consumer_name(namespace: &str, event: &str) -> String {
    format!("jobico-{namespace}-{event}")
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
    let jobico_model::EffectiveBatch {
        max_events,
        max_wait,
        max_bytes,
    } = spec.effective_batch();
    let cap = spec.concurrency.map(|c| c as usize);

    // The namespace's stream, created (or brought to the current limits) by its first
    // consumer; the ingress refuses the namespace's events with 503 until it exists.
    let stream = jobico_store::streams::ensure(&ctx.js, &namespace, &ctx.streams)
        .await
        .map_err(|e| ConsumerError::Nats {
            what: format!("setting up the event stream of {namespace}"),
            message: e.to_string(),
        })?;
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
    let mut messages = Pull::open(consumer, prefetch)
        .await
        .map_err(|e| nats(format!("pulling from {name}"))(&e))?;
    tracing::debug!(consumer = name, max_events, "consuming");

    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    let gate = Gate::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Signalled (to every waiter, keeping no permit) when a batch finishes: a consumer at its
    // cap pulls again at once rather than at the next poll (the poll stays for Jobs the backend
    // sees finish), and a batch gathering events while others are dispatched (adaptive
    // batching) goes. Each waiter arms its wait before reading the state it waits on, so a
    // batch finishing in between still wakes it, and none wakes for a completion it did not
    // wait for.
    let completed = Arc::new(tokio::sync::Notify::new());
    // Stream sequences of the messages this consumer holds. A redelivery of one of them (its
    // ack wait passed during a NATS outage, with the first copy still in the client's buffer
    // or being dispatched) is dropped rather than dispatched beside it: the first copy's ack
    // settles both.
    let in_hand: Arc<std::sync::Mutex<HashSet<u64>>> = Arc::default();
    let take = |message: &Message| -> bool {
        match message.info() {
            Ok(info) => in_hand
                .lock()
                .expect("in-hand lock")
                .insert(info.stream_sequence),
            Err(_) => true,
        }
    };
    let mut tasks = JoinSet::new();
    let mut carry: Option<Message> = None;
    let mut pull_errors = 0;
    let result = 'pull: loop {
        while tasks.try_join_next().is_some() {}
        if let Some(cap) = cap {
            loop {
                let completion = completed.notified();
                tokio::pin!(completion);
                completion.as_mut().enable();
                if ctx.backend.active(&namespace, event)
                    + in_flight.load(std::sync::atomic::Ordering::Relaxed)
                    < cap
                {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull Ok(()),
                    _ = &mut completion => {}
                    _ = tokio::time::sleep(CAP_POLL) => {}
                }
            }
        }
        // A batch failing transiently holds the gate closed: pull nothing more until it
        // gets through.
        if !gate.is_open() {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = gate.wait_open() => {}
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
                    Some(Ok(message)) if !take(&message) => {
                        pull_errors = 0;
                        continue;
                    }
                    Some(Ok(message)) => {
                        pull_errors = 0;
                        message
                    }
                    Some(Err(error)) => {
                        pull_errors += 1;
                        tracing::debug!(%error, pull_errors, "pull error");
                        messages.recover(&error).await;
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
            // Messages already here always join (biased: they are looked at first). With
            // `maxWaitMillis: 0` (adaptive) the batch waits for no timer: it goes as soon as
            // nothing more is here, unless another batch of this consumer is being dispatched,
            // in which case it gathers until that one finishes (a create round trip) or it is
            // full. So a lone event goes at once and a burst packs itself into full batches.
            let completion = completed.notified();
            tokio::pin!(completion);
            completion.as_mut().enable();
            let gathering =
                max_wait.is_zero() && in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0;
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = messages.next() => next,
                _ = &mut completion, if gathering => break,
                _ = std::future::ready(()), if max_wait.is_zero() && !gathering => break,
                _ = tokio::time::sleep_until(deadline), if !max_wait.is_zero() => break,
            };
            match next {
                Some(Ok(message)) if !take(&message) => {}
                Some(Ok(message)) if bytes + message.payload.len() > max_bytes => {
                    carry = Some(message);
                    break;
                }
                Some(Ok(message)) => {
                    bytes += message.payload.len();
                    batch.push(message);
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "pull error");
                    messages.recover(&error).await;
                }
                None => break,
            }
        }
        let ctx = ctx.clone();
        let owner = owner.clone();
        let event = event.to_owned();
        let shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        let completed = completed.clone();
        let sequences: Vec<u64> = batch
            .iter()
            .filter_map(|m| m.info().ok().map(|i| i.stream_sequence))
            .collect();
        let in_hand = in_hand.clone();
        let gate = gate.clone();
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(
            async move {
                process(&ctx, owner, event, batch, &gate, &shutdown).await;
                let mut held = in_hand.lock().expect("in-hand lock");
                for sequence in sequences {
                    held.remove(&sequence);
                }
                drop(held);
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                completed.notify_waiters();
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
