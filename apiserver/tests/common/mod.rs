//! Fixtures shared by the integration tests: a manifest, app state and a request helper.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use actix_web::{App, test, web};
use jobico_apiserver::{AppState, Catalog, Publisher, catalog, configure};
use jobico_model::Manifest;
use serde_json::Value;

/// ConfigMap with a person schema and a broken one; a Job declaring `ev1` and `broken`; a
/// second tenant, `team-b`, with its own `ev1`.
pub const MANIFEST: &str = r#"
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
---
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-ev1, namespace: team-b}
data:
  schema-ev1.json: '{"type": "object"}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: job-for-ev1, namespace: team-b}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: schema-ev1}}
"#;

/// A valid `ev1` event.
pub const VALID: &str = r#"{"firstName":"Ada","lastName":"Lovelace"}"#;

/// The catalog of [`MANIFEST`].
pub fn catalog() -> Arc<Catalog> {
    let mut manifest = Manifest::default();
    manifest.read_str(Path::new("test.yaml"), MANIFEST).unwrap();
    let (events, _) = catalog::from_manifest(&manifest);
    let catalog = Catalog::new();
    catalog.replace(events);
    Arc::new(catalog)
}

/// App state over [`MANIFEST`] with `publisher` and a body limit.
pub fn state_with(publisher: Arc<dyn Publisher>, max_body_bytes: usize) -> web::Data<AppState> {
    web::Data::new(AppState::new(catalog(), publisher, max_body_bytes))
}

/// Sends a request through the app's own `configure`; returns status, headers and JSON body.
pub async fn send(
    state: &web::Data<AppState>,
    req: test::TestRequest,
) -> (StatusCode, HeaderMap, Value) {
    let app = test::init_service(App::new().configure(configure(state.clone()))).await;
    let response = test::call_service(&app, req.to_request()).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = test::read_body(response).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"));
    (status, headers, json)
}

/// A PUT with a body.
pub fn put(path: &str, body: &str) -> test::TestRequest {
    test::TestRequest::put()
        .uri(path)
        .set_payload(body.to_string())
}
