//! Event states from the cluster: watches the dispatcher's Jobs and pods and records
//! running → succeeded/failed (with the exit code and wasm-exec's per-event summary from the
//! pod's termination message) in the state bucket, keeps the active-Job counts for
//! concurrency caps, and counts transitions for the resources' status.
//!
//! States never stick: a failed write is tried again; a Job deleted before it finished, or
//! gone during a watch gap (seen by comparing a relist with the Jobs known to run), fails its
//! events that have no outcome yet, with the reason; the active counts are re-derived from
//! every relist. Only signed Jobs and their executor pods are believed ([`crate::trust`]).
//!
//! A failed Job of an event whose outcomes are handed on (`then` routes, a `sink`) reports the
//! events no pod decided to the ingress as `job` failures before recording them, so their
//! `failed` routes and their sinks hear of them (`Tracker::report_job_failure`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

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
use crate::render::ResultsConfig;
use crate::state::{self, Advanced, Counters, StateStore};
use crate::trust::Signer;

/// The executor container's name in the default template.
pub const CONTAINER: &str = "wasm-exec";
/// Label Kubernetes puts on a Job's pods.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

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

/// The state updates a pod of the Job `origin` describes implies (empty while pending, or
/// when a retry may follow). The ids are the Job's, never the pod's own annotations.
pub fn pod_updates(pod: &Pod, origin: &Origin) -> Vec<EventStatus> {
    let origin = origin.clone();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default();
    match phase {
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
    }
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

/// The uid and name of the Job controlling `pod`, from its owner references.
fn controlling_job(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "Job" && o.api_version == "batch/v1")
        .map(|o| (o.uid.clone(), o.name.clone()))
}

/// Whether `pod` runs the executor image in its executor container (a pod claiming to belong
/// to one of our Jobs but running something else reports nothing).
fn runs_executor(pod: &Pod, image: &str) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .any(|c| c.name == CONTAINER && c.image.as_deref() == Some(image))
            && spec.init_containers.as_ref().is_none_or(Vec::is_empty)
    })
}

/// How often failed state writes are tried again.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Most failed state writes kept for retrying; beyond, the oldest are dropped (a relist
/// replays the states of Jobs that still exist).
const MAX_RETRIES: usize = 100_000;

/// What the tracker shares between its watches.
struct Tracker {
    client: kube::Client,
    states: StateStore,
    active: ActiveJobs,
    counters: Counters,
    metrics: std::sync::Arc<Metrics>,
    signer: Signer,
    image: String,
    /// Jobs whose signature verified, by uid: their origin, and whether they were still
    /// running when last seen.
    known: Mutex<HashMap<String, (Origin, bool)>>,
    /// State writes that failed, by state key, to be tried again.
    retries: Mutex<HashMap<String, (Origin, EventStatus)>>,
    /// Where the outcomes of failed Jobs go, for events whose outcomes are handed on.
    results: Option<(ResultsConfig, reqwest::Client)>,
    /// Failed (or deleted, when `true`) Jobs whose outcomes could not be posted yet, by uid:
    /// tried again before their events are recorded `failed`.
    unreported: Mutex<HashMap<String, (BatchJob, bool)>>,
}

impl Tracker {
    /// Writes updates, counting transitions into final states for the resource's status; a
    /// write that fails is kept and tried again.
    async fn record(&self, origin: &Origin, updates: Vec<EventStatus>) {
        for status in updates {
            let state = status.state;
            match self.states.advance(status.clone()).await {
                Ok(Advanced::Moved) => {
                    self.metrics.state_updates.inc();
                    self.counters.add(&origin.namespace, &origin.owner, state);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot record an event state, retrying");
                    let key = jobico_common::subject::state_key(
                        &status.namespace,
                        &status.event,
                        &status.id,
                    );
                    let mut retries = self.retries.lock().expect("retries lock");
                    let later = retries.get(&key).is_some_and(|(_, kept)| {
                        state::rank(kept.state) > state::rank(status.state)
                    });
                    if !later && retries.len() < MAX_RETRIES {
                        retries.insert(key, (origin.clone(), status));
                    }
                }
            }
        }
    }

