//! The OpenAPI document and the routes agree: same paths, same methods, and every documented
//! method reaches a handler while undocumented ones get 405.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use actix_web::http::{Method, StatusCode};
use actix_web::test as actix_test;
use common::{send, state_with};
use jobico_apiserver::MemoryQueue;
use jobico_apiserver::http::ROUTES;
use serde_yaml::Value;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn documented() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (key, _) in item.as_mapping().unwrap() {
            let key = key.as_str().unwrap();
            if METHODS.contains(&key) {
                routes.insert((path.as_str().unwrap().to_string(), key.to_uppercase()));
            }
        }
    }
    routes
}

#[test]
fn the_document_lists_exactly_the_routes() {
    let served: BTreeSet<_> = ROUTES
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .iter()
                .map(move |m| (path.to_string(), m.to_string()))
        })
        .collect();
    assert_eq!(documented(), served);
}

#[actix_web::test]
async fn documented_methods_reach_handlers_and_others_are_405() {
    let (queue, _receiver) = MemoryQueue::new(8);
    let state = state_with(Arc::new(queue), 4096);
    let documented = documented();
    for (path, _) in &documented {
        let concrete = path
            .replace("{namespace}", "default")
            .replace("{event}", "ev1")
            .replace("{id}", "abc");
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            let req = actix_test::TestRequest::default()
                .method(Method::from_bytes(method.as_bytes()).unwrap())
                .uri(&concrete)
                .set_payload(common::VALID);
            let (status, _, body) = send(&state, req).await;
            if documented.contains(&(path.clone(), method.to_string())) {
                assert_ne!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}: {body}"
                );
                assert!(
                    !body["error"].as_str().unwrap_or("").starts_with("no route"),
                    "{method} {path}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is undocumented: {body}"
                );
            }
        }
    }
}
