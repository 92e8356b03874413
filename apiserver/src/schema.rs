//! Compiling tenant-supplied JSON Schemas safely and reporting violations precisely.
//!
//! Schemas come from ConfigMaps that any namespace owner can write, so compilation never fetches
//! anything (`$ref` may only point inside the schema itself), patterns use the linear-time
//! `regex` engine instead of a backtracking one, and the schema's size and nesting are capped.
//!
//! A few bytes of pattern can compile to megabytes (`(a{1000}){1000}` is a million states), so
//! the byte limit of the text does not bound the memory of the compiled schema. Every pattern
//! (`pattern`, `patternProperties` names) is compiled once with the engine's size limit and
//! measured before the schema is built: one pattern over [`MAX_PATTERN_BYTES`], or all of them
//! over [`MAX_SCHEMA_PATTERN_BYTES`], make the schema unusable, with the pattern named.

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
/// Longest violation message, in bytes; messages quote the offending value, which may be large.
pub const MAX_MESSAGE_BYTES: usize = 300;
/// Longest instance path reported, in bytes; a property name may be as long as the body.
pub const MAX_INSTANCE_PATH_BYTES: usize = 1024;
/// Largest compiled size of one pattern. Real patterns (formats, identifiers, enumerations of
/// words) compile to a few KiB; a megabyte is thousands of states.
pub const MAX_PATTERN_BYTES: usize = 1 << 20;
/// Largest compiled size of all the patterns of one schema: a schema lives for as long as its
/// event is declared, and every event type of every tenant holds one.
pub const MAX_SCHEMA_PATTERN_BYTES: usize = 4 << 20;
/// Transition cache of one pattern's lazy DFA, per thread that uses it; beyond, the engine
/// clears it or falls back to its (still linear) NFA simulation.
const PATTERN_CACHE_BYTES: usize = 256 << 10;

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
    /// A pattern compiles to more than [`MAX_PATTERN_BYTES`], or all together to more than
    /// [`MAX_SCHEMA_PATTERN_BYTES`].
    #[error("{0}")]
    PatternTooLarge(String),
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

/// Every regular expression of a schema with where it is: `pattern` values and the names of
/// `patternProperties`. Found anywhere in the document (an `example` holding a `pattern` counts
/// too), so nothing the validator compiles is missed.
fn patterns(schema: &Value) -> Vec<(String, &str)> {
    let mut found = Vec::new();
    let mut stack = vec![(schema, String::new())];
    while let Some((value, at)) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v, format!("{at}/{i}"))),
            ),
            Value::Object(map) => {
                for (key, value) in map {
                    let here = format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"));
                    match (key.as_str(), value) {
                        ("pattern", Value::String(pattern)) => {
                            found.push((here.clone(), pattern.as_str()));
                        }
                        ("patternProperties", Value::Object(properties)) => found.extend(
                            properties
                                .keys()
                                .map(|p| (format!("{here}/{p}"), p.as_str())),
                        ),
                        _ => {}
                    }
                    stack.push((value, here));
                }
            }
            _ => {}
        }
    }
    found
}

/// Compiles every pattern of `schema` as the validator would and adds up what they hold.
fn check_patterns(schema: &Value) -> Result<(), SchemaError> {
    let mut total = 0usize;
    for (at, pattern) in patterns(schema) {
        // Patterns the validator cannot translate are reported by the validator itself.
        let Ok(translated) = jsonschema_regex::to_rust_regex(pattern) else {
            continue;
        };
        let compiled = regex_automata::meta::Regex::builder()
            .configure(regex_automata::meta::Config::new().nfa_size_limit(Some(MAX_PATTERN_BYTES)))
            .build(&translated);
        let size = match compiled {
            Ok(regex) => regex.memory_usage(),
            Err(e) if e.size_limit().is_some() => {
                return Err(SchemaError::PatternTooLarge(format!(
                    "pattern at {at} compiles to more than {MAX_PATTERN_BYTES} bytes; simplify it (large counted repetitions multiply)"
                )));
            }
            // Syntax errors are the validator's to report, with its own message.
            Err(_) => continue,
        };
        if size > MAX_PATTERN_BYTES {
            return Err(SchemaError::PatternTooLarge(format!(
                "pattern at {at} compiles to {size} bytes, more than the {MAX_PATTERN_BYTES} allowed"
            )));
        }
        total += size;
        if total > MAX_SCHEMA_PATTERN_BYTES {
            return Err(SchemaError::PatternTooLarge(format!(
                "the schema's patterns compile to more than {MAX_SCHEMA_PATTERN_BYTES} bytes together (reached at {at})"
            )));
        }
    }
    Ok(())
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
        check_patterns(schema)?;
        let validator = jsonschema::options()
            .with_retriever(NoRetrieval)
            .with_pattern_options(
                PatternOptions::regex()
                    .size_limit(MAX_PATTERN_BYTES)
                    .dfa_size_limit(PATTERN_CACHE_BYTES),
            )
            .build(schema)
            .map_err(|e| SchemaError::Invalid(e.to_string()))?;
        Ok(Self(Arc::new(validator)))
    }

    /// A schema that accepts any JSON value (for events whose optional schema is missing).
    pub fn accept_all() -> Self {
        Self::from_value(&Value::Bool(true)).expect("`true` is a valid schema")
    }

    /// Checks `instance`, item `item` of a request, adding its violations to `report`.
    pub fn check(&self, item: usize, instance: &Value, report: &mut Violations) {
        // The fast path: `is_valid` stops at the first failure and builds no error values.
        if self.0.is_valid(instance) {
            return;
        }
        let mut listed_here = 0;
        for error in self.0.iter_errors(instance) {
            report.total += 1;
            if listed_here == MAX_VIOLATIONS_PER_ITEM
                || report.listed.len() == MAX_VIOLATIONS_LISTED
            {
                continue;
            }
            listed_here += 1;
            report.listed.push(Violation {
                item,
                instance_path: truncate(error.instance_path().as_str(), MAX_INSTANCE_PATH_BYTES),
                keyword: error.kind().keyword().to_string(),
                message: truncate(&error.to_string(), MAX_MESSAGE_BYTES),
            });
        }
    }

    /// The violations of one instance (at most [`MAX_VIOLATIONS_PER_ITEM`]).
    pub fn violations(&self, item: usize, instance: &Value) -> Vec<Violation> {
        let mut report = Violations::default();
        self.check(item, instance, &mut report);
        report.listed
    }
}

