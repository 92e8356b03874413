//! Following routes against a real nats-server: children published once however often a
//! parent's outcome is followed, linked to their parent, refused ones dead-lettered.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use jobico_apiserver::chain::Router;
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_apiserver::{Catalog, Metrics, catalog};
use jobico_common::summary::{EventOutcome, Status};
use jobico_common::{EventId, EventState};
use jobico_model::Manifest;
use jobico_store::{BucketSettings, NatsAuth, StateStore, StreamSettings};
use jobico_testkit::NatsServer;

const MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-invoice}
data:
  schema-invoice.json: '{"type": "object", "required": ["total"], "properties": {"total": {"type": "integer"}}}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: orders}
spec:
  events:
    - {name: order, wasm: m.wasm, schema: {key: any, optional: true}, then: [{event: invoice}, {event: invoice, when: always}]}
    - {name: invoice, wasm: m.wasm, schema: {key: schema-invoice}}
    - {name: ship, wasm: m.wasm, schema: {key: any, optional: true}, sink: {url: "http://receiver.apps.svc/events"}}
"#;

fn succeeded(id: &str, result: &str) -> EventOutcome {
    EventOutcome {
        id: id.into(),
        status: Status::Succeeded,
        exit_code: Some(0),
        error: None,
        message: None,
        warning: None,
        duration: Duration::ZERO,
        output_bytes: result.len() as u64,
        output_truncated: false,
        result: Some(result.into()),
    }
}

