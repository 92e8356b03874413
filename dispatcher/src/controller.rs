//! The controller for Jobico `Job` resources: validates each, starts and stops its event
//! consumers, writes its status (a `Ready` condition and counters), emits Kubernetes Events on
//! changes, and cleans up through a finalizer. One bad resource never stops the others: its
//! error is logged, it is marked not ready, and it is retried later.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobico_model::{Job as JobicoJob, validate_job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::artifacts::Artifacts;
use crate::backend::Backend;
use crate::consumers::{Conflict, ConsumerSet};
use crate::inputs;
use crate::kubernetes::{FIELD_MANAGER, TemplateSourceError, read_template};
use crate::render::TemplateChecker;
use crate::state::{Counters, Deltas};

/// The finalizer the dispatcher puts on each resource it consumes for.
pub const FINALIZER: &str = "jobico.coeux.dev/dispatcher";
/// The condition type.
pub const READY: &str = "Ready";
/// Reason: every event has a consumer.
pub const REASON_DISPATCHING: &str = "Dispatching";
/// Reason: the resource failed validation.
pub const REASON_INVALID: &str = "Invalid";
/// Reason: an older resource of the namespace declares one of this resource's event names.
pub const REASON_DUPLICATE_EVENT: &str = "DuplicateEvent";
/// Reason: a module or schema ConfigMap the events need is missing; their events are held in
/// the stream until it appears.
pub const REASON_INPUTS_MISSING: &str = "InputsMissing";
/// How soon a resource whose inputs are missing is checked again: the condition turns true
/// within this time of the ConfigMap appearing (and held events start running sooner, see
/// the backend's own check).
const INPUTS_RECHECK: Duration = Duration::from_secs(5);
/// Reason: the resource's template ConfigMap is missing, or its template (the default
/// included, with the resource's settings) is refused or renders a Job the pod policy refuses.
pub const REASON_INVALID_TEMPLATE: &str = "InvalidTemplate";
/// Reason: the routes (`then`) of this and other resources of the namespace lead an event
/// back to itself.
pub const REASON_ROUTE_CYCLE: &str = "RouteCycle";
/// How often a healthy resource is reconciled without a change (a safety net only).
const RESYNC: Duration = Duration::from_secs(300);
/// Wait before retrying a failed reconcile.
const ERROR_REQUEUE: Duration = Duration::from_secs(30);
/// How often counters are folded into the resources' status: often enough for `kubectl get`,
/// rarely enough to cost one status write per busy resource per interval.
pub const COUNTER_FLUSH: Duration = Duration::from_secs(5);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[source] kube::Error),
    /// The module store did not answer.
    #[error(transparent)]
    Modules(jobico_store::ModuleStoreError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// What reconciles share.
pub struct Context<B> {
    /// The client.
    pub client: kube::Client,
    /// Consumers per event.
    pub consumers: Arc<ConsumerSet<B>>,
    /// Kubernetes Events.
    pub recorder: Recorder,
    /// Checks each resource's template before its events are consumed, when set.
    pub templates: Option<Arc<TemplateChecker>>,
    /// Compiles each resource's modules when it is reconciled, when set.
    pub artifacts: Option<Arc<Artifacts>>,
}

impl<B> std::fmt::Debug for Context<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

impl<B: Backend> Context<B> {
    /// A context reporting Events as `jobico-dispatcher` from `instance`.
    pub fn new(
        client: kube::Client,
        consumers: Arc<ConsumerSet<B>>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            consumers,
            templates: None,
            artifacts: None,
        }
    }

    /// Starts compiling every usable module of a resource when it is reconciled, so that its
    /// first events already find the compiled code.
    pub fn with_artifacts(mut self, artifacts: Arc<Artifacts>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// Checks every resource's template with `templates` (rendering as the Jobs are) before
    /// consuming its events.
    pub fn with_templates(mut self, templates: Arc<TemplateChecker>) -> Self {
        self.templates = Some(templates);
        self
    }
}

/// What is wrong with a valid resource's template, if anything: its ConfigMap is read and
/// the template checked (off the async threads: it renders the largest batches the resource
/// can get; see [`crate::render::check_template`]).
async fn template_problem(
    client: &kube::Client,
    templates: &Arc<TemplateChecker>,
    cr: &Arc<JobicoJob>,
) -> Result<Option<String>, Error> {
    let source = match read_template(client, cr).await {
        Ok(source) => source,
        Err(TemplateSourceError::Missing(problem)) => return Ok(Some(problem)),
        Err(TemplateSourceError::Api(error)) => return Err(Error::Kube(error)),
    };
    let (templates, cr) = (templates.clone(), cr.clone());
    let checked =
        tokio::task::spawn_blocking(move || templates.check(&cr, source.as_deref())).await;
    Ok(match checked {
        Ok(result) => result.err(),
        Err(error) => Some(format!("checking the template failed: {error}")),
    })
}

/// Checks that the CRD is installed; the error says how to install it.
pub async fn check_crd(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<JobicoJob> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the CustomResourceDefinition jobs.jobico.coeux.dev is not installed; install it with `kubectl apply -f crds/job.yaml`"
        ),
        Err(e) => Err(anyhow::Error::new(e).context("listing jobs.jobico.coeux.dev")),
    }
}

