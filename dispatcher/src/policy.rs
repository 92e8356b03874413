//! What a rendered Kubernetes Job may be, whatever template produced it.
//!
//! A resource's template is written by whoever may create ConfigMaps in its namespace, and the
//! dispatcher creates the Job with its own, cluster-wide, permission. So the safety of the pod
//! must not depend on the template: [`check`] runs on the typed Job that is about to be
//! created (the default template's included) and refuses anything outside the Kubernetes
//! *restricted* Pod Security Standard plus Jobico's own rules:
//!
//! - no service-account token: `automountServiceAccountToken: false`, the `default` account,
//!   no projected `serviceAccountToken` volume;
//! - one container, `wasm-exec`, running `--exec-image` with the image's entrypoint: no other
//!   containers, init or ephemeral containers (they would run whatever the template names,
//!   and the summary and failure policy are read from `wasm-exec` alone), no lifecycle hooks
//!   or probes (the kubelet runs their HTTP and TCP handlers from the node's network);
//! - `runAsNonRoot`, not user 0, `allowPrivilegeEscalation: false`, not privileged,
//!   capabilities `drop: [ALL]` and no `add`, `readOnlyRootFilesystem`, seccomp
//!   `RuntimeDefault` or `Localhost`, no unconfined AppArmor, no custom SELinux type, default
//!   `procMount`, no Windows host process, no sysctls;
//! - no host namespaces, host ports, node name (it skips the scheduler and its taints),
//!   device claims or `hostPath`: volumes are `configMap`, `emptyDir`, `downwardAPI` or
//!   `projected` of `configMap` and `downwardAPI`. Not `secret`: a template would let the
//!   tenant's module read, and print, Secrets of the namespace that the tenant itself may not
//!   read (the module gets granted directories through the arguments the template writes);
//! - no legacy AppArmor annotation asking for `unconfined`;
//! - no operator-only `wasm-exec` flag in the arguments (`--trust-precompiled` would load a
//!   `.cwasm` from a ConfigMap as native code: see [`jobico_common::executor`]);
//! - environment values written out (no `valueFrom`, `envFrom`), so the size of the process's
//!   environment is known here: every string within `MAX_ARG_STRLEN` and all together within
//!   [`MAX_EXEC_ENV_BYTES`]. The one exception is the module's own variables
//!   (`JOBICO_GUEST_*`), which the dispatcher writes after the template has rendered, removing
//!   whatever the template wrote under that prefix: keys of ConfigMaps and of Secrets granted
//!   to modules, whose values it has checked fit [`MAX_GUEST_ENV_BYTES`], reserved here;
//! - the Job runs its pod once (`restartPolicy: Never`, no parallelism, completions or
//!   manual selector, not managed by another controller), keeps the dispatcher's
//!   `podFailurePolicy` and its one owner reference, writes its termination message where the
//!   state tracker reads it, and fits in the API server and etcd.

use std::fmt;

