//! Controller, leader election and the state tracker against a scripted fake API.

mod support;

use std::sync::Arc;
use std::time::Duration;

use jobico_common::EventState;
use jobico_common::summary::{ErrorKind, EventOutcome, RunSummary, Status};
use jobico_dispatcher::artifacts::{ArtifactSettings, Artifacts};
use jobico_dispatcher::backend::{Backend, Batch, DispatchError, Dispatched};
use jobico_dispatcher::consumers::{Conflict, ConsumerSet};
use jobico_dispatcher::controller::{self, Context};
use jobico_dispatcher::kubernetes::ActiveJobs;
use jobico_dispatcher::leader::{Elector, LeaseConfig};
use jobico_dispatcher::metrics::Metrics;
use jobico_dispatcher::render::{Renderer, TemplateChecker};
use jobico_dispatcher::state::Deltas;
use jobico_dispatcher::trust::Signer;
use jobico_dispatcher::{Dispatcher, RetryPolicy, tracker};
use jobico_model::Job as JobicoJob;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use support::fake_api::{status, verifier};
use support::{golden, nats, sample};
use tokio_util::sync::CancellationToken;

struct Nothing;

impl Backend for Nothing {
    async fn dispatch(&self, batch: &Batch) -> Result<Dispatched, DispatchError> {
        Ok(Dispatched {
            job: batch.job_name(),
            created: true,
        })
    }
}

const CR_PATH: &str = "/apis/jobico.coeux.dev/v1/namespaces/default/jobs/job-for-ev1";

/// The samples' module and schema ConfigMaps.
/// The sample's module, `samples/echo.wasm`.
fn echo_wasm() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/echo.wasm")).unwrap()
}

fn sample_config_maps() -> (Value, Value) {
    let echo = serde_json::to_value(k8s_openapi::ByteString(echo_wasm())).unwrap();
    (
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "job-for-ev1-modules"},
               "binaryData": {"echo.wasm": echo}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "schema-ev1"},
               "data": {"schema-ev1.json": "{}"}}),
    )
}

/// Answers the reconcile's reads of the sample's module and schema ConfigMaps.
async fn expect_inputs(api: &mut support::fake_api::Verifier) {
    let (modules, schema) = sample_config_maps();
    api.expect(
        "GET",
        "/api/v1/namespaces/default/configmaps/job-for-ev1-modules",
        200,
        modules,
    )
    .await;
    api.expect(
        "GET",
        "/api/v1/namespaces/default/configmaps/schema-ev1",
        200,
        schema,
    )
    .await;
}

fn with_finalizer(mut cr: JobicoJob) -> Arc<JobicoJob> {
    cr.metadata.finalizers = Some(vec![controller::FINALIZER.into()]);
    cr.metadata.generation = Some(3);
    cr.metadata.resource_version = Some("41".into());
    Arc::new(cr)
}

#[tokio::test]
async fn reconcile_adds_the_finalizer_then_applies_status_starts_consumers_and_emits_an_event() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js.clone(),
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    let (client, mut api) = verifier();
    let settings = ArtifactSettings {
        base_url: "http://artifacts.test:8083".into(),
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
        replicas: 1,
    };
    let artifacts = Arc::new(
        Artifacts::open(&js, Signer::ephemeral(), &settings)
            .await
            .unwrap(),
    );
    let ctx = Arc::new(
        Context::new(client, consumers.clone(), Some("pod-a".into()))
            .with_artifacts(artifacts.clone()),
    );

    // 1. No finalizer yet: it is added with a JSON patch, nothing else happens.
    let fresh = sample("ev1.yaml");
    let server = tokio::spawn(async move {
        let patch = api
            .expect(
                "PATCH",
                &format!("{CR_PATH}?"),
                200,
                serde_json::to_value(&*with_finalizer((*sample("ev1.yaml")).clone())).unwrap(),
            )
            .await;
        (api, patch)
    });
    controller::reconcile(fresh, ctx.clone()).await.unwrap();
    let (mut api, patch) = server.await.unwrap();
    assert_eq!(
        patch[1],
        json!({"op": "add", "path": "/metadata/finalizers", "value": [controller::FINALIZER]}),
        "{patch}"
    );
    assert!(consumers.events().is_empty());

    // 2. With the finalizer: the module and schema ConfigMaps checked, status by server-side
    //    apply, an Event, consumers started.
    let cr = with_finalizer((*sample("ev1.yaml")).clone());
    let server = tokio::spawn(async move {
        expect_inputs(&mut api).await;
        let status_patch = api
            .expect("PATCH", &format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher"), 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}}))
            .await;
        let event = api
            .expect(
                "POST",
                "/apis/events.k8s.io/v1/namespaces/default/events?",
                201,
                json!({}),
            )
            .await;
        (api, status_patch, event)
    });
    controller::reconcile(cr.clone(), ctx.clone())
        .await
        .unwrap();
    let (mut api, mut status_patch, event) = server.await.unwrap();
    let time = status_patch["status"]["conditions"][0]["lastTransitionTime"].take();
    assert!(time.is_string());
    golden(
        "ev1-status-apply.json",
        &(serde_json::to_string_pretty(&status_patch).unwrap() + "\n"),
    );
    assert_eq!(event["reason"], "Dispatching");
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["regarding"]["name"], "job-for-ev1");
    assert_eq!(
        consumers.events(),
        [("default".to_owned(), "ev1".to_owned())]
    );
    // The reconcile started compiling the module: its artifact exists before any event.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while artifacts.compilations() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reconcile compiled nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while artifacts.request(&echo_wasm()).is_none() {
        assert!(std::time::Instant::now() < deadline, "no artifact stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 3. Status already as desired: no write at all.
    let mut done = (*cr).clone();
    done.status = Some(serde_json::from_value(json!({
        "conditions": [{"type": "Ready", "status": "True", "reason": "Dispatching", "message": "1 event(s) consumed",
                        "observedGeneration": 3, "lastTransitionTime": "2026-11-22T00:00:00Z"}],
        "observedGeneration": 3, "events": 1})).unwrap());
    let server = tokio::spawn(async move {
        expect_inputs(&mut api).await;
        api
    });
    controller::reconcile(Arc::new(done), ctx.clone())
        .await
        .unwrap();
    let mut api = server.await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), api.next())
            .await
            .is_err(),
        "an unchanged status was written"
    );

    // 4. An invalid resource: Ready=False/Invalid, a Warning, and its consumers stopped.
    let mut invalid = (*cr).clone();
    invalid.spec.events[0].wasm = "../x".into();
    let server = tokio::spawn(async move {
        let status_patch = api.expect("PATCH", &format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher"), 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}})).await;
        let event = api
            .expect(
                "POST",
                "/apis/events.k8s.io/v1/namespaces/default/events?",
                201,
                json!({}),
            )
            .await;
        (status_patch, event)
    });
    controller::reconcile(Arc::new(invalid), ctx).await.unwrap();
    let (status_patch, event) = server.await.unwrap();
    let condition = &status_patch["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("spec.events[0].wasm")
    );
    assert_eq!(event["type"], "Warning");
    assert!(consumers.events().is_empty());
    shutdown.cancel();
    consumers.shutdown().await;
}