/// Most violations listed in one answer, over all items: a 1,000-item batch with many
/// violations each would otherwise be answered with megabytes. The count says how many there
/// were in all.
pub const MAX_VIOLATIONS_LISTED: usize = 100;

/// The violations of a request: the first ones listed, and how many there were in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    /// At most [`MAX_VIOLATIONS_PER_ITEM`] per item and [`MAX_VIOLATIONS_LISTED`] in all.
    pub listed: Vec<Violation>,
    /// Every violation found, listed or not.
    pub total: usize,
}

impl Violations {
    /// Whether nothing was violated.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// `text` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
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
    fn patterns_that_compile_to_huge_automata_are_refused_with_their_place() {
        let schema =
            |pattern: &str| json!({"properties": {"x": {"type": "string", "pattern": pattern}}});
        for huge in ["(a{1000}){1000}", "(a{1000}){300}", "a{100000}"] {
            let error = CompiledSchema::from_value(&schema(huge)).unwrap_err();
            assert!(
                matches!(error, SchemaError::PatternTooLarge(_)),
                "{huge}: {error:?}"
            );
            assert!(
                error
                    .to_string()
                    .contains("pattern at /properties/x/pattern"),
                "{error}"
            );
        }
        // patternProperties names are patterns too.
        let error = CompiledSchema::from_value(
            &json!({"patternProperties": {"(b{1000}){300}": {"type": "string"}}}),
        )
        .unwrap_err();
        assert!(
            matches!(error, SchemaError::PatternTooLarge(_)),
            "{error:?}"
        );
        // Each pattern within bounds, but together too much.
        let many: serde_json::Map<String, Value> = (0..200)
            .map(|i| {
                (
                    format!("p{i}"),
                    json!({"pattern": format!("^(x{i}){{1,300}}$")}),
                )
            })
            .collect();
        let error = CompiledSchema::from_value(&json!({"properties": many})).unwrap_err();
        assert!(
            error.to_string().contains("patterns compile to more than"),
            "{error}"
        );
        // Real patterns are fine.
        let s = CompiledSchema::from_value(&schema(
            "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        ))
        .unwrap();
        assert_eq!(s.violations(0, &json!({"x": "nope"})).len(), 1);
    }

    #[test]
    fn violation_lists_and_messages_are_capped() {
        let s = CompiledSchema::from_value(&json!({"items": {"type": "string"}})).unwrap();
        let many: Vec<i32> = (0..1000).collect();
        assert_eq!(s.violations(0, &json!(many)).len(), MAX_VIOLATIONS_PER_ITEM);
        let s = CompiledSchema::from_value(&json!({"type": "integer"})).unwrap();
        let v = s.violations(0, &json!("é".repeat(10_000)));
        assert!(v[0].message.len() <= MAX_MESSAGE_BYTES, "{}", v[0].message);
        assert!(v[0].message.ends_with('…'));
        // A long property name makes a long instance path.
        let s = CompiledSchema::from_value(&json!({"additionalProperties": {"type": "integer"}}))
            .unwrap();
        let v = s.violations(0, &json!({"é".repeat(5000): "x"}));
        assert!(v[0].instance_path.len() <= MAX_INSTANCE_PATH_BYTES);
    }

    #[test]
    fn a_report_lists_the_first_violations_and_counts_all() {
        let s = CompiledSchema::from_value(&json!({"items": {"type": "string"}})).unwrap();
        let mut report = Violations::default();
        let many: Vec<i32> = (0..50).collect();
        for item in 0..10 {
            s.check(item, &json!(many), &mut report);
        }
        assert_eq!(report.total, 500);
        assert_eq!(report.listed.len(), MAX_VIOLATIONS_LISTED);
        assert_eq!(
            report.listed.last().unwrap().item,
            3,
            "32 per item, then the next item"
        );
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
