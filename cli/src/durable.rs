//! Durable local mode (`jobico up --nats URL`): the ingress publishes to JetStream as in a
//! cluster, and the dispatcher's consumers hand the events to [`LocalBackend`], which runs them
//! on this machine. Accepted events survive a crash of this process; each runs at least once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jobico_apiserver::Catalog;
use jobico_apiserver::Metrics;
use jobico_apiserver::catalog::EventMap;
use jobico_apiserver::chain::Router;
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_dispatcher::metrics::Metrics as DispatcherMetrics;
use jobico_dispatcher::sinks::{SinkClient, SinkSettings};
use jobico_dispatcher::state::StateStore;
use jobico_dispatcher::{ConsumerSet, Dispatcher, RetryPolicy};
use jobico_model::{Job as JobicoJob, Manifest};
use jobico_store::{NatsAuth, StreamSettings};
use tokio_util::sync::CancellationToken;

use crate::local_backend::LocalBackend;
use crate::local_exec::Modules;

/// The running durable mode.
pub struct Durable {
    /// The ingress's publisher: the namespaces' streams, state bucket, deduplication.
    pub publisher: Arc<JetStreamPublisher>,
    /// Ends once shutdown was requested and the consumers have drained (what ran is acked).
    pub drained: tokio::task::JoinHandle<()>,
}

/// Where and how durable mode reaches NATS.
pub struct Nats<'a> {
    /// The server URL.
    pub url: &'a str,
    /// Its credentials.
    pub auth: &'a NatsAuth,
    /// How long an event may stay unacknowledged before NATS hands it out again.
    pub ack_wait: Duration,
}

/// Connects to NATS as `nats` says (stream and state bucket as the cluster's ingress sets them up)
/// and starts one consumer per event declared in `manifest` and present in `events`.
pub async fn start(
    nats: Nats<'_>,
    manifest: &Manifest,
    catalog: &Arc<Catalog>,
    modules: Arc<Modules>,
    parallelism: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<Durable> {
    let Nats {
        url,
        auth,
        ack_wait,
    } = nats;
    let publisher =
        JetStreamPublisher::connect(url, auth, PublishSettings::default(), Metrics::new())
            .await
            .with_context(|| {
                format!("cannot use NATS at {url} as {auth} (start one with `nats-server -js`)")
            })?;
    let publisher = Arc::new(publisher);
    let js = publisher.context().clone();
    let states = StateStore::open(&js, &jobico_store::BucketSettings::default())
        .await
        .context("cannot open the event state bucket")?;
    let router = Router::new(catalog.clone(), publisher.clone());
    let backend = LocalBackend::new(modules, states.clone(), parallelism, router);
    let events = catalog.snapshot();
    jobico_store::streams::retire_legacy(&js)
        .await
        .context("cannot check for the event stream of an earlier release")?;
    let streams = StreamSettings::default();
    let owners = owners(manifest, &events, parallelism);
    // Every namespace's stream exists before the ingress answers: no 503 while the consumers
    // start.
    for namespace in owners
        .iter()
        .filter_map(|owner| owner.metadata.namespace.as_deref())
        .collect::<std::collections::BTreeSet<_>>()
    {
        jobico_store::streams::ensure(&js, namespace, &streams)
            .await
            .with_context(|| format!("cannot set up the event stream of namespace {namespace}"))?;
    }
    // Outcomes wait in the outbox and are delivered as in a cluster (loopback receivers
    // allowed: the user is the operator).
    jobico_store::streams::ensure_sink_outbox(&js, &streams)
        .await
        .context("cannot set up the sink outbox")?;
    let sink_settings = SinkSettings::default();
    tokio::spawn(jobico_dispatcher::sinks::run(
        js.clone(),
        states.clone(),
        SinkClient::new(crate::local_sinks::local_policy(), sink_settings.timeout),
        sink_settings,
        streams.clone(),
        shutdown.clone(),
    ));
    let dispatcher = Dispatcher::connect_with(
        js,
        backend,
        Arc::new(DispatcherMetrics::new()),
        RetryPolicy::default(),
        ack_wait,
        streams,
    )
    .await
    .context("cannot set up the event consumers")?;
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    for owner in owners {
        consumers.ensure(Arc::new(owner));
    }
    // Events of types these manifests no longer declare (left by an earlier run on the same
    // server) are dead-lettered after the grace period rather than kept for ever.
    tokio::spawn({
        let (consumers, shutdown) = (consumers.clone(), shutdown.clone());
        async move {
            consumers
                .sweep_orphans(jobico_dispatcher::consumers::ORPHAN_GRACE, shutdown)
                .await
        }
    });
    let drained = tokio::spawn(async move {
        shutdown.cancelled().await;
        consumers.shutdown().await;
    });
    Ok(Durable { publisher, drained })
}

/// The manifest's Job resources as the consumers need them: only the events the catalog
/// accepted from that resource, a uid (the dispatcher keys consumers on it), and a concurrency
/// of at most `parallelism` so no more messages wait unacked than can run.
fn owners(manifest: &Manifest, events: &EventMap, parallelism: usize) -> Vec<JobicoJob> {
    let cap = u32::try_from(parallelism.max(1)).unwrap_or(u32::MAX);
    manifest
        .jobs
        .iter()
        .filter_map(|job| {
            let mut job = job.clone();
            let namespace = job.metadata.namespace.clone().unwrap_or_default();
            let name = job.metadata.name.clone().unwrap_or_default();
            job.spec.events.retain(|spec| {
                events
                    .get(&(namespace.clone(), spec.name.clone()))
                    .is_some_and(|entry| entry.job == name)
            });
            for spec in &mut job.spec.events {
                spec.concurrency = Some(spec.concurrency.map_or(cap, |c| c.min(cap)));
            }
            job.metadata
                .uid
                .get_or_insert_with(|| format!("local-{namespace}-{name}"));
            (!job.spec.events.is_empty()).then_some(job)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn owners_keep_catalogued_events_with_a_uid_and_a_concurrency_cap() {
        let yaml = "\
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: j1}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: s, optional: true}}
    - {name: ev2, wasm: echo.wasm, schema: {key: s, optional: true}, concurrency: 1}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: j2, namespace: team}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: s, optional: true}, concurrency: 9}
";
        let mut manifest = Manifest::default();
        manifest.read_str(Path::new("t.yaml"), yaml).unwrap();
        let (mut events, _) = jobico_apiserver::catalog::from_manifest(&manifest);
        events.remove(&("default".to_owned(), "ev2".to_owned()));
        let owners = owners(&manifest, &events, 4);
        let summary: Vec<_> = owners
            .iter()
            .map(|j| {
                (
                    j.metadata.uid.clone().unwrap(),
                    j.spec
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), e.concurrency))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "local-default-j1".to_owned(),
                    vec![("ev1".to_owned(), Some(4))]
                ),
                (
                    "local-team-j2".to_owned(),
                    vec![("ev1".to_owned(), Some(4))]
                ),
            ]
        );
    }
}
