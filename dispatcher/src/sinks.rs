//! Results out: delivering the outcomes kept in the sink outbox to their receivers.
//!
//! The ingress (or local mode) keeps each outcome of an event with a `sink` in the JetStream
//! stream [`SINK_STREAM`] as a CloudEvent (see [`jobico_common::sink`]). [`run`] pulls them
//! from one durable consumer and POSTs each to its URL; a 2xx answer acks it, anything else
//! (a refusal, a timeout, a redirect) retries it later with exponential backoff, until
//! [`SinkSettings::max_attempts`]. Every attempt is recorded in the event's state record
//! (`sink: {url, attempts, lastError, deliveredAt, gaveUp}`), so `GET /events/<ns>/<id>`
//! shows it. Delivery is at least once: a crash between the POST and the ack posts again,
//! with the same CloudEvent id.
//!
//! The deliverer runs with the dispatcher's network reach, and a tenant chooses the URL, so
//! [`SinkPolicy`] decides which addresses a sink may resolve to: never loopback (unless
//! allowed, as local mode does), link-local (cloud metadata endpoints), unspecified, multicast
//! or broadcast addresses, the addresses of the NATS servers and of the Kubernetes API this
//! dispatcher holds credentials for, nor the operator's `--sink-deny-cidr` ranges. The check
//! is made on the addresses the connection actually uses (the resolver filters them, so a
//! name that re-resolves elsewhere gains nothing), redirects are not followed and no proxy is
//! used.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use bytes::Bytes;
use futures::StreamExt;
use ipnet::IpNet;
use jobico_common::sink::{
    CLOUDEVENTS_CONTENT_TYPE, HEADER_SINK_URL, SINK_STREAM, SinkMessage, SinkStatus,
};
use jobico_common::subject::{HEADER_EVENT, HEADER_EVENT_ID, HEADER_NAMESPACE};
use jobico_store::{StateStore, StreamSettings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The outbox's durable consumer.
pub const SINK_CONSUMER: &str = "jobico-sinks";

/// Most outcomes handed out and not yet acked: those being POSTed and those waiting out their
/// backoff.
const MAX_PENDING: i64 = 100_000;

/// How outcomes are delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Deliveries of one namespace's outcomes in flight at once.
    pub per_namespace: usize,
    /// POSTs tried before an outcome is given up (recorded `gaveUp`).
    pub max_attempts: u32,
    /// How long one POST may take, connection included.
    pub timeout: Duration,
    /// Wait before the second attempt; doubled each time after.
    pub first_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            per_namespace: 8,
            // 1 s doubling to 5 min: about 2 hours of trying.
            max_attempts: 30,
            timeout: Duration::from_secs(10),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl SinkSettings {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.first_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// The sink flags of the dispatcher (and `jobico up`).
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Address ranges sinks may not reach, besides those always refused (loopback,
    /// link-local, the NATS servers, the Kubernetes API); e.g. the cluster's service range.
    /// Repeat or separate with commas.
    #[arg(
        long,
        env = "JOBICO_SINK_DENY_CIDR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub sink_deny_cidr: Vec<IpNet>,
    /// Deliveries in flight at once.
    #[arg(long, env = "JOBICO_SINK_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sink_concurrency: u16,
    /// Deliveries of one namespace's outcomes in flight at once (its share of
    /// --sink-concurrency: a tenant whose receiver hangs holds no more).
    #[arg(long, env = "JOBICO_SINK_CONCURRENCY_PER_NAMESPACE", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sink_concurrency_per_namespace: u16,
    /// POSTs tried before an outcome is given up.
    #[arg(long, env = "JOBICO_SINK_MAX_ATTEMPTS", default_value_t = SinkSettings::default().max_attempts,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sink_max_attempts: u32,
}

impl SinkArgs {
    /// The delivery settings these flags describe.
    pub fn settings(&self) -> SinkSettings {
        SinkSettings {
            concurrency: usize::from(self.sink_concurrency),
            per_namespace: usize::from(self.sink_concurrency_per_namespace),
            max_attempts: self.sink_max_attempts,
            ..SinkSettings::default()
        }
    }
}

/// Which addresses a sink may resolve to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkPolicy {
    /// Whether loopback addresses are allowed (local mode: the receiver is on this machine).
    pub allow_loopback: bool,
    /// Ranges refused besides the always refused ones.
    pub denied: Vec<IpNet>,
}

impl SinkPolicy {
    /// Why a sink may not reach `ip`, or `None` when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        // An IPv4 address written as IPv6 (::ffff:a.b.c.d) is that IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        let kind = match ip {
            _ if ip.is_loopback() && !self.allow_loopback => Some("a loopback address"),
            _ if ip.is_unspecified() => Some("an unspecified address"),
            _ if ip.is_multicast() => Some("a multicast address"),
            IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
            IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
            _ => None,
        };
        if let Some(kind) = kind {
            return Some(format!("{ip} is {kind}, which sinks may not reach"));
        }
        self.denied
            .iter()
            .find(|net| net.contains(&ip))
            .map(|net| format!("{ip} is in {net}, which sinks may not reach"))
    }

    /// This policy, also refusing every address `hosts` (`host[:port]` or URLs, e.g. the NATS
    /// servers) resolve to now.
    pub async fn denying_hosts_of(mut self, hosts: &[String]) -> Self {
        for host in hosts {
            let Some(authority) = authority(host) else {
                continue;
            };
            let target = if authority.contains(':') && !authority.ends_with(']') {
                authority.to_owned()
            } else {
                format!("{authority}:0")
            };
            match tokio::net::lookup_host(target.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        if self.refusal(addr.ip()).is_none() {
                            self.denied.push(IpNet::from(addr.ip()));
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(host, %error, "cannot resolve a host sinks may not reach")
                }
            }
        }
        self
    }
}