/// The `Ready` condition and message for a resource, and whether it is valid.
pub fn readiness(cr: &JobicoJob) -> (bool, &'static str, String) {
    let problems = match validate_job(cr) {
        Ok(()) => vec![],
        Err(invalid) => invalid.problems,
    };
    if problems.is_empty() {
        (
            true,
            REASON_DISPATCHING,
            format!("{} event(s) consumed", cr.spec.events.len()),
        )
    } else {
        (false, REASON_INVALID, problems.join("; "))
    }
}

/// The readiness of a valid resource some of whose events older resources hold.
pub fn conflicted(conflicts: &[Conflict]) -> (bool, &'static str, String) {
    let problems: Vec<_> = conflicts
        .iter()
        .map(|c| {
            format!(
                "event {:?} is already declared by Job {}; ignored here",
                c.event, c.holder
            )
        })
        .collect();
    (false, REASON_DUPLICATE_EVENT, problems.join("; "))
}

/// The status to apply, keeping the transition time when the condition did not change.
pub fn desired_status(
    cr: &JobicoJob,
    (ready, reason, message): (bool, &'static str, String),
) -> serde_json::Value {
    let status = if ready { "True" } else { "False" };
    let previous = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let transition = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(jiff::Timestamp::now()),
    };
    let condition = Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: cr.metadata.generation,
        last_transition_time: transition,
    };
    json!({
        "apiVersion": "jobico.coeux.dev/v1",
        "kind": "Job",
        "status": {
            "conditions": [condition],
            "observedGeneration": cr.metadata.generation,
            "events": cr.spec.events.len(),
        }
    })
}

fn status_changed(cr: &JobicoJob, desired: &serde_json::Value) -> bool {
    let Some(current) = &cr.status else {
        return true;
    };
    let wanted = &desired["status"];
    let condition = current.conditions.iter().find(|c| c.type_ == READY);
    let same = |c: &Condition| {
        let w = &wanted["conditions"][0];
        w["status"] == c.status.as_str()
            && w["reason"] == c.reason.as_str()
            && w["message"] == c.message.as_str()
            && w["observedGeneration"] == json!(c.observed_generation)
    };
    !(condition.is_some_and(same)
        && wanted["observedGeneration"] == json!(current.observed_generation)
        && wanted["events"] == json!(current.events))
}

