//! wasm-exec as Kubernetes starts it: the dispatcher renders the Job, and the binary is
//! `execve`d with exactly that container's arguments and environment (plus what the kubelet
//! adds), its ConfigMap volumes laid out on disk the way the kubelet mounts them. This is where
//! the kernel's limits on one string (`MAX_ARG_STRLEN`) and on all of them (`ARG_MAX`) bite.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use jobico_common::{EventId, EventRecord};
use jobico_dispatcher::backend::Batch;
use jobico_dispatcher::render::Renderer;
use jobico_model::{Job as JobicoJob, Manifest};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job as BatchJob;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde_json::{Value, json};
use wasm_exec::{EXIT_HOST_ERROR, EXIT_OK, RunSummary};

/// The sample resource `samples/ev1.yaml` (event ev1, module echo.wasm: stdin to stdout) and
/// its ConfigMaps.
fn sample() -> (Arc<JobicoJob>, Vec<ConfigMap>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/ev1.yaml");
    let mut manifest = Manifest::default();
    manifest.read_path(&path).expect("sample reads");
    let mut job = manifest.jobs.into_iter().next().expect("a Job resource");
    job.metadata.uid = Some("6f1c9a4e-2b7d-4c1e-9a52-0c8f4a1d2e3b".into());
    (Arc::new(job), manifest.config_maps)
}

fn batch(owner: &Arc<JobicoJob>, events: &[(String, Value)]) -> Batch {
    Batch {
        owner: owner.clone(),
        event: "ev1".into(),
        events: events
            .iter()
            .map(|(id, data)| EventRecord {
                id: EventId::parse(id.as_str()).unwrap(),
                namespace: "default".into(),
                event: "ev1".into(),
                data: data.clone(),
                attributes: BTreeMap::new(),
            })
            .collect(),
    }
}

/// Starts the rendered Job's executor container the way the kubelet would and returns its
/// exit code, stdout and the termination message.
fn start_pod(job: &BatchJob, config_maps: &[ConfigMap]) -> (Option<i32>, String, String) {
    start_pod_with(job, config_maps, &[])
}

