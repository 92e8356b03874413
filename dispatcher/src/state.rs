//! Event state records in the NATS KV bucket the ingress reads (`jobico-events`).
//!
//! States only move forward: accepted → dispatched → running → succeeded | failed |
//! dead-lettered. [`StateStore::advance`] writes with the entry's revision as a precondition
//! and never moves a record backwards, so replays (a redelivered message, a relisted watch, two
//! writers racing) are harmless.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use jobico_common::subject::{STATE_BUCKET, state_key};
use jobico_common::{EventState, EventStatus};

/// How long state records are kept when the dispatcher creates the bucket (the ingress
/// normally does): a week, well beyond any Job's TTL.
const STATE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Attempts of a compare-and-set write before giving up; more than two writers never race.
const CAS_ATTEMPTS: usize = 4;

/// Why a state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("event state {key}: {message}")]
pub struct StateError {
    /// The KV key.
    pub key: String,
    /// What failed.
    pub message: String,
}

/// Order of states; a record is only replaced by one of a higher rank.
pub fn rank(state: EventState) -> u8 {
    match state {
        EventState::Accepted => 0,
        EventState::Dispatched => 1,
        EventState::Running => 2,
        EventState::Succeeded | EventState::Failed | EventState::DeadLettered => 3,
    }
}

/// The current time in RFC 3339.
pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// A new record for `state` with no details.
pub fn status(namespace: &str, event: &str, id: &str, state: EventState) -> EventStatus {
    EventStatus::new(namespace, event, id, state, now())
}

/// What [`StateStore::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advanced {
    /// The record moved to the new state.
    Moved,
    /// The record kept its (final) state and gained the summary it lacked.
    Amended,
    /// The record was already at the same or a later state; nothing written.
    Skipped,
}

/// The state bucket.
#[derive(Clone)]
pub struct StateStore {
    kv: kv::Store,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateStore")
    }
}

impl StateStore {
    /// Opens the bucket, creating it when the ingress has not yet.
    pub async fn open(js: &jetstream::Context) -> Result<Self, StateError> {
        let error = |e: &dyn std::fmt::Display| StateError {
            key: STATE_BUCKET.into(),
            message: e.to_string(),
        };
        let kv = match js.get_key_value(STATE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: STATE_BUCKET.into(),
                    // As the ingress creates it: a few states per event for debugging.
                    history: 8,
                    max_age: STATE_MAX_AGE,
                    ..Default::default()
                })
                .await
                .map_err(|e| error(&e))?,
        };
        Ok(Self { kv })
    }

    /// The record of event `id` in `namespace`, if any.
    pub async fn get(&self, namespace: &str, id: &str) -> Result<Option<EventStatus>, StateError> {
        let key = state_key(namespace, id);
        let entry = self.kv.entry(key.clone()).await.map_err(|e| StateError {
            key: key.clone(),
            message: e.to_string(),
        })?;
        Ok(entry.and_then(|e| parse(&key, &e.value)))
    }

    /// Writes `next` unless the stored record is already at the same or a later state.
    /// Returns what happened. Fields `next` leaves empty keep their stored values
    /// (so `running` keeps the Job name written with `dispatched`).
    pub async fn advance(&self, mut next: EventStatus) -> Result<Advanced, StateError> {
        let key = state_key(&next.namespace, &next.id);
        let fail = |message: String| StateError {
            key: key.clone(),
            message,
        };
        for _ in 0..CAS_ATTEMPTS {
            let entry = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| fail(e.to_string()))?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| parse(&key, &e.value));
            if let Some(current) = &current {
                // A final state may still gain the summary it was written without (a Job's
                // completion seen before its pod's termination message).
                let adds_summary = current.state == next.state
                    && current.summary.is_none()
                    && next.summary.is_some();
                if rank(current.state) >= rank(next.state) && !adds_summary {
                    return Ok(Advanced::Skipped);
                }
                next.job = next.job.or_else(|| current.job.clone());
            }
            let outcome = match &current {
                Some(current) if current.state == next.state => Advanced::Amended,
                _ => Advanced::Moved,
            };
            match self.write_at(&key, entry.as_ref(), &next).await {
                Ok(()) => return Ok(outcome),
                // Someone wrote in between: read again and decide again.
                Err(message) => tracing::debug!(key, message, "state write raced, retrying"),
            }
        }
        Err(fail(format!(
            "gave up after {CAS_ATTEMPTS} conflicting writes"
        )))
    }
}

