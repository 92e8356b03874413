//! Turning a request body into events.
//!
//! A body is either one JSON event or a JobicoK8S batch `{"data": [e1, e2, ...]}`: an object
//! whose only member is an array named `data`. Anything else, including an object with `data`
//! beside other members, is a single event.
//!
//! CloudEvents over HTTP (spec 1.0) are read in all three modes: binary (`ce-*` headers, the
//! body is the data), structured (`application/cloudevents+json`) and batch
//! (`application/cloudevents-batch+json`). The event id is derived from the CloudEvents
//! `source` and `id` together unless an `Idempotency-Key` is given; `id`, `source`, `type` and every other attribute except `data`
//! are kept as the event's attributes.

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
    /// One CloudEvent in structured mode.
    CloudEvent,
    /// A CloudEvents batch.
    CloudEventBatch,
}

/// Content type of a structured CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";
/// Content type of a CloudEvents batch.
pub const CLOUDEVENTS_BATCH_JSON: &str = "application/cloudevents-batch+json";
/// The only CloudEvents version we read.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
/// Attributes every CloudEvent must carry besides `specversion`.
const CLOUDEVENTS_REQUIRED: [&str; 3] = ["id", "source", "type"];

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
        CLOUDEVENTS_JSON => Ok(BodyKind::CloudEvent),
        CLOUDEVENTS_BATCH_JSON => Ok(BodyKind::CloudEventBatch),
        ""
        | "application/json"
        | "text/json"
        | "text/plain"
        | "application/x-www-form-urlencoded" => Ok(BodyKind::Json),
        other if other.starts_with("application/") && other.ends_with("+json") => {
            Ok(BodyKind::Json)
        }
        _ => Err(ApiError::UnsupportedMediaType(raw.to_string())),
    }
}

/// Parses a JSON body into events. `key` is the request's `Idempotency-Key`: a single event
/// takes it as its id ([`EventId::from_client_key`]); item `i` of a batch takes
/// [`EventId::batch_item`] (derived from the key and `i`).
pub fn parse_json(body: &[u8], key: Option<&str>) -> Result<Vec<Incoming>, ApiError> {
    let value = parse_value(body)?;
    let mut events = match value {
        Value::Object(mut map)
            if map.len() == 1 && map.get("data").is_some_and(Value::is_array) =>
        {
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
                        e.id = Some(EventId::batch_item(key, i));
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

fn parse_value(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "request body is empty; send a JSON event".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))
}

/// Whether `name` is a CloudEvents attribute name: lowercase ASCII letters and digits (spec 1.0,
/// "Attribute Naming Convention").
fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_attributes(attributes: &BTreeMap<String, String>, at: &str) -> Result<(), ApiError> {
    if let Some(bad) = attributes.keys().find(|name| !is_attribute_name(name)) {
        return Err(ApiError::BadRequest(format!(
            "{at}: {bad:?} is not a CloudEvents attribute name (lowercase letters a-z and digits only)"
        )));
    }
    match attributes.get("specversion").map(String::as_str) {
        Some(CLOUDEVENTS_SPEC_VERSION) => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "{at}: CloudEvents specversion {other:?} is not supported; use \"1.0\""
            )));
        }
        None => {
            return Err(ApiError::BadRequest(format!(
                "{at}: CloudEvents attribute \"specversion\" is missing"
            )));
        }
    }
    let missing: Vec<_> = CLOUDEVENTS_REQUIRED
        .iter()
        .filter(|a| attributes.get(**a).is_none_or(String::is_empty))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{at}: CloudEvents attribute(s) {missing:?} missing or empty"
        )));
    }
    Ok(())
}

/// The id of a CloudEvent: `given` (from the idempotency key) when there is one, else the
/// id derived from its `source` and `id` attributes, which CloudEvents makes unique together.
fn cloud_event_id(
    attributes: &BTreeMap<String, String>,
    given: Option<EventId>,
) -> Option<EventId> {
    given.or_else(|| {
        let source = attributes.get("source")?;
        let id = attributes.get("id")?;
        Some(EventId::from_cloud_event(source, id))
    })
}

