//! Dispatch throughput: Jobs created per second, events per second and CPU time per Job at
//! batch sizes 1, 10 and 100, through the whole consumer path (a real nats-server, state
//! records, the Kubernetes backend rendering and creating Jobs) against the in-process fake
//! API. Run with `scripts/bench-dispatcher.sh`. Not a timed test.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jobico_common::subject::event_subject;
use jobico_dispatcher::consumer;
use jobico_dispatcher::kubernetes::KubeBackend;
use jobico_dispatcher::metrics::Metrics;
use jobico_dispatcher::render::Renderer;
use jobico_dispatcher::{Dispatcher, RetryPolicy};
use jobico_model::BatchSpec;
use serde_json::json;
use support::fake_api::FakeCluster;
use tokio_util::sync::CancellationToken;

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

async fn publish(js: &jetstream::Context, prefix: &str, count: usize) {
    let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let record = support::record(
            "default",
            "ev1",
            &id,
            json!({"firstName": "Ada", "lastName": "Lovelace", "i": i}),
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        acks.push(
            js.publish_with_headers(
                event_subject("default", "ev1", &id),
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

async fn run(batch: u32, events: usize) {
    let (_server, js) = support::nats().await;
    let (client, cluster) = FakeCluster::start();
    let mut owner = (*support::sample("ev1.yaml")).clone();
    if batch > 1 {
        owner.spec.events[0].batch = Some(BatchSpec {
            max_events: batch,
            max_wait_millis: Some(50),
            max_bytes: Some(1_048_576),
        });
    }
    publish(&js, &format!("b{batch}"), events).await;
    let metrics = Arc::new(Metrics::new());
    let backend = KubeBackend::new(client, Renderer::new("ghcr.io/coeux/wasm-exec:0.1.0"));
    let ctx = Dispatcher::connect(js.clone(), backend, metrics.clone(), RetryPolicy::default())
        .await
        .unwrap();
    let token = CancellationToken::new();
    let cpu = cpu_time();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run(
        ctx,
        Arc::new(owner),
        "ev1".into(),
        token.clone(),
    ));
    while metrics.events_dispatched.get() < events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    token.cancel();
    handle.await.unwrap();
    let jobs = cluster.created.load(Ordering::Relaxed);
    println!(
        "batch {batch:>3}: {events:>6} events, {jobs:>5} Jobs in {:>6.2} s: {:>7.0} Jobs/s, {:>7.0} events/s, CPU {:>6.0} µs/Job ({:.0} µs/event)",
        elapsed.as_secs_f64(),
        jobs as f64 / elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        cpu.as_micros() as f64 / jobs as f64,
        cpu.as_micros() as f64 / events as f64,
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
