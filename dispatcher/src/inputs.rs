//! What a resource's events need in the cluster besides the resource itself: the module
//! ConfigMap holding each event's `.wasm` (or, for `wasm: sha256:<digest>`, the module uploaded
//! to the namespace's module store), the schema ConfigMap of each event, and the ConfigMaps
//! and granted Secrets its `env`/`envFrom` read. They are
//! checked when the resource is reconciled (a missing one makes it `Ready=False`, naming it
//! and saying how to provide it) and before each batch is claimed (its events are then held in
//! the stream instead of becoming Jobs whose pods wait forever for a volume).

use std::sync::Arc;

use jobico_common::executor::Sha256Digest;
use jobico_model::env::{self, Source, SourceKind, Sources};
use jobico_model::{EventSpec, Job as JobicoJob, ModuleRef};
use jobico_store::ModuleStoreError;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;

use crate::artifacts::Artifacts;

/// The first bytes of every binary WebAssembly module.
const WASM_MAGIC: &[u8] = b"\0asm";
/// The first bytes of an ELF file, which is what a wasmtime `.cwasm` is: native code, never
/// accepted from a tenant.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What is wrong with the module of `spec` given its resource's module ConfigMap (`None` when
/// it does not exist), as a sentence saying how to fix it; `None` when the module is usable.
pub fn module_problem(
    owner: &JobicoJob,
    spec: &EventSpec,
    map: Option<&ConfigMap>,
) -> Option<String> {
    let namespace = owner.metadata.namespace.as_deref().unwrap_or_default();
    let name = owner.modules_config_map();
    let resource = owner.metadata.name.as_deref().unwrap_or_default();
    let provide = format!(
        "create it with `jobico module configmap {name} {wasm} -n {namespace} | kubectl apply -f -` (or `kubectl create configmap {name} -n {namespace} --from-file={wasm}`)",
        wasm = spec.wasm
    );
    let Some(map) = map else {
        return Some(format!(
            "event {:?}: module ConfigMap {namespace}/{name} does not exist; {provide}",
            spec.name
        ));
    };
    let binary = map
        .binary_data
        .as_ref()
        .is_some_and(|d| d.contains_key(&spec.wasm));
    match module_bytes(spec, map) {
        None => Some(format!(
            "event {:?}: module ConfigMap {namespace}/{name} has no key {:?} (resource {resource} names it in spec.events[].wasm); {provide}",
            spec.name, spec.wasm
        )),
        Some(bytes) if bytes.starts_with(ELF_MAGIC) => Some(format!(
            "event {:?}: {namespace}/{name} key {:?} is a precompiled native module, which is never run; provide the .wasm",
            spec.name, spec.wasm
        )),
        Some(bytes) if binary && !bytes.starts_with(WASM_MAGIC) => Some(format!(
            "event {:?}: {namespace}/{name} key {:?} is not a WebAssembly module (no \\0asm header)",
            spec.name, spec.wasm
        )),
        Some(_) => None,
    }
}

/// The module of `spec` in its module ConfigMap: the binary key (what `jobico module
/// configmap` writes), else a text key (WAT).
pub fn module_bytes<'a>(spec: &EventSpec, map: &'a ConfigMap) -> Option<&'a [u8]> {
    let binary = map
        .binary_data
        .as_ref()
        .and_then(|d| d.get(&spec.wasm))
        .map(|b| b.0.as_slice());
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get(&spec.wasm))
        .map(String::as_bytes);
    binary.or(text)
}