/// Reconciles one resource.
pub async fn reconcile<B: Backend>(
    cr: Arc<JobicoJob>,
    ctx: Arc<Context<B>>,
) -> Result<Action, Error> {
    let namespace = cr.namespace().unwrap_or_default();
    let api: Api<JobicoJob> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, cr, |event| async {
        match event {
            Finalizer::Apply(cr) => apply(cr, &api, &ctx).await,
            Finalizer::Cleanup(cr) => {
                ctx.consumers.remove(&namespace, &cr.name_any());
                tracing::info!(
                    namespace,
                    name = cr.name_any(),
                    "resource deleted, consumers stopped"
                );
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply<B: Backend>(
    cr: Arc<JobicoJob>,
    api: &Api<JobicoJob>,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let name = cr.name_any();
    let namespace = cr.namespace().unwrap_or_default();
    let (mut ready, mut reason, mut message) = readiness(&cr);
    let mut requeue = RESYNC;
    if ready {
        // Consumers run even while the template is invalid or an input is missing: they hold
        // the events in the stream, never dispatched, and run them once it is fixed.
        let conflicts = ctx.consumers.ensure(cr.clone());
        let template = match &ctx.templates {
            Some(templates) => template_problem(&ctx.client, templates, &cr).await?,
            None => None,
        };
        let cycles = ctx.consumers.route_cycles(&cr);
        if !conflicts.is_empty() {
            (ready, reason, message) = conflicted(&conflicts);
            tracing::warn!(
                namespace,
                name,
                message,
                "event names held by older resources"
            );
        } else if !cycles.is_empty() {
            // The ingress refuses these events (and the routed events reaching them); a
            // change to either resource breaking the cycle triggers a reconcile of that one
            // only: look again soon.
            (ready, reason, message) = (
                false,
                REASON_ROUTE_CYCLE,
                format!(
                    "routes of this and other resources of the namespace form a cycle ({}): an event would lead to itself",
                    cycles.join("; ")
                ),
            );
            requeue = INPUTS_RECHECK;
            tracing::warn!(namespace, name, message, "routes form a cycle");
        } else if let Some(problem) = template {
            // A template that breaks the pod policy or a rendering bound: not ready before
            // any event is dispatched. Its ConfigMap's edits trigger no reconcile: look again
            // soon.
            (ready, reason, message) = (false, REASON_INVALID_TEMPLATE, problem);
            requeue = ERROR_REQUEUE;
            tracing::warn!(namespace, name, message, "invalid template, holding events");
        } else {
            let missing = inputs::problems(&ctx.client, &cr, ctx.artifacts.as_ref())
                .await
                .map_err(|error| match error {
                    inputs::InputsError::Kube(error) => Error::Kube(error),
                    inputs::InputsError::Modules(error) => Error::Modules(error),
                })?;
            if !missing.is_empty() {
                (ready, reason, message) = (
                    false,
                    REASON_INPUTS_MISSING,
                    format!(
                        "events are held until this is fixed: {}",
                        missing.join("; ")
                    ),
                );
                requeue = INPUTS_RECHECK;
                tracing::warn!(namespace, name, message, "inputs missing, holding events");
            }
        }
    } else {
        tracing::warn!(
            namespace,
            name,
            message,
            "invalid resource, not consuming its events"
        );
        ctx.consumers.remove(&namespace, &name);
    }
    let desired = desired_status(&cr, (ready, reason, message.clone()));
    if status_changed(&cr, &desired) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&name, &params, &Patch::Apply(&desired))
            .await
            .map_err(Error::Kube)?;
        let was = cr
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        let now = (
            if ready { "True" } else { "False" }.to_owned(),
            reason.to_owned(),
            message.clone(),
        );
        if was.as_ref() != Some(&now) {
            let event = Event {
                type_: if ready {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: reason.into(),
                note: Some(message),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = ctx.recorder.publish(&event, &cr.object_ref(&())).await {
                tracing::debug!(%error, "cannot publish a Kubernetes Event");
            }
        }
    }
    Ok(Action::requeue(requeue))
}

/// Logs a failed reconcile and retries it later.
pub fn error_policy<B>(cr: Arc<JobicoJob>, error: &Error, _: Arc<Context<B>>) -> Action {
    tracing::warn!(namespace = cr.namespace(), name = cr.name_any(), %error, "reconcile failed");
    Action::requeue(ERROR_REQUEUE)
}

/// Runs the controller until `shutdown`.
pub async fn run<B: Backend>(ctx: Arc<Context<B>>, shutdown: CancellationToken) {
    let api: Api<JobicoJob> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile error");
            }
        })
        .await;
}

/// Adds counted transitions to one resource's status counters. A merge patch carrying the
/// read `resourceVersion` makes concurrent writes fail (409) instead of losing counts.
pub async fn flush_one(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    deltas: Deltas,
) -> Result<(), kube::Error> {
    let api: Api<JobicoJob> = Api::namespaced(client.clone(), namespace);
    let current = api.get_status(name).await?;
    let status = current.status.unwrap_or_default();
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": {
            "dispatched": status.dispatched + deltas.dispatched,
            "succeeded": status.succeeded + deltas.succeeded,
            "failed": status.failed + deltas.failed,
        }
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Folds counters into the resources' status every [`COUNTER_FLUSH`] until `shutdown`, then
/// once more.
pub async fn flush_counters(client: kube::Client, counters: Counters, shutdown: CancellationToken) {
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(COUNTER_FLUSH) => false,
        };
        for ((namespace, name), deltas) in counters.take() {
            if name.is_empty() {
                continue;
            }
            match flush_one(&client, &namespace, &name, deltas).await {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(error) => {
                    tracing::debug!(namespace, name, %error, "cannot update counters, retrying later");
                    counters.restore((namespace, name), deltas);
                }
            }
        }
        if stop {
            return;
        }
    }
}
