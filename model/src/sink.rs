//! Results out: an event's `sink` receives each outcome as a CloudEvent.
//!
//! The outcome of every run (a success with its result, or a failure in the module) is
//! POSTed to the sink's URL as a structured-mode CloudEvent (`application/cloudevents+json`,
//! see `jobico_common::sink`), retried with backoff until the receiver answers 2xx: at least
//! once, each time with the same CloudEvent `id` (the event's), so a receiver can drop
//! repeats.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Longest sink URL.
pub const MAX_SINK_URL_LEN: usize = 2048;

/// Where an event's outcomes go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sink {
    /// An `http://` or `https://` URL that receives each outcome as a CloudEvent (POST,
    /// structured mode). No credentials in it: the resource is readable by whoever may read
    /// it.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
}

impl Sink {
    /// What is wrong with the URL, or nothing.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.url.len() > MAX_SINK_URL_LEN {
            problems.push(format!(
                "is {} characters, more than {MAX_SINK_URL_LEN}",
                self.url.len()
            ));
            return problems;
        }
        // The URL travels in a NATS header and an HTTP request line as written: nothing a
        // parser would silently drop (tabs, newlines) or that could end a header.
        if self
            .url
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            problems.push(format!(
                "{:?} contains whitespace or control characters",
                self.url
            ));
            return problems;
        }
        let url = match url::Url::parse(&self.url) {
            Ok(url) => url,
            Err(error) => {
                problems.push(format!("{:?} is not a URL: {error}", self.url));
                return problems;
            }
        };
        if !matches!(url.scheme(), "http" | "https") {
            problems.push(format!(
                "{:?} must be an http:// or https:// URL, not {}://",
                self.url,
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            problems.push(format!("{:?} names no host", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            problems.push(format!(
                "{:?} holds credentials, which everyone who can read the resource would see",
                redacted(&url)
            ));
        }
        if url.fragment().is_some() {
            problems.push(format!(
                "{:?} has a fragment, which is never sent",
                self.url
            ));
        }
        problems
    }
}

/// `url` without its credentials.
fn redacted(url: &url::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(url: &str) -> Sink {
        Sink { url: url.into() }
    }

    #[test]
    fn sink_urls_are_http_with_a_host_and_no_credentials() {
        assert!(
            sink("http://receiver.apps.svc:8080/events")
                .problems()
                .is_empty()
        );
        assert!(
            sink("https://hooks.example.com/jobico?x=1")
                .problems()
                .is_empty()
        );
        assert_eq!(
            sink("ftp://example.com/").problems(),
            ["\"ftp://example.com/\" must be an http:// or https:// URL, not ftp://"]
        );
        assert_eq!(
            sink("https://user:hunter2@example.com/").problems(),
            [
                "\"https://example.com/\" holds credentials, which everyone who can read the resource would see"
            ]
        );
        assert!(sink("not-a-url").problems()[0].starts_with("\"not-a-url\" is not a URL"));
        assert_eq!(
            sink("http://example.com/#x").problems(),
            ["\"http://example.com/#x\" has a fragment, which is never sent"]
        );
        assert_eq!(
            sink("http://example.com/\r\nJobico-Event-Id: forged").problems(),
            [
                "\"http://example.com/\\r\\nJobico-Event-Id: forged\" contains whitespace or control characters"
            ]
        );
        let long = format!("http://example.com/{}", "a".repeat(MAX_SINK_URL_LEN));
        assert_eq!(sink(&long).problems().len(), 1);
    }
}