    /// Tries the failed writes again until `shutdown`.
    async fn retry(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
            let pending: Vec<_> = self
                .retries
                .lock()
                .expect("retries lock")
                .drain()
                .map(|(_, v)| v)
                .collect();
            for (origin, status) in pending {
                self.record(&origin, vec![status]).await;
            }
            let unreported: Vec<(BatchJob, bool)> = self
                .unreported
                .lock()
                .expect("unreported lock")
                .drain()
                .map(|(_, job)| job)
                .collect();
            for (job, deleted) in unreported {
                if deleted {
                    self.on_job_deleted(&job).await;
                } else {
                    self.on_job(&job, None).await;
                }
            }
        }
    }

    /// For a failed Job of an event whose outcomes are handed on (routes, a sink: its
    /// executor has the results URL), posts a `job` failure for each of its events no pod
    /// decided to the ingress's results endpoint, as the executor would have, with a token for
    /// exactly those ids. Returns whether the events may now be recorded `failed`: posted, or
    /// nothing to post. Posting before recording means a crash in between posts again on the
    /// relist (the ingress keeps each routed event and sink outcome once).
    async fn report_job_failure(
        &self,
        job: &BatchJob,
        origin: &Origin,
        updates: &[EventStatus],
    ) -> bool {
        use jobico_common::chain::{RESULTS_BATCH_HEADER, RESULTS_URL_VAR, results_token};
        let Some((results, http)) = &self.results else {
            return true;
        };
        let hands_on = job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .is_some_and(|pod| {
                pod.containers.iter().any(|c| {
                    c.env
                        .iter()
                        .flatten()
                        .any(|var| var.name == RESULTS_URL_VAR)
                })
            });
        if !hands_on {
            return true;
        }
        let mut outcomes = Vec::new();
        for update in updates.iter().filter(|u| u.state == EventState::Failed) {
            let decided = match self
                .states
                .get(&origin.namespace, &origin.event, &update.id)
                .await
            {
                Ok(current) => current.is_some_and(|c| c.state.is_final()),
                Err(error) => {
                    tracing::warn!(%error, "cannot read an event state, retrying");
                    return false;
                }
            };
            if !decided {
                outcomes.push(summary::EventOutcome {
                    id: update.id.clone(),
                    status: summary::Status::Failed,
                    exit_code: None,
                    error: Some(summary::ErrorKind::Job),
                    message: update.reason.clone(),
                    warning: None,
                    duration: std::time::Duration::ZERO,
                    output_bytes: 0,
                    output_truncated: false,
                    result: None,
                });
            }
        }
        if outcomes.is_empty() {
            return true;
        }
        let ids: Vec<&str> = outcomes.iter().map(|o| o.id.as_str()).collect();
        let url = format!(
            "{}/results/{}/{}",
            results.base_url, origin.namespace, origin.event
        );
        let token = results_token(&results.key, &origin.namespace, &origin.event, &ids);
        let posted = http
            .post(&url)
            .bearer_auth(token)
            .header(RESULTS_BATCH_HEADER, summary::batch_digest(&ids))
            .json(&jobico_common::chain::ResultsReport { outcomes })
            .send()
            .await;
        match posted {
            Ok(response) if response.status().is_success() => true,
            Ok(response) => {
                tracing::warn!(job = origin.job, status = %response.status(), "the ingress did not take a failed Job's outcomes, retrying");
                false
            }
            Err(error) => {
                tracing::warn!(job = origin.job, %error, "cannot post a failed Job's outcomes, retrying");
                false
            }
        }
    }

    /// The origin of a Job the dispatcher created and signed; `None` for anyone else's.
    fn trust(&self, job: &BatchJob) -> Option<(String, Origin)> {
        let origin = origin(&job.metadata, job.metadata.name.as_deref())?;
        if !self.signer.verify(job) {
            tracing::debug!(
                namespace = origin.namespace,
                job = origin.job,
                "ignoring a Job Jobico did not sign"
            );
            return None;
        }
        Some((job.metadata.uid.clone()?, origin))
    }

    /// The origin of the signed Job controlling `pod`, read from the API when its watch has not
    /// shown it yet; `None` when the pod is not one of ours.
    async fn pod_origin(&self, pod: &Pod) -> Option<Origin> {
        let (uid, name) = controlling_job(pod)?;
        if let Some((origin, _)) = self.known.lock().expect("known lock").get(&uid) {
            return Some(origin.clone());
        }
        let namespace = pod.metadata.namespace.as_deref()?;
        let jobs: Api<BatchJob> = Api::namespaced(self.client.clone(), namespace);
        let job = crate::kubernetes::bounded("reading a pod's Job", jobs.get_opt(&name))
            .await
            .ok()??;
        let (found, origin) = self.trust(&job)?;
        (found == uid).then_some(origin)
    }

    async fn on_job(&self, job: &BatchJob, seen: Option<&mut HashSet<String>>) {
        let Some((uid, origin)) = self.trust(job) else {
            return;
        };
        let (_, finished, updates) = job_updates(job);
        // A failed Job fails every event it holds, but its pods know better which ones
        // succeeded: read them first (the pod watch may not have shown them yet), so the
        // Job's verdict only reaches events no pod decided.
        if finished && updates.iter().any(|u| u.state == EventState::Failed) {
            self.known
                .lock()
                .expect("known lock")
                .insert(uid.clone(), (origin.clone(), false));
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &origin.namespace);
            let selector = format!("{JOB_NAME_LABEL}={}", origin.job);
            let listed = crate::kubernetes::bounded(
                "listing a failed Job's pods",
                pods.list(&kube::api::ListParams::default().labels(&selector)),
            )
            .await;
            for pod in listed.map(|l| l.items).unwrap_or_default() {
                self.on_pod(&pod).await;
            }
            if !self.report_job_failure(job, &origin, &updates).await {
                // Recorded once reported (the retry loop sees this Job again); it is
                // finished all the same.
                self.keep_unreported(&uid, job, false);
                self.active
                    .set(&origin.namespace, &origin.event, &origin.job, false);
                if let Some(seen) = seen {
                    seen.insert(uid);
                }
                return;
            }
        }
        self.active
            .set(&origin.namespace, &origin.event, &origin.job, !finished);
        self.known
            .lock()
            .expect("known lock")
            .insert(uid.clone(), (origin.clone(), !finished));
        if let Some(seen) = seen {
            seen.insert(uid);
        }
        self.record(&origin, updates).await;
    }

    /// A Job deleted: its end is recorded from its last state; one deleted before it finished
    /// fails its events (states only move forward, so events its pod already recorded keep
    /// their outcome).
    async fn on_job_deleted(&self, job: &BatchJob) {
        let Some((uid, origin)) = self.trust(job) else {
            return;
        };
        self.active
            .set(&origin.namespace, &origin.event, &origin.job, false);
        self.known.lock().expect("known lock").remove(&uid);
        let (_, finished, updates) = job_updates(job);
        let updates = if finished {
            updates
        } else {
            failed(&origin, "the Kubernetes Job was deleted before it finished")
        };
        if !self.report_job_failure(job, &origin, &updates).await {
            self.keep_unreported(&uid, job, true);
            return;
        }
        self.record(&origin, updates).await;
    }

    /// Keeps `job` (deleted or not) for the retry loop to report its failure again.
    fn keep_unreported(&self, uid: &str, job: &BatchJob, deleted: bool) {
        let mut unreported = self.unreported.lock().expect("unreported lock");
        if unreported.len() < MAX_RETRIES {
            unreported.insert(uid.to_owned(), (job.clone(), deleted));
        }
    }

    /// After a relist: Jobs known to be running that the list no longer has were deleted during
    /// the watch gap (by a user, or by their TTL after finishing unseen). Their events' outcome
    /// is unknown unless their pods recorded it; the rest are failed with that reason. The
    /// active counts become exactly what the list showed.
    async fn after_relist(&self, seen: &HashSet<String>) {
        let vanished: Vec<Origin> = {
            let mut known = self.known.lock().expect("known lock");
            let gone: Vec<String> = known
                .keys()
                .filter(|uid| !seen.contains(*uid))
                .cloned()
                .collect();
            gone.into_iter()
                .filter_map(|uid| known.remove(&uid))
                .filter(|(_, running)| *running)
                .map(|(origin, _)| origin)
                .collect()
        };
        let running: Vec<Origin> = self
            .known
            .lock()
            .expect("known lock")
            .values()
            .filter(|(_, running)| *running)
            .map(|(origin, _)| origin.clone())
            .collect();
        self.active.replace(
            running
                .iter()
                .map(|o| (o.namespace.as_str(), o.event.as_str(), o.job.as_str())),
        );
        for origin in vanished {
            tracing::warn!(
                namespace = origin.namespace,
                job = origin.job,
                "a Job vanished while the watch was away"
            );
            let updates = failed(
                &origin,
                "the Kubernetes Job was deleted before its outcome was seen (it may have run; see its logs if they are kept)",
            );
            self.record(&origin, updates).await;
        }
    }

    async fn on_pod(&self, pod: &Pod) {
        let Some(origin) = self.pod_origin(pod).await else {
            return;
        };
        if !runs_executor(pod, &self.image) {
            tracing::warn!(
                namespace = origin.namespace,
                job = origin.job,
                "a pod of a Jobico Job runs another image; ignoring what it reports"
            );
            return;
        }
        let updates = pod_updates(pod, &origin);
        self.record(&origin, updates).await;
    }
}

