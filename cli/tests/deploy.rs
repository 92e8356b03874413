//! The manifests under deploy/, as Kubernetes would read them (each object parsed into its
//! k8s-openapi type), and the invariants of Jobico's NATS security: NATS requires credentials
//! from Secrets, each component mounts its own and is started with flags its binary has, and
//! the NetworkPolicies select the pods they are meant for.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use common::repo;
use jobico_common::EventId;
use jobico_dispatcher::backend::keys;
use jobico_dispatcher::render::Renderer;
use jobico_model::Manifest;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, PodTemplateSpec};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Every object of every YAML file below deploy/ (kustomization.yaml aside), with its file;
/// the production overlay's patches are checked by tests/production.rs.
fn objects() -> Vec<(PathBuf, serde_yaml::Value)> {
    common::yaml_objects(&repo().join("deploy"), &["production"])
}

/// Parses `value` as `T`, failing on any field `T` does not have or reads otherwise (a
/// misspelt or misplaced field would otherwise be dropped without a word).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    file: &Path,
    value: &serde_yaml::Value,
) -> T {
    let typed: T =
        serde_yaml::from_value(value.clone()).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let back = serde_json::to_value(&typed).unwrap();
    let original = serde_json::to_value(value).unwrap();
    if let Some(path) = lost(&original, &back, String::new()) {
        panic!(
            "{}: {} {}: {path} is not a field of its type",
            file.display(),
            value["kind"].as_str().unwrap(),
            value["metadata"]["name"].as_str().unwrap()
        );
    }
    typed
}

/// The first path of `original` that `back` (the typed round trip) lost or changed; `back`
/// may add fields (`apiVersion` and `kind` of embedded objects).
fn lost(original: &serde_json::Value, back: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            a.iter().find_map(|(key, value)| match b.get(key) {
                Some(other) => lost(value, other, format!("{path}.{key}")),
                None => Some(format!("{path}.{key}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| lost(x, y, format!("{path}[{i}]"))),
        (a, b) => (a != b).then_some(path),
    }
}

fn of_kind<T: serde::de::DeserializeOwned + serde::Serialize>(kind: &str) -> Vec<T> {
    objects()
        .iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(file, v)| typed(file, v))
        .collect()
}

fn named<
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    items: Vec<T>,
    name: &str,
) -> T {
    items
        .into_iter()
        .find(|o| o.metadata().name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no object {name}"))
}

/// Whether `selector` (matchLabels only: the manifests use nothing else) selects `labels`.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(selector.match_expressions.is_none(), "{selector:?}");
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(template: &PodTemplateSpec) -> BTreeMap<String, String> {
    template.metadata.as_ref().unwrap().labels.clone().unwrap()
}

fn pod_spec(template: &PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().unwrap()
}

/// The value a container is given for a flag: `--flag=value` in its args, else its env var.
fn setting(container: &Container, flag: &str, env: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    container
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
        .or_else(|| {
            container
                .env
                .iter()
                .flatten()
                .find(|e| e.name == env)
                .and_then(|e| e.value.clone())
        })
}

/// The Secret mounted at the directory holding `path`, if any.
fn secret_holding(spec: &PodSpec, container: &Container, path: &str) -> Option<String> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(path).parent() == Some(Path::new(&m.mount_path)))?;
    assert_eq!(mount.read_only, Some(true), "{path} is mounted writable");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    volume.secret.as_ref()?.secret_name.clone()
}

