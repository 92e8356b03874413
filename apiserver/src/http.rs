//! Routes of the public HTTP API.
//!
//! - `PUT|POST /execute/{namespace}/{event}`: validate every event of the body against the
//!   event's schema, keep them all through the [`Publisher`], answer `202 {"ids": [...]}`.
//! - `GET /events/{namespace}/{event}/{id}`: the recorded state of one event.
//! - `GET /events/{namespace}/{id}`: the same, for whichever event type has the id (`409`
//!   naming the types when several have it).
//!
//! The routes are listed in [`ROUTES`]; `apiserver/openapi.yaml` documents the same set (a test
//! checks that they agree).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use futures::StreamExt;
use jobico_common::envelope::{MAX_DATA_DEPTH, data_depth};
use jobico_common::{EventId, EventRecord};
use serde::Serialize;

use crate::auth::{Access, Auth};
use crate::body::{self, BodyKind, Incoming};
use crate::catalog::{Catalog, Lookup};
use crate::error::ApiError;
use crate::message;
use crate::metrics::Metrics;
use crate::publish::{PublishError, PublishFailure, Publisher, StatusLookup};
use crate::schema::Violations;
use actix_web::http::StatusCode;

/// Default limit on a request body: ample for JSON events, far below Kubernetes' object size.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// Default time a client has to send the whole body once the request head arrived: 256 KiB
/// in ten seconds is 26 KB/s, slower than any real client; a slower one only holds a
/// connection and a buffer.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes reserved for a body before any arrive. The declared `Content-Length` is never used to
/// allocate: a client can declare the limit and send nothing, on thousands of connections at
/// once. The buffer grows with what arrives (at most twice that), never past the limit.
const INITIAL_BODY_CAPACITY: usize = 8 * 1024;

/// Header a client sets to make retries of a request safe.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Prefix of CloudEvents attribute headers in binary mode.
pub const CLOUDEVENTS_HEADER_PREFIX: &str = "ce-";

/// Event attribute holding the W3C trace context, filled from the request's `traceparent`
/// header when the event has none.
pub use crate::message::TRACEPARENT_ATTRIBUTE;

/// Route of event submission.
pub const EXECUTE_ROUTE: &str = "/execute/{namespace}/{event}";
/// Route of status reads by id (of whichever event type has it).
pub const EVENTS_ROUTE: &str = "/events/{namespace}/{id}";
/// Route of status reads of one event type's event.
pub const EVENT_STATUS_ROUTE: &str = "/events/{namespace}/{event}/{id}";
/// Route of module uploads for a Job resource (modules above a ConfigMap's 1 MiB).
pub const MODULES_ROUTE: &str = "/modules/{namespace}/{job}";
/// Route of executors' outcomes of events with routes (cluster chaining).
pub const RESULTS_ROUTE: &str = "/results/{namespace}/{event}";
/// Largest results post: a batch's outcomes, each result at most
/// [`jobico_common::chain::MAX_RESULT_BYTES`], plus room for the rest of each outcome.
pub const MAX_RESULTS_BODY_BYTES: usize =
    jobico_model::crd::MAX_BATCH_EVENTS as usize * (jobico_common::chain::MAX_RESULT_BYTES + 8192);
/// Metrics label of requests matching no route.
const OTHER_ROUTE: &str = "other";

/// Every route with its methods, as documented in `openapi.yaml`.
pub const ROUTES: &[(&str, &[&str])] = &[
    (EXECUTE_ROUTE, &["PUT", "POST"]),
    (EVENTS_ROUTE, &["GET"]),
    (EVENT_STATUS_ROUTE, &["GET"]),
    (MODULES_ROUTE, &["PUT"]),
    (RESULTS_ROUTE, &["POST"]),
];

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The declared events.
    pub catalog: Arc<Catalog>,
    /// Where accepted events go.
    pub publisher: Arc<dyn Publisher>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest a client may take to send a body (408 beyond).
    pub body_timeout: Duration,
    /// Who may send events.
    pub auth: Arc<Auth>,
    /// Request metrics.
    pub metrics: Metrics,
    /// Whether events are checked against their schema; off only to measure the HTTP ceiling.
    pub validate: bool,
    /// Whether the catalog reflects the watched resources yet (always true for files).
    pub catalog_synced: Arc<AtomicBool>,
    /// Module uploads read at once (each holds up to 64 MiB in memory).
    pub module_uploads: Arc<tokio::sync::Semaphore>,
    /// The key results tokens are checked with; `None`: no results are taken.
    pub results_key: Option<Arc<Vec<u8>>>,
}