#[tokio::test]
async fn a_missing_module_makes_the_resource_not_ready_naming_it_and_how_to_provide_it() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    let (client, mut api) = verifier();
    let ctx = Arc::new(Context::new(client, consumers.clone(), None));
    let cr = with_finalizer((*sample("ev1.yaml")).clone());
    let server = tokio::spawn(async move {
        let (_, schema) = sample_config_maps();
        api.expect(
            "GET",
            "/api/v1/namespaces/default/configmaps/job-for-ev1-modules",
            404,
            status(
                404,
                "NotFound",
                "configmaps \"job-for-ev1-modules\" not found",
            ),
        )
        .await;
        api.expect(
            "GET",
            "/api/v1/namespaces/default/configmaps/schema-ev1",
            200,
            schema,
        )
        .await;
        let patch = api.expect("PATCH", &format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher"), 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}})).await;
        api.expect(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
            201,
            json!({}),
        )
        .await;
        patch
    });
    let action = controller::reconcile(cr, ctx).await.unwrap();
    let patch = server.await.unwrap();
    let condition = &patch["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(controller::REASON_INPUTS_MISSING))
    );
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("module ConfigMap default/job-for-ev1-modules does not exist"),
        "{message}"
    );
    assert!(
        message.contains("jobico module configmap job-for-ev1-modules echo.wasm"),
        "{message}"
    );
    // Checked again within seconds, and the consumers hold its events meanwhile.
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        consumers.events(),
        [("default".to_owned(), "ev1".to_owned())]
    );
    shutdown.cancel();
    consumers.shutdown().await;
}

#[tokio::test]
async fn a_missing_key_or_an_ungranted_secret_makes_the_resource_not_ready_naming_it() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    let (client, mut api) = verifier();
    let ctx = Arc::new(Context::new(client, consumers.clone(), None));
    let mut cr = (*sample("ev1.yaml")).clone();
    cr.spec.events[0].env = serde_json::from_value(json!([
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "TRACE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "trace", "optional": true}}},
    ]))
    .unwrap();
    cr.spec.events[0].env_from = serde_json::from_value(json!([
        {"prefix": "API_", "secretRef": {"name": "api"}},
        {"secretRef": {"name": "gone"}},
    ]))
    .unwrap();
    let cr = with_finalizer(cr);
    let server = tokio::spawn(async move {
        expect_inputs(&mut api).await;
        // Each object once, in the order the variables resolve.
        api.expect(
            "GET",
            "/api/v1/namespaces/default/secrets/api",
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api"},
                   "data": {"token": "czNjcmV0"}}),
        )
        .await;
        api.expect(
            "GET",
            "/api/v1/namespaces/default/secrets/gone",
            404,
            status(404, "NotFound", "secrets \"gone\" not found"),
        )
        .await;
        api.expect(
            "GET",
            "/api/v1/namespaces/default/configmaps/settings",
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                   "data": {"other": "x"}}),
        )
        .await;
        let patch = api.expect("PATCH", &format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher"), 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}})).await;
        api.expect(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
            201,
            json!({}),
        )
        .await;
        patch
    });
    controller::reconcile(cr, ctx).await.unwrap();
    let patch = server.await.unwrap();
    let condition = &patch["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(controller::REASON_INPUTS_MISSING))
    );
    let message = condition["message"].as_str().unwrap();
    for expected in [
        "event \"ev1\": envFrom[0]: Secret default/api is not granted to modules; grant it with `kubectl label secret api -n default jobico.coeux.dev/modules-may-read=true`",
        "event \"ev1\": envFrom[1]: Secret default/gone does not exist; create it with `kubectl create secret generic gone -n default",
        "event \"ev1\": env[0]: ConfigMap default/settings has no key \"level\"",
    ] {
        assert!(message.contains(expected), "{expected:?} not in {message}");
    }
    // The optional key is no problem, and no value read reaches the status.
    assert!(!message.contains("trace"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    shutdown.cancel();
    consumers.shutdown().await;
}

#[tokio::test]
async fn an_uploaded_module_not_uploaded_yet_makes_the_resource_not_ready_saying_how() {
    let (_server, js) = nats().await;
    let settings = ArtifactSettings {
        base_url: "http://jobico-artifacts:8083".into(),
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
        replicas: 1,
    };
    let artifacts = Arc::new(
        Artifacts::open(&js, Signer::ephemeral(), &settings)
            .await
            .unwrap(),
    );
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    let (client, mut api) = verifier();
    let ctx =
        Arc::new(Context::new(client, consumers.clone(), None).with_artifacts(artifacts.clone()));
    let digest = jobico_common::executor::Sha256Digest::of(b"a module of 3 MB");
    let mut cr = (*sample("ev1.yaml")).clone();
    cr.spec.events[0].wasm = format!("sha256:{digest}");
    let cr = with_finalizer(cr);
    // No module ConfigMap is read: the module is in the module store, or not.
    let server = tokio::spawn(async move {
        let (_, schema) = sample_config_maps();
        api.expect(
            "GET",
            "/api/v1/namespaces/default/configmaps/schema-ev1",
            200,
            schema,
        )
        .await;
        let patch = api.expect("PATCH", &format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher"), 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}})).await;
        api.expect(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events?",
            201,
            json!({}),
        )
        .await;
        patch
    });
    controller::reconcile(cr, ctx).await.unwrap();
    let patch = server.await.unwrap();
    let condition = &patch["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(controller::REASON_INPUTS_MISSING))
    );
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "module sha256:{digest} was not uploaded to namespace default"
        )),
        "{message}"
    );
    assert!(
        message.contains("jobico module upload job-for-ev1 FILE.wasm -n default"),
        "{message}"
    );
    assert_eq!(artifacts.compilations(), 0);
    shutdown.cancel();
    consumers.shutdown().await;
}

