//! The Kubernetes backend against a scripted fake API (exact methods, paths and bodies).

mod support;

use std::time::Duration;

use jobico_dispatcher::backend::{Backend, DispatchError, Dispatched};
use jobico_dispatcher::kubernetes::KubeBackend;
use jobico_dispatcher::render::{DEFAULT_TEMPLATE, Renderer};
use jobico_dispatcher::trust::Signer;
use serde_json::{Value, json};
use support::fake_api::{Verifier, status, too_many_requests, verifier};
use support::{batch, golden, sample};

const IMAGE: &str = "ghcr.io/coeux/wasm-exec:0.1.0";

/// A signer with a fixed key, so signed bodies are the same every run.
fn signer() -> Signer {
    Signer::from_key([7; jobico_dispatcher::trust::KEY_BYTES])
}

/// `job` as the dispatcher would have created it: signed.
fn signed(job: Value) -> Value {
    let mut job: k8s_openapi::api::batch::v1::Job = serde_json::from_value(job).unwrap();
    signer().sign_job(&mut job);
    serde_json::to_value(job).unwrap()
}
const CREATE: &str = "/apis/batch/v1/namespaces/default/jobs?&fieldManager=jobico-dispatcher";

/// What the fake API does with the create, controller-rs style.
enum Scenario {
    /// 201 Created.
    Created,
    /// 409 AlreadyExists, then the existing Job carries these ids.
    AlreadyExists(&'static str),
    /// 429 with Retry-After.
    Throttled(u32),
    /// 500.
    ServerError,
    /// 422 Invalid.
    Invalid,
}

impl Scenario {
    async fn run(self, mut api: Verifier, name: String) -> Value {
        let job_path = format!("/apis/batch/v1/namespaces/default/jobs/{name}");
        match self {
            Scenario::Created => api.expect("POST", CREATE, 201, json!({})).await,
            Scenario::AlreadyExists(ids) => {
                let body = api
                    .expect(
                        "POST",
                        CREATE,
                        409,
                        status(409, "AlreadyExists", "jobs.batch exists"),
                    )
                    .await;
                let existing = signed(json!({"apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": name, "namespace": "default", "labels": {"event": "ev1"},
                                 "annotations": {"jobico.coeux.dev/event-ids": ids}}}));
                assert_eq!(
                    api.expect("GET", &job_path, 200, existing).await,
                    Value::Null
                );
                body
            }
            Scenario::Throttled(seconds) => {
                api.expect("POST", CREATE, 429, too_many_requests(seconds))
                    .await
            }
            Scenario::ServerError => {
                api.expect(
                    "POST",
                    CREATE,
                    500,
                    status(500, "InternalError", "etcd timeout"),
                )
                .await
            }
            Scenario::Invalid => {
                api.expect(
                    "POST",
                    CREATE,
                    422,
                    status(422, "Invalid", "spec.template: bad"),
                )
                .await
            }
        }
    }
}

async fn dispatch(scenario: Scenario, ids: &[&str]) -> (Result<Dispatched, DispatchError>, Value) {
    let (client, api) = verifier();
    let backend = KubeBackend::new(client, Renderer::new(IMAGE)).with_signer(signer());
    let owner = sample("ev1.yaml");
    let b = batch(&owner, ids);
    let server = tokio::spawn(scenario.run(api, b.job_name()));
    let result = tokio::time::timeout(Duration::from_secs(10), backend.dispatch(&b))
        .await
        .unwrap();
    let body = server.await.unwrap();
    (result, body)
}

