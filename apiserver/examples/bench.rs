//! Ingress benchmark (not a test): accepted events/s and latency with JetStream acks, beside
//! the HTTP ceiling (validation and publish off) and the NATS ceiling (raw acked publishes).
//!
//! Run with `scripts/bench-apiserver.sh` (release build, a fresh nats-server from the testkit).
//! Everything runs on loopback in this process's machine, so clients, server and NATS share the
//! CPU: figures are comparable with each other, not with a real deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use async_nats::HeaderMap;
use jobico_apiserver::jetstream::{JetStreamPublisher, StreamSettings};
use jobico_apiserver::{AppState, Catalog, Metrics, NullPublisher, Publisher, catalog, server};
use jobico_model::Manifest;
use jobico_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

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

/// `clients` concurrent HTTP clients sending single events for `seconds`.
async fn http_load(url: &str, clients: usize, seconds: Duration) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let started = Instant::now();
    let deadline = started + seconds;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
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

/// `clients` concurrent raw JetStream publishers, each awaiting its ack.
async fn nats_load(
    context: &async_nats::jetstream::Context,
    clients: usize,
    seconds: Duration,
) -> Figures {
    let payload = bytes::Bytes::from(format!(
        r#"{{"id":"x","namespace":"default","event":"ev1","data":{EVENT}}}"#
    ));
    let started = Instant::now();
    let deadline = started + seconds;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (context, payload) = (context.clone(), payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let id = format!("raw-{c}-{n}");
                    n += 1;
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    context
                        .publish_with_headers(
                            format!("jobico.default.ev1.{id}"),
                            headers,
                            payload.clone(),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
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
        .get_stream("JOBICO")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let seconds = Duration::from_secs(
        std::env::args()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let nats = NatsServer::start();
    let full = Arc::new(
        JetStreamPublisher::connect(&nats.url(), StreamSettings::default(), Metrics::new())
            .await
            .unwrap(),
    );
    let context = full.context().clone();
    let (full_url, stop_full) = serve(full, true);
    let (ceiling_url, stop_ceiling) = serve(Arc::new(NullPublisher), false);

    println!(
        "jobico-apiserver benchmark: {}s per run, loopback, single events of {} bytes",
        seconds.as_secs(),
        EVENT.len()
    );
    println!(
        "{:<44} {:>8} {:>12} {:>10} {:>10} {:>14}",
        "run", "clients", "events/s", "p50", "p99", "vs lower ceil."
    );
    for clients in [1, 64] {
        let http = http_load(&ceiling_url, clients, seconds).await;
        purge(&context).await;
        let raw = nats_load(&context, clients, seconds).await;
        purge(&context).await;
        let accepted = http_load(&full_url, clients, seconds).await;
        purge(&context).await;
        let lower = http.per_second.min(raw.per_second);
        for (name, f) in [
            ("(a) HTTP ceiling: no validation, no publish", &http),
            ("(b) NATS ceiling: raw acked publishes", &raw),
            ("ingress: validate + publish, acked", &accepted),
        ] {
            println!(
                "{name:<44} {clients:>8} {:>12.0} {:>8.2}ms {:>8.2}ms {:>13.0}%",
                f.per_second,
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3,
                100.0 * f.per_second / lower
            );
        }
    }
    stop_full.cancel();
    stop_ceiling.cancel();
}