#[tokio::test]
async fn counters_are_added_with_an_optimistic_lock() {
    let (client, mut api) = verifier();
    let server = tokio::spawn(async move {
        let mut current =
            serde_json::to_value(&*with_finalizer((*sample("ev1.yaml")).clone())).unwrap();
        current["status"] = json!({"events": 1, "dispatched": 10, "succeeded": 7, "failed": 1});
        api.expect("GET", &format!("{CR_PATH}/status"), 200, current.clone())
            .await;
        let patch = api
            .expect("PATCH", &format!("{CR_PATH}/status?"), 200, current)
            .await;
        // The write lost a race: 409, so the caller keeps the counts for the next round.
        api.expect(
            "GET",
            &format!("{CR_PATH}/status"),
            200,
            serde_json::to_value(&*with_finalizer((*sample("ev1.yaml")).clone())).unwrap(),
        )
        .await;
        api.expect(
            "PATCH",
            &format!("{CR_PATH}/status?"),
            409,
            status(409, "Conflict", "the object has been modified"),
        )
        .await;
        patch
    });
    let deltas = Deltas {
        dispatched: 3,
        succeeded: 2,
        failed: 1,
    };
    controller::flush_one(&client, "default", "job-for-ev1", deltas)
        .await
        .unwrap();
    let conflict = controller::flush_one(&client, "default", "job-for-ev1", deltas)
        .await
        .unwrap_err();
    assert!(matches!(conflict, kube::Error::Api(s) if s.code == 409));
    let patch = server.await.unwrap();
    assert_eq!(
        patch,
        json!({"metadata": {"resourceVersion": "41"}, "status": {"dispatched": 13, "succeeded": 9, "failed": 2}})
    );
}

fn lease(holder: &str, renewed: &str, version: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "jobico-dispatcher", "namespace": "jobico-system", "resourceVersion": version},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed,
                    "acquireTime": renewed, "leaseTransitions": 4}})
}

#[tokio::test]
async fn leader_election_creates_respects_takes_over_and_loses_races() {
    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/jobico-system/leases/jobico-dispatcher";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/jobico-system/leases?&fieldManager=jobico-dispatcher";
    let (client, mut api) = verifier();
    let elector = Elector::new(
        client,
        LeaseConfig::new("jobico-system", "jobico-dispatcher", "pod-a"),
    );
    let now = jiff::Timestamp::now().to_string();
    let server = tokio::spawn(async move {
        // No lease: create it.
        api.expect(
            "GET",
            LEASE,
            404,
            status(404, "NotFound", "leases not found"),
        )
        .await;
        let created = api.expect("POST", LEASES, 201, json!({})).await;
        // Held and fresh: no write.
        api.expect("GET", LEASE, 200, lease("pod-b", &now, "7"))
            .await;
        // Held but expired: replace with our identity, carrying the resourceVersion.
        api.expect(
            "GET",
            LEASE,
            200,
            lease("pod-b", "2026-01-01T00:00:00.000000Z", "8"),
        )
        .await;
        let taken = api
            .expect(
                "PUT",
                &format!("{LEASE}?&fieldManager=jobico-dispatcher"),
                200,
                json!({}),
            )
            .await;
        // Expired, but another candidate wrote first: 409, not leader.
        api.expect(
            "GET",
            LEASE,
            200,
            lease("pod-b", "2026-01-01T00:00:00.000000Z", "9"),
        )
        .await;
        api.expect(
            "PUT",
            &format!("{LEASE}?&fieldManager=jobico-dispatcher"),
            409,
            status(409, "Conflict", "modified"),
        )
        .await;
        (created, taken)
    });
    assert!(elector.try_acquire().await.unwrap());
    assert!(!elector.try_acquire().await.unwrap());
    assert!(elector.try_acquire().await.unwrap());
    assert!(!elector.try_acquire().await.unwrap());
    let (created, taken) = server.await.unwrap();
    assert_eq!(created["spec"]["holderIdentity"], "pod-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(taken["spec"]["holderIdentity"], "pod-a");
    assert_eq!(taken["spec"]["leaseTransitions"], 5);
    assert_eq!(taken["metadata"]["resourceVersion"], "8");
}

/// The executor image the tracker tests run with.
const IMAGE: &str = "exec:1";

/// A Job of events a1, b2, c3 as the dispatcher creates it, signed by `signer` (or not).
fn batch_job(signer: Option<&Signer>, conditions: Value) -> Value {
    let mut job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "jobico-ev1-x", "namespace": "default", "uid": "job-uid-1", "resourceVersion": "4",
            "labels": {"event": "ev1", "jobico.coeux.dev/job": "job-for-ev1", "app.kubernetes.io/managed-by": "jobico-dispatcher"},
            "annotations": {"jobico.coeux.dev/event-ids": "a1,b2,c3"}},
        "status": {"conditions": conditions}}))
    .unwrap();
    if let Some(signer) = signer {
        signer.sign_job(&mut job);
    }
    serde_json::to_value(job).unwrap()
}

