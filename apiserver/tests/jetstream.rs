//! The ingress against a real nats-server (started per test by the testkit harness).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::{StatusCode, header};
use async_nats::jetstream;
use common::{VALID, put, send, state_with};
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_apiserver::{AppState, Metrics};
use jobico_common::subject::STATE_BUCKET;
use jobico_common::{EventRecord, EventState, EventStatus};
use jobico_store::{NatsAuth, StreamSettings};
use jobico_testkit::NatsServer;
use serde_json::json;

const LIMIT: usize = 64 * 1024;

/// Short timeouts so the outage test is quick.
fn settings() -> PublishSettings {
    PublishSettings {
        publish_timeout: Duration::from_millis(1500),
        ..Default::default()
    }
}

/// The stream of namespace `default`, as its dispatcher would create it.
const STREAM: &str = "JOBICO-default";

/// The publisher on `nats`, with the streams of `namespaces` created with `streams` (the
/// dispatcher's part).
async fn publisher(
    nats: &NatsServer,
    settings: PublishSettings,
    namespaces: &[&str],
    streams: &StreamSettings,
) -> JetStreamPublisher {
    let publisher =
        JetStreamPublisher::connect(&nats.url(), &NatsAuth::default(), settings, Metrics::new())
            .await
            .unwrap();
    for namespace in namespaces {
        jobico_store::streams::ensure(publisher.context(), namespace, streams)
            .await
            .unwrap();
    }
    publisher
}

/// The ingress on `nats`, with the streams of `default` and `team-b` created with `streams`.
async fn connect_with(
    nats: &NatsServer,
    settings: PublishSettings,
    streams: StreamSettings,
) -> (actix_web::web::Data<AppState>, jetstream::Context) {
    let publisher = publisher(nats, settings, &["default", "team-b"], &streams).await;
    let context = publisher.context().clone();
    (state_with(Arc::new(publisher), LIMIT), context)
}

async fn connect(
    nats: &NatsServer,
    settings: PublishSettings,
) -> (actix_web::web::Data<AppState>, jetstream::Context) {
    connect_with(nats, settings, StreamSettings::default()).await
}

/// Streams of 4 KiB.
fn small() -> StreamSettings {
    StreamSettings {
        max_bytes: 4096,
        ..Default::default()
    }
}