/// `failed` with `reason` for every event of `origin`.
fn failed(origin: &Origin, reason: &str) -> Vec<EventStatus> {
    origin
        .ids
        .iter()
        .map(|id| {
            let mut status = update(origin, id, EventState::Failed);
            status.reason = Some(reason.to_owned());
            status
        })
        .collect()
}

/// The label selector of everything the dispatcher creates.
pub fn selector() -> String {
    format!("{}={}", keys::MANAGED_BY, keys::MANAGER)
}

/// What the tracker needs besides the cluster.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Event states.
    pub states: StateStore,
    /// Active Jobs per event type, for concurrency caps.
    pub active: ActiveJobs,
    /// Counts for the resources' status.
    pub counters: Counters,
    /// Metrics.
    pub metrics: std::sync::Arc<Metrics>,
    /// Verifies that a Job is one the dispatcher created.
    pub signer: Signer,
    /// The executor image (`--exec-image`): pods running another report nothing.
    pub image: String,
    /// The ingress's results endpoint (`--results-url`, `--results-key-file`): the outcomes of
    /// failed Jobs of events with routes or a sink are posted there.
    pub results: Option<ResultsConfig>,
}

/// Watches the dispatcher's Jobs and pods in every namespace until `shutdown`. The watches
/// restart (and relist) by themselves after errors; replays are harmless because states only
/// move forward. Only Jobs the dispatcher signed, and their pods, are believed
/// ([`crate::trust`]).
pub async fn run(client: kube::Client, config: TrackerConfig, shutdown: CancellationToken) {
    let tracker = Tracker {
        client: client.clone(),
        states: config.states,
        active: config.active,
        counters: config.counters,
        metrics: config.metrics,
        signer: config.signer,
        image: config.image,
        known: Mutex::default(),
        retries: Mutex::default(),
        results: config.results.map(|results| {
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .no_proxy()
                .build()
                .expect("the results HTTP client builds");
            (results, http)
        }),
        unreported: Mutex::default(),
    };
    let watch = watcher::Config::default().labels(&selector());
    let jobs = watcher(Api::<BatchJob>::all(client.clone()), watch.clone()).default_backoff();
    let pods = watcher(Api::<Pod>::all(client), watch)
        .default_backoff()
        .applied_objects();
    let job_loop = async {
        let mut jobs = std::pin::pin!(jobs);
        let mut listing: Option<HashSet<String>> = None;
        loop {
            match jobs.try_next().await {
                Ok(Some(watcher::Event::Init)) => listing = Some(HashSet::new()),
                Ok(Some(watcher::Event::InitApply(job))) => {
                    tracker.on_job(&job, listing.as_mut()).await
                }
                Ok(Some(watcher::Event::InitDone)) => {
                    if let Some(seen) = listing.take() {
                        tracker.after_relist(&seen).await;
                    }
                }
                Ok(Some(watcher::Event::Apply(job))) => tracker.on_job(&job, None).await,
                Ok(Some(watcher::Event::Delete(job))) => tracker.on_job_deleted(&job).await,
                Ok(None) => break,
                Err(error) => tracing::warn!(%error, "job watch failed, retrying"),
            }
        }
    };
    let pod_loop = async {
        let mut pods = std::pin::pin!(pods);
        while let Some(next) = pods.next().await {
            match next {
                Ok(pod) => tracker.on_pod(&pod).await,
                Err(error) => tracing::warn!(%error, "pod watch failed, retrying"),
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = job_loop => {}
        _ = pod_loop => {}
        _ = tracker.retry(&shutdown) => {}
    }
}
