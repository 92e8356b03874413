//! Kubernetes Job rendering: a handlebars template (strict mode, bounded: see
//! [`crate::template`]) filled with a batch's values, parsed into a `batch/v1` Job and checked
//! against [`crate::policy`].
//!
//! Values reach the YAML only through two forms, so no value can inject YAML:
//! `{{x}}` writes `x` as a JSON string (quoted and escaped; JSON strings are valid YAML
//! double-quoted scalars) and `{{json x}}` writes any value as JSON (YAML flow style).
//! The variables are listed in [`TemplateContext`] and documented in the crate README.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use handlebars::{Context, Handlebars, Helper, HelperResult, Output, RenderContext};
use jobico_common::envelope::{EnvEntry, EventsTooLarge, MAX_EVENTS_BYTES, split_events};
use jobico_common::executor::{
    ARTIFACT_VARS, ArtifactRef, GUEST_ENV_PREFIX, MODULE_VARS, UploadedModuleRef,
};
use jobico_common::state::exit;
use jobico_common::{EventId, EventRecord, id::MAX_EVENT_ID_LEN};
use jobico_model::{EventSpec, Job as JobicoJob};
use k8s_openapi::api::batch::v1::{Job as BatchJob, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, ConfigMapKeySelector, ConfigMapVolumeSource, Container,
    EnvFromSource, EnvVar, EnvVarSource, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretEnvSource, SecretKeySelector, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::backend::{Batch, keys};
use crate::policy::{self, Violation};
use crate::template::{BoundedTemplate, TemplateError};

/// The default template, embedded in the binary.
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/job.yaml.hbs");
/// Default data key of a template ConfigMap named by a resource's `spec.template`.
pub const DEFAULT_TEMPLATE_KEY: &str = "job.yaml.hbs";
/// The executor's variable naming the module file it runs.
const MODULE_PATH_VAR: &str = "JOBICO_MODULE";
/// Where the module ConfigMap is mounted in the executor container.
pub const MODULE_DIR: &str = "/jobico/module";

/// Pod retries after a host failure when the resource sets none.
pub const DEFAULT_BACKOFF_LIMIT: i32 = 2;
/// Seconds a Job may run when the resource sets none: ample for a batch of 10-second events.
pub const DEFAULT_ACTIVE_DEADLINE_SECONDS: i64 = 300;
/// Seconds a finished Job is kept when the resource sets none; the event state outlives it.
pub const DEFAULT_TTL_SECONDS_AFTER_FINISHED: i32 = 3600;
/// Guest memory per event in MiB when the event sets none (wasm-exec's default).
pub const DEFAULT_MEMORY_MIB: u32 = 64;
/// Wall-clock limit per event in milliseconds when the event sets none (wasm-exec's default).
pub const DEFAULT_TIMEOUT_MILLIS: u64 = 10_000;

/// Why a Job could not be rendered. The same input renders the same way, so retrying does
/// not help; [`RenderError::is_template_fault`] tells what a fixed template would cure.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The event is no longer declared by its resource.
    #[error("event {0:?} is not declared by its resource")]
    UnknownEvent(String),
    /// The resource has no uid (the owner reference needs it).
    #[error("resource {0} has no uid")]
    NoUid(String),
    /// The events are more than a Job can carry.
    #[error(transparent)]
    EventsTooLarge(#[from] EventsTooLarge),
    /// The template was refused, broke a rendering bound, or failed to render (strict mode:
    /// a missing variable is an error).
    #[error("template: {0}")]
    Template(#[source] TemplateError),
    /// The output is not a valid Kubernetes Job.
    #[error("rendered Job is not valid: {0}")]
    Parse(#[source] serde_yaml::Error),
    /// The output changed a field the dispatcher relies on.
    #[error("rendered Job must keep {field} = {expected:?}")]
    Identity {
        /// The field.
        field: &'static str,
        /// The value it must have.
        expected: String,
    },
    /// The output breaks the pod policy.
    #[error("rendered Job breaks the pod policy: {}", policy::describe(.0))]
    Policy(Vec<Violation>),
    /// The event has `then` routes or a `sink`, and this dispatcher has nowhere to send its
    /// outcomes.
    #[error(
        "event {0:?} has `then` routes or a `sink`, which need its outcomes: start the dispatcher with --results-url and --results-key-file (see deploy/README.md)"
    )]
    OutcomesNeedResults(String),
}

impl RenderError {
    /// Whether the template (or the resource's settings it renders) is at fault rather than
    /// the events: the same events render once that is fixed, so they should wait.
    pub fn is_template_fault(&self) -> bool {
        matches!(
            self,
            Self::Template(_)
                | Self::Parse(_)
                | Self::Identity { .. }
                | Self::Policy(_)
                | Self::OutcomesNeedResults(_)
        )
    }
}

/// The values a template sees (serialised in camelCase).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateContext {
    /// The Job name (deterministic, from the batch's first event id).
    pub name: String,
    /// The namespace.
    pub namespace: String,
    /// The event name.
    pub event: String,
    /// The event ids, in batch order.
    pub ids: Vec<String>,
    /// Labels for the Job and its pod.
    pub labels: BTreeMap<String, String>,
    /// Annotations for the Job and its pod (the event ids).
    pub annotations: BTreeMap<String, String>,
    /// The owner reference fields: `apiVersion`, `kind`, `name`, `uid`.
    pub owner: BTreeMap<&'static str, String>,
    /// The executor image (`--exec-image`).
    pub image: String,
    /// The container arguments (`run`). The module's variables (`events[].env`, `envFrom`)
    /// are written by the dispatcher after rendering, as `JOBICO_GUEST_<NAME>` variables.
    pub args: Vec<String>,
    /// The executor container's environment, as `{name, value}` entries: `JOBICO_MODULE`,
    /// the events (`JOBICO_EVENTS`, or `JOBICO_EVENTS_PARTS` and its parts: see
    /// [`jobico_common::envelope`]), `JOBICO_MEMORY`, `JOBICO_DEADLINE` and, when set,
    /// `JOBICO_FUEL`. Write it with `env: {{json env}}`.
    pub env: Vec<EnvEntry>,
    /// The module: `configMap`, `key` (the wasm file name), `dir` and `path`.
    pub module: BTreeMap<&'static str, String>,
    /// Per-event limits in wasm-exec's syntax: `memory` (`64Mi`), `deadline` (`10000ms`),
    /// `fuel` (a string, or null).
    pub limits: Value,
    /// The container's `resources`.
    pub resources: ResourceRequirements,
    /// `spec.backoffLimit`.
    pub backoff_limit: i32,
    /// `spec.activeDeadlineSeconds`.
    pub active_deadline_seconds: i64,
    /// `spec.ttlSecondsAfterFinished`.
    pub ttl_seconds_after_finished: i32,
    /// wasm-exec's exit codes: `ok`, `guestFailed`, `hostError`.
    pub exit_codes: BTreeMap<&'static str, i32>,
}

