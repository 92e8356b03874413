//! A fake Kubernetes API server over real HTTP on loopback, for the processes that run against
//! a cluster (the dispatcher binary in `scripts/chaos.sh`): they reach it through a
//! kubeconfig ([`KubeApi::kubeconfig`]) exactly as they reach a real API server.
//!
//! It keeps objects of any resource in memory and serves the request paths kube-rs and kubectl
//! use: `GET` of an object or a collection (namespaced or across namespaces, with
//! `labelSelector`, `fieldSelector` on `metadata.name`/`metadata.namespace`, `limit` and
//! `continue`), `watch=true` streams from a `resourceVersion` (or the current objects as
//! `ADDED` first, as a watch from `0` does), `POST` (409 `AlreadyExists`, `generateName`),
//! `PUT` (409 `Conflict` on a stale `resourceVersion`), `PATCH` (merge, strategic-merge as
//! merge, JSON patch with `test`, server-side apply as a merge that may create), `DELETE`
//! (finalizers hold an object with its `deletionTimestamp` until the last is removed), and the
//! `status` subresource (a write to the object keeps its status; a write to `status` changes
//! only that). Every write bumps one resource version, so watches resume without gaps.
//!
//! Faults are injected per verb and resource ([`Fault`]): an answer instead of the request, or
//! after it committed (a `504` for a create that happened), for a number of requests or a
//! time window, with `Retry-After` on 429s. Requests are counted by verb and resource
//! ([`KubeApi::requests`], [`KubeApi::writes`]), and every committed create is kept
//! ([`KubeApi::created`]). Writes can be given a latency ([`KubeApi::write_latency`]).
//!
//! With [`KubeApi::run_jobs`] it also plays the Job controller and kubelet for `batch/v1`
//! Jobs: each created Job is marked `Complete` after a delay (no pods are made). With
//! [`KubeApi::control_plane`] it models a control plane's limited write capacity, for
//! benchmarks: every write (a request's, or one its controllers make for a Job's pod) takes
//! its turn in one queue, and each Job costs the writes its pod would.
//!
//! Not modelled: authentication and authorization (every request is allowed), admission,
//! namespace existence, defaulting and validation of bodies, and garbage collection.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

/// How many changes are kept for watches to resume from; an older `resourceVersion` gets
/// `410 Gone`, as from a compacted etcd.
const HISTORY: usize = 500_000;

/// A resource: its API version (`v1`, `batch/v1`, `jobico.coeux.dev/v1`) and plural.
pub fn resource(api_version: &str, plural: &str) -> String {
    format!("{api_version}/{plural}")
}

/// A fault: requests it matches get `code` instead of (or, [`Fault::after_commit`], after)
/// being served.
#[derive(Debug, Clone)]
pub struct Fault {
    verb: Option<String>,
    resource: Option<String>,
    code: u16,
    retry_after: Option<u32>,
    after_commit: bool,
    times: Option<usize>,
    until: Option<Instant>,
}

impl Fault {
    /// Every request answered with `code` (narrow it with [`Fault::on`]), forever unless
    /// [`Fault::times`] or [`Fault::lasting`] bounds it.
    pub fn answer(code: u16) -> Self {
        Self {
            verb: None,
            resource: None,
            code,
            retry_after: None,
            after_commit: false,
            times: None,
            until: None,
        }
    }
    /// Only requests of `verb` (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`) on `resource` (see [`resource`]; a subresource is `<resource>/status`).
    pub fn on(mut self, verb: &str, resource: &str) -> Self {
        self.verb = Some(verb.into());
        self.resource = Some(resource.into());
        self
    }
    /// The next `n` matching requests only.
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
    /// Matching requests for `duration` from now.
    pub fn lasting(mut self, duration: Duration) -> Self {
        self.until = Some(Instant::now() + duration);
        self
    }
    /// A `Retry-After` of `seconds` (header and `details.retryAfterSeconds`).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    /// Serve the request, then answer `code` (a timeout after the write committed).
    pub fn after_commit(mut self) -> Self {
        self.after_commit = true;
        self
    }

