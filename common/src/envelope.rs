//! The event envelope.
//!
//! [`EventRecord`] is what the ingress publishes (one JetStream message per event, JSON body).
//! [`ExecEvent`] is what the executor consumes: a JSON array of `{"id": ..., "data": ...}`
//! items, from a file or stdin of `wasm-exec`, or from a pod's environment.
//!
//! # Events in the environment
//!
//! A Kubernetes Job carries its events in the executor container's environment, so creating the
//! Job is the one atomic step that hands them over. Linux refuses any single environment or
//! argument string longer than [`MAX_ARG_STRLEN`] (`NAME=value` and its NUL), so the JSON text
//! travels in one variable [`EVENTS_VAR`] when it fits in [`EVENTS_PART_BYTES`], and otherwise
//! in [`EVENTS_PARTS_VAR`]` = N` and `N` variables [`EVENTS_PART_PREFIX`]`0` … `N-1`, cut on
//! UTF-8 boundaries. [`split_events`] (the dispatcher's renderer) and [`join_events`] (wasm-exec)
//! are the two sides of that contract.
//!
//! The budget (Linux with the default 8 MiB stack, Kubernetes' defaults):
//!
//! - one string: a part is at most 96 KiB, three quarters of `MAX_ARG_STRLEN`;
//! - all strings: `execve` takes at most a quarter of the stack rlimit for argv and envp
//!   together, pointers included (`ARG_MAX`, 2 MiB with 8 MiB). The events are at most
//!   [`MAX_EVENTS_BYTES`] (1 MiB) in at most [`MAX_EVENTS_PARTS`] parts, which leaves about
//!   1 MiB for the executor's other variables and arguments, checked with the rest by
//!   [`MAX_EXEC_ENV_BYTES`];
//! - the Kubernetes object: etcd stores a Job (and the Pod made from it) in protobuf, where
//!   strings are not escaped, and refuses requests over 1.5 MiB: 1 MiB of events plus the
//!   Job's other fields. The API request itself is JSON, where escaping can double the events
//!   (a payload of `"` characters: `\"` in the events text, `\\\"` in the request), 2 MiB
//!   of 3 MiB, the API server's default body limit;
//! - what reaches it: a batch holds at most `maxBytes` (at most 1 MiB) of stored messages, and
//!   a message is at most the stream's largest (1 MiB by default); the events text of a message
//!   is smaller than the message (it drops the namespace and event name). A larger text is
//!   refused by [`split_events`] rather than turned into a pod that cannot start.

use std::collections::BTreeMap;
use std::ffi::OsString;

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

/// Linux's limit on one argument or environment string, its NUL included (`MAX_ARG_STRLEN`,
/// 32 pages of 4 KiB); `execve` fails with `E2BIG` above it.
pub const MAX_ARG_STRLEN: usize = 131_072;
/// Linux's limit on all argument and environment strings of one `execve`, with one pointer
/// (8 bytes) each: a quarter of the stack rlimit, 2 MiB with the default 8 MiB stack.
pub const ARG_MAX: usize = 2 << 20;
/// Most bytes the executor container's own arguments and variables may take in `execve`
/// (each string with its NUL and an 8-byte pointer): [`ARG_MAX`] less 64 KiB for what the
/// runtime adds (the binary's path, `PATH`, `HOSTNAME`, the kubelet's `KUBERNETES_*`
/// variables: well under 1 KiB in practice).
pub const MAX_EXEC_ENV_BYTES: usize = ARG_MAX - (64 << 10);
/// The variable holding the whole events text when it fits in one part.
pub const EVENTS_VAR: &str = "JOBICO_EVENTS";
/// The variable holding the number of parts when the events text is split.
pub const EVENTS_PARTS_VAR: &str = "JOBICO_EVENTS_PARTS";
/// The prefix of the part variables: `JOBICO_EVENTS_0`, `JOBICO_EVENTS_1`, ...
pub const EVENTS_PART_PREFIX: &str = "JOBICO_EVENTS_";
/// Most bytes of events text in one variable: 96 KiB, three quarters of [`MAX_ARG_STRLEN`], so
/// `NAME=` and the NUL always fit and the margin is plain to see.
pub const EVENTS_PART_BYTES: usize = 96 << 10;
/// Most bytes of events text one Job carries: 1 MiB, the largest batch (`maxBytes`) and the
/// stream's default largest message. See the module docs for why this fits everywhere.
pub const MAX_EVENTS_BYTES: usize = 1 << 20;
/// Most parts of a split text: enough for [`MAX_EVENTS_BYTES`] when every cut lands up to 3
/// bytes early (a UTF-8 character is at most 4 bytes).
pub const MAX_EVENTS_PARTS: usize = MAX_EVENTS_BYTES.div_ceil(EVENTS_PART_BYTES - 3);

