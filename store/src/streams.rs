//! The event streams: one JetStream stream per namespace, `JOBICO-<namespace>`
//! ([`stream_name`]), capturing `jobico.<namespace>.>`.
//!
//! A stream per namespace is what makes the limits per tenant: JetStream enforces each
//! stream's byte and message limits atomically on the server, for every ingress replica at
//! once, and with discard-new a full stream refuses the publish (the client gets 503), so a
//! namespace that fills its stream stops only itself. The sum over namespaces is bounded by the
//! server's own `max_file_store` (set in `deploy/nats.yaml`).
//!
//! The dispatcher owns the streams ([`ensure`]): it creates or updates a namespace's stream
//! when it starts consuming one of its events, so the settings below come from the
//! dispatcher's flags ([`StreamArgs`]). The ingress only publishes to the subjects and reads
//! the streams; until a namespace's stream exists its events are refused with 503, never
//! lost.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use jobico_common::sink::{SINK_STREAM, SINK_SUBJECTS};
use jobico_common::subject::{LEGACY_STREAM, stream_name, stream_subjects};

/// Retention of the event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Retention {
    /// Work queue: a message is removed once the dispatcher acks it, so "full" means "too much
    /// not yet dispatched" (the default).
    Workqueue,
    /// Limits: messages stay until `max_age` or the size limits remove them.
    Limits,
}

/// Settings of every namespace's event stream, applied (create or update) by the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// Most bytes one namespace's stream holds; beyond, its publishes are refused (503).
    pub max_bytes: i64,
    /// Most events one namespace's stream holds; beyond, its publishes are refused (503).
    pub max_messages: i64,
    /// Largest message (one event record) in bytes.
    pub max_message_size: i32,
    /// How long a `Nats-Msg-Id` is remembered for deduplication.
    pub duplicate_window: Duration,
    /// Oldest message kept (zero: no age limit).
    pub max_age: Duration,
    /// Replicas (1 for a single server, 3 for an R3 cluster).
    pub replicas: usize,
    /// Retention policy.
    pub retention: Retention,
}

/// Default bytes per namespace: 256 MiB is hours of one tenant's traffic at typical rates,
/// and four full tenants fit the 1 GiB a single shared stream used to have.
pub const DEFAULT_NAMESPACE_MAX_BYTES: i64 = 256 << 20;

/// Default events per namespace: a million small events, a bound on the per-message overhead
/// (index, subjects) that the byte limit alone does not give.
pub const DEFAULT_NAMESPACE_MAX_MESSAGES: i64 = 1_000_000;

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_NAMESPACE_MAX_BYTES,
            max_messages: DEFAULT_NAMESPACE_MAX_MESSAGES,
            // Bodies are capped at 256 KiB by default; the record adds a few hundred bytes.
            max_message_size: 1 << 20,
            // JetStream's own default.
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            replicas: 1,
            retention: Retention::Workqueue,
        }
    }
}

impl StreamSettings {
    /// The configuration of `namespace`'s stream.
    pub fn config(&self, namespace: &str) -> stream::Config {
        stream::Config {
            name: stream_name(namespace),
            subjects: vec![stream_subjects(namespace)],
            description: Some(format!(
                "Jobico events of namespace {namespace} accepted by the ingress"
            )),
            retention: match self.retention {
                Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
                Retention::Limits => stream::RetentionPolicy::Limits,
            },
            discard: stream::DiscardPolicy::New,
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            max_message_size: self.max_message_size,
            duplicate_window: self.duplicate_window,
            max_age: self.max_age,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }
}

/// The event stream flags of the dispatcher (and `jobico up --nats`).
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Most bytes of undispatched events one namespace may hold; beyond, its requests get 503.
    #[arg(long, env = "JOBICO_NAMESPACE_MAX_BYTES", default_value_t = DEFAULT_NAMESPACE_MAX_BYTES)]
    pub namespace_max_bytes: i64,
    /// Most undispatched events one namespace may hold; beyond, its requests get 503.
    #[arg(long, env = "JOBICO_NAMESPACE_MAX_MESSAGES", default_value_t = DEFAULT_NAMESPACE_MAX_MESSAGES)]
    pub namespace_max_messages: i64,
    /// Largest message (one event) in bytes.
    #[arg(long, env = "JOBICO_STREAM_MAX_MESSAGE_BYTES", default_value_t = StreamSettings::default().max_message_size)]
    pub stream_max_message_bytes: i32,
    /// Seconds a message id is remembered for deduplication.
    #[arg(long, env = "JOBICO_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub duplicate_window_secs: u64,
    /// Oldest message kept, in seconds (0: no limit).
    #[arg(long, env = "JOBICO_STREAM_MAX_AGE_SECS", default_value_t = 0)]
    pub stream_max_age_secs: u64,
    /// Stream and bucket replicas (3 for an R3 cluster).
    #[arg(long, env = "JOBICO_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Stream retention.
    #[arg(long, env = "JOBICO_STREAM_RETENTION", value_enum, default_value_t = Retention::Workqueue)]
    pub stream_retention: Retention,
}