/// The origin of [`batch_job`].
fn job_origin() -> tracker::Origin {
    tracker::Origin {
        namespace: "default".into(),
        event: "ev1".into(),
        owner: "job-for-ev1".into(),
        job: "jobico-ev1-x".into(),
        ids: vec!["a1".into(), "b2".into(), "c3".into()],
    }
}

fn pod(phase: &str, exit: Option<(i32, &str)>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "jobico-ev1-x-abcde", "namespace": "default", "resourceVersion": "5",
            "labels": {"event": "ev1", "jobico.coeux.dev/job": "job-for-ev1", "app.kubernetes.io/managed-by": "jobico-dispatcher",
                       "batch.kubernetes.io/job-name": "jobico-ev1-x"},
            "annotations": {"jobico.coeux.dev/event-ids": "a1,b2,c3"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "jobico-ev1-x", "uid": "job-uid-1", "controller": true}]},
        "spec": {"containers": [{"name": "wasm-exec", "image": IMAGE}]},
        "status": {"phase": phase}});
    if let Some((code, message)) = exit {
        pod["status"]["containerStatuses"] = json!([{"name": "wasm-exec", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": code, "message": message}}}]);
    }
    pod
}

#[test]
fn pod_and_job_states_map_to_event_states() {
    let summary = r#"{"events":3,"succeeded":1,"failed":1,"omitted":1,"outcomes":[
        {"id":"a1","status":"succeeded","duration_ms":1.0,"output_bytes":3,"result":"ok"},
        {"id":"b2","status":"failed","error":"trap","message":"unreachable","duration_ms":1.0,"output_bytes":0}]}"#;
    let states = |pod: Value| {
        let updates = tracker::pod_updates(&serde_json::from_value(pod).unwrap(), &job_origin());
        updates
            .into_iter()
            .map(|u| (u.id, u.state, u.exit_code, u.reason))
            .collect::<Vec<_>>()
    };
    assert!(states(pod("Pending", None)).is_empty());
    assert_eq!(
        states(pod("Running", None))
            .iter()
            .map(|u| u.1)
            .collect::<Vec<_>>(),
        [EventState::Running; 3]
    );
    let failed = states(pod("Failed", Some((1, summary))));
    assert_eq!(
        failed,
        [
            ("a1".into(), EventState::Succeeded, Some(1), None),
            (
                "b2".into(),
                EventState::Failed,
                Some(1),
                Some("unreachable".into())
            ),
        ]
    );
    // c3 is not in that (older, cut) summary: exit code 1 says some event failed, not which,
    // so the run does not decide it and the Job's end will.
    // wasm-exec's termination message says how each event ended, listed or not.
    let outcome = |id: &str, ok: bool| EventOutcome {
        id: id.into(),
        status: if ok {
            Status::Succeeded
        } else {
            Status::Failed
        },
        exit_code: None,
        error: (!ok).then_some(ErrorKind::Deadline),
        message: None,
        warning: None,
        duration: Duration::from_millis(1),
        output_bytes: 0,
        output_truncated: false,
        result: None,
    };
    let mut message = RunSummary::new(&[
        outcome("a1", true),
        outcome("b2", false),
        outcome("c3", true),
    ])
    .termination_message();
    message.outcomes.clear();
    message.omitted = 3;
    assert_eq!(
        states(pod("Failed", Some((1, &message.to_json())))),
        [
            ("a1".into(), EventState::Succeeded, Some(1), None),
            (
                "b2".into(),
                EventState::Failed,
                Some(1),
                Some("deadline".into())
            ),
            ("c3".into(), EventState::Succeeded, Some(1), None),
        ]
    );
    assert!(
        states(pod("Failed", Some((2, "{\"error\":\"cannot load\"}")))).is_empty(),
        "host errors wait for the Job"
    );
    assert_eq!(
        states(pod("Succeeded", Some((0, ""))))
            .iter()
            .map(|u| u.1)
            .collect::<Vec<_>>(),
        [EventState::Succeeded; 3]
    );

    let job = |conditions: Value| -> k8s_openapi::api::batch::v1::Job {
        serde_json::from_value(json!({"metadata": {"name": "jobico-ev1-x", "namespace": "default",
            "labels": {"event": "ev1", "jobico.coeux.dev/job": "job-for-ev1"},
            "annotations": {"jobico.coeux.dev/event-ids": "a1,b2"}}, "status": {"conditions": conditions}})).unwrap()
    };
    let (_, finished, updates) = tracker::job_updates(&job(json!([])));
    assert!(!finished && updates.is_empty());
    let (_, finished, updates) = tracker::job_updates(&job(
        json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many retries"}]),
    ));
    assert!(finished);
    assert!(updates.iter().all(|u| u.state == EventState::Failed
        && u.reason.as_deref() == Some("job failed: BackoffLimitExceeded: too many retries")));
    let (origin, finished, updates) =
        tracker::job_updates(&job(json!([{"type": "Complete", "status": "True"}])));
    assert!(finished && updates.len() == 2);
    assert_eq!(origin.unwrap().owner, "job-for-ev1");
}