// The limits fit together, checked when this crate is built: a part's variable (`NAME=`, the
// value, NUL; part numbers have at most two digits) fits one string; the parts carry the
// largest text; and the events' variables (value, name, `=`, NUL and pointer each) leave at
// least 800 KiB of the execve budget to everything else.
const _: () = assert!(MAX_EVENTS_PARTS < 100);
const _: () = assert!(EVENTS_PART_PREFIX.len() + 2 + 1 + EVENTS_PART_BYTES < MAX_ARG_STRLEN);
const _: () = assert!(MAX_EVENTS_PARTS * (EVENTS_PART_BYTES - 3) >= MAX_EVENTS_BYTES);
const _: () = assert!(
    MAX_EXEC_ENV_BYTES - MAX_EVENTS_BYTES - (MAX_EVENTS_PARTS + 1) * (EVENTS_PARTS_VAR.len() + 10)
        >= 800 << 10
);

/// One environment variable of the events contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvEntry {
    /// The variable's name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// The events text is longer than a Job may carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the events take {bytes} bytes, more than the {MAX_EVENTS_BYTES} bytes a Job carries")]
pub struct EventsTooLarge {
    /// The length of the text.
    pub bytes: usize,
}

/// The environment does not carry a well-formed events text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsEnvError {
    /// Both forms are present.
    #[error("both {EVENTS_VAR} and {EVENTS_PARTS_VAR} are set; set one")]
    Ambiguous,
    /// The count is not a number from 1 to [`MAX_EVENTS_PARTS`].
    #[error("{EVENTS_PARTS_VAR}={0:?} must be a number from 1 to {MAX_EVENTS_PARTS}")]
    BadCount(String),
    /// Parts of the announced count are missing or empty.
    #[error("{EVENTS_PARTS_VAR}={count} but {} not set", listed(.missing))]
    Missing {
        /// The announced count.
        count: usize,
        /// The variables that are not set or empty.
        missing: Vec<String>,
    },
    /// A part beyond the announced count (or any part without a count) is set: the variables
    /// come from two different splits.
    #[error("{name} is set but {expected}")]
    Stray {
        /// The unexpected variable.
        name: String,
        /// What the other variables announce.
        expected: String,
    },
    /// A variable is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(String),
}

/// `A is` or `A, B are`, for [`EventsEnvError::Missing`].
fn listed(names: &[String]) -> String {
    let verb = if names.len() == 1 { "is" } else { "are" };
    format!("{} {verb}", names.join(", "))
}

/// The name of part `index`.
pub fn events_part_var(index: usize) -> String {
    format!("{EVENTS_PART_PREFIX}{index}")
}

/// The environment variables that carry `text`: [`EVENTS_VAR`] alone when it fits in
/// [`EVENTS_PART_BYTES`], else [`EVENTS_PARTS_VAR`] and the parts, each at most
/// [`EVENTS_PART_BYTES`] and cut between UTF-8 characters. [`join_events`] reads them back.
pub fn split_events(text: &str) -> Result<Vec<EnvEntry>, EventsTooLarge> {
    if text.len() > MAX_EVENTS_BYTES {
        return Err(EventsTooLarge { bytes: text.len() });
    }
    if text.len() <= EVENTS_PART_BYTES {
        return Ok(vec![EnvEntry {
            name: EVENTS_VAR.to_owned(),
            value: text.to_owned(),
        }]);
    }
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(EVENTS_PART_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (part, tail) = rest.split_at(cut);
        parts.push(EnvEntry {
            name: events_part_var(parts.len()),
            value: part.to_owned(),
        });
        rest = tail;
    }
    let mut entries = Vec::with_capacity(parts.len() + 1);
    entries.push(EnvEntry {
        name: EVENTS_PARTS_VAR.to_owned(),
        value: parts.len().to_string(),
    });
    entries.extend(parts);
    Ok(entries)
}

