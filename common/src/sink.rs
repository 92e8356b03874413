//! Results out: the CloudEvent an event's sink receives for each outcome, and the outbox it
//! waits in.
//!
//! Whoever learns an outcome (the ingress's results endpoint in a cluster, local mode after a
//! run) keeps the CloudEvent in the JetStream stream [`SINK_STREAM`] (one message per event,
//! deduplicated by the event's id) and the dispatcher delivers it: POST in structured mode
//! (`content-type: application/cloudevents+json`), retried with backoff until the receiver
//! answers 2xx, each attempt recorded in the event's state record ([`SinkStatus`]).
//!
//! ```json
//! {"specversion": "1.0", "id": "<event id>", "type": "dev.coeux.jobico.order.succeeded",
//!  "source": "/apis/jobico.coeux.dev/v1/namespaces/shop/jobs/orders", "subject": "<event id>",
//!  "time": "2026-12-06T20:00:00Z", "datacontenttype": "application/json", "data": {…}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chain::{dead_letter_data, routed_data};
use crate::summary::EventOutcome;

/// The stream holding the CloudEvents not yet delivered (subjects [`SINK_SUBJECTS`]).
pub const SINK_STREAM: &str = "JOBICO_SINKS";
/// The subjects of [`SINK_STREAM`].
pub const SINK_SUBJECTS: &str = "jobico-sinks.>";
/// Header of an outbox message naming the URL it goes to (the sink in force when the outcome
/// was known).
pub const HEADER_SINK_URL: &str = "Jobico-Sink-Url";
/// The content type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The outbox subject of an outcome of `event` in `namespace`.
pub fn sink_subject(namespace: &str, event: &str) -> String {
    format!("jobico-sinks.{namespace}.{event}")
}

/// The deduplication id of the outbox message for event `id`: one delivery per event, however
/// often its outcome is reported.
pub fn sink_message_id(namespace: &str, event: &str, id: &str) -> String {
    format!("sink.{namespace}.{event}.{id}")
}

/// A CloudEvent 1.0 in its JSON (structured) form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// The event's id: the same for every delivery of one outcome.
    pub id: String,
    /// `/apis/jobico.coeux.dev/v1/namespaces/<namespace>/jobs/<resource>`.
    pub source: String,
    /// `dev.coeux.jobico.<event>.succeeded` or `….failed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The event's id.
    pub subject: String,
    /// When the outcome was known (RFC 3339).
    pub time: String,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The result parsed as JSON (a string when it is not JSON, null when there is none), or
    /// for a failure the object a `failed` route hands on.
    pub data: Value,
}

impl CloudEvent {
    /// The CloudEvent of `outcome` of event `event` declared by resource `resource` of
    /// `namespace`, stamped `time`.
    pub fn of_outcome(
        namespace: &str,
        resource: &str,
        event: &str,
        outcome: &EventOutcome,
        time: String,
    ) -> Self {
        let ending = if outcome.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        let data = routed_data(event, outcome).unwrap_or_else(|_| {
            outcome
                .result
                .as_ref()
                .map_or(Value::Null, |result| Value::String(result.clone()))
        });
        // Bounded like a dead letter's data, so the CloudEvent always fits in one message of
        // the outbox: a longer result goes out cut, as a string ending in `…`.
        let data = dead_letter_data(data);
        Self {
            specversion: "1.0".to_owned(),
            id: outcome.id.clone(),
            source: format!("/apis/jobico.coeux.dev/v1/namespaces/{namespace}/jobs/{resource}"),
            kind: format!("dev.coeux.jobico.{event}.{ending}"),
            subject: outcome.id.clone(),
            time,
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }
}

/// One outcome on its way to a sink: what the outbox keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkMessage {
    /// The event's namespace.
    pub namespace: String,
    /// The event's name.
    pub event: String,
    /// The URL it goes to.
    pub url: String,
    /// What is POSTed.
    pub cloud_event: CloudEvent,
}

