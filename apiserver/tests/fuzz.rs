//! Arbitrary requests never panic, never yield a 5xx other than 503, always answer an error in
//! the one JSON shape, and everything accepted can become a NATS message.
//!
//! Property-based (proptest) through the app's own `configure`, in process: each case mixes a
//! method, a path, a content type, CloudEvents, trace and other headers, and a body that is
//! random bytes, a mutated valid event, a JobicoK8S batch, or a CloudEvent (structured or
//! batch) with arbitrary attribute names and values. The publisher behind the app turns every
//! accepted event into the headers and payload JetStream would get, as the real one does, so
//! a value that slipped past validation and would panic or corrupt the NATS protocol fails here.
//!
//! The pass is short and reproducible: a fixed seed and [`CASES`] cases (override with
//! `PROPTEST_CASES` and `PROPTEST_RNG_SEED` for a longer hunt). Failures found are kept in
//! `tests/fuzz.proptest-regressions` and replayed first on every run; [`REGRESSIONS`] holds
//! the requests that once broke the ingress, replayed as written.
//! (The one legitimate 500, an event whose schema does not compile, is a configuration state,
//! tested in `http.rs`.)

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::HeaderValue;
use actix_web::{App, test as actix_test};
use futures::future::BoxFuture;
use jobico_apiserver::auth::{Auth, StaticTokens};
use jobico_apiserver::{AppState, PublishFailure, Published, Publisher, configure, message};
use jobico_common::EventRecord;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestRunner};

/// Cases per run: enough to reach every status many times, a few seconds in a debug build.
const CASES: u32 = 3000;

/// The seed of the CI pass.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The body limit of the app under test: small, so that bodies over it are cheap to make.
const LIMIT: usize = 2048;

const VALID: &str = r#"{"firstName":"Ada","lastName":"Lovelace","age":36}"#;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Requests that broke the ingress once: (content type, body).
const REGRESSIONS: &[(&str, &str)] = &[
    // A newline in a structured CloudEvent's traceparent panicked inside the NATS client.
    (
        "application/cloudevents+json",
        r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nx","data":{"firstName":"A","lastName":"B"}}"#,
    ),
    (
        "application/cloudevents-batch+json",
        r#"[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"firstName":"A","lastName":"B"}},{"specversion":"1.0","id":"2","source":"/s","type":"t","traceparent":"\r\nNats-Msg-Id: x","data":{"firstName":"A","lastName":"B"}}]"#,
    ),
];

/// Accepts every event after turning it into what JetStream would be sent: headers through the
/// same function the JetStream publisher uses, and the JSON payload read back.
struct WirePublisher;

impl Publisher for WirePublisher {
    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        Box::pin(async move {
            for event in &events {
                let headers = message::headers(event).unwrap_or_else(|e| {
                    panic!("an accepted event cannot become a message ({e}): {event:?}")
                });
                for (name, values) in headers.iter() {
                    for value in values {
                        assert!(
                            !value.as_str().contains(['\r', '\n']),
                            "header {name} would break the NATS protocol: {event:?}"
                        );
                    }
                }
                let payload = serde_json::to_vec(event).unwrap();
                let back: EventRecord = serde_json::from_slice(&payload).unwrap();
                assert_eq!(&back, event);
            }
            Ok(events
                .into_iter()
                .map(|e| Published {
                    id: e.id,
                    duplicate: false,
                })
                .collect())
        })
    }
}

/// One generated request.
#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    path: &'static str,
    content_type: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    guarded: bool,
}

/// Strings with everything that could hurt: control characters, quotes, non-ASCII, long runs.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        "[a-z0-9]{1,25}",
        "\\PC{0,20}",
        "[\\x00-\\x1f\"\\\\]{0,8}",
        Just(TRACEPARENT.to_string()),
        Just(format!("{TRACEPARENT}\n")),
        Just(format!("{TRACEPARENT}\r\nNats-Msg-Id: x")),
        (1usize..300).prop_map(|n| "x".repeat(n)),
    ]
}

fn attribute_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "specversion", "id", "source", "type", "traceparent", "tracestate", "subject",
            "time", "datacontenttype", "dataschema", "data_base64", "ext",
        ])
        .prop_map(str::to_string),
        1 => nasty_string(),
    ]
}

fn attribute_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        6 => nasty_string().prop_map(serde_json::Value::String),
        1 => Just(serde_json::Value::Null),
        1 => any::<i64>().prop_map(serde_json::Value::from),
        1 => Just(serde_json::json!({"nested": [1, "\n"]})),
    ]
}

/// A structured CloudEvent: the required attributes (usually), arbitrary others, some data.
fn cloud_event() -> impl Strategy<Value = serde_json::Value> {
    (
        prop::collection::btree_map(attribute_name(), attribute_value(), 0..6),
        any::<bool>(),
        prop_oneof![
            Just(serde_json::from_str::<serde_json::Value>(VALID).unwrap()),
            Just(serde_json::json!({"firstName": 1})),
            Just(serde_json::Value::Null),
        ],
    )
        .prop_map(|(extra, required, data)| {
            let mut event = serde_json::Map::new();
            if required {
                for (k, v) in [
                    ("specversion", "1.0"),
                    ("id", "i1"),
                    ("source", "/s"),
                    ("type", "t"),
                ] {
                    event.insert(k.into(), v.into());
                }
            }
            event.extend(extra);
            event.insert("data".into(), data);
            serde_json::Value::Object(event)
        })
}

/// Bytes that matter to a JSON parser, inserted by [`mutated`].
const SPECIAL: &[u8] = b"{}[]\",:0a\\ \x00\xff";

