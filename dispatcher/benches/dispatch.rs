//! Dispatch throughput: Jobs created per second, events per second and CPU time per Job at
//! batch sizes 1, 10 and 100, through the whole consumer path (a real nats-server, state
//! records, the Kubernetes backend rendering and creating Jobs) against the in-process fake
//! API. Run with `scripts/bench-dispatcher.sh`. Not a timed test.
//!
//! Beside each, in the same run, two ceilings: (api) the same Jobs, rendered beforehand,
//! created through kube-rs against the same fake API with the dispatcher's concurrency (the
//! best of three runs: short runs are noisy), as the dispatcher sends them and, for issue 14's
//! figure, through kube-rs's `Api::create` (which also parses each created Job back), and
//! (nats) the same events pulled and acked, with the server's confirmation as the dispatcher
//! acks them, from a JetStream consumer in batches of the same size, doing nothing else. The
//! dispatcher's figures are given as ratios of them, with what rendering, the API create and
//! the pull-and-ack cost alone in CPU time. A third, (claims), makes the state record's first
//! claim for as many new events; the three ceilings' costs added up are what a dispatcher
//! doing nothing else would reach on the same cores.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use jobico_common::EventRecord;
use jobico_common::subject::{event_filter, event_subject, stream_name};
use jobico_dispatcher::backend::Batch;
use jobico_dispatcher::kubernetes::{self, KubeBackend};
use jobico_dispatcher::metrics::Metrics;
use jobico_dispatcher::render::Renderer;
use jobico_dispatcher::state::{BucketSettings, Claim, StateStore};
use jobico_dispatcher::{Dispatcher, RetryPolicy};
use jobico_dispatcher::{consumer, dead_letter};
use jobico_model::BatchSpec;
use k8s_openapi::api::batch::v1::Job as BatchJob;
use serde_json::json;
use support::fake_api::FakeCluster;
use tokio_util::sync::CancellationToken;

/// The dispatcher binary's allocator, so the bench measures what it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Publish acks awaited at once: async-nats blocks beyond ~5,000 outstanding.
const PUBLISH_WINDOW: usize = 1_000;

/// User + system CPU time of this process (dispatcher and in-process fake API; nats-server
/// runs in its own process and is not counted).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of /proc/<pid>/stat (utime, stime) are the 12th and 13th after ')'.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Clock ticks are 100 Hz on Linux (USER_HZ).
    Duration::from_millis(ticks * 10)
}

/// Event number `i` of the run `prefix`: what `publish` sends and `batches` groups.
fn event(prefix: &str, i: usize) -> EventRecord {
    support::record(
        "default",
        "ev1",
        &format!("{prefix}-{i}"),
        json!({"firstName": "Ada", "lastName": "Lovelace", "i": i}),
    )
}

