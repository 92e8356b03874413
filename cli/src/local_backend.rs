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

use jobico_apiserver::chain::{Routed, Router};
use jobico_common::EventStatus;
use jobico_common::summary::{self, FinalState, RunSummary};
use jobico_dispatcher::backend::{Backend, Batch, DispatchError, Dispatched};
use jobico_dispatcher::state::{self, StateStore};
use tokio::sync::Semaphore;
use wasm_exec::EventOutcome;

use crate::local_exec::{Modules, follow_routes};

/// Pause between attempts to record a state NATS did not take: it is reconnecting, which
/// takes about a second.
const STATE_RETRY: Duration = Duration::from_secs(1);

/// An event run here: (namespace, run name, event id).
type RunKey = (String, String, String);

/// Runs batches locally; see the module documentation.
pub struct LocalBackend {
    modules: Arc<Modules>,
    states: StateStore,
    /// Events run at once across all event types.
    permits: Arc<Semaphore>,
    /// `(namespace, run, id)` of the events dispatched to this process and not yet finished.
    in_flight: Arc<Mutex<HashSet<RunKey>>>,
    /// Follows the routes of each outcome before its state is recorded.
    router: Router,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("permits", &self.permits.available_permits())
            .finish()
    }
}

/// Marks a batch's events as in flight for as long as it lives.
struct InFlight {
    set: Arc<Mutex<HashSet<RunKey>>>,
    keys: Vec<RunKey>,
}

impl InFlight {
    fn enter(set: &Arc<Mutex<HashSet<RunKey>>>, batch: &Batch) -> Self {
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
    pub fn new(
        modules: Arc<Modules>,
        states: StateStore,
        parallelism: usize,
        router: Router,
    ) -> Self {
        Self {
            modules,
            states,
            permits: Arc::new(Semaphore::new(parallelism.max(1))),
            in_flight: Arc::default(),
            router,
        }
    }

    /// Follows the routes of each outcome (see [`Router::follow`]), trying again while NATS
    /// does not take them.
    async fn route(&self, batch: &Batch, outcomes: &[EventOutcome]) -> Vec<Routed> {
        let mut all = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            let event = (batch.namespace(), batch.event.as_str());
            all.push(follow_routes(&self.router, event, outcome, STATE_RETRY).await);
        }
        all
    }

    /// Records each event's final state, decided as the cluster's tracker decides it: from
    /// the batch's exit code and the termination message a pod would have written.
    ///
    /// A write that fails (NATS is away) is retried here until it succeeds: the events have
    /// run, and handing the batch back would run them a second time. Meanwhile the batch stays
    /// in flight, so a redelivery of its messages is handed back rather than run.
    async fn record(&self, batch: &Batch, outcomes: &[EventOutcome], routed: &[Routed]) {
        for status in final_statuses(batch, outcomes, routed) {
            let mut warned = false;
            while let Err(error) = self.states.advance(status.clone()).await {
                if !warned {
                    tracing::warn!(id = %status.id, %error, "ran, but cannot record the state yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(STATE_RETRY).await;
            }
        }
    }
}

/// The `succeeded` or `failed` record of each event that ran, through
/// [`summary::final_states`] like the cluster's tracker: the run's exit code, the event's
/// outcome as the termination message kept it, and why it failed; with the events its routes
/// published (`routed`, one per outcome).
fn final_statuses(batch: &Batch, outcomes: &[EventOutcome], routed: &[Routed]) -> Vec<EventStatus> {
    let run = RunSummary::new(outcomes);
    let exit_code = run.exit_code();
    let message = run.termination_message().to_json();
    let ids: Vec<&str> = outcomes.iter().map(|o| o.id.as_str()).collect();
    summary::final_states(&ids, Some(exit_code), Some(&message))
        .into_iter()
        .zip(outcomes)
        .zip(routed.iter().map(Some).chain(std::iter::repeat(None)))
        .map(|((decided, outcome), routed)| {
            // Every event that ran is in the message's states (a batch has at most 100); the
            // outcome itself is the fallback should that ever not hold.
            let decided = decided.unwrap_or_else(|| FinalState {
                status: outcome.status,
                error: outcome.error,
                outcome: Some(outcome.clone()),
            });
            let mut status = state::status(
                batch.namespace(),
                &batch.event,
                &outcome.id,
                decided.state(),
            );
            status.exit_code = Some(exit_code);
            status.reason = decided.reason();
            status.summary = decided
                .outcome
                .map(|o| serde_json::to_value(o).expect("an outcome serialises"));
            if let Some(routed) = routed {
                routed.record_on(&mut status);
            }
            status
        })
        .collect()
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
                .filter_map(|record| modules.run(&record))
                .collect();
            drop(permit);
            outcomes
        })
        .await
        .map_err(|error| DispatchError::Permanent {
            reason: format!("the executor of {job} failed: {error}"),
        })?;
        let routed = self.route(batch, &outcomes).await;
        self.record(batch, &outcomes, &routed).await;
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

