//! Compiling tenant-supplied JSON Schemas safely and reporting violations precisely.
//!
//! Schemas come from ConfigMaps that any namespace owner can write, so compilation never fetches
//! anything (`$ref` may only point inside the schema itself), patterns use the linear-time
//! `regex` engine instead of a backtracking one, and the schema's size and nesting are capped.

use std::sync::Arc;

use jsonschema::{PatternOptions, Retrieve, Uri, Validator};
use serde::Serialize;
use serde_json::Value;

/// Largest schema we compile, in bytes of JSON. ConfigMaps hold at most 1 MiB; real schemas are
/// a few KiB, and this bounds compile time and memory per event type.
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;
/// Deepest nesting of a schema document; legitimate schemas rarely exceed a dozen levels.
pub const MAX_SCHEMA_DEPTH: usize = 64;
/// Most violations reported for one item; a larger list only makes the response bigger.
pub const MAX_VIOLATIONS_PER_ITEM: usize = 32;
/// Longest violation message; messages quote the offending value, which may be large.
const MAX_MESSAGE_CHARS: usize = 300;

/// A compiled schema, cheap to clone and safe to share between threads.
#[derive(Clone)]
pub struct CompiledSchema(Arc<Validator>);

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledSchema")
    }
}

/// One way an event breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// Position of the event in the request (0 for a single event).
    pub item: usize,
    /// JSON Pointer to the offending part of the event (`""` is the whole event).
    pub instance_path: String,
    /// The schema keyword that failed (`required`, `type`, ...).
    pub keyword: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Why a schema cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The schema text is not JSON.
    #[error("schema is not valid JSON: {0}")]
    NotJson(String),
    /// The schema is larger than [`MAX_SCHEMA_BYTES`].
    #[error("schema is {0} bytes, more than the {MAX_SCHEMA_BYTES} allowed")]
    TooLarge(usize),
    /// The schema nests deeper than [`MAX_SCHEMA_DEPTH`].
    #[error("schema nests deeper than {MAX_SCHEMA_DEPTH} levels")]
    TooDeep,
    /// The schema is JSON but not a valid schema (or refers to something outside itself).
    #[error("schema does not compile: {0}")]
    Invalid(String),
}

/// Refuses every external `$ref`: schemas must be self-contained.
struct NoRetrieval;

impl Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("external $ref {uri} is not allowed: schemas must be self-contained").into())
    }
}

fn depth(value: &Value) -> usize {
    // Iterative, so a hostile schema cannot overflow our stack while we measure it.
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((value, level)) = stack.pop() {
        deepest = deepest.max(level);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, level + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, level + 1))),
            _ => {}
        }
    }
    deepest
}

