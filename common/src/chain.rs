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

use serde_json::{Value, json};

use crate::envelope::{MAX_DATA_DEPTH, data_depth};
use crate::summary::EventOutcome;

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
    fn a_failure_hands_on_what_went_wrong() {
        let mut failed = outcome(Status::Failed, None);
        failed.exit_code = Some(3);
        assert_eq!(
            routed_data("order", &failed).unwrap(),
            json!({"event": "order", "id": "p1", "error": "exit", "message": "exit code 3", "exitCode": 3})
        );
    }
}
