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

/// Marks ids Jobico derived (batch items, hashed keys, CloudEvents): a client key containing
/// it is never used as an id literally, so derived ids and literal keys never collide.
pub const DERIVED_MARK: &str = "--";

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
    /// id that does not contain [`DERIVED_MARK`], otherwise [`EventId::hashed`] of the key, so
    /// the same key always maps to the same id and no key maps to an id derived for something
    /// else (a batch item, a CloudEvent).
    pub fn from_client_key(key: &str) -> Self {
        match Self::parse(key) {
            Ok(id) if !key.contains(DERIVED_MARK) => id,
            _ => Self::hashed(key),
        }
    }

    /// The id of item `index` of a batch sent with client key `key`: `<key>--<index>`, or
    /// `h--<digest of key>--<index>` when the key is not used as it is (see
    /// [`EventId::from_client_key`]) or is too long to carry the suffix. Ids containing `--`
    /// are never taken from a client key literally, so an item id cannot collide with the
    /// id of a single event sent with another key.
    pub fn batch_item(key: &str, index: usize) -> Self {
        let suffix = format!("{DERIVED_MARK}{index}");
        let base = Self::from_client_key(key);
        if base.0.len() + suffix.len() <= MAX_EVENT_ID_LEN {
            Self(format!("{}{suffix}", base.0))
        } else {
            Self(format!("{}{suffix}", Self::hashed(key).0))
        }
    }

    /// The id of a CloudEvent: CloudEvents makes `source` + `id` unique, not `id` alone, so
    /// both go into it (always in the hashed form, since sources are URI references).
    pub fn from_cloud_event(source: &str, id: &str) -> Self {
        // NUL cannot occur in either attribute (they are JSON strings or header values
        // validated as visible ASCII), so the pair is unambiguous.
        Self::hashed(&format!("{source}\0{id}"))
    }

    /// `h--` followed by the first 40 hex digits of the SHA-256 of `text`.
    fn hashed(text: &str) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(text.as_bytes());
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
    }

    #[test]
    fn derived_ids_never_collide_with_literal_keys() {
        let item = EventId::batch_item("K", 1);
        assert_eq!(item.as_str(), "K--1");
        assert_ne!(EventId::from_client_key(item.as_str()), item);
        assert_ne!(EventId::from_client_key("K-1"), item);
        let long = "x".repeat(60);
        for index in [0, 999] {
            let id = EventId::batch_item(&long, index);
            assert!(EventId::parse(id.as_str()).is_ok(), "{id}");
            assert!(id.as_str().ends_with(&format!("--{index}")));
        }
        assert_ne!(EventId::batch_item(&long, 1), EventId::batch_item(&long, 2));
        // CloudEvents: the same id from two sources is two events; the same pair is one.
        let a = EventId::from_cloud_event("/a", "1");
        assert_ne!(a, EventId::from_cloud_event("/b", "1"));
        assert_eq!(a, EventId::from_cloud_event("/a", "1"));
        assert_ne!(a, EventId::from_cloud_event("/a1", ""));
        assert!(EventId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: EventId = serde_json::from_str("\"e-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"e-1\"");
        assert!(serde_json::from_str::<EventId>("\"bad id\"").is_err());
    }
}
