//! The NATS authorization that deploy/nats.yaml ships, on a real nats-server, with passwords
//! made by scripts/nats-credentials.sh: a client without credentials is refused; the ingress
//! and the dispatcher do all their work with theirs (and the server refuses them nothing);
//! neither can do what its permissions leave out.

mod common;

use jobico_dispatcher::artifacts::{
    ArtifactSettings, Artifacts, BUCKET as ARTIFACT_BUCKET, Compiled,
};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::repo;
use futures::TryStreamExt;
use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
use jobico_apiserver::{Metrics, Publisher, StatusLookup};
use jobico_common::subject::{DISPATCHER_INBOX, INGRESS_INBOX, event_subject, stream_name};
use jobico_common::{EventId, EventRecord, EventState};
use jobico_dispatcher::consumer::{self, DEAD_LETTER_STREAM, consumer_name};
use jobico_dispatcher::metrics::Metrics as DispatcherMetrics;
use jobico_dispatcher::trust::Signer;
use jobico_dispatcher::{Backend, Batch, DispatchError, Dispatched, Dispatcher, RetryPolicy};
use jobico_model::Manifest;
use jobico_store::{NatsAuth, NatsAuthArgs};
use jobico_testkit::NatsServer;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// How long an event may take to reach a state; generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// How long a refused request waits for the answer that never comes: the server drops a
/// publish it does not permit (and logs it), so the client sees a timeout.
const REFUSED_TIMEOUT: Duration = Duration::from_secs(1);

/// The passwords `scripts/nats-credentials.sh --stdout` generates, by NATS user.
fn generated_passwords() -> Vec<(String, String)> {
    let output = std::process::Command::new("bash")
        .arg(repo().join("scripts/nats-credentials.sh"))
        .arg("--stdout")
        .output()
        .expect("run scripts/nats-credentials.sh");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut passwords = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let secret = Secret::deserialize(document).unwrap();
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        let Some(user) = annotations.get("jobico.coeux.dev/nats-user").cloned() else {
            // The results key, no NATS password.
            assert_eq!(annotations["jobico.coeux.dev/purpose"], "results-token-key");
            assert_eq!(secret.string_data.as_ref().unwrap()["key"].len(), 40);
            continue;
        };
        let password = secret.string_data.as_ref().unwrap()["password"].clone();
        assert_eq!(password.len(), 40, "{password}");
        passwords.push((user, password));
    }
    passwords
}

/// `auth.conf` of the NATS ConfigMap in deploy/nats.yaml.
fn deployed_auth_conf() -> String {
    let text = std::fs::read_to_string(repo().join("deploy/nats.yaml")).unwrap();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document).unwrap();
        if value["kind"] == "ConfigMap" {
            let map: ConfigMap = serde_yaml::from_value(value).unwrap();
            return map.data.unwrap()["auth.conf"].clone();
        }
    }
    panic!("deploy/nats.yaml has no ConfigMap");
}

/// A nats-server with the deployed authorization, and the password of each user.
fn deployed_nats() -> (NatsServer, String, String) {
    let passwords = generated_passwords();
    let password = |user: &str| {
        passwords
            .iter()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("no password for {user}"))
            .1
            .clone()
    };
    let (apiserver, dispatcher) = (password("jobico-apiserver"), password("jobico-dispatcher"));
    let server = NatsServer::start_with_config(
        &deployed_auth_conf(),
        &[
            ("JOBICO_APISERVER_PASSWORD", &apiserver),
            ("JOBICO_DISPATCHER_PASSWORD", &dispatcher),
        ],
    );
    (server, apiserver, dispatcher)
}

/// The credentials of `user` as the binaries load them: the password from a file.
fn auth(dir: &Path, user: &str, password: &str) -> NatsAuth {
    let file = dir.join(user);
    std::fs::write(&file, format!("{password}\n")).unwrap();
    NatsAuthArgs {
        nats_user: Some(user.into()),
        nats_password_file: Some(file),
        ..Default::default()
    }
    .load()
    .unwrap()
}

/// A JetStream context on a connection as `auth` with inbox `inbox`, whose requests give up
/// after [`REFUSED_TIMEOUT`].
async fn context(url: &str, auth: &NatsAuth, inbox: &str) -> jetstream::Context {
    let client = auth.options("test", inbox).connect(url).await.unwrap();
    jetstream::ContextBuilder::new()
        .timeout(REFUSED_TIMEOUT)
        .build(client)
}