/// Renders Jobs from the default template or from a resource's own.
pub struct Renderer {
    registry: Handlebars<'static>,
    default: BoundedTemplate,
    image: String,
    /// Where executors of events with routes post their outcomes, when configured.
    results: Option<std::sync::Arc<ResultsConfig>>,
}

/// Where executors of events with `then` routes post their outcomes: the ingress, and the
/// key their tokens are signed with (the ingress's `--results-key-file`, the same Secret).
#[derive(Clone)]
pub struct ResultsConfig {
    /// The ingress's base URL as pods reach it (`http://jobico-apiserver.jobico-system.svc:8080`).
    pub base_url: String,
    /// The signing key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ResultsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultsConfig")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("image", &self.image)
            .finish()
    }
}

/// `value` as JSON that YAML reads back unchanged: serde_json's output with the characters
/// YAML treats as line breaks or forbids (NEL, LS, PS, DEL, C1 controls, BOM, U+FFFE/U+FFFF)
/// escaped as `\uXXXX`, which both JSON and YAML double-quoted scalars understand. JSON's
/// structure is ASCII, so these characters can only occur inside strings.
pub fn to_yaml_safe_json<T: Serialize + ?Sized>(value: &T) -> String {
    let text = serde_json::to_string(value).expect("JSON values always serialise");
    if text.is_ascii() {
        return text;
    }
    let mut safe = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                safe.push_str(&format!("\\u{:04x}", c as u32));
            }
            _ => safe.push(c),
        }
    }
    safe
}