/// [`start_pod`] in a namespace that also holds `secrets`, which the container's `envFrom` and
/// `valueFrom` may name (resolved as the kubelet does: `envFrom` in order, then `env`, a later
/// name replacing an earlier one; a missing object or key fails the start unless optional).
fn start_pod_with(
    job: &BatchJob,
    config_maps: &[ConfigMap],
    secrets: &[Secret],
) -> (Option<i32>, String, String) {
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let [container] = pod.containers.as_slice() else {
        panic!("one container expected");
    };
    assert!(container.command.is_none(), "the image's entrypoint runs");
    let root = tempfile::tempdir().unwrap();
    // Mount every ConfigMap volume: each item's key written at <mountPath>/<path>.
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        let source = volume.config_map.as_ref().expect("a ConfigMap volume");
        let map = config_maps
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(source.name.as_str()))
            .expect("the ConfigMap exists");
        let dir = root.path().join(mount.mount_path.trim_start_matches('/'));
        for item in source.items.iter().flatten() {
            let bytes = map.binary_data.as_ref().unwrap()[&item.key].0.clone();
            let file = dir.join(&item.path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, bytes).unwrap();
        }
        mounts.push((mount.mount_path.clone(), dir));
    }
    // Paths inside a mount point at the laid-out copy; nothing else is changed.
    let remap = |value: &str| -> String {
        for (mount_path, dir) in &mounts {
            if let Some(rest) = value.strip_prefix(mount_path.as_str()) {
                return format!("{}{rest}", dir.display());
            }
        }
        value.to_owned()
    };
    let termination_log = root.path().join("termination-log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-exec"));
    command.env_clear();
    // What the runtime and the kubelet add (enableServiceLinks: false leaves only the API
    // server's service), and the termination message file the kubelet mounts.
    command
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOSTNAME", job.metadata.name.as_deref().unwrap())
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("KUBERNETES_SERVICE_PORT_HTTPS", "443")
        .env("KUBERNETES_PORT", "tcp://10.96.0.1:443")
        .env("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443")
        .env("KUBERNETES_PORT_443_TCP_PROTO", "tcp")
        .env("KUBERNETES_PORT_443_TCP_PORT", "443")
        .env("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1")
        .env("JOBICO_TERMINATION_LOG", &termination_log);
    let map_data = |name: &str| -> Option<BTreeMap<String, String>> {
        let map = config_maps
            .iter()
            .find(|m| m.metadata.name.as_deref() == Some(name))?;
        Some(map.data.clone().unwrap_or_default())
    };
    let secret_data = |name: &str| -> Option<BTreeMap<String, String>> {
        let secret = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))?;
        let data = secret.data.iter().flatten();
        Some(
            data.map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
                .collect(),
        )
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        let (data, optional) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), None) => (map_data(&r.name), r.optional),
            (None, Some(r)) => (secret_data(&r.name), r.optional),
            other => panic!("an envFrom names one source: {other:?}"),
        };
        match data {
            Some(data) => {
                for (key, value) in data {
                    command.env(format!("{prefix}{key}"), value);
                }
            }
            None => assert_eq!(optional, Some(true), "CreateContainerConfigError: {from:?}"),
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            command.env(&var.name, remap(var.value.as_deref().unwrap_or_default()));
            continue;
        };
        let (data, key, optional) = match (&from.config_map_key_ref, &from.secret_key_ref) {
            (Some(r), None) => (map_data(&r.name), &r.key, r.optional),
            (None, Some(r)) => (secret_data(&r.name), &r.key, r.optional),
            other => panic!("{} is a ConfigMap or Secret key: {other:?}", var.name),
        };
        match data.and_then(|d| d.get(key).cloned()) {
            Some(value) => {
                command.env(&var.name, value);
            }
            None => assert_eq!(optional, Some(true), "CreateContainerConfigError: {var:?}"),
        }
    }
    command.args(container.args.iter().flatten().map(|a| remap(a)));
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("execve of wasm-exec with the Job's environment: {e}"));
    let message = std::fs::read_to_string(&termination_log).unwrap_or_default();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        message,
    )
}

/// Renders `events` with the default template, starts the pod and checks that every event
/// reached the echo module whole.
fn run_through_a_pod(events: &[(String, Value)]) {
    let (owner, config_maps) = sample();
    let job = Renderer::new("ghcr.io/coeux/wasm-exec:test")
        .render(&batch(&owner, events), None)
        .expect("the batch renders");
    let (code, stdout, message) = start_pod(&job, &config_maps);
    let lines: Vec<&str> = stdout.lines().collect();
    let summary: RunSummary = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(code, Some(EXIT_OK.into()), "{summary:?}");
    assert_eq!(summary.succeeded, events.len());
    for (id, data) in events {
        let expected = format!("{id} stdout {}", serde_json::to_string(data).unwrap());
        assert!(
            lines.iter().any(|line| *line == expected),
            "event {id} did not reach the module whole"
        );
    }
    let written: RunSummary = serde_json::from_str(&message).unwrap();
    assert_eq!(written.succeeded, events.len());
}

