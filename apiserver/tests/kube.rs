//! Cluster wiring against a fake Kubernetes API (tower-test): the catalog reflectors and the
//! TokenReview + SubjectAccessReview checks. Every request path is recorded and asserted.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::{StatusCode, header};
use actix_web::web;
use common::{VALID, put, send};
use http::{Request, Response};
use jobico_apiserver::auth::{Auth, KubernetesAuth};
use jobico_apiserver::catalog::Lookup;
use jobico_apiserver::watch::{self, WatchConfig};
use jobico_apiserver::{AppState, Catalog, MemoryQueue, Metrics};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn fake_api() -> (Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

fn respond(send: SendResponse<Response<Body>>, body: &Value) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn schema_map(rv: &str, required: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "schema-ev1", "namespace": "default", "resourceVersion": rv},
        "data": {"schema-ev1.json": format!(r#"{{"type":"object","required":["{required}"]}}"#)},
        "binaryData": {"echo.wasm": "AGFzbQEAAAA="}
    })
}

fn job() -> Value {
    json!({
        "apiVersion": "jobico.coeux.dev/v1", "kind": "Job",
        "metadata": {"name": "job-for-ev1", "namespace": "default", "resourceVersion": "1",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"events": [{"name": "ev1", "wasm": "echo.wasm", "schema": {"key": "schema-ev1"}}]}
    })
}

fn violations(catalog: &Catalog, instance: Value) -> Option<Vec<String>> {
    match catalog.lookup("default", "ev1") {
        Lookup::Found(entry) => Some(
            entry
                .schema
                .as_ref()
                .ok()?
                .violations(0, &instance)
                .into_iter()
                .map(|v| v.message)
                .collect(),
        ),
        _ => None,
    }
}

/// A ConfigMap's metadata as the metadata-only list and watch return it.
fn map_meta(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": {"name": name, "namespace": "default", "resourceVersion": rv}})
}

#[tokio::test]
async fn only_referenced_configmaps_are_read_and_schema_changes_are_followed() {
    let (client, mut handle) = fake_api();
    // (method, uri, accept header) of every request.
    let requests = Arc::new(Mutex::new(Vec::<(String, String, String)>::new()));
    let release = Arc::new(Notify::new());
    let fake = {
        let (requests, release) = (requests.clone(), release.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut map_watches = 0;
            let mut schema_reads = 0;
            while let Some((request, send)) = handle.next_request().await {
                let uri = request.uri().to_string();
                let accept = request
                    .headers()
                    .get(http::header::ACCEPT)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                requests.lock().unwrap().push((
                    request.method().to_string(),
                    uri.clone(),
                    accept.clone(),
                ));
                let watching = uri.contains("watch=true");
                let metadata_only = accept.contains("as=PartialObjectMetadata");
                if uri.starts_with("/apis/jobico.coeux.dev/v1/jobs?") && !watching {
                    respond(
                        send,
                        &json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "JobList",
                        "metadata": {"resourceVersion": "1"}, "items": [job()]}),
                    );
                } else if uri.starts_with("/api/v1/configmaps?") && !watching {
                    let items = if metadata_only {
                        vec![map_meta("schema-ev1", "1"), map_meta("unrelated", "1")]
                    } else {
                        let mut unrelated = schema_map("1", "x");
                        unrelated["metadata"]["name"] = json!("unrelated");
                        unrelated["data"] = json!({"big": "x".repeat(100_000)});
                        vec![schema_map("1", "firstName"), unrelated]
                    };
                    let kind = if metadata_only {
                        "PartialObjectMetadataList"
                    } else {
                        "ConfigMapList"
                    };
                    respond(
                        send,
                        &json!({"apiVersion": "v1", "kind": kind,
                        "metadata": {"resourceVersion": "1"}, "items": items}),
                    );
                } else if uri.starts_with("/api/v1/namespaces/default/configmaps/schema-ev1") {
                    schema_reads += 1;
                    let map = if schema_reads == 1 {
                        schema_map("1", "firstName")
                    } else {
                        schema_map("2", "lastName")
                    };
                    respond(send, &map);
                } else if uri.starts_with("/api/v1/configmaps?") && map_watches == 0 {
                    map_watches += 1;
                    let release = release.clone();
                    tokio::spawn(async move {
                        release.notified().await;
                        let object = if metadata_only {
                            map_meta("schema-ev1", "2")
                        } else {
                            schema_map("2", "lastName")
                        };
                        let event = json!({"type": "MODIFIED", "object": object});
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        send.send_response(Response::builder().body(Body::from(line)).unwrap());
                    });
                } else {
                    // Further watches stay open and quiet.
                    held.push(send);
                }
            }
        })
    };

    let catalog = Arc::new(Catalog::new());
    let synced = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let config = WatchConfig {
        debounce: Duration::from_millis(20),
        ..Default::default()
    };
    let task = tokio::spawn(watch::run(
        client,
        config,
        catalog.clone(),
        synced.clone(),
        shutdown.clone(),
    ));

    let deadline = Instant::now() + Duration::from_secs(10);
    while !synced.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "catalog never synced; requests: {:?}",
            requests.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = violations(&catalog, json!({"lastName": "L"})).expect("ev1 is in the catalog");
    assert!(first[0].contains("firstName"), "{first:?}");

    // The schema ConfigMap changes: the new schema takes effect without a restart.
    release.notify_one();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = violations(&catalog, json!({"firstName": "A"})).unwrap();
        if now.first().is_some_and(|m| m.contains("lastName")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "schema change not applied: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let seen = requests.lock().unwrap().clone();
    let uris =
        |pred: &dyn Fn(&(String, String, String)) -> bool| seen.iter().filter(|r| pred(r)).count();
    assert!(
        uris(
            &|(_, u, _)| u.starts_with("/apis/jobico.coeux.dev/v1/jobs?")
                && u.contains("watch=true")
        ) > 0,
        "{seen:?}"
    );
    // ConfigMaps are listed and watched by metadata only...
    let map_lists: Vec<_> = seen
        .iter()
        .filter(|(_, u, _)| u.starts_with("/api/v1/configmaps?"))
        .collect();
    assert!(map_lists.len() >= 2, "{seen:?}");
    for (_, uri, accept) in &map_lists {
        assert!(
            accept.contains("as=PartialObjectMetadata"),
            "{uri} asks for whole ConfigMaps ({accept:?})"
        );
    }
    // ...and only the referenced one is read, once per version.
    assert_eq!(
        uris(&|(m, u, _)| m == "GET"
            && u.starts_with("/api/v1/namespaces/default/configmaps/schema-ev1")),
        2,
        "{seen:?}"
    );
    assert_eq!(uris(&|(_, u, _)| u.contains("unrelated")), 0, "{seen:?}");
    shutdown.cancel();
    task.await.unwrap();
    fake.abort();
}

