//! The catalog: which events exist, per namespace, and the compiled schema of each.
//!
//! Built from Job resources and ConfigMaps, either read from manifest files (local mode) or
//! watched in a cluster. A rebuild replaces the whole map at once, so a request sees either the
//! old or the new catalog, never a mixture.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use jobico_model::{EventSpec, Job, Manifest, validate_job};
use k8s_openapi::api::core::v1::ConfigMap;

use crate::schema::{CompiledSchema, SchemaError};

/// Compiled schemas by the SHA-256 of their text, so a catalog rebuild (on every watched
/// change) only compiles schemas whose text changed. Entries unused by the last build are
/// dropped, so the cache never outgrows the catalog.
#[derive(Debug, Default)]
pub struct SchemaCache {
    entries: HashMap<[u8; 32], Result<CompiledSchema, SchemaError>>,
    used: HashSet<[u8; 32]>,
    compiled: u64,
}

impl SchemaCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn compile(&mut self, text: &str) -> Result<CompiledSchema, SchemaError> {
        use sha2::{Digest, Sha256};
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        self.used.insert(hash);
        if let Some(cached) = self.entries.get(&hash) {
            return cached.clone();
        }
        self.compiled += 1;
        let compiled = CompiledSchema::from_text(text);
        self.entries.insert(hash, compiled.clone());
        compiled
    }

    fn finish_build(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.entries.retain(|hash, _| used.contains(hash));
    }

    /// How many schemas were compiled (not taken from the cache) since the cache was made.
    pub fn compiled(&self) -> u64 {
        self.compiled
    }

    /// How many compiled schemas the cache holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One declared event, ready to validate requests.
#[derive(Debug, Clone)]
pub struct EventEntry {
    /// Namespace of the declaring resource.
    pub namespace: String,
    /// Name of the declaring Job resource.
    pub job: String,
    /// The event as declared.
    pub spec: EventSpec,
    /// The compiled schema, or why the event cannot accept anything.
    pub schema: Result<CompiledSchema, String>,
}

/// Events by `(namespace, event name)`.
pub type EventMap = HashMap<(String, String), Arc<EventEntry>>;

/// A problem found while building the catalog, reported by the caller (log line, CR status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogProblem {
    /// Namespace of the Job resource concerned.
    pub namespace: String,
    /// Name of the Job resource concerned.
    pub job: String,
    /// What is wrong.
    pub message: String,
}

/// The live catalog shared by request handlers.
#[derive(Debug, Default)]
pub struct Catalog {
    events: RwLock<Arc<EventMap>>,
}

/// Result of a lookup.
#[derive(Debug)]
pub enum Lookup {
    /// The event exists.
    Found(Arc<EventEntry>),
    /// The namespace declares no events at all.
    UnknownNamespace,
    /// The namespace has events, but not this one.
    UnknownEvent,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole catalog.
    pub fn replace(&self, events: EventMap) {
        *self.events.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(events);
    }

    /// The current map (a snapshot).
    pub fn snapshot(&self) -> Arc<EventMap> {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Finds an event.
    pub fn lookup(&self, namespace: &str, event: &str) -> Lookup {
        let events = self.snapshot();
        if let Some(entry) = events.get(&(namespace.to_string(), event.to_string())) {
            Lookup::Found(entry.clone())
        } else if events.keys().any(|(ns, _)| ns == namespace) {
            Lookup::UnknownEvent
        } else {
            Lookup::UnknownNamespace
        }
    }

    /// Marks an event unusable (e.g. its module does not load); requests for it get a 500
    /// naming the reason. Returns false if the event is not in the catalog.
    pub fn set_unavailable(&self, namespace: &str, event: &str, reason: String) -> bool {
        let mut guard = self.events.write().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), event.to_string());
        let Some(entry) = guard.get(&key) else {
            return false;
        };
        let mut entry = (**entry).clone();
        entry.schema = Err(reason);
        Arc::make_mut(&mut guard).insert(key, Arc::new(entry));
        true
    }
}

/// Builds the event map from Job resources and a ConfigMap lookup.
///
/// Jobs are taken in the order given: when two resources in one namespace declare the same
/// event name, the first keeps it and the other is reported. Callers order them by creation
/// time (cluster) or file order (local). Invalid resources are reported and skipped; an event
/// whose schema cannot be found or compiled is kept with the reason, so requests for it get a
/// clear 500 instead of a 404.
pub fn build<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    config_map: impl Fn(&str, &str) -> Option<&'a ConfigMap>,
) -> (EventMap, Vec<CatalogProblem>) {
    build_cached(jobs, config_map, &mut SchemaCache::new())
}

