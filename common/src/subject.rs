//! NATS names: the stream, its subjects and the message headers.
//!
//! Subject scheme: `jobico.<namespace>.<event>.<id>`. Kubernetes namespaces are DNS labels and
//! event names are alphanumeric, so neither can contain the `.`, `*` or `>` that NATS treats
//! specially; an id may contain single dots (it is then several tokens, never an empty one) but
//! never a wildcard. The id in the subject lets the status route find an event that is stored
//! but not yet dispatched (`jobico.<namespace>.*.<id>`), so accepting an event takes a single
//! JetStream write.

/// The single event stream of earlier releases (subjects `jobico.>`). Its subjects overlap
/// every namespace's stream, so the dispatcher removes it once it is empty and refuses to start
/// beside one that still holds events (see the README's upgrade note).
pub const LEGACY_STREAM: &str = "JOBICO";

/// Prefix of the per-namespace event streams: `JOBICO-<namespace>`.
const STREAM_PREFIX: &str = "JOBICO-";

/// The JetStream stream holding the accepted events of `namespace`. One stream per namespace
/// gives each tenant its own byte and message limits: one namespace's backlog never fills
/// another's stream.
pub fn stream_name(namespace: &str) -> String {
    format!("{STREAM_PREFIX}{namespace}")
}

/// The namespace whose events stream `name` holds, for names made by [`stream_name`].
pub fn parse_stream_name(name: &str) -> Option<&str> {
    name.strip_prefix(STREAM_PREFIX).filter(|ns| !ns.is_empty())
}

/// The subjects the stream of `namespace` captures: `jobico.<namespace>.>`.
pub fn stream_subjects(namespace: &str) -> String {
    format!("jobico.{namespace}.>")
}

/// Prefix of dead-letter subjects: `jobico-dlq.<namespace>.<event>` (outside the main stream).
pub const DEAD_LETTER_PREFIX: &str = "jobico-dlq";

/// KV bucket holding each event's state, keyed by `<namespace>.<event>.<event id>`.
pub const STATE_BUCKET: &str = "jobico-events";

/// Inbox prefix of the ingress's connections: the replies to its JetStream requests (publish
/// acks, lookups) arrive below it, and the deployed NATS lets only the ingress's user
/// subscribe there.
pub const INGRESS_INBOX: &str = "_INBOX.jobico-apiserver";

/// Inbox prefix of the dispatcher's connections (pulled messages, KV and API replies).
pub const DISPATCHER_INBOX: &str = "_INBOX.jobico-dispatcher";

/// Header carrying the event id (also sent as `Nats-Msg-Id` for deduplication).
pub const HEADER_EVENT_ID: &str = "Jobico-Event-Id";
/// Header carrying the event name.
pub const HEADER_EVENT: &str = "Jobico-Event";
/// Header carrying the namespace.
pub const HEADER_NAMESPACE: &str = "Jobico-Namespace";
/// W3C trace context header, passed through from the HTTP request when present.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// The subject event `id` is published on.
pub fn event_subject(namespace: &str, event: &str, id: &str) -> String {
    format!("jobico.{namespace}.{event}.{id}")
}

/// The `Nats-Msg-Id` of an event, what JetStream deduplicates on: `<namespace>.<event>.<id>`,
/// so the same id in two event types is two events.
pub fn message_id(namespace: &str, event: &str, id: &str) -> String {
    format!("{namespace}.{event}.{id}")
}

/// The (namespace, event, id) of an event subject made by [`event_subject`].
pub fn parse_event_subject(subject: &str) -> Option<(&str, &str, &str)> {
    let rest = subject.strip_prefix("jobico.")?;
    let (namespace, rest) = rest.split_once('.')?;
    let (event, id) = rest.split_once('.')?;
    (!namespace.is_empty() && !event.is_empty() && !id.is_empty()).then_some((namespace, event, id))
}

/// The filter matching every event of one type (a consumer's filter subject).
pub fn event_filter(namespace: &str, event: &str) -> String {
    format!("jobico.{namespace}.{event}.>")
}

/// The filter matching event `id` of any type in `namespace` (the status route's stream lookup).
pub fn id_filter(namespace: &str, id: &str) -> String {
    format!("jobico.{namespace}.*.{id}")
}

/// The dead-letter subject for an event type.
pub fn dead_letter_subject(namespace: &str, event: &str) -> String {
    format!("{DEAD_LETTER_PREFIX}.{namespace}.{event}")
}

/// Header on dead-lettered messages saying why.
pub const HEADER_DEAD_LETTER_REASON: &str = "Jobico-Dead-Letter-Reason";

/// The `Nats-Msg-Id` of event `id`'s dead letter, so a second attempt keeps one.
pub fn dead_letter_message_id(namespace: &str, event: &str, id: &str) -> String {
    format!("dlq-{namespace}.{event}.{id}")
}

/// `text` as a header value: a single line of visible ASCII (anything else becomes a space).
pub fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .collect()
}

/// The state-bucket key of an event: `<namespace>.<event>.<id>`. An event is identified by
/// all three: two event types (or two CloudEvents sources) may use the same id.
pub fn state_key(namespace: &str, event: &str, id: &str) -> String {
    format!("{namespace}.{event}.{id}")
}

/// The key filter matching event `id` of any type in `namespace` (the status lookup by id).
pub fn state_key_filter(namespace: &str, id: &str) -> String {
    format!("{namespace}.*.{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_scheme() {
        assert_eq!(
            event_subject("default", "ev1", "x.1"),
            "jobico.default.ev1.x.1"
        );
        assert_eq!(event_filter("default", "ev1"), "jobico.default.ev1.>");
        assert_eq!(
            parse_event_subject("jobico.default.ev1.x.1"),
            Some(("default", "ev1", "x.1"))
        );
        assert_eq!(parse_event_subject("jobico.default.ev1"), None);
        assert_eq!(message_id("ns", "ev1", "a.b"), "ns.ev1.a.b");
        assert_eq!(parse_event_subject("jobico-dlq.a.b.c"), None);
        assert_eq!(id_filter("default", "x.1"), "jobico.default.*.x.1");
        assert_eq!(dead_letter_subject("ns", "e"), "jobico-dlq.ns.e");
        assert_eq!(state_key("ns", "ev1", "id-1"), "ns.ev1.id-1");
        assert_eq!(state_key_filter("ns", "a.b"), "ns.*.a.b");
        assert_eq!(stream_name("team-a"), "JOBICO-team-a");
        assert_eq!(parse_stream_name(&stream_name("team-a")), Some("team-a"));
        assert_eq!(parse_stream_name(LEGACY_STREAM), None);
        assert_eq!(parse_stream_name("JOBICO_DLQ"), None);
        assert_eq!(parse_stream_name("JOBICO-"), None);
        assert!(
            event_subject("a", "b", "c").starts_with(stream_subjects("a").trim_end_matches('>'))
        );
    }
}
