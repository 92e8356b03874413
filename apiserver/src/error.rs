//! The one error shape of the HTTP API.
//!
//! Every error is `{"error": "<sentence>"}` with the right status code; schema failures add
//! `"violations": [{"item", "instancePath", "keyword", "message"}]`, and an id several event
//! types share adds `"events": [...]`.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::publish::Outcome;
use crate::schema::{Violation, Violations};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not of the expected shape.
    #[error("{0}")]
    BadRequest(String),
    /// No route matches the path.
    #[error("no route for {0}")]
    NoRoute(String),
    /// The namespace declares no events.
    #[error("namespace {namespace:?} declares no events")]
    UnknownNamespace {
        /// The namespace asked for.
        namespace: String,
    },
    /// The namespace has no event of that name.
    #[error("namespace {namespace:?} has no event {event:?}")]
    UnknownEvent {
        /// The namespace asked for.
        namespace: String,
        /// The event asked for.
        event: String,
    },
    /// The route exists but not for this method.
    #[error("method {method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The methods allowed, comma separated.
        allowed: &'static str,
    },
    /// The body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client did not send the whole body in time.
    #[error("the request body did not arrive within {} ms; send it at once", .timeout.as_millis())]
    BodyTimeout {
        /// The time allowed.
        timeout: Duration,
    },
    /// The content type is not one we read.
    #[error("unsupported content type {0:?}; send application/json or CloudEvents")]
    UnsupportedMediaType(String),
    /// One or more events break their schema; nothing was accepted.
    #[error("{} violation(s) of the event schema; nothing was accepted{}", .0.total,
        if .0.listed.len() < .0.total { format!(" (the first {} are listed)", .0.listed.len()) } else { String::new() })]
    Invalid(Violations),
    /// The event exists but cannot accept anything (e.g. its schema does not compile).
    #[error("event {namespace}/{event} is unavailable: {reason}")]
    EventUnavailable {
        /// The namespace.
        namespace: String,
        /// The event.
        event: String,
        /// Why.
        reason: String,
    },
    /// No valid credentials.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Valid credentials without permission.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No event state under that id.
    #[error("no state recorded for event {id:?} in namespace {namespace:?}")]
    UnknownEventId {
        /// The namespace.
        namespace: String,
        /// The id asked for.
        id: String,
    },
    /// Asked by id alone, and events of several types have that id.
    #[error(
        "events of several types in namespace {namespace:?} have the id {id:?}: ask for one with /events/{namespace}/<event>/{id}"
    )]
    AmbiguousEventId {
        /// The namespace.
        namespace: String,
        /// The id asked for.
        id: String,
        /// The event types that have it.
        events: Vec<String>,
    },
    /// This server keeps no event states (local mode with the in-memory queue).
    #[error(
        "event states are not tracked here: local mode with the in-memory queue keeps none (run with NATS to track them)"
    )]
    StatesNotTracked,
    /// This server keeps no modules (local mode with the in-memory queue).
    #[error(
        "modules cannot be uploaded here: local mode with the in-memory queue has no module store (run with NATS)"
    )]
    ModulesNotStored,
    /// A results post to an ingress started without a results key.
    #[error(
        "this ingress takes no results: start it with --results-key-file (the key the dispatcher signs results tokens with)"
    )]
    ResultsNotTaken,
    /// An upload that is not a WebAssembly binary module.
    #[error("not a WebAssembly module: {0}")]
    NotAModule(String),
    /// Publishing failed part way: some events may be kept. The answer lists every event's id
    /// and whether it is known to be kept, so a retry can send each back as its key.
    #[error("cannot accept events now: {reason}; {} of {} event(s) are known to be kept, retry the others with their ids as Idempotency-Key", .events.iter().filter(|e| e.stored).count(), .events.len())]
    NotKept {
        /// Why.
        reason: String,
        /// When to retry.
        retry_after: Duration,
        /// Every event of the request, in order.
        events: Vec<Outcome>,
    },
    /// The event store is unreachable or full; retry later.
    #[error("cannot accept events now: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    violations: Option<&'a [Violation]>,
    /// Asked by an id several event types have: those types.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<&'a [String]>,
    /// How many violations there were in all (the list stops at a bound).
    #[serde(rename = "violationsTotal", skip_serializing_if = "Option::is_none")]
    violations_total: Option<usize>,
    /// After a failed publish: every event's id, in request order.
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<&'a str>>,
    /// After a failed publish: per id, whether the event is known to be kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    stored: Option<Vec<bool>>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NoRoute(_)
            | ApiError::UnknownNamespace { .. }
            | ApiError::UnknownEvent { .. }
            | ApiError::UnknownEventId { .. }
            | ApiError::StatesNotTracked
            | ApiError::ModulesNotStored
            | ApiError::ResultsNotTaken => StatusCode::NOT_FOUND,
            ApiError::AmbiguousEventId { .. } => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) | ApiError::NotAModule(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::EventUnavailable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable { .. } | ApiError::NotKept { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::MethodNotAllowed { allowed, .. } => {
                response.insert_header((header::ALLOW, HeaderValue::from_static(allowed)));
            }
            ApiError::Unavailable { retry_after, .. } | ApiError::NotKept { retry_after, .. } => {
                // Whole seconds, at least one: Retry-After has no finer unit.
                let seconds = retry_after.as_secs().max(1);
                response.insert_header((header::RETRY_AFTER, seconds.to_string()));
            }
            ApiError::Unauthorized(_) => {
                response
                    .insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            // The rest of the body may still be on its way: close rather than read it.
            ApiError::BodyTimeout { .. } | ApiError::TooLarge { .. } => {
                response.force_close();
            }
            _ => {}
        }
        let (violations, violations_total) = match self {
            ApiError::Invalid(report) => (Some(report.listed.as_slice()), Some(report.total)),
            _ => (None, None),
        };
        let (ids, stored) = match self {
            ApiError::NotKept { events, .. } => (
                Some(events.iter().map(|e| e.id.as_str()).collect()),
                Some(events.iter().map(|e| e.stored).collect()),
            ),
            _ => (None, None),
        };
        let events = match self {
            ApiError::AmbiguousEventId { events, .. } => Some(events.as_slice()),
            _ => None,
        };
        response.json(ErrorBody {
            error: self.to_string(),
            violations,
            events,
            violations_total,
            ids,
            stored,
        })
    }
}