/// Reads a CloudEvent in binary mode: `headers` are the request's `ce-*` headers with the prefix
/// removed (lowercase names), the body is the event data (JSON).
pub fn parse_binary_cloud_event(
    headers: BTreeMap<String, String>,
    body: &[u8],
    key: Option<&str>,
) -> Result<Vec<Incoming>, ApiError> {
    check_attributes(&headers, "binary-mode CloudEvent")?;
    let data = parse_value(body)?;
    Ok(vec![Incoming {
        data,
        id: cloud_event_id(&headers, key.map(EventId::from_client_key)),
        attributes: headers,
    }])
}

fn structured(value: Value, at: &str, given: Option<EventId>) -> Result<Incoming, ApiError> {
    let Value::Object(map) = value else {
        return Err(ApiError::BadRequest(format!(
            "{at}: a CloudEvent must be a JSON object"
        )));
    };
    let mut data = None;
    let mut attributes = BTreeMap::new();
    for (name, value) in map {
        match (name.as_str(), value) {
            ("data", value) => data = Some(value),
            ("data_base64", _) => {
                return Err(ApiError::BadRequest(format!(
                    "{at}: data_base64 is not supported; event data must be JSON"
                )));
            }
            (_, Value::String(text)) => {
                attributes.insert(name, text);
            }
            (_, Value::Null) => {}
            (_, other) => {
                attributes.insert(name, other.to_string());
            }
        }
    }
    check_attributes(&attributes, at)?;
    if let Some(content_type) = attributes.get("datacontenttype")
        && !matches!(body_kind(Some(content_type)), Ok(BodyKind::Json))
    {
        return Err(ApiError::UnsupportedMediaType(content_type.clone()));
    }
    Ok(Incoming {
        data: data.unwrap_or(Value::Null),
        id: cloud_event_id(&attributes, given),
        attributes,
    })
}

/// Reads one CloudEvent in structured mode.
pub fn parse_structured_cloud_event(
    body: &[u8],
    key: Option<&str>,
) -> Result<Vec<Incoming>, ApiError> {
    let given = key.map(EventId::from_client_key);
    Ok(vec![structured(parse_value(body)?, "CloudEvent", given)?])
}