/// Module uploads an ingress reads at once: 4 × 64 MiB bounds their memory; more wait for
/// none, they are answered 503 with `Retry-After`.
pub const MODULE_UPLOAD_SLOTS: usize = 4;

/// The upload slots of a new [`AppState`].
pub fn module_upload_slots() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(MODULE_UPLOAD_SLOTS))
}

impl AppState {
    /// State for local mode: auth off, validation on, the catalog complete.
    pub fn new(
        catalog: Arc<Catalog>,
        publisher: Arc<dyn Publisher>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            catalog,
            publisher,
            max_body_bytes,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            auth: Arc::new(Auth::Off),
            metrics: Metrics::new(),
            validate: true,
            catalog_synced: Arc::new(AtomicBool::new(true)),
            module_uploads: module_upload_slots(),
            results_key: None,
        }
    }

    /// Whether the server can take events: the publisher is connected and the catalog synced.
    pub fn is_ready(&self) -> bool {
        self.publisher.is_ready() && self.catalog_synced.load(Ordering::Acquire)
    }
}

/// Body of a 202 answer.
#[derive(Debug, Serialize)]
pub struct AcceptedBody {
    /// Ids of the accepted events, in request order.
    pub ids: Vec<EventId>,
    /// Present and true when every event had been accepted before (a retried request).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

fn method_not_allowed(route: &'static str, allowed: &'static str) -> actix_web::Route {
    web::to(
        move |req: HttpRequest, state: web::Data<AppState>| async move {
            let error = ApiError::MethodNotAllowed {
                method: req.method().to_string(),
                allowed,
            };
            respond(&state, route, Err(error))
        },
    )
}

/// Registers the routes; `App::new().configure(configure(state))`.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(state)
            .service(
                web::resource(EXECUTE_ROUTE)
                    .route(web::put().to(execute))
                    .route(web::post().to(execute))
                    .default_service(method_not_allowed(EXECUTE_ROUTE, "PUT, POST")),
            )
            .service(
                web::resource(EVENTS_ROUTE)
                    .route(web::get().to(event_status))
                    .default_service(method_not_allowed(EVENTS_ROUTE, "GET")),
            )
            .service(
                web::resource(EVENT_STATUS_ROUTE)
                    .route(web::get().to(typed_event_status))
                    .default_service(method_not_allowed(EVENT_STATUS_ROUTE, "GET")),
            )
            .service(
                web::resource(MODULES_ROUTE)
                    .route(web::put().to(upload_module))
                    .default_service(method_not_allowed(MODULES_ROUTE, "PUT")),
            )
            .service(
                web::resource(RESULTS_ROUTE)
                    .route(web::post().to(results))
                    .default_service(method_not_allowed(RESULTS_ROUTE, "POST")),
            )
            .default_service(web::to(
                |req: HttpRequest, state: web::Data<AppState>| async move {
                    respond(
                        &state,
                        OTHER_ROUTE,
                        Err(ApiError::NoRoute(req.path().to_string())),
                    )
                },
            ));
    }
}

/// Turns a handler's result into the response and counts it.
fn respond(
    state: &AppState,
    route: &'static str,
    result: Result<HttpResponse, ApiError>,
) -> HttpResponse {
    let response = result.unwrap_or_else(|error| error.error_response());
    state
        .metrics
        .observe_request(route, response.status().as_u16());
    response
}

/// Counts a request as in flight while alive.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Reads the body, at most `limit` bytes, within `timeout`.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<web::BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let read = async {
        let mut body = web::BytesMut::with_capacity(
            declared
                .unwrap_or(INITIAL_BODY_CAPACITY)
                .min(INITIAL_BODY_CAPACITY),
        );
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::BodyTimeout { timeout })?
}

/// Checks that the request's bearer token may do the `access` (built only when auth is on).
async fn authorize(
    req: &HttpRequest,
    state: &AppState,
    access: impl FnOnce() -> Access,
) -> Result<(), ApiError> {
    if !state.auth.is_on() {
        return Ok(());
    }
    let authorization = header_str(req, header::AUTHORIZATION.as_str())?;
    // Boxed: the Kubernetes check is a large future, and unboxed it would enlarge every
    // request's future, auth on or off.
    Box::pin(state.auth.check(authorization, &access())).await
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, ApiError> {
    req.headers()
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest(format!("header {name} is not visible ASCII")))
        })
        .transpose()
}