    use jobico_common::state::exit;
    use jobico_common::{EventId, EventRecord, EventState};
    use wasm_exec::{ErrorKind, Status};

    use super::*;

    fn outcome(id: &str, error: Option<ErrorKind>, message: Option<&str>) -> EventOutcome {
        EventOutcome {
            id: id.into(),
            status: if error.is_some() {
                Status::Failed
            } else {
                Status::Succeeded
            },
            exit_code: None,
            error,
            message: message.map(str::to_owned),
            warning: None,
            duration: Duration::from_millis(3),
            output_bytes: 0,
            output_truncated: false,
            result: None,
        }
    }

    fn batch(ids: &[&str]) -> Batch {
        let owner: jobico_model::Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "jobico.coeux.dev/v1", "kind": "Job",
            "metadata": {"name": "j", "namespace": "team"},
            "spec": {"events": [{"name": "ev1", "wasm": "m.wasm", "schema": {"key": "s"}}]}
        }))
        .unwrap();
        Batch {
            owner: Arc::new(owner),
            event: "ev1".into(),
            events: ids
                .iter()
                .map(|id| EventRecord {
                    id: EventId::parse(*id).unwrap(),
                    namespace: "team".into(),
                    event: "ev1".into(),
                    data: serde_json::json!({}),
                    attributes: Default::default(),
                })
                .collect(),
        }
    }

    #[test]
    fn final_states_follow_the_outcome_and_the_run_exit_code() {
        let cases = [
            (None, None, EventState::Succeeded, exit::OK, None),
            (
                Some(ErrorKind::Trap),
                Some("unreachable"),
                EventState::Failed,
                exit::GUEST_FAILED,
                Some("unreachable"),
            ),
            (
                Some(ErrorKind::Deadline),
                None,
                EventState::Failed,
                exit::GUEST_FAILED,
                Some("deadline"),
            ),
            (
                Some(ErrorKind::Host),
                Some("no dir"),
                EventState::Failed,
                exit::HOST_ERROR,
                Some("no dir"),
            ),
        ];
        for (error, message, state, exit_code, reason) in cases {
            let outcome = outcome("e1", error, message);
            let statuses = final_statuses(&batch(&["e1"]), std::slice::from_ref(&outcome), &[]);
            let status = &statuses[0];
            assert_eq!(
                (status.state, status.exit_code, status.reason.as_deref()),
                (state, Some(exit_code), reason),
                "{outcome:?}"
            );
            assert_eq!(
                (
                    status.namespace.as_str(),
                    status.event.as_str(),
                    status.id.as_str()
                ),
                ("team", "ev1", "e1")
            );
            assert_eq!(
                status.summary,
                Some(serde_json::to_value(&outcome).unwrap())
            );
        }
    }

    #[test]
    fn a_hundred_event_batch_with_one_failure_leaves_ninety_nine_succeeded() {
        // 63-character ids and long failure messages: the termination message is cut.
        let ids: Vec<String> = (0..100)
            .map(|i| format!("{i:03}-{}", "i".repeat(59)))
            .collect();
        let outcomes: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut outcome = outcome(id, (i == 42).then_some(ErrorKind::Trap), None);
                outcome.result = Some("r".repeat(200));
                outcome
            })
            .collect();
        let names: Vec<&str> = ids.iter().map(String::as_str).collect();
        let statuses = final_statuses(&batch(&names), &outcomes, &[]);
        let succeeded = statuses
            .iter()
            .filter(|s| s.state == EventState::Succeeded)
            .count();
        assert_eq!(succeeded, 99);
        assert_eq!(statuses[42].state, EventState::Failed);
        assert_eq!(statuses[42].reason.as_deref(), Some("trap"));
        assert!(
            statuses
                .iter()
                .all(|s| s.exit_code == Some(exit::GUEST_FAILED))
        );
    }
}
