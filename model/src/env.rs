//! The guest's environment: `events[].env` and `events[].envFrom`, in the shapes of Kubernetes'
//! `EnvVar` and `EnvFromSource`, restricted to written-out values, ConfigMaps and Secrets.
//!
//! The variables are resolved as the kubelet resolves a container's: the `envFrom` sources in
//! order, then the `env` entries in order, a later name replacing an earlier one; a missing
//! source or key is an error unless its reference is `optional`, in which case it adds nothing.
//! In a cluster the kubelet resolves them (the Job carries references, never a Secret's value);
//! local mode resolves them from the manifests' ConfigMaps and Secrets with [`resolve`], which
//! the dispatcher also runs to tell what keeps a resource from being ready.
//!
//! A Secret reaches modules only when it carries the label [`SECRET_GRANT_LABEL`]`=true`.
//! Whoever may create a Jobico resource in a namespace need not be allowed to read its
//! Secrets, yet a module can print whatever it is given: the label is the consent of someone
//! who may write the Secret. ConfigMaps need no label (the dispatcher already reads them for
//! schemas, modules and templates, and a template may mount them).

use std::collections::BTreeMap;
use std::fmt;

use jobico_common::envelope::MAX_ARG_STRLEN;
use jobico_common::executor::{GUEST_ENV_PREFIX, MAX_GUEST_ENV_BYTES, set_var};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::EventSpec;

/// The label (value `true`) that lets modules read a Secret: see the module docs.
pub const SECRET_GRANT_LABEL: &str = "jobico.coeux.dev/modules-may-read";

/// An environment variable granted to the module: a value, or one key of a ConfigMap or
/// Secret of the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// The value (default empty); not with `valueFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Where the value comes from instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

impl EnvVar {
    /// A variable with a written-out value.
    pub fn value(name: &str, value: &str) -> Self {
        Self {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            value_from: None,
        }
    }
}

/// The source of one variable's value: exactly one of its fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeySelector>,
    /// A key of a Secret (labelled `jobico.coeux.dev/modules-may-read: "true"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeySelector>,
}

/// One key of a ConfigMap or Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct KeySelector {
    /// The ConfigMap or Secret.
    pub name: String,
    /// The key.
    pub key: String,
    /// When true, a missing object or key leaves the variable unset instead of holding the
    /// events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Every key of a ConfigMap or Secret as variables: exactly one of `configMapRef` and
/// `secretRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromSource {
    /// Put before every key to make the variable's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub prefix: Option<String>,
    /// A ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<SourceSelector>,
    /// A Secret (labelled `jobico.coeux.dev/modules-may-read: "true"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SourceSelector>,
}

/// A whole ConfigMap or Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SourceSelector {
    /// The ConfigMap or Secret.
    pub name: String,
    /// When true, a missing object adds nothing instead of holding the events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// What kind of object a reference names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ConfigMap => "ConfigMap",
            Self::Secret => "Secret",
        })
    }
}

impl EnvVarSource {
    /// The object and key it names: `None` unless exactly one of its fields is set.
    pub fn selected(&self) -> Option<(SourceKind, &KeySelector)> {
        match (&self.config_map_key_ref, &self.secret_key_ref) {
            (Some(map), None) => Some((SourceKind::ConfigMap, map)),
            (None, Some(secret)) => Some((SourceKind::Secret, secret)),
            _ => None,
        }
    }
}

impl EnvFromSource {
    /// The object it names: `None` unless exactly one of its fields is set.
    pub fn selected(&self) -> Option<(SourceKind, &SourceSelector)> {
        match (&self.config_map_ref, &self.secret_ref) {
            (Some(map), None) => Some((SourceKind::ConfigMap, map)),
            (None, Some(secret)) => Some((SourceKind::Secret, secret)),
            _ => None,
        }
    }
}

/// One object an event's environment reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference<'a> {
    /// The field that names it, under the event: `env[1]`, `envFrom[0]`.
    pub field: String,
    /// ConfigMap or Secret.
    pub kind: SourceKind,
    /// Its name.
    pub name: &'a str,
    /// The key, for one variable; `None` for a whole `envFrom` source.
    pub key: Option<&'a str>,
    /// Whether a missing object (or key) is allowed.
    pub optional: bool,
}

