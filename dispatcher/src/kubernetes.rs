//! The Kubernetes backend: one `batch/v1` Job per batch, created idempotently. Every API call
//! is bounded by [`API_TIMEOUT`]; a call that times out is a transient failure.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobico_common::executor::UploadedModuleRef;
use jobico_model::{Job as JobicoJob, ModuleRef};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use crate::artifacts::{Artifacts, Compiled};
use crate::backend::{Backend, Batch, DispatchError, Dispatched, keys};
use crate::inputs;
use crate::render::{DEFAULT_TEMPLATE_KEY, ModuleDelivery, RenderError, Renderer};
use crate::trust::Signer;

/// Field manager name on every write.
pub const FIELD_MANAGER: &str = "jobico-dispatcher";

/// Parameters of every create and replace: a real write, as [`FIELD_MANAGER`].
pub fn post_params() -> PostParams {
    PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    }
}

/// How long a template read from a ConfigMap is reused before it is read again: edits take
/// effect within this time, and a busy event type reads it at most this often.
const TEMPLATE_TTL: Duration = Duration::from_secs(30);
/// How long a module ConfigMap check is reused: a module added while events are held is
/// noticed within this time, and a busy event type reads its ConfigMap at most this often.
const MODULE_CHECK_TTL: Duration = Duration::from_secs(5);
/// Longest any one API call may take. kube's client has no read timeout of its own, and a call
/// that hangs would keep a batch (and its claims) in hand for ever.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a claim a create sent for it may still land: our own bound on the call plus
/// kube-apiserver's default request timeout (60 s), with room to spare.
pub const CLAIM_SETTLE: Duration = Duration::from_secs(120);

/// A (namespace, event) pair.
type EventKey = (String, String);
/// A template ConfigMap key: (namespace, ConfigMap name, data key).
type TemplateKey = (String, String, String);
/// A module check key: (namespace, ConfigMap name, data key).
type ModuleKey = (String, String, String);
/// An environment check key: (namespace, the event's `env` and `envFrom` as JSON).
type EnvKey = (String, String);

/// Active Jobs per (namespace, event), kept by the state tracker's Job watch and by creates.
#[derive(Debug, Clone, Default)]
pub struct ActiveJobs(Arc<Mutex<HashMap<EventKey, HashSet<String>>>>);

impl ActiveJobs {
    /// Marks Job `name` of `namespace/event` active (`true`) or finished (`false`).
    pub fn set(&self, namespace: &str, event: &str, name: &str, active: bool) {
        let mut map = self.0.lock().expect("active jobs lock");
        let key = (namespace.to_owned(), event.to_owned());
        if active {
            map.entry(key).or_default().insert(name.to_owned());
        } else if let Some(names) = map.get_mut(&key) {
            names.remove(name);
        }
    }

    /// Replaces every count by the given active Jobs `(namespace, event, name)` (after a
    /// relist, so a deletion missed during a watch gap does not leak a slot).
    pub fn replace<'a>(&self, jobs: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) {
        let mut fresh: HashMap<EventKey, HashSet<String>> = HashMap::new();
        for (namespace, event, name) in jobs {
            fresh
                .entry((namespace.to_owned(), event.to_owned()))
                .or_default()
                .insert(name.to_owned());
        }
        *self.0.lock().expect("active jobs lock") = fresh;
    }

    /// How many Jobs of `namespace/event` are active.
    pub fn count(&self, namespace: &str, event: &str) -> usize {
        self.0
            .lock()
            .expect("active jobs lock")
            .get(&(namespace.to_owned(), event.to_owned()))
            .map_or(0, HashSet::len)
    }
}

/// What the module check found: what keeps the module from running, and its artifact.
#[derive(Debug, Clone, Default)]
struct ModuleCheck {
    problem: Option<String>,
    compiled: Option<Compiled>,
    /// The uploaded module, for a resource whose `wasm` names one.
    uploaded: Option<UploadedModuleRef>,
}

/// Creates Kubernetes Jobs.
pub struct KubeBackend {
    client: kube::Client,
    renderer: Renderer,
    templates: Mutex<HashMap<TemplateKey, (Instant, String)>>,
    modules: Mutex<HashMap<ModuleKey, (Instant, ModuleCheck)>>,
    env_checks: Mutex<HashMap<EnvKey, (Instant, Option<String>)>>,
    artifacts: Option<Arc<Artifacts>>,
    module_check_ttl: Duration,
    claim_settle: Duration,
    signer: Signer,
    /// Active Jobs, for concurrency caps.
    pub active: ActiveJobs,
}

impl std::fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeBackend")
            .field("renderer", &self.renderer)
            .finish()
    }
}