/// The host and port of `url` (`scheme://[user@]host[:port][/…]`, or a bare `host[:port]`).
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let end = rest.find(['/', '?', ',']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// A resolver that hands the HTTP client only the addresses the policy allows.
struct GuardedResolver(Arc<SinkPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusals = Vec::new();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.refusal(addr.ip()) {
                    Some(refusal) => {
                        refusals.push(refusal);
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let why = refusals
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "no address".into());
                return Err(
                    format!("{host} resolves to no address sinks may reach ({why})").into(),
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

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
        let mut status = SinkStatus {
            url: message.url.clone(),
            ..SinkStatus::default()
        };
        loop {
            status.attempts += 1;
            match self.post(&message.url, body.clone()).await {
                Ok(()) => {
                    status.last_error = None;
                    status.delivered_at = Some(jobico_store::now());
                }
                Err(error) => {
                    status.last_error = Some(error);
                    status.gave_up = status.attempts >= settings.max_attempts;
                }
            }
            report(&status);
            if status.delivered_at.is_some() || status.gave_up {
                return status;
            }
            tokio::time::sleep(settings.backoff(status.attempts)).await;
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

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Delivers the outbox until `shutdown`: ensures the stream and its consumer, then POSTs each
/// outcome, recording every attempt in the state bucket. Returns once the deliveries in
/// flight have ended.
pub async fn run(
    js: jetstream::Context,
    states: StateStore,
    client: SinkClient,
    settings: SinkSettings,
    streams: StreamSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stream = jobico_store::streams::ensure_sink_outbox(&js, &streams).await?;
    let consumer = stream
        .get_or_create_consumer(
            SINK_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(SINK_CONSUMER.to_owned()),
                description: Some("Jobico's sink deliveries".to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                // Longer than one POST plus the wait for a slot, so a delivery is not handed
                // out twice while it is worked on.
                ack_wait: settings.timeout * 3,
                // An outcome waiting out its backoff (a nak with a delay) stays pending, so
                // this bounds the outcomes in backoff at once, not the POSTs in flight: a
                // receiver that is down must not hold up everyone else's deliveries.
                max_ack_pending: MAX_PENDING,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating the consumer of {SINK_STREAM}: {e}"))?;
    // Pulled no faster than they are worked on: a message waits for a slot at most one POST.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(settings.concurrency.max(1))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("pulling from {SINK_STREAM}: {e}"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1)));
    let busy = Busy::default();
    let mut in_flight = JoinSet::new();
    tracing::info!(stream = SINK_STREAM, "delivering outcomes to sinks");
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::warn!(%error, "pulling from the sink outbox");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => break,
        };
        let Some(outgoing) = Outgoing::of(&message) else {
            tracing::error!(subject = %message.subject, "an outbox message without its headers: dropped");
            let _ = message.ack_with(AckKind::Term).await;
            continue;
        };
        // One namespace's receivers (down, slow, hanging) hold at most its share of the
        // slots: its other outcomes wait in the outbox, not in front of everyone else's.
        let Some(share) = busy.enter(&outgoing.namespace, settings.per_namespace) else {
            let _ = message.ack_with(AckKind::Nak(Some(FAIR_SHARE_WAIT))).await;
            continue;
        };
        let (states, client, settings) = (states.clone(), client.clone(), settings.clone());
        in_flight.spawn(async move {
            deliver(&states, &client, &settings, &outgoing, message).await;
            drop((share, slot));
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

/// Deliveries in flight per namespace.
#[derive(Debug, Clone, Default)]
struct Busy(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

/// One namespace's place among the deliveries in flight, given back when dropped.
struct Share {
    busy: Busy,
    namespace: String,
}

impl Busy {
    /// A place for `namespace`, unless it already has `most` deliveries in flight.
    fn enter(&self, namespace: &str, most: usize) -> Option<Share> {
        let mut busy = self.0.lock().expect("busy lock");
        let count = busy.entry(namespace.to_owned()).or_default();
        if *count >= most.max(1) {
            return None;
        }
        *count += 1;
        Some(Share {
            busy: self.clone(),
            namespace: namespace.to_owned(),
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut busy = self.busy.0.lock().expect("busy lock");
        if let Some(count) = busy.get_mut(&self.namespace) {
            *count -= 1;
            if *count == 0 {
                busy.remove(&self.namespace);
            }
        }
    }
}

/// What an outbox message says: whose outcome, going where.
struct Outgoing {
    namespace: String,
    event: String,
    id: String,
    url: String,
}

impl Outgoing {
    fn of(message: &jetstream::Message) -> Option<Self> {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Some(Self {
            namespace: header(HEADER_NAMESPACE)?,
            event: header(HEADER_EVENT)?,
            id: header(HEADER_EVENT_ID)?,
            url: header(HEADER_SINK_URL)?,
        })
    }
}

/// How long an outcome beyond its namespace's share goes back to the outbox: short, so one
/// tenant's burst drains at the pace of its receiver (its share is busy only while POSTs are
/// in flight), long enough that a tenant's backlog behind a hanging receiver is handed out
/// about once a second, not in a loop.
const FAIR_SHARE_WAIT: Duration = Duration::from_secs(1);

/// One delivery attempt of one outbox message, recorded, then acked, retried later or given
/// up. The attempts are counted in the event's record (JetStream's delivery count also counts
/// the waits for the namespace's share); a record that says it was delivered (an ack lost
/// after the POST) is acked without posting again.
async fn deliver(
    states: &StateStore,
    client: &SinkClient,
    settings: &SinkSettings,
    outgoing: &Outgoing,
    message: jetstream::Message,
) {
    let Outgoing {
        namespace,
        event,
        id,
        url,
    } = outgoing;
    let (recorded, unreadable) = match states.get(namespace, event, id).await {
        Ok(record) => (record.and_then(|r| r.sink).filter(|s| s.url == *url), false),
        Err(error) => {
            tracing::warn!(namespace, event, id, %error, "cannot read the sink record");
            (None, true)
        }
    };
    if recorded
        .as_ref()
        .is_some_and(|s| s.delivered_at.is_some() || s.gave_up)
    {
        let _ = message.ack_with(AckKind::Ack).await;
        return;
    }
    let handed_out = message
        .info()
        .map_or(1, |info| info.delivered.max(1) as u64);
    let attempts = recorded.map_or(0, |s| s.attempts).saturating_add(1);
    let posted = client.post(url, message.payload.clone()).await;
    let mut status = SinkStatus {
        url: url.clone(),
        attempts,
        ..SinkStatus::default()
    };
    // Without a readable record JetStream's count stands in (it counts the waits for the
    // namespace's share too: it gives up sooner, never not at all).
    let out_of_attempts = attempts >= settings.max_attempts
        || (unreadable && handed_out >= u64::from(settings.max_attempts));
    let ack = match posted {
        Ok(()) => {
            status.delivered_at = Some(jobico_store::now());
            tracing::debug!(namespace, event, id, url, attempts, "outcome delivered");
            AckKind::Ack
        }
        Err(error) if out_of_attempts => {
            tracing::warn!(
                namespace,
                event,
                id,
                url,
                attempts,
                error,
                "outcome not delivered: giving up"
            );
            status.last_error = Some(error);
            status.gave_up = true;
            AckKind::Term
        }
        Err(error) => {
            let wait = settings.backoff(attempts);
            tracing::info!(
                namespace,
                event,
                id,
                url,
                attempts,
                error,
                ?wait,
                "outcome not delivered yet"
            );
            status.last_error = Some(error);
            AckKind::Nak(Some(wait))
        }
    };
    // The record is best effort: the delivery, not its record, is what the outbox keeps.
    if let Err(error) = states.record_sink(namespace, event, id, &status).await {
        tracing::warn!(namespace, event, id, %error, "cannot record the sink delivery");
    }
    if let Err(error) = message.ack_with(ack).await {
        tracing::warn!(namespace, event, id, %error, "cannot acknowledge the sink delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_refuses_what_sinks_may_not_reach() {
        let policy = SinkPolicy {
            allow_loopback: false,
            denied: vec!["10.96.0.0/12".parse().unwrap()],
        };
        let refused = |ip: &str| policy.refusal(ip.parse().unwrap());
        assert!(refused("127.0.0.1").unwrap().contains("loopback"));
        assert!(refused("::1").unwrap().contains("loopback"));
        assert!(refused("::ffff:127.0.0.1").unwrap().contains("loopback"));
        assert!(refused("169.254.169.254").unwrap().contains("link-local"));
        assert!(refused("fe80::1").unwrap().contains("link-local"));
        assert!(refused("0.0.0.0").unwrap().contains("unspecified"));
        assert!(refused("224.0.0.1").unwrap().contains("multicast"));
        assert_eq!(
            refused("10.96.0.1").unwrap(),
            "10.96.0.1 is in 10.96.0.0/12, which sinks may not reach"
        );
        assert_eq!(refused("10.1.2.3"), None);
        assert_eq!(refused("93.184.216.34"), None);
        let local = SinkPolicy {
            allow_loopback: true,
            ..SinkPolicy::default()
        };
        assert_eq!(local.refusal("127.0.0.1".parse().unwrap()), None);
        assert!(local.refusal("169.254.169.254".parse().unwrap()).is_some());
    }

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let settings = SinkSettings::default();
        assert_eq!(settings.backoff(1), Duration::from_secs(1));
        assert_eq!(settings.backoff(2), Duration::from_secs(2));
        assert_eq!(settings.backoff(5), Duration::from_secs(16));
        assert_eq!(settings.backoff(12), Duration::from_secs(300));
        assert_eq!(settings.backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn authorities_come_out_of_urls_and_server_lists() {
        assert_eq!(
            authority("nats://nats.jobico:4222"),
            Some("nats.jobico:4222")
        );
        assert_eq!(authority("tls://u:p@10.0.0.5:4222/"), Some("10.0.0.5:4222"));
        assert_eq!(authority("https://[::1]:6443"), Some("[::1]:6443"));
        assert_eq!(
            authority("kubernetes.default.svc"),
            Some("kubernetes.default.svc")
        );
        assert_eq!(authority(""), None);
    }

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