/// The contents of a ConfigMap or Secret that the environment can use.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Source {
    /// Whether modules may read it: always for a ConfigMap, by [`SECRET_GRANT_LABEL`] for a
    /// Secret.
    pub granted: bool,
    /// Its keys and values: a ConfigMap's `data` (as the kubelet, never `binaryData`), a
    /// Secret's `data` with `stringData` over it (as the API server writes it).
    pub data: BTreeMap<String, Vec<u8>>,
}

impl Source {
    /// What a ConfigMap offers.
    pub fn from_config_map(map: &ConfigMap) -> Self {
        let data = map.data.iter().flatten();
        Self {
            granted: true,
            data: data
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect(),
        }
    }

    /// What a Secret offers.
    pub fn from_secret(secret: &Secret) -> Self {
        let granted = secret
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SECRET_GRANT_LABEL))
            .is_some_and(|value| value == "true");
        let mut data: BTreeMap<_, _> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        for (k, v) in secret.string_data.iter().flatten() {
            data.insert(k.clone(), v.clone().into_bytes());
        }
        Self { granted, data }
    }
}

/// The objects a resolution reads, by kind and name; `None` for one that does not exist.
pub type Sources = BTreeMap<(SourceKind, String), Option<Source>>;

impl EventSpec {
    /// Whether the event reads any ConfigMap or Secret for its environment.
    pub fn env_has_references(&self) -> bool {
        !self.env_from.is_empty() || self.env.iter().any(|v| v.value_from.is_some())
    }

    /// Every ConfigMap and Secret the event's environment reads, in resolution order.
    pub fn env_references(&self) -> Vec<Reference<'_>> {
        let whole = self.env_from.iter().enumerate().filter_map(|(i, from)| {
            let (kind, selector) = from.selected()?;
            Some(Reference {
                field: format!("envFrom[{i}]"),
                kind,
                name: &selector.name,
                key: None,
                optional: selector.optional.unwrap_or(false),
            })
        });
        let keys = self.env.iter().enumerate().filter_map(|(i, var)| {
            let (kind, selector) = var.value_from.as_ref()?.selected()?;
            Some(Reference {
                field: format!("env[{i}]"),
                kind,
                name: &selector.name,
                key: Some(&selector.key),
                optional: selector.optional.unwrap_or(false),
            })
        });
        whole.chain(keys).collect()
    }
}

/// How to create or grant a missing source, for the messages.
fn how_to_provide(kind: SourceKind, namespace: &str, name: &str, key: Option<&str>) -> String {
    let key = key.unwrap_or("KEY");
    match kind {
        SourceKind::ConfigMap => format!(
            "create it with `kubectl create configmap {name} -n {namespace} --from-literal={key}=...`"
        ),
        SourceKind::Secret => format!(
            "create it with `kubectl create secret generic {name} -n {namespace} --from-literal={key}=...` and `kubectl label secret {name} -n {namespace} {SECRET_GRANT_LABEL}=true`"
        ),
    }
}

/// Bytes one guest variable takes in the executor's `execve`: `JOBICO_GUEST_NAME=value`, its
/// NUL and its pointer.
pub(crate) fn exec_bytes(name: &str, value: &str) -> usize {
    GUEST_ENV_PREFIX.len() + name.len() + 1 + value.len() + 1 + 8
}

/// The guest's variables of `spec` (an event of `namespace`) given the objects it reads, in
/// the kubelet's order and with its precedence; or every problem, each a sentence naming the
/// event, the field, the object and how to fix it.
pub fn resolve(
    namespace: &str,
    spec: &EventSpec,
    sources: &Sources,
) -> Result<Vec<(String, String)>, Vec<String>> {
    let mut resolution = Resolution {
        namespace,
        event: &spec.name,
        sources,
        granted: Vec::new(),
        problems: Vec::new(),
    };
    let references = spec.env_references();
    let reference = |field: String| references.iter().find(|r| r.field == field);
    for (i, from) in spec.env_from.iter().enumerate() {
        let Some(reference) = reference(format!("envFrom[{i}]")) else {
            continue;
        };
        let Some(source) = resolution.source(reference) else {
            continue;
        };
        let prefix = from.prefix.as_deref().unwrap_or_default();
        for (key, bytes) in &source.data {
            resolution.set(reference, format!("{prefix}{key}"), key, bytes);
        }
    }
    for (i, var) in spec.env.iter().enumerate() {
        let Some(reference) = reference(format!("env[{i}]")) else {
            let value = var.value.clone().unwrap_or_default();
            set_var(&mut resolution.granted, var.name.clone(), value);
            continue;
        };
        let Some(source) = resolution.source(reference) else {
            continue;
        };
        let key = reference.key.expect("a key reference has a key");
        match source.data.get(key) {
            Some(bytes) => resolution.set(reference, var.name.clone(), key, bytes),
            None if reference.optional => {}
            None => resolution.problem(
                reference,
                format!(
                    "{} {namespace}/{} has no key {key:?}",
                    reference.kind, reference.name
                ),
            ),
        }
    }
    resolution.finish()
}

