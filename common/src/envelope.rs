//! The event envelope.
//!
//! [`EventRecord`] is what the ingress publishes (one JetStream message per event, JSON body).
//! [`ExecEvent`] is what the executor consumes: the JSON array in a pod's `JOBICO_EVENTS`
//! variable, a file or stdin of `wasm-exec`, each item `{"id": ..., "data": ...}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::EventId;

/// An accepted event as it travels from the ingress to the dispatcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The event's id.
    pub id: EventId,
    /// Namespace of the Job custom resource that declares the event.
    pub namespace: String,
    /// Event name, as declared in the Job custom resource.
    pub event: String,
    /// The validated payload.
    pub data: serde_json::Value,
    /// Extra attributes (CloudEvents `source`, `type`, ...), empty for plain JSON events.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl EventRecord {
    /// The executor's view of this event.
    pub fn to_exec(&self) -> ExecEvent {
        ExecEvent {
            id: self.id.to_string(),
            data: self.data.clone(),
        }
    }
}

/// One event as given to the executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecEvent {
    /// The event's id (kept as a plain string: the executor reports it, it does not interpret it).
    pub id: String,
    /// The payload handed to the module.
    pub data: serde_json::Value,
}

/// Error while reading executor input.
#[derive(Debug, thiserror::Error)]
#[error("events must be a JSON object {{\"id\":...,\"data\":...}} or an array of them: {0}")]
pub struct ExecInputError(#[source] serde_json::Error);

impl ExecEvent {
    /// Parses executor input: a JSON array of events or a single event object.
    pub fn parse_many(input: &[u8]) -> Result<Vec<ExecEvent>, ExecInputError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            Many(Vec<ExecEvent>),
            One(ExecEvent),
        }
        match serde_json::from_slice::<OneOrMany>(input) {
            Ok(OneOrMany::Many(events)) => Ok(events),
            Ok(OneOrMany::One(event)) => Ok(vec![event]),
            // Parse again strictly as an array so the error names the real problem.
            Err(_) => serde_json::from_slice::<Vec<ExecEvent>>(input).map_err(ExecInputError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_many_accepts_object_and_array() {
        let one = ExecEvent::parse_many(br#"{"id":"a","data":{"x":1}}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data, json!({"x":1}));
        let many =
            ExecEvent::parse_many(br#"[{"id":"a","data":1},{"id":"b","data":null}]"#).unwrap();
        assert_eq!(
            many.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn parse_many_rejects_other_shapes() {
        assert!(ExecEvent::parse_many(b"42").is_err());
        assert!(ExecEvent::parse_many(br#"{"data":1}"#).is_err());
        assert!(ExecEvent::parse_many(b"not json").is_err());
    }

    #[test]
    fn record_round_trips_and_omits_empty_attributes() {
        let record = EventRecord {
            id: EventId::parse("e1").unwrap(),
            namespace: "default".into(),
            event: "ev1".into(),
            data: json!({"firstName": "Ada"}),
            attributes: BTreeMap::new(),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert!(!text.contains("attributes"));
        assert_eq!(serde_json::from_str::<EventRecord>(&text).unwrap(), record);
        assert_eq!(record.to_exec().id, "e1");
    }
}
