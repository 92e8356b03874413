//! The running consumers: one [`crate::consumer::run`] task per declared (namespace, event),
//! started, restarted and stopped as resources are applied and deleted; and the sweeper that
//! dead-letters the backlog of event types no valid resource declares any more
//! ([`ConsumerSet::sweep_orphans`]), so no accepted event waits in the stream for ever.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use jobico_common::EventRecord;
use jobico_common::subject::{parse_stream_name, stream_name};
use jobico_model::Job as JobicoJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::consumer::{Dispatcher, run};
use crate::dead_letter::{dead_letter, dead_letter_raw};

/// How long the backlog of an event type that no valid resource declares may wait before it is
/// dead-lettered: time to fix or re-create the resource, and far more than the controller
/// needs to reconcile every resource after a start.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10 * 60);
/// How often the durable consumers are looked at for orphaned backlogs.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Messages fetched at once while draining an orphaned backlog.
const DRAIN_BATCH: usize = 100;

/// The (namespace, event) a durable consumer name made by [`crate::consumer::consumer_name`]
/// belongs to (event names have no `-`, so the last one separates them).
pub fn parse_consumer_name(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix("jobico-")?;
    let (namespace, event) = rest.rsplit_once('-')?;
    (!namespace.is_empty() && !event.is_empty()).then(|| (namespace.to_owned(), event.to_owned()))
}

struct Running {
    owner: String,
    /// The event as its owner declares it (its routes, for the cycle check).
    spec: jobico_model::EventSpec,
    /// The owner's [`JobicoJob::claim_order`].
    order: (Option<Time>, String),
    fingerprint: String,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// An event a resource declares that an older resource of its namespace already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The event name.
    pub event: String,
    /// The holder, as `namespace/name`.
    pub holder: String,
}

/// The running consumers, one per declared (namespace, event). The controller calls
/// [`ConsumerSet::ensure`] when a resource is applied and [`ConsumerSet::remove`] when it
/// goes; the CLI's local mode can do the same from manifests.
pub struct ConsumerSet<B> {
    ctx: Arc<Dispatcher<B>>,
    shutdown: CancellationToken,
    running: Mutex<HashMap<(String, String), Running>>,
}

impl<B> std::fmt::Debug for ConsumerSet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsumerSet")
    }
}

fn owner_key(owner: &JobicoJob) -> String {
    format!(
        "{}/{}",
        owner.metadata.namespace.as_deref().unwrap_or_default(),
        owner.metadata.name.as_deref().unwrap_or_default()
    )
}

