//! The POST of one CloudEvent to a sink, under a [`SinkPolicy`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jobico_common::sink::{CLOUDEVENTS_CONTENT_TYPE, SinkMessage, SinkStatus};
use jobico_common::summary::cut;

use super::policy::{GuardedResolver, SinkPolicy};
use super::{SinkSettings, attempt_record};

/// POSTs CloudEvents to sinks under a [`SinkPolicy`].
#[derive(Clone)]
pub struct SinkClient {
    http: reqwest::Client,
    policy: Arc<SinkPolicy>,
}

impl std::fmt::Debug for SinkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkClient")
            .field("policy", &self.policy)
            .finish()
    }
}

impl SinkClient {
    /// A client that reaches only what `policy` allows, each POST bounded by `timeout`.
    pub fn new(policy: SinkPolicy, timeout: Duration) -> Self {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver(policy.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("jobico-dispatcher/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the sink HTTP client builds");
        Self { http, policy }
    }

    /// POSTs `body`, a structured CloudEvent, to `url`: `Ok` once the receiver answered 2xx,
    /// else why not (for the state record).
    pub async fn post(&self, url: &str, body: Bytes) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        }
        // An address written in the URL is not resolved, so the resolver never sees it.
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            _ => None,
        };
        if let Some(refusal) = literal.and_then(|ip| self.policy.refusal(ip)) {
            return Err(refusal);
        }
        let response = self
            .http
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE)
            .body(body)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let detail = error_detail(response).await;
        let detail = detail.trim();
        Err(if detail.is_empty() {
            format!("the receiver answered {status}")
        } else {
            format!("the receiver answered {status}: {}", cut(detail, 200))
        })
    }

    /// Delivers `message` without an outbox (local mode without NATS): tries until taken or
    /// the attempts run out, reporting each attempt to `report`. Nothing survives the process.
    pub async fn deliver_now(
        &self,
        message: &SinkMessage,
        settings: &SinkSettings,
        report: impl Fn(&SinkStatus),
    ) -> SinkStatus {
        let body =
            Bytes::from(serde_json::to_vec(&message.cloud_event).expect("a CloudEvent serialises"));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let posted = self.post(&message.url, body.clone()).await;
            let status = attempt_record(
                &message.url,
                attempts,
                posted,
                attempts >= settings.max_attempts,
            );
            report(&status);
            if status.delivered_at.is_some() || status.gave_up {
                return status;
            }
            tokio::time::sleep(settings.backoff(attempts)).await;
        }
    }
}

/// Most bytes of a refusal's body read (for the state record): a receiver cannot make the
/// dispatcher hold more by answering with a huge body.
const MAX_ERROR_BODY: usize = 1024;

/// The start of a refusal's body, as text, reading no more than [`MAX_ERROR_BODY`] bytes.
async fn error_detail(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())])
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// A reqwest error with its causes (the resolver's refusal, a connection refused).
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "the receiver did not answer in time".to_owned()
    } else if error.is_connect() {
        "cannot connect to the receiver".to_owned()
    } else {
        "the POST failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_with_a_huge_body_is_read_no_further_than_its_start() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        // 1 GiB announced and sent as fast as the client takes it; counts what it could send.
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0; 4096];
            let _ = stream.read(&mut request).await;
            let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 1073741824\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            let block = vec![b'x'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 1 << 30 {
                if stream.write_all(&block).await.is_err() {
                    break;
                }
                sent += block.len();
            }
            sent
        });
        let client = SinkClient::new(
            SinkPolicy {
                allow_loopback: true,
                denied: vec![],
            },
            Duration::from_secs(30),
        );
        let error = client
            .post(&url, Bytes::from_static(b"{}"))
            .await
            .unwrap_err();
        assert!(error.starts_with("the receiver answered 500 Internal Server Error: xxx"));
        assert!(error.len() < 300, "{}", error.len());
        let sent = server.await.unwrap();
        assert!(
            sent < 64 << 20,
            "the client read {sent} bytes of the refusal"
        );
    }

    #[tokio::test]
    async fn literal_addresses_are_checked_before_any_connection() {
        let client = SinkClient::new(SinkPolicy::default(), Duration::from_secs(1));
        let refused = client
            .post("http://169.254.169.254/latest/meta-data", Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(
            refused,
            "169.254.169.254 is a link-local address, which sinks may not reach"
        );
        let refused = client
            .post("http://[::1]:9/", Bytes::new())
            .await
            .unwrap_err();
        assert!(refused.contains("loopback"), "{refused}");
        let by_name = client
            .post("http://localhost:9/", Bytes::new())
            .await
            .unwrap_err();
        assert!(
            by_name.contains("resolves to no address sinks may reach"),
            "{by_name}"
        );
    }
}
