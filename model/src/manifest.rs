//! Reading Kubernetes YAML manifests (multi-document files) without a cluster.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::Deserialize;

use crate::crd::{EventSpec, Job};
use crate::env::{Source, SourceKind, Sources};

/// The namespace of objects whose manifest names none, as `kubectl apply` would use by default.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The objects Jobico cares about, read from manifests. Namespaces are always filled in.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// Jobico `Job` resources.
    pub jobs: Vec<Job>,
    /// ConfigMaps (schemas, modules, templates, the modules' variables).
    pub config_maps: Vec<ConfigMap>,
    /// Secrets (the modules' variables, when granted: see [`crate::env`]).
    pub secrets: Vec<Secret>,
}

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or not a valid object of its kind.
    #[error("{path}: document {index}: {message}")]
    Document {
        /// The file.
        path: PathBuf,
        /// Zero-based position of the document in the file.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Deserialises one object, naming the field at fault (`spec.events[0].name: ...`).
fn from_value<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Deserialises a named object and fills in its namespace, as `kubectl apply` would.
fn object<T>(value: serde_yaml::Value) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let mut object: T = from_value(value)?;
    if object.meta().name.is_none() {
        return Err(format!("{} has no metadata.name", T::kind(&())));
    }
    object
        .meta_mut()
        .namespace
        .get_or_insert_with(|| DEFAULT_NAMESPACE.into());
    Ok(object)
}

impl Manifest {
    /// Reads every `.yaml`/`.yml` file in `path` (not recursive), or `path` itself if it is a
    /// file. Files are read in name order so results are stable.
    pub fn read_path(&mut self, path: &Path) -> Result<(), ManifestError> {
        let io = |source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io)? {
                let file = entry.map_err(io)?.path();
                let is_yaml = matches!(
                    file.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                );
                if is_yaml && file.is_file() {
                    files.push(file);
                }
            }
            files.sort();
            for file in files {
                self.read_path(&file)?;
            }
            Ok(())
        } else {
            let text = std::fs::read_to_string(path).map_err(io)?;
            self.read_str(path, &text)
        }
    }

    /// Adds the objects of a multi-document YAML text; `path` only names it in errors.
    /// Documents of other kinds are skipped.
    pub fn read_str(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let fail = |message: String| ManifestError::Document {
                path: path.to_path_buf(),
                index,
                message,
            };
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| fail(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let meta: TypeMeta =
                serde_yaml::from_value(value.clone()).map_err(|e| fail(e.to_string()))?;
            match (meta.api_version.as_str(), meta.kind.as_str()) {
                ("jobico.coeux.dev/v1", "Job") => self.jobs.push(object(value).map_err(fail)?),
                ("v1", "ConfigMap") => self.config_maps.push(object(value).map_err(fail)?),
                ("v1", "Secret") => self.secrets.push(object(value).map_err(fail)?),
                _ => {}
            }
        }
        Ok(())
    }

    /// The ConfigMap `namespace/name`, if read.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&ConfigMap> {
        self.config_maps.iter().find(|m| {
            m.metadata.namespace.as_deref() == Some(namespace)
                && m.metadata.name.as_deref() == Some(name)
        })
    }
}

impl Manifest {
    /// The ConfigMaps and Secrets the environment of `spec` (an event of `namespace`) reads,
    /// for [`crate::env::resolve`].
    pub fn env_sources(&self, namespace: &str, spec: &EventSpec) -> Sources {
        let in_namespace = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                            name: &str| {
            meta.namespace.as_deref() == Some(namespace) && meta.name.as_deref() == Some(name)
        };
        spec.env_references()
            .into_iter()
            .map(|reference| {
                let source = match reference.kind {
                    SourceKind::ConfigMap => self
                        .config_map(namespace, reference.name)
                        .map(Source::from_config_map),
                    SourceKind::Secret => self
                        .secrets
                        .iter()
                        .find(|s| in_namespace(&s.metadata, reference.name))
                        .map(Source::from_secret),
                };
                ((reference.kind, reference.name.to_owned()), source)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_DOCS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: schema-ev1
data:
  schema-ev1.json: '{"type":"object"}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata:
  name: job-for-ev1
  namespace: team-a
spec:
  events:
    - name: ev1
      wasm: echo.wasm
      schema:
        key: schema-ev1
---
apiVersion: v1
kind: Service
metadata:
  name: ignored
---
"#;

    #[test]
    fn reads_jobs_and_config_maps_and_fills_namespaces() {
        let mut manifest = Manifest::default();
        manifest.read_str(Path::new("t.yaml"), TWO_DOCS).unwrap();
        assert_eq!(manifest.jobs.len(), 1);
        assert_eq!(
            manifest.jobs[0].metadata.namespace.as_deref(),
            Some("team-a")
        );
        assert_eq!(manifest.jobs[0].spec.events[0].wasm, "echo.wasm");
        let map = manifest.config_map("default", "schema-ev1").unwrap();
        assert!(map.data.as_ref().unwrap().contains_key("schema-ev1.json"));
        assert!(manifest.config_map("team-a", "schema-ev1").is_none());
    }

    #[test]
    fn bad_documents_name_the_file_and_position() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {name: j}\nspec: {events: [{name: 1}]}\n";
        let err = Manifest::default()
            .read_str(Path::new("bad.yaml"), text)
            .unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("bad.yaml: document 1: "), "{message}");
        assert!(
            message.contains("spec.events[0].name: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn read_path_reads_directories_in_name_order() {
        let dir = std::env::temp_dir().join(format!("jobico-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.yaml"), TWO_DOCS).unwrap();
        std::fs::write(
            dir.join("a.yml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
        let mut manifest = Manifest::default();
        manifest.read_path(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<_> = manifest
            .config_maps
            .iter()
            .map(|m| m.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["first", "schema-ev1"]);
    }
}
