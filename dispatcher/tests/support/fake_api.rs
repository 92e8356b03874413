//! Fake Kubernetes API servers on `tower_test::mock`, in the style of kube-rs/controller-rs
//! `fixtures.rs`: [`Verifier`] asserts an exact, scripted sequence of requests (method, path
//! with query, body); [`FakeCluster`] keeps Jobs and answers create/get like the API server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

/// A Kubernetes `Status` error body.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A 429 `Status` with `Retry-After` seconds in its details (and header).
pub fn too_many_requests(seconds: u32) -> Value {
    let mut body = status(
        429,
        "TooManyRequests",
        "the server has received too many requests",
    );
    body["details"] = json!({"retryAfterSeconds": seconds});
    body
}

fn response(code: u16, body: &Value) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json");
    if let Some(seconds) = body.pointer("/details/retryAfterSeconds") {
        builder = builder.header("retry-after", seconds.to_string());
    }
    builder
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// Answers requests one by one, asserting each.
pub struct Verifier(Handle<Request<Body>, Response<Body>>);

/// A client talking to a [`Verifier`].
pub fn verifier() -> (kube::Client, Verifier) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), Verifier(handle))
}

impl Verifier {
    /// Waits for the next request, asserts its method and path (with query), answers with
    /// `code` and `body`, and returns the request body as JSON (null when empty).
    pub async fn expect(&mut self, method: &str, path: &str, code: u16, body: Value) -> Value {
        let (request, send) =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.0.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
                .expect("the client hung up");
        assert_eq!(
            request.method().as_str(),
            method,
            "method of {}",
            request.uri()
        );
        assert_eq!(request.uri().path_and_query().unwrap().as_str(), path);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        send.send_response(response(code, &body));
        if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        }
    }

    /// Waits for the next request and returns (method, path with query, body) unanswered.
    pub async fn next(
        &mut self,
    ) -> Option<(
        String,
        String,
        Value,
        tower_test::mock::SendResponse<Response<Body>>,
    )> {
        let (request, send) = self.0.next_request().await?;
        let method = request.method().to_string();
        let path = request.uri().path_and_query().unwrap().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Some((method, path, body, send))
    }
}

/// A stateful fake holding batch Jobs and ConfigMaps: `POST .../jobs` creates (409
/// AlreadyExists when the name is taken), `GET .../jobs/<name>` and
/// `GET .../configmaps/<name>` read. Scripted failures are served first; an outage window
/// answers every request with its failure until it ends; a stall makes creates commit at once
/// but answer late (as a slow API server does).
#[derive(Clone, Default)]
pub struct FakeCluster {
    jobs: Arc<Mutex<BTreeMap<(String, String), Value>>>,
    config_maps: Arc<Mutex<BTreeMap<(String, String), Value>>>,
    failures: Arc<Mutex<VecDeque<Value>>>,
    outage: Arc<Mutex<Option<(std::time::Instant, Value)>>>,
    stall: Arc<Mutex<Option<std::time::Duration>>>,
    /// Requests answered with an outage failure.
    pub refused: Arc<AtomicUsize>,
    /// Create requests answered 201.
    pub created: Arc<AtomicUsize>,
    /// Requests of any kind.
    pub requests: Arc<AtomicUsize>,
}

