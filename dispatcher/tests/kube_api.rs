//! The fake Kubernetes API server over HTTP (`jobico_testkit::kube_api`), driven by a real
//! kube client from its kubeconfig: what the chaos runner's dispatcher relies on it for
//! behaves as the API server does.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use jobico_testkit::kube_api::{Fault, KubeApi, resource};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

fn job(name: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "i"}]}}}
    }))
    .unwrap()
}

fn code(error: kube::Error) -> u16 {
    match error {
        kube::Error::Api(status) => status.code,
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_conflict_and_replaces_check_the_resource_version() {
    let fake = KubeApi::start();
    let jobs: Api<Job> = Api::namespaced(fake.client().await, "ns1");
    let created = jobs
        .create(&PostParams::default(), &job("j1"))
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("ns1"));
    assert!(created.metadata.uid.is_some());
    let again = jobs
        .create(&PostParams::default(), &job("j1"))
        .await
        .unwrap_err();
    assert_eq!(code(again), 409);

    let leases: Api<Lease> = Api::namespaced(fake.client().await, "jobico-system");
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}))
    .unwrap();
    let first = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut second = first.clone();
    second.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("l", &PostParams::default(), &second)
        .await
        .unwrap();
    // `first` carries the old resourceVersion: a replace from it loses.
    let stale = leases
        .replace("l", &PostParams::default(), &first)
        .await
        .unwrap_err();
    assert_eq!(code(stale), 409);
    let now = leases.get("l").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("b"));
    assert_eq!(
        fake.requests()[&(
            "update".to_owned(),
            resource("coordination.k8s.io/v1", "leases")
        )],
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watches_see_every_change_and_status_is_a_subresource() {
    let fake = KubeApi::start();
    let client = fake.client().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "ns1");
    jobs.create(&PostParams::default(), &job("before"))
        .await
        .unwrap();
    let events = watcher(
        Api::<Job>::all(client.clone()),
        watcher::Config::default().labels("app=x"),
    )
    .applied_objects();
    let mut events = std::pin::pin!(events);
    let first = events.try_next().await.unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("before"));
    jobs.create(&PostParams::default(), &job("after"))
        .await
        .unwrap();
    let second = events.try_next().await.unwrap().unwrap();
    assert_eq!(second.metadata.name.as_deref(), Some("after"));

    // A write to the object keeps its status; a write to status changes only that.
    jobs.patch_status(
        "after",
        &PatchParams::apply("test").force(),
        &Patch::Apply(json!({"apiVersion": "batch/v1", "kind": "Job",
                              "status": {"succeeded": 1}})),
    )
    .await
    .unwrap();
    jobs.patch(
        "after",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"extra": "1"}}, "status": {"succeeded": 9}})),
    )
    .await
    .unwrap();
    let now = jobs.get("after").await.unwrap();
    assert_eq!(now.status.unwrap().succeeded, Some(1));
    assert_eq!(now.metadata.labels.unwrap()["extra"], "1");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the watch shows both writes")
            .unwrap()
            .unwrap();
        seen.push(next.metadata.resource_version.unwrap());
    }
    assert_ne!(seen[0], seen[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_hold_a_deleted_object_until_removed() {
    let fake = KubeApi::start();
    let jobs: Api<Job> = Api::namespaced(fake.client().await, "ns1");
    jobs.create(&PostParams::default(), &job("j"))
        .await
        .unwrap();
    // kube's finalizer helper: `test` /metadata/finalizers is null, then `add` it.
    jobs.patch(
        "j",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    jobs.delete("j", &DeleteParams::default()).await.unwrap();
    let held = jobs.get("j").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    jobs.patch(
        "j",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "x/y"},
                {"op": "remove", "path": "/metadata/finalizers/0"}
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(code(jobs.get("j").await.unwrap_err()), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_answer_instead_of_or_after_the_request() {
    let fake = KubeApi::start();
    let jobs: Api<Job> = Api::namespaced(fake.client().await, "ns1");
    let batch_jobs = resource("batch/v1", "jobs");
    fake.inject(
        Fault::answer(429)
            .retry_after(3)
            .on("create", &batch_jobs)
            .times(1),
    );
    let throttled = jobs
        .create(&PostParams::default(), &job("a"))
        .await
        .unwrap_err();
    assert_eq!(code(throttled), 429);
    assert!(
        fake.created(&batch_jobs).is_empty(),
        "a refused create writes nothing"
    );
    fake.inject(
        Fault::answer(504)
            .after_commit()
            .on("create", &batch_jobs)
            .times(1),
    );
    let timed_out = jobs
        .create(&PostParams::default(), &job("a"))
        .await
        .unwrap_err();
    assert_eq!(code(timed_out), 504);
    assert_eq!(fake.created(&batch_jobs).len(), 1, "the create committed");
    let exists = jobs
        .create(&PostParams::default(), &job("a"))
        .await
        .unwrap_err();
    assert_eq!(code(exists), 409);
    fake.inject(Fault::answer(503).lasting(Duration::from_millis(300)));
    assert_eq!(
        code(jobs.list(&ListParams::default()).await.unwrap_err()),
        503
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        jobs.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn created_jobs_complete_when_it_plays_the_job_controller() {
    let fake = KubeApi::start();
    fake.run_jobs(Some(Duration::from_millis(20)));
    let jobs: Api<Job> = Api::namespaced(fake.client().await, "ns1");
    jobs.create(&PostParams::default(), &job("runs"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = jobs.get("runs").await.unwrap().status.unwrap_or_default();
        let complete = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
        if complete {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Job never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_modelled_control_plane_serves_requests_and_pod_writes_in_one_queue() {
    use jobico_testkit::kube_api::ControlPlane;
    let fake = KubeApi::start();
    // 5 ms per write; each Job costs 4 writes besides its create and runs 10 ms.
    fake.control_plane(Some(ControlPlane {
        writes_per_second: 200.0,
        writes_per_job: 4,
    }));
    fake.run_jobs(Some(Duration::from_millis(10)));
    let jobs: Api<Job> = Api::namespaced(fake.client().await, "ns1");
    let started = std::time::Instant::now();
    let names: Vec<String> = (0..5).map(|i| format!("queued-{i}")).collect();
    futures::future::try_join_all(
        names
            .iter()
            .map(|name| async { jobs.create(&PostParams::default(), &job(name)).await }),
    )
    .await
    .unwrap();
    let deadline = started + Duration::from_secs(10);
    let complete = |job: &Job| {
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    };
    while !jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|j| complete(j))
        .count()
        .eq(&names.len())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the Jobs never completed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 5 creates and 5 × 4 controller writes, one at a time: at least 25 × 5 ms. Served
    // side by side they would all be done in about 10 ms of writes and 10 ms of running.
    assert!(
        started.elapsed() >= Duration::from_millis(125),
        "writes were not queued: done in {:?}",
        started.elapsed()
    );
    assert_eq!(fake.controller_writes(), 20);
    assert_eq!(
        fake.writes().get("batch/v1/jobs"),
        Some(&5),
        "requests' writes are counted apart from the controllers'"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_lease_namespace_is_named_with_the_fix_instead_of_retried_in_silence() {
    use jobico_dispatcher::leader::{Elector, LeaseConfig};
    let fake = KubeApi::start();
    fake.require_namespaces();
    let elector = Elector::new(
        fake.client().await,
        LeaseConfig::new("jobico-system", "jobico-dispatcher", "replica-0"),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let error = tokio::time::timeout(Duration::from_secs(10), elector.acquire(&shutdown))
        .await
        .expect("the missing namespace ends the campaign at once")
        .unwrap_err()
        .to_string();
    assert!(error.contains("jobico-system"), "{error}");
    assert!(
        error.contains("kubectl create namespace jobico-system"),
        "{error}"
    );
    assert!(error.contains("--lease-namespace"), "{error}");

    fake.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "jobico-system"}}),
    );
    assert!(elector.acquire(&shutdown).await.unwrap());
}