fn mutated(text: String) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 0..4).prop_map(
        move |edits| {
            let mut bytes = text.clone().into_bytes();
            for (at, kind, byte) in edits {
                if bytes.is_empty() {
                    break;
                }
                let at = at.index(bytes.len());
                match kind {
                    0 => bytes[at] = byte,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, SPECIAL[usize::from(byte) % SPECIAL.len()]),
                }
            }
            bytes
        },
    )
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        mutated(VALID.to_string()),
        Just(format!(r#"{{"data":[{VALID},{VALID}]}}"#).into_bytes()),
        mutated(format!(r#"{{"data":[{VALID},{{"firstName":1}}]}}"#)),
        cloud_event().prop_map(|e| e.to_string().into_bytes()),
        cloud_event().prop_flat_map(|e| mutated(e.to_string())),
        prop::collection::vec(cloud_event(), 0..4).prop_map(|events| serde_json::Value::Array(
            events
        )
        .to_string()
        .into_bytes()),
        // Deep nesting, and (past the limit) bodies too large.
        (0usize..4000).prop_map(|n| "[".repeat(n).into_bytes()),
        Just(VALID.as_bytes().to_vec()),
    ]
}

fn header() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let name = prop::sample::select(vec![
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-traceparent",
        "ce-my_ext",
        "ce-ext",
        "idempotency-key",
        "traceparent",
        "authorization",
        "content-length",
        "x-random",
    ]);
    let value = prop_oneof![
        Just(b"1.0".to_vec()),
        Just(b"Bearer t0k".to_vec()),
        Just(TRACEPARENT.as_bytes().to_vec()),
        "[ -~]{0,80}".prop_map(String::into_bytes),
        // Bytes that are not visible ASCII (but are valid in a header value).
        prop::collection::vec(prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')], 0..20),
    ];
    (name, value)
}

fn case() -> impl Strategy<Value = Case> {
    (
        // Weighted towards the methods and the path that reach validation.
        prop_oneof![
            8 => prop::sample::select(vec!["PUT", "POST"]),
            2 => prop::sample::select(vec!["GET", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
        ],
        prop_oneof![
            8 => Just("/execute/default/ev1"),
            2 => prop::sample::select(vec![
                "/execute/default/nope",
                "/execute/x/ev1",
                "/events/default/abc",
                "/events/default/a.b*c",
                "/execute/default",
                "/",
                "/execute/default/ev1/extra",
                "/execute/%ff/ev1",
                "/execute/default%0a/ev1",
                "/events/default/%00",
            ]),
        ],
        prop::sample::select(vec![
            "",
            "application/json",
            "application/cloudevents+json",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
            "application/cloudevents-batch+json",
            "text/plain",
            "application/xml",
            "application/json; charset=utf-8",
            "multipart/form-data",
            ";;",
        ]),
        prop::collection::vec(header(), 0..5),
        body(),
        prop::bool::weighted(0.25),
    )
        .prop_map(
            |(method, path, content_type, headers, body, guarded)| Case {
                method,
                path,
                content_type,
                headers,
                body,
                guarded,
            },
        )
}

fn request(case: &Case) -> actix_test::TestRequest {
    let method = actix_web::http::Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut req = actix_test::TestRequest::default()
        .method(method)
        .uri(case.path);
    if !case.content_type.is_empty() {
        req = req.insert_header(("content-type", case.content_type));
    }
    for (name, value) in &case.headers {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            req = req.append_header((*name, value));
        }
    }
    req.set_payload(case.body.clone())
}

fn state(auth: Auth) -> actix_web::web::Data<AppState> {
    let mut state = AppState::new(common::catalog(), Arc::new(WirePublisher), LIMIT);
    state.auth = Arc::new(auth);
    actix_web::web::Data::new(state)
}

#[test]
fn arbitrary_requests_never_panic_or_fail_with_5xx_other_than_503() {
    let system = actix_web::rt::System::new();
    let (open, guarded) = system.block_on(async {
        let open =
            actix_test::init_service(App::new().configure(configure(state(Auth::Off)))).await;
        let tokens = Auth::Static(StaticTokens::parse("t0k\n"));
        let guarded =
            actix_test::init_service(App::new().configure(configure(state(tokens)))).await;
        (open, guarded)
    });
    let seen = RefCell::new(BTreeMap::<u16, usize>::new());
    let check = |case: &Case| -> Result<(), TestCaseError> {
        let (status, is_head, bytes) = system.block_on(async {
            let req = request(case).to_request();
            let response = if case.guarded {
                actix_test::call_service(&guarded, req).await
            } else {
                actix_test::call_service(&open, req).await
            };
            let status = response.status();
            let is_head = response.request().method() == actix_web::http::Method::HEAD;
            (status, is_head, actix_test::read_body(response).await)
        });
        *seen.borrow_mut().entry(status.as_u16()).or_default() += 1;
        prop_assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status} {}",
            String::from_utf8_lossy(&bytes)
        );
        if status.as_u16() >= 400 && !is_head {
            let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestCaseError::fail(format!("error body is not JSON ({e}): {bytes:?}"))
            })?;
            prop_assert!(json["error"].is_string(), "{json}");
        }
        Ok(())
    };

    for (content_type, body) in REGRESSIONS {
        let case = Case {
            method: "PUT",
            path: "/execute/default/ev1",
            content_type,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            guarded: false,
        };
        check(&case).unwrap();
    }

    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SEED);
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz.proptest-regressions",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(failure) = runner.run(&case(), |case| check(&case)) {
        panic!("{failure}");
    }

    // The generator must reach success and every client error.
    let seen = seen.into_inner();
    eprintln!("statuses over {cases} cases: {seen:?}");
    for code in [202, 400, 401, 404, 405, 413, 415, 422] {
        assert!(
            seen.contains_key(&code),
            "status {code} never produced: {seen:?}"
        );
    }
}