/// The event ids a Job carries, from its annotation.
pub fn job_ids(job: &BatchJob) -> Vec<String> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::EVENT_IDS))
        .map(|ids| {
            ids.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one API call, bounded by [`API_TIMEOUT`]; a timeout is a transient failure, an API
/// error is [`classify`]d.
pub async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, DispatchError> {
    within_timeout(what, call).await?.map_err(classify)
}

/// [`bounded`] that hands the API's own answer back, for a caller that tells some errors
/// apart (a create answered `AlreadyExists`); only a timeout becomes a transient failure.
pub async fn within_timeout<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, DispatchError> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| DispatchError::Retryable {
            reason: format!("{what}: the Kubernetes API did not answer within {API_TIMEOUT:?}"),
            retry_after: None,
        })
}

/// Sorts an API error into transient (retried for as long as it lasts, with the server's
/// `Retry-After`) or permanent (the events are dead-lettered). Only a refusal of the object
/// itself is permanent: the same body fails the same way.
pub fn classify(error: kube::Error) -> DispatchError {
    match error {
        kube::Error::Api(status) => {
            let reason = format!("{} ({}): {}", status.code, status.reason, status.message);
            match status.code {
                // Malformed or invalid object, or one too large: the same body fails again.
                400 | 413 | 422 => DispatchError::Permanent { reason },
                429 => DispatchError::Retryable {
                    reason,
                    retry_after: status
                        .details
                        .as_ref()
                        .map(|d| d.retry_after_seconds)
                        .filter(|s| *s > 0)
                        .map(|s| Duration::from_secs(s.into())),
                },
                // 401/403 (credentials or RBAC being fixed, a quota full), 404 (a namespace
                // or ConfigMap being created), 408, 409 conflicts and 5xx all pass: the
                // events wait in the stream meanwhile.
                _ => DispatchError::Retryable {
                    reason,
                    retry_after: None,
                },
            }
        }
        other => DispatchError::Retryable {
            reason: other.to_string(),
            retry_after: None,
        },
    }
}

impl KubeBackend {
    /// A backend creating Jobs through `client` that run `renderer`'s image.
    pub fn new(client: kube::Client, renderer: Renderer) -> Self {
        Self {
            client,
            renderer,
            templates: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            env_checks: Mutex::new(HashMap::new()),
            artifacts: None,
            module_check_ttl: MODULE_CHECK_TTL,
            claim_settle: CLAIM_SETTLE,
            signer: Signer::ephemeral(),
            active: ActiveJobs::default(),
        }
    }

    /// The same backend signing its Jobs with `signer` (by default a key of its own; the
    /// dispatcher shares one with its state tracker and the other replicas).
    pub fn with_signer(mut self, signer: Signer) -> Self {
        self.signer = signer;
        self
    }

    /// The same backend handing its Jobs the dispatcher's compiled modules.
    pub fn with_artifacts(mut self, artifacts: Arc<Artifacts>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// The signer of this backend's Jobs.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The same backend reusing a module check for `ttl` instead of [`MODULE_CHECK_TTL`]
    /// (tests use zero, to see each change at once).
    pub fn with_module_check_ttl(mut self, ttl: Duration) -> Self {
        self.module_check_ttl = ttl;
        self
    }

    /// The same backend with another [`Backend::claim_settle`] (tests use a short one).
    pub fn with_claim_settle(mut self, settle: Duration) -> Self {
        self.claim_settle = settle;
        self
    }

    /// What keeps the batch's module from running (see [`inputs::module_problem`]) and its
    /// compiled artifact, from a check at most [`MODULE_CHECK_TTL`] old.
    async fn module_check(&self, batch: &Batch) -> Result<ModuleCheck, DispatchError> {
        let Some(spec) = batch.spec() else {
            return Ok(ModuleCheck::default());
        };
        let namespace = batch.namespace().to_owned();
        let name = batch.owner.modules_config_map();
        let key = (namespace.clone(), name.clone(), spec.wasm.clone());
        if let Some((at, check)) = self.modules.lock().expect("module cache").get(&key)
            && at.elapsed() < self.module_check_ttl
        {
            return Ok(check.clone());
        }
        let check = match spec.module_ref() {
            Some(ModuleRef::Uploaded(digest)) => {
                let problem = tokio::time::timeout(
                    API_TIMEOUT,
                    inputs::uploaded_module_problem(
                        self.artifacts.as_deref(),
                        &batch.owner,
                        spec,
                        digest,
                    ),
                )
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|read| read.map_err(|e| e.to_string()))
                .map_err(|reason| DispatchError::Retryable {
                    reason: format!("looking up uploaded module sha256:{digest}: {reason}"),
                    retry_after: None,
                })?;
                match (problem, &self.artifacts) {
                    (None, Some(artifacts)) => ModuleCheck {
                        problem: None,
                        compiled: artifacts.request_uploaded(&namespace, digest),
                        uploaded: Some(artifacts.uploaded(&namespace, digest)),
                    },
                    (problem, _) => ModuleCheck {
                        problem: Some(problem.unwrap_or_else(|| {
                            "uploaded modules need the artifact server".to_owned()
                        })),
                        ..ModuleCheck::default()
                    },
                }
            }
            _ => {
                let map = bounded(
                    &format!("reading ConfigMap {namespace}/{name}"),
                    inputs::config_map(&self.client, &namespace, &name),
                )
                .await?;
                let problem = inputs::module_problem(&batch.owner, spec, map.as_ref());
                let compiled = match (&problem, &self.artifacts, &map) {
                    (None, Some(artifacts), Some(map)) => {
                        inputs::module_bytes(spec, map).and_then(|bytes| artifacts.request(bytes))
                    }
                    _ => None,
                };
                ModuleCheck {
                    problem,
                    compiled,
                    uploaded: None,
                }
            }
        };
        self.modules
            .lock()
            .expect("module cache")
            .insert(key, (Instant::now(), check.clone()));
        Ok(check)
    }