/// The request's CloudEvents headers (`ce-*`, prefix removed), or `None` when it has no
/// `ce-specversion` (not a binary-mode CloudEvent).
fn cloud_event_headers(req: &HttpRequest) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    if !req.headers().contains_key("ce-specversion") {
        return Ok(None);
    }
    let mut attributes = BTreeMap::new();
    for (name, value) in req.headers() {
        if let Some(attribute) = name.as_str().strip_prefix(CLOUDEVENTS_HEADER_PREFIX) {
            let value = value
                .to_str()
                .map_err(|_| ApiError::BadRequest(format!("header {name} is not visible ASCII")))?;
            attributes.insert(attribute.to_string(), value.to_string());
        }
    }
    Ok(Some(attributes))
}

fn unavailable(error: PublishError) -> ApiError {
    match error {
        PublishError::Unavailable {
            reason,
            retry_after,
        } => ApiError::Unavailable {
            reason,
            retry_after,
        },
    }
}

/// A failed publish: 503 with every event's id and whether it is known to be kept.
fn not_kept(failure: PublishFailure) -> ApiError {
    let PublishError::Unavailable {
        reason,
        retry_after,
    } = failure.error;
    ApiError::NotKept {
        reason,
        retry_after,
        events: failure.events,
    }
}

/// The WebAssembly binary format's preamble: `\0asm` and version 1.
const WASM_PREAMBLE: &[u8] = b"\0asm\x01\0\0\0";

async fn upload_module(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state.metrics);
    let (namespace, job) = path.into_inner();
    let result = keep_module(&req, &namespace, &job, payload, &state).await;
    respond(&state, MODULES_ROUTE, result)
}

/// Body of a module upload's answer.
#[derive(Debug, Serialize)]
struct ModuleBody {
    /// What a resource's `wasm` names it by: `sha256:<digest>`.
    wasm: String,
    /// Its size.
    bytes: usize,
    /// True when it had been uploaded before (nothing new was kept).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    existed: bool,
}

/// Checks and keeps an uploaded module: authorised as a change of Job resource `job`, at most
/// [`jobico_store::modules::MAX_MODULE_BYTES`], a WebAssembly binary (the dispatcher compiles
/// it before any event runs and says on the resource if it cannot). 201 with its reference, or
/// 200 when it was there already.
async fn keep_module(
    req: &HttpRequest,
    namespace: &str,
    job: &str,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    if !is_kubernetes_name(namespace, 63) || !is_kubernetes_name(job, 253) {
        return Err(ApiError::BadRequest(format!(
            "{namespace:?}/{job:?} is not a namespace and a Job resource name (lowercase letters, digits, '-' and '.')"
        )));
    }
    authorize(req, state, || Access::upload_module(namespace, job)).await?;
    let Ok(_slot) = state.module_uploads.try_acquire() else {
        return Err(ApiError::Unavailable {
            reason: format!(
                "{MODULE_UPLOAD_SLOTS} module uploads are being received already; retry shortly"
            ),
            retry_after: Duration::from_secs(1),
        });
    };
    let module = read_body(
        req,
        payload,
        jobico_store::modules::MAX_MODULE_BYTES,
        state.body_timeout,
    )
    .await?;
    if !module.starts_with(WASM_PREAMBLE) {
        return Err(ApiError::NotAModule(
            "the body must be a binary module starting with \\0asm and version 1 (compile .wat first: jobico wat2wasm)".into(),
        ));
    }
    let stored = state
        .publisher
        .store_module(namespace, &module)
        .await
        .map_err(unavailable)?
        .ok_or(ApiError::ModulesNotStored)?;
    let status = if stored.existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(HttpResponse::build(status).json(ModuleBody {
        wasm: format!("{}{}", jobico_model::UPLOADED_MODULE_PREFIX, stored.digest),
        bytes: module.len(),
        existed: stored.existed,
    }))
}

/// A Kubernetes object name of at most `max` characters: lowercase letters, digits, '-' and
/// '.', starting and ending with a letter or digit (namespaces, at most 63, have no '.', which
/// the store's object names rely on).
fn is_kubernetes_name(name: &str, max: usize) -> bool {
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    (1..=max).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| alphanumeric(b) || b == b'-' || (b == b'.' && max > 63))
        && alphanumeric(bytes[0])
        && alphanumeric(bytes[bytes.len() - 1])
}