#[test]
fn a_wasi_guest_sees_exactly_its_variables_and_the_job_no_secret_value() {
    let (owner, mut config_maps) = sample();
    let modes = wat::parse_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wasi_modes.wat"),
    )
    .unwrap();
    let modules = config_maps
        .iter_mut()
        .find(|m| {
            m.binary_data
                .as_ref()
                .is_some_and(|d| d.contains_key("echo.wasm"))
        })
        .unwrap();
    modules
        .binary_data
        .as_mut()
        .unwrap()
        .insert("echo.wasm".into(), ByteString(modes));
    let mut owner = (*owner).clone();
    owner.spec.events[0].env = serde_json::from_value(json!([
        {"name": "GREETING", "value": "hello"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "NONE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": true}}},
    ]))
    .unwrap();
    owner.spec.events[0].env_from = serde_json::from_value(json!([
        {"prefix": "API_", "secretRef": {"name": "api"}},
    ]))
    .unwrap();
    let owner = Arc::new(owner);
    config_maps.push(ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("settings".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("level".into(), "debug".into())])),
        ..Default::default()
    });
    let secret = |name: &str, data: &[(&str, &str)]| Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).into(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    let secrets = [
        secret(
            "db",
            &[("password", "s3cret-db-9f2"), ("user", "not granted")],
        ),
        secret("api", &[("token", "s3cret-api-41c")]),
    ];
    let job = Renderer::new("ghcr.io/coeux/wasm-exec:test")
        .render(&batch(&owner, &[("e1".into(), json!("vars"))]), None)
        .expect("the batch renders");
    let text = serde_json::to_string(&job).unwrap();
    assert!(
        !text.contains("s3cret"),
        "a Secret's value is in the Job: {text}"
    );
    let (code, stdout, message) = start_pod_with(&job, &config_maps, &secrets);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    let mut seen: Vec<_> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("e1 stdout "))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            "API_token=s3cret-api-41c",
            "DB_PASSWORD=s3cret-db-9f2",
            "GREETING=hello",
            "LEVEL=debug"
        ],
        "the guest sees its variables and nothing of the executor's environment"
    );
    assert!(
        !message.contains("s3cret"),
        "the summary holds no value: {message}"
    );
}

#[test]
fn a_150_kb_event_reaches_the_module() {
    let data = json!({"firstName": "Ada", "lastName": "x".repeat(150_000)});
    run_through_a_pod(&[("big-1".into(), data)]);
}

#[test]
fn a_1_mib_batch_reaches_the_module() {
    // What the consumer batches at maxBytes = 1 MiB: stored messages (EventRecord JSON) of
    // 1 MiB together. Quotes and multi-byte characters make the escaping as costly as it gets.
    let piece = "\"é✓\\ ";
    let mut events = Vec::new();
    let mut stored = 0;
    for i in 0.. {
        let data = json!({"firstName": "Ada", "lastName": piece.repeat(4_000 + 97 * i)});
        let record = batch(&sample().0, &[(format!("b-{i}"), data.clone())]).events[0].clone();
        let bytes = serde_json::to_vec(&record).unwrap().len();
        if stored + bytes > 1 << 20 {
            break;
        }
        stored += bytes;
        events.push((format!("b-{i}"), data));
    }
    assert!(stored > 1_000_000, "{stored}");
    run_through_a_pod(&events);
}

#[test]
fn a_missing_part_is_a_host_error_that_names_it() {
    let (owner, config_maps) = sample();
    let data = json!({"firstName": "Ada", "lastName": "x".repeat(250_000)});
    let mut job = Renderer::new("ghcr.io/coeux/wasm-exec:test")
        .render(&batch(&owner, &[("cut-1".into(), data)]), None)
        .unwrap();
    let pod = job.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    let env = pod.containers[0].env.as_mut().unwrap();
    env.retain(|var| var.name != "JOBICO_EVENTS_1");
    let (code, stdout, message) = start_pod(&job, &config_maps);
    assert_eq!(code, Some(EXIT_HOST_ERROR.into()), "{stdout}");
    let summary: RunSummary = serde_json::from_str(&message).unwrap();
    let error = summary.error.unwrap();
    assert!(
        error.contains("JOBICO_EVENTS_PARTS=3 but JOBICO_EVENTS_1 is not set"),
        "{error}"
    );
}

/// The summary line of a pod's stdout.
fn summary_of(stdout: &str) -> RunSummary {
    serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap()
}

