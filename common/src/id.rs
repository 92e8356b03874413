//! Event ids.
//!
//! One id follows an event everywhere: it is the JetStream `Nats-Msg-Id` (so retries are
//! deduplicated), the value of the `jobico.coeux.dev/event-id` label, the seed of the Kubernetes
//! Job's name, the last tokens of its NATS subject and the key of the event's state record. It
//! must therefore be a valid Kubernetes label value (at most 63 characters of `[A-Za-z0-9._-]`,
//! starting and ending alphanumeric) and a valid run of NATS subject tokens (no `..`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id we accept: the limit on a Kubernetes label value.
pub const MAX_EVENT_ID_LEN: usize = 63;

/// Marks ids Jobico derived (batch items, hashed keys, CloudEvents: `h--<40 hex>`): a client
/// key containing it is used as an id literally only when it is exactly such an id.
pub const DERIVED_MARK: &str = "--";

/// Whether `id` has the form of a derived id: `h--` and 40 lowercase hex digits.
fn is_hashed(id: &str) -> bool {
    id.strip_prefix("h--").is_some_and(|hex| {
        hex.len() == 40 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A validated event id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventId(String);

/// Why a string is not an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event id {id:?}: {reason}")]
pub struct InvalidEventId {
    /// The rejected string.
    pub id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl EventId {
    /// A new, time-ordered, globally unique id (a UUIDv7 in its hyphenated lowercase form).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Checks that `id` can serve as an event id.
    pub fn parse(id: impl Into<String>) -> Result<Self, InvalidEventId> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("must not be empty")
        } else if id.len() > MAX_EVENT_ID_LEN {
            Some("must be at most 63 characters")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            Some("may contain only ASCII letters, digits, '-', '_' and '.'")
        } else if !id.as_bytes()[0].is_ascii_alphanumeric()
            || !id.as_bytes()[id.len() - 1].is_ascii_alphanumeric()
        {
            Some("must start and end with a letter or digit")
        } else if id.contains("..") {
            // The id ends the event's NATS subject, where `..` would be an empty token.
            Some("must not contain '..'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidEventId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The id for a client-supplied key (`Idempotency-Key`): the key itself when it is a valid
    /// id that does not contain [`DERIVED_MARK`], or is exactly the hashed form Jobico derives
    /// (so sending back an id Jobico assigned, as the 503 retry recipe does, gives that same
    /// id); otherwise the hashed form of the key. The same key always maps to the same id, and
    /// no key maps by accident to an id derived for something else (a batch item, a
    /// CloudEvent): that takes knowing the digest.
    pub fn from_client_key(key: &str) -> Self {
        match Self::parse(key) {
            Ok(id) if !key.contains(DERIVED_MARK) || is_hashed(key) => id,
            _ => Self::hashed("key", &[key]),
        }
    }

    /// The id of item `index` of a batch sent with client key `key` (hashed, like every id
    /// Jobico derives), so no item id collides with a literal key such as `<key>-1`.
    pub fn batch_item(key: &str, index: usize) -> Self {
        Self::hashed("batch-item", &[key, &index.to_string()])
    }

    /// The id of a CloudEvent: CloudEvents makes `source` + `id` unique, not `id` alone, so
    /// both go into it.
    pub fn from_cloud_event(source: &str, id: &str) -> Self {
        Self::hashed("cloudevent", &[source, id])
    }

    /// The id of the event route `route` (its index in `then`) of event `event` publishes for
    /// the parent `parent` in `namespace`: the same parent and route always give the same id,
    /// so a redelivered or re-run parent publishes no second child.
    pub fn routed(namespace: &str, event: &str, parent: &str, route: usize) -> Self {
        Self::hashed("route", &[namespace, event, parent, &route.to_string()])
    }

    /// `h--` followed by the first 40 hex digits of the SHA-256 of `domain` and `parts`, each
    /// followed by NUL (which no key, index or attribute contains: headers and JSON strings
    /// validated as visible text), so each kind of derivation has its own ids.
    fn hashed(domain: &str, parts: &[&str]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in std::iter::once(&domain).chain(parts) {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
        Self(format!("h{DERIVED_MARK}{hex}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for EventId {
    type Error = InvalidEventId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<EventId> for String {
    fn from(id: EventId) -> Self {
        id.0
    }
}

impl AsRef<str> for EventId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = EventId::generate();
        let b = EventId::generate();
        assert_ne!(a, b);
        assert_eq!(EventId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn parse_accepts_label_values_and_rejects_the_rest() {
        let cases: &[(&str, bool)] = &[
            ("abc", true),
            ("order-42.v1_x", true),
            ("A", true),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
            ("", false),
            ("-abc", false),
            ("abc.", false),
            ("a..b", false),
            ("a.b.c", true),
            ("has space", false),
            ("slash/no", false),
            ("ünïcode", false),
        ];
        for (id, ok) in cases {
            assert_eq!(EventId::parse(*id).is_ok(), *ok, "{id:?}");
        }
    }

    #[test]
    fn client_keys_map_to_stable_valid_ids() {
        assert_eq!(EventId::from_client_key("order-42").as_str(), "order-42");
        let hashed = EventId::from_client_key("urn:order/42");
        assert_eq!(hashed, EventId::from_client_key("urn:order/42"));
        assert_ne!(hashed, EventId::from_client_key("urn:order/43"));
        assert_eq!(hashed.as_str().len(), 43);
        assert!(EventId::parse(hashed.as_str()).is_ok());
        assert!(EventId::parse(EventId::from_client_key(&"x".repeat(500)).as_str()).is_ok());
        assert!(EventId::from_client_key("a..b").as_str().starts_with("h--"));
        // A key that looks derived is hashed, so it cannot take a derived id.
        assert!(EventId::from_client_key("K--1").as_str().starts_with("h--"));
        assert_ne!(EventId::from_client_key("K--1").as_str(), "K--1");
    }

    #[test]
    fn derived_ids_never_collide_with_literal_keys_and_come_back_unchanged() {
        let item = EventId::batch_item("K", 1);
        assert!(is_hashed(item.as_str()), "{item}");
        assert_ne!(EventId::from_client_key("K-1"), item);
        assert_ne!(EventId::from_client_key("K--1"), item);
        assert_ne!(EventId::batch_item("K", 1), EventId::batch_item("K", 2));
        assert_ne!(EventId::batch_item("K", 1), EventId::batch_item("K1", 1));
        // Sending an assigned id back as a key gives that id (the 503 retry recipe).
        for assigned in [
            item.clone(),
            EventId::from_cloud_event("/a", "1"),
            EventId::generate(),
        ] {
            assert_eq!(EventId::from_client_key(assigned.as_str()), assigned);
        }
        // A key that only looks derived is hashed.
        assert!(EventId::from_client_key("h--xyz").as_str() != "h--xyz");
        // CloudEvents: the same id from two sources is two events; the same pair is one.
        let a = EventId::from_cloud_event("/a", "1");
        assert_ne!(a, EventId::from_cloud_event("/b", "1"));
        assert_eq!(a, EventId::from_cloud_event("/a", "1"));
        assert_ne!(a, EventId::from_cloud_event("/a1", ""));
        // Each derivation has its own ids.
        assert_ne!(
            EventId::batch_item("/a", 1),
            EventId::from_cloud_event("/a", "1")
        );
        assert!(EventId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: EventId = serde_json::from_str("\"e-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"e-1\"");
        assert!(serde_json::from_str::<EventId>("\"bad id\"").is_err());
    }
}
