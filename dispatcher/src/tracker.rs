//! Event states from the cluster: watches the dispatcher's Jobs and pods and records
//! running → succeeded/failed (with the exit code and wasm-exec's per-event summary from the
//! pod's termination message) in the state bucket, keeps the active-Job counts for
//! concurrency caps, and counts transitions for the resources' status.

use futures::{StreamExt, TryStreamExt};
use jobico_common::{EventState, EventStatus, summary};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::backend::{job_name, keys};
use crate::kubernetes::ActiveJobs;
use crate::metrics::Metrics;
use crate::state::{self, Advanced, Counters, StateStore};

/// The executor container's name in the default template.
pub const CONTAINER: &str = "wasm-exec";
/// Label Kubernetes puts on a Job's pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// Where an object's events belong: namespace, event name, owning resource, Job name, ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// Namespace.
    pub namespace: String,
    /// Event name.
    pub event: String,
    /// The Jobico resource.
    pub owner: String,
    /// The batch Job.
    pub job: String,
    /// The event ids.
    pub ids: Vec<String>,
}

fn origin(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    job: Option<&str>,
) -> Option<Origin> {
    let labels = meta.labels.as_ref()?;
    let event = labels.get(keys::EVENT)?.clone();
    let ids: Vec<String> = meta
        .annotations
        .as_ref()?
        .get(keys::EVENT_IDS)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let job = job
        .map(str::to_owned)
        .or_else(|| labels.get(JOB_NAME_LABEL).cloned())
        .unwrap_or_else(|| job_name(&event, ids.first().map_or("", String::as_str)));
    Some(Origin {
        namespace: meta.namespace.clone()?,
        event,
        owner: labels.get(keys::JOB).cloned().unwrap_or_default(),
        job,
        ids,
    })
}

fn update(origin: &Origin, id: &str, state: EventState) -> EventStatus {
    let mut status = state::status(&origin.namespace, &origin.event, id, state);
    status.job = Some(origin.job.clone());
    status
}

/// The state updates a pod implies (empty while pending, or when a retry may follow).
pub fn pod_updates(pod: &Pod) -> (Option<Origin>, Vec<EventStatus>) {
    let Some(origin) = origin(&pod.metadata, None) else {
        return (None, vec![]);
    };
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default();
    let updates = match phase {
        "Running" => origin
            .ids
            .iter()
            .map(|id| update(&origin, id, EventState::Running))
            .collect(),
        "Succeeded" | "Failed" => {
            let terminated = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER))
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref());
            let exit_code = terminated.map(|t| t.exit_code);
            let message = terminated.and_then(|t| t.message.as_deref());
            let ids: Vec<&str> = origin.ids.iter().map(String::as_str).collect();
            // Events the run does not decide are left to the Job's own watch.
            summary::final_states(&ids, exit_code, message)
                .into_iter()
                .zip(&origin.ids)
                .filter_map(|(decided, id)| {
                    let decided = decided?;
                    let mut status = update(&origin, id, decided.state());
                    status.exit_code = exit_code;
                    status.reason = decided.reason();
                    status.summary = decided
                        .outcome
                        .map(|o| serde_json::to_value(o).expect("an outcome serialises"));
                    Some(status)
                })
                .collect()
        }
        _ => vec![],
    };
    (Some(origin), updates)
}

/// Whether a Job has finished, and the state updates that implies.
pub fn job_updates(job: &BatchJob) -> (Option<Origin>, bool, Vec<EventStatus>) {
    let Some(origin) = origin(&job.metadata, job.metadata.name.as_deref()) else {
        return (None, false, vec![]);
    };
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let holds = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    if holds("Complete").is_some() {
        let updates = origin
            .ids
            .iter()
            .map(|id| update(&origin, id, EventState::Succeeded))
            .collect();
        (Some(origin), true, updates)
    } else if let Some(failed) = holds("Failed") {
        let reason = format!(
            "job failed: {}: {}",
            failed.reason.as_deref().unwrap_or("Failed"),
            failed.message.as_deref().unwrap_or_default()
        );
        let updates = origin
            .ids
            .iter()
            .map(|id| {
                let mut status = update(&origin, id, EventState::Failed);
                status.reason = Some(reason.clone());
                status
            })
            .collect();
        (Some(origin), true, updates)
    } else {
        (Some(origin), false, vec![])
    }
}

/// Writes updates, counting transitions into final states for the resource's status.
async fn record(
    states: &StateStore,
    counters: &Counters,
    metrics: &Metrics,
    origin: &Origin,
    updates: Vec<EventStatus>,
) {
    for status in updates {
        let state = status.state;
        match states.advance(status).await {
            Ok(Advanced::Moved) => {
                metrics.state_updates.inc();
                counters.add(&origin.namespace, &origin.owner, state);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot record an event state"),
        }
    }
}

/// The label selector of everything the dispatcher creates.
pub fn selector() -> String {
    format!("{}={}", keys::MANAGED_BY, keys::MANAGER)
}

/// Watches the dispatcher's Jobs and pods in every namespace until `shutdown`. The watches
/// restart (and relist) by themselves after errors; replays are harmless because states only
/// move forward.
pub async fn run(
    client: kube::Client,
    states: StateStore,
    active: ActiveJobs,
    counters: Counters,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let config = watcher::Config::default().labels(&selector());
    let jobs = watcher(Api::<BatchJob>::all(client.clone()), config.clone()).default_backoff();
    let pods = watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .applied_objects();
    let job_loop = async {
        let mut jobs = std::pin::pin!(jobs);
        loop {
            match jobs.try_next().await {
                Ok(Some(watcher::Event::Apply(job) | watcher::Event::InitApply(job))) => {
                    let (origin, finished, updates) = job_updates(&job);
                    if let Some(origin) = origin {
                        active.set(&origin.namespace, &origin.event, &origin.job, !finished);
                        record(&states, &counters, &metrics, &origin, updates).await;
                    }
                }
                // A Job deleted before it finished no longer counts against the cap.
                Ok(Some(watcher::Event::Delete(job))) => {
                    if let (Some(origin), _, _) = job_updates(&job) {
                        active.set(&origin.namespace, &origin.event, &origin.job, false);
                    }
                }
                Ok(Some(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Ok(None) => break,
                Err(error) => tracing::warn!(%error, "job watch failed, retrying"),
            }
        }
    };
    let pod_loop = async {
        let mut pods = std::pin::pin!(pods);
        while let Some(next) = pods.next().await {
            match next {
                Ok(pod) => {
                    if let (Some(origin), updates) = pod_updates(&pod) {
                        record(&states, &counters, &metrics, &origin, updates).await;
                    }
                }
                Err(error) => tracing::warn!(%error, "pod watch failed, retrying"),
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = job_loop => {}
        _ = pod_loop => {}
    }
}
