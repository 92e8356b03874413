//! The Kubernetes backend: one `batch/v1` Job per batch, created idempotently.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobico_model::Job as JobicoJob;
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use crate::backend::{Backend, Batch, DispatchError, Dispatched, keys};
use crate::render::{DEFAULT_TEMPLATE_KEY, RenderError, Renderer};

/// Field manager name on every write.
pub const FIELD_MANAGER: &str = "jobico-dispatcher";
/// How long a template read from a ConfigMap is reused before it is read again: edits take
/// effect within this time, and a busy event type reads it at most this often.
const TEMPLATE_TTL: Duration = Duration::from_secs(30);

/// A (namespace, event) pair.
type EventKey = (String, String);
/// A template ConfigMap key: (namespace, ConfigMap name, data key).
type TemplateKey = (String, String, String);

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

    /// How many Jobs of `namespace/event` are active.
    pub fn count(&self, namespace: &str, event: &str) -> usize {
        self.0
            .lock()
            .expect("active jobs lock")
            .get(&(namespace.to_owned(), event.to_owned()))
            .map_or(0, HashSet::len)
    }
}

/// Creates Kubernetes Jobs.
pub struct KubeBackend {
    client: kube::Client,
    renderer: Renderer,
    templates: Mutex<HashMap<TemplateKey, (Instant, String)>>,
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

/// Sorts an API error into retryable (with the server's `Retry-After`) or permanent.
pub fn classify(error: kube::Error) -> DispatchError {
    match error {
        kube::Error::Api(status) => {
            let reason = format!("{} ({}): {}", status.code, status.reason, status.message);
            match status.code {
                // Invalid object or request: the same body fails the same way.
                400 | 422 => DispatchError::Permanent { reason },
                429 => DispatchError::Retryable {
                    reason,
                    retry_after: status
                        .details
                        .as_ref()
                        .map(|d| d.retry_after_seconds)
                        .filter(|s| *s > 0)
                        .map(|s| Duration::from_secs(s.into())),
                },
                // 401/403 (RBAC being fixed), 404 (namespace or ConfigMap being created),
                // 409 conflicts and 5xx may all pass; attempts are bounded.
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
            active: ActiveJobs::default(),
        }
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
    let map = match maps.get_opt(&reference.name).await {
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
        // The pod policy runs inside `render`, on the typed Job about to be created.
        let job = self
            .renderer
            .render(batch, template.as_deref())
            .map_err(render_failure)?;
        let name = batch.job_name();
        let jobs: Api<BatchJob> = Api::namespaced(self.client.clone(), batch.namespace());
        let params = PostParams {
            dry_run: false,
            field_manager: Some(FIELD_MANAGER.to_owned()),
        };
        match jobs.create(&params, &job).await {
            Ok(_) => {
                self.active
                    .set(batch.namespace(), &batch.event, &name, true);
                Ok(Dispatched {
                    job: name,
                    created: true,
                })
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let existing = jobs.get(&name).await.map_err(classify)?;
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
        match jobs.get_opt(job).await.map_err(classify)? {
            Some(existing) => Ok(job_ids(&existing).iter().any(|held| held == id)),
            None => Ok(false),
        }
    }

    fn active(&self, namespace: &str, event: &str) -> usize {
        self.active.count(namespace, event)
    }
}
