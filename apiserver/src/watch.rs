//! Cluster mode's catalog: reflectors on Job resources and ConfigMaps, rebuilding the catalog
//! (debounced) whenever either changes.
//!
//! ConfigMaps are watched in the same namespaces as Jobs (all of them, or a list), optionally
//! narrowed by a label selector, but **metadata only**: JobicoK8S schema ConfigMaps carry no
//! label, so a selector cannot find them by default, and caching every ConfigMap of a cluster
//! (certificates, dashboards, other tenants' configuration) would make the ingress's memory
//! follow what anyone stores. The metadata watch says which ConfigMaps exist and when they
//! change; only those a Job resource names as a schema source are then read (one GET per change)
//! and only their referenced keys kept ([`SchemaMaps`]). Schemas are compiled only when their
//! text changes ([`SchemaCache`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use jobico_model::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogProblem, SchemaCache, build_cached};

/// Quiet time after a change before the catalog is rebuilt: a `kubectl apply` of a Job and its
/// ConfigMaps arrives as a burst of events within milliseconds, and one rebuild covers them all.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);

/// Schema ConfigMaps read at once after a change: a burst of applies reads quickly without
/// opening a request per ConfigMap of a large namespace at the same instant.
const FETCH_CONCURRENCY: usize = 8;

/// Bound on one ConfigMap read: kube-client has no read timeout of its own, and a stalled read
/// would hold every catalog rebuild behind it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Wait before reading again a ConfigMap whose read failed.
const FETCH_RETRY: Duration = Duration::from_secs(2);

/// ConfigMap name by namespace and name.
type MapKey = (String, String);

/// The schema ConfigMaps read so far: for each one a Job resource names, its resource version
/// when read and a copy holding only the referenced data keys.
#[derive(Debug, Default)]
pub struct SchemaMaps {
    read: HashMap<MapKey, ReadMap>,
}

/// A ConfigMap as read: the version read, the keys kept and the copy.
#[derive(Debug)]
struct ReadMap {
    version: Option<String>,
    keys: BTreeSet<String>,
    map: Arc<ConfigMap>,
}

/// The ConfigMaps Job resources take schemas from, with the keys they name.
pub fn referenced(jobs: &[Arc<Job>]) -> HashMap<MapKey, BTreeSet<String>> {
    let mut wanted: HashMap<MapKey, BTreeSet<String>> = HashMap::new();
    for job in jobs {
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        for event in &job.spec.events {
            wanted
                .entry((
                    namespace.clone(),
                    event.schema.config_map_name().to_string(),
                ))
                .or_default()
                .insert(event.schema.data_key());
        }
    }
    wanted
}

