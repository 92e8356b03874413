//! Event state records in the NATS KV bucket `jobico-events`, written and read the same way by
//! the ingress (status reads), the dispatcher (claims and outcomes) and local mode.
//!
//! An event is identified by (namespace, event, id): its record lives under
//! [`state_key`]`(namespace, event, id)`. States only move forward: accepted / held →
//! dispatched → running → succeeded | failed | dead-lettered. Every write is a compare-and-set
//! on the revision that was read ([`StateStore::advance`], [`StateStore::claim`]), so replays (a
//! redelivered message, a relisted watch, two writers racing) never move a record backwards
//! and never overwrite a claim they did not see.
//!
//! How every component connects to NATS (credentials, TLS) is [`auth`]; the per-namespace
//! event streams are [`streams`].

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use jobico_common::sink::SinkStatus;
use jobico_common::subject::{STATE_BUCKET, state_key, state_key_filter};
use jobico_common::{EventState, EventStatus};

pub mod auth;
pub mod modules;
pub mod streams;

pub use auth::{NatsAuth, NatsAuthArgs, NatsAuthError, Servers};
pub use modules::{ModuleStore, ModuleStoreError};
pub use streams::{Retention, StreamArgs, StreamError, StreamSettings};

/// Attempts of a compare-and-set write before giving up; more than two writers rarely race.
const CAS_ATTEMPTS: usize = 4;

/// Why a state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("event state {key}: {message}")]
pub struct StateError {
    /// The KV key (or the bucket name).
    pub key: String,
    /// What failed.
    pub message: String,
}

/// How the bucket is created when it does not exist yet (an existing bucket is used as it is).
#[derive(Debug, Clone)]
pub struct BucketSettings {
    /// How long records are kept (zero: forever).
    pub max_age: Duration,
    /// Replicas (1 for a single server, 3 for an R3 cluster).
    pub replicas: usize,
}

impl Default for BucketSettings {
    fn default() -> Self {
        Self {
            // A week: long after the Kubernetes Job and its logs are gone.
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// Order of states; a record is only replaced by one of a higher rank.
pub fn rank(state: EventState) -> u8 {
    match state {
        EventState::Accepted | EventState::Held => 0,
        EventState::Dispatched => 1,
        EventState::Running => 2,
        EventState::Succeeded | EventState::Failed | EventState::DeadLettered => 3,
    }
}

/// The current time in RFC 3339.
pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// A new record for `state` with no details, recorded now.
pub fn status(namespace: &str, event: &str, id: &str, state: EventState) -> EventStatus {
    EventStatus::new(namespace, event, id, state, now())
}

/// How long ago `status` was recorded (zero when its time is unreadable or in the future).
pub fn age(status: &EventStatus) -> Duration {
    status
        .updated_at
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|at| {
            let nanos = jiff::Timestamp::now().as_nanosecond() - at.as_nanosecond();
            u64::try_from(nanos).ok().map(Duration::from_nanos)
        })
        .unwrap_or_default()
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

/// What [`StateStore::claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The record now says `dispatched` to the claiming Job (at this revision).
    Claimed {
        /// The record's revision after the claim.
        revision: u64,
    },
    /// The event is running or finished: nothing to dispatch.
    Done(EventStatus),
    /// Another Job's claim: the caller must find out whether that Job holds the event (or may
    /// still be created) before [`StateStore::take_over`].
    Elsewhere {
        /// The record naming the other Job.
        current: EventStatus,
        /// Its revision, the precondition of a take-over.
        revision: u64,
    },
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
    /// Opens the bucket, creating it with `settings` when it does not exist.
    pub async fn open(
        js: &jetstream::Context,
        settings: &BucketSettings,
    ) -> Result<Self, StateError> {
        let error = |e: &dyn std::fmt::Display| StateError {
            key: STATE_BUCKET.into(),
            message: e.to_string(),
        };
        let kv = match js.get_key_value(STATE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: STATE_BUCKET.into(),
                    description: "Jobico event states".into(),
                    // A few states per event (accepted .. succeeded) for debugging.
                    history: 8,
                    max_age: settings.max_age,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| error(&e))?,
        };
        Ok(Self { kv })
    }

    /// The record of event `id` of type `event` in `namespace`, if any.
    pub async fn get(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
    ) -> Result<Option<EventStatus>, StateError> {
        let key = state_key(namespace, event, id);
        Ok(self.read(&key).await?.1)
    }

    /// The event types of `namespace` that have a record for `id` (sorted), found by the
    /// bucket's subject index without reading the records.
    pub async fn events_with(&self, namespace: &str, id: &str) -> Result<Vec<String>, StateError> {
        let filter = format!("{}{}", self.kv.prefix, state_key_filter(namespace, id));
        let fail = |e: &dyn std::fmt::Display| StateError {
            key: filter.clone(),
            message: e.to_string(),
        };
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| fail(&e))?
            .try_collect()
            .await
            .map_err(|e| fail(&e))?;
        let prefix = format!("{}{namespace}.", self.kv.prefix);
        let mut events: Vec<String> = subjects
            .into_iter()
            .filter_map(|(subject, _)| {
                let rest = subject.strip_prefix(&prefix)?;
                rest.split_once('.').map(|(event, _)| event.to_owned())
            })
            .collect();
        events.sort();
        events.dedup();
        Ok(events)
    }