/// The whole cluster path of a compiled module: the dispatcher's module check starts the
/// compilation (into a real JetStream object store), the Jobs it creates through the fake
/// Kubernetes API name the artifact once it exists, and the pod started with such a Job's
/// environment fetches it from the dispatcher's artifact server and runs it without compiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_load_the_module_the_dispatcher_compiled() {
    use jobico_common::summary::ModuleSource;
    use jobico_dispatcher::artifacts::{ArtifactSettings, Artifacts};
    use jobico_dispatcher::backend::Backend;
    use jobico_dispatcher::kubernetes::KubeBackend;
    use jobico_dispatcher::trust::Signer;

    let nats = jobico_testkit::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let api = jobico_testkit::kube_api::KubeApi::start();
    let (owner, config_maps) = sample();
    for map in &config_maps {
        api.apply("configmaps", serde_json::to_value(map).unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = ArtifactSettings {
        base_url: format!("http://{}", listener.local_addr().unwrap()),
        max_bytes: 1 << 30,
        max_age: std::time::Duration::from_secs(3600),
        replicas: 1,
    };
    let signer = Signer::ephemeral();
    let artifacts = Arc::new(
        Artifacts::open(&js, signer.clone(), &settings)
            .await
            .unwrap(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(artifacts.clone().serve(listener, shutdown.clone()));
    let backend = KubeBackend::new(
        api.client().await,
        Renderer::new("ghcr.io/coeux/wasm-exec:test"),
    )
    .with_signer(signer)
    .with_artifacts(artifacts.clone())
    .with_module_check_ttl(std::time::Duration::ZERO);

    let data = json!({"firstName": "Ada", "lastName": "Lovelace"});
    let run = |id: &str| {
        let batch = batch(&owner, &[(id.to_owned(), data.clone())]);
        let backend = &backend;
        async move {
            backend.ready(&batch).await.unwrap();
            backend.dispatch(&batch).await.unwrap();
        }
    };
    // The first batch finds no artifact: its Job has none, and its pod compiles.
    run("first").await;
    let jobs = |api: &jobico_testkit::kube_api::KubeApi| -> Vec<BatchJob> {
        api.created(&jobico_testkit::kube_api::resource("batch/v1", "jobs"))
            .into_iter()
            .map(|job| serde_json::from_value(job).unwrap())
            .collect()
    };
    let first = jobs(&api).pop().unwrap();
    let env_names = |job: &BatchJob| -> Vec<String> {
        job.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect()
    };
    assert!(
        !env_names(&first)
            .iter()
            .any(|n| n.starts_with("JOBICO_ARTIFACT"))
    );
    let (code, stdout, _) = start_pod(&first, &config_maps);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    assert_eq!(
        summary_of(&stdout).module.unwrap().source,
        ModuleSource::Compiled
    );

    // Meanwhile the dispatcher compiles the module: later Jobs name the artifact.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut n = 0;
    let job = loop {
        n += 1;
        run(&format!("later-{n}")).await;
        let job = jobs(&api).pop().unwrap();
        if env_names(&job).iter().any(|n| n == "JOBICO_ARTIFACT_URL") {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no artifact after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let (code, stdout, message) = start_pod(&job, &config_maps);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    let summary = summary_of(&stdout);
    assert_eq!(summary.succeeded, 1);
    let load = summary.module.unwrap();
    assert_eq!(load.source, ModuleSource::Artifact, "{load:?}");
    // The termination message (what the state tracker reads) says so too.
    let written: RunSummary = serde_json::from_str(&message).unwrap();
    assert_eq!(written.module.unwrap().source, ModuleSource::Artifact);

    // The token is per namespace and artifact: the same Job moved to another namespace's
    // URL is refused by the server, and its pod compiles instead.
    let mut moved = job.clone();
    let pod = moved.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    for var in pod.containers[0].env.iter_mut().flatten() {
        if var.name == "JOBICO_ARTIFACT_URL" {
            let url = var.value.take().unwrap();
            var.value = Some(url.replace("/v1/artifacts/default/", "/v1/artifacts/other/"));
        }
    }
    let (code, stdout, _) = start_pod(&moved, &config_maps);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    let load = summary_of(&stdout).module.unwrap();
    assert_eq!(load.source, ModuleSource::Compiled);
    let refused = load.artifact_refused.unwrap_or_else(|| panic!("{stdout}"));
    assert!(refused.contains("401"), "{refused}");

    // Another replica (or the next process) finds the artifact in the store, compiling nothing.
    let again = Arc::new(
        Artifacts::open(&js, Signer::ephemeral(), &settings)
            .await
            .unwrap(),
    );
    let module = config_maps
        .iter()
        .find_map(|m| m.binary_data.as_ref()?.get("echo.wasm"))
        .unwrap()
        .0
        .clone();
    assert_eq!(again.request(&module), None, "looked up in the background");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let found = loop {
        if let Some(found) = again.request(&module) {
            break found;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(again.compilations(), 0, "found, not compiled");
    assert_eq!(
        artifacts.compilations(),
        1,
        "compiled once for all those batches"
    );
    assert_eq!(Some(found), artifacts.request(&module));
    shutdown.cancel();
}

/// A module too large for a ConfigMap: uploaded to the namespace's module store (as the
/// ingress keeps it), named by digest, never mounted. The dispatcher holds its events until it
/// is uploaded; the pod then fetches it from the artifact server by digest (compiling it) and,
/// once the dispatcher has compiled it, loads the artifact without fetching the module. A pod
/// whose Job names other bytes than the server has runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_an_uploaded_module_too_large_for_a_configmap() {
    use jobico_common::executor::{MODULE_DIGEST_VAR, MODULE_URL_VAR, Sha256Digest};
    use jobico_common::summary::ModuleSource;
    use jobico_dispatcher::artifacts::{ArtifactSettings, Artifacts};
    use jobico_dispatcher::backend::{Backend, DispatchError};
    use jobico_dispatcher::kubernetes::KubeBackend;
    use jobico_dispatcher::trust::Signer;

    let nats = jobico_testkit::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let api = jobico_testkit::kube_api::KubeApi::start();
    let (sample_owner, config_maps) = sample();
    // samples/echo.wasm with a 1.5 MiB custom section appended: the same program, past the
    // 1 MiB of a ConfigMap.
    let echo =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/echo.wasm")).unwrap();
    let module = jobico_testkit::with_custom_section(echo, 3 << 19);
    let digest = Sha256Digest::of(&module);
    let mut owner = (*sample_owner).clone();
    owner.spec.events[0].wasm = format!("sha256:{digest}");
    let owner = Arc::new(owner);
    // Only the schema ConfigMap: no module ConfigMap at all.
    for map in config_maps
        .iter()
        .filter(|m| m.metadata.name.as_deref() != Some(owner.modules_config_map().as_str()))
    {
        api.apply("configmaps", serde_json::to_value(map).unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = ArtifactSettings {
        base_url: format!("http://{}", listener.local_addr().unwrap()),
        max_bytes: 1 << 30,
        max_age: std::time::Duration::from_secs(3600),
        replicas: 1,
    };
    let signer = Signer::ephemeral();
    let artifacts = Arc::new(
        Artifacts::open(&js, signer.clone(), &settings)
            .await
            .unwrap(),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(artifacts.clone().serve(listener, shutdown.clone()));
    let backend = KubeBackend::new(
        api.client().await,
        Renderer::new("ghcr.io/coeux/wasm-exec:test"),
    )
    .with_signer(signer)
    .with_artifacts(artifacts.clone())
    .with_module_check_ttl(std::time::Duration::ZERO);
    let data = json!({"firstName": "Ada", "lastName": "Lovelace"});
    let first = batch(&owner, &[("first".to_owned(), data.clone())]);

    // Not uploaded yet: held, saying how to upload it.
    match backend.ready(&first).await {
        Err(DispatchError::Held { reason }) => {
            assert!(reason.contains("was not uploaded"), "{reason}");
            assert!(reason.contains("jobico module upload"), "{reason}");
        }
        other => panic!("expected held, got {other:?}"),
    }
    jobico_store::ModuleStore::open(&js, 1)
        .await
        .unwrap()
        .put("default", &module)
        .await
        .unwrap();
    backend.ready(&first).await.unwrap();
    backend.dispatch(&first).await.unwrap();
    let jobs = |api: &jobico_testkit::kube_api::KubeApi| -> Vec<BatchJob> {
        api.created(&jobico_testkit::kube_api::resource("batch/v1", "jobs"))
            .into_iter()
            .map(|job| serde_json::from_value(job).unwrap())
            .collect()
    };
    let job = jobs(&api).pop().unwrap();
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let env = |job: &BatchJob, name: &str| -> Option<String> {
        job.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.value.clone())
    };
    // No volume, no mount and no path for the module: the Job names it by digest.
    assert!(
        pod.volumes.iter().flatten().all(|v| v.config_map.is_none()),
        "{:?}",
        pod.volumes
    );
    assert!(container.volume_mounts.iter().flatten().next().is_none());
    assert_eq!(env(&job, "JOBICO_MODULE"), None);
    assert_eq!(env(&job, MODULE_DIGEST_VAR), Some(digest.to_string()));
    // Without an artifact (not compiled yet, or gone) the pod fetches the module and compiles.
    let mut uncompiled = job.clone();
    let pod = uncompiled
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap();
    if let Some(env) = pod.containers[0].env.as_mut() {
        env.retain(|v| !v.name.starts_with("JOBICO_ARTIFACT_"));
    }
    let (code, stdout, _) = start_pod(&uncompiled, &config_maps);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    assert!(
        stdout.contains(r#"{"firstName":"Ada","lastName":"Lovelace"}"#),
        "{stdout}"
    );
    let summary = summary_of(&stdout);
    assert_eq!(summary.succeeded, 1);
    assert_eq!(summary.module.unwrap().source, ModuleSource::Compiled);

    // Once compiled, pods load the artifact (and fetch no module).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut n = 0;
    let compiled = loop {
        n += 1;
        let later = batch(&owner, &[(format!("later-{n}"), data.clone())]);
        backend.dispatch(&later).await.unwrap();
        let job = jobs(&api).pop().unwrap();
        if env(&job, "JOBICO_ARTIFACT_URL").is_some() {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no artifact after 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let (code, stdout, _) = start_pod(&compiled, &config_maps);
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");
    assert_eq!(
        summary_of(&stdout).module.unwrap().source,
        ModuleSource::Artifact
    );

    // A Job naming other bytes than the server holds (a digest changed after signing, or a
    // module swapped in the store) runs nothing: the artifact is for another module, and the
    // download does not hash to the name.
    let mut tampered = compiled.clone();
    let pod = tampered
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap();
    for var in pod.containers[0].env.iter_mut().flatten() {
        if var.name == MODULE_DIGEST_VAR {
            var.value = Some(Sha256Digest::of(b"another module").to_string());
        }
    }
    let (code, stdout, _) = start_pod(&tampered, &config_maps);
    assert_eq!(code, Some(EXIT_HOST_ERROR.into()), "{stdout}");
    // And a token for another namespace's module is refused by the server.
    let mut moved = compiled.clone();
    let pod = moved.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    for var in pod.containers[0].env.iter_mut().flatten() {
        if var.name == MODULE_URL_VAR || var.name == "JOBICO_ARTIFACT_URL" {
            let url = var.value.take().unwrap();
            var.value = Some(url.replace("/v1/artifacts/default/", "/v1/artifacts/other/"));
        }
    }
    let (code, stdout, _) = start_pod(&moved, &config_maps);
    assert_eq!(code, Some(EXIT_HOST_ERROR.into()), "{stdout}");
    shutdown.cancel();
}

/// Chaining in a cluster, end to end: the dispatcher renders the Job of an event with routes,
/// the pod runs and posts its outcomes to a real ingress (over HTTP, with the batch's token),
/// which publishes the routed event into a real nats-server and records the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_an_event_with_routes_publishes_its_children_through_the_ingress() {
    use jobico_apiserver::jetstream::{JetStreamPublisher, PublishSettings};
    use jobico_apiserver::{AppState, Catalog, Metrics, catalog, server};
    use jobico_dispatcher::render::ResultsConfig;
    use jobico_store::{BucketSettings, NatsAuth, StateStore, StreamSettings};

    let nats = jobico_testkit::NatsServer::start();
    let publisher = JetStreamPublisher::connect(
        &nats.url(),
        &NatsAuth::default(),
        PublishSettings::default(),
        Metrics::new(),
    )
    .await
    .unwrap();
    let context = publisher.context().clone();
    jobico_store::streams::ensure(&context, "default", &StreamSettings::default())
        .await
        .unwrap();
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "JOBICO_DLQ".into(),
            subjects: vec!["jobico-dlq.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/chain.yaml");
    let mut manifest = Manifest::default();
    manifest.read_path(&path).unwrap();
    let catalog_map = Arc::new(Catalog::new());
    catalog_map.replace(catalog::from_manifest(&manifest).0);
    let key = b"the cluster's results key, 32+ bytes".to_vec();
    let mut state = AppState::new(catalog_map, Arc::new(publisher), 1 << 18);
    state.results_key = Some(Arc::new(key.clone()));
    let bound = server::bind(
        "127.0.0.1:0".parse().unwrap(),
        1,
        actix_web::web::Data::new(state),
    )
    .unwrap();
    let ingress = format!("http://{}", bound.local_addr);
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(bound.run(stop.clone()));

    let mut owner = manifest.jobs.into_iter().next().unwrap();
    owner.metadata.uid = Some("0d6c2f3e-5a4b-4c1d-8e9f-112233445566".into());
    let owner = Arc::new(owner);
    let orders = [
        ("o1", json!({"item": "book", "qty": 2})),
        ("o2", json!({"item": "book", "qty": 500})),
    ];
    let batch = Batch {
        owner: owner.clone(),
        event: "order".into(),
        events: orders
            .iter()
            .map(|(id, data)| EventRecord {
                id: EventId::parse(*id).unwrap(),
                namespace: "default".into(),
                event: "order".into(),
                data: data.clone(),
                attributes: BTreeMap::new(),
            })
            .collect(),
    };
    let job = Renderer::new("ghcr.io/coeux/wasm-exec:test")
        .with_results(ResultsConfig {
            base_url: ingress,
            key,
        })
        .render(&batch, None)
        .unwrap();
    let config_maps = manifest.config_maps.clone();
    let (code, stdout, _) = tokio::task::spawn_blocking(move || start_pod(&job, &config_maps))
        .await
        .unwrap();
    assert_eq!(code, Some(EXIT_OK.into()), "{stdout}");

    // o1's invoice is in the stream under its derived id; o2's was refused and dead-lettered.
    let states = StateStore::open(&context, &BucketSettings::default())
        .await
        .unwrap();
    let invoice = EventId::routed("default", "order", "o1", 0).to_string();
    let child = states
        .get("default", "invoice", &invoice)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(child.parent.as_ref().map(|p| p.id.as_str()), Some("o1"));
    let message = context
        .get_stream("JOBICO-default")
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("jobico.default.invoice.{invoice}"))
        .await
        .unwrap();
    let record: EventRecord = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(record.data, json!({"order": {"item": "book", "qty": 2}}));
    let parent = states.get("default", "order", "o1").await.unwrap().unwrap();
    assert_eq!(parent.children.len(), 1, "{parent:?}");
    let refused = states.get("default", "order", "o2").await.unwrap().unwrap();
    assert_eq!(refused.route_failures.len(), 1, "{refused:?}");
    assert!(
        refused.route_failures[0].reason.contains("maximum of 100"),
        "{refused:?}"
    );
    stop.cancel();
    served.await.unwrap().unwrap();
}