/// [`build`] reusing the schemas compiled by earlier builds.
pub fn build_cached<'a>(
    jobs: impl IntoIterator<Item = &'a Job>,
    config_map: impl Fn(&str, &str) -> Option<&'a ConfigMap>,
    cache: &mut SchemaCache,
) -> (EventMap, Vec<CatalogProblem>) {
    let mut events = EventMap::new();
    let mut problems = Vec::new();
    for job in jobs {
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        let name = job.metadata.name.clone().unwrap_or_default();
        let problem = |message: String| CatalogProblem {
            namespace: namespace.clone(),
            job: name.clone(),
            message,
        };
        if let Err(invalid) = validate_job(job) {
            problems.push(problem(invalid.problems.join("; ")));
            continue;
        }
        for spec in &job.spec.events {
            let key = (namespace.clone(), spec.name.clone());
            if let Some(owner) = events.get(&key) {
                problems.push(problem(format!(
                    "event {:?} is already declared by Job {namespace}/{}; ignored here",
                    spec.name, owner.job
                )));
                continue;
            }
            let schema = resolve_schema(&namespace, spec, &config_map, cache);
            if let Err(reason) = &schema {
                problems.push(problem(format!("event {:?}: {reason}", spec.name)));
            }
            let entry = EventEntry {
                namespace: namespace.clone(),
                job: name.clone(),
                spec: spec.clone(),
                schema,
            };
            events.insert(key, Arc::new(entry));
        }
    }
    cache.finish_build();
    refuse_cycles(&mut events, &mut problems);
    (events, problems)
}

/// Makes every event on a cycle of routes across a namespace's resources unavailable, with
/// the cycle as the reason (one resource's own cycles never get here: the validation refuses
/// them).
fn refuse_cycles(events: &mut EventMap, problems: &mut Vec<CatalogProblem>) {
    let namespaces: std::collections::BTreeSet<String> =
        events.keys().map(|(ns, _)| ns.clone()).collect();
    for namespace in namespaces {
        let specs: Vec<&EventSpec> = events
            .values()
            .filter(|e| e.namespace == namespace)
            .map(|e| &e.spec)
            .collect();
        let cycles = jobico_model::routes::cycles(specs);
        for cycle in cycles {
            let reason = format!("routes form a cycle ({cycle}): an event would lead to itself");
            for name in cycle
                .split(" → ")
                .collect::<std::collections::BTreeSet<_>>()
            {
                let key = (namespace.clone(), name.to_owned());
                let Some(entry) = events.get(&key) else {
                    continue;
                };
                problems.push(CatalogProblem {
                    namespace: namespace.clone(),
                    job: entry.job.clone(),
                    message: format!("event {name:?}: {reason}"),
                });
                let mut entry = (**entry).clone();
                entry.schema = Err(reason.clone());
                events.insert(key, Arc::new(entry));
            }
        }
    }
}

fn resolve_schema<'a>(
    namespace: &str,
    spec: &EventSpec,
    config_map: &impl Fn(&str, &str) -> Option<&'a ConfigMap>,
    cache: &mut SchemaCache,
) -> Result<CompiledSchema, String> {
    let map_name = spec.schema.config_map_name();
    let key = spec.schema.data_key();
    let text = config_map(namespace, map_name).and_then(|map| map.data.as_ref()?.get(&key));
    match text {
        Some(text) => cache.compile(text).map_err(|e| {
            format!("schema in ConfigMap {namespace}/{map_name} key {key:?} is unusable: {e}")
        }),
        None if spec.schema.is_optional() => Ok(CompiledSchema::accept_all()),
        None => Err(format!(
            "schema ConfigMap {namespace}/{map_name} with key {key:?} not found"
        )),
    }
}

/// Builds the event map from manifests read from files.
pub fn from_manifest(manifest: &Manifest) -> (EventMap, Vec<CatalogProblem>) {
    build(&manifest.jobs, |ns, name| manifest.config_map(ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-ev1}
data:
  schema-ev1.json: '{"type":"object","required":["firstName"]}'
  broken.json: '{"type": 5}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: first}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: schema-ev1}}
    - {name: ev2, wasm: echo.wasm, schema: {name: schema-ev1, key: broken.json}}
    - {name: ev3, wasm: echo.wasm, schema: {key: missing}}
    - {name: ev4, wasm: echo.wasm, schema: {key: missing, optional: true}}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: second}
spec:
  events:
    - {name: ev1, wasm: other.wasm, schema: {key: schema-ev1}}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: invalid}
spec:
  events:
    - {name: bad-name, wasm: x.wasm, schema: {key: s}}
"#;

    fn catalog() -> (Catalog, Vec<CatalogProblem>) {
        let mut manifest = Manifest::default();
        manifest.read_str(Path::new("m.yaml"), MANIFEST).unwrap();
        let (events, problems) = from_manifest(&manifest);
        let catalog = Catalog::new();
        catalog.replace(events);
        (catalog, problems)
    }

    fn found(catalog: &Catalog, event: &str) -> Arc<EventEntry> {
        match catalog.lookup("default", event) {
            Lookup::Found(entry) => entry,
            other => panic!("{event}: {other:?}"),
        }
    }

    #[test]
    fn a_cycle_across_resources_makes_its_events_unavailable() {
        const CYCLE: &str = r#"
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: orders}
spec:
  events:
    - {name: order, wasm: m.wasm, schema: {key: s, optional: true}, then: [{event: invoice}]}
    - {name: lone, wasm: m.wasm, schema: {key: s, optional: true}, then: [{event: order}]}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: billing}