impl CompiledSchema {
    /// Compiles schema text (as found in a ConfigMap).
    pub fn from_text(text: &str) -> Result<Self, SchemaError> {
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError::TooLarge(text.len()));
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| SchemaError::NotJson(e.to_string()))?;
        Self::from_value(&value)
    }

    /// Compiles a parsed schema.
    pub fn from_value(schema: &Value) -> Result<Self, SchemaError> {
        if depth(schema) > MAX_SCHEMA_DEPTH {
            return Err(SchemaError::TooDeep);
        }
        let validator = jsonschema::options()
            .with_retriever(NoRetrieval)
            .with_pattern_options(PatternOptions::regex())
            .build(schema)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        Ok(Self(Arc::new(validator)))
    }

    /// A schema that accepts any JSON value (for events whose optional schema is missing).
    pub fn accept_all() -> Self {
        Self::from_value(&Value::Bool(true)).expect("`true` is a valid schema")
    }

    /// Checks `instance`; returns its violations (at most [`MAX_VIOLATIONS_PER_ITEM`]).
    pub fn violations(&self, item: usize, instance: &Value) -> Vec<Violation> {
        // The fast path: `is_valid` stops at the first failure and builds no error values.
        if self.0.is_valid(instance) {
            return Vec::new();
        }
        self.0
            .iter_errors(instance)
            .take(MAX_VIOLATIONS_PER_ITEM)
            .map(|error| {
                let mut message = error.to_string();
                if message.chars().count() > MAX_MESSAGE_CHARS {
                    message = message.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
                }
                Violation {
                    item,
                    instance_path: error.instance_path().as_str().to_string(),
                    keyword: error.kind().keyword().to_string(),
                    message,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn person() -> CompiledSchema {
        CompiledSchema::from_value(&json!({
            "type": "object",
            "properties": {
                "firstName": {"type": "string"},
                "lastName": {"type": "string"},
                "age": {"type": "integer"}
            },
            "required": ["firstName", "lastName"]
        }))
        .unwrap()
    }

    #[test]
    fn valid_instances_have_no_violations() {
        assert!(
            person()
                .violations(0, &json!({"firstName": "Ada", "lastName": "L"}))
                .is_empty()
        );
    }

    #[test]
    fn violations_name_path_keyword_and_property() {
        let v = person().violations(3, &json!({"firstName": "Ada", "age": "x"}));
        assert_eq!(v.len(), 2, "{v:?}");
        let required = v.iter().find(|v| v.keyword == "required").unwrap();
        assert_eq!(required.item, 3);
        assert_eq!(required.instance_path, "");
        assert!(
            required.message.contains("lastName"),
            "{}",
            required.message
        );
        let age = v.iter().find(|v| v.keyword == "type").unwrap();
        assert_eq!(age.instance_path, "/age");
    }

    #[test]
    fn external_refs_are_refused() {
        for r in ["https://example.com/s.json", "file:///etc/passwd"] {
            let err = CompiledSchema::from_value(&json!({"$ref": r})).unwrap_err();
            assert!(matches!(err, SchemaError::Invalid(_)), "{r}: {err:?}");
        }
        // Internal references still work.
        let s = CompiledSchema::from_value(&json!({
            "$defs": {"n": {"type": "integer"}},
            "properties": {"x": {"$ref": "#/$defs/n"}}
        }))
        .unwrap();
        assert_eq!(s.violations(0, &json!({"x": "no"}))[0].instance_path, "/x");
    }

    #[test]
    fn size_depth_and_syntax_limits() {
        assert!(matches!(
            CompiledSchema::from_text(&" ".repeat(MAX_SCHEMA_BYTES + 1)),
            Err(SchemaError::TooLarge(_))
        ));
        assert!(matches!(
            CompiledSchema::from_text("{nope"),
            Err(SchemaError::NotJson(_))
        ));
        let mut deep = json!({"type": "object"});
        for _ in 0..MAX_SCHEMA_DEPTH {
            deep = json!({"properties": {"a": deep}});
        }
        assert_eq!(
            CompiledSchema::from_value(&deep).unwrap_err(),
            SchemaError::TooDeep
        );
        assert!(matches!(
            CompiledSchema::from_value(&json!({"type": 12})),
            Err(SchemaError::Invalid(_))
        ));
    }

    #[test]
    fn patterns_use_a_linear_time_engine() {
        // Catastrophic for a backtracking engine; instant for `regex`.
        let s =
            CompiledSchema::from_value(&json!({"type": "string", "pattern": "^(a+)+$"})).unwrap();
        let hostile = format!("{}!", "a".repeat(50_000));
        assert_eq!(s.violations(0, &json!(hostile)).len(), 1);
        // Backreferences need backtracking and are rejected rather than run slowly.
        assert!(CompiledSchema::from_value(&json!({"pattern": "(a)\\1"})).is_err());
    }

    #[test]
    fn violation_lists_and_messages_are_capped() {
        let s = CompiledSchema::from_value(&json!({"items": {"type": "string"}})).unwrap();
        let many: Vec<i32> = (0..1000).collect();
        assert_eq!(s.violations(0, &json!(many)).len(), MAX_VIOLATIONS_PER_ITEM);
        let s = CompiledSchema::from_value(&json!({"type": "integer"})).unwrap();
        let v = s.violations(0, &json!("x".repeat(10_000)));
        assert!(v[0].message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn accept_all_accepts_anything() {
        assert!(
            CompiledSchema::accept_all()
                .violations(0, &json!([1, {"a": null}]))
                .is_empty()
        );
    }
}