fn json_helper(
    h: &Helper<'_>,
    _: &Handlebars<'_>,
    _: &Context,
    _: &mut RenderContext<'_, '_>,
    out: &mut dyn Output,
) -> HelperResult {
    let value = h
        .param(0)
        .ok_or_else(|| handlebars::RenderErrorReason::ParamNotFoundForIndex("json", 0))?;
    if value.is_value_missing() {
        return Err(handlebars::RenderErrorReason::MissingVariable(Some(
            value.relative_path().cloned().unwrap_or_default(),
        ))
        .into());
    }
    out.write(&to_yaml_safe_json(value.value()))?;
    Ok(())
}

impl Renderer {
    /// A renderer whose Jobs run `image`.
    pub fn new(image: impl Into<String>) -> Self {
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        registry.register_escape_fn(to_yaml_safe_json::<str>);
        registry.register_helper("json", Box::new(json_helper));
        // Only the allowed helpers stay callable: of the built-ins that is all but `raw` and
        // `log` (a name-only `{{log}}` is then a variable, refused when missing).
        for name in ["raw", "log"] {
            registry.unregister_helper(name);
        }
        Self {
            registry,
            default: BoundedTemplate::compile(DEFAULT_TEMPLATE)
                .expect("the embedded template compiles within the bounds"),
            image: image.into(),
            results: None,
        }
    }

    /// The renderer with executors of events with routes told to post their outcomes to
    /// `results`.
    pub fn with_results(mut self, results: ResultsConfig) -> Self {
        self.results = Some(std::sync::Arc::new(results));
        self
    }