impl SchemaMaps {
    /// Brings the copies in step: reads each wanted ConfigMap that exists (per `existing`, the
    /// metadata watch) and changed since it was read, forgets the others. Returns false when a
    /// read failed (the old copy, if any, is kept; the caller retries).
    pub async fn refresh(
        &mut self,
        client: &Client,
        wanted: &HashMap<MapKey, BTreeSet<String>>,
        existing: &HashMap<MapKey, Option<String>>,
    ) -> bool {
        self.read
            .retain(|key, _| wanted.contains_key(key) && existing.contains_key(key));
        let stale: Vec<(MapKey, Option<String>, BTreeSet<String>)> = wanted
            .iter()
            .filter_map(|(key, keys)| {
                let version = existing.get(key)?;
                match self.read.get(key) {
                    Some(read) if &read.version == version && &read.keys == keys => None,
                    _ => Some((key.clone(), version.clone(), keys.clone())),
                }
            })
            .collect();
        let reads = stream::iter(stale)
            .map(|((namespace, name), version, keys)| async move {
                let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
                let result = tokio::time::timeout(FETCH_TIMEOUT, api.get_opt(&name)).await;
                ((namespace, name), version, keys, result)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut complete = true;
        for (key, version, keys, result) in reads {
            match result {
                Ok(Ok(Some(map))) => {
                    let slim = slim_copy(&map, &keys);
                    // The version read, not the one watched: a newer change is read next time.
                    let version = map.metadata.resource_version.clone().or(version);
                    let map = Arc::new(slim);
                    self.read.insert(key, ReadMap { version, keys, map });
                }
                Ok(Ok(None)) => {
                    self.read.remove(&key);
                }
                Ok(Err(error)) => {
                    tracing::warn!(configmap = %format!("{}/{}", key.0, key.1), %error, "cannot read a schema ConfigMap, retrying");
                    complete = false;
                }
                Err(_) => {
                    tracing::warn!(configmap = %format!("{}/{}", key.0, key.1), "reading a schema ConfigMap timed out, retrying");
                    complete = false;
                }
            }
        }
        complete
    }

    /// The copies, by namespace and name.
    pub fn maps(&self) -> HashMap<MapKey, Arc<ConfigMap>> {
        self.read
            .iter()
            .map(|(key, read)| (key.clone(), read.map.clone()))
            .collect()
    }
}

/// `map` with only its name, namespace, resource version and the data under `keys`.
fn slim_copy(map: &ConfigMap, keys: &BTreeSet<String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: map.metadata.name.clone(),
            namespace: map.metadata.namespace.clone(),
            resource_version: map.metadata.resource_version.clone(),
            ..Default::default()
        },
        data: map.data.as_ref().map(|data| {
            data.iter()
                .filter(|(key, _)| keys.contains(*key))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        ..Default::default()
    }
}

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Label selector for ConfigMaps (e.g. `jobico.coeux.dev/schema`); none watches all.
    pub config_map_selector: Option<String>,
    /// Quiet time before a rebuild.
    pub debounce: Duration,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The Job CRD is missing from the cluster.
    #[error(
        "the jobs.jobico.coeux.dev CustomResourceDefinition is not installed; install it with `kubectl apply -f crds/`"
    )]
    CrdMissing,
    /// The API server refused or failed the check.
    #[error("cannot list jobs.jobico.coeux.dev")]
    Api(#[source] kube::Error),
}

fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    }
}

/// Checks that the Job CRD is installed (one cheap list call).
pub async fn check_crd(client: &Client, namespaces: &[String]) -> Result<(), WatchError> {
    let api = apis::<Job>(client, namespaces).remove(0);
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(WatchError::CrdMissing),
        Err(error) => Err(WatchError::Api(error)),
    }
}

