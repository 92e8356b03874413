//! The HTTP API in process: every status code and the one error shape.

use std::path::Path;
use std::sync::Arc;

use actix_web::http::{StatusCode, header};
use actix_web::{App, test, web};
use jobico_apiserver::{AppState, Catalog, MemoryQueue, catalog, configure};
use jobico_common::EventRecord;
use jobico_model::Manifest;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-ev1}
data:
  schema-ev1.json: |
    {"type": "object",
     "properties": {"firstName": {"type": "string"}, "lastName": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["firstName", "lastName"]}
  broken.json: '{"type": "nonsense"}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: job-for-ev1}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: schema-ev1}}
    - {name: broken, wasm: echo.wasm, schema: {name: schema-ev1, key: broken.json}}
"#;

const LIMIT: usize = 1024;

fn state(queue_capacity: usize) -> (web::Data<AppState>, mpsc::Receiver<EventRecord>) {
    let mut manifest = Manifest::default();
    manifest.read_str(Path::new("test.yaml"), MANIFEST).unwrap();
    let (events, _) = catalog::from_manifest(&manifest);
    let catalog = Catalog::new();
    catalog.replace(events);
    let (queue, receiver) = MemoryQueue::new(queue_capacity);
    let state = web::Data::new(AppState {
        catalog: Arc::new(catalog),
        publisher: Arc::new(queue),
        max_body_bytes: LIMIT,
    });
    (state, receiver)
}

/// Sends a request; returns status, headers of interest and the JSON body.
async fn send(state: &web::Data<AppState>, req: test::TestRequest) -> (StatusCode, actix_web::http::header::HeaderMap, Value) {
    let app = test::init_service(App::new().configure(configure(state.clone()))).await;
    let response = test::call_service(&app, req.to_request()).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = test::read_body(response).await;
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"));
    (status, headers, json)
}

fn put(path: &str, body: &str) -> test::TestRequest {
    test::TestRequest::put().uri(path).set_payload(body.to_string())
}

#[actix_web::test]
async fn accepts_a_valid_event_and_queues_it_with_its_id() {
    let (state, mut queue) = state(8);
    let (status, _, body) = send(&state, put("/execute/default/ev1", r#"{"firstName":"Ada","lastName":"Lovelace"}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ids = body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1);
    assert!(body.get("duplicate").is_none());
    let queued = queue.try_recv().unwrap();
    assert_eq!(queued.id.as_str(), ids[0].as_str().unwrap());
    assert_eq!((queued.namespace.as_str(), queued.event.as_str()), ("default", "ev1"));
    assert_eq!(queued.data, json!({"firstName":"Ada","lastName":"Lovelace"}));
}

#[actix_web::test]
async fn post_and_batches_and_idempotency_keys() {
    let (state, mut queue) = state(8);
    let req = test::TestRequest::post()
        .uri("/execute/default/ev1")
        .insert_header(("Idempotency-Key", "order-7"))
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(r#"{"data":[{"firstName":"A","lastName":"B"},{"firstName":"C","lastName":"D"}]}"#);
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["ids"], json!(["order-7-0", "order-7-1"]));
    assert_eq!(queue.try_recv().unwrap().data["firstName"], "A");
    assert_eq!(queue.try_recv().unwrap().data["firstName"], "C");
}

#[actix_web::test]
async fn schema_violations_are_422_with_every_violation_and_nothing_is_queued() {
    let (state, mut queue) = state(8);
    let (status, _, body) = send(&state, put("/execute/default/ev1", r#"{"firstName":"Ada"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let v = &body["violations"][0];
    assert_eq!((v["item"].as_u64(), v["instancePath"].as_str(), v["keyword"].as_str()), (Some(0), Some(""), Some("required")));
    assert!(v["message"].as_str().unwrap().contains("lastName"));
    assert!(body["error"].as_str().unwrap().contains("nothing was accepted"));

    let (status, _, body) = send(&state, put("/execute/default/ev1", r#"{"firstName":"Ada","lastName":"L","age":"x"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["violations"][0]["instancePath"], "/age");
    assert_eq!(body["violations"][0]["keyword"], "type");

    // One bad item in a batch rejects the whole batch and names the item.
    let batch = r#"{"data":[{"firstName":"A","lastName":"B"},{"firstName":"C"}]}"#;
    let (status, _, body) = send(&state, put("/execute/default/ev1", batch)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["violations"].as_array().unwrap().len(), 1);
    assert_eq!(body["violations"][0]["item"], 1);
    assert!(queue.try_recv().is_err(), "rejected events must not be queued");
}

#[actix_web::test]
async fn errors_have_the_right_code_and_shape() {
    let (state, mut queue) = state(8);
    let cases: Vec<(test::TestRequest, StatusCode, &str)> = vec![
        (put("/execute/default/ev1", "{not json"), StatusCode::BAD_REQUEST, "not valid JSON"),
        (put("/execute/default/ev1", ""), StatusCode::BAD_REQUEST, "empty"),
        (put("/execute/default/nope", "{}"), StatusCode::NOT_FOUND, "has no event \"nope\""),
        (put("/execute/elsewhere/ev1", "{}"), StatusCode::NOT_FOUND, "declares no events"),
        (put("/nowhere", "{}"), StatusCode::NOT_FOUND, "no route"),
        (test::TestRequest::get().uri("/execute/default/ev1"), StatusCode::METHOD_NOT_ALLOWED, "use PUT, POST"),
        (put("/execute/default/ev1", &format!("{{\"firstName\":\"{}\",\"lastName\":\"x\"}}", "a".repeat(LIMIT))), StatusCode::PAYLOAD_TOO_LARGE, "limit of 1024 bytes"),
        (put("/execute/default/ev1", "<a/>").insert_header((header::CONTENT_TYPE, "application/xml")), StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/xml"),
        (put("/execute/default/broken", "{}"), StatusCode::INTERNAL_SERVER_ERROR, "broken.json"),
    ];
    for (req, code, fragment) in cases {
        let (status, headers, body) = send(&state, req).await;
        assert_eq!(status, code, "{body}");
        let error = body["error"].as_str().unwrap_or_else(|| panic!("no error member: {body}"));
        assert!(error.contains(fragment), "{code}: {error:?} should contain {fragment:?}");
        assert!(body.get("violations").is_none());
        if code == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(headers.get(header::ALLOW).unwrap(), "PUT, POST");
        }
    }
    assert!(queue.try_recv().is_err());
}

#[actix_web::test]
async fn a_full_queue_is_503_with_retry_after() {
    let (state, _queue) = state(1);
    let ok = r#"{"firstName":"A","lastName":"B"}"#;
    assert_eq!(send(&state, put("/execute/default/ev1", ok)).await.0, StatusCode::ACCEPTED);
    let (status, headers, body) = send(&state, put("/execute/default/ev1", ok)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    assert!(body["error"].as_str().unwrap().contains("queue is full"));
}