async fn messages(context: &jetstream::Context, stream: &str) -> u64 {
    context
        .get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// A nats-server with what the ingress meets in a cluster: the namespace's stream and the
/// dead-letter stream (the dispatcher's), the ingress's publisher on it, and [`MANIFEST`]'s
/// catalog.
async fn ingress() -> (
    NatsServer,
    JetStreamPublisher,
    jetstream::Context,
    Arc<Catalog>,
) {
    let nats = NatsServer::start();
    let publisher = JetStreamPublisher::connect(
        &nats.url(),
        &NatsAuth::default(),
        PublishSettings::default(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let context = publisher.context().clone();
    jobico_store::streams::ensure(&context, "default", &StreamSettings::default())
        .await
        .unwrap();
    context
        .create_stream(jetstream::stream::Config {
            name: "JOBICO_DLQ".into(),
            subjects: vec!["jobico-dlq.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut manifest = Manifest::default();
    manifest.read_str(Path::new("m.yaml"), MANIFEST).unwrap();
    let (events, problems) = catalog::from_manifest(&manifest);
    assert!(problems.is_empty(), "{problems:?}");
    let catalog = Arc::new(Catalog::new());
    catalog.replace(events);
    (nats, publisher, context, catalog)
}

#[tokio::test]
async fn a_parent_followed_twice_publishes_each_child_once_and_dead_letters_what_its_target_refuses()
 {
    let (_nats, publisher, context, catalog) = ingress().await;
    let router = Router::new(catalog, Arc::new(publisher));
    let states = StateStore::open(&context, &BucketSettings::default())
        .await
        .unwrap();

    // Two routes apply; a re-run (the same outcome followed again) publishes nothing new.
    let outcome = succeeded("p1", "{\"total\": 12}\n");
    let first = router.follow("default", "order", &outcome).await.unwrap();
    let again = router.follow("default", "order", &outcome).await.unwrap();
    assert_eq!(first, again);
    let ids: Vec<&str> = first.children.iter().map(|c| c.id.as_str()).collect();
    let expected: Vec<String> = (0..2)
        .map(|route| EventId::routed("default", "order", "p1", route).to_string())
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(messages(&context, "JOBICO-default").await, 2);
    for id in &expected {
        let child = states.get("default", "invoice", id).await.unwrap().unwrap();
        assert_eq!(child.state, EventState::Accepted);
        assert_eq!(child.parent.as_ref().map(|p| p.id.as_str()), Some("p1"));
    }

    // A result the target's schema refuses: no event, a dead letter and its record instead.
    let bad = succeeded("p2", "{\"total\": \"twelve\"}");
    let routed = router.follow("default", "order", &bad).await.unwrap();
    assert!(routed.children.is_empty());
    assert_eq!(routed.failures.len(), 2);
    assert!(
        routed.failures[0].reason.starts_with(
            "route to \"invoice\" refused: the data is invalid for its schema: /total (type)"
        ),
        "{:?}",
        routed.failures
    );
    router.follow("default", "order", &bad).await.unwrap();
    assert_eq!(messages(&context, "JOBICO-default").await, 2);
    assert_eq!(
        messages(&context, "JOBICO_DLQ").await,
        2,
        "one dead letter per route"
    );
    let dead = states
        .get("default", "invoice", &routed.failures[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.state, EventState::DeadLettered);
    assert_eq!(
        dead.reason.as_deref(),
        Some(routed.failures[0].reason.as_str())
    );

    // A failed parent takes only the `always` route, with the failure as its data.
    let mut failed = succeeded("p3", "");
    failed.status = Status::Failed;
    failed.error = Some(jobico_common::summary::ErrorKind::Trap);
    failed.result = None;
    let routed = router.follow("default", "order", &failed).await.unwrap();
    assert_eq!(routed.children.len() + routed.failures.len(), 1);
    assert_eq!(
        routed.failures[0].id,
        EventId::routed("default", "order", "p3", 1).to_string()
    );
    assert!(
        routed.failures[0]
            .reason
            .contains("\"total\" is a required property"),
        "{routed:?}"
    );

    // A result larger than a NATS message (local mode keeps up to the 1 MiB output cap and
    // more with framing): refused, and its dead letter still fits.
    let huge = succeeded("p5", &"x".repeat(1_200_000));
    let routed = router.follow("default", "order", &huge).await.unwrap();
    assert_eq!(routed.failures.len(), 2, "{:?}", routed.failures);
    assert!(
        routed.failures[0].reason.contains("longer than"),
        "{:?}",
        routed.failures
    );

    // A host failure follows no route, not even `always`.
    let mut host = failed.clone();
    host.id = "p4".into();
    host.error = Some(jobico_common::summary::ErrorKind::Host);
    assert!(
        router
            .follow("default", "order", &host)
            .await
            .unwrap()
            .is_empty()
    );
}

#[actix_web::test]
async fn the_results_endpoint_follows_routes_only_for_the_batch_its_token_names() {
    use actix_web::http::StatusCode;
    use actix_web::test::TestRequest;
    use jobico_common::chain::{RESULTS_BATCH_HEADER, ResultsReport, results_token};
    use jobico_common::summary::batch_digest;

    let (_nats, publisher, context, catalog) = ingress().await;
    let key = b"a results key of at least 32 bytes!".to_vec();
    let mut state = jobico_apiserver::AppState::new(catalog, Arc::new(publisher), 1 << 16);
    let report = ResultsReport {
        outcomes: vec![
            succeeded("p1", "{\"total\": 12}"),
            succeeded("p2", "{\"total\": 1}"),
        ],
    };
    let body = serde_json::to_string(&report).unwrap();
    let digest = batch_digest(&["p1", "p2"]);
    let token = results_token(&key, "default", "order", &["p1", "p2"]);
    let post = |token: Option<&str>, digest: &str, body: &str| {
        let mut req = TestRequest::post()
            .uri("/results/default/order")
            .insert_header((RESULTS_BATCH_HEADER, digest.to_owned()))
            .set_payload(body.to_owned());
        if let Some(token) = token {
            req = req.insert_header(("authorization", format!("Bearer {token}")));
        }
        req
    };

    // An ingress without the key takes no results.
    let without = actix_web::web::Data::new(jobico_apiserver::AppState::new(
        Arc::new(Catalog::new()),
        Arc::new(jobico_apiserver::NullPublisher),
        1 << 16,
    ));
    let (status, _, answer) = common::send(&without, post(Some(&token), &digest, &body)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    state.results_key = Some(Arc::new(key.clone()));
    let state = actix_web::web::Data::new(state);
    let (status, _, answer) = common::send(&state, post(None, &digest, &body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    // Another batch's token, another event's, or outcomes the digest does not name: refused.
    let other = results_token(&key, "default", "order", &["p1"]);
    let (status, _, answer) = common::send(&state, post(Some(&other), &digest, &body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let invoice = results_token(&key, "default", "invoice", &["p1", "p2"]);
    let (status, _, _) = common::send(&state, post(Some(&invoice), &digest, &body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let forged = serde_json::to_string(&ResultsReport {
        outcomes: vec![
            succeeded("p1", "{\"total\": 12}"),
            succeeded("victim", "{\"total\": 1}"),
        ],
    })
    .unwrap();
    let (status, _, answer) = common::send(&state, post(Some(&token), &digest, &forged)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(
        messages(&context, "JOBICO-default").await,
        0,
        "nothing published yet"
    );

    // The right token: both outcomes' routes followed, twice harmlessly.
    for _ in 0..2 {
        let (status, _, answer) = common::send(&state, post(Some(&token), &digest, &body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["routed"].as_array().unwrap().len(), 2, "{answer}");
        assert_eq!(
            answer["routed"][0]["children"].as_array().unwrap().len(),
            2,
            "{answer}"
        );
    }
    assert_eq!(messages(&context, "JOBICO-default").await, 4);
    let states = StateStore::open(&context, &BucketSettings::default())
        .await
        .unwrap();
    let parent = states.get("default", "order", "p1").await.unwrap().unwrap();
    assert_eq!(parent.children.len(), 2, "{parent:?}");
    assert_eq!(
        parent.children[0].id,
        EventId::routed("default", "order", "p1", 0).to_string()
    );
}

#[actix_web::test]
async fn posted_outcomes_of_an_event_with_a_sink_wait_in_the_outbox_once_each() {
    use actix_web::http::StatusCode;
    use actix_web::test::TestRequest;
    use jobico_common::chain::{RESULTS_BATCH_HEADER, ResultsReport, results_token};
    use jobico_common::sink::SINK_STREAM;
    use jobico_common::summary::batch_digest;

    let (_nats, publisher, context, catalog) = ingress().await;
    let key = b"a results key of at least 32 bytes!".to_vec();
    let mut state = jobico_apiserver::AppState::new(catalog, Arc::new(publisher), 1 << 16);
    state.results_key = Some(Arc::new(key.clone()));
    let state = actix_web::web::Data::new(state);
    let mut host = succeeded("s2", "");
    host.status = Status::Failed;
    host.error = Some(jobico_common::summary::ErrorKind::Host);
    host.result = None;
    let report = ResultsReport {
        outcomes: vec![succeeded("s1", "{\"shipped\": true}"), host],
    };
    let body = serde_json::to_string(&report).unwrap();
    let ids = ["s1", "s2"];
    let post = || {
        TestRequest::post()
            .uri("/results/default/ship")
            .insert_header((RESULTS_BATCH_HEADER, batch_digest(&ids)))
            .insert_header((
                "authorization",
                format!("Bearer {}", results_token(&key, "default", "ship", &ids)),
            ))
            .set_payload(body.clone())
    };

    // Until the dispatcher has created the outbox the outcomes cannot be kept: 503, and the
    // executor posts again.
    let (status, _, answer) = common::send(&state, post()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");

    jobico_store::streams::ensure_sink_outbox(&context, &StreamSettings::default())
        .await
        .unwrap();
    for _ in 0..2 {
        let (status, _, answer) = common::send(&state, post()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        // The host failure is not an outcome: its Job runs it again.
        assert_eq!(
            answer["routed"],
            serde_json::json!([{"id": "s1", "children": [], "routeFailures": [],
                                "sink": "http://receiver.apps.svc/events"}])
        );
    }
    assert_eq!(messages(&context, SINK_STREAM).await, 1);
    let stream = context.get_stream(SINK_STREAM).await.unwrap();
    let kept = stream
        .get_last_raw_message_by_subject("jobico-sinks.default.ship")
        .await
        .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&kept.payload).unwrap();
    assert_eq!(event["id"], "s1");
    assert_eq!(event["type"], "dev.coeux.jobico.ship.succeeded");
    assert_eq!(event["data"], serde_json::json!({"shipped": true}));
}