    fn matches(&self, verb: &str, resource: &str, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
            && self.times.is_none_or(|n| n > 0)
            && self.verb.as_deref().is_none_or(|v| v == verb)
            && self.resource.as_deref().is_none_or(|r| r == resource)
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct Target {
    api_version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
    /// A subresource served by its own handler: `log` (pods) or `token` (service accounts).
    action: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => ((*version).to_owned(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let owned = |s: &&str| Some((*s).to_owned());
        let (plural, namespace, name, sub) = match rest {
            ["namespaces", ns, plural, rest @ ..] => {
                let (name, sub) = match rest {
                    [] => (None, None),
                    [name] => (owned(name), None),
                    [name, sub] => (owned(name), owned(sub)),
                    _ => return None,
                };
                ((*plural).to_owned(), owned(ns), name, sub)
            }
            [plural] => ((*plural).to_owned(), None, None, None),
            [plural, name] => ((*plural).to_owned(), None, owned(name), None),
            [plural, name, sub] => ((*plural).to_owned(), None, owned(name), owned(sub)),
            _ => return None,
        };
        let (status, action) = match sub.as_deref() {
            None => (false, None),
            Some("status") => (true, None),
            Some(action @ ("log" | "token")) => (false, Some(action.to_owned())),
            Some(_) => return None,
        };
        Some(Self {
            api_version,
            plural,
            namespace,
            name,
            status,
            action,
        })
    }

    fn resource(&self) -> String {
        resource(&self.api_version, &self.plural)
    }

    fn key(&self, name: &str) -> Key {
        Key {
            resource: self.resource(),
            namespace: self.namespace.clone().unwrap_or_default(),
            name: name.to_owned(),
        }
    }

    /// Whether the resource has a `status` subresource (writes to the object keep its status).
    fn has_status(&self) -> bool {
        !matches!(
            self.plural.as_str(),
            "configmaps" | "secrets" | "leases" | "events" | "serviceaccounts"
        )
    }
}

/// One write, for watches.
#[derive(Debug, Clone)]
struct Change {
    version: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    version: u64,
    uids: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    created: Vec<(String, Value)>,
}

impl Store {
    /// Records `object` (or its removal) under a new resource version.
    fn write(&mut self, kind: &'static str, key: Key, mut object: Value) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        self.history.push_back(Change {
            version: self.version,
            kind,
            key,
            object: object.clone(),
        });
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        object
    }
}

/// A label or field selector: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated.
#[derive(Debug, Default, Clone)]
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String, bool)>,
}

impl Selector {
    fn parse(labels: Option<&str>, fields: Option<&str>) -> Self {
        let mut selector = Self::default();
        for term in labels
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            if let Some((k, v)) = term.split_once("!=") {
                selector.labels.push((k.into(), Some(v.into()), false));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                selector.labels.push((k.into(), Some(v.into()), true));
            } else if let Some(k) = term.strip_prefix('!') {
                selector.labels.push((k.into(), None, false));
            } else {
                selector.labels.push((term.into(), None, true));
            }
        }
        for term in fields
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            if let Some((k, v)) = term.split_once("!=") {
                selector.fields.push((k.into(), v.into(), false));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                selector.fields.push((k.into(), v.into(), true));
            }
        }
        selector
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let labels_hold = self.labels.iter().all(|(k, v, equal)| {
            let actual = labels.get(k).and_then(Value::as_str);
            match v {
                Some(v) => (actual == Some(v.as_str())) == *equal,
                None => actual.is_some() == *equal,
            }
        });
        let fields_hold = self.fields.iter().all(|(k, v, equal)| {
            let pointer = format!("/{}", k.replace('.', "/"));
            let actual = object.pointer(&pointer).and_then(Value::as_str);
            (actual == Some(v.as_str())) == *equal
        });
        labels_hold && fields_hold
    }
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Vec<Fault>>,
    requests: Mutex<BTreeMap<(String, String), usize>>,
    /// Faults answered, by code (`504 after commit` for those served first).
    faults_served: Mutex<BTreeMap<String, usize>>,
    run_jobs: Mutex<Option<Duration>>,
    /// How long each write (create, update, patch, delete) takes before it is served, as a
    /// real API server's round trip to etcd does.
    write_latency: Mutex<Option<Duration>>,
    /// The modelled control plane's write capacity, if any ([`KubeApi::control_plane`]).
    control_plane: Mutex<Option<ControlPlane>>,
    /// The queue writes take their turn in when the control plane is modelled.
    write_queue: tokio::sync::Mutex<()>,
    /// Writes made by the modelled controllers (for pods and Job status), not by requests.
    controller_writes: std::sync::atomic::AtomicUsize,
    /// Whether creates need their namespace to exist, as on a real cluster.
    require_namespaces: std::sync::atomic::AtomicBool,
    /// Pod logs, by (namespace, pod).
    logs: Mutex<BTreeMap<(String, String), String>>,
    /// Token requests served: (namespace, service account, the request body).
    token_requests: Mutex<Vec<(String, String, Value)>>,
    /// The newest resource version, for watches waiting for more.
    version: Option<tokio::sync::watch::Sender<u64>>,
}