/// What is wrong with the schema of `spec` given its ConfigMap (`None` when it does not
/// exist); `None` when it is there or optional. Whether it compiles is the ingress's check.
pub fn schema_problem(
    owner: &JobicoJob,
    spec: &EventSpec,
    map: Option<&ConfigMap>,
) -> Option<String> {
    if spec.schema.is_optional() {
        return None;
    }
    let namespace = owner.metadata.namespace.as_deref().unwrap_or_default();
    let name = spec.schema.config_map_name();
    let key = spec.schema.data_key();
    let found = map
        .and_then(|m| m.data.as_ref())
        .is_some_and(|d| d.contains_key(&key));
    (!found).then(|| {
        format!(
            "event {:?}: schema ConfigMap {namespace}/{name} {}; create it with `kubectl create configmap {name} -n {namespace} --from-file={key}=<schema file>`",
            spec.name,
            if map.is_some() { format!("has no key {key:?}") } else { "does not exist".into() },
        )
    })
}

/// Reads ConfigMap `name` of `namespace`; `None` when it does not exist.
pub async fn config_map(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<ConfigMap>, kube::Error> {
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
}

/// What keeps the module's variables of `spec` (an event of `namespace`) from being given to
/// it: a ConfigMap or Secret or key that is missing (and not optional), a Secret not granted
/// to modules, values too large (see [`jobico_model::env`]). Each object is read once; the
/// values read are used for the check only. Empty when the event reads none.
pub async fn env_problems(
    client: &kube::Client,
    namespace: &str,
    spec: &EventSpec,
) -> Result<Vec<String>, kube::Error> {
    let mut sources = Sources::new();
    for reference in spec.env_references() {
        let key = (reference.kind, reference.name.to_owned());
        if sources.contains_key(&key) {
            continue;
        }
        let source = match reference.kind {
            SourceKind::ConfigMap => config_map(client, namespace, reference.name)
                .await?
                .map(|map| Source::from_config_map(&map)),
            SourceKind::Secret => Api::<Secret>::namespaced(client.clone(), namespace)
                .get_opt(reference.name)
                .await?
                .map(|secret| Source::from_secret(&secret)),
        };
        sources.insert(key, source);
    }
    Ok(env::resolve(namespace, spec, &sources)
        .err()
        .unwrap_or_default())
}

/// Why the inputs could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    /// A Kubernetes API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The module store did not answer.
    #[error(transparent)]
    Modules(#[from] ModuleStoreError),
}

/// What keeps the uploaded module `digest` of `spec` (`wasm: sha256:<digest>`) from running,
/// as a sentence saying how to fix it; `None` when it is in the module store, where `artifacts`
/// (the dispatcher's artifact server, which carries it to pods) reads it.
pub async fn uploaded_module_problem(
    artifacts: Option<&Artifacts>,
    owner: &JobicoJob,
    spec: &EventSpec,
    digest: Sha256Digest,
) -> Result<Option<String>, ModuleStoreError> {
    let namespace = owner.metadata.namespace.as_deref().unwrap_or_default();
    let resource = owner.metadata.name.as_deref().unwrap_or_default();
    let Some(artifacts) = artifacts else {
        return Ok(Some(format!(
            "event {:?}: module sha256:{digest} is an uploaded module, which this dispatcher cannot carry to pods: it runs without --artifacts-url",
            spec.name
        )));
    };
    Ok((!artifacts.is_uploaded(namespace, digest).await?).then(|| {
        format!(
            "event {:?}: module sha256:{digest} was not uploaded to namespace {namespace}; upload it with `jobico module upload {resource} FILE.wasm -n {namespace}` (PUT /modules/{namespace}/{resource} on the ingress)",
            spec.name
        )
    }))
}

/// Every problem with the modules and schemas of `owner`'s events (empty when all are there);
/// each usable module is handed to `artifacts` to compile, so it is compiled before the first
/// event needs it.
pub async fn problems(
    client: &kube::Client,
    owner: &JobicoJob,
    artifacts: Option<&Arc<Artifacts>>,
) -> Result<Vec<String>, InputsError> {
    let namespace = owner.metadata.namespace.as_deref().unwrap_or_default();
    let from_config_map = owner
        .spec
        .events
        .iter()
        .any(|spec| matches!(spec.module_ref(), Some(ModuleRef::ConfigMap(_))));
    let modules = match from_config_map {
        true => config_map(client, namespace, &owner.modules_config_map()).await?,
        false => None,
    };
    let mut problems = Vec::new();
    for spec in &owner.spec.events {
        match spec.module_ref() {
            Some(ModuleRef::Uploaded(digest)) => {
                match uploaded_module_problem(artifacts.map(Arc::as_ref), owner, spec, digest)
                    .await?
                {
                    Some(problem) => problems.push(problem),
                    None => {
                        if let Some(artifacts) = artifacts {
                            artifacts.request_uploaded(namespace, digest);
                        }
                    }
                }
            }
            _ => match module_problem(owner, spec, modules.as_ref()) {
                Some(problem) => problems.push(problem),
                None => {
                    let bytes = modules.as_ref().and_then(|m| module_bytes(spec, m));
                    if let (Some(artifacts), Some(bytes)) = (artifacts, bytes) {
                        artifacts.request(bytes);
                    }
                }
            },
        }
        if !spec.schema.is_optional() {
            let schema = config_map(client, namespace, spec.schema.config_map_name()).await?;
            problems.extend(schema_problem(owner, spec, schema.as_ref()));
        }
        problems.extend(env_problems(client, namespace, spec).await?);
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn owner() -> JobicoJob {
        let mut job = JobicoJob::new(
            "job-for-ev1",
            serde_json::from_value(serde_json::json!({
                "events": [{"name": "ev1", "wasm": "echo.wasm", "schema": {"key": "schema-ev1"}}]
            }))
            .unwrap(),
        );
        job.metadata.namespace = Some("default".into());
        job
    }

    fn binary(key: &str, bytes: &[u8]) -> ConfigMap {
        ConfigMap {
            binary_data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(bytes.to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn modules_must_be_there_and_be_webassembly() {
        let owner = owner();
        let spec = &owner.spec.events[0];
        let missing = module_problem(&owner, spec, None).unwrap();
        assert!(
            missing.contains("default/job-for-ev1-modules does not exist"),
            "{missing}"
        );
        assert!(
            missing.contains("jobico module configmap job-for-ev1-modules echo.wasm"),
            "{missing}"
        );
        let no_key = module_problem(
            &owner,
            spec,
            Some(&binary("other.wasm", b"\0asm\x01\0\0\0")),
        )
        .unwrap();
        assert!(no_key.contains("has no key \"echo.wasm\""), "{no_key}");
        assert_eq!(
            module_problem(&owner, spec, Some(&binary("echo.wasm", b"\0asm\x01\0\0\0"))),
            None
        );
        let native =
            module_problem(&owner, spec, Some(&binary("echo.wasm", b"\x7fELF\x02\x01"))).unwrap();
        assert!(native.contains("precompiled native module"), "{native}");
        assert!(module_problem(&owner, spec, Some(&binary("echo.wasm", b"garbage"))).is_some());
        let wat = ConfigMap {
            data: Some(BTreeMap::from([(
                "echo.wasm".to_owned(),
                "(module)".to_owned(),
            )])),
            ..Default::default()
        };
        assert_eq!(module_problem(&owner, spec, Some(&wat)), None);
    }

    #[test]
    fn schemas_must_be_there_unless_optional() {
        let mut owner = owner();
        let spec = owner.spec.events[0].clone();
        assert!(
            schema_problem(&owner, &spec, None)
                .unwrap()
                .contains("does not exist")
        );
        let present = ConfigMap {
            data: Some(BTreeMap::from([(
                "schema-ev1.json".to_owned(),
                "{}".to_owned(),
            )])),
            ..Default::default()
        };
        assert_eq!(schema_problem(&owner, &spec, Some(&present)), None);
        assert!(
            schema_problem(&owner, &spec, Some(&ConfigMap::default()))
                .unwrap()
                .contains("has no key \"schema-ev1.json\"")
        );
        owner.spec.events[0].schema.optional = Some(true);
        assert_eq!(schema_problem(&owner, &owner.spec.events[0], None), None);
    }
}