    /// What keeps the module's variables of the batch's event from being given to it (see
    /// [`inputs::env_problems`]), from a check at most the module check's TTL old: a Secret
    /// created or granted while events are held is noticed within that time.
    async fn env_check(&self, batch: &Batch) -> Result<Option<String>, DispatchError> {
        let Some(spec) = batch.spec().filter(|spec| spec.env_has_references()) else {
            return Ok(None);
        };
        let namespace = batch.namespace().to_owned();
        let declared = serde_json::to_string(&(&spec.env, &spec.env_from))
            .expect("the environment serialises");
        let key = (namespace.clone(), declared);
        if let Some((at, problem)) = self.env_checks.lock().expect("env cache").get(&key)
            && at.elapsed() < self.module_check_ttl
        {
            return Ok(problem.clone());
        }
        let problems = bounded(
            &format!(
                "reading the ConfigMaps and Secrets of event {namespace}/{}",
                spec.name
            ),
            inputs::env_problems(&self.client, &namespace, spec),
        )
        .await?;
        let problem = (!problems.is_empty()).then(|| problems.join("; "));
        self.env_checks
            .lock()
            .expect("env cache")
            .insert(key, (Instant::now(), problem.clone()));
        Ok(problem)
    }

    /// The resource's own template source, if it names one (read from its ConfigMap, cached
    /// for [`TEMPLATE_TTL`]).
    async fn template(&self, batch: &Batch) -> Result<Option<String>, DispatchError> {
        let Some(reference) = &batch.owner.spec.template else {
            return Ok(None);
        };
        let namespace = batch.namespace().to_owned();
        let key = reference
            .key
            .clone()
            .unwrap_or_else(|| DEFAULT_TEMPLATE_KEY.to_owned());
        let cache_key = (namespace.clone(), reference.name.clone(), key.clone());
        if let Some((at, source)) = self
            .templates
            .lock()
            .expect("template cache")
            .get(&cache_key)
            && at.elapsed() < TEMPLATE_TTL
        {
            return Ok(Some(source.clone()));
        }
        let source = match read_template(&self.client, &batch.owner).await {
            Ok(source) => source,
            Err(TemplateSourceError::Missing(reason)) => {
                return Err(DispatchError::Held { reason });
            }
            Err(TemplateSourceError::Api(error)) => return Err(classify(error)),
        };
        if let Some(source) = &source {
            self.templates
                .lock()
                .expect("template cache")
                .insert(cache_key, (Instant::now(), source.clone()));
        }
        Ok(source)
    }
}

/// Why a resource's template could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TemplateSourceError {
    /// The ConfigMap or its key does not exist: the resource must be fixed.
    #[error("{0}")]
    Missing(String),
    /// The API call failed.
    #[error("reading the template ConfigMap: {0}")]
    Api(#[source] kube::Error),
}

