//! The consumer loop against a real nats-server, with a recording backend or the Kubernetes
//! backend on a fake API: acks, batching, retries, dead letters, redelivery, crash, drain.

mod support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jobico_common::EventState;
const STREAM: &str = "JOBICO-default";
use jobico_dispatcher::backend::{Backend, Batch, DispatchError, Dispatched};
use jobico_dispatcher::consumer::{
    self, DEAD_LETTER_STREAM, HEADER_DEAD_LETTER_REASON, consumer_name,
};
use jobico_dispatcher::kubernetes::KubeBackend;
use jobico_dispatcher::metrics::Metrics;
use jobico_dispatcher::render::Renderer;
use jobico_dispatcher::{Dispatcher, RetryPolicy};
use jobico_model::{BatchSpec, Job as JobicoJob};
use support::fake_api::{FakeCluster, status, too_many_requests};
use support::{eventually, nats, publish, reconnect, sample};
use tokio_util::sync::CancellationToken;

const FAST: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(10),
    max: Duration::from_millis(50),
};

/// Records every batch; answers from a script first, then "created".
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<Vec<String>>>,
    script: Mutex<VecDeque<DispatchError>>,
    active: AtomicUsize,
    delay: Mutex<Option<Duration>>,
}

impl Recording {
    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
}

impl Backend for Recording {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        self.calls
            .lock()
            .unwrap()
            .push(batch.ids().iter().map(|s| s.to_string()).collect());
        let delay = *self.delay.lock().unwrap();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(error) = self.script.lock().unwrap().pop_front() {
            return Err(error);
        }
        Ok(Dispatched {
            job: batch.job_name(),
            created: true,
        })
    }

    fn active(&self, _: &str, _: &str) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

fn retryable() -> DispatchError {
    DispatchError::Retryable {
        reason: "api down".into(),
        retry_after: None,
    }
}

fn with_batch(max_events: u32, max_wait_millis: u32) -> Arc<JobicoJob> {
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].batch = Some(BatchSpec {
        max_events,
        max_wait_millis: Some(max_wait_millis),
        max_bytes: None,
    });
    Arc::new(owner)
}

/// The sample `ev1` with at most `cap` Jobs at once.
fn with_concurrency(cap: u32) -> Arc<JobicoJob> {
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].concurrency = Some(cap);
    Arc::new(owner)
}

async fn start<B: Backend>(
    js: &jetstream::Context,
    backend: B,
    owner: Arc<JobicoJob>,
    ack_wait: Duration,
) -> (
    Arc<Dispatcher<B>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let ctx = Dispatcher::connect_with(
        js.clone(),
        backend,
        Arc::new(Metrics::new()),
        FAST,
        ack_wait,
        jobico_store::StreamSettings::default(),
    )
    .await
    .unwrap();
    let token = CancellationToken::new();
    let handle = tokio::spawn(consumer::run(
        ctx.clone(),
        owner,
        "ev1".into(),
        token.clone(),
    ));
    (ctx, token, handle)
}

