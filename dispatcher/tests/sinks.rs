//! Sinks against a real nats-server and a real HTTP receiver: the ingress's router keeps an
//! outcome in the outbox, the dispatcher's deliverer POSTs it as a CloudEvent until the
//! receiver takes it, and the event's state record shows every attempt.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use jobico_apiserver::chain::Router;
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_apiserver::{Catalog, Metrics, catalog};
use jobico_common::sink::{SINK_STREAM, SinkStatus};
use jobico_common::summary::{EventOutcome, Status};
use jobico_dispatcher::sinks::{self, SinkClient, SinkPolicy, SinkSettings};
use jobico_model::Manifest;
use jobico_store::{BucketSettings, NatsAuth, StateStore, StreamSettings};
use jobico_testkit::NatsServer;
use support::receiver;
use tokio_util::sync::CancellationToken;

fn manifest(url: &str, slow_url: &str) -> String {
    format!(
        r#"
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {{name: orders, namespace: shop}}
spec:
  events:
    - {{name: order, wasm: m.wasm, schema: {{key: any, optional: true}}, sink: {{url: "{url}"}}}}
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {{name: orders, namespace: slow}}
spec:
  events:
    - {{name: order, wasm: m.wasm, schema: {{key: any, optional: true}}, sink: {{url: "{slow_url}"}}}}
"#
    )
}

fn outcome(id: &str, status: Status, result: Option<&str>) -> EventOutcome {
    EventOutcome {
        id: id.into(),
        status,
        exit_code: Some(if status == Status::Succeeded { 0 } else { 3 }),
        error: (status == Status::Failed).then_some(jobico_common::summary::ErrorKind::Exit),
        message: (status == Status::Failed).then(|| "exit code 3".into()),
        warning: None,
        duration: Duration::ZERO,
        output_bytes: 0,
        output_truncated: false,
        result: result.map(str::to_owned),
    }
}

const FAST: SinkSettings = SinkSettings {
    concurrency: 4,
    per_namespace: 2,
    max_attempts: 3,
    timeout: Duration::from_secs(5),
    first_backoff: Duration::from_millis(50),
    max_backoff: Duration::from_millis(200),
};