async fn execute(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state.metrics);
    let (namespace, event) = path.into_inner();
    let result = accept(&req, namespace, event, payload, &state).await;
    respond(&state, EXECUTE_ROUTE, result)
}

#[tracing::instrument(level = "debug", skip_all, fields(namespace = %namespace, event = %event))]
async fn accept(
    req: &HttpRequest,
    namespace: String,
    event: String,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let lookup = state.catalog.lookup(&namespace, &event);
    authorize(req, state, || {
        let job = match &lookup {
            Lookup::Found(entry) => Some(entry.job.as_str()),
            _ => None,
        };
        Access::execute(&namespace, job)
    })
    .await?;
    let entry = match lookup {
        Lookup::Found(entry) => entry,
        Lookup::UnknownNamespace => return Err(ApiError::UnknownNamespace { namespace }),
        Lookup::UnknownEvent => return Err(ApiError::UnknownEvent { namespace, event }),
    };
    let schema = entry
        .schema
        .as_ref()
        .map_err(|reason| ApiError::EventUnavailable {
            namespace: namespace.clone(),
            event: event.clone(),
            reason: reason.clone(),
        })?;
    let binary = cloud_event_headers(req)?;
    let kind = body::body_kind(header_str(req, header::CONTENT_TYPE.as_str())?)?;
    let bytes = read_body(req, payload, state.max_body_bytes, state.body_timeout).await?;
    let key = header_str(req, IDEMPOTENCY_KEY)?;
    let mut incoming: Vec<Incoming> = match (binary, kind) {
        (Some(attributes), BodyKind::Json) => {
            body::parse_binary_cloud_event(attributes, &bytes, key)?
        }
        (Some(_), _) => {
            return Err(ApiError::BadRequest(
                "ce-* headers (binary mode) with a CloudEvents content type: use one mode".into(),
            ));
        }
        (None, BodyKind::Json) => body::parse_json(&bytes, key)?,
        (None, BodyKind::CloudEvent) => body::parse_structured_cloud_event(&bytes, key)?,
        (None, BodyKind::CloudEventBatch) => body::parse_cloud_event_batch(&bytes, key)?,
    };

    // Data nested deeper than the dispatcher and the executor can re-wrap would be accepted
    // and never run: refused in every body mode.
    if let Some(item) = incoming
        .iter()
        .position(|e| data_depth(&e.data) > MAX_DATA_DEPTH)
    {
        return Err(ApiError::BadRequest(format!(
            "item {item}: event data is nested deeper than {MAX_DATA_DEPTH} levels"
        )));
    }

    // All or nothing: every item is validated before anything is kept.
    if state.validate {
        let mut report = Violations::default();
        for (item, e) in incoming.iter().enumerate() {
            schema.check(item, &e.data, &mut report);
        }
        if !report.is_empty() {
            state.metrics.validation_failures.inc();
            tracing::debug!(violations = report.total, "events rejected");
            return Err(ApiError::Invalid(report));
        }
    }

    if let Some(traceparent) = header_str(req, TRACEPARENT_ATTRIBUTE)? {
        message::check_traceparent(traceparent)
            .map_err(|e| ApiError::BadRequest(format!("header {TRACEPARENT_ATTRIBUTE}: {e}")))?;
        for e in &mut incoming {
            e.attributes
                .entry(TRACEPARENT_ATTRIBUTE.to_string())
                .or_insert_with(|| traceparent.to_string());
        }
    }
    let records: Vec<EventRecord> = incoming
        .into_iter()
        .map(|e| EventRecord {
            id: e.id.unwrap_or_else(EventId::generate),
            namespace: namespace.clone(),
            event: event.clone(),
            data: e.data,
            attributes: e.attributes,
        })
        .collect();
    // Every event can become a message, before any is published: whatever the body mode, a
    // request is refused whole rather than stored in part.
    for (item, record) in records.iter().enumerate() {
        message::check(record).map_err(|e| ApiError::BadRequest(format!("item {item}: {e}")))?;
    }
    let published = state.publisher.publish(records).await.map_err(not_kept)?;
    let duplicate = published.iter().all(|p| p.duplicate);
    let ids = published.into_iter().map(|p| p.id).collect();
    Ok(HttpResponse::Accepted().json(AcceptedBody { ids, duplicate }))
}