    /// The executor image every Job must run.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The values a template sees for `batch`.
    pub fn context(&self, batch: &Batch) -> Result<TemplateContext, RenderError> {
        let spec: &EventSpec = batch
            .spec()
            .ok_or_else(|| RenderError::UnknownEvent(batch.event.clone()))?;
        let owner = &batch.owner;
        let owner_name = batch.owner_name().to_owned();
        let uid = owner
            .metadata
            .uid
            .clone()
            .ok_or_else(|| RenderError::NoUid(format!("{}/{owner_name}", batch.namespace())))?;
        let ids: Vec<String> = batch.ids().into_iter().map(str::to_owned).collect();
        let mut labels = BTreeMap::from([
            (keys::EVENT.to_owned(), batch.event.clone()),
            (keys::JOB.to_owned(), owner_name.clone()),
            (keys::MANAGED_BY.to_owned(), keys::MANAGER.to_owned()),
        ]);
        if let [only] = ids.as_slice() {
            labels.insert(keys::EVENT_ID.to_owned(), only.clone());
        }
        let annotations = BTreeMap::from([(keys::EVENT_IDS.to_owned(), ids.join(","))]);
        let exec: Vec<_> = batch.events.iter().map(|e| e.to_exec()).collect();
        let events = serde_json::to_string(&exec).expect("events serialise");
        let limits = spec.limits.clone().unwrap_or_default();
        let memory = format!("{}Mi", limits.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB));
        let deadline = format!(
            "{}ms",
            limits.timeout_millis.unwrap_or(DEFAULT_TIMEOUT_MILLIS)
        );
        let fuel = limits.fuel.map(|f| f.to_string());
        let entry = |name: &str, value: String| EnvEntry {
            name: name.to_owned(),
            value,
        };
        // An uploaded module is fetched by the executor (see [`ModuleDelivery`]): no path.
        let uploaded = matches!(
            spec.module_ref(),
            Some(jobico_model::ModuleRef::Uploaded(_))
        );
        let mut env = Vec::new();
        if !uploaded {
            env.push(entry(
                MODULE_PATH_VAR,
                format!("{MODULE_DIR}/{}", spec.wasm),
            ));
        }
        env.extend(split_events(&events)?);
        env.push(entry("JOBICO_MEMORY", memory.clone()));
        env.push(entry("JOBICO_DEADLINE", deadline.clone()));
        if let Some(fuel) = &fuel {
            env.push(entry("JOBICO_FUEL", fuel.clone()));
        }
        // The guest's variables are not arguments: the dispatcher writes them into the
        // environment after the template has rendered (see `set_guest_env`).
        let args = vec!["run".to_owned()];
        let resources = owner
            .spec
            .resources
            .clone()
            .unwrap_or_else(default_resources);
        Ok(TemplateContext {
            name: batch.job_name(),
            namespace: batch.namespace().to_owned(),
            event: batch.event.clone(),
            ids,
            labels,
            annotations,
            owner: BTreeMap::from([
                ("apiVersion", "jobico.coeux.dev/v1".to_owned()),
                ("kind", "Job".to_owned()),
                ("name", owner_name),
                ("uid", uid),
            ]),
            image: self.image.clone(),
            args,
            env,
            module: BTreeMap::from([
                ("configMap", owner.modules_config_map()),
                ("key", spec.wasm.clone()),
                ("dir", MODULE_DIR.to_owned()),
                ("path", format!("{MODULE_DIR}/{}", spec.wasm)),
            ]),
            limits: json!({"memory": memory, "deadline": deadline, "fuel": fuel}),
            resources,
            backoff_limit: owner.spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT),
            active_deadline_seconds: owner
                .spec
                .active_deadline_seconds
                .unwrap_or(DEFAULT_ACTIVE_DEADLINE_SECONDS),
            ttl_seconds_after_finished: owner
                .spec
                .ttl_seconds_after_finished
                .unwrap_or(DEFAULT_TTL_SECONDS_AFTER_FINISHED),
            exit_codes: BTreeMap::from([
                ("ok", exit::OK),
                ("guestFailed", exit::GUEST_FAILED),
                ("hostError", exit::HOST_ERROR),
            ]),
        })
    }

    /// Renders `batch` with the default template (`template` = None) or the given source,
    /// checks the result keeps the name and namespace, adds the labels and ids annotation
    /// the dispatcher relies on to the Job and its pod template (when a custom template
    /// leaves them out), and checks the result against [`policy::check`].
    pub fn render(&self, batch: &Batch, template: Option<&str>) -> Result<BatchJob, RenderError> {
        self.render_with_module(batch, template, &ModuleDelivery::default())
    }

    /// [`Renderer::render`], with the executor told how to load its module: the `artifact`
    /// the dispatcher compiled, and the `uploaded` module no volume carries. Their variables
    /// are the dispatcher's alone: whatever the template wrote under those names is removed
    /// (see [`jobico_common::executor`]), and for an uploaded module so is any volume of the
    /// module ConfigMap's key (there is none to mount).
    pub fn render_with_module(
        &self,
        batch: &Batch,
        template: Option<&str>,
        delivery: &ModuleDelivery,
    ) -> Result<BatchJob, RenderError> {
        let context = self.context(batch)?;
        let mut job = match template {
            // The default template's Job, built straight from the context: what rendering
            // and parsing it gives (tests/render.rs checks they agree), without either.
            None => default_job(&context),
            Some(_) => {
                let text = self.render_context(&context, template)?;
                serde_yaml::from_str(&text).map_err(RenderError::Parse)?
            }
        };
        let identity = |field, expected: &str, actual: Option<&String>| {
            if actual.map(String::as_str) == Some(expected) {
                Ok(())
            } else {
                Err(RenderError::Identity {
                    field,
                    expected: expected.to_owned(),
                })
            }
        };
        identity("metadata.name", &context.name, job.metadata.name.as_ref())?;
        identity(
            "metadata.namespace",
            &context.namespace,
            job.metadata.namespace.as_ref(),
        )?;
        let mut metas = vec![&mut job.metadata];
        if let Some(spec) = job.spec.as_mut() {
            metas.push(spec.template.metadata.get_or_insert_with(Default::default));
        }
        for meta in metas {
            meta.labels
                .get_or_insert_with(Default::default)
                .extend(context.labels.clone());
            meta.annotations
                .get_or_insert_with(Default::default)
                .extend(context.annotations.clone());
        }
        set_delivery(&mut job, delivery, &context.module["key"]);
        let spec = batch
            .spec()
            .ok_or_else(|| RenderError::UnknownEvent(batch.event.clone()))?;
        set_guest_env(&mut job, spec);
        set_results(&mut job, batch, spec, self.results.as_deref())?;
        let owner = OwnerReference {
            api_version: context.owner["apiVersion"].clone(),
            kind: context.owner["kind"].clone(),
            name: context.owner["name"].clone(),
            uid: context.owner["uid"].clone(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        policy::check(&job, &self.image, &owner).map_err(RenderError::Policy)?;
        Ok(job)
    }

    /// The template's output text, before parsing.
    pub fn render_text(
        &self,
        batch: &Batch,
        template: Option<&str>,
    ) -> Result<String, RenderError> {
        self.render_context(&self.context(batch)?, template)
    }

    fn render_context(
        &self,
        context: &TemplateContext,
        template: Option<&str>,
    ) -> Result<String, RenderError> {
        let data = serde_json::to_value(context).expect("the template context serialises");
        let compiled;
        let template = match template {
            None => &self.default,
            Some(source) => {
                compiled = BoundedTemplate::compile(source).map_err(RenderError::Template)?;
                &compiled
            }
        };
        template
            .render(&self.registry, &data)
            .map_err(RenderError::Template)
    }
}

/// The executor container's resources when the resource sets none: 100m CPU, 64Mi of memory
/// requested, 128Mi at most.
fn default_resources() -> ResourceRequirements {
    let quantities = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(name, quantity)| ((*name).to_owned(), Quantity((*quantity).to_owned())))
                .collect(),
        )
    };
    ResourceRequirements {
        requests: quantities(&[("cpu", "100m"), ("memory", "64Mi")]),
        limits: quantities(&[("memory", "128Mi")]),
        claims: None,
    }
}