#[tokio::test]
async fn a_missing_crd_is_reported_with_the_fix() {
    let (client, mut handle) = fake_api();
    tokio::spawn(async move {
        let (request, send) = handle.next_request().await.unwrap();
        assert!(
            request
                .uri()
                .path()
                .starts_with("/apis/jobico.coeux.dev/v1/namespaces/team/jobs"),
            "{}",
            request.uri()
        );
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the server could not find the requested resource", "reason": "NotFound", "code": 404});
        send.send_response(
            Response::builder()
                .status(404)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );
    });
    let error = watch::check_crd(&client, &["team".to_string()])
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("kubectl apply -f crds/"),
        "{error}"
    );
}

/// A fake API that authenticates the token `good` as alice, allows alice to execute Job
/// `job-for-ev1` in `default`, and counts the reviews.
fn spawn_review_api(mut handle: ApiHandle, reviews: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_string();
            assert_eq!(request.method(), http::Method::POST);
            let body: Value =
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap();
            reviews.lock().unwrap().push(path.clone());
            let reply = match path.as_str() {
                "/apis/authentication.k8s.io/v1/tokenreviews" => {
                    assert_eq!(body["spec"]["audiences"], json!(["jobico.coeux.dev"]));
                    let alice = json!({"username": "alice", "groups": ["devs"]});
                    let mut reply = body.clone();
                    reply["status"] = match body["spec"]["token"].as_str().unwrap() {
                        "good" => json!({"authenticated": true, "user": alice,
                                         "audiences": ["jobico.coeux.dev"]}),
                        // An authenticator that ignores audiences, and a token for another one.
                        "unaware" => json!({"authenticated": true, "user": alice}),
                        "elsewhere" => json!({"authenticated": true, "user": alice,
                                              "audiences": ["vault"]}),
                        _ => json!({"authenticated": false}),
                    };
                    reply
                }
                "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                    let spec = &body["spec"];
                    let attrs = &spec["resourceAttributes"];
                    assert_eq!(spec["user"], "alice");
                    assert_eq!(spec["groups"], json!(["devs"]));
                    assert_eq!(
                        (attrs["group"].as_str(), attrs["resource"].as_str()),
                        (Some("jobico.coeux.dev"), Some("jobs"))
                    );
                    assert_eq!(
                        (attrs["subresource"].as_str(), attrs["verb"].as_str()),
                        (Some("execute"), Some("create"))
                    );
                    let allowed = attrs["namespace"] == "default" && attrs["name"] == "job-for-ev1";
                    let mut reply = body.clone();
                    reply["status"] = json!({"allowed": allowed});
                    reply
                }
                other => panic!("unexpected request {other}"),
            };
            respond(send, &reply);
        }
    });
}