/// Keeps `catalog` in step with the cluster until `shutdown`. `synced` turns true once every
/// reflector has listed its objects and the first catalog is in place.
pub async fn run(
    client: Client,
    config: WatchConfig,
    catalog: Arc<Catalog>,
    synced: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let mut job_stores = Vec::new();
    let mut map_stores = Vec::new();
    let mut streams = Vec::new();
    for api in apis::<Job>(&client, &config.namespaces) {
        let (reader, writer) = reflector::store();
        job_stores.push(reader);
        let events = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        streams.push(
            events
                .map(|e| e.map(|_| ()).map_err(|e| ("Job", e)))
                .boxed(),
        );
    }
    let mut map_config = watcher::Config::default();
    if let Some(selector) = &config.config_map_selector {
        map_config = map_config.labels(selector);
    }
    // An `Api` of `PartialObjectMeta` lists and watches metadata only.
    for api in apis::<PartialObjectMeta<ConfigMap>>(&client, &config.namespaces) {
        let (reader, writer) = reflector::store();
        map_stores.push(reader);
        let slim = watcher(api, map_config.clone())
            .modify(|map: &mut PartialObjectMeta<ConfigMap>| {
                map.metadata.managed_fields = None;
                map.metadata.annotations = None;
                map.metadata.labels = None;
            })
            .default_backoff();
        let events = reflector::reflector(writer, slim);
        streams.push(
            events
                .map(|e| e.map(|_| ()).map_err(|e| ("ConfigMap", e)))
                .boxed(),
        );
    }

    let notify = changed.clone();
    let pump = async move {
        let mut all = stream::select_all(streams);
        while let Some(event) = all.next().await {
            match event {
                Ok(()) => notify.notify_one(),
                Err((kind, error)) => tracing::warn!(%kind, %error, "watch failed, retrying"),
            }
        }
    };

    let rebuild = async move {
        for store in &job_stores {
            let _ = store.wait_until_ready().await;
        }
        for store in &map_stores {
            let _ = store.wait_until_ready().await;
        }
        let mut cache = SchemaCache::new();
        let mut schema_maps = SchemaMaps::default();
        let mut reported = BTreeSet::new();
        loop {
            let jobs: Vec<Arc<Job>> = job_stores.iter().flat_map(Store::state).collect();
            let existing = existing_maps(&map_stores);
            if !schema_maps
                .refresh(&client, &referenced(&jobs), &existing)
                .await
            {
                let again = changed.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(FETCH_RETRY).await;
                    again.notify_one();
                });
            }
            let (events, problems) = catalog_from_objects(&jobs, &schema_maps.maps(), &mut cache);
            report(&problems, &mut reported);
            tracing::info!(
                events = events.len(),
                schemas = cache.len(),
                "catalog rebuilt"
            );
            catalog.replace(events);
            synced.store(true, Ordering::Release);
            changed.notified().await;
            tokio::time::sleep(config.debounce).await;
        }
    };

    tokio::select! {
        _ = pump => tracing::error!("the watch streams ended"),
        _ = rebuild => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Logs each problem once, when it first appears.
fn report(problems: &[CatalogProblem], reported: &mut BTreeSet<(String, String, String)>) {
    let current: BTreeSet<_> = problems
        .iter()
        .map(|p| (p.namespace.clone(), p.job.clone(), p.message.clone()))
        .collect();
    for (namespace, job, message) in current.difference(reported) {
        tracing::error!(job = %format!("{namespace}/{job}"), "{message}");
    }
    *reported = current;
}

/// Every watched ConfigMap with its resource version.
fn existing_maps(
    stores: &[Store<PartialObjectMeta<ConfigMap>>],
) -> HashMap<MapKey, Option<String>> {
    stores
        .iter()
        .flat_map(Store::state)
        .map(|m| {
            let key = (
                m.metadata.namespace.clone().unwrap_or_default(),
                m.metadata.name.clone().unwrap_or_default(),
            );
            (key, m.metadata.resource_version.clone())
        })
        .collect()
}

/// Builds the catalog from watched objects: Jobs ordered by creation time (then namespace and
/// name) so the oldest declaration of an event name wins, as in the cluster's history.
pub fn catalog_from_objects(
    jobs: &[Arc<Job>],
    maps: &HashMap<(String, String), Arc<ConfigMap>>,
    cache: &mut SchemaCache,
) -> (crate::catalog::EventMap, Vec<CatalogProblem>) {
    let mut ordered: Vec<&Job> = jobs.iter().map(Arc::as_ref).collect();
    ordered.sort_by_key(|job| (job.metadata.namespace.clone(), job.claim_order()));
    build_cached(
        ordered,
        |ns, name| {
            maps.get(&(ns.to_string(), name.to_string()))
                .map(Arc::as_ref)
        },
        cache,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job(name: &str, wasm: &str, created: &str) -> Arc<Job> {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "jobico.coeux.dev/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"events": [{"name": "ev1", "wasm": wasm, "schema": {"key": "s", "optional": true}}]}
        }))
        .unwrap();
        job.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        Arc::new(job)
    }

    #[test]
    fn the_oldest_job_keeps_a_contested_event_name() {
        let jobs = [
            job("newer", "new.wasm", "2026-02-01T00:00:00Z"),
            job("older", "old.wasm", "2026-01-01T00:00:00Z"),
        ];
        let (events, problems) =
            catalog_from_objects(&jobs, &HashMap::new(), &mut SchemaCache::new());
        let entry = &events[&("default".to_string(), "ev1".to_string())];
        assert_eq!(
            (entry.job.as_str(), entry.spec.wasm.as_str()),
            ("older", "old.wasm")
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].job, "newer");
    }

    #[test]
    fn problems_are_reported_once() {
        let problem = CatalogProblem {
            namespace: "default".into(),
            job: "j".into(),
            message: "m".into(),
        };
        let mut reported = BTreeSet::new();
        report(std::slice::from_ref(&problem), &mut reported);
        assert_eq!(reported.len(), 1);
        report(&[], &mut reported);
        assert!(
            reported.is_empty(),
            "a fixed problem is forgotten, so it is reported if it returns"
        );
    }
}