async fn results(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state.metrics);
    let (namespace, event) = path.into_inner();
    let result = follow_results(&req, namespace, event, payload, &state).await;
    respond(&state, RESULTS_ROUTE, result)
}

/// What the routes of one posted outcome did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RoutedBody {
    id: String,
    children: Vec<jobico_common::EventLink>,
    route_failures: Vec<jobico_common::RouteFailure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sink: Option<String>,
}

/// An executor's outcomes: the token (checked before the body is read) must be the
/// dispatcher's for exactly these ids; each outcome's routes are followed and the chain
/// recorded on its event (host failures follow none: their Job runs them again). Answers 503
/// when NATS cannot take it (the executor retries; nothing is published twice).
#[tracing::instrument(level = "debug", skip_all, fields(namespace = %namespace, event = %event))]
async fn follow_results(
    req: &HttpRequest,
    namespace: String,
    event: String,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    use jobico_common::chain::{RESULTS_BATCH_HEADER, ResultsReport, results_token_valid};
    let key = state
        .results_key
        .as_ref()
        .ok_or(ApiError::ResultsNotTaken)?;
    let token = header_str(req, header::AUTHORIZATION.as_str())?
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::Unauthorized("a results post needs its Job's bearer token".into())
        })?;
    let digest = header_str(req, RESULTS_BATCH_HEADER)?.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "header {RESULTS_BATCH_HEADER} (the batch digest) is missing"
        ))
    })?;
    if !results_token_valid(key, &namespace, &event, digest, token) {
        return Err(ApiError::Forbidden(format!(
            "the token is not the one for this batch of {namespace}/{event}"
        )));
    }
    let bytes = read_body(req, payload, MAX_RESULTS_BODY_BYTES, state.body_timeout).await?;
    let report: ResultsReport = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("not a results report: {e}")))?;
    let ids: Vec<&str> = report.outcomes.iter().map(|o| o.id.as_str()).collect();
    if jobico_common::summary::batch_digest(&ids) != digest {
        return Err(ApiError::Forbidden(
            "the outcomes are not those of the batch the token is for".into(),
        ));
    }
    let router = crate::chain::Router::new(state.catalog.clone(), state.publisher.clone());
    let mut answered = Vec::new();
    for outcome in &report.outcomes {
        let routed = router
            .follow(&namespace, &event, outcome)
            .await
            .map_err(unavailable)?;
        if routed.is_empty() {
            continue;
        }
        let mut links = jobico_store::status(
            &namespace,
            &event,
            &outcome.id,
            jobico_common::EventState::Accepted,
        );
        routed.record_on(&mut links);
        state.publisher.link(&links).await.map_err(unavailable)?;
        answered.push(RoutedBody {
            id: outcome.id.clone(),
            children: routed.children,
            route_failures: routed.failures,
            sink: routed.sink,
        });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "routed": answered })))
}

async fn event_status(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state.metrics);
    let (namespace, id) = path.into_inner();
    let result = status(&req, namespace, None, id, &state).await;
    respond(&state, EVENTS_ROUTE, result)
}

async fn typed_event_status(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let _in_flight = InFlight::new(&state.metrics);
    let (namespace, event, id) = path.into_inner();
    let result = status(&req, namespace, Some(event), id, &state).await;
    respond(&state, EVENT_STATUS_ROUTE, result)
}

#[tracing::instrument(level = "debug", skip_all, fields(namespace = %namespace, id = %id))]
async fn status(
    req: &HttpRequest,
    namespace: String,
    event: Option<String>,
    id: String,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    authorize(req, state, || Access::read_states(&namespace)).await?;
    if EventId::parse(id.as_str()).is_err() {
        return Err(ApiError::UnknownEventId { namespace, id });
    }
    match state
        .publisher
        .status(&namespace, event.as_deref(), &id)
        .await
        .map_err(unavailable)?
    {
        StatusLookup::Found(status) => Ok(HttpResponse::Ok().json(status)),
        StatusLookup::NotFound => Err(ApiError::UnknownEventId { namespace, id }),
        StatusLookup::Ambiguous(events) => Err(ApiError::AmbiguousEventId {
            namespace,
            id,
            events,
        }),
        StatusLookup::NotTracked => Err(ApiError::StatesNotTracked),
    }
}
