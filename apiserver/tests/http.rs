//! The HTTP API in process: every status code and the one error shape.

use std::sync::Arc;

use actix_web::http::{StatusCode, header};
use actix_web::{App, test, web};
use jobico_apiserver::auth::{Auth, StaticTokens};
use jobico_apiserver::server::configure_admin;
use jobico_apiserver::{AppState, MemoryQueue};
use jobico_common::EventRecord;
use serde_json::json;
use tokio::sync::mpsc;

mod common;

use common::{VALID, put, send, state_with};

const LIMIT: usize = 1024;

fn state(queue_capacity: usize) -> (web::Data<AppState>, mpsc::Receiver<EventRecord>) {
    let (queue, receiver) = MemoryQueue::new(queue_capacity);
    (state_with(Arc::new(queue), LIMIT), receiver)
}

#[actix_web::test]
async fn accepts_a_valid_event_and_queues_it_with_its_id() {
    let (state, mut queue) = state(8);
    let (status, _, body) = send(
        &state,
        put(
            "/execute/default/ev1",
            r#"{"firstName":"Ada","lastName":"Lovelace"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let ids = body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1);
    assert!(body.get("duplicate").is_none());
    let queued = queue.try_recv().unwrap();
    assert_eq!(queued.id.as_str(), ids[0].as_str().unwrap());
    assert_eq!(
        (queued.namespace.as_str(), queued.event.as_str()),
        ("default", "ev1")
    );
    assert_eq!(
        queued.data,
        json!({"firstName":"Ada","lastName":"Lovelace"})
    );
}

#[actix_web::test]
async fn post_and_batches_and_idempotency_keys() {
    let (state, mut queue) = state(8);
    let req = test::TestRequest::post()
        .uri("/execute/default/ev1")
        .insert_header(("Idempotency-Key", "order-7"))
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .set_payload(
            r#"{"data":[{"firstName":"A","lastName":"B"},{"firstName":"C","lastName":"D"}]}"#,
        );
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body["ids"],
        json!([
            jobico_common::EventId::batch_item("order-7", 0).as_str(),
            jobico_common::EventId::batch_item("order-7", 1).as_str()
        ])
    );
    assert_eq!(queue.try_recv().unwrap().data["firstName"], "A");
    assert_eq!(queue.try_recv().unwrap().data["firstName"], "C");
}

#[actix_web::test]
async fn schema_violations_are_422_with_every_violation_and_nothing_is_queued() {
    let (state, mut queue) = state(8);
    let (status, _, body) = send(
        &state,
        put("/execute/default/ev1", r#"{"firstName":"Ada"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let v = &body["violations"][0];
    assert_eq!(
        (
            v["item"].as_u64(),
            v["instancePath"].as_str(),
            v["keyword"].as_str()
        ),
        (Some(0), Some(""), Some("required"))
    );
    assert!(v["message"].as_str().unwrap().contains("lastName"));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nothing was accepted")
    );

    let (status, _, body) = send(
        &state,
        put(
            "/execute/default/ev1",
            r#"{"firstName":"Ada","lastName":"L","age":"x"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["violations"][0]["instancePath"], "/age");
    assert_eq!(body["violations"][0]["keyword"], "type");

    // One bad item in a batch rejects the whole batch and names the item.
    let batch = r#"{"data":[{"firstName":"A","lastName":"B"},{"firstName":"C"}]}"#;
    let (status, _, body) = send(&state, put("/execute/default/ev1", batch)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["violations"].as_array().unwrap().len(), 1);
    assert_eq!(body["violations"][0]["item"], 1);
    assert!(
        queue.try_recv().is_err(),
        "rejected events must not be queued"
    );
}

#[actix_web::test]
async fn errors_have_the_right_code_and_shape() {
    let (state, mut queue) = state(8);
    let cases: Vec<(test::TestRequest, StatusCode, &str)> = vec![
        (
            put("/execute/default/ev1", "{not json"),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            put("/execute/default/ev1", ""),
            StatusCode::BAD_REQUEST,
            "empty",
        ),
        (
            put("/execute/default/nope", "{}"),
            StatusCode::NOT_FOUND,
            "has no event \"nope\"",
        ),
        (
            put("/execute/elsewhere/ev1", "{}"),
            StatusCode::NOT_FOUND,
            "declares no events",
        ),
        (put("/nowhere", "{}"), StatusCode::NOT_FOUND, "no route"),
        (
            test::TestRequest::get().uri("/execute/default/ev1"),
            StatusCode::METHOD_NOT_ALLOWED,
            "use PUT, POST",
        ),
        (
            put(
                "/execute/default/ev1",
                &format!(
                    "{{\"firstName\":\"{}\",\"lastName\":\"x\"}}",
                    "a".repeat(LIMIT)
                ),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit of 1024 bytes",
        ),
        (
            put("/execute/default/ev1", "<a/>")
                .insert_header((header::CONTENT_TYPE, "application/xml")),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/xml",
        ),
        (
            put("/execute/default/broken", "{}"),
            StatusCode::INTERNAL_SERVER_ERROR,
            "broken.json",
        ),
    ];
    for (req, code, fragment) in cases {
        let (status, headers, body) = send(&state, req).await;
        assert_eq!(status, code, "{body}");
        let error = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error member: {body}"));
        assert!(
            error.contains(fragment),
            "{code}: {error:?} should contain {fragment:?}"
        );
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
    assert_eq!(
        send(&state, put("/execute/default/ev1", ok)).await.0,
        StatusCode::ACCEPTED
    );
    let (status, headers, body) = send(&state, put("/execute/default/ev1", ok)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    assert!(body["error"].as_str().unwrap().contains("queue is full"));
}

#[actix_web::test]
async fn cloud_events_in_binary_structured_and_batch_modes() {
    let (state, mut queue) = state(8);
    let binary = put("/execute/default/ev1", VALID)
        .insert_header(("ce-specversion", "1.0"))
        .insert_header(("ce-id", "ce-42"))
        .insert_header(("ce-source", "/crm"))
        .insert_header(("ce-type", "person.created"))
        .insert_header((header::CONTENT_TYPE, "application/json"));
    let (status, _, body) = send(&state, binary).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // CloudEvents make source + id unique: both go into the event id.
    assert_eq!(
        body["ids"],
        json!([jobico_common::EventId::from_cloud_event("/crm", "ce-42").as_str()])
    );
    let record = queue.try_recv().unwrap();
    assert_eq!(record.data["firstName"], "Ada");
    assert_eq!(
        (
            record.attributes["source"].as_str(),
            record.attributes["type"].as_str()
        ),
        ("/crm", "person.created")
    );

    let structured =
        format!(r#"{{"specversion":"1.0","id":"s-1","source":"/crm","type":"t","data":{VALID}}}"#);
    let req = put("/execute/default/ev1", &structured)
        .insert_header((header::CONTENT_TYPE, "application/cloudevents+json"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["ids"],
        json!([jobico_common::EventId::from_cloud_event("/crm", "s-1").as_str()])
    );
    assert_eq!(queue.try_recv().unwrap().attributes["id"], "s-1");

    let bad_item =
        r#"{"specversion":"1.0","id":"b-2","source":"/crm","type":"t","data":{"firstName":"x"}}"#;
    let batch = format!("[{},{bad_item}]", structured.replace("s-1", "b-1"));
    let req = put("/execute/default/ev1", &batch)
        .insert_header((header::CONTENT_TYPE, "application/cloudevents-batch+json"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["violations"][0]["item"], 1);
    assert!(
        queue.try_recv().is_err(),
        "a batch with one bad item keeps nothing"
    );

    let good = format!(
        "[{},{}]",
        structured.replace("s-1", "b-1"),
        structured.replace("s-1", "b-2")
    );
    let req = put("/execute/default/ev1", &good)
        .insert_header((header::CONTENT_TYPE, "application/cloudevents-batch+json"));
    let (status, _, body) = send(&state, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["ids"],
        json!([
            jobico_common::EventId::from_cloud_event("/crm", "b-1").as_str(),
            jobico_common::EventId::from_cloud_event("/crm", "b-2").as_str()
        ])
    );

    let missing_type = put("/execute/default/ev1", VALID)
        .insert_header(("ce-specversion", "1.0"))
        .insert_header(("ce-id", "x"))
        .insert_header(("ce-source", "/crm"));
    let (status, _, body) = send(&state, missing_type).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("type"), "{body}");
}

#[actix_web::test]
async fn traceparent_is_kept_as_an_attribute() {
    let (state, mut queue) = state(8);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _, _) = send(
        &state,
        put("/execute/default/ev1", VALID).insert_header(("traceparent", tp)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(queue.try_recv().unwrap().attributes["traceparent"], tp);
}

#[actix_web::test]
async fn static_tokens_give_401_and_403() {
    let (queue, _receiver) = MemoryQueue::new(8);
    let mut state = AppState::new(common::catalog(), Arc::new(queue), LIMIT);
    state.auth = Arc::new(Auth::Static(StaticTokens::parse(
        "good\nother-team other\n",
    )));
    let state = web::Data::new(state);
    let (status, headers, body) = send(&state, put("/execute/default/ev1", VALID)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    let bad =
        put("/execute/default/ev1", VALID).insert_header((header::AUTHORIZATION, "Bearer nope"));
    assert_eq!(send(&state, bad).await.0, StatusCode::UNAUTHORIZED);
    let other = put("/execute/default/ev1", VALID)
        .insert_header((header::AUTHORIZATION, "Bearer other-team"));
    let (status, _, body) = send(&state, other).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("namespace \"default\""),
        "{body}"
    );
    let good =
        put("/execute/default/ev1", VALID).insert_header((header::AUTHORIZATION, "Bearer good"));
    assert_eq!(send(&state, good).await.0, StatusCode::ACCEPTED);
}

#[actix_web::test]
async fn local_mode_says_states_are_not_tracked() {
    let (state, _queue) = state(8);
    let (status, _, body) = send(&state, test::TestRequest::get().uri("/events/default/abc")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"].as_str().unwrap().contains("not tracked"),
        "{body}"
    );
    let (status, headers, _) = send(
        &state,
        test::TestRequest::delete().uri("/events/default/abc"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers.get(header::ALLOW).unwrap(), "GET");
}

#[actix_web::test]
async fn admin_port_serves_health_readiness_and_metrics() {
    let (state, queue) = state(8);
    send(&state, put("/execute/default/ev1", VALID)).await;
    send(&state, put("/execute/default/ev1", "{}")).await;
    let admin = test::init_service(App::new().configure(configure_admin(state.clone()))).await;
    let get = |path: &str| test::TestRequest::get().uri(path).to_request();
    assert_eq!(
        test::call_service(&admin, get("/healthz")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        test::call_service(&admin, get("/readyz")).await.status(),
        StatusCode::OK
    );
    let metrics = test::call_and_read_body(&admin, get("/metrics")).await;
    let text = std::str::from_utf8(&metrics).unwrap();
    for line in [
        r#"jobico_apiserver_http_requests_total{route="/execute/{namespace}/{event}",status="202"} 1"#,
        r#"jobico_apiserver_http_requests_total{route="/execute/{namespace}/{event}",status="422"} 1"#,
        "jobico_apiserver_validation_failures_total 1",
        "jobico_apiserver_http_requests_in_flight 0",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    drop(queue);
    assert_eq!(
        test::call_service(&admin, get("/readyz")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[actix_web::test]
async fn a_422_lists_a_bounded_number_of_violations_and_counts_them_all() {
    let (queue, mut receiver) = MemoryQueue::new(8);
    let state = state_with(Arc::new(queue), 256 * 1024);
    let bad = format!(
        r#"{{"firstName":1,"lastName":2,"age":"{}"}}"#,
        "é".repeat(40)
    );
    let batch = format!("{{\"data\":[{}]}}", vec![bad.as_str(); 1000].join(","));
    let app = test::init_service(App::new().configure(jobico_apiserver::configure(state))).await;
    let response = test::call_service(&app, put("/execute/default/ev1", &batch).to_request()).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bytes = test::read_body(response).await;
    assert!(bytes.len() < 32 * 1024, "a 422 of {} bytes", bytes.len());
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["violationsTotal"], 3000);
    let listed = body["violations"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        jobico_apiserver::schema::MAX_VIOLATIONS_LISTED
    );
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("3000 violation(s)") && error.contains("the first 100 are listed"),
        "{error}"
    );
    assert!(receiver.try_recv().is_err());
}

#[actix_web::test]
async fn data_nested_deeper_than_every_reader_can_re_wrap_is_400_in_every_mode() {
    use jobico_common::envelope::MAX_DATA_DEPTH;
    let (state, mut queue) = state(8);
    let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
    let event = |levels: usize| {
        format!(
            r#"{{"firstName":"Ada","lastName":"Lovelace","x":{}}}"#,
            nested(levels)
        )
    };
    // At the limit (the object itself is one level): accepted, and it parses downstream.
    let (status, _, body) = send(
        &state,
        put("/execute/default/ev1", &event(MAX_DATA_DEPTH - 1)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(queue.try_recv().is_ok());
    // One level deeper: refused with the item and the limit named, whatever the body mode.
    let too_deep = event(MAX_DATA_DEPTH);
    let bodies = [
        (too_deep.clone(), "application/json"),
        (
            format!(r#"{{"data":[{{"firstName":"A","lastName":"B"}},{too_deep}]}}"#),
            "application/json",
        ),
        (
            format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{too_deep}}}"#
            ),
            "application/cloudevents+json",
        ),
    ];
    for (body, content_type) in bodies {
        let req =
            put("/execute/default/ev1", &body).insert_header((header::CONTENT_TYPE, content_type));
        let (status, _, answer) = send(&state, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{content_type}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains(&format!("deeper than {MAX_DATA_DEPTH} levels")),
            "{answer}"
        );
    }
    assert!(
        queue.try_recv().is_err(),
        "nothing of a refused request is kept"
    );
}

#[actix_web::test]
async fn module_uploads_are_authorised_and_need_a_module_store() {
    let module = b"\0asm\x01\0\0\0".to_vec();
    let upload = |token: Option<&str>| {
        let req = test::TestRequest::put()
            .uri("/modules/default/job-for-ev1")
            .set_payload(module.clone());
        match token {
            Some(token) => req.insert_header((header::AUTHORIZATION, format!("Bearer {token}"))),
            None => req,
        }
    };
    // The in-memory queue keeps no modules.
    let (state, _queue) = state(8);
    let (status, _, body) = send(&state, upload(None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no module store"),
        "{body}"
    );
    // Uploads are authorised like events: none, or another namespace's token, is refused.
    let (queue, _receiver) = MemoryQueue::new(8);
    let mut state = AppState::new(common::catalog(), Arc::new(queue), LIMIT);
    state.auth = Arc::new(Auth::Static(StaticTokens::parse(
        "good\nother-team other\n",
    )));
    let state = web::Data::new(state);
    assert_eq!(send(&state, upload(None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&state, upload(Some("other-team"))).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&state, upload(Some("good"))).await.0,
        StatusCode::NOT_FOUND
    );
    // At most MODULE_UPLOAD_SLOTS bodies are read at once; the next is told to retry.
    let held: Vec<_> = (0..jobico_apiserver::http::MODULE_UPLOAD_SLOTS)
        .map(|_| state.module_uploads.clone().try_acquire_owned().unwrap())
        .collect();
    let (status, headers, body) = send(&state, upload(Some("good"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    drop(held);
    assert_eq!(
        send(&state, upload(Some("good"))).await.0,
        StatusCode::NOT_FOUND
    );
}
