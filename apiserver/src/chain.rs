//! Chaining: following an event's `then` routes (and handing the outcome to its `sink`) once
//! its outcome is known.
//!
//! [`Router::follow`] turns one outcome into the events its routes publish, each validated
//! against its target's schema like any request and published through the same
//! [`Publisher`] with an id derived from the parent and the route
//! ([`EventId::routed`]), so a redelivered or re-run parent publishes no second child (the
//! stream's deduplication, then the per-id claim, absorb it). A route that cannot publish (a
//! result that is not JSON or not valid for the target, a target that does not exist) is
//! dead-lettered under the child's id and reported, never dropped. Local mode follows routes
//! in process after each run; in a cluster the executor posts its outcomes (see
//! `http::results`).

use std::collections::BTreeMap;
use std::sync::Arc;

use jobico_common::chain::{dead_letter_data, routed_data};
use jobico_common::sink::{CloudEvent, SinkMessage};
use jobico_common::summary::EventOutcome;
use jobico_common::{EventId, EventLink, EventRecord, EventState, EventStatus, RouteFailure};

use crate::catalog::{Catalog, Lookup};
use crate::http::DEFAULT_MAX_BODY_BYTES;
use crate::message;
use crate::publish::{PublishError, Publisher};

/// What the routes of one outcome did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routed {
    /// The events published (or already there from an earlier attempt).
    pub children: Vec<EventLink>,
    /// The routes that could not publish, each dead-lettered under its child's id.
    pub failures: Vec<RouteFailure>,
    /// The sink URL the outcome was kept for, when the event has a sink.
    pub sink: Option<String>,
}

impl Routed {
    /// Whether no route applied and no sink took the outcome.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty() && self.failures.is_empty() && self.sink.is_none()
    }

    /// Adds the chain to `status`, the parent's record.
    pub fn record_on(&self, status: &mut EventStatus) {
        status.children.clone_from(&self.children);
        status.route_failures.clone_from(&self.failures);
    }
}

/// Follows routes against a catalog, publishing through a publisher.
#[derive(Clone)]
pub struct Router {
    catalog: Arc<Catalog>,
    publisher: Arc<dyn Publisher>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router")
    }
}

impl Router {
    /// A router reading routes and schemas from `catalog`, publishing through `publisher`.
    pub fn new(catalog: Arc<Catalog>, publisher: Arc<dyn Publisher>) -> Self {
        Self { catalog, publisher }
    }