#[tokio::test]
async fn create_posts_the_golden_job_body() {
    let (result, body) =
        dispatch(Scenario::Created, &["0190c5a1-7b7e-7c3e-9f00-000000000001"]).await;
    let dispatched = result.unwrap();
    assert!(dispatched.created);
    assert_eq!(
        dispatched.job,
        jobico_dispatcher::backend::job_name("ev1", "0190c5a1-7b7e-7c3e-9f00-000000000001")
    );
    golden(
        "ev1-create-request.json",
        &(serde_json::to_string_pretty(&body).unwrap() + "\n"),
    );
    // The body is the rendered Job and its signature, nothing else.
    let mut body = body;
    let signature = body["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(jobico_dispatcher::trust::SIGNATURE);
    assert!(signature.is_some_and(|s| s.is_string()));
    let rendered: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ev1.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(body, rendered);
}

#[tokio::test]
async fn already_exists_with_the_same_ids_counts_as_created() {
    let (result, _) = dispatch(Scenario::AlreadyExists("a1,b2"), &["a1", "b2"]).await;
    assert_eq!(
        result.unwrap(),
        Dispatched {
            job: jobico_dispatcher::backend::job_name("ev1", "a1"),
            created: false
        }
    );
}

#[tokio::test]
async fn already_exists_with_other_ids_reports_what_the_job_holds() {
    let (result, _) = dispatch(Scenario::AlreadyExists("a1"), &["a1", "b2"]).await;
    match result.unwrap_err() {
        DispatchError::Taken { ids, .. } => assert_eq!(ids, ["a1"]),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn throttling_is_retryable_with_the_servers_delay() {
    let (result, _) = dispatch(Scenario::Throttled(3), &["a1"]).await;
    match result.unwrap_err() {
        DispatchError::Retryable { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(3)))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn server_errors_retry_and_invalid_objects_do_not() {
    let (result, _) = dispatch(Scenario::ServerError, &["a1"]).await;
    assert!(matches!(
        result.unwrap_err(),
        DispatchError::Retryable {
            retry_after: None,
            ..
        }
    ));
    let (result, _) = dispatch(Scenario::Invalid, &["a1"]).await;
    assert!(matches!(
        result.unwrap_err(),
        DispatchError::Permanent { .. }
    ));
}

#[tokio::test]
async fn a_template_configmap_is_read_once_and_used() {
    let (client, mut api) = verifier();
    let backend = KubeBackend::new(client, Renderer::new(IMAGE));
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.template = Some(jobico_model::TemplateRef {
        name: "tpl".into(),
        key: None,
    });
    let owner = std::sync::Arc::new(owner);
    let template = DEFAULT_TEMPLATE.replacen(
        "  labels: {{json labels}}",
        "  labels: {custom: \"yes\"}",
        1,
    );
    let server = tokio::spawn(async move {
        let map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tpl"}, "data": {"job.yaml.hbs": template}});
        api.expect("GET", "/api/v1/namespaces/default/configmaps/tpl", 200, map)
            .await;
        let first = api.expect("POST", CREATE, 201, json!({})).await;
        // Cached: the second dispatch goes straight to the create.
        let second = api.expect("POST", CREATE, 201, json!({})).await;
        (first, second)
    });
    backend.dispatch(&batch(&owner, &["a1"])).await.unwrap();
    backend.dispatch(&batch(&owner, &["b2"])).await.unwrap();
    let (first, second) = server.await.unwrap();
    assert_eq!(first["metadata"]["labels"]["custom"], "yes");
    assert_eq!(
        first["metadata"]["labels"]["jobico.coeux.dev/event-id"],
        "a1"
    );
    assert_eq!(
        second["metadata"]["labels"]["jobico.coeux.dev/event-id"],
        "b2"
    );
}

#[tokio::test]
async fn a_template_the_policy_refuses_or_a_missing_one_holds_the_events() {
    let (client, mut api) = verifier();
    let backend = KubeBackend::new(client, Renderer::new(IMAGE));
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.template = Some(jobico_model::TemplateRef {
        name: "tpl".into(),
        key: None,
    });
    let owner = std::sync::Arc::new(owner);
    let hostile = DEFAULT_TEMPLATE.replacen(
        "      restartPolicy: Never\n",
        "      restartPolicy: Never\n      hostNetwork: true\n",
        1,
    );
    let server = tokio::spawn(async move {
        let map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tpl"}, "data": {"job.yaml.hbs": hostile}});
        api.expect("GET", "/api/v1/namespaces/default/configmaps/tpl", 200, map)
            .await;
        // No create follows the refusal: the next request is the second owner's read.
        api.expect(
            "GET",
            "/api/v1/namespaces/default/configmaps/gone",
            404,
            status(404, "NotFound", "configmaps \"gone\" not found"),
        )
        .await;
    });
    match backend.dispatch(&batch(&owner, &["a1"])).await {
        Err(DispatchError::Held { reason }) => {
            assert!(
                reason.contains("spec.template.spec.hostNetwork"),
                "{reason}"
            );
        }
        other => panic!("expected Held, got {other:?}"),
    }
    let mut missing = (*owner).clone();
    missing.spec.template.as_mut().unwrap().name = "gone".into();
    match backend
        .dispatch(&batch(&std::sync::Arc::new(missing), &["b2"]))
        .await
    {
        Err(DispatchError::Held { reason }) => {
            assert_eq!(reason, "template ConfigMap default/gone not found");
        }
        other => panic!("expected Held, got {other:?}"),
    }
    server.await.unwrap();
}

#[tokio::test]
async fn events_wait_until_the_secret_they_read_is_granted_to_modules() {
    let (client, mut api) = verifier();
    let backend =
        KubeBackend::new(client, Renderer::new(IMAGE)).with_module_check_ttl(Duration::ZERO);
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].env = serde_json::from_value(json!([
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
    ]))
    .unwrap();
    let owner = std::sync::Arc::new(owner);
    let modules = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "job-for-ev1-modules"},
        "binaryData": {"echo.wasm": "AGFzbQEAAAA="}});
    let secret = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "labels": labels},
               "data": {"password": "aHVudGVyMg=="}})
    };
    let server = tokio::spawn(async move {
        let modules_path = "/api/v1/namespaces/default/configmaps/job-for-ev1-modules";
        let secret_path = "/api/v1/namespaces/default/secrets/db";
        api.expect("GET", modules_path, 200, modules.clone()).await;
        api.expect("GET", secret_path, 200, secret(json!({}))).await;
        api.expect("GET", modules_path, 200, modules).await;
        let granted = secret(json!({"jobico.coeux.dev/modules-may-read": "true"}));
        api.expect("GET", secret_path, 200, granted).await;
    });
    let batch = batch(&owner, &["a1"]);
    match backend.ready(&batch).await {
        Err(DispatchError::Held { reason }) => assert_eq!(
            reason,
            "event \"ev1\": env[0]: Secret default/db is not granted to modules; grant it with `kubectl label secret db -n default jobico.coeux.dev/modules-may-read=true`"
        ),
        other => panic!("expected Held, got {other:?}"),
    }
    backend.ready(&batch).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn holds_asks_whether_the_claimed_job_has_the_event() {
    let (client, mut api) = verifier();
    let backend = KubeBackend::new(client, Renderer::new(IMAGE)).with_signer(signer());
    let path = "/apis/batch/v1/namespaces/default/jobs/jobico-ev1-x";
    let server = tokio::spawn(async move {
        let unsigned = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "jobico-ev1-x", "namespace": "default", "labels": {"event": "ev1"},
                         "annotations": {"jobico.coeux.dev/event-ids": "a1,b2"}}});
        let job = signed(unsigned.clone());
        api.expect("GET", path, 200, job.clone()).await;
        api.expect("GET", path, 200, job).await;
        // A Job Jobico did not create never holds an event, whatever it says.
        api.expect("GET", path, 200, unsigned).await;
        api.expect("GET", path, 404, status(404, "NotFound", "not found"))
            .await;
        api.expect("GET", path, 503, status(503, "ServiceUnavailable", "down"))
            .await;
    });
    assert!(
        backend
            .holds("default", "jobico-ev1-x", "b2")
            .await
            .unwrap()
    );
    assert!(
        !backend
            .holds("default", "jobico-ev1-x", "c3")
            .await
            .unwrap()
    );
    assert!(
        !backend
            .holds("default", "jobico-ev1-x", "b2")
            .await
            .unwrap(),
        "an unsigned Job was believed"
    );
    assert!(
        !backend
            .holds("default", "jobico-ev1-x", "a1")
            .await
            .unwrap(),
        "no Job, no hold"
    );
    assert!(matches!(
        backend.holds("default", "jobico-ev1-x", "a1").await,
        Err(DispatchError::Retryable { .. })
    ));
    server.await.unwrap();
}
