//! What an accepted event becomes on the wire: the NATS headers of its JetStream message, and
//! the checks every event passes before any event of its request is kept.
//!
//! The ingress checks each record with [`check`] after parsing and schema validation, in the one
//! path every body mode (JSON, JobicoK8S batch, CloudEvents binary, structured and batch) goes
//! through, so a request is refused whole (400) before anything is stored. The JetStream
//! publisher builds the headers with [`headers`], the same function, so nothing that passed the
//! check can fail (or, as async-nats's infallible conversions do, panic) at publish time.

use async_nats::HeaderMap;
use async_nats::header::{HeaderValue, NATS_MESSAGE_ID};
use jobico_common::EventRecord;
use jobico_common::subject::{HEADER_EVENT, HEADER_EVENT_ID, HEADER_NAMESPACE, HEADER_TRACEPARENT};

/// Event attribute holding the W3C trace context (the CloudEvents distributed-tracing
/// extension); it also travels as the message's `traceparent` header.
pub const TRACEPARENT_ATTRIBUTE: &str = "traceparent";

/// Why an event cannot become a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// A value bound for a NATS header contains a character the NATS protocol cannot carry.
    #[error(
        "{what} contains a line break or other control character, which cannot travel in a message header"
    )]
    HeaderValue {
        /// Which value (`attribute "traceparent"`, `namespace`, ...).
        what: String,
    },
    /// The `traceparent` attribute is not a W3C trace context.
    #[error(
        "traceparent {0:?} is not a W3C trace context (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase hex, ids not all zero)"
    )]
    Traceparent(String),
}

/// `Nats-Msg-Id` of an event (see [`jobico_common::subject::message_id`]).
pub fn message_id(record: &EventRecord) -> String {
    jobico_common::subject::message_id(&record.namespace, &record.event, record.id.as_str())
}

fn header_value(what: &str, value: &str) -> Result<HeaderValue, InvalidMessage> {
    // NATS headers are text lines: any control character (not only CR and LF, which async-nats
    // checks) is refused, so a header reads back exactly as it was sent.
    if value.chars().any(char::is_control) {
        return Err(InvalidMessage::HeaderValue {
            what: what.to_string(),
        });
    }
    value.parse().map_err(|_| InvalidMessage::HeaderValue {
        what: what.to_string(),
    })
}

/// Checks a W3C `traceparent` (Trace Context level 1): `version-traceid-parentid-flags`, lowercase
/// hex, version not `ff`, ids not all zero; versions above `00` may append `-` and more fields.
pub fn check_traceparent(value: &str) -> Result<(), InvalidMessage> {
    let invalid = || InvalidMessage::Traceparent(value.to_string());
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut fields = value.splitn(5, '-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(invalid());
    };
    let rest = fields.next();
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        // Version 00 has exactly four fields; later versions may add fields after a dash.
        && (rest.is_none() || (version != "00" && rest.is_some_and(|r| r.bytes().all(|b| b.is_ascii_graphic()))));
    if valid { Ok(()) } else { Err(invalid()) }
}

/// The headers of `record`'s message: `Nats-Msg-Id`, `Jobico-Event-Id`, `Jobico-Event`,
/// `Jobico-Namespace` and, when the event has one, `traceparent`.
pub fn headers(record: &EventRecord) -> Result<HeaderMap, InvalidMessage> {
    let mut headers = HeaderMap::new();
    headers.insert(
        NATS_MESSAGE_ID,
        header_value("the message id", &message_id(record))?,
    );
    headers.insert(
        HEADER_EVENT_ID,
        header_value("the event id", record.id.as_str())?,
    );
    headers.insert(HEADER_EVENT, header_value("the event name", &record.event)?);
    headers.insert(
        HEADER_NAMESPACE,
        header_value("the namespace", &record.namespace)?,
    );
    if let Some(traceparent) = record.attributes.get(TRACEPARENT_ATTRIBUTE) {
        let value = header_value("attribute \"traceparent\"", traceparent)?;
        check_traceparent(traceparent)?;
        headers.insert(HEADER_TRACEPARENT, value);
    }
    Ok(headers)
}

/// Checks that `record` can become a message (see the module docs).
pub fn check(record: &EventRecord) -> Result<(), InvalidMessage> {
    headers(record).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobico_common::EventId;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn record(traceparent: Option<&str>) -> EventRecord {
        EventRecord {
            id: EventId::parse("e-1").unwrap(),
            namespace: "default".into(),
            event: "ev1".into(),
            data: serde_json::json!({}),
            attributes: traceparent
                .map(|t| (TRACEPARENT_ATTRIBUTE.to_string(), t.to_string()))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn headers_carry_ids_and_the_trace_context() {
        let headers = headers(&record(Some(TP))).unwrap();
        assert_eq!(
            headers.get(NATS_MESSAGE_ID).unwrap().as_str(),
            "default.ev1.e-1"
        );
        assert_eq!(headers.get(HEADER_TRACEPARENT).unwrap().as_str(), TP);
        assert!(
            super::headers(&record(None))
                .unwrap()
                .get(HEADER_TRACEPARENT)
                .is_none()
        );
    }

    #[test]
    fn traceparents_are_w3c_trace_contexts() {
        for ok in [
            TP,
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra",
        ] {
            assert_eq!(check_traceparent(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(check_traceparent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        for bad in [
            format!("{TP}\n"),
            format!("{TP}\r\nNats-Msg-Id: x"),
            format!("{TP}\u{0}"),
        ] {
            let error = check(&record(Some(&bad))).unwrap_err();
            assert!(
                matches!(error, InvalidMessage::HeaderValue { .. }),
                "{bad:?}"
            );
            assert!(error.to_string().contains("traceparent"), "{error}");
        }
        let mut bad_namespace = record(None);
        bad_namespace.namespace = "a\nb".into();
        assert!(check(&bad_namespace).is_err());
    }
}
