//! The event envelope.
//!
//! [`EventRecord`] is what the ingress publishes (one JetStream message per event, JSON body).
//! [`ExecEvent`] is what the executor consumes: the JSON array in a pod's `JOBICO_EVENTS`
//! variable, a file or stdin of `wasm-exec`, each item `{"id": ..., "data": ...}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::EventId;

/// Deepest nesting of arrays and objects an event's data may have. Every consumer re-wraps the
/// data a few levels deeper (the stream record, the executor's input array) and parses it with
/// serde_json, whose limit is 128 levels; the ingress refuses deeper data so that no accepted
/// event is unreadable further on.
pub const MAX_DATA_DEPTH: usize = 64;

/// How deeply `value` nests arrays and objects (a scalar is 0, `[]` and `{}` are 1). Iterative,
/// so any depth is measured without recursion.
pub fn data_depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match value {
            serde_json::Value::Array(items) => Box::new(items.iter()),
            serde_json::Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    deepest
}

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
    fn depth_counts_nesting_and_the_limit_leaves_room_to_re_wrap() {
        assert_eq!(data_depth(&json!(1)), 0);
        assert_eq!(data_depth(&json!([])), 1);
        assert_eq!(data_depth(&json!({"a": [1, {"b": []}]})), 4);
        // Data at the limit still parses once wrapped as a record and as executor input.
        let mut deep = json!(1);
        for _ in 0..MAX_DATA_DEPTH {
            deep = json!([deep]);
        }
        assert_eq!(data_depth(&deep), MAX_DATA_DEPTH);
        let record = EventRecord {
            id: EventId::parse("e1").unwrap(),
            namespace: "default".into(),
            event: "ev1".into(),
            data: deep,
            attributes: BTreeMap::new(),
        };
        let text = serde_json::to_vec(&record).unwrap();
        let back: EventRecord = serde_json::from_slice(&text).unwrap();
        let exec = serde_json::to_vec(&[back.to_exec()]).unwrap();
        assert_eq!(ExecEvent::parse_many(&exec).unwrap().len(), 1);
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