#[test]
fn a_hundred_event_pod_with_one_failure_records_ninety_nine_successes() {
    // The largest batch, 63-character ids, every event with a result, one failing with a
    // long message: far more than the 4 KiB a termination message holds.
    let ids: Vec<String> = (0..100)
        .map(|i| format!("{i:03}-{}", "i".repeat(59)))
        .collect();
    let outcomes: Vec<EventOutcome> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| EventOutcome {
            id: id.clone(),
            status: if i == 57 {
                Status::Failed
            } else {
                Status::Succeeded
            },
            exit_code: Some(if i == 57 { 3 } else { 0 }),
            error: (i == 57).then_some(ErrorKind::GuestError),
            message: (i == 57).then(|| format!("guest returned error code 3: {}", "x".repeat(900))),
            warning: None,
            duration: Duration::from_millis(2),
            output_bytes: 300,
            output_truncated: false,
            result: Some("r".repeat(300)),
        })
        .collect();
    let summary = RunSummary::new(&outcomes);
    assert!(summary.to_json().len() > 30_000);
    let message = summary.termination_message().to_json();
    assert!(message.len() <= 4096, "{}", message.len());
    let pod = pod("Failed", Some((1, &message)));
    let origin = tracker::Origin {
        ids: ids.clone(),
        ..job_origin()
    };
    let updates = tracker::pod_updates(&serde_json::from_value(pod).unwrap(), &origin);
    assert_eq!(updates.len(), 100);
    let succeeded = updates
        .iter()
        .filter(|u| u.state == EventState::Succeeded)
        .count();
    assert_eq!(succeeded, 99, "only the failure is failed");
    let failed = &updates[57];
    assert_eq!(
        (failed.id.as_str(), failed.state),
        (ids[57].as_str(), EventState::Failed)
    );
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap()
            .starts_with("guest returned error code 3")
    );
    assert_eq!(failed.summary.as_ref().unwrap()["exit_code"], 3);
}

#[tokio::test]
async fn the_tracker_relists_after_a_410_and_records_states() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let (client, mut api) = verifier();
    let shutdown = CancellationToken::new();
    let active = ActiveJobs::default();
    let summary = r#"{"events":3,"succeeded":3,"failed":0,"omitted":0,"outcomes":[{"id":"a1","status":"succeeded","duration_ms":2.5,"output_bytes":3,"result":"hi"}]}"#;
    let selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Djobico-dispatcher";
    let list = |kind: &str, items: Vec<Value>, version: &str| json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": version}, "items": items});
    let signer = Signer::ephemeral();
    let job = batch_job(Some(&signer), json!([]));
    let server = tokio::spawn(async move {
        let mut log = Vec::new();
        let mut held = Vec::new();
        let mut pod_lists = 0;
        while let Some((method, path, _, send)) = api.next().await {
            log.push(
                format!("{method} {}", path.split('?').next().unwrap())
                    + if path.contains("watch=true") {
                        " watch"
                    } else {
                        ""
                    },
            );
            // The pod watch may show the pod before the Job watch shows its Job: the tracker
            // then reads the Job itself.
            if path.starts_with("/apis/batch/v1/namespaces/default/jobs/jobico-ev1-x") {
                send.send_response(
                    http::Response::builder()
                        .status(200)
                        .body(kube::client::Body::from(serde_json::to_vec(&job).unwrap()))
                        .unwrap(),
                );
                continue;
            }
            assert!(path.contains(selector), "{path}");
            let body = match (
                path.starts_with("/api/v1/pods"),
                path.contains("watch=true"),
            ) {
                (true, false) => {
                    pod_lists += 1;
                    let item = if pod_lists == 1 {
                        pod("Running", None)
                    } else {
                        pod("Succeeded", Some((0, summary)))
                    };
                    list("PodList", vec![item], "5")
                }
                // The first pod watch fails with 410 Gone: the watcher must list again.
                (true, true) if pod_lists == 1 => {
                    let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
                    send.send_response(
                        http::Response::builder()
                            .status(200)
                            .body(kube::client::Body::from(format!("{gone}\n").into_bytes()))
                            .unwrap(),
                    );
                    continue;
                }
                (false, false) => list("JobList", vec![job.clone()], "5"),
                // Later watches stay open and quiet.
                (_, true) => {
                    held.push(send);
                    if pod_lists >= 2 && log.iter().filter(|l| l.ends_with("watch")).count() >= 3 {
                        return log;
                    }
                    continue;
                }
            };
            send.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
        log
    });
    let run = tokio::spawn(tracker::run(
        client,
        tracker::TrackerConfig {
            states: dispatcher.states.clone(),
            active,
            counters: dispatcher.counters.clone(),
            metrics: dispatcher.metrics.clone(),
            signer,
            image: IMAGE.into(),
            results: None,
        },
        shutdown.clone(),
    ));
    support::eventually(15, "succeeded after the relist", || async {
        dispatcher
            .states
            .get("default", "ev1", "b2")
            .await
            .unwrap()
            .is_some_and(|s| s.state == EventState::Succeeded)
    })
    .await;
    let a1 = dispatcher
        .states
        .get("default", "ev1", "a1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a1.state, EventState::Succeeded);
    assert_eq!(a1.exit_code, Some(0));
    assert_eq!(a1.job.as_deref(), Some("jobico-ev1-x"));
    assert_eq!(a1.summary.unwrap()["result"], "hi");
    let counts = dispatcher.counters.take();
    assert_eq!(
        counts[&("default".to_owned(), "job-for-ev1".to_owned())].succeeded,
        3
    );
    let log = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    let pods: Vec<_> = log
        .iter()
        .filter(|l| l.contains("/pods"))
        .cloned()
        .collect();
    assert_eq!(
        pods[..3],
        [
            "GET /api/v1/pods",
            "GET /api/v1/pods watch",
            "GET /api/v1/pods"
        ],
        "{log:?}"
    );
    shutdown.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn the_crd_check_says_how_to_install_it() {
    let (client, mut api) = verifier();
    let server = tokio::spawn(async move {
        let path = "/apis/jobico.coeux.dev/v1/jobs?&limit=1";
        api.expect(
            "GET",
            path,
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )
        .await;
        api.expect("GET", path, 200, json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "JobList", "metadata": {}, "items": []})).await;
    });
    let missing = controller::check_crd(&client)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("kubectl apply -f crds/job.yaml"),
        "{missing}"
    );
    controller::check_crd(&client).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_gives_up_at_once() {
    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/jobico-system/leases/jobico-dispatcher";
    let (client, mut api) = verifier();
    let mut config = LeaseConfig::new("jobico-system", "jobico-dispatcher", "pod-a");
    config.renew = Duration::from_millis(10);
    let elector = Elector::new(client, config);
    let now = jiff::Timestamp::now().to_string();
    let server = tokio::spawn(async move {
        // One renewal, then pod-b holds a fresh lease (we were partitioned).
        api.expect("GET", LEASE, 200, lease("pod-a", &now, "3"))
            .await;
        api.expect(
            "PUT",
            &format!("{LEASE}?&fieldManager=jobico-dispatcher"),
            200,
            json!({}),
        )
        .await;
        api.expect("GET", LEASE, 200, lease("pod-b", &now, "5"))
            .await;
    });
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        elector.hold(&CancellationToken::new()),
    )
    .await
    .unwrap();
    assert!(lost);
    server.await.unwrap();
}

