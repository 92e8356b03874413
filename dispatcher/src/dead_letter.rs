//! Dead letters: events that can never be dispatched are moved to the `JOBICO_DLQ` stream
//! (subject `jobico-dlq.<namespace>.<event>`, the reason in a header), their state recorded as
//! `dead-lettered`, and only then acked. An event whose dead-letter publish fails is not
//! acked: it stays in the stream and comes back.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, Message};
pub use jobico_common::subject::HEADER_DEAD_LETTER_REASON;
use jobico_common::subject::{
    HEADER_EVENT_ID, dead_letter_message_id, dead_letter_subject, header_text,
};
use jobico_common::{EventRecord, EventState};

use crate::backend::Backend;
use crate::consumer::Dispatcher;
use crate::state::{self, Advanced};

/// The stream holding dead-lettered events (subjects `jobico-dlq.>`), so they are durable.
pub const DEAD_LETTER_STREAM: &str = "JOBICO_DLQ";
/// How long dead-lettered events are kept: two weeks to notice and replay them.
pub const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// How long a message whose dead-letter publish failed waits before it comes back.
const PUBLISH_RETRY: Duration = Duration::from_secs(5);

/// Acks `message`; a failed ack only means a redelivery, which the state record deduplicates.
pub(crate) async fn ack(message: &Message) {
    if let Err(error) = confirmed_ack(message).await {
        tracing::warn!(%error, "ack failed; the event will be redelivered and deduplicated");
    }
}

/// Acks `message` and waits until the server confirms it has the ack (what async-nats's
/// `double_ack` promises), as a request on the client's shared reply subscription: async-nats's
/// own `double_ack` subscribes to a new inbox for every ack and unsubscribes after it, three
/// protocol operations and a subscription of the server's to make and drop per event.
pub async fn confirmed_ack(message: &Message) -> Result<(), async_nats::Error> {
    let reply = message
        .reply
        .clone()
        .ok_or("no reply subject: not a JetStream message")?;
    let ack: bytes::Bytes = AckKind::Ack.into();
    message.context.client().request(reply, ack).await?;
    Ok(())
}

/// Moves `events` of `namespace/event` (declared by resource `owner`) to the dead-letter
/// subject, records why, and acks them.
pub(crate) async fn dead_letter<B: Backend>(
    ctx: &Dispatcher<B>,
    namespace: &str,
    event: &str,
    owner: &str,
    events: Vec<(Message, EventRecord)>,
    reason: &str,
) {
    if events.is_empty() {
        return;
    }
    tracing::error!(events = events.len(), reason, "dead-lettering events");
    for (message, record) in events {
        if !publish(
            ctx,
            namespace,
            event,
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
            event,
            record.id.as_str(),
            EventState::DeadLettered,
        );
        status.reason = Some(reason.to_owned());
        match ctx.states.advance(status).await {
            Ok(Advanced::Moved) => {
                ctx.metrics.state_updates.inc();
                ctx.counters.add(namespace, owner, EventState::DeadLettered);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot record the dead-lettered state"),
        }
        ctx.metrics.events_dead_lettered.inc();
        ack(&message).await;
    }
}

/// Dead-letters a message that is not an event record at all.
pub(crate) async fn dead_letter_raw<B: Backend>(
    ctx: &Dispatcher<B>,
    namespace: &str,
    event: &str,
    message: &Message,
    reason: &str,
) {
    tracing::error!(subject = %message.subject, reason, "dead-lettering an unreadable message");
    if publish(ctx, namespace, event, None, message, reason).await {
        ctx.metrics.events_dead_lettered.inc();
        ack(message).await;
    }
}

/// Publishes `message`'s payload to the dead-letter subject and waits for the ack. On failure
/// the message is handed back for a later attempt and `false` returned.
async fn publish<B: Backend>(
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
            dead_letter_message_id(namespace, event, id).as_str(),
        );
    }
    headers.insert(HEADER_DEAD_LETTER_REASON, header_text(reason).as_str());
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
            let _ = message.ack_with(AckKind::Nak(Some(PUBLISH_RETRY))).await;
            false
        }
    }
}
