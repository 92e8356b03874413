//! Fixtures shared by the dispatcher's integration tests.
#![allow(dead_code, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use jobico_common::{EventId, EventRecord};
use jobico_dispatcher::backend::Batch;
use jobico_model::{Job as JobicoJob, Manifest};
use serde_json::json;

pub mod fake_api;

use async_nats::jetstream;
use jobico_common::subject::{HEADER_EVENT_ID, event_subject};
use jobico_testkit::NatsServer;

/// The UID given to sample resources (the API server would assign one).
pub const UID: &str = "6f1c9a4e-2b7d-4c1e-9a52-0c8f4a1d2e3b";

/// The Jobico `Job` resources of `samples/<file>`, with a fixed uid.
pub fn sample(file: &str) -> Arc<JobicoJob> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples")
        .join(file);
    let mut manifest = Manifest::default();
    manifest.read_path(&path).expect("sample reads");
    let mut job = manifest.jobs.into_iter().next().expect("sample has a Job");
    job.metadata.uid = Some(UID.into());
    Arc::new(job)
}

/// An event record of `event` in `namespace` with id `id`.
pub fn record(namespace: &str, event: &str, id: &str, data: serde_json::Value) -> EventRecord {
    EventRecord {
        id: EventId::parse(id).expect("valid id"),
        namespace: namespace.into(),
        event: event.into(),
        data,
        attributes: Default::default(),
    }
}

/// A batch of events with ids `ids` for the first event of `owner`.
pub fn batch(owner: &Arc<JobicoJob>, ids: &[&str]) -> Batch {
    let event = owner.spec.events[0].name.clone();
    let namespace = owner.metadata.namespace.clone().unwrap();
    Batch {
        owner: owner.clone(),
        event: event.clone(),
        events: ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                record(
                    &namespace,
                    &event,
                    id,
                    json!({"firstName": "Ada", "lastName": "Lovelace", "n": i}),
                )
            })
            .collect(),
    }
}

/// Compares `actual` with `tests/golden/<name>`; `JOBICO_BLESS=1` rewrites the file.
pub fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("JOBICO_BLESS").is_some() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with JOBICO_BLESS=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} differs (JOBICO_BLESS=1 to accept)",
        path.display()
    );
}

/// A nats-server with the event stream of namespace `default` created as a consumer of the
/// namespace creates it (so tests may publish before their consumers start).
pub async fn nats() -> (NatsServer, jetstream::Context) {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url())
        .await
        .expect("connect to nats");
    let js = jetstream::new(client);
    jobico_store::streams::ensure(&js, "default", &jobico_store::StreamSettings::default())
        .await
        .expect("create the event stream");
    (server, js)
}

/// A fresh JetStream context on a new connection (what a restarted process would have).
pub async fn reconnect(server: &NatsServer) -> jetstream::Context {
    jetstream::new(
        async_nats::connect(server.url())
            .await
            .expect("connect to nats"),
    )
}

/// Publishes `count` events `<prefix>-<i>` of `event` in `namespace`, as the ingress does.
pub async fn publish(
    js: &jetstream::Context,
    namespace: &str,
    event: &str,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let mut acks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let body = serde_json::to_vec(&record(
            namespace,
            event,
            &id,
            json!({"firstName": "Ada", "lastName": "Lovelace", "i": i}),
        ))
        .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        headers.insert(HEADER_EVENT_ID, id.as_str());
        acks.push(
            js.publish_with_headers(event_subject(namespace, event, &id), headers, body.into())
                .await
                .unwrap(),
        );
        ids.push(id);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    ids
}

/// Polls `check` every 20 ms until it holds, failing after `seconds`.
pub async fn eventually<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What a [`receiver`] was sent: the headers and the JSON body (null when not JSON) of each
/// request.
pub type Received = Arc<std::sync::Mutex<Vec<(http::HeaderMap, serde_json::Value)>>>;

/// An HTTP receiver on a free loopback port answering each request with the next status of
/// `answers` (then 200 for ever), body `not now`.
pub async fn receiver(answers: Vec<u16>) -> (std::net::SocketAddr, Received) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let answers = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        answers,
    )));
    let kept = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (kept, answers) = (kept.clone(), answers.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let (kept, answers) = (kept.clone(), answers.clone());
                        async move {
                            let headers = request.headers().clone();
                            let body = match request.into_body().collect().await {
                                Ok(body) => body.to_bytes(),
                                Err(_) => Bytes::new(),
                            };
                            let body =
                                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            kept.lock().unwrap().push((headers, body));
                            let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                            let response = hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"not now")))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (address, received)
}