impl<B: Backend> ConsumerSet<B> {
    /// An empty set whose consumers stop when `shutdown` is cancelled.
    pub fn new(ctx: Arc<Dispatcher<B>>, shutdown: CancellationToken) -> Self {
        Self {
            ctx,
            shutdown,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// The shared dispatcher context.
    pub fn context(&self) -> &Arc<Dispatcher<B>> {
        &self.ctx
    }

    /// Runs one consumer per event `owner` declares; restarts those whose declaration
    /// changed; stops those of events it no longer declares. An event whose consumer belongs
    /// to an older resource of the namespace (see [`JobicoJob::claim_order`]) is left to it
    /// and returned as a conflict; a younger holder is replaced.
    pub fn ensure(&self, owner: Arc<JobicoJob>) -> Vec<Conflict> {
        let key = owner_key(&owner);
        let order = owner.claim_order();
        let mut conflicts = Vec::new();
        let namespace = owner.metadata.namespace.clone().unwrap_or_default();
        let mut running = self.running.lock().expect("consumer set lock");
        running.retain(|(_, event), r| {
            let keep = r.owner != key || owner.event(event).is_some();
            if !keep {
                r.token.cancel();
            }
            keep
        });
        for spec in &owner.spec.events {
            let fingerprint = format!(
                "{}:{}:{}",
                owner.metadata.uid.as_deref().unwrap_or_default(),
                serde_json::to_string(spec).expect("spec serialises"),
                serde_json::to_string(&owner.spec.template).expect("template serialises"),
            ) + &serde_json::to_string(&(
                &owner.spec.modules,
                &owner.spec.resources,
                owner.spec.active_deadline_seconds,
                owner.spec.backoff_limit,
                owner.spec.ttl_seconds_after_finished,
            ))
            .expect("spec serialises");
            let slot = (namespace.clone(), spec.name.clone());
            if let Some(current) = running.get(&slot)
                && current.owner != key
                && current.order < order
            {
                conflicts.push(Conflict {
                    event: spec.name.clone(),
                    holder: current.owner.clone(),
                });
                continue;
            }
            if let Some(current) = running.get(&slot)
                && current.fingerprint == fingerprint
                && !current.handle.is_finished()
            {
                continue;
            }
            if let Some(old) = running.remove(&slot) {
                old.token.cancel();
            }
            let token = self.shutdown.child_token();
            let handle = tokio::spawn(run(
                self.ctx.clone(),
                owner.clone(),
                spec.name.clone(),
                token.clone(),
            ));
            running.insert(
                slot,
                Running {
                    owner: key.clone(),
                    spec: spec.clone(),
                    order: order.clone(),
                    fingerprint,
                    token,
                    handle,
                },
            );
        }
        conflicts
    }

    /// The cycles (see [`jobico_model::routes::cycles`]) the routes of the events consumed
    /// in `owner`'s namespace form through one of `owner`'s events: routes of several
    /// resources that, together, lead an event back to itself.
    pub fn route_cycles(&self, owner: &JobicoJob) -> Vec<String> {
        let namespace = owner.metadata.namespace.clone().unwrap_or_default();
        let running = self.running.lock().expect("consumer set lock");
        let specs = running
            .iter()
            .filter(|((ns, _), _)| *ns == namespace)
            .map(|(_, r)| &r.spec);
        jobico_model::routes::cycles(specs)
            .into_iter()
            .filter(|cycle| {
                owner
                    .spec
                    .events
                    .iter()
                    .any(|e| jobico_model::routes::on_cycle(cycle, &e.name))
            })
            .collect()
    }

    /// Stops every consumer of resource `namespace/name`.
    pub fn remove(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.running
            .lock()
            .expect("consumer set lock")
            .retain(|_, r| {
                if r.owner == key {
                    r.token.cancel();
                }
                r.owner != key
            });
    }

    /// The (namespace, event) pairs with a consumer.
    pub fn events(&self) -> Vec<(String, String)> {
        let mut events: Vec<_> = self
            .running
            .lock()
            .expect("consumer set lock")
            .keys()
            .cloned()
            .collect();
        events.sort();
        events
    }

    /// Watches the stream's durable consumers until `shutdown`: the backlog of an event type
    /// with no running consumer (its resource deleted or invalid) for longer than `grace` is
    /// dead-lettered with the reason, and its durable consumer removed.
    pub async fn sweep_orphans(&self, grace: Duration, shutdown: CancellationToken) {
        let mut orphaned_since: HashMap<(String, String), Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_INTERVAL.min(grace)) => {}
            }
            match self.orphans().await {
                Ok(orphans) => {
                    orphaned_since.retain(|slot, _| orphans.contains(slot));
                    for slot in orphans {
                        let since = *orphaned_since
                            .entry(slot.clone())
                            .or_insert_with(Instant::now);
                        if since.elapsed() >= grace {
                            self.drain(&slot, grace, &shutdown).await;
                        }
                    }
                }
                Err(error) => tracing::debug!(error, "cannot list the consumers, sweeping later"),
            }
        }
    }

    /// Event types whose durable consumer has a backlog and no running consumer, over every
    /// namespace's event stream.
    async fn orphans(&self) -> Result<HashSet<(String, String)>, String> {
        let mut names = self.ctx.js.stream_names();
        let mut namespaces = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| e.to_string())?;
            if let Some(namespace) = parse_stream_name(&name) {
                namespaces.push(namespace.to_owned());
            }
        }
        let running: HashSet<_> = self.events().into_iter().collect();
        let mut orphans = HashSet::new();
        for namespace in namespaces {
            let Ok(stream) = self.ctx.js.get_stream(stream_name(&namespace)).await else {
                continue; // removed since it was listed
            };
            let mut infos = stream.consumers();
            while let Some(info) = infos.next().await {
                let info = info.map_err(|e| e.to_string())?;
                let Some(slot) = parse_consumer_name(&info.name) else {
                    continue;
                };
                if slot.0 == namespace
                    && !running.contains(&slot)
                    && (info.num_pending > 0 || info.num_ack_pending > 0)
                {
                    orphans.insert(slot);
                }
            }
        }
        Ok(orphans)
    }

    /// Dead-letters the backlog of `slot`'s durable consumer, then removes the consumer.
    /// Stops early when a resource declares the event again.
    async fn drain(&self, slot: &(String, String), grace: Duration, shutdown: &CancellationToken) {
        let (namespace, event) = slot;
        let name = crate::consumer::consumer_name(namespace, event);
        let reason = format!(
            "event {namespace}/{event} has not been declared by any valid resource for {}s (deleted or invalid)",
            grace.as_secs()
        );
        let Ok(stream) = self.ctx.js.get_stream(stream_name(namespace)).await else {
            return;
        };
        let Ok(consumer) = stream.get_consumer::<pull::Config>(&name).await else {
            return;
        };
        tracing::warn!(
            namespace,
            event,
            "dead-lettering the backlog of an undeclared event"
        );
        loop {
            if shutdown.is_cancelled() || self.events().contains(slot) {
                return;
            }
            let fetched = consumer
                .fetch()
                .max_messages(DRAIN_BATCH)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let Ok(mut messages) = fetched else {
                return;
            };
            let mut seen = 0;
            while let Some(Ok(message)) = messages.next().await {
                seen += 1;
                match serde_json::from_slice::<EventRecord>(&message.payload) {
                    Ok(record) => {
                        dead_letter(
                            &self.ctx,
                            namespace,
                            event,
                            "",
                            vec![(message, record)],
                            &reason,
                        )
                        .await;
                    }
                    Err(error) => {
                        let reason = format!("{reason}; unreadable event message: {error}");
                        dead_letter_raw(&self.ctx, namespace, event, &message, &reason).await;
                    }
                }
            }
            if seen == 0 {
                break;
            }
        }
        if !self.events().contains(slot) {
            let _ = stream.delete_consumer(&name).await;
        }
    }

    /// Stops every consumer and waits for their in-flight batches to finish.
    pub async fn shutdown(&self) {
        let handles: Vec<_> = {
            let mut running = self.running.lock().expect("consumer set lock");
            running
                .drain()
                .map(|(_, r)| {
                    r.token.cancel();
                    r.handle
                })
                .collect()
        };
        for handle in handles {
            let _ = handle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_give_back_namespace_and_event() {
        let name = crate::consumer::consumer_name("team-a", "ev1");
        assert_eq!(
            parse_consumer_name(&name),
            Some(("team-a".into(), "ev1".into()))
        );
        assert_eq!(parse_consumer_name("jobico-x"), None);
        assert_eq!(parse_consumer_name("other-a-b"), None);
    }
}