/// The NATS server's users: name → the environment variable holding the password.
fn nats_users() -> BTreeMap<String, String> {
    let config = named(of_kind::<ConfigMap>("ConfigMap"), "nats")
        .data
        .unwrap();
    assert!(
        config["nats.conf"].contains("include auth.conf"),
        "nats.conf does not read auth.conf"
    );
    let auth = &config["auth.conf"];
    assert!(auth.contains("authorization {"), "{auth}");
    for loophole in ["no_auth_user", "token:", "allow_responses"] {
        assert!(!auth.contains(loophole), "auth.conf has {loophole}");
    }
    let mut users = BTreeMap::new();
    let mut user = None;
    for line in auth.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("user: ") {
            user = Some(name.to_owned());
        } else if let Some(password) = line.strip_prefix("password: ") {
            let variable = password
                .strip_prefix('$')
                .unwrap_or_else(|| panic!("a literal password in auth.conf: {line}"));
            users.insert(user.take().unwrap(), variable.to_owned());
        }
    }
    users
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    for (file, value) in objects() {
        match value["kind"].as_str().unwrap() {
            "Namespace" => drop(typed::<Namespace>(&file, &value)),
            "ConfigMap" => drop(typed::<ConfigMap>(&file, &value)),
            "Service" => drop(typed::<Service>(&file, &value)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&file, &value)),
            "StatefulSet" => drop(typed::<StatefulSet>(&file, &value)),
            "Deployment" => drop(typed::<Deployment>(&file, &value)),
            "ClusterRole" => drop(typed::<ClusterRole>(&file, &value)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&file, &value)),
            "Role" => drop(typed::<Role>(&file, &value)),
            "RoleBinding" => drop(typed::<RoleBinding>(&file, &value)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(&file, &value)),
            kind => panic!("{}: no check for kind {kind}", file.display()),
        }
    }
    // kustomization.yaml lists every file of deploy/ itself (tenant/ is applied per namespace).
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = objects()
        .iter()
        .filter(|(f, _)| f.parent() == Some(&repo().join("deploy")))
        .map(|(f, _)| f.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn nats_requires_a_password_from_a_secret_for_each_component() {
    let users = nats_users();
    assert_eq!(
        users.keys().collect::<Vec<_>>(),
        ["jobico-apiserver", "jobico-dispatcher"]
    );
    let nats = named(of_kind::<StatefulSet>("StatefulSet"), "nats");
    let template = nats.spec.unwrap().template;
    let container = &pod_spec(&template).containers[0];
    // Every password variable comes from a Secret, never a literal value.
    for (user, variable) in &users {
        let env = container
            .env
            .iter()
            .flatten()
            .find(|e| &e.name == variable)
            .unwrap_or_else(|| panic!("NATS lacks {variable}, the password of {user}"));
        assert!(env.value.is_none(), "{variable} is a literal");
        let secret = env
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{variable} is not from a Secret"));
        assert_eq!(
            secret.name,
            format!("jobico-nats-{}", &user["jobico-".len()..])
        );
        assert_eq!(secret.key, "password");
    }
}

#[test]
fn every_component_connects_with_its_own_mounted_credentials_and_flags_its_binary_has() {
    let users = nats_users();
    let nats = named(of_kind::<StatefulSet>("StatefulSet"), "nats");
    let nats_env = pod_spec(&nats.spec.unwrap().template).containers[0]
        .env
        .clone()
        .unwrap();
    let secret_of = |user: &str| {
        let variable = &users[user];
        let env = nats_env.iter().find(|e| &e.name == variable).unwrap();
        let secret = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        secret.name.clone()
    };
    let deployments = of_kind::<Deployment>("Deployment");
    assert_eq!(deployments.len(), 2, "a Deployment this test does not know");
    for deployment in deployments {
        let name = deployment.metadata.name.clone().unwrap();
        let template = deployment.spec.unwrap().template;
        let spec = pod_spec(&template);
        let container = &spec.containers[0];
        // The binary accepts the container's arguments and environment.
        let mut argv = vec![name.clone()];
        argv.extend(container.args.clone().unwrap_or_default());
        let command = match name.as_str() {
            "jobico-apiserver" => jobico_apiserver::args::Args::command(),
            "jobico-dispatcher" => jobico_dispatcher::app::Args::command(),
            other => panic!("unknown Deployment {other}"),
        };
        // Required flags given by the environment (the dispatcher's) count as given.
        let parsed = command
            .clone()
            .mut_args(|a| a.required(false))
            .try_get_matches_from(&argv);
        if let Err(error) = parsed {
            panic!("{name}: {argv:?}: {error}");
        }
        let known: BTreeSet<String> = command
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        for env in container.env.iter().flatten() {
            assert!(
                known.contains(&env.name),
                "{name}: {} is not a variable of its binary",
                env.name
            );
        }
        // Its own NATS user, its password from a file in its own Secret, the one NATS has.
        let user = setting(container, "--nats-user", "JOBICO_NATS_USER")
            .unwrap_or_else(|| panic!("{name} connects to NATS without a user"));
        assert_eq!(user, name, "{name} connects as {user}");
        let file = setting(
            container,
            "--nats-password-file",
            "JOBICO_NATS_PASSWORD_FILE",
        )
        .unwrap_or_else(|| panic!("{name} has no NATS password file"));
        let secret = secret_holding(spec, container, &file)
            .unwrap_or_else(|| panic!("{name}: {file} is not in a mounted Secret"));
        assert_eq!(secret, secret_of(&user), "{name} mounts another's password");
        for arg in container.args.iter().flatten() {
            assert!(
                !arg.starts_with("--nats-password="),
                "{name}: password in argv"
            );
        }
    }
}

/// The port numbers a policy rule opens (TCP).
fn ports(
    rule_ports: Option<&Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>>,
) -> Vec<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    rule_ports
        .into_iter()
        .flatten()
        .map(|p| match &p.port {
            Some(IntOrString::Int(port)) => *port,
            other => panic!("port {other:?} is not a number"),
        })
        .collect()
}

