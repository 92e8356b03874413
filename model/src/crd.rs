//! The custom resource types. `crds/job.yaml` is generated from them (`jobico crd`).

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::env::{EnvFromSource, EnvVar};
pub use crate::routes::Route;
pub use crate::sink::Sink;

/// Pattern for event names: alphanumeric, 1 to 10 characters (JobicoK8S's documented rule).
pub const EVENT_NAME_PATTERN: &str = "^[A-Za-z0-9]{1,10}$";
/// Pattern for `wasm`: a module file name, a ConfigMap key (`[-._a-zA-Z0-9]+`) with a length
/// cap, or `sha256:<digest>` of an uploaded module.
pub const MODULE_FILE_PATTERN: &str = "^([-._A-Za-z0-9]{1,253}|sha256:[0-9a-f]{64})$";
/// Most events one Job resource may declare; bounds the work per reconcile and CRD validation cost.
pub const MAX_EVENTS_PER_JOB: usize = 64;
/// Most `env` entries of one event: each may name an object the dispatcher reads to check
/// it, so a resource cannot make it read without bound.
pub const MAX_ENV_VARS: usize = 64;
/// Most `envFrom` sources of one event (each a whole ConfigMap or Secret read per check).
pub const MAX_ENV_FROM: usize = 16;
/// Largest batch a single Kubernetes Job may carry. Events travel inside the Job object, whose
/// size Kubernetes caps near 1.5 MiB, so batches stay small.
pub const MAX_BATCH_EVENTS: u32 = 100;

/// Desired state of a Jobico `Job`: the events it declares and how their Kubernetes Jobs look.
// Each `printcolumn(...)` repeats `type_ = ...`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "jobico.coeux.dev",
    version = "v1",
    kind = "Job",
    plural = "jobs",
    singular = "job",
    namespaced,
    status = "JobStatus",
    shortname = "jobico",
    category = "jobico",
    doc = "A set of events, each with a WebAssembly module and a JSON Schema.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(name = "Events", type_ = "integer", json_path = ".status.events"),
    printcolumn(
        name = "Dispatched",
        type_ = "integer",
        json_path = ".status.dispatched"
    ),
    printcolumn(name = "Succeeded", type_ = "integer", json_path = ".status.succeeded"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// The events this resource declares. Names are unique within the list.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub events: Vec<EventSpec>,
    /// ConfigMap whose `binaryData` holds the modules, keyed by file name (default `<name>-modules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<String>,
    /// Handlebars template overriding the built-in Kubernetes Job template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// Compute resources of the executor container (default: 100m CPU, 64Mi..128Mi memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Seconds a Kubernetes Job may run before it is stopped (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Pod retries after a host failure (default 2; guest failures are never retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: Option<i32>,
    /// Seconds a finished Kubernetes Job is kept before deletion (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// One event type.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventSpec {
    /// Event name, used in `PUT /execute/<namespace>/<name>`: 1 to 10 letters or digits, unique
    /// in the namespace.
    #[schemars(regex(pattern = "^[A-Za-z0-9]{1,10}$"))]
    pub name: String,
    /// The WebAssembly module that handles the event: a key (file name) of the module
    /// ConfigMap, or `sha256:<digest>` of a module uploaded to the namespace's module store
    /// (`jobico module upload`), for modules above a ConfigMap's 1 MiB.
    #[schemars(regex(pattern = "^([-._A-Za-z0-9]{1,253}|sha256:[0-9a-f]{64})$"))]
    pub wasm: String,
    /// Accepted for compatibility with JobicoK8S manifests; not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Where the event's JSON Schema is.
    pub schema: SchemaRef,
    /// Grouping of events into one Kubernetes Job (default: one event per Job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
    /// Most Kubernetes Jobs of this event running at once; further events wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency: Option<u32>,
    /// Limits applied to each run of the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<EventLimits>,
    /// Environment variables granted to the module (it sees none otherwise): written-out
    /// values, or keys of ConfigMaps and Secrets of the namespace, as in a Kubernetes
    /// container. They replace same-named variables from `envFrom`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Every key of ConfigMaps and Secrets of the namespace as variables of the module, as in
    /// a Kubernetes container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub env_from: Vec<EnvFromSource>,
    /// Events of the same namespace that receive this event's outcome: its result parsed as
    /// JSON on success, an object describing the failure on failure. Routes may not form a
    /// cycle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub then: Vec<Route>,
    /// Where each outcome of this event is POSTed as a CloudEvent, retried until it is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<Sink>,
}