spec:
  events:
    - {name: invoice, wasm: m.wasm, schema: {key: s, optional: true}, then: [{event: order, when: failed}]}
"#;
        let mut manifest = Manifest::default();
        manifest.read_str(Path::new("m.yaml"), CYCLE).unwrap();
        let (events, problems) = from_manifest(&manifest);
        let reason =
            "routes form a cycle (invoice → order → invoice): an event would lead to itself";
        for event in ["order", "invoice"] {
            let entry = &events[&("default".to_owned(), event.to_owned())];
            assert_eq!(entry.schema.as_ref().unwrap_err(), reason, "{event}");
        }
        assert!(
            events[&("default".to_owned(), "lone".to_owned())]
                .schema
                .is_ok()
        );
        let mut named: Vec<_> = problems
            .iter()
            .map(|p| (p.job.as_str(), p.message.as_str()))
            .collect();
        named.sort();
        assert_eq!(
            named,
            [
                ("billing", format!("event \"invoice\": {reason}").as_str()),
                ("orders", format!("event \"order\": {reason}").as_str()),
            ]
        );
    }

    #[test]
    fn resolves_schemas_in_both_reference_forms() {
        let (catalog, _) = catalog();
        let ev1 = found(&catalog, "ev1");
        assert_eq!(ev1.job, "first");
        assert!(ev1.schema.is_ok());
        let ev2 = found(&catalog, "ev2").schema.clone().unwrap_err();
        assert!(
            ev2.contains("default/schema-ev1 key \"broken.json\""),
            "{ev2}"
        );
        let ev3 = found(&catalog, "ev3").schema.clone().unwrap_err();
        assert!(
            ev3.contains("default/missing with key \"missing.json\" not found"),
            "{ev3}"
        );
        assert!(found(&catalog, "ev4").schema.is_ok());
    }

    #[test]
    fn reports_duplicates_and_invalid_jobs() {
        let (catalog, problems) = catalog();
        assert_eq!(
            found(&catalog, "ev1").spec.wasm,
            "echo.wasm",
            "first declaration wins"
        );
        let messages: Vec<_> = problems
            .iter()
            .map(|p| (p.job.as_str(), &p.message))
            .collect();
        assert!(
            messages
                .iter()
                .any(|(job, m)| *job == "second"
                    && m.contains("already declared by Job default/first")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|(job, m)| *job == "invalid" && m.contains("bad-name")),
            "{messages:?}"
        );
        assert!(matches!(
            catalog.lookup("default", "bad-name"),
            Lookup::UnknownEvent
        ));
    }

    #[test]
    fn lookup_distinguishes_namespace_and_event() {
        let (catalog, _) = catalog();
        assert!(matches!(
            catalog.lookup("default", "nope"),
            Lookup::UnknownEvent
        ));
        assert!(matches!(
            catalog.lookup("other", "ev1"),
            Lookup::UnknownNamespace
        ));
    }

    #[test]
    fn rebuilds_reuse_compiled_schemas_and_see_changes() {
        let mut manifest = Manifest::default();
        manifest.read_str(Path::new("m.yaml"), MANIFEST).unwrap();
        let mut cache = SchemaCache::new();
        let build_from = |m: &Manifest, cache: &mut SchemaCache| {
            build_cached(
                &m.jobs,
                |ns, name| maps_lookup(&m.config_maps, ns, name),
                cache,
            )
        };
        let (first, _) = build_from(&manifest, &mut cache);
        // Two distinct texts (schema-ev1.json and broken.json) compiled once each.
        assert_eq!(cache.compiled(), 2);
        let (second, _) = build_from(&manifest, &mut cache);
        assert_eq!(cache.compiled(), 2, "an unchanged rebuild compiles nothing");
        assert_eq!(first.len(), second.len());

        // A changed schema is compiled, takes effect, and the old text leaves the cache.
        let data = manifest.config_maps[0].data.as_mut().unwrap();
        data.insert(
            "schema-ev1.json".into(),
            r#"{"type":"object","required":["other"]}"#.into(),
        );
        let (third, _) = build_from(&manifest, &mut cache);
        assert_eq!(cache.compiled(), 3);
        assert_eq!(cache.len(), 2);
        let ev1 = third[&("default".to_string(), "ev1".to_string())]
            .schema
            .clone()
            .unwrap();
        let v = ev1.violations(0, &serde_json::json!({"firstName": "x"}));
        assert!(v[0].message.contains("other"), "{v:?}");
    }

    fn maps_lookup<'a>(maps: &'a [ConfigMap], ns: &str, name: &str) -> Option<&'a ConfigMap> {
        maps.iter().find(|m| {
            m.metadata.namespace.as_deref() == Some(ns) && m.metadata.name.as_deref() == Some(name)
        })
    }

    #[test]
    fn set_unavailable_keeps_the_event_with_a_reason() {
        let (catalog, _) = catalog();
        assert!(catalog.set_unavailable("default", "ev1", "module missing".into()));
        assert_eq!(
            found(&catalog, "ev1").schema.clone().unwrap_err(),
            "module missing"
        );
        assert!(!catalog.set_unavailable("default", "nope", "x".into()));
    }
}