    /// Follows the routes of event `event` of `namespace` that apply to `outcome` (none for a
    /// host failure): publishes each routed event (linked to its parent), dead-letters each
    /// that cannot be, keeps the outcome for the event's sink, and says which. An error means
    /// the publisher could not keep them now: call again (nothing is published or delivered
    /// twice on that account).
    pub async fn follow(
        &self,
        namespace: &str,
        event: &str,
        outcome: &EventOutcome,
    ) -> Result<Routed, PublishError> {
        // A host failure is not the module's outcome: a cluster runs it again, and no route
        // hands on what the host did wrong.
        if outcome.error.is_some_and(|kind| kind.is_host()) {
            return Ok(Routed::default());
        }
        let Lookup::Found(entry) = self.catalog.lookup(namespace, event) else {
            return Ok(Routed::default());
        };
        let parent = EventLink {
            event: event.to_owned(),
            id: outcome.id.clone(),
        };
        let mut routed = Routed::default();
        if let Some(sink) = &entry.spec.sink {
            let message = SinkMessage {
                namespace: namespace.to_owned(),
                event: event.to_owned(),
                url: sink.url.clone(),
                cloud_event: CloudEvent::of_outcome(
                    namespace,
                    &entry.job,
                    event,
                    outcome,
                    jobico_store::now(),
                ),
            };
            self.publisher.sink(&message).await?;
            routed.sink = Some(sink.url.clone());
        }
        let mut records = Vec::new();
        let mut refused = Vec::new();
        for (index, route) in entry.spec.then.iter().enumerate() {
            if !route.when.applies(outcome.succeeded()) {
                continue;
            }
            let id = EventId::routed(namespace, event, &outcome.id, index);
            let admitted = match routed_data(event, outcome) {
                Ok(data) => self.admit(namespace, &route.event, &id, data),
                // What the module wrote is kept with the dead letter, as text.
                Err(reason) => Err((serde_json::json!(outcome.result), reason)),
            };
            match admitted {
                Ok(record) => records.push(record),
                Err((data, reason)) => refused.push((route.event.clone(), id, data, reason)),
            }
        }
        if records.is_empty() && refused.is_empty() {
            return Ok(routed);
        }
        for record in &records {
            routed.children.push(EventLink {
                event: record.event.clone(),
                id: record.id.to_string(),
            });
        }
        // Published first, linked after: a record never names a parent for an event that was
        // not kept. Should the link be lost (a crash in between), the caller follows again.
        let links: Vec<EventStatus> = records
            .iter()
            .map(|r| linked(&r.namespace, &r.event, r.id.as_str(), &parent))
            .collect();
        if !records.is_empty() {
            self.publisher
                .publish(records)
                .await
                .map_err(|failure| failure.error)?;
        }
        for link in &links {
            self.publisher.link(link).await?;
        }
        for (target, id, data, reason) in refused {
            let reason = format!("route to {target:?} refused: {reason}");
            let record = EventRecord {
                id: id.clone(),
                namespace: namespace.to_owned(),
                event: target.clone(),
                data: dead_letter_data(data),
                attributes: BTreeMap::new(),
            };
            let mut dead = linked(namespace, &target, id.as_str(), &parent);
            dead.state = EventState::DeadLettered;
            dead.reason = Some(reason.clone());
            self.publisher.dead_letter(&record, &dead).await?;
            routed.failures.push(RouteFailure {
                event: target,
                id: id.to_string(),
                reason,
            });
        }
        Ok(routed)
    }

    /// The record route target `target` gets for `data`, or the data and why not.
    fn admit(
        &self,
        namespace: &str,
        target: &str,
        id: &EventId,
        data: serde_json::Value,
    ) -> Result<EventRecord, (serde_json::Value, String)> {
        let entry = match self.catalog.lookup(namespace, target) {
            Lookup::Found(entry) => entry,
            _ => {
                return Err((
                    data,
                    format!("namespace {namespace} declares no event {target:?}"),
                ));
            }
        };
        let schema = match &entry.schema {
            Ok(schema) => schema,
            Err(reason) => return Err((data, format!("the event is unavailable: {reason}"))),
        };
        let size = serde_json::to_vec(&data).map_or(0, |bytes| bytes.len());
        if size > DEFAULT_MAX_BODY_BYTES {
            return Err((
                data,
                format!(
                    "the data is {size} bytes, more than the {DEFAULT_MAX_BODY_BYTES} an event may have"
                ),
            ));
        }
        let violations = schema.violations(0, &data);
        if !violations.is_empty() {
            let listed: Vec<String> = violations
                .iter()
                .map(|v| {
                    format!(
                        "{} ({}): {}",
                        pointer(&v.instance_path),
                        v.keyword,
                        v.message
                    )
                })
                .collect();
            return Err((
                data,
                format!("the data is invalid for its schema: {}", listed.join("; ")),
            ));
        }
        let record = EventRecord {
            id: id.clone(),
            namespace: namespace.to_owned(),
            event: target.to_owned(),
            data,
            attributes: BTreeMap::new(),
        };
        match message::check(&record) {
            Ok(()) => Ok(record),
            Err(error) => Err((record.data, error.to_string())),
        }
    }
}

fn pointer(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

/// An `accepted` record of `namespace/event/id` naming `parent`: what links a child.
fn linked(namespace: &str, event: &str, id: &str, parent: &EventLink) -> EventStatus {
    let mut status = jobico_store::status(namespace, event, id, EventState::Accepted);
    status.parent = Some(parent.clone());
    status
}