/// `samples/ev1.yaml`'s resource under another name and creation time.
fn declaring_ev1(name: &str, created: &str) -> Arc<JobicoJob> {
    let mut cr = (*sample("ev1.yaml")).clone();
    cr.metadata.name = Some(name.into());
    cr.metadata.uid = Some(format!("uid-{name}"));
    cr.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
    Arc::new(cr)
}

#[tokio::test]
async fn the_oldest_resource_keeps_a_contested_event_name() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = ConsumerSet::new(dispatcher, shutdown.clone());
    let old = declaring_ev1("old", "2026-01-01T00:00:00Z");
    let young = declaring_ev1("young", "2026-06-01T00:00:00Z");

    // The younger resource is applied first and holds ev1 until the older one arrives.
    assert_eq!(consumers.ensure(young.clone()), vec![]);
    assert_eq!(consumers.ensure(old.clone()), vec![]);
    // From then on the younger one is refused, whichever is reconciled again.
    let conflicts = consumers.ensure(young.clone());
    assert_eq!(
        conflicts,
        vec![Conflict {
            event: "ev1".into(),
            holder: "default/old".into()
        }]
    );
    assert_eq!(consumers.ensure(old.clone()), vec![]);
    let (ready, reason, message) = controller::conflicted(&conflicts);
    assert!(!ready);
    assert_eq!(reason, controller::REASON_DUPLICATE_EVENT);
    assert_eq!(
        message,
        "event \"ev1\" is already declared by Job default/old; ignored here"
    );
    assert_eq!(
        consumers.events(),
        [("default".to_string(), "ev1".to_string())]
    );

    // When the older resource goes, the younger one takes the event on its next reconcile.
    consumers.remove("default", "old");
    assert_eq!(consumers.ensure(young), vec![]);
    assert_eq!(consumers.events().len(), 1);
    consumers.shutdown().await;
}

#[tokio::test]
async fn routes_of_two_resources_forming_a_cycle_are_found_for_both() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = ConsumerSet::new(dispatcher, shutdown.clone());
    let declaring = |name: &str, event: &str, then: Value| {
        let mut cr = (*declaring_ev1(name, "2026-01-01T00:00:00Z")).clone();
        cr.spec.events[0].name = event.into();
        cr.spec.events[0].then = serde_json::from_value(then).unwrap();
        Arc::new(cr)
    };
    let orders = declaring("orders", "order", json!([{"event": "invoice"}]));
    let billing = declaring(
        "billing",
        "invoice",
        json!([{"event": "order", "when": "failed"}]),
    );
    let other = declaring("other", "audit", json!([{"event": "order"}]));
    for cr in [&orders, &billing, &other] {
        assert_eq!(consumers.ensure(cr.clone()), vec![]);
    }
    let cycle = "invoice → order → invoice";
    assert_eq!(consumers.route_cycles(&orders), [cycle]);
    assert_eq!(consumers.route_cycles(&billing), [cycle]);
    assert!(
        consumers.route_cycles(&other).is_empty(),
        "audit only leads into it"
    );
    // Breaking it on either side clears both.
    let billing = declaring("billing", "invoice", json!([]));
    consumers.ensure(billing.clone());
    assert!(consumers.route_cycles(&orders).is_empty());
    assert!(consumers.route_cycles(&billing).is_empty());
    consumers.shutdown().await;
}

/// Serves the tracker's lists and watches: each list of a kind answers the next of `lists`
/// (the last one again when they run out); a watch answers 410 Gone while more lists of its
/// kind are queued (forcing a relist) and otherwise stays open and quiet. A GET of one Job
/// answers it from the latest Job list.
fn serve_watches(
    mut api: support::fake_api::Verifier,
    mut job_lists: std::collections::VecDeque<Vec<Value>>,
    mut pod_lists: std::collections::VecDeque<Vec<Value>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut last_jobs = Vec::new();
        let list = |kind: &str, items: &[Value]| json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "7"}, "items": items});
        while let Some((_, path, _, send)) = api.next().await {
            let pods = path.starts_with("/api/v1/pods");
            let watch = path.contains("watch=true");
            let lists = if pods { &mut pod_lists } else { &mut job_lists };
            let body = if path.starts_with("/apis/batch/v1/namespaces/") {
                let name = path.split('?').next().unwrap().rsplit('/').next().unwrap();
                match last_jobs
                    .iter()
                    .find(|j: &&Value| j["metadata"]["name"] == name)
                {
                    Some(job) => job.clone(),
                    None => status(404, "NotFound", "not found"),
                }
            } else if watch && lists.len() > 1 {
                lists.pop_front();
                let gone = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
                send.send_response(
                    http::Response::builder()
                        .status(200)
                        .body(kube::client::Body::from(format!("{gone}\n").into_bytes()))
                        .unwrap(),
                );
                continue;
            } else if watch {
                held.push(send);
                continue;
            } else {
                let items = lists.front().cloned().unwrap_or_default();
                if !pods {
                    last_jobs = items.clone();
                }
                list(if pods { "PodList" } else { "JobList" }, &items)
            };
            send.send_response(
                http::Response::builder()
                    .status(if body["kind"] == "Status" { 404 } else { 200 })
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    })
}

