//! Event states, as recorded in the NATS KV bucket [`crate::subject::STATE_BUCKET`] under
//! [`crate::subject::state_key`]. `accepted` is the stored message itself; the dispatcher
//! (or local mode) writes the rest.
//! `GET /events/{namespace}/{id}` returns the record as JSON.

use serde::{Deserialize, Serialize};

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventState {
    /// Kept in the stream; not yet handed to an executor.
    Accepted,
    /// Kept in the stream because its resource cannot run it yet (a missing module, an
    /// invalid template); `reason` says why. It runs once the cause is fixed.
    Held,
    /// A Kubernetes Job (or the local executor) has it.
    Dispatched,
    /// Its pod is running.
    Running,
    /// The module ran and succeeded.
    Succeeded,
    /// The module ran and failed, or the Job failed.
    Failed,
    /// Dispatch failed too often; the event was moved to the dead-letter subject.
    DeadLettered,
}

impl EventState {
    /// Whether no later state can follow.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::DeadLettered)
    }
}

/// The record kept for each event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventStatus {
    /// The event id.
    pub id: String,
    /// Namespace.
    pub namespace: String,
    /// Event name.
    pub event: String,
    /// Current state.
    pub state: EventState,
    /// When the state was recorded (RFC 3339).
    pub updated_at: String,
    /// The Kubernetes Job running the event, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Exit code of the executor, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The executor's per-event summary (wasm-exec's JSON), once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
    /// Why the event failed or was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The event whose outcome a route turned into this one (chaining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<EventLink>,
    /// The events this one's routes published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<EventLink>,
    /// This event's routes that could not publish their event, and why (the event was
    /// dead-lettered under its id instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_failures: Vec<RouteFailure>,
    /// Delivering the outcome to the event's sink, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<crate::sink::SinkStatus>,
}

/// An event of the same namespace, named by type and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLink {
    /// Event name.
    pub event: String,
    /// Event id.
    pub id: String,
}

/// A route whose event could not be published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFailure {
    /// The target event.
    pub event: String,
    /// The id the routed event has (its dead-lettered record is under it).
    pub id: String,
    /// Why it was refused (not JSON, invalid for the target's schema, no such event).
    pub reason: String,
}

impl EventStatus {
    /// A record of `state` recorded at `updated_at` (RFC 3339), with no details yet.
    pub fn new(
        namespace: &str,
        event: &str,
        id: &str,
        state: EventState,
        updated_at: String,
    ) -> Self {
        Self {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            event: event.to_owned(),
            state,
            updated_at,
            job: None,
            exit_code: None,
            summary: None,
            reason: None,
            parent: None,
            children: Vec::new(),
            route_failures: Vec::new(),
            sink: None,
        }
    }

    /// Takes from `stored` what this newer record of the same event leaves empty: the Job
    /// that ran it, the chain around it and its sink delivery, so no state written later
    /// loses them.
    pub fn inherit(&mut self, stored: &EventStatus) {
        if self.job.is_none() {
            self.job.clone_from(&stored.job);
        }
        if self.parent.is_none() {
            self.parent.clone_from(&stored.parent);
        }
        for child in &stored.children {
            if !self.children.contains(child) {
                self.children.push(child.clone());
            }
        }
        for failure in &stored.route_failures {
            if !self.route_failures.iter().any(|f| f.id == failure.id) {
                self.route_failures.push(failure.clone());
            }
        }
        match (&self.sink, &stored.sink) {
            (None, Some(_)) => self.sink.clone_from(&stored.sink),
            (Some(mine), Some(theirs)) if theirs.supersedes(mine) => {
                self.sink = Some(theirs.clone());
            }
            _ => {}
        }
    }
}

/// The executor's exit-code contract (`wasm-exec`), which the dispatcher's pod failure policy
/// relies on.
pub mod exit {
    /// Every event succeeded.
    pub const OK: i32 = 0;
    /// At least one event failed in the guest (trap, limit, non-zero exit or error code).
    /// Running the pod again would fail the same way, so Jobs fail at once on this code.
    pub const GUEST_FAILED: i32 = 1;
    /// The host failed (bad configuration, unreadable module or events): worth a retry.
    pub const HOST_ERROR: i32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialise_in_kebab_case_and_records_omit_empty_fields() {
        assert_eq!(
            serde_json::to_string(&EventState::DeadLettered).unwrap(),
            "\"dead-lettered\""
        );
        let status = EventStatus {
            id: "e1".into(),
            namespace: "default".into(),
            event: "ev1".into(),
            state: EventState::Accepted,
            updated_at: "2026-11-22T00:00:00Z".into(),
            job: None,
            exit_code: None,
            summary: None,
            reason: None,
            parent: None,
            children: vec![],
            route_failures: vec![],
            sink: None,
        };
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(
            text,
            r#"{"id":"e1","namespace":"default","event":"ev1","state":"accepted","updatedAt":"2026-11-22T00:00:00Z"}"#
        );
        assert_eq!(serde_json::from_str::<EventStatus>(&text).unwrap(), status);
        assert!(EventState::Failed.is_final() && !EventState::Running.is_final());
    }
}