#[test]
fn only_the_ingress_and_the_dispatcher_reach_nats_and_executors_reach_only_the_artifact_server() {
    let policies = of_kind::<NetworkPolicy>("NetworkPolicy");
    let system: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some("jobico-system"))
        .collect();
    // Default deny: every pod of jobico-system, both directions.
    let deny = system
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("default-deny"))
        .unwrap();
    let spec = deny.spec.as_ref().unwrap();
    assert_eq!(spec.pod_selector, Some(LabelSelector::default()));
    assert_eq!(
        spec.policy_types.clone().unwrap(),
        ["Ingress", "Egress"],
        "default-deny"
    );
    assert!(spec.ingress.is_none() && spec.egress.is_none());

    let deployments = of_kind::<Deployment>("Deployment");
    let labels_of =
        |name: &str| pod_labels(&named(deployments.clone(), name).spec.unwrap().template);
    let apiserver = labels_of("jobico-apiserver");
    let dispatcher = labels_of("jobico-dispatcher");
    let nats = pod_labels(
        &named(of_kind::<StatefulSet>("StatefulSet"), "nats")
            .spec
            .unwrap()
            .template,
    );

    // Whoever any jobico-system policy lets in on NATS's client port: the two components only.
    let mut admitted = Vec::new();
    for policy in &system {
        let spec = policy.spec.as_ref().unwrap();
        if !selects(spec.pod_selector.as_ref().unwrap(), &nats) {
            continue;
        }
        for rule in spec.ingress.iter().flatten() {
            if !ports(rule.ports.as_ref()).contains(&4222) {
                continue;
            }
            let peers: &[NetworkPolicyPeer] = rule
                .from
                .as_deref()
                .unwrap_or_else(|| panic!("{:?} opens 4222 to everyone", policy.metadata.name));
            for peer in peers {
                assert!(
                    peer.namespace_selector.is_none() && peer.ip_block.is_none(),
                    "4222 open beyond jobico-system: {peer:?}"
                );
                admitted.push(peer.pod_selector.clone().unwrap());
            }
        }
    }
    let (executor_labels, other) = (
        rendered_executor_pod_labels(),
        BTreeMap::from([("app".to_owned(), "anything".to_owned())]),
    );
    let reach = |labels: &BTreeMap<String, String>| admitted.iter().any(|s| selects(s, labels));
    assert!(reach(&apiserver) && reach(&dispatcher), "{admitted:?}");
    assert!(
        !reach(&nats) && !reach(&executor_labels) && !reach(&other),
        "{admitted:?}"
    );

    // The ingress takes traffic on its HTTP port.
    let http = named(deployments.clone(), "jobico-apiserver")
        .spec
        .unwrap()
        .template;
    let http_port = pod_spec(&http).containers[0]
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .unwrap()
        .container_port;
    assert!(system.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        selects(spec.pod_selector.as_ref().unwrap(), &apiserver)
            && spec
                .ingress
                .iter()
                .flatten()
                .any(|r| r.from.is_none() && ports(r.ports.as_ref()) == [http_port])
    }));

    // The dispatcher reaches the ingress's HTTP port (the outcomes of failed Jobs of events
    // with routes or a sink go to its results endpoint).
    assert!(
        system.iter().any(|p| {
            let spec = p.spec.as_ref().unwrap();
            selects(spec.pod_selector.as_ref().unwrap(), &dispatcher)
                && spec.egress.iter().flatten().any(|r| {
                    ports(r.ports.as_ref()) == [http_port]
                        && r.to.iter().flatten().any(|peer| {
                            peer.pod_selector
                                .as_ref()
                                .is_some_and(|s| selects(s, &apiserver))
                        })
                })
        }),
        "the dispatcher cannot reach the ingress's results endpoint"
    );

    // Executor pods: the tenant policy (no namespace: applied in each tenant namespace)
    // selects the pods the dispatcher's Jobs make and allows them no egress.
    let tenant: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.is_none())
        .collect();
    assert_eq!(tenant.len(), 1);
    let spec = tenant[0].spec.as_ref().unwrap();
    assert!(selects(
        spec.pod_selector.as_ref().unwrap(),
        &executor_labels
    ));
    assert!(
        spec.policy_types
            .as_ref()
            .unwrap()
            .contains(&"Egress".to_owned())
    );
    // Egress: the dispatcher pods on their artifact port, the ingress on its HTTP port, and
    // DNS; nothing else.
    let artifact_port = pod_spec(
        &named(deployments.clone(), "jobico-dispatcher")
            .spec
            .unwrap()
            .template,
    )
    .containers[0]
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("artifacts"))
        .unwrap()
        .container_port;
    let system_namespace = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_owned(),
        "jobico-system".to_owned(),
    )]);
    let dns = BTreeMap::from([("k8s-app".to_owned(), "kube-dns".to_owned())]);
    let rules = spec.egress.as_deref().expect("egress rules");
    // The ingress's port, where the executor of an event with routes posts its outcomes.
    let http_port = pod_spec(
        &named(deployments.clone(), "jobico-apiserver")
            .spec
            .unwrap()
            .template,
    )
    .containers[0]
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .unwrap()
        .container_port;
    assert_eq!(rules.len(), 3, "{rules:?}");
    for rule in rules {
        let peers = rule.to.as_deref().expect("every rule names its peers");
        assert!(!peers.is_empty());
        for peer in peers {
            assert!(peer.ip_block.is_none(), "{peer:?}");
            let pods = peer.pod_selector.as_ref().expect("a pod selector");
            let namespaces = peer
                .namespace_selector
                .as_ref()
                .expect("a namespace selector");
            let ports = ports(rule.ports.as_ref());
            if selects(pods, &dispatcher) {
                assert!(selects(namespaces, &system_namespace) && !selects(pods, &apiserver));
                assert_eq!(ports, [artifact_port], "only the artifact port");
            } else if selects(pods, &apiserver) {
                assert!(selects(namespaces, &system_namespace));
                assert_eq!(ports, [http_port], "only the HTTP port (results)");
            } else {
                assert!(selects(pods, &dns) && !selects(pods, &nats), "{peer:?}");
                assert_eq!(ports, [53, 53], "only DNS");
            }
        }
    }
    // And the dispatcher admits executor pods of any namespace on that port only.
    let any_namespace = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_owned(),
        "team-a".to_owned(),
    )]);
    assert!(system.iter().any(|p| {
        let spec = p.spec.as_ref().unwrap();
        selects(spec.pod_selector.as_ref().unwrap(), &dispatcher)
            && spec.ingress.iter().flatten().any(|r| {
                ports(r.ports.as_ref()) == [artifact_port]
                    && r.from.iter().flatten().any(|peer| {
                        peer.namespace_selector
                            .as_ref()
                            .is_some_and(|n| selects(n, &any_namespace))
                            && peer
                                .pod_selector
                                .as_ref()
                                .is_some_and(|s| selects(s, &executor_labels))
                    })
            })
    }));
}

/// The labels of the pods of a Job the dispatcher renders for the samples' ev1.
fn rendered_executor_pod_labels() -> BTreeMap<String, String> {
    let mut manifest = Manifest::default();
    manifest
        .read_path(&repo().join("samples/ev1.yaml"))
        .unwrap();
    let mut owner = manifest.jobs.remove(0);
    owner.metadata.uid = Some("uid-1".into());
    let batch = jobico_dispatcher::Batch {
        owner: std::sync::Arc::new(owner),
        event: "ev1".into(),
        events: vec![jobico_common::EventRecord {
            id: EventId::parse("e1").unwrap(),
            namespace: "default".into(),
            event: "ev1".into(),
            data: serde_json::json!({}),
            attributes: Default::default(),
        }],
    };
    let job = Renderer::new("jobico/wasm-exec:dev")
        .render(&batch, None)
        .unwrap();
    let labels = pod_labels(&job.spec.unwrap().template);
    assert_eq!(labels[keys::MANAGED_BY], keys::MANAGER);
    labels
}