fn record(id: &str) -> EventRecord {
    EventRecord {
        id: EventId::parse(id).unwrap(),
        namespace: "default".into(),
        event: "ev1".into(),
        data: serde_json::json!({"firstName": "Ada", "lastName": "Lovelace"}),
        attributes: Default::default(),
    }
}

/// Dispatches every batch, except those holding an id in `refuse`, which it refuses for
/// good (so they are dead-lettered).
struct Scripted {
    refuse: HashSet<String>,
    dispatched: Mutex<Vec<String>>,
}

impl Backend for Scripted {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        let ids: Vec<String> = batch.ids().iter().map(|id| id.to_string()).collect();
        if ids.iter().any(|id| self.refuse.contains(id)) {
            return Err(DispatchError::Permanent {
                reason: "refused by the test".into(),
            });
        }
        self.dispatched.lock().unwrap().extend(ids);
        Ok(Dispatched {
            job: batch.job_name(),
            created: true,
        })
    }
}

/// The state of `default/ev1/<id>` as the ingress reads it.
/// The artifact of `module`, once compiled (or found).
async fn wait_for_artifact(artifacts: &Arc<Artifacts>, module: &[u8]) -> Compiled {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(compiled) = artifacts.request(module) {
            return compiled;
        }
        assert!(Instant::now() < deadline, "no artifact");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state(ingress: &JetStreamPublisher, id: &str) -> Option<EventState> {
    match ingress.status("default", Some("ev1"), id).await.unwrap() {
        StatusLookup::Found(status) => Some(status.state),
        _ => None,
    }
}

async fn wait_for_state(ingress: &JetStreamPublisher, id: &str, expected: EventState) {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = state(ingress, id).await;
        if current == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} stayed {current:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the server has logged a line holding `needle`.
async fn wait_for_log(server: &NatsServer, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !server.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn violations(server: &NatsServer) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains(" Violation - "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_jobico_users_connect_and_each_does_its_work_and_nothing_more() {
    let (server, apiserver_password, dispatcher_password) = deployed_nats();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let ingress_auth = auth(dir.path(), "jobico-apiserver", &apiserver_password);
    let dispatcher_auth = auth(dir.path(), "jobico-dispatcher", &dispatcher_password);

    // No credentials, a wrong password, an unknown user, a password of another user: refused.
    assert!(async_nats::connect(&url).await.is_err());
    for (user, password) in [
        ("jobico-apiserver", "wrong"),
        ("tenant", apiserver_password.as_str()),
        ("jobico-apiserver", dispatcher_password.as_str()),
    ] {
        let refused = async_nats::ConnectOptions::new()
            .user_and_password(user.into(), password.into())
            .connect(&url)
            .await;
        assert!(refused.is_err(), "{user} connected");
    }

    // The ingress opens the bucket; until the dispatcher has created the namespace's stream
    // its events are refused (503), not stored anywhere else.
    let ingress = JetStreamPublisher::connect(
        &url,
        &ingress_auth,
        PublishSettings::default(),
        Metrics::new(),
    )
    .await
    .expect("the ingress connects with its credentials");
    let early = ingress.publish(vec![record("early-1")]).await.unwrap_err();
    assert!(
        early.error.to_string().contains("no event stream yet"),
        "{:?}",
        early.error
    );

    // The dispatcher: retires a legacy stream (none here), loads the signing key, opens the
    // bucket and the dead-letter stream, creates the namespace's stream, consumes, claims,
    // acks, dead-letters.
    let client = dispatcher_auth
        .options("jobico-dispatcher", DISPATCHER_INBOX)
        .connect(&url)
        .await
        .expect("the dispatcher connects with its credentials");
    let js = jetstream::new(client);
    jobico_store::streams::retire_legacy(&js).await.unwrap();
    let signer = Signer::load_or_create(&js)
        .await
        .expect("the dispatcher creates its signing key");
    let again = Signer::load_or_create(&js)
        .await
        .expect("a second replica reads the signing key");
    let mut signed = k8s_openapi::api::batch::v1::Job::default();
    signed.metadata.name = Some("jobico-ev1-x".into());
    signed.metadata.namespace = Some("default".into());
    signer.sign_job(&mut signed);
    assert!(again.verify(&signed), "the replicas share one key");
    let token = CancellationToken::new();
    let backend = Arc::new(Scripted {
        refuse: HashSet::from(["bad-1".to_owned()]),
        dispatched: Mutex::default(),
    });
    let dispatcher = Dispatcher::connect(
        js.clone(),
        backend.clone(),
        Arc::new(DispatcherMetrics::new()),
        RetryPolicy {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
    )
    .await
    .expect("the dispatcher opens the bucket and the dead-letter stream");
    let mut manifest = Manifest::default();
    manifest
        .read_path(&repo().join("samples/ev1.yaml"))
        .unwrap();
    let mut owner = manifest.jobs.remove(0);
    owner.metadata.uid = Some("uid-1".into());
    let consuming = tokio::spawn(consumer::run(
        dispatcher.clone(),
        Arc::new(owner),
        "ev1".into(),
        token.clone(),
    ));
    let deadline = Instant::now() + WAIT;
    while js.get_stream(stream_name("default")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the namespace's stream never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The ingress publishes to the namespace's stream and reads states.
    let published = ingress
        .publish(vec![record("ok-1"), record("bad-1")])
        .await
        .unwrap_or_else(|e| panic!("{:?}", e.error));
    assert_eq!(published.len(), 2);
    wait_for_state(&ingress, "ok-1", EventState::Dispatched).await;
    wait_for_state(&ingress, "bad-1", EventState::DeadLettered).await;
    assert_eq!(*backend.dispatched.lock().unwrap(), ["ok-1"]);
    // The tracker's write of the outcome.
    dispatcher
        .states
        .advance(jobico_store::status(
            "default",
            "ev1",
            "ok-1",
            EventState::Succeeded,
        ))
        .await
        .unwrap();
    wait_for_state(&ingress, "ok-1", EventState::Succeeded).await;
    token.cancel();
    consuming.await.unwrap();
    // Both messages acked (the work queue is empty), one dead letter kept.
    let mut events = js.get_stream(stream_name("default")).await.unwrap();
    assert_eq!(events.info().await.unwrap().state.messages, 0);
    let mut dead = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 1);
    // The orphan sweep lists the streams and their durable consumers and removes one.
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    assert!(names.contains(&stream_name("default")), "{names:?}");
    let infos: Vec<_> = events.consumers().try_collect().await.unwrap();
    let names: Vec<String> = infos.into_iter().map(|info| info.name).collect();
    assert_eq!(names, [consumer_name("default", "ev1")]);
    events
        .delete_consumer(&consumer_name("default", "ev1"))
        .await
        .unwrap();
    // Compiled modules: the dispatcher creates the object store, compiles and stores one,
    // a second replica finds it, and the artifact server reads it back for a pod.
    let settings = ArtifactSettings {
        base_url: String::new(),
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
        replicas: 1,
    };
    let module = std::fs::read(repo().join("samples/echo.wasm")).unwrap();
    let artifacts = Arc::new(
        Artifacts::open(&js, signer.clone(), &settings)
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = CancellationToken::new();
    tokio::spawn(artifacts.clone().serve(listener, serving.clone()));
    let compiled = wait_for_artifact(&artifacts, &module).await;
    assert_eq!(artifacts.compilations(), 1);
    let replica = Arc::new(
        Artifacts::open(&js, signer.clone(), &settings)
            .await
            .unwrap(),
    );
    assert_eq!(wait_for_artifact(&replica, &module).await, compiled);
    assert_eq!(replica.compilations(), 0, "found in the store");
    let mut reference = artifacts.reference("default", &compiled);
    reference.url = reference.url.replacen("/v1/", &format!("{base}/v1/"), 1);
    let fetched =
        tokio::task::spawn_blocking(move || wasm_exec::artifact::fetch(&reference, &module))
            .await
            .unwrap();
    assert!(fetched.is_ok(), "{fetched:?}: {:?}", violations(&server));
    serving.cancel();

    // Sinks: the dispatcher creates the outbox and its consumer, delivers and records the
    // delivery; the ingress keeps an outcome in the outbox.
    let receiver = common::Receiver::start(&[]);
    let delivering = CancellationToken::new();
    let deliverer = tokio::spawn(jobico_dispatcher::sinks::run(
        js.clone(),
        dispatcher.states.clone(),
        jobico_dispatcher::sinks::SinkClient::new(
            jobico::local_sinks::local_policy(),
            Duration::from_secs(5),
        ),
        jobico_dispatcher::sinks::SinkSettings::default(),
        jobico_store::StreamSettings::default(),
        delivering.clone(),
    ));
    let deadline = Instant::now() + WAIT;
    while js
        .get_stream(jobico_common::sink::SINK_STREAM)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the outbox never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome: jobico_common::summary::EventOutcome = serde_json::from_value(
        serde_json::json!({"id": "ok-1", "status": "succeeded", "duration_ms": 1, "output_bytes": 2, "result": "{}"}),
    )
    .unwrap();
    let message = jobico_common::sink::SinkMessage {
        namespace: "default".into(),
        event: "ev1".into(),
        url: receiver.url.clone(),
        cloud_event: jobico_common::sink::CloudEvent::of_outcome(
            "default",
            "job-for-ev1",
            "ev1",
            &outcome,
            jobico_store::now(),
        ),
    };
    ingress
        .sink(&message)
        .await
        .expect("the ingress keeps an outcome for its sink");
    let deadline = Instant::now() + WAIT;
    loop {
        let StatusLookup::Found(status) = ingress
            .status("default", Some("ev1"), "ok-1")
            .await
            .unwrap()
        else {
            panic!("no record of ok-1");
        };
        if status
            .sink
            .as_ref()
            .is_some_and(|s| s.delivered_at.is_some())
        {
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.received().len(), 1);
    delivering.cancel();
    deliverer.await.unwrap().unwrap();

    assert_eq!(
        violations(&server),
        Vec::<String>::new(),
        "refused their own work"
    );

    // With the ingress's credentials: no creating, changing, deleting or purging a stream, no
    // reading the signing key or other events. (It writes state records: the chain of routed
    // events, POST /results.)
    let js = context(&url, &ingress_auth, INGRESS_INBOX).await;
    assert!(js.delete_stream(stream_name("default")).await.is_err());
    let stream = js.get_stream(stream_name("default")).await.unwrap();
    assert!(stream.purge().await.is_err());
    let mut wide = stream.cached_info().config.clone();
    wide.max_bytes = -1;
    assert!(js.update_stream(wide).await.is_err());
    assert!(
        js.create_stream(jobico_store::StreamSettings::default().config("other"))
            .await
            .is_err()
    );
    let key_stream = js.get_stream_no_info("KV_jobico-dispatcher").await.unwrap();
    assert!(
        key_stream
            .get_last_raw_message_by_subject("$KV.jobico-dispatcher.job-signing-key")
            .await
            .is_err(),
        "the ingress read the signing key"
    );
    let client = ingress_auth
        .options("test", INGRESS_INBOX)
        .connect(&url)
        .await
        .unwrap();
    let _snooping = client.subscribe("jobico.>").await.unwrap();
    wait_for_log(&server, "Subscription Violation - Subject \"jobico.>\"").await;

    // No reading compiled modules (only the dispatcher serves them, per namespace).
    let artifact_stream = js
        .get_stream_no_info(format!("OBJ_{ARTIFACT_BUCKET}"))
        .await
        .unwrap();
    for sequence in 1..=3 {
        assert!(
            artifact_stream.get_raw_message(sequence).await.is_err(),
            "the ingress read message {sequence} of the artifact store"
        );
    }
    if let Ok(store) = js.get_object_store(ARTIFACT_BUCKET).await {
        assert!(
            store.get(&compiled.name).await.is_err(),
            "the ingress read an artifact"
        );
    }

    // Uploaded modules: the ingress keeps one (2 MiB, several chunks).
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let uploads = jobico_store::ModuleStore::open(&js, 1).await.unwrap();
    let (digest, _) = uploads.put("default", &big).await.unwrap();

    // With the dispatcher's: no events of its own making, no deleting or purging an event
    // stream; reading uploaded modules (and looking them up), never writing one.
    let js = context(&url, &dispatcher_auth, DISPATCHER_INBOX).await;
    let uploads = jobico_store::ModuleStore::open(&js, 1).await.unwrap();
    assert!(uploads.exists("default", digest).await.unwrap());
    assert_eq!(
        uploads.get("default", digest).await.unwrap(),
        Some(big),
        "{:?}",
        violations(&server)
    );
    let forged_module = uploads.put("default", b"\0asm\x01\0\0\0forged").await;
    assert!(forged_module.is_err(), "the dispatcher wrote a module");
    let forged = js
        .publish(event_subject("default", "ev1", "forged"), "{}".into())
        .await;
    assert!(forged.is_err() || forged.unwrap().await.is_err());
    assert!(js.delete_stream(DEAD_LETTER_STREAM).await.is_err());
    assert!(js.delete_stream(stream_name("default")).await.is_err());
    let mut events = js.get_stream(stream_name("default")).await.unwrap();
    assert!(events.purge().await.is_err());
    assert_eq!(
        events.info().await.unwrap().state.messages,
        0,
        "the forged event was stored"
    );
    let mut dead = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 1);
    wait_for_log(
        &server,
        "Publish Violation - Subject \"jobico.default.ev1.forged\"",
    )
    .await;
}
