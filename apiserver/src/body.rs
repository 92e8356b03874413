//! Turning a request body into events.
//!
//! A body is either one JSON event or a JobicoK8S batch `{"data": [e1, e2, ...]}`: an object
//! whose only member is an array named `data`. Anything else, including an object with `data`
//! beside other members, is a single event.

use std::collections::BTreeMap;

use jobico_common::EventId;
use serde_json::Value;

use crate::error::ApiError;

/// Most events one request may carry. Each becomes one JetStream message; a bound keeps one
/// request's publish latency and memory predictable.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// An event read from a request, not yet validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The payload.
    pub data: Value,
    /// The id the client chose (Idempotency-Key or CloudEvents id), if any.
    pub id: Option<EventId>,
    /// Extra attributes (CloudEvents `source`, `type`, ...).
    pub attributes: BTreeMap<String, String>,
}

impl Incoming {
    fn plain(data: Value) -> Self {
        Self {
            data,
            id: None,
            attributes: BTreeMap::new(),
        }
    }
}

/// What kind of body a content type announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Plain JSON (one event or a JobicoK8S batch).
    Json,
}

/// Classifies a `Content-Type` header value. No header, JSON types, `text/plain` and
/// `application/x-www-form-urlencoded` (what `curl -d` sends by default) are read as JSON.
pub fn body_kind(content_type: Option<&str>) -> Result<BodyKind, ApiError> {
    let Some(raw) = content_type else {
        return Ok(BodyKind::Json);
    };
    let essence = raw
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "application/json" | "text/json" | "text/plain" | "application/x-www-form-urlencoded" => {
            Ok(BodyKind::Json)
        }
        other if other.starts_with("application/") && other.ends_with("+json") => {
            Ok(BodyKind::Json)
        }
        _ => Err(ApiError::UnsupportedMediaType(raw.to_string())),
    }
}

/// Parses a JSON body into events. `key` is the request's `Idempotency-Key`: a single event
/// takes it as its id; item `i` of a batch takes `<key>-<i>`.
pub fn parse_json(body: &[u8], key: Option<&str>) -> Result<Vec<Incoming>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("request body is empty; send a JSON event".into()));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    let mut events = match value {
        Value::Object(mut map) if map.len() == 1 && map.get("data").is_some_and(Value::is_array) => {
            let Some(Value::Array(items)) = map.remove("data") else {
                unreachable!("checked above")
            };
            if items.is_empty() {
                return Err(ApiError::BadRequest("batch \"data\" is empty".into()));
            }
            if items.len() > MAX_EVENTS_PER_REQUEST {
                return Err(ApiError::BadRequest(format!(
                    "batch has {} events, more than the {MAX_EVENTS_PER_REQUEST} allowed",
                    items.len()
                )));
            }
            let batch = items.into_iter().map(Incoming::plain).collect::<Vec<_>>();
            if let Some(key) = key {
                return Ok(batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut e)| {
                        e.id = Some(EventId::from_client_key(&format!("{key}-{i}")));
                        e
                    })
                    .collect());
            }
            batch
        }
        single => vec![Incoming::plain(single)],
    };
    if let (Some(key), [event]) = (key, events.as_mut_slice()) {
        event.id = Some(EventId::from_client_key(key));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        for ok in [
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("application/x-www-form-urlencoded"),
            Some("text/plain"),
            Some("application/vnd.acme+json"),
        ] {
            assert_eq!(body_kind(ok).unwrap(), BodyKind::Json, "{ok:?}");
        }
        for bad in ["application/xml", "image/png", "multipart/form-data; boundary=x"] {
            assert!(matches!(body_kind(Some(bad)), Err(ApiError::UnsupportedMediaType(_))), "{bad}");
        }
    }

    #[test]
    fn single_events_and_batches() {
        let one = parse_json(br#"{"firstName":"Ada"}"#, None).unwrap();
        assert_eq!(one, vec![Incoming::plain(json!({"firstName":"Ada"}))]);
        let batch = parse_json(br#"{"data":[{"a":1},{"a":2}]}"#, None).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1].data, json!({"a":2}));
        // `data` beside other members, or not an array: a single event.
        assert_eq!(parse_json(br#"{"data":[1],"x":1}"#, None).unwrap().len(), 1);
        assert_eq!(parse_json(br#"{"data":5}"#, None).unwrap()[0].data, json!({"data":5}));
        assert_eq!(parse_json(b"[1,2]", None).unwrap()[0].data, json!([1, 2]));
    }

    #[test]
    fn idempotency_keys_become_ids() {
        let one = parse_json(b"{}", Some("order-1")).unwrap();
        assert_eq!(one[0].id.as_ref().unwrap().as_str(), "order-1");
        let batch = parse_json(br#"{"data":[1,2]}"#, Some("b")).unwrap();
        let ids: Vec<_> = batch.iter().map(|e| e.id.clone().unwrap().to_string()).collect();
        assert_eq!(ids, ["b-0", "b-1"]);
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for body in [&b""[..], b"   ", b"{", b"{\"a\":}", br#"{"data":[]}"#] {
            assert!(matches!(parse_json(body, None), Err(ApiError::BadRequest(_))), "{body:?}");
        }
        let err = parse_json(b"{\"a\": tru}", None).unwrap_err().to_string();
        assert!(err.contains("line 1 column"), "{err}");
        let too_many = format!("{{\"data\":[{}0]}}", "0,".repeat(MAX_EVENTS_PER_REQUEST));
        assert!(parse_json(too_many.as_bytes(), None).is_err());
    }
}