use jobico_common::envelope::{MAX_ARG_STRLEN, MAX_EXEC_ENV_BYTES};
use jobico_common::executor::{GUEST_ENV_PREFIX, MAX_GUEST_ENV_BYTES, operator_only_flag};
use jobico_common::state::exit;
use k8s_openapi::api::batch::v1::{
    Job as BatchJob, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{Container, PodSecurityContext, PodSpec, SecurityContext};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::Value;

/// The executor container's name (the `podFailurePolicy` and the state tracker refer to it).
pub const EXEC_CONTAINER: &str = "wasm-exec";
/// Where the kubelet reads the termination message by default, and where wasm-exec writes it.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The only service account a Job may name: every namespace has it, and its token is never
/// mounted (`automountServiceAccountToken: false` is required too).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// SELinux types the *baseline* Pod Security Standard allows.
const SELINUX_TYPES: [&str; 4] = [
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];
/// Volume sources a Job may use: none reaches the node's files, another namespace or a Secret.
const VOLUME_TYPES: [&str; 4] = ["configMap", "emptyDir", "downwardAPI", "projected"];
/// The pod annotation prefix of the AppArmor profile before the `appArmorProfile` field
/// (still honoured by the kubelet).
const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";
/// Most bytes of a Job as etcd stores it (protobuf, strings unescaped), estimated by
/// [`stored_size`]: etcd's default request limit of 1.5 MiB, less 128 KiB for what the API
/// server adds (managed fields, status) and the Pod made from the Job carries besides.
pub const MAX_STORED_JOB_BYTES: usize = (3 << 19) - (128 << 10);
/// Most bytes of the create request (JSON, where escaping can double the events): the API
/// server's default body limit of 3 MiB, less 64 KiB.
pub const MAX_REQUEST_JOB_BYTES: usize = (3 << 20) - (64 << 10);
/// Bytes `execve` counts for each string besides its characters: the NUL and the pointer.
const EXEC_STRING_OVERHEAD: usize = 1 + 8;

/// One way a rendered Job breaks the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, as a path in the Job (`spec.template.spec.hostNetwork`).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The violations, joined for a status message or a log line.
pub fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(Violation::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `podFailurePolicy` every Job must carry: fail the Job at once when a guest failed
/// (running the pod again would fail the same way), ignore evictions and preemptions.
pub fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(EXEC_CONTAINER.into()),
                    operator: "In".into(),
                    values: vec![exit::GUEST_FAILED],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

#[derive(Default)]
struct Violations(Vec<Violation>);

impl Violations {
    fn push(&mut self, path: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(Violation {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// Records a violation unless `ok`. Path and message are formatted only then: a Job that
    /// passes (every Job of a correct template) allocates nothing here.
    fn require(&mut self, ok: bool, path: impl fmt::Display, message: impl fmt::Display) {
        if !ok {
            self.push(path, message);
        }
    }
}

/// Checks a rendered Job against the policy (module docs): `image` is the dispatcher's
/// `--exec-image`, `owner` the reference to the Jobico resource. Every violation is listed.
pub fn check(job: &BatchJob, image: &str, owner: &OwnerReference) -> Result<(), Vec<Violation>> {
    let mut v = Violations::default();
    let owners = job.metadata.owner_references.as_deref().unwrap_or_default();
    v.require(
        owners == std::slice::from_ref(owner),
        "metadata.ownerReferences",
        "must be the one reference to the Jobico resource, as rendered",
    );
    match &job.spec {
        None => v.push("spec", "is missing"),
        Some(spec) => {
            v.require(
                spec.pod_failure_policy.as_ref() == Some(&pod_failure_policy()),
                "spec.podFailurePolicy",
                "must be the dispatcher's (FailJob on a guest failure, Ignore DisruptionTarget)",
            );
            for (field, value) in [
                ("spec.completions", spec.completions),
                ("spec.parallelism", spec.parallelism),
            ] {
                v.require(
                    value.is_none_or(|n| n == 1),
                    field,
                    "must be unset or 1: a batch runs in one pod",
                );
            }
            v.require(
                spec.completion_mode
                    .as_deref()
                    .is_none_or(|m| m == "NonIndexed"),
                "spec.completionMode",
                "must be unset or NonIndexed",
            );
            v.require(
                spec.manual_selector != Some(true),
                "spec.manualSelector",
                "must not be true: the Job's selector is the API server's",
            );
            v.require(
                spec.managed_by.is_none(),
                "spec.managedBy",
                "must be unset: the Job controller runs the Job",
            );
            let annotations = spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref());
            for (key, value) in annotations.into_iter().flatten() {
                v.require(
                    !(key.starts_with(APPARMOR_ANNOTATION) && value == "unconfined"),
                    format_args!("spec.template.metadata.annotations[{key:?}]"),
                    "must not be unconfined",
                );
            }
            match &spec.template.spec {
                None => v.push("spec.template.spec", "is missing"),
                Some(pod) => check_pod(&mut v, pod, image),
            }
        }
    }
    check_size(&mut v, job);
    if v.0.is_empty() { Ok(()) } else { Err(v.0) }
}

fn check_pod(v: &mut Violations, pod: &PodSpec, image: &str) {
    const POD: &str = "spec.template.spec";
    v.require(
        pod.automount_service_account_token == Some(false),
        format_args!("{POD}.automountServiceAccountToken"),
        "must be false: the pod gets no service-account token",
    );
    for (field, value) in [
        ("serviceAccountName", &pod.service_account_name),
        ("serviceAccount", &pod.service_account),
    ] {
        v.require(
            value
                .as_deref()
                .is_none_or(|n| n == DEFAULT_SERVICE_ACCOUNT),
            format_args!("{POD}.{field}"),
            "must be unset or \"default\"",
        );
    }
    for (field, value) in [
        ("hostNetwork", pod.host_network),
        ("hostPID", pod.host_pid),
        ("hostIPC", pod.host_ipc),
    ] {
        v.require(
            value != Some(true),
            format_args!("{POD}.{field}"),
            "must not be true",
        );
    }
    v.require(
        pod.node_name.is_none(),
        format_args!("{POD}.nodeName"),
        "must be unset: the scheduler places the pod",
    );
    v.require(
        pod.resource_claims.as_ref().is_none_or(Vec::is_empty),
        format_args!("{POD}.resourceClaims"),
        "must be empty: no devices",
    );
    v.require(
        pod.restart_policy.as_deref() == Some("Never"),
        format_args!("{POD}.restartPolicy"),
        "must be Never",
    );
    v.require(
        pod.init_containers.as_ref().is_none_or(Vec::is_empty),
        format_args!("{POD}.initContainers"),
        "must be empty",
    );
    v.require(
        pod.ephemeral_containers.as_ref().is_none_or(Vec::is_empty),
        format_args!("{POD}.ephemeralContainers"),
        "must be empty",
    );
    if let Some(context) = &pod.security_context {
        check_pod_security(v, context);
    }
    match pod.containers.as_slice() {
        [container] => check_container(v, container, pod.security_context.as_ref(), image),
        _ => v.push(
            format_args!("{POD}.containers"),
            format_args!(
                "must be the one container {EXEC_CONTAINER:?}, found {}",
                pod.containers.len()
            ),
        ),
    }
    for (i, volume) in pod.volumes.iter().flatten().enumerate() {
        let path = format!("{POD}.volumes[{i}]");
        let value = serde_json::to_value(volume).expect("volumes serialise");
        let kinds: Vec<&str> = value
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .map(String::as_str)
            .filter(|k| *k != "name")
            .collect();
        match kinds.as_slice() {
            [kind] if VOLUME_TYPES.contains(kind) => {}
            _ => v.push(
                &path,
                format_args!(
                    "must be one of {} (found {})",
                    VOLUME_TYPES.join(", "),
                    kinds.join(", ")
                ),
            ),
        }
        let sources = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten());
        for (j, source) in sources.enumerate() {
            let projected_path = format!("{path}.projected.sources[{j}]");
            v.require(
                source.service_account_token.is_none(),
                format_args!("{projected_path}.serviceAccountToken"),
                "must be unset: the pod gets no service-account token",
            );
            v.require(
                source.cluster_trust_bundle.is_none() && source.secret.is_none(),
                projected_path,
                "must project a configMap or the downwardAPI",
            );
        }
    }
}

fn check_pod_security(v: &mut Violations, context: &PodSecurityContext) {
    const PATH: &str = "spec.template.spec.securityContext";
    v.require(
        context.sysctls.as_ref().is_none_or(Vec::is_empty),
        format_args!("{PATH}.sysctls"),
        "must be empty",
    );
    v.require(
        context.run_as_user != Some(0),
        format_args!("{PATH}.runAsUser"),
        "must not be 0 (root)",
    );
    if let Some(selinux) = &context.se_linux_options {
        check_selinux_type(v, PATH, selinux.type_.as_deref());
    }
    if let Some(profile) = &context.seccomp_profile {
        check_seccomp(v, PATH, &profile.type_);
    }
    if let Some(profile) = &context.app_armor_profile {
        v.require(
            profile.type_ != "Unconfined",
            format_args!("{PATH}.appArmorProfile.type"),
            "must not be Unconfined",
        );
    }
    if let Some(windows) = &context.windows_options {
        v.require(
            windows.host_process != Some(true),
            format_args!("{PATH}.windowsOptions.hostProcess"),
            "must not be true",
        );
    }
}

fn check_selinux_type(v: &mut Violations, path: &str, type_: Option<&str>) {
    v.require(
        type_.is_none_or(|t| t.is_empty() || SELINUX_TYPES.contains(&t)),
        format_args!("{path}.seLinuxOptions.type"),
        "must be unset or one of container_t, container_init_t, container_kvm_t, container_engine_t",
    );
}

fn check_seccomp(v: &mut Violations, path: &str, type_: &str) {
    v.require(
        matches!(type_, "RuntimeDefault" | "Localhost"),
        format_args!("{path}.seccompProfile.type"),
        "must be RuntimeDefault or Localhost",
    );
}

fn check_container(
    v: &mut Violations,
    container: &Container,
    pod: Option<&PodSecurityContext>,
    image: &str,
) {
    let path = "spec.template.spec.containers[0]";
    v.require(
        container.name == EXEC_CONTAINER,
        format_args!("{path}.name"),
        "must be wasm-exec",
    );
    v.require(
        container.image.as_deref() == Some(image),
        format_args!("{path}.image"),
        format_args!("must be the executor image {image:?}"),
    );
    v.require(
        container.command.is_none(),
        format_args!("{path}.command"),
        "must be unset: the image's entrypoint (wasm-exec) runs",
    );
    for (field, set) in [
        ("lifecycle", container.lifecycle.is_some()),
        ("livenessProbe", container.liveness_probe.is_some()),
        ("readinessProbe", container.readiness_probe.is_some()),
        ("startupProbe", container.startup_probe.is_some()),
        ("restartPolicy", container.restart_policy.is_some()),
        (
            "volumeDevices",
            !container.volume_devices.as_ref().is_none_or(Vec::is_empty),
        ),
    ] {
        v.require(!set, format_args!("{path}.{field}"), "must be unset");
    }
    v.require(
        container
            .termination_message_path
            .as_deref()
            .is_none_or(|p| p == TERMINATION_MESSAGE_PATH),
        format_args!("{path}.terminationMessagePath"),
        "must be unset or /dev/termination-log (where wasm-exec writes the summary)",
    );
    v.require(
        container
            .termination_message_policy
            .as_deref()
            .is_none_or(|p| p == "File"),
        format_args!("{path}.terminationMessagePolicy"),
        "must be unset or File: the summary comes from wasm-exec, not from the guest's output",
    );
    for (i, port) in container.ports.iter().flatten().enumerate() {
        v.require(
            port.host_port.is_none_or(|p| p == 0),
            format_args!("{path}.ports[{i}].hostPort"),
            "must be unset",
        );
    }
    for (i, mount) in container.volume_mounts.iter().flatten().enumerate() {
        v.require(
            mount
                .mount_propagation
                .as_deref()
                .is_none_or(|p| p == "None"),
            format_args!("{path}.volumeMounts[{i}].mountPropagation"),
            "must be unset or None",
        );
    }
    check_container_security(v, path, container.security_context.as_ref(), pod);
    check_exec_strings(v, path, container);
}

fn check_container_security(
    v: &mut Violations,
    path: &str,
    context: Option<&SecurityContext>,
    pod: Option<&PodSecurityContext>,
) {
    let path = format!("{path}.securityContext");
    let default = SecurityContext::default();
    let c = context.unwrap_or(&default);
    v.require(
        c.allow_privilege_escalation == Some(false),
        format_args!("{path}.allowPrivilegeEscalation"),
        "must be false",
    );
    v.require(
        c.privileged != Some(true),
        format_args!("{path}.privileged"),
        "must not be true",
    );
    let caps = c.capabilities.as_ref();
    v.require(
        caps.and_then(|c| c.drop.as_ref())
            .is_some_and(|d| d.iter().any(|cap| cap == "ALL")),
        format_args!("{path}.capabilities.drop"),
        "must contain ALL",
    );
    v.require(
        caps.and_then(|c| c.add.as_ref()).is_none_or(Vec::is_empty),
        format_args!("{path}.capabilities.add"),
        "must be empty",
    );
    v.require(
        c.read_only_root_filesystem == Some(true),
        format_args!("{path}.readOnlyRootFilesystem"),
        "must be true",
    );
    // The container's settings win over the pod's; either may provide them.
    let non_root = c
        .run_as_non_root
        .or_else(|| pod.and_then(|p| p.run_as_non_root));
    v.require(
        non_root == Some(true),
        format_args!("{path}.runAsNonRoot"),
        "must be true (here or in the pod's securityContext)",
    );
    v.require(
        c.run_as_user != Some(0),
        format_args!("{path}.runAsUser"),
        "must not be 0 (root)",
    );
    match c
        .seccomp_profile
        .as_ref()
        .or_else(|| pod.and_then(|p| p.seccomp_profile.as_ref()))
    {
        Some(profile) => check_seccomp(v, &path, &profile.type_),
        None => v.push(
            format_args!("{path}.seccompProfile"),
            "must be set (here or in the pod's securityContext)",
        ),
    }
    v.require(
        c.proc_mount.as_deref().is_none_or(|m| m == "Default"),
        format_args!("{path}.procMount"),
        "must be unset or Default",
    );
    if let Some(selinux) = &c.se_linux_options {
        check_selinux_type(v, &path, selinux.type_.as_deref());
    }
    if let Some(profile) = &c.app_armor_profile {
        v.require(
            profile.type_ != "Unconfined",
            format_args!("{path}.appArmorProfile.type"),
            "must not be Unconfined",
        );
    }
    if let Some(windows) = &c.windows_options {
        v.require(
            windows.host_process != Some(true),
            format_args!("{path}.windowsOptions.hostProcess"),
            "must not be true",
        );
    }
}

/// The container's arguments must not pass an operator-only flag, and with its environment
/// must fit one `execve`.
fn check_exec_strings(v: &mut Violations, path: &str, container: &Container) {
    let args = container.args.as_deref().unwrap_or_default();
    let flags = args.iter().take_while(|arg| *arg != "--");
    for (i, arg) in flags.enumerate() {
        if let Some(flag) = operator_only_flag(arg) {
            v.push(
                format_args!("{path}.args[{i}]"),
                format_args!("must not pass {flag}: the operator's alone (it loads native code)"),
            );
        }
    }
    let mut total = 0;
    for (i, arg) in args.iter().enumerate() {
        let bytes = arg.len() + 1;
        total += bytes + EXEC_STRING_OVERHEAD - 1;
        v.require(
            bytes <= MAX_ARG_STRLEN,
            format_args!("{path}.args[{i}]"),
            format_args!(
                "is {bytes} bytes, more than the {MAX_ARG_STRLEN} Linux takes in one argument"
            ),
        );
    }
    // The module's variables from ConfigMaps and Secrets (which the dispatcher writes, after
    // checking that each Secret is granted and that all fit in MAX_GUEST_ENV_BYTES) are the
    // only references: everything else is written out, so its size is known here.
    let mut referenced = false;
    for (i, from) in container.env_from.iter().flatten().enumerate() {
        referenced = true;
        v.require(
            from.prefix
                .as_deref()
                .is_some_and(|p| p.starts_with(GUEST_ENV_PREFIX)),
            format_args!("{path}.envFrom[{i}]"),
            format_args!("must be unset: only the module's variables ({GUEST_ENV_PREFIX}*, written by the dispatcher) come from references"),
        );
    }
    for (i, var) in container.env.iter().flatten().enumerate() {
        if let Some(from) = &var.value_from {
            referenced = true;
            let guest = var.name.starts_with(GUEST_ENV_PREFIX)
                && from.field_ref.is_none()
                && from.resource_field_ref.is_none();
            v.require(
                guest,
                format_args!("{path}.env[{i}].valueFrom"),
                format_args!("must be unset: values are written out, so their size is known (only the module's variables, {GUEST_ENV_PREFIX}*, written by the dispatcher, come from ConfigMaps and Secrets)"),
            );
        }
        let bytes = var.name.len() + 1 + var.value.as_deref().map_or(0, str::len) + 1;
        total += bytes + EXEC_STRING_OVERHEAD - 1;
        v.require(
            bytes <= MAX_ARG_STRLEN,
            format_args!("{path}.env[{i}]"),
            format_args!(
                "{} is {bytes} bytes, more than the {MAX_ARG_STRLEN} Linux takes in one variable",
                var.name
            ),
        );
    }
    if referenced {
        total += MAX_GUEST_ENV_BYTES;
    }
    v.require(
        total <= MAX_EXEC_ENV_BYTES,
        format_args!("{path}.env"),
        format_args!("arguments and environment take {total} bytes, more than the {MAX_EXEC_ENV_BYTES} one execve leaves them"),
    );
}

fn check_size(v: &mut Violations, job: &BatchJob) {
    let request = json_len(job);
    // `stored_size` is at most STORED_PER_JSON_BYTE times the JSON's length (see there): a Job
    // whose JSON is that much below the limit is within it, and is not walked again.
    if request.saturating_mul(STORED_PER_JSON_BYTE) > MAX_STORED_JOB_BYTES {
        let stored = stored_size(&serde_json::to_value(job).expect("Jobs serialise"));
        v.require(
            stored <= MAX_STORED_JOB_BYTES,
            "metadata",
            format_args!("the Job takes about {stored} bytes, more than the {MAX_STORED_JOB_BYTES} etcd leaves it"),
        );
    }
    v.require(
        request <= MAX_REQUEST_JOB_BYTES,
        "metadata",
        format_args!("the Job's JSON takes {request} bytes, more than the {MAX_REQUEST_JOB_BYTES} the API server accepts"),
    );
}

/// The length of `value`'s JSON, counted as it is written, without keeping it.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("JSON values always serialise");
    count.0
}

/// Most [`stored_size`] bytes per byte of a value's JSON. Every value costs at most 9 times its
/// JSON: a number of d digits is 8 + d stored against d; null, booleans and strings are 8 + their
/// length against at least 4, or that length + 2; an array or object adds 8 to its members
/// against its brackets (2), and a key's length to each member against its quotes and colon.
pub const STORED_PER_JSON_BYTE: usize = 9;

/// An upper estimate of a value's protobuf size, as etcd stores it: every string and key with
/// its bytes unescaped, and a few bytes of framing for each.
pub fn stored_size(value: &Value) -> usize {
    // Protobuf frames a field with a tag and a length: at most 1 + 5 bytes for our sizes,
    // counted as 8 to stay above it.
    const FRAMING: usize = 8;
    match value {
        Value::Null | Value::Bool(_) => FRAMING,
        Value::Number(n) => FRAMING + n.to_string().len(),
        Value::String(s) => FRAMING + s.len(),
        Value::Array(items) => FRAMING + items.iter().map(stored_size).sum::<usize>(),
        Value::Object(fields) => {
            FRAMING
                + fields
                    .iter()
                    .map(|(k, v)| k.len() + stored_size(v))
                    .sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_len_counts_what_serde_json_writes() {
        for value in [
            json!(null),
            json!({"a": [1, -2.5, "x\u{7}\"\\é\u{2028}", true, null, {}], "": []}),
            json!("x".repeat(100_000)),
        ] {
            assert_eq!(json_len(&value), value.to_string().len(), "{value}");
        }
    }

    #[test]
    fn the_stored_size_is_never_more_than_its_bound_per_json_byte() {
        // The shapes that come closest: lone short numbers (exactly the bound), arrays of
        // digits, empty containers and strings, nested empties, keys with tiny values.
        let digits: Vec<u8> = vec![0; 1000];
        let deep = (0..100).fold(json!([]), |inner, _| json!([inner, []]));
        let mut wide = serde_json::Map::new();
        for i in 0..1000 {
            wide.insert(i.to_string(), json!(0));
        }
        let cases = [
            json!(0),
            json!(7),
            json!(1.5e300),
            json!(null),
            json!(false),
            json!(""),
            json!([]),
            json!({}),
            json!(digits),
            json!(["", "", ""]),
            json!([[], [[]], {}]),
            deep,
            Value::Object(wide),
            json!({"": null, "k": [0, 0], "s": "é"}),
        ];
        for value in cases {
            let (stored, json) = (stored_size(&value), json_len(&value));
            assert!(
                stored <= STORED_PER_JSON_BYTE * json,
                "{value}: {stored} stored > {STORED_PER_JSON_BYTE} x {json}"
            );
        }
        // The bound is tight: a lone digit reaches it.
        assert_eq!(
            stored_size(&json!(0)),
            STORED_PER_JSON_BYTE * json_len(&json!(0))
        );
    }
}