async fn stream_messages(context: &jetstream::Context) -> u64 {
    context
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[actix_web::test]
async fn publishes_one_message_per_event_with_headers_and_reports_it_accepted() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = put("/execute/default/ev1", VALID)
        .insert_header(("traceparent", tp))
        .insert_header(("Idempotency-Key", "order-1"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["ids"], json!(["order-1"]));

    let stream = context.get_stream(STREAM).await.unwrap();
    let message = stream
        .get_last_raw_message_by_subject("jobico.default.ev1.order-1")
        .await
        .unwrap();
    let headers = message.headers;
    assert_eq!(
        headers.get("Nats-Msg-Id").unwrap().as_str(),
        "default.ev1.order-1"
    );
    assert_eq!(headers.get("Jobico-Event-Id").unwrap().as_str(), "order-1");
    assert_eq!(headers.get("Jobico-Event").unwrap().as_str(), "ev1");
    assert_eq!(headers.get("Jobico-Namespace").unwrap().as_str(), "default");
    assert_eq!(headers.get("traceparent").unwrap().as_str(), tp);
    let record: EventRecord = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        record.data,
        json!({"firstName":"Ada","lastName":"Lovelace"})
    );

    let (status, _, body) = send(
        &state,
        actix_web::test::TestRequest::get().uri("/events/default/order-1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["event"].as_str()),
        (Some("accepted"), Some("ev1"))
    );
    assert!(
        body["updatedAt"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok(),
        "{body}"
    );
    // Accepting is one write: the stored message is the `accepted` state, nothing is in the bucket.
    let kv = context.get_key_value(STATE_BUCKET).await.unwrap();
    assert!(kv.get("default.ev1.order-1").await.unwrap().is_none());
    let (status, _, _) = send(
        &state,
        actix_web::test::TestRequest::get().uri("/events/default/unknown"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(
        &state,
        actix_web::test::TestRequest::get().uri("/events/default/bad.*id"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A batch is published at once; every event becomes one message.
    let batch = format!("{{\"data\":[{}]}}", vec![VALID; 100].join(","));
    let (status, _, body) = send(&state, put("/execute/default/ev1", &batch)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["ids"].as_array().unwrap().len(), 100);
    assert_eq!(stream_messages(&context).await, 101);
}

#[actix_web::test]
async fn a_repeated_idempotency_key_returns_the_original_id_and_stores_nothing() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    let req =
        || put("/execute/default/ev1", VALID).insert_header(("Idempotency-Key", "urn:order/7"));
    let (status, _, first) = send(&state, req()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(first.get("duplicate").is_none());
    let (status, _, second) = send(&state, req()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["ids"], first["ids"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(stream_messages(&context).await, 1);
    // The same key for another event is another event.
    let other =
        put("/execute/default/ev1", VALID).insert_header(("Idempotency-Key", "urn:order/8"));
    assert!(send(&state, other).await.2.get("duplicate").is_none());
    assert_eq!(stream_messages(&context).await, 2);
}

fn recorded(id: &str, state: EventState) -> EventStatus {
    let mut status = EventStatus::new("default", "ev1", id, state, "2026-01-01T00:00:00Z".into());
    status.job = Some("job-1".into());
    status
}

#[actix_web::test]
async fn a_recorded_state_wins_over_the_stored_event_and_outlives_it() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    let kv = context.get_key_value(STATE_BUCKET).await.unwrap();
    let status_of = |id: &'static str| {
        let state = state.clone();
        async move {
            let uri = format!("/events/default/{id}");
            send(&state, actix_web::test::TestRequest::get().uri(&uri)).await
        }
    };
    for id in ["fast", "gone"] {
        let req = put("/execute/default/ev1", VALID).insert_header(("Idempotency-Key", id));
        assert_eq!(send(&state, req).await.0, StatusCode::ACCEPTED);
    }
    // The dispatcher recorded a later state while the message is still in the stream.
    let running = recorded("fast", EventState::Running);
    kv.put(
        "default.ev1.fast",
        serde_json::to_vec(&running).unwrap().into(),
    )
    .await
    .unwrap();
    let (_, _, body) = status_of("fast").await;
    assert_eq!(
        (body["state"].as_str(), body["job"].as_str()),
        (Some("running"), Some("job-1"))
    );

    // The dispatcher recorded `dispatched` and acked: the message is gone, the record stays.
    let dispatched = recorded("gone", EventState::Dispatched);
    kv.put(
        "default.ev1.gone",
        serde_json::to_vec(&dispatched).unwrap().into(),
    )
    .await
    .unwrap();
    let stream = context.get_stream(STREAM).await.unwrap();
    let message = stream
        .get_last_raw_message_by_subject("jobico.default.ev1.gone")
        .await
        .unwrap();
    stream.delete_message(message.sequence).await.unwrap();
    let (status, _, body) = status_of("gone").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "dispatched");

    // Ids are whole: a prefix of a stored id is not that event.
    let (status, _, _) = status_of("fas").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn ids_with_dots_are_found_in_the_stream() {
    let nats = NatsServer::start();
    let (state, _context) = connect(&nats, settings()).await;
    let req = put("/execute/default/ev1", VALID).insert_header(("Idempotency-Key", "order.7.v2"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(
        (status, body["ids"].clone()),
        (StatusCode::ACCEPTED, json!(["order.7.v2"]))
    );
    for (id, found) in [("order.7.v2", true), ("order.7", false), ("7.v2", false)] {
        let uri = format!("/events/default/{id}");
        let (status, _, body) = send(&state, actix_web::test::TestRequest::get().uri(&uri)).await;
        assert_eq!(status == StatusCode::OK, found, "{id}: {body}");
    }
}

/// Polls `check` every 20 ms until it holds, failing after `seconds`.
async fn eventually(seconds: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn an_http_worker_publishes_through_its_own_connection_and_survives_an_outage() {
    let mut nats = NatsServer::start();
    let publisher =
        Arc::new(publisher(&nats, settings(), &["default"], &StreamSettings::default()).await);
    let context = publisher.context().clone();
    let state = state_with(publisher.clone(), LIMIT);
    // actix's test runtime is single-threaded, like an HTTP worker's. The first request goes
    // through the shared connection while this thread's own is being made.
    assert_eq!(
        send(&state, put("/execute/default/ev1", VALID)).await.0,
        StatusCode::ACCEPTED
    );
    eventually(10, "the worker connection", || publisher.worker_connected()).await;
    for _ in 0..10 {
        assert_eq!(
            send(&state, put("/execute/default/ev1", VALID)).await.0,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(stream_messages(&context).await, 11);

    nats.kill();
    let (status, _, body) = send(&state, put("/execute/default/ev1", VALID)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while send(&state, put("/execute/default/ev1", VALID)).await.0 != StatusCode::ACCEPTED {
        assert!(Instant::now() < deadline, "no recovery after NATS returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The worker's own connection comes back too (it may reconnect after the shared one).
    eventually(10, "the worker connection back", || {
        publisher.worker_connected()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_threaded_runtime_publishes_through_the_shared_connection() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats, settings(), &["default"], &StreamSettings::default()).await;
    let record = EventRecord {
        id: jobico_common::EventId::parse("mt-1").unwrap(),
        namespace: "default".into(),
        event: "ev1".into(),
        data: json!({}),
        attributes: Default::default(),
    };
    use jobico_apiserver::Publisher;
    let published = publisher.publish(vec![record]).await.unwrap();
    assert_eq!(published[0].id.as_str(), "mt-1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !publisher.worker_connected(),
        "no per-thread connection on a shared runtime"
    );
    assert_eq!(stream_messages(publisher.context()).await, 1);
}

#[actix_web::test]
async fn nats_down_is_503_and_recovers_without_restart() {
    let mut nats = NatsServer::start();
    let (state, _context) = connect(&nats, settings()).await;
    assert_eq!(
        send(&state, put("/execute/default/ev1", VALID)).await.0,
        StatusCode::ACCEPTED
    );

    nats.kill();
    let started = Instant::now();
    let (status, headers, body) = send(&state, put("/execute/default/ev1", VALID)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.get(header::RETRY_AFTER).is_some());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a request must not hang while NATS is down"
    );
    assert!(!state.is_ready());

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = send(&state, put("/execute/default/ev1", VALID)).await;
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "no recovery after NATS returned: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state.is_ready());
}

#[actix_web::test]
async fn a_full_stream_is_503_and_keeps_nothing_new() {
    let nats = NatsServer::start();
    let (state, context) = connect_with(&nats, settings(), small()).await;
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..100 {
        let (status, headers, body) = send(&state, put("/execute/default/ev1", VALID)).await;
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(headers.get(header::RETRY_AFTER).is_some());
                refused = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refused = refused.expect("a 4 KiB stream must fill up");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("namespace default holds as many undispatched events as its limit allows"),
        "{refused}"
    );
    assert!(accepted > 0);
    assert_eq!(stream_messages(&context).await, accepted);
}

/// Sends `ev1` events to `namespace` until one is refused; returns how many were accepted and
/// the refusal's error.
async fn fill(state: &actix_web::web::Data<AppState>, namespace: &str) -> (u64, String) {
    let mut accepted = 0;
    for _ in 0..10_000 {
        let (status, _, body) = send(state, put(&format!("/execute/{namespace}/ev1"), VALID)).await;
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                return (accepted, body["error"].as_str().unwrap().to_owned());
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    panic!("{namespace} accepted 10,000 events past its limit");
}

#[actix_web::test]
async fn one_tenant_at_its_limit_never_blocks_another() {
    let nats = NatsServer::start();
    // Limits in messages: 20 events per namespace.
    let limits = StreamSettings {
        max_messages: 20,
        ..Default::default()
    };
    let (state, context) = connect_with(&nats, settings(), limits).await;
    let (accepted, error) = fill(&state, "default").await;
    assert_eq!(accepted, 20);
    assert!(error.contains("namespace default"), "{error}");

    // team-b has its own stream and limit: all of it is still there.
    let (accepted_b, error_b) = fill(&state, "team-b").await;
    assert_eq!(
        accepted_b, 20,
        "the other tenant's backlog took team-b's room"
    );
    assert!(error_b.contains("namespace team-b"), "{error_b}");
    let mut b = context.get_stream("JOBICO-team-b").await.unwrap();
    assert_eq!(b.info().await.unwrap().state.messages, 20);
    assert_eq!(stream_messages(&context).await, 20);

    // Room again in default (its dispatcher drained it): default accepts, team-b still full.
    context
        .get_stream(STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    assert_eq!(
        send(&state, put("/execute/default/ev1", VALID)).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(&state, put("/execute/team-b/ev1", VALID)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[actix_web::test]
async fn a_namespace_without_its_stream_yet_is_503_and_its_status_lookups_find_nothing() {
    let nats = NatsServer::start();
    // Only default's stream: team-b's does not exist yet.
    let publisher = publisher(&nats, settings(), &["default"], &StreamSettings::default()).await;
    let state = state_with(Arc::new(publisher), LIMIT);
    let (status, headers, body) = send(&state, put("/execute/team-b/ev1", VALID)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.get(header::RETRY_AFTER).is_some());
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("namespace team-b has no event stream yet"),
        "{body}"
    );
    assert_eq!(body["stored"], json!([false]), "{body}");
    for path in ["/events/team-b/some-id", "/events/team-b/ev1/some-id"] {
        let (status, _, body) = send(&state, actix_web::test::TestRequest::get().uri(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
}

#[actix_web::test]
async fn a_header_bound_attribute_with_a_newline_is_400_and_nothing_is_stored() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let event = |id: &str, traceparent: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/s", "type": "t",
               "traceparent": traceparent, "data": {"firstName": "A", "lastName": "B"}})
    };
    // Item 0 is fine; item 1 would inject a header line into the NATS protocol.
    let batch = json!([
        event("ok-0", tp),
        event("bad-1", &format!("{tp}\r\nNats-Msg-Id: x"))
    ]);
    let req = put("/execute/default/ev1", &batch.to_string())
        .insert_header((header::CONTENT_TYPE, "application/cloudevents-batch+json"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("item 1") && error.contains("traceparent"),
        "{error}"
    );
    assert_eq!(
        stream_messages(&context).await,
        0,
        "nothing of the batch was kept"
    );

    // The same in structured mode, and the connection still works afterwards.
    let one = event(
        "bad",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nx",
    );
    let req = put("/execute/default/ev1", &one.to_string())
        .insert_header((header::CONTENT_TYPE, "application/cloudevents+json"));
    assert_eq!(send(&state, req).await.0, StatusCode::BAD_REQUEST);
    let req = put("/execute/default/ev1", VALID).insert_header(("traceparent", tp));
    assert_eq!(send(&state, req).await.0, StatusCode::ACCEPTED);
    assert_eq!(stream_messages(&context).await, 1);
}

/// The `(ids, stored)` of a 503 after a failed publish.
fn not_kept(body: &serde_json::Value) -> Vec<(String, bool)> {
    let ids = body["ids"].as_array().expect("a 503 lists the ids");
    let stored = body["stored"]
        .as_array()
        .expect("a 503 says which are stored");
    assert_eq!(ids.len(), stored.len(), "{body}");
    ids.iter()
        .zip(stored)
        .map(|(id, s)| (id.as_str().unwrap().to_string(), s.as_bool().unwrap()))
        .collect()
}

/// The retry recipe of the README: every id of the 503 sent back as the `Idempotency-Key` of
/// a single-event request. Returns how many of the retries were duplicates.
async fn retry_each(state: &actix_web::web::Data<AppState>, ids: &[(String, bool)]) -> usize {
    let mut duplicates = 0;
    for (id, _) in ids {
        let req =
            put("/execute/default/ev1", VALID).insert_header(("Idempotency-Key", id.as_str()));
        let (status, _, body) = send(state, req).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["ids"], json!([id]), "the id comes back unchanged");
        duplicates += usize::from(body["duplicate"] == true);
    }
    duplicates
}

#[actix_web::test]
async fn a_batch_cut_short_by_a_full_stream_says_which_events_are_kept() {
    let nats = NatsServer::start();
    let (state, context) = connect_with(&nats, settings(), small()).await;
    let batch = format!("{{\"data\":[{}]}}", vec![VALID; 50].join(","));
    let (status, headers, body) = send(&state, put("/execute/default/ev1", &batch)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.get(header::RETRY_AFTER).is_some());
    let outcomes = not_kept(&body);
    assert_eq!(outcomes.len(), 50);
    let kept: Vec<_> = outcomes.iter().filter(|(_, s)| *s).collect();
    assert!(!kept.is_empty() && kept.len() < 50, "{body}");
    assert_eq!(stream_messages(&context).await, kept.len() as u64);
    let stream = context.get_stream(STREAM).await.unwrap();
    for (id, stored) in &outcomes {
        let found = stream
            .get_last_raw_message_by_subject(&format!("jobico.default.ev1.{id}"))
            .await
            .is_ok();
        assert_eq!(found, *stored, "{id}");
    }

    // Room again; the client retries every id: the kept ones are duplicates, the others new.
    let mut config = small_stream_config(&context).await;
    config.max_bytes = 1 << 20;
    context.update_stream(config).await.unwrap();
    let duplicates = retry_each(&state, &outcomes).await;
    assert_eq!(duplicates, kept.len());
    assert_eq!(stream_messages(&context).await, 50, "each event kept once");
}

async fn small_stream_config(context: &jetstream::Context) -> jetstream::stream::Config {
    context
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone()
}

#[actix_web::test]
async fn a_publish_timeout_answers_the_assigned_ids_and_a_retry_with_them_stores_nothing_twice() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    assert_eq!(
        send(&state, put("/execute/default/ev1", VALID)).await.0,
        StatusCode::ACCEPTED
    );
    // NATS freezes with the batch on its way: no ack arrives in time, yet the messages are in
    // its socket and will be stored once it goes on.
    nats.pause();
    let batch = format!("{{\"data\":[{}]}}", vec![VALID; 20].join(","));
    let (status, _, body) = send(&state, put("/execute/default/ev1", &batch)).await;
    nats.resume();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let outcomes = not_kept(&body);
    assert_eq!(outcomes.len(), 20);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("did not acknowledge"),
        "{body}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream_messages(&context).await < 21 {
        assert!(
            Instant::now() < deadline,
            "the frozen batch was never stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Without the ids a retry would store 20 more; with them, nothing twice.
    let duplicates = retry_each(&state, &outcomes).await;
    assert_eq!(duplicates, 20);
    assert_eq!(stream_messages(&context).await, 21);
}

/// A WebAssembly module of about `size` bytes: the preamble, then a custom section.
fn module_of(size: usize) -> Vec<u8> {
    jobico_testkit::with_custom_section(b"\0asm\x01\0\0\0".to_vec(), size)
}

#[actix_web::test]
async fn modules_above_a_configmap_are_uploaded_by_digest_once() {
    let nats = NatsServer::start();
    let (state, context) = connect(&nats, settings()).await;
    let module = module_of(3 << 20);
    let digest = jobico_common::executor::Sha256Digest::of(&module);
    let upload = |body: Vec<u8>| {
        actix_web::test::TestRequest::put()
            .uri("/modules/team-b/orders")
            .insert_header((header::CONTENT_TYPE, "application/wasm"))
            .set_payload(body)
    };
    let (status, _, body) = send(&state, upload(module.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["wasm"], format!("sha256:{digest}"));
    assert_eq!(body["bytes"], module.len());
    // Again: nothing new.
    let (status, _, body) = send(&state, upload(module.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["existed"], true);
    // Kept under the namespace, as the dispatcher reads it.
    let store = jobico_store::ModuleStore::open(&context, 1).await.unwrap();
    assert_eq!(store.get("team-b", digest).await.unwrap(), Some(module));
    assert_eq!(store.get("default", digest).await.unwrap(), None);

    // Not a module, a bad name, too large: precise 4xx, nothing kept.
    let (status, _, body) = send(&state, upload(b"(module)".to_vec())).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly module"),
        "{body}"
    );
    let (status, _, body) = send(
        &state,
        actix_web::test::TestRequest::put()
            .uri("/modules/Team_B/orders")
            .set_payload(module_of(100)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, body) = send(
        &state,
        upload(Vec::new()).insert_header((header::CONTENT_LENGTH, (65 << 20).to_string())),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, _, _) = send(
        &state,
        actix_web::test::TestRequest::get().uri("/modules/team-b/orders"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