async fn publish(js: &jetstream::Context, prefix: &str, count: usize) {
    let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
    for i in 0..count {
        let record = event(prefix, i);
        let id = record.id.as_str();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        acks.push(
            js.publish_with_headers(
                event_subject("default", "ev1", id),
                headers,
                serde_json::to_vec(&record).unwrap().into(),
            )
            .await
            .unwrap(),
        );
        if acks.len() == PUBLISH_WINDOW {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// The events of `publish(prefix, count)` grouped as the dispatcher groups them.
fn batches(owner: &Arc<jobico_model::Job>, prefix: &str, count: usize, size: usize) -> Vec<Batch> {
    let records: Vec<_> = (0..count).map(|i| event(prefix, i)).collect();
    records
        .chunks(size)
        .map(|events| Batch {
            owner: owner.clone(),
            event: "ev1".into(),
            events: events.to_vec(),
        })
        .collect()
}

/// What the Jobs of `batches` cost to render and sign alone (the pod policy included), no
/// I/O: time per Job in one thread, which is its CPU time (the clock of [`cpu_time`] ticks
/// too coarsely for it).
fn render_cost(batches: &[Batch]) -> Duration {
    let renderer = Renderer::new("ghcr.io/coeux/wasm-exec:0.1.0");
    let signer = jobico_dispatcher::trust::Signer::ephemeral();
    let started = Instant::now();
    for batch in batches {
        let mut job = renderer.render(batch, None).unwrap();
        signer.sign_job(&mut job);
        std::hint::black_box(job);
    }
    started.elapsed() / batches.len() as u32
}

/// How a ceiling creates its Jobs.
#[derive(Clone, Copy)]
enum Create {
    /// kube-rs's `Api::create`, which parses the created Job back (issue 14's ceiling).
    KubeApi,
    /// The same request as the dispatcher sends it (`kubernetes::create_job`), answer unparsed.
    Dispatcher,
}

/// Ceiling (api): creates the Jobs of `batches`, rendered beforehand, `MAX_IN_FLIGHT_BATCHES`
/// at a time, straight through kube-rs (`how`). Returns Jobs per second and the CPU time per
/// Job (kube-rs and the fake API).
async fn api_ceiling(batches: &[Batch], how: Create) -> (f64, Duration) {
    let (client, cluster) = FakeCluster::start();
    let renderer = Renderer::new("ghcr.io/coeux/wasm-exec:0.1.0");
    let jobs: Vec<_> = batches
        .iter()
        .map(|b| renderer.render(b, None).unwrap())
        .collect();
    let cpu = cpu_time();
    let started = Instant::now();
    futures::stream::iter(jobs)
        .map(|job| {
            let client = client.clone();
            async move {
                match how {
                    Create::KubeApi => {
                        let api: kube::Api<BatchJob> = kube::Api::namespaced(client, "default");
                        api.create(&kube::api::PostParams::default(), &job)
                            .await
                            .map(drop)
                    }
                    Create::Dispatcher => kubernetes::create_job(&client, "default", &job).await,
                }
                .unwrap();
            }
        })
        .buffer_unordered(consumer::MAX_IN_FLIGHT_BATCHES)
        .collect::<Vec<()>>()
        .await;
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    assert_eq!(cluster.created.load(Ordering::Relaxed), batches.len());
    (
        batches.len() as f64 / elapsed.as_secs_f64(),
        cpu / batches.len() as u32,
    )
}

/// Ceiling (nats): pulls `events` messages from a new durable consumer with the dispatcher's
/// prefetch and acks each as the dispatcher does (`dead_letter::confirmed_ack`), as many at
/// once as the dispatcher may hold unacked (`MAX_IN_FLIGHT_BATCHES` batches of `size`).
/// Returns events per second and the CPU time per event of this process (nats-server's is not
/// counted).
async fn nats_ceiling(js: &jetstream::Context, events: usize, size: usize) -> (f64, Duration) {
    let stream = js.get_stream(stream_name("default")).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench-ceiling".into()),
            filter_subject: event_filter("default", "ev1"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let window = consumer::MAX_IN_FLIGHT_BATCHES * size;
    let cpu = cpu_time();
    let started = Instant::now();
    let messages = consumer
        .stream()
        .max_messages_per_batch(window.clamp(1, 1000))
        .messages()
        .await
        .unwrap();
    let acked = messages
        .take(events)
        .map(|message| async move { dead_letter::confirmed_ack(&message.unwrap()).await })
        .buffer_unordered(window)
        .filter(|result| std::future::ready(result.is_ok()))
        .count()
        .await;
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    assert_eq!(acked, events);
    stream.delete_consumer("bench-ceiling").await.unwrap();
    (events as f64 / elapsed.as_secs_f64(), cpu / events as u32)
}

/// Ceiling (claims): `events` first claims of new events in the state bucket, the write each
/// dispatched event needs, as many at once as the dispatcher may make them
/// (`MAX_IN_FLIGHT_BATCHES` batches of `size`). Returns claims per second.
async fn claim_ceiling(js: &jetstream::Context, prefix: &str, events: usize, size: usize) -> f64 {
    let states = StateStore::open(js, &BucketSettings::default())
        .await
        .unwrap();
    let window = consumer::MAX_IN_FLIGHT_BATCHES * size;
    let started = Instant::now();
    let claimed = futures::stream::iter(0..events)
        .map(|i| {
            let states = &states;
            async move {
                let id = format!("{prefix}-claim-{i}");
                states.claim("default", "ev1", &id, "ev1-bench").await
            }
        })
        .buffer_unordered(window)
        .filter(|claim| std::future::ready(matches!(claim, Ok(Claim::Claimed { .. }))))
        .count()
        .await;
    assert_eq!(claimed, events);
    events as f64 / started.elapsed().as_secs_f64()
}

async fn run(batch: u32, events: usize) {
    // Limits retention (not the default work queue): the ceiling's consumer and the
    // dispatcher's both read the same messages.
    let server = jobico_testkit::NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let streams = jobico_store::StreamSettings {
        retention: jobico_store::Retention::Limits,
        ..Default::default()
    };
    jobico_store::streams::ensure(&js, "default", &streams)
        .await
        .unwrap();
    let (client, cluster) = FakeCluster::start();
    let mut owner = (*support::sample("ev1.yaml")).clone();
    if batch > 1 {
        owner.spec.events[0].batch = Some(BatchSpec {
            max_events: batch,
            max_wait_millis: Some(50),
            max_bytes: Some(1_048_576),
        });
    }
    let prefix = format!("b{batch}");
    publish(&js, &prefix, events).await;
    let (nats_ceiling, nats_cpu) = nats_ceiling(&js, events, batch as usize).await;
    let owner = Arc::new(owner);
    let grouped = batches(&owner, &prefix, events, batch as usize);
    let best_of_three = async |how| {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(api_ceiling(&grouped, how).await);
        }
        runs.into_iter()
            .max_by(|a: &(f64, Duration), b| a.0.total_cmp(&b.0))
            .expect("three runs")
    };
    let (kube_ceiling, _) = best_of_three(Create::KubeApi).await;
    let (api_ceiling, api_cpu) = best_of_three(Create::Dispatcher).await;
    let render_cpu = render_cost(&grouped);
    let claims = claim_ceiling(&js, &prefix, events, batch as usize).await;
    let metrics = Arc::new(Metrics::new());
    let backend = KubeBackend::new(client, Renderer::new("ghcr.io/coeux/wasm-exec:0.1.0"));
    let ctx = Dispatcher::connect_with(
        js.clone(),
        backend,
        metrics.clone(),
        RetryPolicy::default(),
        consumer::ACK_WAIT,
        streams,
    )
    .await
    .unwrap();
    let token = CancellationToken::new();
    let cpu = cpu_time();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run(ctx, owner, "ev1".into(), token.clone()));
    while metrics.events_dispatched.get() < events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    token.cancel();
    handle.await.unwrap();
    let jobs = cluster.created.load(Ordering::Relaxed);
    let (jobs_per_s, events_per_s) = (
        jobs as f64 / elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
    );
    // Each ceiling keeps the two cores busy; a dispatcher adding nothing to a create per Job,
    // a claim and a pull-and-ack per event would spend their costs added up.
    let added_up =
        1.0 / (1.0 / (api_ceiling * f64::from(batch)) + 1.0 / nats_ceiling + 1.0 / claims);
    println!(
        "batch {batch:>3}: ceilings' costs added up (create per Job, claim {claims:.0}/s and pull-and-ack per event): {added_up:.0} events/s, {:.0}% of api, {:.0}% of nats; the dispatcher reaches {:.0}% of that",
        100.0 * added_up / (api_ceiling * f64::from(batch)),
        100.0 * added_up / nats_ceiling,
        100.0 * events_per_s / added_up,
    );
    println!(
        "batch {batch:>3}: {events:>6} events, {jobs:>5} Jobs in {:>5.2} s: {jobs_per_s:>6.0} Jobs/s ({:>3.0}% of api {api_ceiling:.0}, {:>3.0}% of kube-rs create {kube_ceiling:.0}), {events_per_s:>6.0} events/s ({:>3.0}% of nats {nats_ceiling:.0}), CPU {:>5.0} µs/Job ({:.0} µs/event; alone: render {} µs/Job, api create {} µs/Job, pull-and-ack {} µs/event)",
        elapsed.as_secs_f64(),
        100.0 * jobs_per_s / api_ceiling,
        100.0 * jobs_per_s / kube_ceiling,
        100.0 * events_per_s / nats_ceiling,
        cpu.as_micros() as f64 / jobs as f64,
        cpu.as_micros() as f64 / events as f64,
        render_cpu.as_micros(),
        api_cpu.as_micros(),
        nats_cpu.as_micros(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; an optional number scales the event counts.
    let scale: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (batch, events) in [(1, 3_000), (10, 10_000), (100, 20_000)] {
            run(batch, ((events as f64) * scale).max(batch as f64) as usize).await;
        }
    });
}
