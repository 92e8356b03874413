//! Routes of the public HTTP API.
//!
//! `PUT|POST /execute/{namespace}/{event}`: validate every event of the body against the event's
//! schema, keep them all through the [`Publisher`], answer `202 {"ids": [...]}`.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use jobico_common::{EventId, EventRecord};
use serde::Serialize;

use crate::body::{self, BodyKind, Incoming};
use crate::catalog::{Catalog, Lookup};
use crate::error::ApiError;
use crate::publish::{PublishError, Publisher};

/// Default limit on a request body: ample for JSON events, far below Kubernetes' object size.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// Header a client sets to make retries of a request safe.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The declared events.
    pub catalog: Arc<Catalog>,
    /// Where accepted events go.
    pub publisher: Arc<dyn Publisher>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
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

/// Registers the routes; `App::new().configure(configure(state))`.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(state)
            .service(
                web::resource("/execute/{namespace}/{event}")
                    .route(web::put().to(execute))
                    .route(web::post().to(execute))
                    .default_service(web::to(|req: HttpRequest| async move {
                        Err::<HttpResponse, _>(ApiError::MethodNotAllowed {
                            method: req.method().to_string(),
                            allowed: "PUT, POST",
                        })
                    })),
            )
            .default_service(web::to(|req: HttpRequest| async move {
                Err::<HttpResponse, _>(ApiError::NoRoute(req.path().to_string()))
            }));
    }
}

async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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

#[tracing::instrument(level = "debug", skip_all, fields(namespace = %path.0, event = %path.1))]
async fn execute(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (namespace, event) = path.into_inner();
    let entry = match state.catalog.lookup(&namespace, &event) {
        Lookup::Found(entry) => entry,
        Lookup::UnknownNamespace => return Err(ApiError::UnknownNamespace { namespace }),
        Lookup::UnknownEvent => return Err(ApiError::UnknownEvent { namespace, event }),
    };
    let schema = entry.schema.as_ref().map_err(|reason| ApiError::EventUnavailable {
        namespace: namespace.clone(),
        event: event.clone(),
        reason: reason.clone(),
    })?;
    let kind = body::body_kind(header_str(&req, header::CONTENT_TYPE.as_str())?)?;
    let bytes = read_body(&req, payload, state.max_body_bytes).await?;
    let key = header_str(&req, IDEMPOTENCY_KEY)?;
    let incoming: Vec<Incoming> = match kind {
        BodyKind::Json => body::parse_json(&bytes, key)?,
    };

    // All or nothing: every item is validated before anything is kept.
    let violations: Vec<_> = incoming
        .iter()
        .enumerate()
        .flat_map(|(item, e)| schema.violations(item, &e.data))
        .collect();
    if !violations.is_empty() {
        tracing::debug!(violations = violations.len(), "events rejected");
        return Err(ApiError::Invalid(violations));
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
    let published = state.publisher.publish(records).await.map_err(|e| match e {
        PublishError::Unavailable {
            reason,
            retry_after,
        } => ApiError::Unavailable {
            reason,
            retry_after,
        },
    })?;
    let duplicate = published.iter().all(|p| p.duplicate);
    let ids = published.into_iter().map(|p| p.id).collect();
    Ok(HttpResponse::Accepted().json(AcceptedBody { ids, duplicate }))
}