/// The template source `owner` names in `spec.template` (None when it names none), read from
/// its ConfigMap.
pub async fn read_template(
    client: &kube::Client,
    owner: &JobicoJob,
) -> Result<Option<String>, TemplateSourceError> {
    let Some(reference) = &owner.spec.template else {
        return Ok(None);
    };
    let namespace = owner.metadata.namespace.as_deref().unwrap_or("default");
    let key = reference.key.as_deref().unwrap_or(DEFAULT_TEMPLATE_KEY);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = match tokio::time::timeout(API_TIMEOUT, maps.get_opt(&reference.name))
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                "reading the template ConfigMap timed out".into(),
            ))
        }) {
        Ok(Some(map)) => map,
        Ok(None) => {
            return Err(TemplateSourceError::Missing(format!(
                "template ConfigMap {namespace}/{} not found",
                reference.name
            )));
        }
        Err(error) => return Err(TemplateSourceError::Api(error)),
    };
    map.data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
        .map(Some)
        .ok_or_else(|| {
            TemplateSourceError::Missing(format!(
                "template ConfigMap {namespace}/{} has no key {key:?}",
                reference.name
            ))
        })
}

/// Creates `job` in `namespace` as [`Api::create`] does (same request, same errors), reading
/// nothing of the API server's answer but its status: the created object is not used, and
/// parsing it back into a typed Job costs about as much as building it.
pub async fn create_job(
    client: &kube::Client,
    namespace: &str,
    job: &BatchJob,
) -> Result<(), kube::Error> {
    let body = serde_json::to_vec(job).map_err(kube::Error::SerdeError)?;
    let url = <BatchJob as kube::Resource>::url_path(&(), Some(namespace));
    let mut request = kube::core::Request::new(url)
        .create(&post_params(), body)
        .map_err(kube::Error::BuildRequest)?;
    request.extensions_mut().insert("create");
    client.request_text(request).await.map(drop)
}

/// What a failed render means for the events: held when the template (or the resource's
/// settings it renders) is at fault, dead-lettered when the events themselves cannot run.
pub fn render_failure(error: RenderError) -> DispatchError {
    let reason = error.to_string();
    if error.is_template_fault() {
        DispatchError::Held { reason }
    } else {
        DispatchError::Permanent { reason }
    }
}

impl Backend for KubeBackend {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        let template = self.template(batch).await?;
        let delivery = match &self.artifacts {
            Some(artifacts) => {
                let check = self.module_check(batch).await?;
                ModuleDelivery {
                    artifact: check
                        .compiled
                        .map(|compiled| artifacts.reference(batch.namespace(), &compiled)),
                    uploaded: check.uploaded,
                }
            }
            None => ModuleDelivery::default(),
        };
        // The pod policy runs inside `render`, on the typed Job about to be created.
        let mut job = self
            .renderer
            .render_with_module(batch, template.as_deref(), &delivery)
            .map_err(render_failure)?;
        self.signer.sign_job(&mut job);
        let name = batch.job_name();
        let create = create_job(&self.client, batch.namespace(), &job);
        match within_timeout(&format!("creating Job {name}"), create).await? {
            Ok(()) => {
                self.active
                    .set(batch.namespace(), &batch.event, &name, true);
                Ok(Dispatched {
                    job: name,
                    created: true,
                })
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let jobs: Api<BatchJob> = Api::namespaced(self.client.clone(), batch.namespace());
                let existing = bounded(&format!("reading Job {name}"), jobs.get(&name)).await?;
                if !self.signer.verify(&existing) {
                    // Someone else's Job under the name this batch must use: never take it
                    // for ours; the events wait until it is gone.
                    return Err(DispatchError::Held {
                        reason: format!(
                            "a Job {}/{name} that Jobico did not create holds the name of this batch's Job; delete it",
                            batch.namespace()
                        ),
                    });
                }
                let ids = job_ids(&existing);
                if ids.iter().map(String::as_str).eq(batch.ids()) {
                    Ok(Dispatched {
                        job: name,
                        created: false,
                    })
                } else {
                    Err(DispatchError::Taken { job: name, ids })
                }
            }
            Err(error) => Err(classify(error)),
        }
    }

    async fn holds(&self, namespace: &str, job: &str, id: &str) -> Result<bool, DispatchError> {
        let jobs: Api<BatchJob> = Api::namespaced(self.client.clone(), namespace);
        match bounded(&format!("reading Job {job}"), jobs.get_opt(job)).await? {
            Some(existing) => {
                Ok(self.signer.verify(&existing)
                    && job_ids(&existing).iter().any(|held| held == id))
            }
            None => Ok(false),
        }
    }

    async fn ready(&self, batch: &Batch) -> Result<(), DispatchError> {
        if let Some(reason) = self.module_check(batch).await?.problem {
            return Err(DispatchError::Held { reason });
        }
        match self.env_check(batch).await? {
            Some(reason) => Err(DispatchError::Held { reason }),
            None => Ok(()),
        }
    }

    fn claim_settle(&self) -> Duration {
        self.claim_settle
    }

    fn active(&self, namespace: &str, event: &str) -> usize {
        self.active.count(namespace, event)
    }
}