    /// Writes `next` unless the stored record is already at the same or a later state.
    /// Returns what happened. Fields `next` leaves empty keep their stored values
    /// (so `running` keeps the Job name written with `dispatched`).
    pub async fn advance(&self, mut next: EventStatus) -> Result<Advanced, StateError> {
        let key = state_key(&next.namespace, &next.event, &next.id);
        for _ in 0..CAS_ATTEMPTS {
            let (entry, current) = self.read(&key).await?;
            if let Some(current) = &current {
                // A final state may still gain the summary it was written without (a Job's
                // completion seen before its pod's termination message).
                let adds_summary = current.state == next.state
                    && current.summary.is_none()
                    && next.summary.is_some();
                // A held record may change its reason.
                let new_reason = current.state == EventState::Held
                    && next.state == EventState::Held
                    && current.reason != next.reason;
                // An accepted record may become held (same rank, news for the reader).
                let held_now =
                    current.state == EventState::Accepted && next.state == EventState::Held;
                // A final state may still gain the chain it was written without (local
                // mode records the children with the outcome, whichever write came first).
                let adds_links = current.state == next.state && adds_links(current, &next);
                if rank(current.state) >= rank(next.state)
                    && !adds_summary
                    && !new_reason
                    && !held_now
                    && !adds_links
                {
                    return Ok(Advanced::Skipped);
                }
                next.inherit(current);
            }
            let outcome = match &current {
                Some(current) if current.state == next.state => Advanced::Amended,
                _ => Advanced::Moved,
            };
            match self.write_at(&key, entry.as_ref(), &next).await {
                Ok(_) => return Ok(outcome),
                // Someone wrote in between: read again and decide again.
                Err(WriteError::Raced(message)) => {
                    tracing::debug!(key, message, "state write raced, retrying")
                }
                Err(WriteError::Failed(message)) => return Err(StateError { key, message }),
            }
        }
        Err(StateError {
            key,
            message: format!("gave up after {CAS_ATTEMPTS} conflicting writes"),
        })
    }

