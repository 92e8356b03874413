//! What a route hands on: the data of the event a route publishes for an outcome.
//!
//! On success the data is the producing event's result (the jobicolet result string, or the
//! WASI command's standard output) parsed as JSON; on failure an object describing it:
//!
//! ```json
//! {"event": "order", "id": "<parent id>", "error": "trap", "message": "...", "exitCode": 3}
//! ```
//!
//! One function for every place a route is followed (local mode, the cluster's results
//! endpoint), so they hand on the same data.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::envelope::{MAX_DATA_DEPTH, data_depth};
use crate::summary::{EventOutcome, batch_digest};

/// Longest result a route hands on (the ingress's default body limit): a longer one is not
/// sent to the results endpoint, and its routes fail saying so.
pub const MAX_RESULT_BYTES: usize = 256 * 1024;

/// Where a Job of an event with routes posts its outcomes (the ingress's
/// `POST /results/<namespace>/<event>`).
pub const RESULTS_URL_VAR: &str = "JOBICO_RESULTS_URL";
/// The bearer token for it: [`results_token`] of the Job's batch.
pub const RESULTS_TOKEN_VAR: &str = "JOBICO_RESULTS_TOKEN";
/// Header of a results post naming the [`batch_digest`] of its outcomes' ids.
pub const RESULTS_BATCH_HEADER: &str = "jobico-batch";

/// What the executor posts: every outcome of its batch, in batch order (the token is bound to
/// exactly those ids), results at most [`MAX_RESULT_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsReport {
    /// The outcomes.
    pub outcomes: Vec<EventOutcome>,
}

/// Fewest bytes of a results key.
pub const MIN_RESULTS_KEY_BYTES: usize = 32;

