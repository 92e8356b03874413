//! The dispatcher backend of durable local mode (`jobico up --nats URL`): a batch runs through
//! the already-compiled wasm-exec modules on this machine instead of becoming a Kubernetes Job.
//!
//! [`LocalBackend::dispatch`] returns only once the batch's events have run and their final
//! states are recorded, so the consumer acks a message only after its run: execution is
//! at least once, and a crash mid-run runs the event again after the ack wait.
//!
//! While an event runs its record stays `dispatched` (the consumer's claim, naming the run). No
//! `running` record is written: the consumer acks a redelivered event whose record is `running`
//! or later without running it, so a `running` record left by a process killed mid-run would
//! lose the event. Instead the claim is checked against the runs in flight in this process
//! ([`LocalBackend::holds`]): a redelivery of an event still running here is handed back for
//! later, and one whose run died with an earlier process runs again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobico_common::{EventRecord, EventState};
use jobico_dispatcher::backend::{Backend, Batch, DispatchError, Dispatched};
use jobico_dispatcher::state::{self, StateStore};
use tokio::sync::Semaphore;
use wasm_exec::EventOutcome;

use crate::local_exec::Modules;

/// How long the consumer is told to wait before retrying a batch whose state could not be
/// recorded: NATS is reconnecting, which takes about a second.
const STATE_RETRY: Duration = Duration::from_secs(1);

/// Runs batches locally; see the module documentation.
pub struct LocalBackend {
    modules: Arc<Modules>,
    states: StateStore,
    /// Events run at once across all event types.
    permits: Arc<Semaphore>,
    /// `(namespace, run, id)` of the events dispatched to this process and not yet finished.
    in_flight: InFlightSet,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("permits", &self.permits.available_permits())
            .finish()
    }
}

/// The (namespace, Job, event id) of the events being run.
type InFlightSet = Arc<Mutex<HashSet<(String, String, String)>>>;

/// Marks a batch's events as in flight for as long as it lives.
struct InFlight {
    set: InFlightSet,
    keys: Vec<(String, String, String)>,
}

impl InFlight {
    fn enter(set: &InFlightSet, batch: &Batch) -> Self {
        let job = batch.job_name();
        let keys: Vec<_> = batch
            .ids()
            .into_iter()
            .map(|id| (batch.namespace().to_owned(), job.clone(), id.to_owned()))
            .collect();
        set.lock()
            .expect("in-flight lock")
            .extend(keys.iter().cloned());
        Self {
            set: set.clone(),
            keys,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut set = self.set.lock().expect("in-flight lock");
        for key in &self.keys {
            set.remove(key);
        }
    }
}

impl LocalBackend {
    /// A backend running at most `parallelism` events at once (at least one), recording
    /// states in `states`.
    pub fn new(modules: Arc<Modules>, states: StateStore, parallelism: usize) -> Self {
        Self {
            modules,
            states,
            permits: Arc::new(Semaphore::new(parallelism.max(1))),
            in_flight: Arc::default(),
        }
    }

    /// Records each event's final state, with wasm-exec's outcome as the summary.
    async fn record(
        &self,
        batch: &Batch,
        outcomes: &[(EventRecord, EventOutcome)],
    ) -> Result<(), DispatchError> {
        for (record, outcome) in outcomes {
            self.states
                .advance(final_status(batch, record, outcome))
                .await
                // Not acked: the batch runs again once NATS answers (at least once).
                .map_err(|error| DispatchError::Retryable {
                    reason: format!("ran, but cannot record the state: {error}"),
                    retry_after: Some(STATE_RETRY),
                })?;
        }
        Ok(())
    }
}

/// The `succeeded` or `failed` record of one event, as the cluster's state tracker writes it:
/// the executor's exit code for this event, its outcome object, and why it failed.
fn final_status(
    batch: &Batch,
    record: &EventRecord,
    outcome: &EventOutcome,
) -> jobico_common::EventStatus {
    let state = if outcome.succeeded() {
        EventState::Succeeded
    } else {
        EventState::Failed
    };
    let mut status = state::status(batch.namespace(), &batch.event, record.id.as_str(), state);
    status.exit_code = Some(i32::from(wasm_exec::exit_code(std::slice::from_ref(
        outcome,
    ))));
    status.summary = Some(serde_json::to_value(outcome).expect("an outcome serialises"));
    if !outcome.succeeded() {
        status.reason = outcome
            .message
            .clone()
            .or_else(|| outcome.error.map(|k| k.as_str().to_owned()));
    }
    status
}

impl Backend for LocalBackend {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        let job = batch.job_name();
        if !self.modules.contains(batch.namespace(), &batch.event) {
            return Err(DispatchError::Permanent {
                reason: format!(
                    "no module for {}/{}: it could not be loaded at start",
                    batch.namespace(),
                    batch.event
                ),
            });
        }
        let _in_flight = InFlight::enter(&self.in_flight, batch);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let modules = self.modules.clone();
        let events = batch.events.clone();
        let outcomes = tokio::task::spawn_blocking(move || {
            let outcomes: Vec<_> = events
                .into_iter()
                .filter_map(|record| modules.run(&record).map(|outcome| (record, outcome)))
                .collect();
            drop(permit);
            outcomes
        })
        .await
        .map_err(|error| DispatchError::Permanent {
            reason: format!("the executor of {job} failed: {error}"),
        })?;
        self.record(batch, &outcomes).await?;
        Ok(Dispatched { job, created: true })
    }

