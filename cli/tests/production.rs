//! The production overlay (deploy/production/) rendered over the base as kustomize does with
//! strategic-merge patches (maps merged, lists of named items merged by name, other lists
//! replaced), checked for what it promises — three NATS servers forming an authenticated
//! JetStream cluster (tried with real nats-servers from the rendered configuration and pod
//! environment), R3 components, disruption budgets, spread, resources — and that every patch
//! lands on an object of the base.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::repo;
use jobico_testkit::NatsServer;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::Value;

/// Strategic merge of `patch` into `base`, as far as the overlay uses it.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(base), Value::Array(patch))
            if patch.iter().all(|item| item.get("name").is_some()) =>
        {
            for item in patch {
                match base.iter_mut().find(|b| b.get("name") == item.get("name")) {
                    Some(existing) => merge(existing, item),
                    None => base.push(item.clone()),
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

fn identity(object: &Value) -> (String, String, String) {
    let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        field(&object["kind"]),
        field(&object["metadata"]["namespace"]),
        field(&object["metadata"]["name"]),
    )
}

fn yaml_file(path: &std::path::Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects `kubectl apply -k deploy/production/` applies.
fn rendered() -> Vec<Value> {
    let dir = repo().join("deploy/production");
    let kustomization = &yaml_file(&dir.join("kustomization.yaml"))[0];
    let mut objects: Vec<Value> = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        let resource = resource.as_str().unwrap();
        if resource == "../" {
            let base = &yaml_file(&repo().join("deploy/kustomization.yaml"))[0];
            for file in base["resources"].as_array().unwrap() {
                objects.extend(yaml_file(
                    &repo().join("deploy").join(file.as_str().unwrap()),
                ));
            }
        } else {
            objects.extend(yaml_file(&dir.join(resource)));
        }
    }
    for patch in kustomization["patches"].as_array().unwrap() {
        for patch in yaml_file(&dir.join(patch["path"].as_str().unwrap())) {
            let target = objects
                .iter_mut()
                .find(|o| identity(o) == identity(&patch))
                .unwrap_or_else(|| panic!("a patch for {:?} matches nothing", identity(&patch)));
            merge(target, &patch);
        }
    }
    objects
}

fn one<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str, name: &str) -> T {
    let object = objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
}

fn env(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn the_kustomization_names_every_file_of_the_overlay() {
    let dir = repo().join("deploy/production");
    let kustomization = &yaml_file(&dir.join("kustomization.yaml"))[0];
    let mut named: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            kustomization["patches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| &p["path"]),
        )
        .filter_map(|r| r.as_str())
        .filter(|r| *r != "../")
        .map(str::to_owned)
        .collect();
    named.sort();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(named, files);
}

#[test]
fn production_is_highly_available_with_r3_state_and_bounded_resources() {
    let objects = rendered();
    let nats: StatefulSet = one(&objects, "StatefulSet", "nats");
    let spec = nats.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let governing: Service = one(&objects, "Service", spec.service_name.as_deref().unwrap());
    assert_eq!(
        governing.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );

    let ingress: Deployment = one(&objects, "Deployment", "jobico-apiserver");
    let dispatcher: Deployment = one(&objects, "Deployment", "jobico-dispatcher");
    assert_eq!(ingress.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(dispatcher.spec.as_ref().unwrap().replicas, Some(2));
    let container = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .clone()
    };
    assert_eq!(
        env(&container(&ingress), "JOBICO_STATE_REPLICAS").as_deref(),
        Some("3")
    );
    assert_eq!(
        env(&container(&dispatcher), "JOBICO_STREAM_REPLICAS").as_deref(),
        Some("3")
    );

    // Every pod template: spread over nodes, every container with requests and a memory
    // limit, and a disruption budget selecting it.
    let templates = [
        ("nats", nats.spec.unwrap().template),
        ("jobico-apiserver", ingress.spec.unwrap().template),
        ("jobico-dispatcher", dispatcher.spec.unwrap().template),
    ];
    for (name, template) in templates {
        let pod = template.spec.as_ref().unwrap();
        assert!(
            pod.topology_spread_constraints
                .as_ref()
                .is_some_and(|t| !t.is_empty()),
            "{name} is not spread"
        );
        for container in &pod.containers {
            let resources = container
                .resources
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no resources"));
            assert!(
                resources
                    .requests
                    .as_ref()
                    .is_some_and(|r| r.contains_key("memory")),
                "{name}"
            );
            assert!(
                resources
                    .limits
                    .as_ref()
                    .is_some_and(|l| l.contains_key("memory")),
                "{name}"
            );
        }
        let budget: PodDisruptionBudget = one(&objects, "PodDisruptionBudget", name);
        let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
        let selector = budget.spec.unwrap().selector.unwrap().match_labels.unwrap();
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{name}"
        );
    }
}

/// A 40-character password of letters and digits, like scripts/nats-credentials.sh makes.
fn password(seed: u64) -> String {
    let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..40)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pool = if i == 0 { 52 } else { alphabet.len() as u64 };
            alphabet[(x % pool) as usize] as char
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_production_nats_configuration_forms_an_authenticated_r3_cluster() {
    let objects = rendered();
    let config: ConfigMap = one(&objects, "ConfigMap", "nats");
    let data = config.data.unwrap();
    let nats: StatefulSet = one(&objects, "StatefulSet", "nats");
    let container = nats.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let route_ports: Vec<u16> = (0..3).map(|_| jobico_testkit::free_port()).collect();
    let secrets: BTreeMap<&str, String> = [
        ("jobico-nats-apiserver", password(1)),
        ("jobico-nats-dispatcher", password(2)),
        ("jobico-nats-routes", password(3)),
    ]
    .into();
    let mut servers = Vec::new();
    for (i, route_port) in route_ports.iter().enumerate() {
        // The pod's environment as the kubelet builds it: Secrets, the pod name, `$(VAR)`;
        // the servers' DNS names are this machine's route ports.
        let mut environment: Vec<(String, String)> = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), _) => {
                    let mut value = value.clone();
                    for (name, earlier) in &environment {
                        value = value.replace(&format!("$({name})"), earlier);
                    }
                    for (j, port) in route_ports.iter().enumerate() {
                        value = value.replace(
                            &format!("nats-{j}.nats-cluster.jobico-system.svc:6222"),
                            &format!("127.0.0.1:{port}"),
                        );
                    }
                    value
                }
                (None, Some(from)) => match (&from.secret_key_ref, &from.field_ref) {
                    (Some(secret), _) => secrets[secret.name.as_str()].clone(),
                    (_, Some(field)) if field.field_path == "metadata.name" => format!("nats-{i}"),
                    other => panic!("unexpected env source {other:?}"),
                },
                _ => panic!("env {} without a value", var.name),
            };
            environment.push((var.name.clone(), value));
        }
        // The test's own ports and store (the harness sets client port and store by flag).
        let text = data["nats.conf"]
            .replace("port: 6222", &format!("port: {route_port}"))
            .replace("http_port: 8222\n", "")
            .replace("store_dir: /data\n", "")
            .replace("include auth.conf", &data["auth.conf"]);
        let environment: Vec<(&str, &str)> = environment
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        servers.push(NatsServer::start_with_config(&text, &environment));
    }
    // The dispatcher creates an R3 stream: only a formed cluster of three can.
    let urls = servers
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let client = async_nats::ConnectOptions::new()
        .user_and_password(
            "jobico-dispatcher".into(),
            secrets["jobico-nats-dispatcher"].clone(),
        )
        .custom_inbox_prefix(jobico_common::subject::DISPATCHER_INBOX)
        .connect(jobico_store::Servers(&urls))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let settings = jobico_store::StreamSettings {
        replicas: 3,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match jobico_store::streams::ensure(&js, "default", &settings).await {
            Ok(mut stream) => {
                let info = stream.info().await.unwrap();
                let cluster = info.cluster.clone().unwrap();
                assert_eq!(
                    cluster.replicas.len(),
                    2,
                    "a leader and two replicas: {cluster:?}"
                );
                break;
            }
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "no R3 stream: {error}\n{}",
                    servers
                        .iter()
                        .map(NatsServer::log)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
