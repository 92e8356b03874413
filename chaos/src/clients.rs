//! Clients that retry as the README tells them: the same `Idempotency-Key` until `202`, after
//! a `503` (its `Retry-After`), a `408`, or a connection the server dropped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

/// Longest pause between retries: a `Retry-After` of 2 s is cut to this so a short run
/// drains quickly (clients may retry sooner than told).
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Keys sent.
    pub attempted: usize,
    /// Keys answered `202`, with the id the ingress gave.
    pub acked: HashSet<String>,
    /// When the last `202` arrived.
    pub last_ack: Option<Instant>,
    /// Answers that were neither `202` nor retryable (a defect under these scenarios).
    pub unexpected: Vec<String>,
}

/// Sends one `ev1` event per key, `concurrency` at once, each retried until `202` or until
/// `deadline`.
pub async fn send_all(
    base: &str,
    keys: Vec<String>,
    concurrency: usize,
    deadline: Instant,
) -> Sent {
    send_to(base, "default/ev1", keys, concurrency, deadline).await
}

/// [`send_all`] to event `target` (`<namespace>/<event>`).
pub async fn send_to(
    base: &str,
    target: &str,
    keys: Vec<String>,
    concurrency: usize,
    deadline: Instant,
) -> Sent {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let sent = Arc::new(Mutex::new(Sent {
        attempted: keys.len(),
        ..Default::default()
    }));
    futures::stream::iter(keys)
        .map(|key| {
            let (client, sent) = (client.clone(), sent.clone());
            let url = format!("{base}/execute/{target}");
            async move {
                let body = format!(r#"{{"firstName":"Chaos","lastName":"{key}"}}"#);
                while Instant::now() < deadline {
                    let answer = client
                        .put(&url)
                        .header("Idempotency-Key", &key)
                        .body(body.clone())
                        .send()
                        .await;
                    let pause = match answer {
                        Ok(response) if response.status().as_u16() == 202 => {
                            let value: serde_json::Value =
                                response.json().await.unwrap_or_default();
                            let id = value["ids"][0].as_str().unwrap_or(&key).to_owned();
                            let mut sent = sent.lock().unwrap();
                            sent.acked.insert(id);
                            sent.last_ack = Some(Instant::now());
                            return;
                        }
                        Ok(response) if matches!(response.status().as_u16(), 503 | 408) => response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .map_or(MAX_RETRY_PAUSE, Duration::from_secs)
                            .min(MAX_RETRY_PAUSE),
                        Ok(response) => {
                            let status = response.status();
                            let text = response.text().await.unwrap_or_default();
                            sent.lock()
                                .unwrap()
                                .unexpected
                                .push(format!("{key}: {status} {text}"));
                            return;
                        }
                        // Refused or dropped: the ingress is restarting.
                        Err(_) => Duration::from_millis(100),
                    };
                    tokio::time::sleep(pause).await;
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    sent.lock().unwrap().clone()
}
