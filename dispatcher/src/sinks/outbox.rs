//! The outbox consumer: pulls the outcomes kept in [`SINK_STREAM`], gives each namespace its
//! share of the deliveries in flight, POSTs, records every attempt, and acks, retries later or
//! gives up.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use jobico_common::sink::{HEADER_SINK_URL, SINK_STREAM};
use jobico_common::subject::{HEADER_EVENT, HEADER_EVENT_ID, HEADER_NAMESPACE};
use jobico_store::{StateStore, StreamSettings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{SinkClient, SinkSettings, attempt_record};

/// The outbox's durable consumer.
pub const SINK_CONSUMER: &str = "jobico-sinks";

/// Most outcomes handed out and not yet acked: those being POSTed and those waiting out their
/// backoff.
const MAX_PENDING: i64 = 100_000;

/// Delivers the outbox until `shutdown`: ensures the stream and its consumer, then POSTs each
/// outcome, recording every attempt in the state bucket. Returns once the deliveries in
/// flight have ended.
pub async fn run(
    js: jetstream::Context,
    states: StateStore,
    client: SinkClient,
    settings: SinkSettings,
    streams: StreamSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = jobico_store::streams::ensure_sink_outbox(&js, &streams).await?;
    let consumer = stream
        .get_or_create_consumer(
            SINK_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(SINK_CONSUMER.to_owned()),
                description: Some("Jobico's sink deliveries".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                // Longer than one POST plus the wait for a slot, so a delivery is not handed
                // out twice while it is worked on.
                ack_wait: settings.timeout * 3,
                // An outcome waiting out its backoff (a nak with a delay) stays pending, so
                // this bounds the outcomes in backoff at once, not the POSTs in flight: a
                // receiver that is down must not hold up everyone else's deliveries.
                max_ack_pending: MAX_PENDING,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating the consumer of {SINK_STREAM}: {e}"))?;
    // Pulled no faster than they are worked on: a message waits for a slot at most one POST.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(settings.concurrency.max(1))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("pulling from {SINK_STREAM}: {e}"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1)));
    let busy = Busy::default();
    let mut in_flight = JoinSet::new();
    tracing::info!(stream = SINK_STREAM, "delivering outcomes to sinks");
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::warn!(%error, "pulling from the sink outbox");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => break,
        };
        let Some(outgoing) = Outgoing::of(&message) else {
            tracing::error!(subject = %message.subject, "an outbox message without its headers: dropped");
            let _ = message.ack_with(AckKind::Term).await;
            continue;
        };
        // One namespace's receivers (down, slow, hanging) hold at most its share of the
        // slots: its other outcomes wait in the outbox, not in front of everyone else's.
        let Some(share) = busy.enter(&outgoing.namespace, settings.per_namespace) else {
            let _ = message.ack_with(AckKind::Nak(Some(FAIR_SHARE_WAIT))).await;
            continue;
        };
        let (states, client, settings) = (states.clone(), client.clone(), settings.clone());
        in_flight.spawn(async move {
            deliver(&states, &client, &settings, &outgoing, message).await;
            drop((share, slot));
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

/// Deliveries in flight per namespace.
#[derive(Debug, Clone, Default)]
struct Busy(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One namespace's place among the deliveries in flight, given back when dropped.
struct Share {
    busy: Busy,
    namespace: String,
}

impl Busy {
    /// A place for `namespace`, unless it already has `most` deliveries in flight.
    fn enter(&self, namespace: &str, most: usize) -> Option<Share> {
        let mut busy = self.0.lock().expect("busy lock");
        let count = busy.entry(namespace.to_owned()).or_default();
        if *count >= most.max(1) {
            return None;
        }
        *count += 1;
        Some(Share {
            busy: self.clone(),
            namespace: namespace.to_owned(),
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut busy = self.busy.0.lock().expect("busy lock");
        if let Some(count) = busy.get_mut(&self.namespace) {
            *count -= 1;
            if *count == 0 {
                busy.remove(&self.namespace);
            }
        }
    }
}

/// What an outbox message says: whose outcome, going where.
struct Outgoing {
    namespace: String,
    event: String,
    id: String,
    url: String,
}

impl Outgoing {
    fn of(message: &jetstream::Message) -> Option<Self> {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Some(Self {
            namespace: header(HEADER_NAMESPACE)?,
            event: header(HEADER_EVENT)?,
            id: header(HEADER_EVENT_ID)?,
            url: header(HEADER_SINK_URL)?,
        })
    }
}

/// How long an outcome beyond its namespace's share goes back to the outbox: short, so one
/// tenant's burst drains at the pace of its receiver (its share is busy only while POSTs are
/// in flight), long enough that a tenant's backlog behind a hanging receiver is handed out
/// about once a second, not in a loop.
const FAIR_SHARE_WAIT: Duration = Duration::from_secs(1);

/// One delivery attempt of one outbox message, recorded, then acked, retried later or given
/// up. The attempts are counted in the event's record (JetStream's delivery count also counts
/// the waits for the namespace's share); a record that says it was delivered (an ack lost
/// after the POST) is acked without posting again.
async fn deliver(
    states: &StateStore,
    client: &SinkClient,
    settings: &SinkSettings,
    outgoing: &Outgoing,
    message: jetstream::Message,
) {
    let Outgoing {
        namespace,
        event,
        id,
        url,
    } = outgoing;
    let (recorded, unreadable) = match states.get(namespace, event, id).await {
        Ok(record) => (record.and_then(|r| r.sink).filter(|s| s.url == *url), false),
        Err(error) => {
            tracing::warn!(namespace, event, id, %error, "cannot read the sink record");
            (None, true)
        }
    };
    if recorded
        .as_ref()
        .is_some_and(|s| s.delivered_at.is_some() || s.gave_up)
    {
        let _ = message.ack_with(AckKind::Ack).await;
        return;
    }
    let handed_out = message
        .info()
        .map_or(1, |info| info.delivered.max(1) as u64);
    let attempts = recorded.map_or(0, |s| s.attempts).saturating_add(1);
    let posted = client.post(url, message.payload.clone()).await;
    // Without a readable record JetStream's count stands in (it counts the waits for the
    // namespace's share too: it gives up sooner, never not at all).
    let out_of_attempts = attempts >= settings.max_attempts
        || (unreadable && handed_out >= u64::from(settings.max_attempts));
    let status = attempt_record(url, attempts, posted, out_of_attempts);
    let error = status.last_error.as_deref();
    let ack = if status.delivered_at.is_some() {
        tracing::debug!(namespace, event, id, url, attempts, "outcome delivered");
        AckKind::Ack
    } else if status.gave_up {
        tracing::warn!(
            namespace,
            event,
            id,
            url,
            attempts,
            error,
            "outcome not delivered: giving up"
        );
        AckKind::Term
    } else {
        let wait = settings.backoff(attempts);
        tracing::info!(
            namespace,
            event,
            id,
            url,
            attempts,
            error,
            ?wait,
            "outcome not delivered yet"
        );
        AckKind::Nak(Some(wait))
    };
    // The record is best effort: the delivery, not its record, is what the outbox keeps.
    if let Err(error) = states.record_sink(namespace, event, id, &status).await {
        tracing::warn!(namespace, event, id, %error, "cannot record the sink delivery");
    }
    if let Err(error) = message.ack_with(ack).await {
        tracing::warn!(namespace, event, id, %error, "cannot acknowledge the sink delivery");
    }
}