/// What delivering an event's CloudEvent to its sink has come to, in the event's state record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkStatus {
    /// The URL it goes to.
    pub url: String,
    /// POSTs tried so far.
    pub attempts: u32,
    /// Why the last attempt failed (absent once delivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the receiver took it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    /// Set once the attempts ran out: it is not tried again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gave_up: bool,
}

impl SinkStatus {
    /// Whether this record says more than `stored` (more attempts, or delivered): a late write
    /// of an earlier attempt never hides a later one.
    pub fn supersedes(&self, stored: &SinkStatus) -> bool {
        if stored.delivered_at.is_some() || stored.gave_up {
            return false;
        }
        self.delivered_at.is_some() || self.gave_up || self.attempts > stored.attempts
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::chain::MAX_RESULT_BYTES;
    use crate::summary::{ErrorKind, Status};

    fn outcome(status: Status, result: Option<&str>) -> EventOutcome {
        EventOutcome {
            id: "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            status,
            exit_code: None,
            error: (status == Status::Failed).then_some(ErrorKind::Trap),
            message: (status == Status::Failed).then(|| "unreachable".to_owned()),
            warning: None,
            duration: Duration::from_millis(3),
            output_bytes: 0,
            output_truncated: false,
            result: result.map(str::to_owned),
        }
    }

    #[test]
    fn cloud_events_carry_the_result_or_the_failure() {
        let ok = CloudEvent::of_outcome(
            "shop",
            "orders",
            "order",
            &outcome(Status::Succeeded, Some(r#"{"total": 3}"#)),
            "2026-12-06T20:00:00Z".into(),
        );
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "specversion": "1.0",
                "id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
                "source": "/apis/jobico.coeux.dev/v1/namespaces/shop/jobs/orders",
                "type": "dev.coeux.jobico.order.succeeded",
                "subject": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
                "time": "2026-12-06T20:00:00Z",
                "datacontenttype": "application/json",
                "data": {"total": 3},
            })
        );
        let text = CloudEvent::of_outcome(
            "shop",
            "orders",
            "order",
            &outcome(Status::Succeeded, Some("done")),
            String::new(),
        );
        assert_eq!(text.data, Value::String("done".into()));
        let failed = CloudEvent::of_outcome(
            "shop",
            "orders",
            "order",
            &outcome(Status::Failed, None),
            String::new(),
        );
        assert_eq!(failed.kind, "dev.coeux.jobico.order.failed");
        assert_eq!(failed.data["error"], "trap");
        assert_eq!(failed.data["message"], "unreachable");
        // A result longer than a route hands on (local mode keeps up to its 1 MiB output cap)
        // goes out cut, so the CloudEvent fits in a NATS message.
        let huge = "\u{1}".repeat(1 << 20);
        let cut = CloudEvent::of_outcome(
            "shop",
            "orders",
            "order",
            &outcome(Status::Succeeded, Some(&huge)),
            String::new(),
        );
        let text = cut.data.as_str().unwrap();
        assert!(
            text.len() <= MAX_RESULT_BYTES + 4 && text.ends_with('…'),
            "{}",
            text.len()
        );
        assert!(serde_json::to_vec(&cut).unwrap().len() < 2 * MAX_RESULT_BYTES);
    }

    #[test]
    fn later_attempts_supersede_earlier_ones_and_nothing_supersedes_the_end() {
        let tried = |attempts| SinkStatus {
            url: "http://r".into(),
            attempts,
            ..Default::default()
        };
        assert!(tried(2).supersedes(&tried(1)));
        assert!(!tried(1).supersedes(&tried(2)));
        let delivered = SinkStatus {
            delivered_at: Some("t".into()),
            ..tried(1)
        };
        assert!(delivered.supersedes(&tried(3)));
        assert!(!tried(9).supersedes(&delivered));
    }
}
