//! The running consumers: one [`crate::consumer::run`] task per declared (namespace, event),
//! started, restarted and stopped as resources are applied and deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jobico_model::Job as JobicoJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::consumer::{Dispatcher, run};

struct Running {
    owner: String,
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
                    order: order.clone(),
                    fingerprint,
                    token,
                    handle,
                },
            );
        }
        conflicts
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