/// A resolution under way: what is granted so far and what is wrong.
struct Resolution<'a> {
    namespace: &'a str,
    event: &'a str,
    sources: &'a Sources,
    granted: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Resolution<'_> {
    fn problem(&mut self, reference: &Reference, what: String) {
        self.problems.push(format!(
            "event {:?}: {}: {what}",
            self.event, reference.field
        ));
    }

    /// The object `reference` reads; `None` when it adds nothing (missing and optional, or a
    /// problem, recorded).
    fn source(&mut self, reference: &Reference) -> Option<Source> {
        let key = (reference.kind, reference.name.to_owned());
        let (namespace, name) = (self.namespace, reference.name);
        match self.sources.get(&key).cloned().flatten() {
            None if reference.optional => None,
            None => {
                let provide = how_to_provide(reference.kind, namespace, name, reference.key);
                let what = format!(
                    "{} {namespace}/{name} does not exist; {provide}",
                    reference.kind
                );
                self.problem(reference, what);
                None
            }
            Some(source) if !source.granted => {
                let what = format!(
                    "Secret {namespace}/{name} is not granted to modules; grant it with `kubectl label secret {name} -n {namespace} {SECRET_GRANT_LABEL}=true`"
                );
                self.problem(reference, what);
                None
            }
            Some(source) => Some(source),
        }
    }

    /// Grants `name` the value of `key`, which must be text (WASI passes strings).
    fn set(&mut self, reference: &Reference, name: String, key: &str, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(text) => set_var(&mut self.granted, name, text.to_owned()),
            Err(_) => {
                let what = format!(
                    "key {key:?} of {} {}/{} is not UTF-8 text",
                    reference.kind, self.namespace, reference.name
                );
                self.problem(reference, what);
            }
        }
    }

    /// The variables, if they are usable and fit the executor's `execve`.
    fn finish(mut self) -> Result<Vec<(String, String)>, Vec<String>> {
        for (name, value) in &self.granted {
            let bytes = exec_bytes(name, value) - 8;
            if bytes > MAX_ARG_STRLEN {
                self.problems.push(format!(
                    "event {:?}: variable {name} takes {bytes} bytes, more than the {MAX_ARG_STRLEN} Linux takes in one variable",
                    self.event
                ));
            }
        }
        let total: usize = self.granted.iter().map(|(n, v)| exec_bytes(n, v)).sum();
        if total > MAX_GUEST_ENV_BYTES {
            self.problems.push(format!(
                "event {:?}: the module's variables take {total} bytes, more than the {MAX_GUEST_ENV_BYTES} a Job leaves them",
                self.event
            ));
        }
        if self.problems.is_empty() {
            Ok(self.granted)
        } else {
            Err(self.problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;

    fn event(env: serde_json::Value, env_from: serde_json::Value) -> EventSpec {
        serde_json::from_value(serde_json::json!({
            "name": "ev1", "wasm": "echo.wasm", "schema": {"key": "s"},
            "env": env, "envFrom": env_from,
        }))
        .unwrap()
    }

    fn secret(granted: bool, data: &[(&str, &[u8])]) -> Source {
        let mut secret = Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        if granted {
            secret.metadata.labels = Some([(SECRET_GRANT_LABEL.into(), "true".into())].into());
        }
        Source::from_secret(&secret)
    }

    fn config_map(data: &[(&str, &str)]) -> Source {
        Source::from_config_map(&ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..ConfigMap::default()
        })
    }

    #[test]
    fn variables_resolve_in_the_kubelets_order_and_precedence() {
        let spec = event(
            serde_json::json!([
                {"name": "MODE", "value": "env wins"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
                {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "nope", "optional": true}}},
                {"name": "EMPTY"},
            ]),
            serde_json::json!([
                {"configMapRef": {"name": "settings"}},
                {"prefix": "DB_", "secretRef": {"name": "db"}},
                {"configMapRef": {"name": "absent", "optional": true}},
            ]),
        );
        let sources = Sources::from([
            (
                (SourceKind::ConfigMap, "settings".into()),
                Some(config_map(&[("MODE", "from map"), ("level", "debug")])),
            ),
            (
                (SourceKind::Secret, "db".into()),
                Some(secret(true, &[("password", b"s3cret"), ("user", b"app")])),
            ),
            ((SourceKind::ConfigMap, "absent".into()), None),
        ]);
        let granted = resolve("team", &spec, &sources).unwrap();
        let text: Vec<_> = granted.iter().map(|(n, v)| format!("{n}={v}")).collect();
        assert_eq!(
            text,
            [
                "level=debug",
                "DB_password=s3cret",
                "DB_user=app",
                "MODE=env wins",
                "PASSWORD=s3cret",
                "LEVEL=debug",
                "EMPTY="
            ]
        );
    }

    #[test]
    fn every_unusable_reference_is_named_with_how_to_fix_it() {
        let spec = event(
            serde_json::json!([
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "hidden", "key": "k"}}},
                {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing"}}},
                {"name": "D", "valueFrom": {"secretKeyRef": {"name": "binary", "key": "raw"}}},
                {"name": "E", "valueFrom": {"secretKeyRef": {"name": "hidden", "key": "k", "optional": true}}},
            ]),
            serde_json::json!([]),
        );
        let sources = Sources::from([
            ((SourceKind::Secret, "db".into()), None),
            (
                (SourceKind::Secret, "hidden".into()),
                Some(secret(false, &[("k", b"v")])),
            ),
            (
                (SourceKind::ConfigMap, "settings".into()),
                Some(config_map(&[])),
            ),
            (
                (SourceKind::Secret, "binary".into()),
                Some(secret(true, &[("raw", b"\xff\xfe")])),
            ),
        ]);
        let problems = resolve("team", &spec, &sources).unwrap_err();
        let expected = [
            "event \"ev1\": env[0]: Secret team/db does not exist; create it with `kubectl create secret generic db -n team --from-literal=password=...` and `kubectl label secret db -n team jobico.coeux.dev/modules-may-read=true`",
            "event \"ev1\": env[1]: Secret team/hidden is not granted to modules; grant it with `kubectl label secret hidden -n team jobico.coeux.dev/modules-may-read=true`",
            "event \"ev1\": env[2]: ConfigMap team/settings has no key \"missing\"",
            "event \"ev1\": env[3]: key \"raw\" of Secret team/binary is not UTF-8 text",
            // Optional covers a missing object or key, not one that is there but not granted.
            "event \"ev1\": env[4]: Secret team/hidden is not granted to modules; grant it with `kubectl label secret hidden -n team jobico.coeux.dev/modules-may-read=true`",
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn variables_must_fit_the_executors_exec() {
        let big = "x".repeat(MAX_ARG_STRLEN);
        let spec = event(
            serde_json::json!([{"name": "BIG", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "big"}}}]),
            serde_json::json!([]),
        );
        let sources = Sources::from([(
            (SourceKind::ConfigMap, "m".into()),
            Some(config_map(&[("big", &big)])),
        )]);
        let problems = resolve("team", &spec, &sources).unwrap_err();
        assert!(
            problems[0].contains("variable BIG takes 131090 bytes, more than the 131072"),
            "{problems:?}"
        );
        let many: Vec<_> = (0..3)
            .map(|i| (format!("k{i}"), "y".repeat(100_000)))
            .collect();
        let data: Vec<_> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let spec = event(
            serde_json::json!([]),
            serde_json::json!([{"configMapRef": {"name": "m"}}]),
        );
        let sources =
            Sources::from([((SourceKind::ConfigMap, "m".into()), Some(config_map(&data)))]);
        let problems = resolve("team", &spec, &sources).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("the module's variables take 300075 bytes, more than the 262144"),
            "{problems:?}"
        );
    }

    #[test]
    fn string_data_is_written_over_data_as_the_api_server_does() {
        let secret = Secret {
            data: Some([("k".into(), ByteString(b"old".to_vec()))].into()),
            string_data: Some([("k".into(), "new".into())].into()),
            ..Secret::default()
        };
        assert_eq!(Source::from_secret(&secret).data["k"], b"new");
        assert!(!Source::from_secret(&secret).granted);
    }
}