    /// Whether the run claimed in an event's record still holds it. Only a run in this process
    /// can: one named by a record from an earlier process died with it (run the event again).
    /// A redelivery of an event still running here (its run outlasted the ack wait) is handed
    /// back for later rather than acked, so nothing is acked before its run ends.
    async fn holds(&self, namespace: &str, job: &str, id: &str) -> Result<bool, DispatchError> {
        let running = self.in_flight.lock().expect("in-flight lock").contains(&(
            namespace.to_owned(),
            job.to_owned(),
            id.to_owned(),
        ));
        if running {
            return Err(DispatchError::Retryable {
                reason: format!("event {id} is still running in {job}"),
                retry_after: None,
            });
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jobico_common::EventId;
    use wasm_exec::{ErrorKind, Status};

    use super::*;

    fn outcome(status: Status, error: Option<ErrorKind>, message: Option<&str>) -> EventOutcome {
        EventOutcome {
            id: "e".into(),
            status,
            exit_code: None,
            error,
            message: message.map(str::to_owned),
            duration: Duration::from_millis(3),
            output_bytes: 0,
            output_truncated: false,
            result: None,
        }
    }

    #[test]
    fn final_states_follow_the_outcome_and_the_exit_code_contract() {
        let owner: jobico_model::Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "jobico.coeux.dev/v1", "kind": "Job",
            "metadata": {"name": "j", "namespace": "team"},
            "spec": {"events": [{"name": "ev1", "wasm": "m.wasm", "schema": {"key": "s"}}]}
        }))
        .unwrap();
        let record = EventRecord {
            id: EventId::generate(),
            namespace: "team".into(),
            event: "ev1".into(),
            data: serde_json::json!({}),
            attributes: Default::default(),
        };
        let batch = Batch {
            owner: Arc::new(owner),
            event: "ev1".into(),
            events: vec![record.clone()],
        };
        let cases = [
            (
                outcome(Status::Succeeded, None, None),
                EventState::Succeeded,
                0,
                None,
            ),
            (
                outcome(Status::Failed, Some(ErrorKind::Trap), Some("unreachable")),
                EventState::Failed,
                1,
                Some("unreachable"),
            ),
            (
                outcome(Status::Failed, Some(ErrorKind::Deadline), None),
                EventState::Failed,
                1,
                Some("deadline"),
            ),
            (
                outcome(Status::Failed, Some(ErrorKind::Host), Some("no dir")),
                EventState::Failed,
                2,
                Some("no dir"),
            ),
        ];
        for (outcome, state, exit_code, reason) in cases {
            let status = final_status(&batch, &record, &outcome);
            assert_eq!(
                (status.state, status.exit_code, status.reason.as_deref()),
                (state, Some(exit_code), reason),
                "{outcome:?}"
            );
            assert_eq!(
                (status.namespace.as_str(), status.event.as_str(), status.id),
                ("team", "ev1", record.id.to_string())
            );
            assert_eq!(
                status.summary,
                Some(serde_json::to_value(&outcome).unwrap())
            );
        }
    }
}