impl StateStore {
    /// Writes `next` only if the record is still as read: an update at `read`'s revision, or a
    /// create when there was no record. An error means someone wrote in between (or NATS failed).
    async fn write_at(
        &self,
        key: &str,
        read: Option<&kv::Entry>,
        next: &EventStatus,
    ) -> Result<(), String> {
        let body = serde_json::to_vec(next).expect("status serialises");
        match read {
            Some(entry) => self
                .kv
                .update(key, body.into(), entry.revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => self
                .kv
                .create(key, body.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    /// Claims event `id` for Job `job` before the Job is created: writes `dispatched` with the
    /// Job name unless the record is already `running` or later. A `dispatched` record naming
    /// another Job is overwritten (the caller has checked that Job does not hold the event).
    /// Returns `Ok(None)` when claimed, or the record that prevented it.
    pub async fn claim(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
        job: &str,
    ) -> Result<Option<EventStatus>, StateError> {
        let key = state_key(namespace, id);
        let fail = |message: String| StateError {
            key: key.clone(),
            message,
        };
        for _ in 0..CAS_ATTEMPTS {
            let entry = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| fail(e.to_string()))?;
            let current = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| parse(&key, &e.value));
            if let Some(current) = &current {
                if rank(current.state) > rank(EventState::Dispatched) {
                    return Ok(Some(current.clone()));
                }
                if current.state == EventState::Dispatched && current.job.as_deref() == Some(job) {
                    return Ok(None);
                }
            }
            let mut next = status(namespace, event, id, EventState::Dispatched);
            next.job = Some(job.to_owned());
            match self.write_at(&key, entry.as_ref(), &next).await {
                Ok(()) => return Ok(None),
                Err(message) => tracing::debug!(key, message, "state claim raced, retrying"),
            }
        }
        Err(fail(format!(
            "gave up after {CAS_ATTEMPTS} conflicting writes"
        )))
    }
}

fn parse(key: &str, value: &[u8]) -> Option<EventStatus> {
    match serde_json::from_slice(value) {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::warn!(key, %error, "unreadable event state record, overwriting it");
            None
        }
    }
}

/// Counts of state transitions per resource (`namespace`, `name`) not yet written to its
/// status; the controller folds them into `status.dispatched/succeeded/failed`.
#[derive(Debug, Clone, Default)]
pub struct Counters(Arc<Mutex<HashMap<(String, String), Deltas>>>);

/// Transitions counted for one resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deltas {
    /// Events newly dispatched.
    pub dispatched: u64,
    /// Events newly succeeded.
    pub succeeded: u64,
    /// Events newly failed or dead-lettered.
    pub failed: u64,
}

impl Counters {
    /// Counts one transition of an event of resource `namespace/owner` into `state`.
    pub fn add(&self, namespace: &str, owner: &str, state: EventState) {
        let mut map = self.0.lock().expect("counters lock");
        let deltas = map
            .entry((namespace.to_owned(), owner.to_owned()))
            .or_default();
        match state {
            EventState::Dispatched => deltas.dispatched += 1,
            EventState::Succeeded => deltas.succeeded += 1,
            EventState::Failed | EventState::DeadLettered => deltas.failed += 1,
            EventState::Accepted | EventState::Running => {}
        }
    }

    /// Takes every pending count, leaving none.
    pub fn take(&self) -> HashMap<(String, String), Deltas> {
        std::mem::take(&mut *self.0.lock().expect("counters lock"))
    }

    /// Puts back counts that could not be written.
    pub fn restore(&self, key: (String, String), deltas: Deltas) {
        let mut map = self.0.lock().expect("counters lock");
        let entry = map.entry(key).or_default();
        entry.dispatched += deltas.dispatched;
        entry.succeeded += deltas.succeeded;
        entry.failed += deltas.failed;
    }
}