/// The ingress's router and publisher for `url`'s sink, a deliverer under `policy`, and the
/// state store, all on one nats-server.
struct Setup {
    _nats: NatsServer,
    router: Router,
    context: jetstream::Context,
    states: StateStore,
    shutdown: CancellationToken,
    deliverer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn setup(url: &str, policy: SinkPolicy) -> Setup {
    setup_with(url, "http://slow.invalid/", policy, FAST).await
}

/// [`setup`] with namespace `slow`'s sink at `slow_url` and these delivery settings.
async fn setup_with(
    url: &str,
    slow_url: &str,
    policy: SinkPolicy,
    settings: SinkSettings,
) -> Setup {
    let nats = NatsServer::start();
    let publisher = JetStreamPublisher::connect(
        &nats.url(),
        &NatsAuth::default(),
        PublishSettings::default(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let context = publisher.context().clone();
    let states = StateStore::open(&context, &BucketSettings::default())
        .await
        .unwrap();
    let mut parsed = Manifest::default();
    parsed
        .read_str(Path::new("m.yaml"), &manifest(url, slow_url))
        .unwrap();
    let (events, problems) = catalog::from_manifest(&parsed);
    assert!(problems.is_empty(), "{problems:?}");
    let catalog = Arc::new(Catalog::new());
    catalog.replace(events);
    let shutdown = CancellationToken::new();
    let deliverer = tokio::spawn(sinks::run(
        context.clone(),
        states.clone(),
        SinkClient::new(policy, settings.timeout),
        settings,
        StreamSettings::default(),
        shutdown.clone(),
    ));
    // The dispatcher creates the outbox; the ingress only publishes to it.
    for _ in 0..100 {
        if context.get_stream(SINK_STREAM).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Setup {
        _nats: nats,
        router: Router::new(catalog, Arc::new(publisher)),
        context,
        states,
        shutdown,
        deliverer,
    }
}

impl Setup {
    /// The sink record of event `id` once `done` holds for it.
    async fn sink_record(&self, id: &str, done: impl Fn(&SinkStatus) -> bool) -> SinkStatus {
        for _ in 0..500 {
            if let Some(sink) = self
                .states
                .get("shop", "order", id)
                .await
                .unwrap()
                .and_then(|s| s.sink)
                .filter(|s| done(s))
            {
                return sink;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no finished sink record for {id}");
    }

    async fn outbox(&self) -> (u64, u64) {
        let mut stream = self.context.get_stream(SINK_STREAM).await.unwrap();
        let messages = stream.info().await.unwrap().state.messages;
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(sinks::SINK_CONSUMER).await.unwrap();
        let delivered = consumer.info().await.unwrap().delivered.stream_sequence;
        (messages, delivered)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.deliverer.await.unwrap().unwrap();
    }
}

fn local() -> SinkPolicy {
    SinkPolicy {
        allow_loopback: true,
        denied: vec![],
    }
}

#[tokio::test]
async fn an_outcome_is_retried_until_taken_then_recorded_and_never_delivered_twice() {
    let (address, received) = receiver(vec![503, 500]).await;
    let url = format!("http://{address}/events");
    let setup = setup(&url, local()).await;
    let done = outcome("o1", Status::Succeeded, Some("{\"total\": 12}"));
    let routed = setup.router.follow("shop", "order", &done).await.unwrap();
    assert_eq!(routed.sink.as_deref(), Some(url.as_str()));

    let sink = setup.sink_record("o1", |s| s.delivered_at.is_some()).await;
    assert_eq!(sink.url, url);
    assert_eq!(sink.attempts, 3, "{sink:?}");
    assert_eq!(sink.last_error, None);
    assert!(!sink.gave_up);
    let posts = received.lock().unwrap().clone();
    assert_eq!(posts.len(), 3);
    let (headers, cloud_event) = &posts[2];
    assert_eq!(headers["content-type"], "application/cloudevents+json");
    assert_eq!(cloud_event["specversion"], "1.0");
    assert_eq!(cloud_event["id"], "o1");
    assert_eq!(cloud_event["subject"], "o1");
    assert_eq!(cloud_event["type"], "dev.coeux.jobico.order.succeeded");
    assert_eq!(
        cloud_event["source"],
        "/apis/jobico.coeux.dev/v1/namespaces/shop/jobs/orders"
    );
    assert_eq!(cloud_event["data"], serde_json::json!({"total": 12}));
    // Every attempt sent the same CloudEvent, so the receiver can drop repeats by id.
    assert!(posts.iter().all(|(_, body)| body == cloud_event));

    // The same outcome reported again (a re-run, a retried results post) is kept once: the
    // outbox holds nothing new and the consumer delivers nothing more.
    let (messages, delivered) = setup.outbox().await;
    assert_eq!(messages, 0, "delivered outcomes leave the outbox");
    setup.router.follow("shop", "order", &done).await.unwrap();
    assert_eq!(setup.outbox().await, (0, delivered));

    // A failure goes out as `…failed` with the error object a failed route gets.
    let failed = outcome("o2", Status::Failed, None);
    setup.router.follow("shop", "order", &failed).await.unwrap();
    let sink = setup.sink_record("o2", |s| s.delivered_at.is_some()).await;
    assert_eq!(sink.attempts, 1);
    let posts = received.lock().unwrap().clone();
    let (_, cloud_event) = posts.last().unwrap();
    assert_eq!(cloud_event["type"], "dev.coeux.jobico.order.failed");
    assert_eq!(cloud_event["data"]["error"], "exit");
    assert_eq!(cloud_event["data"]["exitCode"], 3);
    setup.stop().await;
}

#[tokio::test]
async fn a_receiver_that_keeps_refusing_is_given_up_after_the_attempts_saying_why() {
    let (address, received) = receiver(vec![500; 10]).await;
    let setup = setup(&format!("http://{address}/"), local()).await;
    let done = outcome("o3", Status::Succeeded, Some("plain text"));
    setup.router.follow("shop", "order", &done).await.unwrap();
    let sink = setup.sink_record("o3", |s| s.gave_up).await;
    assert_eq!(sink.attempts, FAST.max_attempts);
    assert_eq!(sink.delivered_at, None);
    assert_eq!(
        sink.last_error.as_deref(),
        Some("the receiver answered 500 Internal Server Error: not now")
    );
    assert_eq!(received.lock().unwrap().len(), 3);
    // A result that is not JSON goes out as a string.
    assert_eq!(received.lock().unwrap()[0].1["data"], "plain text");
    // Given up is final: it left the outbox.
    assert_eq!(setup.outbox().await.0, 0);
    setup.stop().await;
}

#[tokio::test]
async fn a_sink_on_an_address_the_policy_refuses_is_never_contacted() {
    let (address, received) = receiver(vec![]).await;
    // A name resolving to loopback, as a tenant would write it to reach the node's services.
    let setup = setup(
        &format!("http://localhost:{}/", address.port()),
        SinkPolicy::default(),
    )
    .await;
    let done = outcome("o4", Status::Succeeded, Some("{}"));
    setup.router.follow("shop", "order", &done).await.unwrap();
    let sink = setup.sink_record("o4", |s| s.gave_up).await;
    let error = sink.last_error.unwrap();
    assert!(
        error.contains("resolves to no address sinks may reach") && error.contains("loopback"),
        "{error}"
    );
    assert!(received.lock().unwrap().is_empty());
    setup.stop().await;
}

#[tokio::test]
async fn a_tenant_whose_receiver_hangs_holds_only_its_share_of_the_deliveries() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Namespace slow's receiver takes connections and never answers.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}/", hanging.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hanging.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let (address, received) = receiver(vec![]).await;
    let settings = SinkSettings {
        concurrency: 4,
        per_namespace: 1,
        timeout: Duration::from_secs(2),
        ..FAST
    };
    let setup = setup_with(&format!("http://{address}/"), &slow_url, local(), settings).await;
    // Ten of slow's outcomes first, then three of shop's.
    for i in 0..10 {
        let done = outcome(&format!("s{i}"), Status::Succeeded, Some("{}"));
        setup.router.follow("slow", "order", &done).await.unwrap();
    }
    for i in 0..3 {
        let done = outcome(&format!("o{i}"), Status::Succeeded, Some("{}"));
        setup.router.follow("shop", "order", &done).await.unwrap();
    }
    for i in 0..3 {
        setup
            .sink_record(&format!("o{i}"), |s| s.delivered_at.is_some())
            .await;
    }
    // Without a share per namespace every slot would have hung on slow's receiver first:
    // shop's outcomes would have waited for ten POSTs of 2 s, four at a time.
    let slow_posts = accepted.load(Ordering::SeqCst);
    assert!(
        slow_posts <= 2,
        "slow's receiver got {slow_posts} POSTs before shop's three were delivered"
    );
    assert_eq!(received.lock().unwrap().len(), 3);
    setup.stop().await;
}