impl Shared {
    /// One write by the modelled controllers.
    async fn controller_write(&self) {
        self.write_turn().await;
        self.controller_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits for the modelled control plane to have served one more write: writes take their
    /// turn (first come, first served) and each holds the queue for `1 / writes_per_second`.
    async fn write_turn(&self) {
        let capacity = *self.control_plane.lock().expect("control plane lock");
        if let Some(model) = capacity {
            let _turn = self.write_queue.lock().await;
            actix_web::rt::time::sleep(model.per_write()).await;
        }
    }

    fn write(&self, kind: &'static str, key: Key, object: Value) -> Value {
        let mut store = self.store.lock().expect("store lock");
        let written = store.write(kind, key, object);
        if let Some(tx) = &self.version {
            tx.send_replace(store.version);
        }
        written
    }
}

/// A control plane's write throughput, as the fake models it ([`KubeApi::control_plane`]).
///
/// On a real cluster the API server, etcd, the controllers, the scheduler and the kubelets
/// share a few cores: writes are served at a limited rate, and every Job costs, besides its
/// create, the writes its pod makes (the pod's create and binding, its status as it starts and
/// ends, the Job's status, events). One Job per event is capped by that; batching is the lever.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlPlane {
    /// Writes served per second, all writers together.
    pub writes_per_second: f64,
    /// Writes the controllers make for each Job: half before its pod runs, the rest after it,
    /// the last being the Job's completion.
    pub writes_per_job: usize,
}

impl ControlPlane {
    fn per_write(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.writes_per_second.max(1e-3))
    }
}