    /// Claims event `id` for Job `job` before the Job is created: writes `dispatched` with the
    /// Job name when the record is absent, `accepted` or `held`. Never overwrites a claim
    /// naming another Job ([`Claim::Elsewhere`]) or a later state ([`Claim::Done`]).
    pub async fn claim(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
        job: &str,
    ) -> Result<Claim, StateError> {
        let key = state_key(namespace, event, id);
        // An event's first claim finds no record (its `accepted` state is the stream message):
        // a create, one round trip, settles it without reading first. A record that exists
        // makes the create fail, and the read-decide-write loop below takes over.
        let mut next = status(namespace, event, id, EventState::Dispatched);
        next.job = Some(job.to_owned());
        match self.write_at(&key, None, &next).await {
            Ok(revision) => return Ok(Claim::Claimed { revision }),
            Err(WriteError::Raced(_)) => {}
            Err(WriteError::Failed(message)) => return Err(StateError { key, message }),
        }
        for _ in 0..CAS_ATTEMPTS {
            let (entry, current) = self.read(&key).await?;
            if let Some(current) = &current {
                // The chain recorded before the claim (a routed event's parent) stays.
                next.inherit(current);
            }
            if let (Some(current), Some(entry)) = (&current, &entry) {
                if rank(current.state) > rank(EventState::Dispatched) {
                    return Ok(Claim::Done(current.clone()));
                }
                if current.state == EventState::Dispatched {
                    return Ok(if current.job.as_deref() == Some(job) {
                        Claim::Claimed {
                            revision: entry.revision,
                        }
                    } else {
                        Claim::Elsewhere {
                            current: current.clone(),
                            revision: entry.revision,
                        }
                    });
                }
            }
            match self.write_at(&key, entry.as_ref(), &next).await {
                Ok(revision) => return Ok(Claim::Claimed { revision }),
                Err(WriteError::Raced(message)) => {
                    tracing::debug!(key, message, "state claim raced, retrying")
                }
                Err(WriteError::Failed(message)) => return Err(StateError { key, message }),
            }
        }
        Err(StateError {
            key,
            message: format!("gave up after {CAS_ATTEMPTS} conflicting writes"),
        })
    }

    /// Replaces the claim `current` read at `revision` (see [`Claim::Elsewhere`], or one's own
    /// claim for a Job name that will not be used) by a claim for `job`, keeping its chain.
    /// When the record changed since, nothing is written and the answer is what
    /// [`StateStore::claim`] finds now.
    pub async fn take_over(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
        job: &str,
        (current, revision): (&EventStatus, u64),
    ) -> Result<Claim, StateError> {
        let key = state_key(namespace, event, id);
        let mut next = status(namespace, event, id, EventState::Dispatched);
        next.job = Some(job.to_owned());
        next.inherit(current);
        let body = serde_json::to_vec(&next).expect("a status serialises");
        match self.kv.update(&key, body.into(), revision).await {
            Ok(revision) => Ok(Claim::Claimed { revision }),
            Err(_) => self.claim(namespace, event, id, job).await,
        }
    }

    /// Adds the chain `links` names (its `parent`, `children`, `route_failures`) to the record
    /// of `links`' event, keeping its state; creates an `accepted` record with them when there
    /// is none yet (a routed event written before its claim). Returns whether it wrote.
    pub async fn link(&self, links: &EventStatus) -> Result<bool, StateError> {
        self.amend(&links.namespace, &links.event, &links.id, |current| {
            let mut next = match current {
                Some(current) if !adds_links(current, links) => return None,
                Some(current) => current.clone(),
                None => status(
                    &links.namespace,
                    &links.event,
                    &links.id,
                    EventState::Accepted,
                ),
            };
            next.inherit(links);
            Some(next)
        })
        .await
    }

    /// Records `sink`, how delivering event `id`'s outcome to its sink went, on its record,
    /// keeping the state, unless the record already says more (a later attempt, delivered);
    /// creates an `accepted` record when there is none yet. Returns whether it wrote.
    pub async fn record_sink(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
        sink: &SinkStatus,
    ) -> Result<bool, StateError> {
        self.amend(namespace, event, id, |current| {
            let mut next = match current {
                Some(current) => {
                    if current.sink.as_ref().is_some_and(|s| !sink.supersedes(s)) {
                        return None;
                    }
                    current.clone()
                }
                None => status(namespace, event, id, EventState::Accepted),
            };
            next.sink = Some(sink.clone());
            Some(next)
        })
        .await
    }