impl StreamArgs {
    /// The settings these flags describe.
    pub fn settings(&self) -> StreamSettings {
        StreamSettings {
            max_bytes: self.namespace_max_bytes,
            max_messages: self.namespace_max_messages,
            max_message_size: self.stream_max_message_bytes,
            duplicate_window: Duration::from_secs(self.duplicate_window_secs),
            max_age: Duration::from_secs(self.stream_max_age_secs),
            replicas: self.stream_replicas,
            retention: self.stream_retention,
        }
    }
}

/// Why an event stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// JetStream refused or failed the request.
    #[error("stream {stream}: {message}")]
    Nats {
        /// The stream.
        stream: String,
        /// What failed.
        message: String,
    },
    /// The single stream of an earlier release still holds events: its subjects overlap every
    /// namespace's stream, and removing it would lose them.
    #[error(
        "stream {LEGACY_STREAM} of an earlier Jobico release still holds {messages} undispatched \
         event(s); its subjects overlap the per-namespace streams. Stop the ingress, let the \
         earlier dispatcher empty it (`nats stream info {LEGACY_STREAM}` shows 0 messages), \
         then start this release (see the README's upgrade note)"
    )]
    LegacyHoldsEvents {
        /// Messages in the old stream.
        messages: u64,
    },
}

/// Reads and creates tried by [`ensure`] before it gives up: a create that loses a race
/// succeeds on the next read, and a server still deleting a stream of the same subjects
/// answers within a few hundred milliseconds.
const ENSURE_ATTEMPTS: u32 = 5;
/// Pause between those attempts.
const ENSURE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Creates `namespace`'s stream, or brings an existing one to `settings` (a restart with new
/// limits applies them). A change JetStream refuses on an existing stream (its retention, its
/// storage) leaves the stream as it is, with a warning: its events keep flowing. Idempotent:
/// every consumer of the namespace calls it when it starts.
pub async fn ensure(
    js: &jetstream::Context,
    namespace: &str,
    settings: &StreamSettings,
) -> Result<stream::Stream, StreamError> {
    ensure_config(js, settings.config(namespace)).await
}