/// A running fake API server, stopped on drop.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl KubeApi {
    /// Starts a fake on a free loopback port, serving from its own thread.
    pub fn start() -> Self {
        let (tx, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            version: Some(tx),
            ..Default::default()
        });
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let (handles, handle_rx) = std::sync::mpsc::channel();
        let served = shared.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let data = web::Data::new(served);
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .app_data(web::PayloadConfig::new(64 << 20))
                        .default_service(web::to(serve))
                })
                .workers(2)
                .disable_signals()
                .shutdown_timeout(1)
                .listen(listener)
                .expect("cannot listen")
                .run();
                let _ = handles.send(server.handle());
                let _ = server.await;
            });
        });
        let handle = handle_rx.recv().expect("the fake API server started");
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let api = Self {
            addr,
            shared,
            handle,
            thread: Some(thread),
            dir,
        };
        std::fs::write(api.kubeconfig(), api.kubeconfig_text()).expect("write the kubeconfig");
        api
    }

    /// The server's URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file pointing at this server (set `KUBECONFIG` to it).
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kube client from [`KubeApi::kubeconfig`], with kube's own retries of 429/503/504
    /// off, so that a test sees the fake's answers (the dispatcher's client keeps them).
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())
            .expect("the fake's kubeconfig reads");
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("the fake's kubeconfig is valid");
        config.default_retry = false;
        kube::Client::try_from(config).expect("a client for the fake")
    }

    fn kubeconfig_text(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n",
            self.url()
        )
    }

    /// Puts `object` in place (as `kubectl apply` would), by its `apiVersion`, `kind`'s
    /// `plural` and metadata.
    pub fn apply(&self, plural: &str, mut object: Value) {
        let api_version = object["apiVersion"]
            .as_str()
            .expect("apiVersion")
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let key = Key {
            resource: resource(&api_version, plural),
            namespace,
            name,
        };
        let existing = self
            .shared
            .store
            .lock()
            .expect("store lock")
            .objects
            .get(&key)
            .cloned();
        let kind = match existing {
            Some(existing) => {
                object["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                "MODIFIED"
            }
            None => {
                let mut store = self.shared.store.lock().expect("store lock");
                store.uids += 1;
                object["metadata"]["uid"] = json!(format!("fake-uid-{}", store.uids));
                "ADDED"
            }
        };
        if object["metadata"].get("creationTimestamp").is_none() {
            object["metadata"]["creationTimestamp"] = json!(now());
        }
        self.shared.write(kind, key, object);
    }

    /// The objects of `resource` in `namespace` (all namespaces: `None`).
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .objects
            .iter()
            .filter(|(k, _)| k.resource == resource && namespace.is_none_or(|n| n == k.namespace))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every object of `resource` created through the API (committed creates only), in order.
    pub fn created(&self, resource: &str) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .created
            .iter()
            .filter(|(r, _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Requests served so far, by (verb, resource).
    pub fn requests(&self) -> BTreeMap<(String, String), usize> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// Adds a fault; the first live fault matching a request decides its answer.
    pub fn inject(&self, fault: Fault) {
        self.shared.faults.lock().expect("faults lock").push(fault);
    }

    /// From now on every write waits `latency` before it is served (`None`: at once).
    pub fn write_latency(&self, latency: Option<Duration>) {
        *self.shared.write_latency.lock().expect("latency lock") = latency;
    }

    /// Models a control plane's write capacity from now on (`None`: writes are served at once,
    /// apart from [`KubeApi::write_latency`]): every request's write and every write the
    /// modelled controllers make for a Job ([`KubeApi::run_jobs`]) wait their turn in one
    /// queue served at `writes_per_second`.
    pub fn control_plane(&self, model: Option<ControlPlane>) {
        *self
            .shared
            .control_plane
            .lock()
            .expect("control plane lock") = model;
    }

    /// Writes the modelled controllers made so far (see [`KubeApi::control_plane`]); requests'
    /// writes are [`KubeApi::writes`].
    pub fn controller_writes(&self) -> usize {
        self.shared
            .controller_writes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes served so far (create, update, patch, delete), by resource.
    pub fn writes(&self) -> BTreeMap<String, usize> {
        let mut writes = BTreeMap::new();
        for ((verb, resource), n) in self.requests() {
            if matches!(verb.as_str(), "create" | "update" | "patch" | "delete") {
                *writes.entry(resource).or_default() += n;
            }
        }
        writes
    }

    /// From now on a create in a namespace needs that `v1` Namespace object to exist (put one in
    /// place with [`KubeApi::apply`]), else it is answered 404 `namespaces "<ns>" not found`,
    /// as a real API server answers.
    pub fn require_namespaces(&self) {
        self.shared
            .require_namespaces
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the log of pod `namespace/pod` (what `GET .../pods/<pod>/log` answers).
    pub fn set_pod_log(&self, namespace: &str, pod: &str, text: &str) {
        self.shared
            .logs
            .lock()
            .expect("logs lock")
            .insert((namespace.into(), pod.into()), text.into());
    }

    /// The TokenRequests served: (namespace, service account, request body).
    pub fn token_requests(&self) -> Vec<(String, String, Value)> {
        self.shared
            .token_requests
            .lock()
            .expect("tokens lock")
            .clone()
    }

    /// Faults answered so far, by code (`"504 after commit"` for those answered after
    /// serving the request).
    pub fn faults_served(&self) -> BTreeMap<String, usize> {
        self.shared
            .faults_served
            .lock()
            .expect("faults lock")
            .clone()
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.shared.faults.lock().expect("faults lock").clear();
    }

    /// Plays the Job controller: every `batch/v1` Job created from now on is `Complete`
    /// `after` its creation (`None`: Jobs stay as created).
    pub fn run_jobs(&self, after: Option<Duration>) {
        *self.shared.run_jobs.lock().expect("run_jobs lock") = after;
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let stop = self.handle.stop(false);
        // The server runs on its own thread's runtime: wait for it there.
        let _ = std::thread::spawn(move || futures::executor::block_on(stop)).join();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// RFC 3339 now, to the second, as the API server writes timestamps.
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A Kubernetes `Status` failure.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn answer(code: u16, body: &Value) -> HttpResponse {
    let mut response = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(code).expect("a valid status code"),
    );
    if let Some(seconds) = body.pointer("/details/retryAfterSeconds") {
        response.insert_header(("retry-after", seconds.to_string()));
    }
    response
        .content_type("application/json")
        .body(serde_json::to_vec(body).expect("JSON serialises"))
}

fn failure(code: u16, message: &str) -> HttpResponse {
    answer(code, &status(code, reason(code), message))
}

fn query(req: &HttpRequest) -> BTreeMap<String, String> {
    web::Query::<BTreeMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default()
}

async fn serve(req: HttpRequest, body: web::Bytes, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let Some(target) = Target::parse(req.path()) else {
        return failure(404, &format!("the server could not find {}", req.path()));
    };
    let query = query(&req);
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (req.method().as_str(), target.name.is_some()) {
        ("POST", true) if target.action.is_some() => "create",
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        (method, _) => return failure(405, &format!("{method} is not supported here")),
    };
    let mut counted = target.resource();
    if target.status {
        counted.push_str("/status");
    }
    if let Some(action) = &target.action {
        counted.push('/');
        counted.push_str(action);
    }
    *shared
        .requests
        .lock()
        .expect("requests lock")
        .entry((verb.to_owned(), counted.clone()))
        .or_default() += 1;
    let fault = {
        let now = Instant::now();
        let mut faults = shared.faults.lock().expect("faults lock");
        faults.retain(|f| f.until.is_none_or(|u| now < u) && f.times.is_none_or(|n| n > 0));
        faults
            .iter_mut()
            .find(|f| f.matches(verb, &counted, now))
            .map(|f| {
                if let Some(n) = f.times.as_mut() {
                    *n -= 1;
                }
                f.clone()
            })
    };
    let injected = |fault: &Fault| {
        let label = if fault.after_commit {
            format!("{} after commit", fault.code)
        } else {
            fault.code.to_string()
        };
        *shared
            .faults_served
            .lock()
            .expect("faults lock")
            .entry(label)
            .or_default() += 1;
        let mut body = status(
            fault.code,
            reason(fault.code),
            &format!("injected fault: {}", fault.code),
        );
        if let Some(seconds) = fault.retry_after {
            body["details"] = json!({"retryAfterSeconds": seconds});
        }
        answer(fault.code, &body)
    };
    if let Some(fault) = &fault
        && !fault.after_commit
    {
        return injected(fault);
    }
    if matches!(verb, "create" | "update" | "patch" | "delete") {
        let latency = *shared.write_latency.lock().expect("latency lock");
        if let Some(latency) = latency {
            actix_web::rt::time::sleep(latency).await;
        }
        shared.write_turn().await;
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response = match (verb, target.action.as_deref()) {
        ("get", Some("log")) => pod_log(&shared, &target),
        ("create", Some("token")) => token(&shared, &target, &body),
        (_, Some(action)) => failure(405, &format!("{verb} of {action} is not supported")),
        _ => match verb {
            "get" => get(&shared, &target),
            "list" => list(&shared, &target, &query),
            "watch" => return watch_stream(shared.get_ref().clone(), target, &query),
            "create" => create(&shared, &target, &body),
            "update" => update(&shared, &target, &body),
            "patch" => patch(&shared, &target, &body, &content_type),
            _ => delete(&shared, &target),
        },
    };
    match fault {
        Some(fault) => injected(&fault),
        None => response,
    }
}

fn parse_body(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
}

fn not_found(target: &Target, name: &str) -> HttpResponse {
    failure(404, &format!("{} \"{name}\" not found", target.plural))
}

fn get(shared: &Shared, target: &Target) -> HttpResponse {
    let name = target.name.as_deref().unwrap_or_default();
    match shared
        .store
        .lock()
        .expect("store lock")
        .objects
        .get(&target.key(name))
    {
        Some(object) => answer(200, object),
        None => not_found(target, name),
    }
}

/// `GET .../pods/<pod>/log`: the text set with [`KubeApi::set_pod_log`] (empty if none) for a
/// pod that exists.
fn pod_log(shared: &Shared, target: &Target) -> HttpResponse {
    let name = target.name.clone().unwrap_or_default();
    if target.plural != "pods" || current(shared, target).is_none() {
        return not_found(target, &name);
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    let text = shared
        .logs
        .lock()
        .expect("logs lock")
        .get(&(namespace, name))
        .cloned()
        .unwrap_or_default();
    HttpResponse::Ok().content_type("text/plain").body(text)
}

/// `POST .../serviceaccounts/<name>/token`: a TokenRequest for a service account that exists,
/// answered with a token naming it.
fn token(shared: &Shared, target: &Target, body: &[u8]) -> HttpResponse {
    let name = target.name.clone().unwrap_or_default();
    if target.plural != "serviceaccounts" || current(shared, target).is_none() {
        return not_found(target, &name);
    }
    let mut request = match parse_body(body) {
        Ok(request) => request,
        Err(message) => return failure(400, &message),
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut tokens = shared.token_requests.lock().expect("tokens lock");
    tokens.push((namespace.clone(), name.clone(), request.clone()));
    request["status"] = json!({
        "token": format!("fake-token.{namespace}.{name}.{}", tokens.len()),
        "expirationTimestamp": now(),
    });
    answer(201, &request)
}

fn list(shared: &Shared, target: &Target, query: &BTreeMap<String, String>) -> HttpResponse {
    let selector = Selector::parse(
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    );
    let store = shared.store.lock().expect("store lock");
    let resource = target.resource();
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let matching: Vec<&Value> = store
        .objects
        .iter()
        .filter(|(k, v)| {
            k.resource == resource
                && target.namespace.as_ref().is_none_or(|n| *n == k.namespace)
                && selector.matches(v)
        })
        .map(|(_, v)| v)
        .collect();
    let items: Vec<&Value> = matching.iter().skip(offset).take(limit).copied().collect();
    let mut metadata = json!({"resourceVersion": store.version.to_string()});
    if offset + items.len() < matching.len() {
        metadata["continue"] = json!((offset + items.len()).to_string());
    }
    answer(
        200,
        &json!({"kind": "List", "apiVersion": target.api_version, "metadata": metadata,
                "items": items}),
    )
}

fn create(shared: &Arc<Shared>, target: &Target, body: &[u8]) -> HttpResponse {
    let mut object = match parse_body(body) {
        Ok(object) => object,
        Err(message) => return failure(400, &message),
    };
    if target.status {
        return failure(405, "create on a status subresource");
    }
    let run_jobs = *shared.run_jobs.lock().expect("run_jobs lock");
    let created = {
        let mut store = shared.store.lock().expect("store lock");
        if let Some(namespace) = &target.namespace
            && shared
                .require_namespaces
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            let key = Key {
                resource: resource("v1", "namespaces"),
                namespace: String::new(),
                name: namespace.clone(),
            };
            if !store.objects.contains_key(&key) {
                let mut body = status(
                    404,
                    "NotFound",
                    &format!("namespaces \"{namespace}\" not found"),
                );
                body["details"] = json!({"name": namespace, "kind": "namespaces"});
                return answer(404, &body);
            }
        }
        let name = match object["metadata"]["name"].as_str() {
            Some(name) => name.to_owned(),
            None => match object["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{:05x}", store.uids + 1),
                None => return failure(422, "metadata.name: Required value"),
            },
        };
        let key = target.key(&name);
        if store.objects.contains_key(&key) {
            return answer(
                409,
                &status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", target.plural),
                ),
            );
        }
        store.uids += 1;
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        if let Some(namespace) = &target.namespace {
            metadata["namespace"] = json!(namespace);
        }
        metadata["uid"] = json!(format!("fake-uid-{}", store.uids));
        metadata["creationTimestamp"] = json!(now());
        metadata["generation"] = json!(1);
        let written = store.write("ADDED", key.clone(), object);
        store.created.push((target.resource(), written.clone()));
        if let Some(tx) = &shared.version {
            tx.send_replace(store.version);
        }
        (key, written)
    };
    if target.resource() == "batch/v1/jobs"
        && let Some(after) = run_jobs
    {
        let shared = shared.clone();
        let key = created.0.clone();
        actix_web::rt::spawn(async move {
            let writes = shared
                .control_plane
                .lock()
                .expect("control plane lock")
                .map_or(0, |model| model.writes_per_job);
            // The pod's writes before it runs (create, binding, starting), then after it
            // (finished), the last being the Job's completion below.
            let before = writes / 2;
            for _ in 0..before {
                shared.controller_write().await;
            }
            actix_web::rt::time::sleep(after).await;
            for _ in before..writes {
                shared.controller_write().await;
            }
            complete(&shared, key);
        });
    }
    answer(201, &created.1)
}

/// Marks a Job `Complete`, as the Job controller does once its pod succeeded.
fn complete(shared: &Shared, key: Key) {
    let Some(mut job) = shared
        .store
        .lock()
        .expect("store lock")
        .objects
        .get(&key)
        .cloned()
    else {
        return;
    };
    let at = now();
    job["status"] = json!({
        "startTime": at, "completionTime": at, "succeeded": 1, "active": 0,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": at,
             "reason": "CompletionsReached"},
            {"type": "Complete", "status": "True", "lastTransitionTime": at,
             "reason": "CompletionsReached"}
        ]
    });
    shared.write("MODIFIED", key, job);
}

/// Writes `new` over the stored `old` as a write to `target` does: a write to the object keeps
/// the stored status (when the resource has a status subresource), a write to `status` keeps
/// all but the status; identity stays the stored one. An object being deleted whose last
/// finalizer is gone goes.
fn store_update(shared: &Shared, target: &Target, old: &Value, mut new: Value) -> HttpResponse {
    let name = target.name.clone().unwrap_or_default();
    if target.status {
        let status = new["status"].take();
        new = old.clone();
        new["status"] = status;
    } else if target.has_status() {
        new["status"] = old["status"].clone();
        if new["status"].is_null() {
            new.as_object_mut().map(|o| o.remove("status"));
        }
    }
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "name",
        "namespace",
    ] {
        if let Some(value) = old["metadata"].get(field) {
            new["metadata"][field] = value.clone();
        }
    }
    if !target.status && old.get("spec") != new.get("spec") {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    let finalizers_left = new["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let kind = if new["metadata"].get("deletionTimestamp").is_some() && !finalizers_left {
        "DELETED"
    } else {
        "MODIFIED"
    };
    answer(200, &shared.write(kind, target.key(&name), new))
}

fn current(shared: &Shared, target: &Target) -> Option<Value> {
    let name = target.name.as_deref().unwrap_or_default();
    shared
        .store
        .lock()
        .expect("store lock")
        .objects
        .get(&target.key(name))
        .cloned()
}

fn update(shared: &Shared, target: &Target, body: &[u8]) -> HttpResponse {
    let new = match parse_body(body) {
        Ok(new) => new,
        Err(message) => return failure(400, &message),
    };
    let name = target.name.clone().unwrap_or_default();
    let Some(old) = current(shared, target) else {
        return not_found(target, &name);
    };
    if let Some(version) = new["metadata"]["resourceVersion"].as_str()
        && Some(version) != old["metadata"]["resourceVersion"].as_str()
    {
        return failure(
            409,
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                target.plural
            ),
        );
    }
    store_update(shared, target, &old, new)
}

fn patch(shared: &Arc<Shared>, target: &Target, body: &[u8], content_type: &str) -> HttpResponse {
    let name = target.name.clone().unwrap_or_default();
    let patch = match parse_body(body) {
        Ok(patch) => patch,
        Err(message) => return failure(400, &message),
    };
    let apply = content_type.starts_with("application/apply-patch");
    let old = match current(shared, target) {
        Some(old) => old,
        None if apply && !target.status => {
            let mut object = patch;
            object["metadata"]["name"] = json!(name);
            return create(shared, target, &serde_json::to_vec(&object).expect("JSON"));
        }
        None => return not_found(target, &name),
    };
    let mut new = old.clone();
    if content_type.starts_with("application/json-patch") {
        // As the API server's JSON patch library does: a `test` for `null` holds where the
        // path is absent (a field the object omits because it is empty, such as finalizers).
        let patch = match patch {
            Value::Array(operations) => Value::Array(
                operations
                    .into_iter()
                    .filter(|op| {
                        !(op["op"] == "test"
                            && op["value"].is_null()
                            && op["path"]
                                .as_str()
                                .is_some_and(|p| new.pointer(p).is_none_or(Value::is_null)))
                    })
                    .collect(),
            ),
            other => other,
        };
        let operations: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(operations) => operations,
            Err(e) => return failure(400, &format!("not a JSON patch: {e}")),
        };
        if let Err(e) = json_patch::patch(&mut new, &operations) {
            return failure(422, &format!("the JSON patch does not apply: {e}"));
        }
    } else {
        json_patch::merge(&mut new, &patch);
    }
    store_update(shared, target, &old, new)
}

fn delete(shared: &Shared, target: &Target) -> HttpResponse {
    let name = target.name.clone().unwrap_or_default();
    let Some(mut old) = current(shared, target) else {
        return not_found(target, &name);
    };
    let held = old["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if held {
        if old["metadata"].get("deletionTimestamp").is_none() {
            old["metadata"]["deletionTimestamp"] = json!(now());
            old = shared.write("MODIFIED", target.key(&name), old);
        }
        return answer(200, &old);
    }
    answer(200, &shared.write("DELETED", target.key(&name), old))
}

/// A watch: the changes after `resourceVersion` (or the current objects as `ADDED`, from `0`
/// or none), then every new one, until `timeoutSeconds`.
fn watch_stream(
    shared: Arc<Shared>,
    target: Target,
    query: &BTreeMap<String, String>,
) -> HttpResponse {
    let selector = Selector::parse(
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    );
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let resource = target.resource();
    let namespace = target.namespace.clone();
    let wanted = move |key: &Key| {
        key.resource == resource && namespace.as_ref().is_none_or(|n| *n == key.namespace)
    };
    let mut rx = shared
        .version
        .as_ref()
        .expect("a version channel")
        .subscribe();
    // Marked seen before the store is read: any write after the read wakes the stream.
    rx.borrow_and_update();
    // The first chunk: the current objects, or the changes since `from`.
    let (first, seen) = {
        let store = shared.store.lock().expect("store lock");
        let mut lines = Vec::new();
        if from == 0 {
            for (key, object) in &store.objects {
                if wanted(key) && selector.matches(object) {
                    lines.push(json!({"type": "ADDED", "object": object}));
                }
            }
        } else if store
            .history
            .front()
            .is_some_and(|oldest| oldest.version > from + 1)
        {
            lines.push(json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from}"))}));
            return stream_lines(lines, None);
        }
        (lines, if from == 0 { store.version } else { from })
    };
    let changes = futures::stream::unfold(
        (shared, rx, selector, seen),
        move |(shared, mut rx, selector, mut seen)| {
            let wanted = wanted.clone();
            async move {
                loop {
                    let lines: Vec<Value> = {
                        let store = shared.store.lock().expect("store lock");
                        let start = store.history.partition_point(|c| c.version <= seen);
                        seen = store.version;
                        store
                            .history
                            .range(start..)
                            .filter(|c| wanted(&c.key) && selector.matches(&c.object))
                            .map(|c| json!({"type": c.kind, "object": c.object}))
                            .collect()
                    };
                    if !lines.is_empty() {
                        return Some((lines, (shared, rx, selector, seen)));
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return None },
                        _ = tokio::time::sleep_until(deadline) => return None,
                    }
                }
            }
        },
    );
    stream_lines(first, Some(Box::pin(changes)))
}