#[actix_web::test]
async fn kubernetes_tokens_are_reviewed_authorized_and_cached() {
    let (client, handle) = fake_api();
    let reviews = Arc::new(Mutex::new(Vec::new()));
    spawn_review_api(handle, reviews.clone());
    let (queue, _receiver) = MemoryQueue::new(16);
    let metrics = Metrics::new();
    let mut state = AppState::new(common::catalog(), Arc::new(queue), 4096);
    state.auth = Arc::new(Auth::Kubernetes(KubernetesAuth::new(
        client,
        "jobico.coeux.dev".into(),
        metrics.clone(),
    )));
    let state = web::Data::new(state);
    let with = |token: &str| {
        put("/execute/default/ev1", VALID)
            .insert_header((header::AUTHORIZATION, format!("Bearer {token}")))
    };

    assert_eq!(
        send(&state, put("/execute/default/ev1", VALID)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(reviews.lock().unwrap().is_empty(), "no token, no review");
    let (status, _, body) = send(&state, with("bad")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        reviews.lock().unwrap().len(),
        1,
        "an unauthenticated token needs no access review"
    );

    let (status, _, body) = send(&state, with("good")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(reviews.lock().unwrap().len(), 3);
    // Cached: the same token and access costs no further review.
    assert_eq!(send(&state, with("good")).await.0, StatusCode::ACCEPTED);
    assert_eq!(reviews.lock().unwrap().len(), 3);
    assert!(
        metrics
            .encode()
            .contains("jobico_apiserver_auth_cache_hits_total 1")
    );

    // Another namespace is another authorization: denied, so 403 (not a 404 that would reveal
    // which namespaces have events).
    let (status, _, body) = send(
        &state,
        put("/execute/other/ev1", VALID).insert_header((header::AUTHORIZATION, "Bearer good")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("create jobs/execute"),
        "{body}"
    );
}

#[actix_web::test]
async fn a_token_review_that_does_not_name_our_audience_is_refused() {
    let (client, handle) = fake_api();
    let reviews = Arc::new(Mutex::new(Vec::new()));
    spawn_review_api(handle, reviews.clone());
    let auth = Auth::Kubernetes(KubernetesAuth::new(
        client,
        "jobico.coeux.dev".into(),
        Metrics::new(),
    ));
    let access = jobico_apiserver::auth::Access::execute("default", Some("job-for-ev1"));
    for token in ["unaware", "elsewhere"] {
        let error = auth
            .check(Some(&format!("Bearer {token}")), &access)
            .await
            .unwrap_err();
        assert!(
            matches!(error, jobico_apiserver::ApiError::Unauthorized(_)),
            "{token}: {error:?}"
        );
        assert!(
            error.to_string().contains("--audience jobico.coeux.dev"),
            "{error}"
        );
    }
    assert!(
        reviews
            .lock()
            .unwrap()
            .iter()
            .all(|path| path.ends_with("tokenreviews")),
        "no access review for a token not meant for us"
    );
    assert!(auth.check(Some("Bearer good"), &access).await.is_ok());
}

#[actix_web::test]
async fn a_flood_of_fresh_tokens_does_not_evict_real_clients_decisions() {
    let (client, handle) = fake_api();
    let reviews = Arc::new(Mutex::new(Vec::new()));
    spawn_review_api(handle, reviews.clone());
    let auth = Auth::Kubernetes(KubernetesAuth::new(
        client,
        "jobico.coeux.dev".into(),
        Metrics::new(),
    ));
    let access = jobico_apiserver::auth::Access::execute("default", Some("job-for-ev1"));
    assert!(auth.check(Some("Bearer good"), &access).await.is_ok());
    let reviewed = reviews.lock().unwrap().len();
    assert_eq!(reviewed, 2);
    // More made-up tokens than the cache holds, each one review.
    let flood = jobico_apiserver::auth::MAX_CACHED_REFUSALS.get() + 10;
    for i in 0..flood {
        let result = auth.check(Some(&format!("Bearer fake-{i}")), &access).await;
        assert!(result.is_err());
    }
    assert_eq!(reviews.lock().unwrap().len(), reviewed + flood);
    // The real client's decision is still cached: no further review.
    assert!(auth.check(Some("Bearer good"), &access).await.is_ok());
    assert_eq!(
        reviews.lock().unwrap().len(),
        reviewed + flood,
        "the flood evicted a real client's decision"
    );
    // And the newest refusals are still cached too (bounded, least recently used goes first).
    assert!(
        auth.check(Some(&format!("Bearer fake-{}", flood - 1)), &access)
            .await
            .is_err()
    );
    assert_eq!(reviews.lock().unwrap().len(), reviewed + flood);
}