/// How the dispatcher tells a Job's executor to load its module, beside the template's output.
#[derive(Debug, Clone, Default)]
pub struct ModuleDelivery {
    /// The module compiled by the dispatcher, when it is.
    pub artifact: Option<ArtifactRef>,
    /// The uploaded module (`wasm: sha256:<digest>`), fetched by the executor: no volume
    /// carries it.
    pub uploaded: Option<UploadedModuleRef>,
}

/// Removes every artifact and uploaded-module variable from the Job's containers and gives
/// the executor container `delivery`'s. For an uploaded module, also removes the volumes that
/// would mount the module ConfigMap's `module_key` (and their mounts) and the module path.
fn set_delivery(job: &mut BatchJob, delivery: &ModuleDelivery, module_key: &str) {
    let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    let mut unmounted = Vec::new();
    if delivery.uploaded.is_some()
        && let Some(volumes) = pod.volumes.as_mut()
    {
        volumes.retain(|volume| {
            let mounts_module = volume.config_map.as_ref().is_some_and(|map| {
                map.items
                    .iter()
                    .flatten()
                    .any(|item| item.key == module_key)
            });
            if mounts_module {
                unmounted.push(volume.name.clone());
            }
            !mounts_module
        });
    }
    let ours = |name: &str| ARTIFACT_VARS.contains(&name) || MODULE_VARS.contains(&name);
    for container in &mut pod.containers {
        if let Some(env) = container.env.as_mut() {
            env.retain(|var| !ours(&var.name));
        }
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.retain(|mount| !unmounted.contains(&mount.name));
        }
        if container.name != policy::EXEC_CONTAINER {
            continue;
        }
        let env = container.env.get_or_insert_with(Vec::new);
        if delivery.uploaded.is_some() {
            env.retain(|var| var.name != MODULE_PATH_VAR);
        }
        let artifact = delivery.artifact.iter().flat_map(|a| a.env());
        let uploaded = delivery.uploaded.iter().flat_map(|u| u.env());
        env.extend(artifact.chain(uploaded).map(|(name, value)| EnvVar {
            name: name.to_owned(),
            value: Some(value),
            value_from: None,
        }));
    }
}