type Lines = std::pin::Pin<Box<dyn futures::Stream<Item = Vec<Value>>>>;

fn stream_lines(first: Vec<Value>, rest: Option<Lines>) -> HttpResponse {
    use futures::StreamExt;
    let encode = |lines: Vec<Value>| -> Result<web::Bytes, actix_web::Error> {
        let mut bytes = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut bytes, &line).expect("JSON serialises");
            bytes.push(b'\n');
        }
        Ok(web::Bytes::from(bytes))
    };
    let head = futures::stream::once(async move { first }).filter(|l| {
        let keep = !l.is_empty();
        async move { keep }
    });
    let body = match rest {
        Some(rest) => head.chain(rest).map(encode).boxed_local(),
        None => head.map(encode).boxed_local(),
    };
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_resource() {
        let t = Target::parse("/apis/batch/v1/namespaces/ns1/jobs/j1/status").unwrap();
        assert_eq!(
            (
                t.resource().as_str(),
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.status
            ),
            ("batch/v1/jobs", Some("ns1"), Some("j1"), true)
        );
        let t = Target::parse("/api/v1/pods").unwrap();
        assert_eq!(
            (t.resource().as_str(), t.namespace, t.name),
            ("v1/pods", None, None)
        );
        let t = Target::parse("/api/v1/namespaces/jobico-system").unwrap();
        assert_eq!(
            (t.resource().as_str(), t.name.as_deref()),
            ("v1/namespaces", Some("jobico-system"))
        );
        assert!(Target::parse("/apis/batch/v1/namespaces/a/jobs/b/scale").is_none());
        let t = Target::parse("/api/v1/namespaces/a/pods/p/log").unwrap();
        assert_eq!(
            (t.name.as_deref(), t.action.as_deref()),
            (Some("p"), Some("log"))
        );
        assert!(Target::parse("/healthz").is_none());
    }

    #[test]
    fn selectors_match_labels_and_fields() {
        let object = json!({"metadata": {"name": "a", "namespace": "n", "labels": {"x": "1"}}});
        assert!(Selector::parse(Some("x=1"), None).matches(&object));
        assert!(Selector::parse(Some("x"), Some("metadata.name=a")).matches(&object));
        assert!(!Selector::parse(Some("x!=1"), None).matches(&object));
        assert!(!Selector::parse(Some("!x"), None).matches(&object));
        assert!(!Selector::parse(None, Some("metadata.namespace=m")).matches(&object));
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_second() {
        let at = now();
        assert_eq!(at.len(), "2026-12-02T00:00:00Z".len(), "{at}");
        assert!(at.parse::<jiff::Timestamp>().is_ok(), "{at}");
    }
}
