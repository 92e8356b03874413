//! Arbitrary bodies and headers never panic and never yield a 5xx other than 503.
//!
//! A hand-rolled generator with a fixed seed (reproducible failures, no extra crates): each case
//! mixes a method, a path, a content type, CloudEvents and other headers, and a body that is
//! random bytes, a mutated valid event, a batch, or a CloudEvent. (The one legitimate 500, an
//! event whose schema does not compile, is a configuration state, tested in `http.rs`.)

mod common;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{App, test, web};
use jobico_apiserver::auth::{Auth, StaticTokens};
use jobico_apiserver::{AppState, MemoryQueue, configure};

/// Cases per run: enough to hit every branch many times, well under a second in debug builds.
const CASES: usize = 4000;

/// xorshift64*: tiny, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
    fn header_value(&mut self) -> String {
        // Visible ASCII; non-ASCII header bytes are added separately below.
        let len = self.below(80);
        (0..len)
            .map(|_| (0x20 + self.below(0x5f)) as u8 as char)
            .collect()
    }
}

const VALID: &str = r#"{"firstName":"Ada","lastName":"Lovelace","age":36}"#;

fn mutate(rng: &mut Rng, text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..rng.below(4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.below(bytes.len());
        match rng.below(3) {
            0 => bytes[at] = rng.next() as u8,
            1 => {
                bytes.remove(at);
            }
            _ => bytes.insert(at, *rng.pick(b"{}[]\",:0a\\ \x00\xff")),
        }
    }
    bytes
}

fn body(rng: &mut Rng) -> Vec<u8> {
    let cloud_event = format!(
        r#"{{"specversion":"1.0","id":"i{}","source":"/s","type":"t","data":{VALID}}}"#,
        rng.below(50)
    );
    match rng.below(8) {
        0 => rng.bytes(300),
        1 => mutate(rng, VALID),
        2 => format!(r#"{{"data":[{VALID},{VALID}]}}"#).into_bytes(),
        3 => mutate(rng, &format!(r#"{{"data":[{VALID},{{"firstName":1}}]}}"#)),
        4 => mutate(rng, &cloud_event),
        5 => format!("[{cloud_event},{cloud_event}]").into_bytes(),
        // Deep nesting, and (past 2 KiB) bodies over the limit.
        6 => "[".repeat(rng.below(4000)).into_bytes(),
        _ => VALID.as_bytes().to_vec(),
    }
}

#[actix_web::test]
async fn arbitrary_requests_never_panic_or_fail_with_5xx_other_than_503() {
    let (queue, mut receiver) = MemoryQueue::new(64);
    let mut state = AppState::new(common::catalog(), Arc::new(queue), 2048);
    state.auth = Arc::new(Auth::Off);
    let open = web::Data::new(state);
    let (queue, _keep) = MemoryQueue::new(64);
    let mut guarded = AppState::new(common::catalog(), Arc::new(queue), 2048);
    guarded.auth = Arc::new(Auth::Static(StaticTokens::parse("t0k\n")));
    let guarded = web::Data::new(guarded);
    let open_app = test::init_service(App::new().configure(configure(open.clone()))).await;
    let guarded_app = test::init_service(App::new().configure(configure(guarded))).await;

    // Weighted towards the methods that reach validation.
    let methods = [
        "PUT", "PUT", "PUT", "POST", "POST", "GET", "DELETE", "PATCH", "HEAD", "OPTIONS",
    ];
    let paths = [
        "/execute/default/ev1",
        "/execute/default/ev1",
        "/execute/default/ev1",
        "/execute/default/nope",
        "/execute/x/ev1",
        "/events/default/abc",
        "/events/default/a.b*c",
        "/execute/default",
        "/",
        "/execute/default/ev1/extra",
        "/execute/%ff/ev1",
        "/events/default/%00",
    ];
    let content_types = [
        "",
        "application/json",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "text/plain",
        "application/xml",
        "application/json; charset=utf-8",
        "multipart/form-data",
        ";;",
    ];
    let header_names = [
        "ce-specversion",
        "ce-id",
        "ce-source",
        "ce-type",
        "idempotency-key",
        "traceparent",
        "authorization",
        "x-random",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seen = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..CASES {
        let method = actix_web::http::Method::from_bytes(rng.pick(&methods).as_bytes()).unwrap();
        let path = *rng.pick(&paths);
        let mut req = test::TestRequest::default().method(method).uri(path);
        let content_type = *rng.pick(&content_types);
        if !content_type.is_empty() {
            req = req.insert_header(("content-type", content_type));
        }
        for _ in 0..rng.below(5) {
            let name = *rng.pick(&header_names);
            let value = match (name, rng.below(3)) {
                ("ce-specversion", 0) => "1.0".to_string(),
                ("authorization", 0) => "Bearer t0k".to_string(),
                _ => rng.header_value(),
            };
            req = req.insert_header((name, value));
        }
        if rng.below(10) == 0 {
            // Bytes that are not visible ASCII in a header value.
            req = req.insert_header((
                "idempotency-key",
                actix_web::http::header::HeaderValue::from_bytes(b"\xe2\x82\xac").unwrap(),
            ));
        }
        let req = req.set_payload(body(&mut rng)).to_request();
        let app_guarded = rng.below(4) == 0;
        let response = if app_guarded {
            test::call_service(&guarded_app, req).await
        } else {
            test::call_service(&open_app, req).await
        };
        let status = response.status();
        let is_head = response.request().method() == actix_web::http::Method::HEAD;
        let bytes = test::read_body(response).await;
        *seen.entry(status.as_u16()).or_default() += 1;
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "case {case}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        if status.as_u16() >= 400 && !is_head {
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("case {case}: error body is not JSON ({e}): {bytes:?}"));
            assert!(json["error"].is_string(), "case {case}: {json}");
        }
        while receiver.try_recv().is_ok() {}
    }
    // The generator must reach success and every client error.
    for code in [202, 400, 401, 404, 405, 413, 415, 422] {
        assert!(
            seen.contains_key(&code),
            "status {code} never produced: {seen:?}"
        );
    }
}
