//! Controller, leader election and the state tracker against a scripted fake API.

mod support;

use std::sync::Arc;
use std::time::Duration;

use jobico_common::EventState;
use jobico_dispatcher::backend::{Backend, Batch, DispatchError, Dispatched};
use jobico_dispatcher::consumers::{Conflict, ConsumerSet};
use jobico_dispatcher::controller::{self, Context};
use jobico_dispatcher::kubernetes::ActiveJobs;
use jobico_dispatcher::leader::{Elector, LeaseConfig};
use jobico_dispatcher::metrics::Metrics;
use jobico_dispatcher::render::{Renderer, TemplateChecker};
use jobico_dispatcher::state::Deltas;
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
    let ctx = Arc::new(Context::new(
        client,
        consumers.clone(),
        Some("pod-a".into()),
    ));

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

    // 2. With the finalizer: status by server-side apply, an Event, consumers started.
    let cr = with_finalizer((*sample("ev1.yaml")).clone());
    let server = tokio::spawn(async move {
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

    // 3. Status already as desired: no write at all.
    let mut done = (*cr).clone();
    done.status = Some(serde_json::from_value(json!({
        "conditions": [{"type": "Ready", "status": "True", "reason": "Dispatching", "message": "1 event(s) consumed",
                        "observedGeneration": 3, "lastTransitionTime": "2026-11-22T00:00:00Z"}],
        "observedGeneration": 3, "events": 1})).unwrap());
    controller::reconcile(Arc::new(done), ctx.clone())
        .await
        .unwrap();
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

fn pod(phase: &str, exit: Option<(i32, &str)>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "jobico-ev1-x-abcde", "namespace": "default", "resourceVersion": "5",
            "labels": {"event": "ev1", "jobico.coeux.dev/job": "job-for-ev1", "app.kubernetes.io/managed-by": "jobico-dispatcher",
                       "batch.kubernetes.io/job-name": "jobico-ev1-x"},
            "annotations": {"jobico.coeux.dev/event-ids": "a1,b2,c3"}},
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
        let (_, updates) = tracker::pod_updates(&serde_json::from_value(pod).unwrap());
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
            ("c3".into(), EventState::Failed, Some(1), None),
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
                (false, false) => list("JobList", vec![], "5"),
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
        dispatcher.states.clone(),
        active,
        dispatcher.counters.clone(),
        dispatcher.metrics.clone(),
        shutdown.clone(),
    ));
    support::eventually(15, "succeeded after the relist", || async {
        dispatcher
            .states
            .get("default", "b2")
            .await
            .unwrap()
            .is_some_and(|s| s.state == EventState::Succeeded)
    })
    .await;
    let a1 = dispatcher
        .states
        .get("default", "a1")
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
    assert!(consumers.events().is_empty(), "no event is consumed");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(30))
    );

    // Fixed: the next reconcile reads it again, and the events are consumed.
    let good = map(default);
    let server = tokio::spawn(async move {
        api.expect("GET", tpl_path, 200, good).await;
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