/// Reads the results key from `path` (a mounted Secret): its bytes, surrounding whitespace
/// removed, at least [`MIN_RESULTS_KEY_BYTES`].
pub fn read_results_key(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the results key {}: {e}", path.display()))?;
    let key = bytes.trim_ascii().to_vec();
    if key.len() < MIN_RESULTS_KEY_BYTES {
        return Err(format!(
            "the results key {} has {} bytes; it needs at least {MIN_RESULTS_KEY_BYTES} (e.g. `head -c 32 /dev/urandom | base64`)",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

/// The token that lets a batch's executor post the outcomes of exactly `ids` (in order) of
/// event `event` in `namespace`: HMAC-SHA256 with the results key, in hex. Shared by the
/// dispatcher (which writes it into the Job) and the ingress (which checks it).
pub fn results_token<S: AsRef<str>>(key: &[u8], namespace: &str, event: &str, ids: &[S]) -> String {
    let mac = results_mac(key, namespace, event, &batch_digest(ids));
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `token` is [`results_token`] of the ids whose [`batch_digest`] is `digest`
/// (compared in constant time). The digest travels in the [`RESULTS_BATCH_HEADER`], so a
/// token is checked before the body is read.
pub fn results_token_valid(
    key: &[u8],
    namespace: &str,
    event: &str,
    digest: &str,
    token: &str,
) -> bool {
    let Some(bytes) = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    results_mac(key, namespace, event, digest)
        .verify_slice(&bytes)
        .is_ok()
}

fn results_mac(key: &[u8], namespace: &str, event: &str, digest: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in ["results", namespace, event, digest] {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part.as_bytes());
    }
    mac
}

/// The data a route publishes for `outcome` of event `event`, or why there is none to
/// publish (no result, a result cut at the output cap, a result that is not JSON).
pub fn routed_data(event: &str, outcome: &EventOutcome) -> Result<Value, String> {
    if !outcome.succeeded() {
        let mut failure = json!({
            "event": event,
            "id": outcome.id,
            "error": outcome.error.map_or("failed", |kind| kind.as_str()),
        });
        if let Some(message) = &outcome.message {
            failure["message"] = json!(message);
        }
        if let Some(code) = outcome.exit_code {
            failure["exitCode"] = json!(code);
        }
        return Ok(failure);
    }
    let Some(result) = &outcome.result else {
        return Err("the module produced no result to route".to_owned());
    };
    if result.len() > MAX_RESULT_BYTES {
        return Err(format!(
            "the result is longer than the {MAX_RESULT_BYTES} bytes a route hands on"
        ));
    }
    if outcome.output_truncated || result.ends_with('…') {
        return Err("the result was cut at the output cap, so it is not whole JSON".to_owned());
    }
    let data: Value = serde_json::from_str(result.trim())
        .map_err(|error| format!("the result is not JSON ({error}): {:?}", cut(result, 120)))?;
    if data_depth(&data) > MAX_DATA_DEPTH {
        return Err(format!(
            "the result is nested deeper than {MAX_DATA_DEPTH} levels"
        ));
    }
    Ok(data)
}

/// `data` as kept with a dead letter: itself when its JSON fits in [`MAX_RESULT_BYTES`], else
/// the start of that JSON as a string ending in `…`, so a dead letter always fits in a NATS
/// message.
pub fn dead_letter_data(data: Value) -> Value {
    let text = serde_json::to_string(&data).expect("JSON values serialise");
    if text.len() <= MAX_RESULT_BYTES {
        return data;
    }
    Value::String(format!("{}…", cut(&text, MAX_RESULT_BYTES)))
}

fn cut(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::summary::{ErrorKind, Status};

    fn outcome(status: Status, result: Option<&str>) -> EventOutcome {
        EventOutcome {
            id: "p1".into(),
            status,
            exit_code: None,
            error: (status == Status::Failed).then_some(ErrorKind::Exit),
            message: (status == Status::Failed).then(|| "exit code 3".to_owned()),
            warning: None,
            duration: Duration::ZERO,
            output_bytes: 0,
            output_truncated: false,
            result: result.map(str::to_owned),
        }
    }

    #[test]
    fn a_success_hands_on_its_result_as_json() {
        let ok = outcome(Status::Succeeded, Some("{\"total\": 12}\n"));
        assert_eq!(routed_data("order", &ok).unwrap(), json!({"total": 12}));
        let none = outcome(Status::Succeeded, None);
        assert!(
            routed_data("order", &none)
                .unwrap_err()
                .contains("no result")
        );
        let text = outcome(Status::Succeeded, Some("total: 12"));
        let error = routed_data("order", &text).unwrap_err();
        assert!(error.starts_with("the result is not JSON"), "{error}");
        let mut cut = outcome(Status::Succeeded, Some("{\"a\": 1}"));
        cut.output_truncated = true;
        assert!(
            routed_data("order", &cut)
                .unwrap_err()
                .contains("output cap")
        );
        let deep = "[".repeat(MAX_DATA_DEPTH + 1) + &"]".repeat(MAX_DATA_DEPTH + 1);
        let deep = outcome(Status::Succeeded, Some(&deep));
        assert!(routed_data("order", &deep).unwrap_err().contains("deeper"));
    }

    #[test]
    fn a_results_token_is_bound_to_the_namespace_event_and_ids_in_order() {
        let key = b"0123456789abcdef0123456789abcdef";
        let token = results_token(key, "ns", "order", &["a", "b"]);
        assert_eq!(token.len(), 64);
        let ab = batch_digest(&["a", "b"]);
        assert!(results_token_valid(key, "ns", "order", &ab, &token));
        for (ns, event, ids) in [
            ("other", "order", &["a", "b"][..]),
            ("ns", "invoice", &["a", "b"]),
            ("ns", "order", &["b", "a"]),
            ("ns", "order", &["a"]),
        ] {
            let digest = batch_digest(ids);
            assert!(
                !results_token_valid(key, ns, event, &digest, &token),
                "{ns} {event} {ids:?}"
            );
        }
        assert!(!results_token_valid(
            b"another key",
            "ns",
            "order",
            &ab,
            &token
        ));
        assert!(!results_token_valid(key, "ns", "order", &ab, "zz"));
        assert!(!results_token_valid(key, "ns", "order", &ab, ""));
    }

    #[test]
    fn a_dead_letter_keeps_at_most_the_bytes_a_route_hands_on() {
        assert_eq!(dead_letter_data(json!({"a": 1})), json!({"a": 1}));
        let big = json!("é".repeat(MAX_RESULT_BYTES));
        let kept = dead_letter_data(big);
        let text = kept.as_str().unwrap();
        assert!(text.len() <= MAX_RESULT_BYTES + '…'.len_utf8() && text.ends_with('…'));
        let long = outcome(Status::Succeeded, Some(&"x".repeat(MAX_RESULT_BYTES + 1)));
        assert!(
            routed_data("order", &long)
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn a_failure_hands_on_what_went_wrong() {
        let mut failed = outcome(Status::Failed, None);
        failed.exit_code = Some(3);
        assert_eq!(
            routed_data("order", &failed).unwrap(),
            json!({"event": "order", "id": "p1", "error": "exit", "message": "exit code 3", "exitCode": 3})
        );
    }
}