/// The sink outbox ([`SINK_STREAM`]): the CloudEvents not yet delivered, one per event
/// (deduplicated by its id), removed once delivered (work queue). Its limits are one
/// namespace's, so a receiver that is down for hours fills it, and its outcomes are then
/// refused (retried by their executors) rather than crowding out the event streams.
pub fn sink_outbox_config(settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name: SINK_STREAM.to_owned(),
        subjects: vec![SINK_SUBJECTS.to_owned()],
        description: Some("Jobico outcomes waiting for delivery to their sinks".to_owned()),
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        max_bytes: settings.max_bytes,
        max_messages: settings.max_messages,
        max_message_size: settings.max_message_size,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates the sink outbox, or brings it to `settings`, like [`ensure`].
pub async fn ensure_sink_outbox(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, StreamError> {
    ensure_config(js, sink_outbox_config(settings)).await
}

/// Creates the stream `wanted` describes, or brings an existing one to it.
async fn ensure_config(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, StreamError> {
    let name = wanted.name.clone();
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats {
        stream: name.clone(),
        message: e.to_string(),
    };
    let mut attempt = 1;
    let mut existing = loop {
        match js.get_stream(&name).await {
            Ok(stream) => break stream,
            Err(e) if is_not_found(&e) => match js.create_stream(wanted.clone()).await {
                Ok(stream) => return Ok(stream),
                // Another consumer or replica created it first: use theirs (the next read
                // finds it). Or the server refused it for a while (a stream of the same
                // subjects still being deleted): try again, then say why.
                Err(create) if attempt == ENSURE_ATTEMPTS => return Err(nats(&create)),
                Err(create) => {
                    tracing::debug!(stream = name, %create, attempt, "cannot create the event stream yet");
                    tokio::time::sleep(ENSURE_PAUSE).await;
                    attempt += 1;
                }
            },
            Err(e) => return Err(nats(&e)),
        }
    };
    let current = existing.cached_info().config.clone();
    if current == wanted {
        return Ok(existing);
    }
    match js.update_stream(&wanted).await {
        Ok(_) => {
            existing.info().await.map_err(|e| nats(&e))?;
            Ok(existing)
        }
        Err(error) => {
            tracing::warn!(stream = name, %error, "keeping the event stream's settings: JetStream refused the change");
            Ok(existing)
        }
    }
}

/// Removes the single `JOBICO` stream of earlier releases when it is empty (its subjects
/// `jobico.>` would keep every namespace's stream from being created); refuses, with what to
/// do, when it still holds events. Nothing to do when it does not exist.
pub async fn retire_legacy(js: &jetstream::Context) -> Result<(), StreamError> {
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats {
        stream: LEGACY_STREAM.into(),
        message: e.to_string(),
    };
    let mut legacy = match js.get_stream(LEGACY_STREAM).await {
        Ok(stream) => stream,
        Err(e) => {
            return match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(error)
                    if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(())
                }
                _ => Err(nats(&e)),
            };
        }
    };
    let messages = legacy.info().await.map_err(|e| nats(&e))?.state.messages;
    if messages > 0 {
        return Err(StreamError::LegacyHoldsEvents { messages });
    }
    js.delete_stream(LEGACY_STREAM)
        .await
        .map_err(|e| nats(&e))?;
    tracing::info!(
        stream = LEGACY_STREAM,
        "removed the empty event stream of an earlier release"
    );
    Ok(())
}

/// Whether a publish error is a full stream refusing the message (discard-new): the
/// namespace is at its byte or message limit.
pub fn is_full(error: &dyn std::fmt::Display) -> bool {
    let text = error.to_string();
    text.contains("maximum bytes exceeded") || text.contains("maximum messages exceeded")
}

/// Whether a JetStream error says the stream does not exist (code 10059, which the client's
/// request errors carry only in their text).
pub fn is_not_found(error: &dyn std::fmt::Display) -> bool {
    error.to_string().contains("stream not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_follows_the_settings() {
        let settings = StreamSettings {
            replicas: 3,
            retention: Retention::Limits,
            max_messages: 10,
            ..Default::default()
        };
        let config = settings.config("team-a");
        assert_eq!(config.name, "JOBICO-team-a");
        assert_eq!(config.subjects, ["jobico.team-a.>"]);
        assert_eq!(config.num_replicas, 3);
        assert_eq!(config.retention, stream::RetentionPolicy::Limits);
        assert_eq!(config.discard, stream::DiscardPolicy::New);
        assert_eq!(config.max_messages, 10);
        assert_eq!(config.max_bytes, DEFAULT_NAMESPACE_MAX_BYTES);
        assert_eq!(config.duplicate_window, Duration::from_secs(120));
        let default = StreamSettings::default().config("b");
        assert_eq!(default.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(default.storage, stream::StorageType::File);
    }
}