/// (pending, ack-pending) of the event's consumer.
async fn backlog(js: &jetstream::Context) -> (u64, usize) {
    let stream = js.get_stream(STREAM).await.unwrap();
    // Not created yet: report a backlog.
    let Ok(mut consumer) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(&consumer_name("default", "ev1"))
        .await
    else {
        return (u64::MAX, usize::MAX);
    };
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

async fn state_of<B: Backend>(ctx: &Dispatcher<B>, id: &str) -> Option<jobico_common::EventStatus> {
    ctx.states.get("default", "ev1", id).await.unwrap()
}

#[tokio::test]
async fn each_event_is_dispatched_recorded_and_acked() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    let ids = publish(&js, "default", "ev1", "e", 5).await;
    let (ctx, token, handle) =
        start(&js, backend.clone(), sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "5 dispatches", || async { backend.calls().len() == 5 }).await;
    eventually(10, "all acked", || async { backlog(&js).await == (0, 0) }).await;
    for id in &ids {
        let status = state_of(&ctx, id).await.unwrap();
        assert_eq!(status.state, EventState::Dispatched);
        assert_eq!(
            status.job.as_deref(),
            Some(jobico_dispatcher::backend::job_name("ev1", id).as_str())
        );
    }
    let mut calls = backend.calls();
    calls.sort();
    assert_eq!(
        calls,
        ids.iter().map(|id| vec![id.clone()]).collect::<Vec<_>>()
    );
    assert_eq!(ctx.metrics.events_dispatched.get(), 5);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_consumer_left_with_other_settings_is_updated_at_start() {
    let (_server, js) = nats().await;
    // What an earlier version left: the old filter subject (no id tokens), a long ack wait.
    let stream = js.get_stream(STREAM).await.unwrap();
    let name = consumer_name("default", "ev1");
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: "jobico.default.ev1".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .unwrap();
    let backend = Arc::new(Recording::default());
    publish(&js, "default", "ev1", "u", 3).await;
    let (_ctx, token, handle) =
        start(&js, backend.clone(), sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "3 dispatches", || async { backend.calls().len() == 3 }).await;
    let mut consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(&name)
        .await
        .unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    assert_eq!(config.filter_subject, "jobico.default.ev1.>");
    assert_eq!(config.ack_wait, consumer::ACK_WAIT);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn events_are_grouped_up_to_max_events() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    publish(&js, "default", "ev1", "b", 25).await;
    let (_ctx, token, handle) = start(
        &js,
        backend.clone(),
        with_batch(10, 300),
        consumer::ACK_WAIT,
    )
    .await;
    eventually(10, "25 events dispatched", || async {
        backend.calls().iter().map(Vec::len).sum::<usize>() == 25
    })
    .await;
    let mut sizes: Vec<usize> = backend.calls().iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, [5, 10, 10]);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn with_no_wait_a_backlog_fills_whole_batches_and_a_lone_event_goes_at_once() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    // Job creates take a while, as against a real API server: events pile up meanwhile.
    *backend.delay.lock().unwrap() = Some(Duration::from_millis(20));
    publish(&js, "default", "ev1", "w", 1000).await;
    let (_ctx, token, handle) =
        start(&js, backend.clone(), with_batch(50, 0), consumer::ACK_WAIT).await;
    eventually(30, "1000 events dispatched", || async {
        backend.calls().iter().map(Vec::len).sum::<usize>() == 1000
    })
    .await;
    let sizes: Vec<usize> = backend.calls().iter().map(Vec::len).collect();
    // The first pull may hand over a few messages before the rest arrive; after that every
    // batch is full. 20 Jobs is the least possible.
    assert!(
        sizes.len() <= 24,
        "{} Jobs for 1000 events with maxEvents 50: {sizes:?}",
        sizes.len()
    );
    // Events arriving one by one while Jobs are being created are packed as well: each batch
    // gathers what arrives during the creates in flight.
    let before = backend.calls().len();
    let trickle: Vec<_> = (0..8)
        .map(|task| {
            let js = js.clone();
            tokio::spawn(async move {
                for i in 0..125 {
                    publish(&js, "default", "ev1", &format!("t{task}-{i}"), 1).await;
                }
            })
        })
        .collect();
    for task in trickle {
        task.await.unwrap();
    }
    eventually(30, "the trickle dispatched", || async {
        backend.calls().iter().map(Vec::len).sum::<usize>() == 2000
    })
    .await;
    let trickled: Vec<usize> = backend.calls()[before..].iter().map(Vec::len).collect();
    assert!(
        trickled.len() <= 40,
        "{} Jobs for 1000 events arriving one by one: {trickled:?}",
        trickled.len()
    );
    // Idle again: one event gets a Job of its own, without waiting for company.
    let before = backend.calls().len();
    let sent = std::time::Instant::now();
    publish(&js, "default", "ev1", "lone", 1).await;
    eventually(10, "the lone event dispatched", || async {
        backend.calls().len() == before + 1
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(backend.calls().last().unwrap(), &["lone-0".to_owned()]);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn transient_failures_keep_the_events_and_permanent_ones_dead_letter_with_the_reason() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    // Many transient failures in a row (more than any attempt limit) still end dispatched.
    backend
        .script
        .lock()
        .unwrap()
        .extend(std::iter::repeat_with(retryable).take(8));
    publish(&js, "default", "ev1", "r", 1).await;
    let (ctx, token, handle) =
        start(&js, backend.clone(), sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(20, "dispatched after the failures", || async {
        backend.calls().len() == 9
    })
    .await;
    eventually(10, "acked", || async { backlog(&js).await == (0, 0) }).await;
    assert_eq!(
        state_of(&ctx, "r-0").await.unwrap().state,
        EventState::Dispatched
    );
    assert_eq!(ctx.metrics.dispatch_retries.get(), 8);
    assert_eq!(ctx.metrics.events_dead_lettered.get(), 0);
    eventually(10, "acked", || async { backlog(&js).await == (0, 0) }).await;

    // A permanent failure dead-letters at once, with the reason.
    backend
        .script
        .lock()
        .unwrap()
        .push_back(DispatchError::Permanent {
            reason: "invalid Job".into(),
        });
    publish(&js, "default", "ev1", "p", 1).await;
    eventually(10, "dead-lettered", || async {
        state_of(&ctx, "p-0")
            .await
            .is_some_and(|s| s.state == EventState::DeadLettered)
    })
    .await;
    let status = state_of(&ctx, "p-0").await.unwrap();
    assert!(
        status.reason.as_deref().unwrap().contains("invalid Job"),
        "{status:?}"
    );
    // Durable in the dead-letter stream, with the reason, and gone from the main one.
    let dlq = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    let message = dlq
        .get_last_raw_message_by_subject("jobico-dlq.default.ev1")
        .await
        .unwrap();
    let reason = message
        .headers
        .get(HEADER_DEAD_LETTER_REASON)
        .unwrap()
        .to_string();
    assert!(reason.contains("invalid Job"), "{reason}");
    let record: jobico_common::EventRecord = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(record.id.as_str(), "p-0");
    eventually(10, "acked", || async { backlog(&js).await == (0, 0) }).await;
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn thirty_seconds_of_503_dead_letter_nothing_and_everything_runs_afterwards() {
    let (_server, js) = nats().await;
    let (client, cluster) = FakeCluster::start();
    cluster.outage(
        Duration::from_secs(30),
        status(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ),
    );
    let backend = KubeBackend::new(client, Renderer::new("exec:1"));
    let (ctx, token, handle) = start(&js, backend, sample("ev1.yaml"), consumer::ACK_WAIT).await;
    // 50 events arrive during the outage.
    let mut ids = Vec::new();
    for round in 0..5 {
        ids.extend(publish(&js, "default", "ev1", &format!("o{round}"), 10).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eventually(60, "all 50 dispatched after the outage", || async {
        cluster.created.load(Ordering::Relaxed) == 50
    })
    .await;
    assert!(
        cluster.refused.load(Ordering::Relaxed) > 0,
        "the outage was felt"
    );
    assert_eq!(ctx.metrics.events_dead_lettered.get(), 0);
    let mut dlq = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 0);
    let seen = ids_per_job(&cluster);
    assert!(ids.iter().all(|id| seen.get(id) == Some(&1)), "{seen:?}");
    eventually(10, "acked", || async { backlog(&js).await == (0, 0) }).await;
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_create_stalled_past_the_ack_wait_gives_each_event_one_job() {
    let (_server, js) = nats().await;
    let (client, cluster) = FakeCluster::start();
    // Creates commit at once but answer three ack waits later.
    cluster.stall_creates(Some(Duration::from_secs(3)));
    let backend = KubeBackend::new(client, Renderer::new("exec:1"));
    let ids = publish(&js, "default", "ev1", "s", 12).await;
    let (_ctx, token, handle) =
        start(&js, backend, with_batch(5, 100), Duration::from_secs(1)).await;
    eventually(30, "every event in a Job", || async {
        ids_per_job(&cluster).len() == ids.len()
    })
    .await;
    cluster.stall_creates(None);
    eventually(20, "acked", || async { backlog(&js).await == (0, 0) }).await;
    // Wait past a few more ack waits: nothing may come back and get a second Job.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = ids_per_job(&cluster);
    assert!(
        seen.values().all(|&n| n == 1),
        "an event is in two Jobs: {seen:?}"
    );
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn events_of_a_missing_module_are_held_then_run_when_it_appears() {
    let (_server, js) = nats().await;
    let (client, cluster) = FakeCluster::start();
    cluster.remove_config_map("default", "job-for-ev1-modules");
    let backend = KubeBackend::new(client, Renderer::new("exec:1"));
    let ids = publish(&js, "default", "ev1", "m", 3).await;
    let (ctx, token, handle) = start(&js, backend, sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "held with the reason", || async {
        state_of(&ctx, "m-0").await.is_some_and(|s| {
            s.state == EventState::Held
                && s.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("default/job-for-ev1-modules does not exist"))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cluster.created.load(Ordering::Relaxed),
        0,
        "no Job that cannot start"
    );
    assert_eq!(ctx.metrics.events_dead_lettered.get(), 0);
    cluster.insert_config_map(
        "default",
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "job-for-ev1-modules", "namespace": "default"},
               "binaryData": {"echo.wasm": "AGFzbQEAAAA="}}),
    );
    eventually(30, "run once the module appeared", || async {
        ids_per_job(&cluster).len() == ids.len()
    })
    .await;
    for id in &ids {
        assert_eq!(
            state_of(&ctx, id).await.unwrap().state,
            EventState::Dispatched
        );
    }
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn throttling_waits_for_retry_after_and_server_errors_retry() {
    let (_server, js) = nats().await;
    let (client, cluster) = FakeCluster::start();
    cluster.fail_next(too_many_requests(1));
    cluster.fail_next(status(500, "InternalError", "etcd timeout"));
    let backend = KubeBackend::new(client, Renderer::new("exec:1"));
    let started = Instant::now();
    publish(&js, "default", "ev1", "t", 1).await;
    let (ctx, token, handle) = start(&js, backend, sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "job created", || async {
        cluster.created.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured"
    );
    // The module check, then three creates.
    assert_eq!(cluster.requests.load(Ordering::Relaxed), 4);
    assert_eq!(ctx.metrics.dispatch_retries.get(), 2);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_concurrency_cap_stops_pulling_until_jobs_finish() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    backend.active.store(2, Ordering::Relaxed);
    let owner = with_concurrency(2);
    publish(&js, "default", "ev1", "c", 3).await;
    let (_ctx, token, handle) = start(&js, backend.clone(), owner, consumer::ACK_WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(backend.calls().is_empty(), "pulled at the cap");
    backend.active.store(0, Ordering::Relaxed);
    eventually(10, "dispatched after the cap lifted", || async {
        backend.calls().len() == 3
    })
    .await;
    token.cancel();
    handle.await.unwrap();
}

/// At its concurrency cap (one Job being created, for longer than the ack wait) a consumer
/// pulls nothing more: an event pulled then would wait in the client's buffer, where nothing
/// progress-acks it, and be delivered again. Each event is dispatched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_nothing_waits_unacked_past_the_ack_wait_and_each_event_goes_once() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    *backend.delay.lock().unwrap() = Some(Duration::from_millis(2_500));
    let owner = with_concurrency(1);
    publish(&js, "default", "ev1", "held", 3).await;
    let (_ctx, token, handle) = start(&js, backend.clone(), owner, Duration::from_secs(1)).await;
    // Past two ack waits into the first create: the consumer holds only the event it is
    // dispatching (kept alive by progress acks), none waiting in a buffer unacked.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert_eq!(
        backlog(&js).await,
        (2, 1),
        "(pending, ack-pending) at the cap"
    );
    eventually(20, "every held event dispatched", || async {
        backend.calls().len() >= 3
    })
    .await;
    // Room for any second delivery to come through.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut per_event: BTreeMap<String, usize> = BTreeMap::new();
    for id in backend.calls().into_iter().flatten() {
        *per_event.entry(id).or_default() += 1;
    }
    assert_eq!(per_event.len(), 3, "{per_event:?}");
    assert!(
        per_event.values().all(|n| *n == 1),
        "dispatched more than once: {per_event:?}"
    );
    assert_eq!(backlog(&js).await, (0, 0));
    token.cancel();
    handle.await.unwrap();
}

/// One event at a time (a concurrency cap of 1 pulls one message per request) through a
/// backlog: every pull is answered at once, so the message can reach the client before the
/// client has counted its request. async-nats then believes a message is still owed and sends
/// no further request, and the server, holding none, sends no heartbeat: the consumer stalls
/// until the request's expiry (35 s). It must notice the missing heartbeats and pull afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_at_a_time_through_a_backlog_never_stalls() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    let owner = with_concurrency(1);
    let count = 2000;
    publish(&js, "default", "ev1", "s", count).await;
    let (_ctx, token, handle) = start(&js, backend.clone(), owner, consumer::ACK_WAIT).await;
    // 2,000 rounds take a few seconds (longer on a loaded machine); a stall leaves the
    // consumer idle for 35 s. So what must hold is progress: never 20 s without an event.
    let mut seen = 0;
    let mut progressed = std::time::Instant::now();
    while seen < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = backend.calls().len();
        if now > seen {
            (seen, progressed) = (now, std::time::Instant::now());
        }
        assert!(
            progressed.elapsed() < Duration::from_secs(20),
            "stalled: no event dispatched for 20 s after {seen} of {count}"
        );
    }
    assert_eq!(backlog(&js).await, (0, 0));
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_batches_and_acks_them() {
    let (_server, js) = nats().await;
    let backend = Arc::new(Recording::default());
    *backend.delay.lock().unwrap() = Some(Duration::from_millis(500));
    publish(&js, "default", "ev1", "d", 1).await;
    let (ctx, token, handle) =
        start(&js, backend.clone(), sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "dispatch started", || async {
        backend.calls().len() == 1
    })
    .await;
    token.cancel();
    handle.await.unwrap();
    // run() returned only after the slow dispatch finished and was acked.
    assert_eq!(
        state_of(&ctx, "d-0").await.unwrap().state,
        EventState::Dispatched
    );
    assert_eq!(backlog(&js).await, (0, 0));
}

/// Hangs forever on every third batch, after creating its Job (as if the process died between
/// the create and the ack) or before (died between the state claim and the create).
struct Crashing {
    inner: KubeBackend,
    calls: AtomicUsize,
    before_create: bool,
}

impl Backend for Crashing {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        let hang = self.calls.fetch_add(1, Ordering::Relaxed) % 3 == 2;
        if hang && self.before_create {
            std::future::pending::<()>().await;
        }
        let result = self.inner.dispatch(batch).await;
        if hang {
            std::future::pending::<()>().await;
        }
        result
    }
}

fn ids_per_job(cluster: &FakeCluster) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for job in cluster.jobs().values() {
        let ids = job["metadata"]["annotations"]["jobico.coeux.dev/event-ids"]
            .as_str()
            .unwrap();
        for id in ids.split(',') {
            *seen.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    seen
}

/// Runs `before` until a few batches are through, kills it mid-batch, restarts with `after`
/// (possibly batching differently, so redelivered events regroup) and checks that every event
/// ends up in exactly one Job.
async fn crash_and_restart(before: Arc<JobicoJob>, after: Arc<JobicoJob>, before_create: bool) {
    let events = 30;
    let (server, js) = nats().await;
    let (client, cluster) = FakeCluster::start();
    let ids = publish(&js, "default", "ev1", "k", events).await;
    let ack_wait = Duration::from_secs(1);
    // The restarted dispatcher shares the signing key (in a cluster: the NATS KV bucket).
    let signer = jobico_dispatcher::trust::Signer::ephemeral();
    let crashing = Crashing {
        inner: KubeBackend::new(client.clone(), Renderer::new("exec:1"))
            .with_signer(signer.clone()),
        calls: AtomicUsize::new(0),
        before_create,
    };
    let (_ctx, _token, handle) = start(&js, crashing, before, ack_wait).await;
    // Four batches started means at least one hangs.
    eventually(10, "some Jobs created", || async {
        cluster.created.load(Ordering::Relaxed) >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Kill the consumer mid-batch: hung dispatches have created Jobs that were never acked.
    handle.abort();
    let _ = handle.await;
    assert!(backlog(&js).await.1 > 0, "the crash left unacked messages");
    // Restart with a new connection and a healthy backend.
    let js = reconnect(&server).await;
    // Claims the crash left without a Job are taken over once they are this old.
    let settle = Duration::from_secs(2);
    let (ctx, token, handle) = start(
        &js,
        KubeBackend::new(client, Renderer::new("exec:1"))
            .with_claim_settle(settle)
            .with_signer(signer),
        after,
        ack_wait,
    )
    .await;
    eventually(30, "every event dispatched and acked", || async {
        backlog(&js).await == (0, 0)
    })
    .await;
    let seen = ids_per_job(&cluster);
    assert_eq!(seen.len(), events, "every event is in a Job");
    assert!(
        seen.values().all(|&n| n == 1),
        "an event is in two Jobs: {seen:?}"
    );
    for id in &ids {
        assert_eq!(
            state_of(&ctx, id).await.unwrap().state,
            EventState::Dispatched
        );
    }
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn killing_the_consumer_mid_batch_still_gives_one_job_per_event() {
    crash_and_restart(sample("ev1.yaml"), sample("ev1.yaml"), false).await;
}

#[tokio::test]
async fn a_crash_after_the_create_with_regrouped_batches_gives_one_job_per_event() {
    crash_and_restart(with_batch(4, 50), with_batch(3, 50), false).await;
}

#[tokio::test]
async fn a_crash_between_claim_and_create_with_regrouped_batches_gives_one_job_per_event() {
    crash_and_restart(with_batch(4, 50), with_batch(3, 50), true).await;
}

#[tokio::test]
async fn a_replay_to_a_recreated_consumer_creates_no_second_job() {
    let (_server, js) = nats().await;
    // Limits retention: acked messages stay, so a new consumer replays them (the dispatcher
    // keeps an existing stream's retention).
    js.delete_stream(STREAM).await.unwrap();
    let limits = jobico_store::StreamSettings {
        retention: jobico_store::Retention::Limits,
        ..Default::default()
    };
    jobico_store::streams::ensure(&js, "default", &limits)
        .await
        .unwrap();
    let (client, cluster) = FakeCluster::start();
    publish(&js, "default", "ev1", "p", 4).await;
    let signer = jobico_dispatcher::trust::Signer::ephemeral();
    let (_ctx, token, handle) = start(
        &js,
        KubeBackend::new(client.clone(), Renderer::new("exec:1")).with_signer(signer.clone()),
        sample("ev1.yaml"),
        consumer::ACK_WAIT,
    )
    .await;
    eventually(10, "acked", || async { backlog(&js).await == (0, 0) }).await;
    token.cancel();
    handle.await.unwrap();
    // The durable consumer is deleted (e.g. expired); a new one replays the whole stream.
    js.get_stream(STREAM)
        .await
        .unwrap()
        .delete_consumer(&consumer_name("default", "ev1"))
        .await
        .unwrap();
    let (ctx, token, handle) = start(
        &js,
        KubeBackend::new(client, Renderer::new("exec:1")).with_signer(signer),
        sample("ev1.yaml"),
        consumer::ACK_WAIT,
    )
    .await;
    // Each replayed event's claim names its existing Job, whose create answers AlreadyExists
    // with the same ids: acked, no second Job.
    eventually(10, "replayed and acked", || async {
        ctx.metrics.events_dispatched.get() == 4 && backlog(&js).await == (0, 0)
    })
    .await;
    assert_eq!(cluster.created.load(Ordering::Relaxed), 4);
    assert_eq!(cluster.jobs().len(), 4);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn unreadable_messages_are_dead_lettered() {
    let (_server, js) = nats().await;
    js.publish("jobico.default.ev1.garbled", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let backend = Arc::new(Recording::default());
    let (ctx, token, handle) =
        start(&js, backend.clone(), sample("ev1.yaml"), consumer::ACK_WAIT).await;
    eventually(10, "dead-lettered", || async {
        ctx.metrics.events_dead_lettered.get() == 1
    })
    .await;
    assert!(backend.calls().is_empty());
    let mut dlq = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 1);
    token.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn the_backlog_of_an_event_no_resource_declares_is_dead_lettered_after_the_grace() {
    let (_server, js) = nats().await;
    // A durable consumer left by a resource since deleted, with its events still waiting.
    let stream = js.get_stream(STREAM).await.unwrap();
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(consumer_name("default", "gone")),
            filter_subject: "jobico.default.gone.>".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids = publish(&js, "default", "gone", "g", 3).await;
    let ctx = Dispatcher::connect(
        js.clone(),
        Arc::new(Recording::default()),
        Arc::new(Metrics::new()),
        FAST,
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(jobico_dispatcher::ConsumerSet::new(
        ctx.clone(),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn({
        let (consumers, shutdown) = (consumers.clone(), shutdown.clone());
        async move {
            consumers
                .sweep_orphans(Duration::from_secs(1), shutdown)
                .await
        }
    });
    eventually(20, "the backlog dead-lettered", || async {
        ctx.metrics.events_dead_lettered.get() == 3
    })
    .await;
    for id in &ids {
        let status = ctx
            .states
            .get("default", "gone", id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.state, EventState::DeadLettered);
        assert!(
            status
                .reason
                .as_deref()
                .unwrap()
                .contains("not been declared by any valid resource"),
            "{status:?}"
        );
    }
    let mut dlq = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 3);
    eventually(10, "the orphaned consumer removed", || async {
        stream
            .get_consumer::<jetstream::consumer::pull::Config>(&consumer_name("default", "gone"))
            .await
            .is_err()
    })
    .await;
    shutdown.cancel();
    sweeper.await.unwrap();
}