    /// Writes `change(current)` over event `id`'s record, keeping whatever else was written
    /// in between (read again and decided again on a race); `None` from `change` writes
    /// nothing. Returns whether it wrote.
    async fn amend(
        &self,
        namespace: &str,
        event: &str,
        id: &str,
        change: impl Fn(Option<&EventStatus>) -> Option<EventStatus>,
    ) -> Result<bool, StateError> {
        let key = state_key(namespace, event, id);
        for _ in 0..CAS_ATTEMPTS {
            let (entry, current) = self.read(&key).await?;
            let Some(next) = change(current.as_ref()) else {
                return Ok(false);
            };
            match self.write_at(&key, entry.as_ref(), &next).await {
                Ok(_) => return Ok(true),
                Err(WriteError::Raced(message)) => {
                    tracing::debug!(key, message, "state amendment raced, retrying")
                }
                Err(WriteError::Failed(message)) => return Err(StateError { key, message }),
            }
        }
        Err(StateError {
            key,
            message: format!("gave up after {CAS_ATTEMPTS} conflicting writes"),
        })
    }

    /// The entry under `key` (a deleted or purged key counts as absent) and its record.
    async fn read(
        &self,
        key: &str,
    ) -> Result<(Option<kv::Entry>, Option<EventStatus>), StateError> {
        let entry = self.kv.entry(key).await.map_err(|e| StateError {
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        let current = entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| parse(key, &e.value));
        Ok((entry, current))
    }

    /// Writes `next` only if the record is still as read: an update at `read`'s revision, or a
    /// create when there was no record. Returns the new revision.
    async fn write_at(
        &self,
        key: &str,
        read: Option<&kv::Entry>,
        next: &EventStatus,
    ) -> Result<u64, WriteError> {
        let body = serde_json::to_vec(next).expect("a status serialises");
        match read {
            Some(entry) => self
                .kv
                .update(key, body.into(), entry.revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => WriteError::Raced(e.to_string()),
                    _ => WriteError::Failed(e.to_string()),
                }),
            None => self
                .kv
                .create(key, body.into())
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => WriteError::Raced(e.to_string()),
                    _ => WriteError::Failed(e.to_string()),
                }),
        }
    }
}

/// Whether `next` names a parent, child or route failure `current` does not.
fn adds_links(current: &EventStatus, next: &EventStatus) -> bool {
    (current.parent.is_none() && next.parent.is_some())
        || next.children.iter().any(|c| !current.children.contains(c))
        || next
            .route_failures
            .iter()
            .any(|f| !current.route_failures.iter().any(|c| c.id == f.id))
}

/// Why a conditional write did not happen.
enum WriteError {
    /// Someone wrote in between: read again and decide again.
    Raced(String),
    /// NATS failed (no stream leader during an election, a timeout): tried again by the
    /// caller, later, rather than at once.
    Failed(String),
}

/// A stored record, or `None` (logged) when it is unreadable: it is then overwritten.
fn parse(key: &str, value: &[u8]) -> Option<EventStatus> {
    match serde_json::from_slice(value) {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::warn!(key, %error, "unreadable event state record");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_order_the_states_and_ages_read_the_time() {
        assert!(rank(EventState::Held) < rank(EventState::Dispatched));
        assert_eq!(rank(EventState::Held), rank(EventState::Accepted));
        assert!(rank(EventState::Running) < rank(EventState::Failed));
        let old = EventStatus::new(
            "n",
            "e",
            "i",
            EventState::Accepted,
            "2020-01-01T00:00:00Z".into(),
        );
        assert!(age(&old) > Duration::from_secs(3600));
        let fresh = status("n", "e", "i", EventState::Accepted);
        assert!(age(&fresh) < Duration::from_secs(60));
        let unreadable = EventStatus::new("n", "e", "i", EventState::Accepted, "nope".into());
        assert_eq!(age(&unreadable), Duration::ZERO);
    }
}
