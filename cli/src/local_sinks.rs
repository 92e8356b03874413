//! Sinks in local mode.
//!
//! With NATS (`jobico up --nats`) outcomes wait in the outbox stream and the dispatcher's
//! deliverer ([`jobico_dispatcher::sinks::run`]) delivers them, as in a cluster. Without it,
//! [`DirectSinks`] delivers each outcome from this process, retrying with the same backoff,
//! and prints every attempt; nothing survives the process, like the in-memory queue.
//!
//! Either way the receiver may be on this machine: local mode allows loopback sinks (the user
//! is the operator), and still refuses link-local and other addresses no sink should reach.

use futures::future::BoxFuture;
use jobico_apiserver::publish::{PublishError, PublishFailure, Published};
use jobico_apiserver::{MemoryQueue, Publisher};
use jobico_common::EventRecord;
use jobico_common::sink::{SinkMessage, SinkStatus};
use jobico_dispatcher::sinks::{SinkClient, SinkPolicy, SinkSettings};

/// The sink policy of local mode: loopback allowed.
pub fn local_policy() -> SinkPolicy {
    SinkPolicy {
        allow_loopback: true,
        denied: Vec::new(),
    }
}

/// Most outcomes being delivered (or waiting out their backoff) at once without NATS: beyond,
/// the executor waits before it takes the next event, so a receiver that is down holds the
/// queue (and clients get `503`) rather than this process's memory.
const MAX_PENDING: usize = 1024;

/// The in-memory queue, delivering outcomes to sinks directly.
#[derive(Debug, Clone)]
pub struct DirectSinks {
    queue: MemoryQueue,
    client: SinkClient,
    settings: SinkSettings,
    pending: std::sync::Arc<tokio::sync::Semaphore>,
}

impl DirectSinks {
    /// Publishes to `queue`, delivers to sinks under `settings`.
    pub fn new(queue: MemoryQueue, settings: SinkSettings) -> Self {
        let client = SinkClient::new(local_policy(), settings.timeout);
        Self {
            queue,
            client,
            settings,
            pending: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING)),
        }
    }
}

impl Publisher for DirectSinks {
    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        self.queue.publish(events)
    }

    fn is_ready(&self) -> bool {
        self.queue.is_ready()
    }

    fn sink<'a>(&'a self, message: &'a SinkMessage) -> BoxFuture<'a, Result<(), PublishError>> {
        let (client, settings, message) =
            (self.client.clone(), self.settings.clone(), message.clone());
        let pending = self.pending.clone();
        Box::pin(async move {
            let permit = pending
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            tokio::spawn(async move {
                let tag = format!(
                    "{}/{} {}",
                    message.namespace, message.event, message.cloud_event.id
                );
                client
                    .deliver_now(&message, &settings, |status| print_attempt(&tag, status))
                    .await;
                drop(permit);
            });
            Ok(())
        })
    }
}

/// One line per delivery attempt, tagged like the event's output.
fn print_attempt(tag: &str, status: &SinkStatus) {
    let SinkStatus {
        url,
        attempts,
        last_error,
        delivered_at,
        gave_up,
    } = status;
    let line = match (delivered_at, last_error) {
        (Some(_), _) => format!("[{tag}] sink: delivered to {url} (attempt {attempts})"),
        (None, Some(error)) if *gave_up => {
            format!("[{tag}] sink: gave up on {url} after {attempts} attempts: {error}")
        }
        (None, error) => format!(
            "[{tag}] sink: attempt {attempts} to {url} failed: {}; retrying",
            error.as_deref().unwrap_or("unknown error")
        ),
    };
    println!("{line}");
}
