//! Ingress benchmark (not a test): accepted events/s and latency with JetStream acks, beside
//! the HTTP ceiling (validation and publish off) and the NATS ceiling (raw acked publishes).
//!
//! Run with `scripts/bench-apiserver.sh` (release build, a fresh nats-server from the testkit).
//! Everything runs on loopback in this process's machine, so clients, server and NATS share the
//! CPU: figures are comparable with each other, not with a real deployment. The load generator
//! has a runtime of its own, as a separate client would: sharing the servers' runtime would put
//! the ingress's NATS client behind 64 load tasks in one run queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::web;
use async_nats::HeaderMap;
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_apiserver::{AppState, Catalog, Metrics, NullPublisher, Publisher, catalog, server};
use jobico_model::Manifest;
use jobico_store::NatsAuth;
use jobico_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// The binary's allocator (`src/main.rs`), so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-ev1}
data:
  schema-ev1.json: |
    {"type": "object",
     "properties": {"firstName": {"type": "string"}, "lastName": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["firstName", "lastName"]}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: job-for-ev1}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: schema-ev1}}
"#;

const EVENT: &str = r#"{"firstName":"Ada","lastName":"Lovelace","age":36}"#;

/// One measurement.
struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn figures(mut latencies: Vec<Duration>, elapsed: Duration) -> Figures {
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn catalog() -> Arc<Catalog> {
    let mut manifest = Manifest::default();
    manifest
        .read_str(std::path::Path::new("bench.yaml"), MANIFEST)
        .unwrap();
    let catalog = Catalog::new();
    catalog.replace(catalog::from_manifest(&manifest).0);
    Arc::new(catalog)
}

/// Starts a server; returns its URL and the token that stops it.
fn serve(publisher: Arc<dyn Publisher>, validate: bool) -> (String, CancellationToken) {
    let mut state = AppState::new(catalog(), publisher, 256 * 1024);
    state.validate = validate;
    // Two workers: one per core of the benchmark machine.
    let bound = server::bind("127.0.0.1:0".parse().unwrap(), 2, web::Data::new(state)).unwrap();
    let url = format!("http://{}/execute/default/ev1", bound.local_addr);
    let stop = CancellationToken::new();
    tokio::spawn(bound.run(stop.clone()));
    (url, stop)
}

/// One load client's schedule: as fast as it can, or one request every `clients / rate` seconds
/// (`rate` in all).
struct Pace {
    interval: Option<Duration>,
    due: Instant,
}

impl Pace {
    fn new(clients: usize, rate: Option<f64>) -> Self {
        Self {
            interval: rate.map(|rate| Duration::from_secs_f64(clients as f64 / rate)),
            due: Instant::now(),
        }
    }

    /// Waits until the next request is due and returns the time its latency counts from: when
    /// it was due if the client is late (the server held it up), else when the client's timer
    /// woke it (tokio's timers are coarse: that lateness is the load generator's, not the
    /// server's).
    async fn next(&mut self) -> Instant {
        let now = Instant::now();
        let sent = match self.interval {
            Some(_) if now < self.due => {
                tokio::time::sleep_until(self.due.into()).await;
                Instant::now()
            }
            Some(_) => self.due,
            None => now,
        };
        self.due += self.interval.unwrap_or_default();
        sent
    }
}

/// `clients` concurrent HTTP clients sending single events for `seconds`, on `load`: each as
/// fast as it can, or with `rate` events/s in all, each client on a fixed schedule, latency
/// counted from the time a request was due when the client is behind it (so a server falling
/// behind shows in it).
async fn http_load(
    load: &tokio::runtime::Handle,
    url: &str,
    clients: usize,
    seconds: Duration,
    rate: Option<f64>,
) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let started = Instant::now();
    let deadline = started + seconds;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            load.spawn(async move {
                let mut pace = Pace::new(clients, rate);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = pace.next().await;
                    let response = client
                        .put(&url)
                        .header("content-type", "application/json")
                        .body(EVENT)
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let _ = response.bytes().await;
                    assert_eq!(
                        status.as_u16(),
                        202,
                        "the benchmark expects every event accepted"
                    );
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    figures(all, started.elapsed())
}

/// `clients` concurrent raw JetStream publishers on `load`, each awaiting its ack: as fast as
/// they can, or paced at `rate` in all as [`http_load`] paces.
async fn nats_load(
    load: &tokio::runtime::Handle,
    context: &async_nats::jetstream::Context,
    clients: usize,
    seconds: Duration,
    rate: Option<f64>,
) -> Figures {
    let payload = bytes::Bytes::from(format!(
        r#"{{"id":"x","namespace":"default","event":"ev1","data":{EVENT}}}"#
    ));
    // Ids unique across runs: a repeated `Nats-Msg-Id` within the stream's duplicate window
    // would be answered as a duplicate without being stored.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + seconds;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (context, payload) = (context.clone(), payload.clone());
            load.spawn(async move {
                let mut pace = Pace::new(clients, rate);
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let sent = pace.next().await;
                    let id = format!("raw-{run}-{c}-{n}");
                    n += 1;
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    let ack = context
                        .publish_with_headers(
                            format!("jobico.default.ev1.{id}"),
                            headers,
                            payload.clone(),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    // A duplicate is answered without being stored: not what this measures.
                    assert!(!ack.duplicate, "message {id} was taken for a duplicate");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    figures(all, started.elapsed())
}

async fn purge(context: &async_nats::jetstream::Context) {
    context
        .get_stream(jobico_common::subject::stream_name("default"))
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
}

/// The median of `runs` by throughput (the run whose figures are reported), and the range.
fn median(mut runs: Vec<Figures>) -> (Figures, f64, f64) {
    runs.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    let (low, high) = (runs[0].per_second, runs[runs.len() - 1].per_second);
    (runs.swap_remove(runs.len() / 2), low, high)
}

#[tokio::main]
async fn main() {
    let arg = |n: usize, default: u64| {
        std::env::args()
            .nth(n)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let seconds = Duration::from_secs(arg(1, 3));
    // Shared 2-core machines are noisy: the three runs are interleaved, repeated, and each
    // reported by its median round.
    let rounds = arg(2, 5).max(1) as usize;
    // Two threads: the clients of a 2-core machine; the servers keep this runtime.
    let load_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    let load = load_runtime.handle().clone();
    let nats = NatsServer::start();
    let full = Arc::new(
        JetStreamPublisher::connect(
            &nats.url(),
            &NatsAuth::default(),
            PublishSettings::default(),
            Metrics::new(),
        )
        .await
        .unwrap(),
    );
    let context = full.context().clone();
    // The namespace's stream, as the dispatcher creates it, with room for a run's events.
    let streams = jobico_store::StreamSettings {
        max_bytes: 1 << 30,
        max_messages: -1,
        ..Default::default()
    };
    jobico_store::streams::ensure(&context, "default", &streams)
        .await
        .unwrap();
    let (full_url, stop_full) = serve(full, true);
    let (ceiling_url, stop_ceiling) = serve(Arc::new(NullPublisher), false);

    println!(
        "jobico-apiserver benchmark: loopback, single events of {} bytes, {rounds} interleaved rounds of {}s per run, median round shown",
        EVENT.len(),
        seconds.as_secs(),
    );
    println!(
        "{:<40} {:>7} {:>9} {:>15} {:>8} {:>8} {:>11}",
        "run", "clients", "events/s", "range", "p50", "p99", "vs lower"
    );
    let mut ingress_max = 0.0;
    for clients in [1, 64] {
        let (mut http, mut raw, mut ingress) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            http.push(http_load(&load, &ceiling_url, clients, seconds, None).await);
            raw.push(nats_load(&load, &context, clients, seconds, None).await);
            purge(&context).await;
            ingress.push(http_load(&load, &full_url, clients, seconds, None).await);
            purge(&context).await;
        }
        let runs = [
            ("(a) HTTP ceiling: no validation/publish", median(http)),
            ("(b) NATS ceiling: raw acked publishes", median(raw)),
            ("ingress: validate + publish, acked", median(ingress)),
        ];
        let lower = runs[0].1.0.per_second.min(runs[1].1.0.per_second);
        for (name, (f, low, high)) in &runs {
            println!(
                "{name:<40} {clients:>7} {:>9.0} {:>15} {:>6.2}ms {:>6.2}ms {:>10.0}%",
                f.per_second,
                format!("{low:.0}-{high:.0}"),
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3,
                100.0 * f.per_second / lower
            );
        }
        let (http, nats, ingress) = (&runs[0].1.0, &runs[1].1.0, &runs[2].1.0);
        if clients == 1 {
            let over = ingress.p50.as_secs_f64() - http.p50.as_secs_f64() - nats.p50.as_secs_f64();
            println!(
                "one client: ingress p50 is {:.0} µs above the HTTP and NATS round trips together (target: at most 30 µs)",
                over * 1e6
            );
        } else {
            ingress_max = ingress.per_second;
            // Both ceilings keep the two cores busy, so an ingress that added nothing to an
            // HTTP request and a NATS publish would spend their two costs per event added up.
            let combined = 1.0 / (1.0 / http.per_second + 1.0 / nats.per_second);
            println!(
                "ceilings' costs added up: {combined:.0} events/s ({:.0}% of the lower ceiling); the ingress reaches {:.0}% of that",
                100.0 * combined / lower,
                100.0 * ingress.per_second / combined
            );
        }
    }
    // Latency below saturation: 64 clients sending at half the rate the ingress reached.
    // Beside it, each ceiling at the same pace: the latency the machine, the load generator and
    // HTTP alone, or nats-server alone, add.
    let half = ingress_max / 2.0;
    let (mut paced, mut paced_http, mut paced_nats) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        paced_http.push(http_load(&load, &ceiling_url, 64, seconds, Some(half)).await);
        paced_nats.push(nats_load(&load, &context, 64, seconds, Some(half)).await);
        purge(&context).await;
        paced.push(http_load(&load, &full_url, 64, seconds, Some(half)).await);
        purge(&context).await;
    }
    for (name, runs) in [
        ("(a) HTTP ceiling at the same rate", paced_http),
        ("(b) NATS ceiling at the same rate", paced_nats),
        ("ingress at half its maximum rate", paced),
    ] {
        let (f, low, high) = median(runs);
        println!(
            "{name:<40} {:>7} {:>9.0} {:>15} {:>6.2}ms {:>6.2}ms   (paced at {half:.0}/s, half the ingress's maximum; target p99 at most 5 ms)",
            64,
            f.per_second,
            format!("{low:.0}-{high:.0}"),
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
        );
    }
    load_runtime.shutdown_background();
    stop_full.cancel();
    stop_ceiling.cancel();
}