/// Removes the results variables from the Job's containers and, when `spec` has routes,
/// gives the executor container where to post its outcomes and the token for exactly this
/// batch. Routes without a results configuration are refused: the events would run and
/// their routes never be followed.
fn set_results(
    job: &mut BatchJob,
    batch: &Batch,
    spec: &EventSpec,
    results: Option<&ResultsConfig>,
) -> Result<(), RenderError> {
    use jobico_common::chain::{RESULTS_TOKEN_VAR, RESULTS_URL_VAR, results_token};
    let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return Ok(());
    };
    let ours = |name: &str| name == RESULTS_URL_VAR || name == RESULTS_TOKEN_VAR;
    for container in &mut pod.containers {
        if let Some(env) = container.env.as_mut() {
            env.retain(|var| !ours(&var.name));
        }
    }
    if !spec.hands_on_outcomes() {
        return Ok(());
    }
    let results = results.ok_or_else(|| RenderError::OutcomesNeedResults(spec.name.clone()))?;
    let namespace = batch.namespace();
    let url = format!("{}/results/{namespace}/{}", results.base_url, batch.event);
    let token = results_token(&results.key, namespace, &batch.event, &batch.ids());
    for container in &mut pod.containers {
        if container.name == policy::EXEC_CONTAINER {
            let env = container.env.get_or_insert_with(Vec::new);
            for (name, value) in [
                (RESULTS_URL_VAR, url.clone()),
                (RESULTS_TOKEN_VAR, token.clone()),
            ] {
                env.push(EnvVar {
                    name: name.to_owned(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
    }
    Ok(())
}

/// Writes the module's variables of `spec` into the executor container, each under
/// [`GUEST_ENV_PREFIX`]: values written out, keys of ConfigMaps and Secrets as `valueFrom`,
/// whole ones as `envFrom` (so the Job names a Secret, never holds its value). Whatever the
/// template wrote under that prefix is removed first: the module gets exactly what its event
/// declares (the dispatcher has checked that each Secret is granted to modules).
fn set_guest_env(job: &mut BatchJob, spec: &EventSpec) {
    let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    let guest = |name: &str| name.starts_with(GUEST_ENV_PREFIX);
    for container in &mut pod.containers {
        if let Some(env) = container.env.as_mut() {
            env.retain(|var| !guest(&var.name));
        }
        if let Some(from) = container.env_from.as_mut() {
            from.retain(|from| !from.prefix.as_deref().is_some_and(guest));
            if from.is_empty() {
                container.env_from = None;
            }
        }
        if container.name != policy::EXEC_CONTAINER {
            continue;
        }
        let (env, from) = guest_env(spec);
        if !env.is_empty() {
            container.env.get_or_insert_with(Vec::new).extend(env);
        }
        if !from.is_empty() {
            container.env_from.get_or_insert_with(Vec::new).extend(from);
        }
    }
}

/// The executor container's entries for the module's variables of `spec`.
pub fn guest_env(spec: &EventSpec) -> (Vec<EnvVar>, Vec<EnvFromSource>) {
    let env = spec.env.iter().map(|var| {
        let source = var.value_from.as_ref();
        EnvVar {
            name: format!("{GUEST_ENV_PREFIX}{}", var.name),
            value: match source {
                Some(_) => None,
                None => Some(var.value.clone().unwrap_or_default()),
            },
            value_from: source.map(|from| EnvVarSource {
                config_map_key_ref: from.config_map_key_ref.as_ref().map(|r| {
                    ConfigMapKeySelector {
                        name: r.name.clone(),
                        key: r.key.clone(),
                        optional: r.optional,
                    }
                }),
                secret_key_ref: from.secret_key_ref.as_ref().map(|r| SecretKeySelector {
                    name: r.name.clone(),
                    key: r.key.clone(),
                    optional: r.optional,
                }),
                ..EnvVarSource::default()
            }),
        }
    });
    let from = spec.env_from.iter().map(|from| EnvFromSource {
        prefix: Some(format!(
            "{GUEST_ENV_PREFIX}{}",
            from.prefix.as_deref().unwrap_or_default()
        )),
        config_map_ref: from.config_map_ref.as_ref().map(|r| ConfigMapEnvSource {
            name: r.name.clone(),
            optional: r.optional,
        }),
        secret_ref: from.secret_ref.as_ref().map(|r| SecretEnvSource {
            name: r.name.clone(),
            optional: r.optional,
        }),
    });
    (env.collect(), from.collect())
}

/// The Job `templates/job.yaml.hbs` renders for `context`, built directly as the typed Job
/// (the dispatch path without a custom template: no render, no parse, no JSON in between). The
/// template stays the reference: a test renders both for many batches and requires them equal.
pub fn default_job(context: &TemplateContext) -> BatchJob {
    let owner = &context.owner;
    let module = &context.module;
    let restricted = || SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    };
    let meta = || ObjectMeta {
        labels: Some(context.labels.clone()),
        annotations: Some(context.annotations.clone()),
        ..ObjectMeta::default()
    };
    let container = Container {
        name: policy::EXEC_CONTAINER.into(),
        image: Some(context.image.clone()),
        args: Some(context.args.clone()),
        env: Some(
            context
                .env
                .iter()
                .map(|entry| EnvVar {
                    name: entry.name.clone(),
                    value: Some(entry.value.clone()),
                    value_from: None,
                })
                .collect(),
        ),
        resources: Some(context.resources.clone()),
        termination_message_policy: Some("File".into()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(restricted()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "module".into(),
            mount_path: module["dir"].clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    BatchJob {
        metadata: ObjectMeta {
            name: Some(context.name.clone()),
            namespace: Some(context.namespace.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: owner["apiVersion"].clone(),
                kind: owner["kind"].clone(),
                name: owner["name"].clone(),
                uid: owner["uid"].clone(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..meta()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(context.backoff_limit),
            active_deadline_seconds: Some(context.active_deadline_seconds),
            ttl_seconds_after_finished: Some(context.ttl_seconds_after_finished),
            pod_failure_policy: Some(policy::pod_failure_policy()),
            template: PodTemplateSpec {
                metadata: Some(meta()),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(restricted()),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "module".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: module["configMap"].clone(),
                            items: Some(vec![KeyToPath {
                                key: module["key"].clone(),
                                path: module["key"].clone(),
                                mode: None,
                            }]),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// Checks a resource's template (`None`: the default) before any event is dispatched:
/// renders, for each declared event, the largest batch it can get (`maxEvents` events of the
/// longest ids, [`MAX_EVENTS_BYTES`] of events escaped at the worst case) and a single event
/// of the same size, and runs the same checks as a dispatch. A template that passes cannot
/// fail them for a real batch, whose values are never larger. The error names the event and
/// what is wrong.
pub fn check_template(
    renderer: &Renderer,
    owner: &std::sync::Arc<JobicoJob>,
    template: Option<&str>,
) -> Result<(), String> {
    if let Some(source) = template {
        BoundedTemplate::compile(source).map_err(|e| format!("template: {e}"))?;
    }
    for spec in &owner.spec.events {
        let most = spec.batch.as_ref().map_or(1, |b| b.max_events.max(1)) as usize;
        let mut sizes = vec![1, most];
        sizes.dedup();
        for size in sizes {
            let batch = probe(owner, &spec.name, size);
            // With an artifact, as most Jobs will have (and an uploaded module's reference when
            // the module is one): their variables count in the execve bound.
            let delivery = ModuleDelivery {
                artifact: Some(probe_artifact()),
                uploaded: matches!(
                    spec.module_ref(),
                    Some(jobico_model::ModuleRef::Uploaded(_))
                )
                .then(probe_uploaded),
            };
            renderer
                .render_with_module(&batch, template, &delivery)
                .map_err(|e| format!("event {:?}: {e}", spec.name))?;
        }
    }
    Ok(())
}

/// [`check_template`] with the renderer that creates the Jobs, remembering each resource's
/// last result: a resource whose generation and template source did not change is not
/// rendered again (a check renders up to 1 MiB per event).
#[derive(Debug)]
pub struct TemplateChecker {
    renderer: Renderer,
    /// Per resource uid: what was checked and the result.
    last: Mutex<HashMap<String, Checked>>,
}

/// A resource's generation and template digest, and the result of checking them.
type Checked = (String, Result<(), String>);

impl TemplateChecker {
    /// A checker rendering with `renderer`.
    pub fn new(renderer: Renderer) -> Self {
        Self {
            renderer,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// [`check_template`], or its remembered result.
    pub fn check(
        &self,
        owner: &std::sync::Arc<JobicoJob>,
        template: Option<&str>,
    ) -> Result<(), String> {
        let uid = owner.metadata.uid.clone().unwrap_or_default();
        let digest = template.map(|t| hex::encode(Sha256::digest(t.as_bytes())));
        let seen = format!("{:?}/{digest:?}", owner.metadata.generation);
        if let Some((at, result)) = self.last.lock().expect("template checks").get(&uid)
            && *at == seen
        {
            return result.clone();
        }
        let result = check_template(&self.renderer, owner, template);
        self.last
            .lock()
            .expect("template checks")
            .insert(uid, (seen, result.clone()));
        result
    }
}

/// A batch of `size` events of `event` with the longest ids and, together, the most events
/// text a Job carries, made of `"` characters (each doubles when escaped, twice over).
/// Bytes of artifact URL the template check allows for: the longest base URL, the path, a
/// 63-character namespace, `/` and an object name (64 hex digits, `.`, a 16-digit tag).
const PROBE_ARTIFACT_URL_BYTES: usize =
    crate::artifacts::MAX_BASE_URL_BYTES + crate::artifacts::PATH_PREFIX.len() + 63 + 1 + 81;

/// An artifact reference at least as large as any the dispatcher writes into a Job.
fn probe_artifact() -> ArtifactRef {
    use jobico_common::executor::Sha256Digest;
    ArtifactRef {
        url: format!("http://{}", "a".repeat(PROBE_ARTIFACT_URL_BYTES - 7)),
        digest: Sha256Digest([0; 32]),
        module: Sha256Digest([0; 32]),
        // Hex of HMAC-SHA256.
        token: "0".repeat(64),
    }
}

/// An uploaded-module reference at least as large as any the dispatcher writes into a Job.
fn probe_uploaded() -> UploadedModuleRef {
    let artifact = probe_artifact();
    UploadedModuleRef {
        url: artifact.url,
        digest: artifact.module,
        token: artifact.token,
    }
}

fn probe(owner: &std::sync::Arc<JobicoJob>, event: &str, size: usize) -> Batch {
    let id = |i: usize| {
        let digits = format!("{i}");
        format!(
            "p{}{digits}",
            "0".repeat(MAX_EVENT_ID_LEN - 1 - digits.len())
        )
    };
    // One item is `{"id":"<id>","data":"<quotes>"}`: 19 bytes and the id around the data, each
    // quote escaped to 2 bytes; the array adds brackets and commas.
    let framing = 2 + size * (19 + MAX_EVENT_ID_LEN) + (size - 1);
    let quotes = MAX_EVENTS_BYTES.saturating_sub(framing) / (2 * size);
    let namespace = owner.metadata.namespace.clone().unwrap_or_default();
    Batch {
        owner: owner.clone(),
        event: event.to_owned(),
        events: (0..size)
            .map(|i| EventRecord {
                id: EventId::parse(id(i)).expect("probe ids are valid"),
                namespace: namespace.clone(),
                event: event.to_owned(),
                data: Value::String("\"".repeat(quotes)),
                attributes: BTreeMap::new(),
            })
            .collect(),
    }
}