/// Reference to a JSON Schema in a ConfigMap, the shape of a `ConfigMapKeySelector`.
///
/// With `key` alone (JobicoK8S's behaviour) the ConfigMap is named `key` and holds `<key>.json`.
/// With `name` too, the ConfigMap is `name` and the data key is `key` itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRef {
    /// Data key, or the ConfigMap's name when `name` is absent.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// ConfigMap name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When true and the schema is missing, the event accepts any JSON value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

impl SchemaRef {
    /// Name of the ConfigMap holding the schema.
    pub fn config_map_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.key)
    }

    /// Data key of the schema inside that ConfigMap.
    pub fn data_key(&self) -> String {
        match &self.name {
            Some(_) => self.key.clone(),
            None => format!("{}.json", self.key),
        }
    }

    /// Whether a missing schema is allowed.
    pub fn is_optional(&self) -> bool {
        self.optional.unwrap_or(false)
    }
}

/// How events are grouped into Kubernetes Jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Most events in one Kubernetes Job.
    #[schemars(range(min = 1, max = 100))]
    pub max_events: u32,
    /// Longest wait, in milliseconds, for a batch to fill before it is dispatched (default
    /// 1000). 0 is adaptive: no wait when the consumer is idle (a lone event goes at once),
    /// while Jobs are being created the next batch gathers what arrives meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub max_wait_millis: Option<u32>,
    /// Most bytes of event data in one Kubernetes Job (default 262144).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_bytes: Option<u32>,
}

/// Limits for each run of a module.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventLimits {
    /// Linear memory the module may use, in MiB (default 64).
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub memory_mib: Option<u32>,
    /// Wall-clock limit per event, in milliseconds (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub timeout_millis: Option<u64>,
    /// Fuel (roughly, WebAssembly instructions) per event; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub fuel: Option<u64>,
}

/// A handlebars template for the Kubernetes Job, in a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TemplateRef {
    /// ConfigMap name.
    pub name: String,
    /// Data key (default `job.yaml.hbs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Observed state of a Jobico `Job`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Conditions; `Ready` says whether every event can be accepted and dispatched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of events declared.
    #[serde(default)]
    pub events: u32,
    /// Events handed to Kubernetes Jobs.
    #[serde(default)]
    pub dispatched: u64,
    /// Events whose module succeeded.
    #[serde(default)]
    pub succeeded: u64,
    /// Events whose module failed or that were dead-lettered.
    #[serde(default)]
    pub failed: u64,
}

impl Job {
    /// Name of the ConfigMap holding this Job's modules.
    pub fn modules_config_map(&self) -> String {
        match &self.spec.modules {
            Some(name) => name.clone(),
            None => format!(
                "{}-modules",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// The order in which resources claim event names: when two resources in a namespace
    /// declare the same event, the one whose key sorts first (the oldest, then by name) keeps
    /// it. The ingress and the dispatcher both follow this rule.
    pub fn claim_order(&self) -> (Option<Time>, String) {
        (
            self.metadata.creation_timestamp.clone(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// The event declared under `name`, if any.
    pub fn event(&self, name: &str) -> Option<&EventSpec> {
        self.spec.events.iter().find(|e| e.name == name)
    }
}

/// The CustomResourceDefinition as YAML, exactly as committed in `crds/job.yaml`.
pub fn crd_yaml() -> String {
    let crd = <Job as kube::CustomResourceExt>::crd();
    let yaml = serde_yaml::to_string(&crd).expect("a CRD always serialises");
    format!("# Generated by `jobico crd` from model/src/crd.rs; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_ref_resolves_both_forms() {
        let short = SchemaRef {
            key: "schema-ev1".into(),
            name: None,
            optional: None,
        };
        assert_eq!(short.config_map_name(), "schema-ev1");
        assert_eq!(short.data_key(), "schema-ev1.json");
        let explicit = SchemaRef {
            key: "person.json".into(),
            name: Some("schemas".into()),
            optional: Some(true),
        };
        assert_eq!(explicit.config_map_name(), "schemas");
        assert_eq!(explicit.data_key(), "person.json");
        assert!(explicit.is_optional());
    }

    #[test]
    fn modules_config_map_defaults_to_name_suffix() {
        let mut job = Job::new("job-for-ev1", JobSpec::default());
        assert_eq!(job.modules_config_map(), "job-for-ev1-modules");
        job.spec.modules = Some("shared-modules".into());
        assert_eq!(job.modules_config_map(), "shared-modules");
    }

    #[test]
    fn patterns_match_the_schema_attributes() {
        // The schemars attributes need literals; keep the constants in step with them.
        let crd = serde_json::to_string(&<Job as kube::CustomResourceExt>::crd()).unwrap();
        assert!(crd.contains(&EVENT_NAME_PATTERN.replace('\\', "\\\\")));
        assert!(crd.contains(MODULE_FILE_PATTERN));
    }
}