/// The events text carried by an environment (`lookup` gives a variable's value), in either
/// form of [`split_events`]; `None` when neither form is present. Every part must be present,
/// non-empty and UTF-8, and no part may be set beyond the count: the error names what is
/// wrong.
pub fn join_events(
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<String>, EventsEnvError> {
    let text = |name: &str| -> Result<Option<String>, EventsEnvError> {
        lookup(name)
            .map(|value| {
                value
                    .into_string()
                    .map_err(|_| EventsEnvError::NotUtf8(name.to_owned()))
            })
            .transpose()
    };
    let whole = text(EVENTS_VAR)?;
    let Some(count) = text(EVENTS_PARTS_VAR)? else {
        let first = events_part_var(0);
        if lookup(&first).is_some() {
            return Err(EventsEnvError::Stray {
                name: first,
                expected: format!("{EVENTS_PARTS_VAR} is not"),
            });
        }
        return Ok(whole);
    };
    if whole.is_some() {
        return Err(EventsEnvError::Ambiguous);
    }
    let count = match count.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_EVENTS_PARTS).contains(&n) => n,
        _ => return Err(EventsEnvError::BadCount(count)),
    };
    let mut joined = String::new();
    let mut missing = Vec::new();
    for index in 0..count {
        let name = events_part_var(index);
        match text(&name)? {
            Some(part) if !part.is_empty() => joined.push_str(&part),
            _ => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(EventsEnvError::Missing { count, missing });
    }
    let beyond = events_part_var(count);
    if lookup(&beyond).is_some() {
        return Err(EventsEnvError::Stray {
            name: beyond,
            expected: format!("{EVENTS_PARTS_VAR}={count}"),
        });
    }
    Ok(Some(joined))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn env(entries: &[EnvEntry]) -> HashMap<String, OsString> {
        entries
            .iter()
            .map(|e| (e.name.clone(), OsString::from(&e.value)))
            .collect()
    }

    fn join(vars: &HashMap<String, OsString>) -> Result<Option<String>, EventsEnvError> {
        join_events(|name| vars.get(name).cloned())
    }

    #[test]
    fn small_text_is_one_variable() {
        let entries = split_events(r#"[{"id":"a","data":1}]"#).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, EVENTS_VAR);
        assert_eq!(
            join(&env(&entries)).unwrap().as_deref(),
            Some(r#"[{"id":"a","data":1}]"#)
        );
        let edge = "x".repeat(EVENTS_PART_BYTES);
        assert_eq!(split_events(&edge).unwrap().len(), 1);
    }

    #[test]
    fn large_text_is_split_on_char_boundaries_and_joins_back() {
        // Multi-byte characters straddle every cut unless the split moves it.
        let text: String = "aé✓😀".repeat(MAX_EVENTS_BYTES / 10);
        let entries = split_events(&text).unwrap();
        assert_eq!(entries[0].name, EVENTS_PARTS_VAR);
        let count: usize = entries[0].value.parse().unwrap();
        assert_eq!(count, entries.len() - 1);
        assert!(count <= MAX_EVENTS_PARTS);
        for (i, part) in entries[1..].iter().enumerate() {
            assert_eq!(part.name, format!("JOBICO_EVENTS_{i}"));
            assert!(!part.value.is_empty() && part.value.len() <= EVENTS_PART_BYTES);
        }
        assert_eq!(join(&env(&entries)).unwrap(), Some(text));
        let just_over = "y".repeat(EVENTS_PART_BYTES + 1);
        let entries = split_events(&just_over).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(join(&env(&entries)).unwrap(), Some(just_over));
    }

    #[test]
    fn text_over_the_cap_is_refused() {
        let too_big = "z".repeat(MAX_EVENTS_BYTES + 1);
        assert_eq!(
            split_events(&too_big).unwrap_err(),
            EventsTooLarge {
                bytes: MAX_EVENTS_BYTES + 1
            }
        );
        let worst = "😀".repeat(MAX_EVENTS_BYTES / 4);
        assert!(split_events(&worst).unwrap().len() <= MAX_EVENTS_PARTS + 1);
    }

    #[test]
    fn join_names_what_is_wrong() {
        let text = "q".repeat(3 * EVENTS_PART_BYTES);
        let good = env(&split_events(&text).unwrap());
        assert_eq!(join(&HashMap::new()).unwrap(), None);

        let mut missing = good.clone();
        missing.remove("JOBICO_EVENTS_0");
        missing.insert("JOBICO_EVENTS_2".into(), OsString::new());
        let error = join(&missing).unwrap_err();
        assert_eq!(
            error.to_string(),
            "JOBICO_EVENTS_PARTS=3 but JOBICO_EVENTS_0, JOBICO_EVENTS_2 are not set"
        );

        let mut both = good.clone();
        both.insert(EVENTS_VAR.into(), "[]".into());
        assert_eq!(join(&both).unwrap_err(), EventsEnvError::Ambiguous);

        for bad in ["0", "x", "", "-1", "12"] {
            let mut count = good.clone();
            count.insert(EVENTS_PARTS_VAR.into(), bad.into());
            assert_eq!(
                join(&count).unwrap_err(),
                EventsEnvError::BadCount(bad.into()),
                "{bad}"
            );
        }

        let mut stray = good.clone();
        stray.insert("JOBICO_EVENTS_3".into(), "]".into());
        assert_eq!(
            join(&stray).unwrap_err().to_string(),
            "JOBICO_EVENTS_3 is set but JOBICO_EVENTS_PARTS=3"
        );
        let mut orphan = HashMap::new();
        orphan.insert("JOBICO_EVENTS_0".to_owned(), OsString::from("[]"));
        assert!(matches!(
            join(&orphan).unwrap_err(),
            EventsEnvError::Stray { .. }
        ));
    }

    #[cfg(unix)]
    #[test]
    fn join_refuses_non_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let mut vars = HashMap::new();
        vars.insert(EVENTS_VAR.to_owned(), OsString::from_vec(vec![0xff]));
        assert_eq!(
            join(&vars).unwrap_err(),
            EventsEnvError::NotUtf8(EVENTS_VAR.into())
        );
    }

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