/// A tracker on a fresh fake API serving `jobs` and `pods` lists; returns the dispatcher (for
/// its states), the active counts and the shutdown token.
async fn tracking(
    signer: Signer,
    jobs: Vec<Vec<Value>>,
    pods: Vec<Vec<Value>>,
) -> (
    jobico_testkit::NatsServer,
    Arc<Dispatcher<Nothing>>,
    ActiveJobs,
    CancellationToken,
) {
    tracking_with(signer, jobs, pods, None, &[]).await
}

/// [`tracking`] posting failed Jobs' outcomes to `results`, with the events `decided` already
/// recorded `succeeded` (by their pod) before the tracker starts.
async fn tracking_with(
    signer: Signer,
    jobs: Vec<Vec<Value>>,
    pods: Vec<Vec<Value>>,
    results: Option<jobico_dispatcher::render::ResultsConfig>,
    decided: &[&str],
) -> (
    jobico_testkit::NatsServer,
    Arc<Dispatcher<Nothing>>,
    ActiveJobs,
    CancellationToken,
) {
    let (server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    for id in decided {
        dispatcher
            .states
            .advance(jobico_store::status(
                "default",
                "ev1",
                id,
                EventState::Succeeded,
            ))
            .await
            .unwrap();
    }
    let (client, api) = verifier();
    serve_watches(api, jobs.into(), pods.into());
    let shutdown = CancellationToken::new();
    let active = ActiveJobs::default();
    tokio::spawn(tracker::run(
        client,
        tracker::TrackerConfig {
            states: dispatcher.states.clone(),
            active: active.clone(),
            counters: dispatcher.counters.clone(),
            metrics: dispatcher.metrics.clone(),
            signer,
            image: IMAGE.into(),
            results,
        },
        shutdown.clone(),
    ));
    (server, dispatcher, active, shutdown)
}

#[tokio::test]
async fn a_failed_job_of_an_event_with_routes_reports_its_undecided_events_before_recording_them() {
    use jobico_common::chain::{RESULTS_BATCH_HEADER, RESULTS_URL_VAR, results_token_valid};
    let signer = Signer::ephemeral();
    let mut job = batch_job(
        Some(&signer),
        json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                "message": "Job was active longer than specified deadline"}]),
    );
    // What the dispatcher renders for an event with routes or a sink: the results URL.
    job["spec"] = json!({"template": {"spec": {"containers": [{"name": "wasm-exec", "image": IMAGE,
        "env": [{"name": RESULTS_URL_VAR, "value": "http://ingress/results/default/ev1"}]}]}}});
    let (address, received) = support::receiver(vec![503]).await;
    let key = b"a results key of at least 32 bytes!".to_vec();
    let results = jobico_dispatcher::render::ResultsConfig {
        base_url: format!("http://{address}"),
        key: key.clone(),
    };
    // a1's pod decided it; b2 and c3 only the Job's failure does.
    let (_server, dispatcher, _active, shutdown) = tracking_with(
        signer,
        vec![vec![job]],
        vec![vec![]],
        Some(results),
        &["a1"],
    )
    .await;
    support::eventually(15, "b2 and c3 failed after the post", || async {
        let mut failed = 0;
        for id in ["b2", "c3"] {
            let state = dispatcher.states.get("default", "ev1", id).await.unwrap();
            failed += usize::from(state.is_some_and(|s| s.state == EventState::Failed));
        }
        failed == 2
    })
    .await;
    let posts = received.lock().unwrap().clone();
    assert_eq!(posts.len(), 2, "refused once (503), then taken: {posts:?}");
    let (headers, report) = &posts[1];
    let ids: Vec<&str> = report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b2", "c3"], "{report}");
    assert_eq!(report["outcomes"][0]["status"], "failed");
    assert_eq!(report["outcomes"][0]["error"], "job");
    assert_eq!(
        report["outcomes"][0]["message"],
        "job failed: DeadlineExceeded: Job was active longer than specified deadline"
    );
    // Signed for exactly those ids, as the ingress checks it.
    let digest = headers[RESULTS_BATCH_HEADER].to_str().unwrap();
    assert_eq!(digest, jobico_common::summary::batch_digest(&ids));
    let token = headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap();
    assert!(results_token_valid(&key, "default", "ev1", digest, token));
    assert_eq!(
        dispatcher
            .states
            .get("default", "ev1", "a1")
            .await
            .unwrap()
            .unwrap()
            .state,
        EventState::Succeeded,
        "the pod's outcome stands"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn unsigned_jobs_and_pods_running_another_image_record_nothing() {
    let signer = Signer::ephemeral();
    let success = r#"{"events":1,"succeeded":1,"failed":0,"omitted":0,"outcomes":[]}"#;
    // A tenant's Job copying our labels, complete; its pod claims success for a1, b2, c3.
    let forged_job = batch_job(None, json!([{"type": "Complete", "status": "True"}]));
    let forged_pod = pod("Succeeded", Some((0, success)));
    // One of our Jobs (d4), with a pod of a tenant that points at it but runs another image.
    let mut ours = batch_job(Some(&Signer::ephemeral()), json!([]));
    ours["metadata"]["name"] = json!("jobico-ev1-y");
    ours["metadata"]["uid"] = json!("job-uid-2");
    ours["metadata"]["annotations"]["jobico.coeux.dev/event-ids"] = json!("d4");
    let mut ours: k8s_openapi::api::batch::v1::Job = serde_json::from_value(ours).unwrap();
    signer.sign_job(&mut ours);
    let ours = serde_json::to_value(ours).unwrap();
    let mut impostor = pod("Succeeded", Some((0, success)));
    impostor["metadata"]["name"] = json!("impostor");
    impostor["metadata"]["ownerReferences"][0]["uid"] = json!("job-uid-2");
    impostor["metadata"]["ownerReferences"][0]["name"] = json!("jobico-ev1-y");
    impostor["spec"]["containers"][0]["image"] = json!("evil:1");
    // And, as a control, our Job's real pod running, which is recorded.
    let mut real = pod("Running", None);
    real["metadata"]["name"] = json!("real");
    real["metadata"]["ownerReferences"][0]["uid"] = json!("job-uid-2");
    real["metadata"]["ownerReferences"][0]["name"] = json!("jobico-ev1-y");
    let (_server, dispatcher, _active, shutdown) = tracking(
        signer,
        vec![vec![forged_job, ours]],
        vec![vec![forged_pod, impostor, real]],
    )
    .await;
    support::eventually(10, "our Job's pod recorded", || async {
        dispatcher
            .states
            .get("default", "ev1", "d4")
            .await
            .unwrap()
            .is_some_and(|s| s.state == EventState::Running)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ["a1", "b2", "c3"] {
        assert_eq!(
            dispatcher.states.get("default", "ev1", id).await.unwrap(),
            None,
            "{id} was recorded from a forged Job or pod"
        );
    }
    assert_eq!(
        dispatcher
            .states
            .get("default", "ev1", "d4")
            .await
            .unwrap()
            .unwrap()
            .state,
        EventState::Running,
        "the impostor pod's success was believed"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_job_gone_during_a_watch_gap_fails_its_events_and_frees_its_slot() {
    let signer = Signer::ephemeral();
    let running = batch_job(Some(&signer), json!([]));
    // First list: our Job runs. Then the watch expires and the relist no longer has it.
    let (_server, dispatcher, active, shutdown) =
        tracking(signer, vec![vec![running], vec![]], vec![vec![]]).await;
    support::eventually(10, "failed with the reason", || async {
        dispatcher
            .states
            .get("default", "ev1", "b2")
            .await
            .unwrap()
            .is_some_and(|s| {
                s.state == EventState::Failed
                    && s.reason
                        .as_deref()
                        .is_some_and(|r| r.contains("deleted before its outcome was seen"))
            })
    })
    .await;
    assert_eq!(
        active.count("default", "ev1"),
        0,
        "the vanished Job still holds a slot"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_template_the_policy_refuses_makes_the_resource_not_ready_before_any_event() {
    let (_server, js) = nats().await;
    let dispatcher = Dispatcher::connect(
        js,
        Nothing,
        Arc::new(Metrics::new()),
        RetryPolicy::default(),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let consumers = Arc::new(ConsumerSet::new(dispatcher, shutdown.clone()));
    let (client, mut api) = verifier();
    let ctx = Arc::new(
        Context::new(client, consumers.clone(), Some("pod-a".into()))
            .with_templates(Arc::new(TemplateChecker::new(Renderer::new("wasm-exec:1")))),
    );
    let mut cr = (*sample("ev1.yaml")).clone();
    cr.spec.template = Some(jobico_model::TemplateRef {
        name: "tpl".into(),
        key: None,
    });
    let cr = with_finalizer(cr);
    let default = jobico_dispatcher::render::DEFAULT_TEMPLATE;
    let hostile = default.replacen(
        "drop: [\"ALL\"]",
        "drop: [\"ALL\"]\n              add: [\"SYS_ADMIN\"]",
        1,
    );
    let status_path = format!("{CR_PATH}/status?&force=true&fieldManager=jobico-dispatcher");
    let applied = json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job", "metadata": {"name": "job-for-ev1"}, "spec": {"events": []}});
    let events_path = "/apis/events.k8s.io/v1/namespaces/default/events?";
    let map = |source: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tpl"}, "data": {"job.yaml.hbs": source}});
    let tpl_path = "/api/v1/namespaces/default/configmaps/tpl";

    let (hostile_map, status_path_1, applied_1) =
        (map(&hostile), status_path.clone(), applied.clone());
    let server = tokio::spawn(async move {
        api.expect("GET", tpl_path, 200, hostile_map).await;
        let status_patch = api.expect("PATCH", &status_path_1, 200, applied_1).await;
        let event = api.expect("POST", events_path, 201, json!({})).await;
        (api, status_patch, event)
    });
    let action = controller::reconcile(cr.clone(), ctx.clone())
        .await
        .unwrap();
    let (mut api, status_patch, event) = server.await.unwrap();
    let condition = &status_patch["status"]["conditions"][0];
    assert_eq!(
        (condition["status"].as_str(), condition["reason"].as_str()),
        (Some("False"), Some(controller::REASON_INVALID_TEMPLATE))
    );
    let message = condition["message"].as_str().unwrap();
    assert!(
        message.contains("spec.template.spec.containers[0].securityContext.capabilities.add"),
        "{message}"
    );
    assert_eq!(event["type"], "Warning");
    // Its events are consumed only to be held: none is dispatched while the template is refused.
    assert_eq!(
        consumers.events(),
        [("default".to_owned(), "ev1".to_owned())]
    );
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );

    // Fixed: the next reconcile reads it again, and the events are consumed.
    let good = map(default);
    let server = tokio::spawn(async move {
        api.expect("GET", tpl_path, 200, good).await;
        expect_inputs(&mut api).await;
        let status_patch = api.expect("PATCH", &status_path, 200, applied).await;
        api.expect("POST", events_path, 201, json!({})).await;
        status_patch
    });
    controller::reconcile(cr, ctx).await.unwrap();
    let status_patch = server.await.unwrap();
    assert_eq!(status_patch["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        consumers.events(),
        [("default".to_owned(), "ev1".to_owned())]
    );
    shutdown.cancel();
    consumers.shutdown().await;
}