/// Reads a CloudEvents batch. Each event's id comes from its own `source` and `id`; an
/// idempotency key `k` gives item `i` the id [`EventId::batch_item`], as for JobicoK8S batches.
pub fn parse_cloud_event_batch(body: &[u8], key: Option<&str>) -> Result<Vec<Incoming>, ApiError> {
    let Value::Array(items) = parse_value(body)? else {
        return Err(ApiError::BadRequest(
            "a CloudEvents batch must be a JSON array".into(),
        ));
    };
    if items.is_empty() {
        return Err(ApiError::BadRequest("CloudEvents batch is empty".into()));
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::BadRequest(format!(
            "batch has {} events, more than the {MAX_EVENTS_PER_REQUEST} allowed",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let given = key.map(|k| EventId::batch_item(k, i));
            structured(item, &format!("batch item {i}"), given)
        })
        .collect()
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
        for bad in [
            "application/xml",
            "image/png",
            "multipart/form-data; boundary=x",
        ] {
            assert!(
                matches!(body_kind(Some(bad)), Err(ApiError::UnsupportedMediaType(_))),
                "{bad}"
            );
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
        assert_eq!(
            parse_json(br#"{"data":5}"#, None).unwrap()[0].data,
            json!({"data":5})
        );
        assert_eq!(parse_json(b"[1,2]", None).unwrap()[0].data, json!([1, 2]));
    }

    #[test]
    fn idempotency_keys_become_ids() {
        let one = parse_json(b"{}", Some("order-1")).unwrap();
        assert_eq!(one[0].id.as_ref().unwrap().as_str(), "order-1");
        let batch = parse_json(br#"{"data":[1,2]}"#, Some("b")).unwrap();
        let ids: Vec<_> = batch
            .iter()
            .map(|e| e.id.clone().unwrap().to_string())
            .collect();
        assert_eq!(
            ids,
            [
                EventId::batch_item("b", 0).to_string(),
                EventId::batch_item("b", 1).to_string()
            ]
        );
    }

    #[test]
    fn cloud_events_in_three_modes() {
        let attrs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let binary = parse_binary_cloud_event(
            attrs(&[
                ("specversion", "1.0"),
                ("id", "ce-1"),
                ("source", "/s"),
                ("type", "t"),
            ]),
            br#"{"a":1}"#,
            None,
        )
        .unwrap();
        assert_eq!(binary[0].id, Some(EventId::from_cloud_event("/s", "ce-1")));
        assert_eq!(binary[0].data, json!({"a":1}));
        assert_eq!(binary[0].attributes["source"], "/s");

        let one =
            br#"{"specversion":"1.0","id":"x/1","source":"/s","type":"t","data":{"a":2},"ext":5}"#;
        let structured = parse_structured_cloud_event(one, None).unwrap();
        assert_eq!(structured[0].data, json!({"a":2}));
        assert_eq!(
            structured[0].id,
            Some(EventId::from_cloud_event("/s", "x/1"))
        );
        assert_eq!(structured[0].attributes["ext"], "5");
        assert!(!structured[0].attributes.contains_key("data"));
        // An idempotency key wins over the CloudEvents id.
        assert_eq!(
            parse_structured_cloud_event(one, Some("k")).unwrap()[0]
                .id
                .as_ref()
                .unwrap()
                .as_str(),
            "k"
        );

        let batch = format!(
            "[{},{}]",
            std::str::from_utf8(one).unwrap(),
            std::str::from_utf8(one).unwrap().replace("x/1", "y")
        );
        let items = parse_cloud_event_batch(batch.as_bytes(), None).unwrap();
        assert_eq!(items[1].id, Some(EventId::from_cloud_event("/s", "y")));
        assert_eq!(
            body_kind(Some("application/cloudevents-batch+json; charset=utf-8")).unwrap(),
            BodyKind::CloudEventBatch
        );
        assert_eq!(
            body_kind(Some("application/cloudevents+json")).unwrap(),
            BodyKind::CloudEvent
        );
    }

    #[test]
    fn malformed_cloud_events_are_bad_requests() {
        let cases: &[&[u8]] = &[
            br#"{"id":"1","source":"/s","type":"t"}"#,
            br#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
            br#"{"specversion":"1.0","source":"/s","type":"t"}"#,
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AA=="}"#,
            b"[1]",
        ];
        for body in cases {
            assert!(
                matches!(
                    parse_structured_cloud_event(body, None),
                    Err(ApiError::BadRequest(_))
                ),
                "{body:?}"
            );
        }
        assert!(parse_cloud_event_batch(b"[]", None).is_err());
        assert!(parse_cloud_event_batch(b"{}", None).is_err());
        for bad_name in ["Ext", "my_ext", "my-ext", ""] {
            let body = format!(
                r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","{bad_name}":"x"}}"#
            );
            let error = parse_structured_cloud_event(body.as_bytes(), None).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("not a CloudEvents attribute name"),
                "{error}"
            );
        }
        let xml = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"application/xml"}"#;
        assert!(matches!(
            parse_structured_cloud_event(xml, None),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for body in [&b""[..], b"   ", b"{", b"{\"a\":}", br#"{"data":[]}"#] {
            assert!(
                matches!(parse_json(body, None), Err(ApiError::BadRequest(_))),
                "{body:?}"
            );
        }
        let err = parse_json(b"{\"a\": tru}", None).unwrap_err().to_string();
        assert!(err.contains("line 1 column"), "{err}");
        let too_many = format!("{{\"data\":[{}0]}}", "0,".repeat(MAX_EVENTS_PER_REQUEST));
        assert!(parse_json(too_many.as_bytes(), None).is_err());
    }
}