impl FakeCluster {
    /// A client talking to a new fake, which serves until the client is dropped. The samples'
    /// module ConfigMap (`default/job-for-ev1-modules` with `echo.wasm`) is in place.
    pub fn start() -> (kube::Client, Self) {
        let fake = Self::default();
        fake.insert_config_map(
            "default",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "job-for-ev1-modules", "namespace": "default"},
                   "binaryData": {"echo.wasm": "AGFzbQEAAAA="}}),
        );
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let served = fake.clone();
        tokio::spawn(async move {
            // Each request on its own task, as a real server answers them concurrently.
            while let Some((request, send)) = handle.next_request().await {
                let served = served.clone();
                tokio::spawn(async move {
                    let (code, body) = served.answer(request).await;
                    send.send_response(response(code, &body));
                });
            }
        });
        (kube::Client::new(service, "default"), fake)
    }

    /// The next create fails with this `Status` body (queued).
    pub fn fail_next(&self, body: Value) {
        self.failures.lock().unwrap().push_back(body);
    }

    /// Every request fails with this `Status` body for `duration` from now.
    pub fn outage(&self, duration: std::time::Duration, body: Value) {
        *self.outage.lock().unwrap() = Some((std::time::Instant::now() + duration, body));
    }

    /// Creates commit at once but answer only after `delay` (None: at once).
    pub fn stall_creates(&self, delay: Option<std::time::Duration>) {
        *self.stall.lock().unwrap() = delay;
    }

    /// Puts a ConfigMap in place.
    pub fn insert_config_map(&self, namespace: &str, map: Value) {
        let name = map["metadata"]["name"].as_str().unwrap().to_owned();
        self.config_maps
            .lock()
            .unwrap()
            .insert((namespace.into(), name), map);
    }

    /// Removes a ConfigMap.
    pub fn remove_config_map(&self, namespace: &str, name: &str) {
        self.config_maps
            .lock()
            .unwrap()
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// The Jobs held, by (namespace, name).
    pub fn jobs(&self) -> BTreeMap<(String, String), Value> {
        self.jobs.lock().unwrap().clone()
    }

    /// Puts a Job in place, as if created earlier.
    pub fn insert(&self, namespace: &str, job: Value) {
        let name = job["metadata"]["name"].as_str().unwrap().to_owned();
        self.jobs
            .lock()
            .unwrap()
            .insert((namespace.into(), name), job);
    }

    async fn answer(&self, request: Request<Body>) -> (u16, Value) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let outage = self.outage.lock().unwrap().clone();
        if let Some((until, failure)) = outage
            && std::time::Instant::now() < until
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let code = failure["code"].as_u64().unwrap() as u16;
            return (code, failure);
        }
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["api", "v1", "namespaces", ns, "configmaps", name]) => {
                match self
                    .config_maps
                    .lock()
                    .unwrap()
                    .get(&(ns.to_string(), name.to_string()))
                {
                    Some(map) => (200, map.clone()),
                    None => (
                        404,
                        status(404, "NotFound", &format!("configmaps \"{name}\" not found")),
                    ),
                }
            }
            ("POST", ["apis", "batch", "v1", "namespaces", ns, "jobs"]) => {
                if let Some(failure) = self.failures.lock().unwrap().pop_front() {
                    let code = failure["code"].as_u64().unwrap() as u16;
                    return (code, failure);
                }
                let mut job: Value = serde_json::from_slice(&bytes).unwrap();
                let name = job["metadata"]["name"].as_str().unwrap().to_owned();
                let key = (ns.to_string(), name.clone());
                {
                    let mut jobs = self.jobs.lock().unwrap();
                    if jobs.contains_key(&key) {
                        return (
                            409,
                            status(
                                409,
                                "AlreadyExists",
                                &format!("jobs.batch \"{name}\" already exists"),
                            ),
                        );
                    }
                    job["metadata"]["uid"] = json!(format!("uid-{name}"));
                    job["metadata"]["resourceVersion"] = json!("1");
                    jobs.insert(key, job.clone());
                }
                self.created.fetch_add(1, Ordering::Relaxed);
                let stall = *self.stall.lock().unwrap();
                if let Some(delay) = stall {
                    tokio::time::sleep(delay).await;
                }
                (201, job)
            }
            ("GET", ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
                match self
                    .jobs
                    .lock()
                    .unwrap()
                    .get(&(ns.to_string(), name.to_string()))
                {
                    Some(job) => (200, job.clone()),
                    None => (
                        404,
                        status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
                    ),
                }
            }
            _ => (
                404,
                status(
                    404,
                    "NotFound",
                    &format!("{method} {path} is not served by the fake"),
                ),
            ),
        }
    }
}
