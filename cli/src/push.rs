//! `jobico module push`: puts modules into the ConfigMap a `Job` resource reads them from,
//! creating it or updating it in place (other modules in it are kept).

use std::path::PathBuf;

use jobico_model::Job as JobicoJob;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use crate::kube_client::{KubeArgs, api_status};

/// Arguments of `jobico module push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The `Job` resource (`jobs.jobico.coeux.dev`) whose module ConfigMap receives the files:
    /// its `spec.modules`, or `<name>-modules`.
    pub resource: String,
    /// The `.wasm` (or `.wat`, compiled first) files, stored under their file names.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace of the resource.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// The cluster.
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// How many times a concurrent change of the ConfigMap is answered by reading it again.
const ATTEMPTS: usize = 4;

/// Pushes the modules; returns the lines to print.
pub async fn push(args: &PushArgs) -> anyhow::Result<Vec<String>> {
    let entries = crate::module_entries(&args.files)?;
    let client = args.kube.client().await?;
    let ns = args.namespace.as_str();
    let resources: Api<JobicoJob> = Api::namespaced(client.clone(), ns);
    let resource = match resources.get_opt(&args.resource).await {
        Ok(Some(resource)) => resource,
        Ok(None) => anyhow::bail!(
            "no Job resource {ns}/{} (jobs.jobico.coeux.dev): apply it first (kubectl apply -f ...), or print a ConfigMap of any name with `jobico module configmap`",
            args.resource
        ),
        Err(error) => {
            return Err(explain(
                error,
                &format!("reading Job resource {ns}/{}", args.resource),
            ));
        }
    };
    let map_name = resource.modules_config_map();
    let maps: Api<ConfigMap> = Api::namespaced(client, ns);
    let mut lines = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let existing = maps
            .get_opt(&map_name)
            .await
            .map_err(|e| explain(e, &format!("reading ConfigMap {ns}/{map_name}")))?;
        let created = existing.is_none();
        let mut map = existing.unwrap_or_else(|| ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(map_name.clone()),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        });
        map.binary_data
            .get_or_insert_with(Default::default)
            .extend(entries.clone());
        crate::check_config_map_size(&map)?;
        let written = if created {
            maps.create(&PostParams::default(), &map).await
        } else {
            // Carries the resourceVersion read: a concurrent change makes this a 409.
            maps.replace(&map_name, &PostParams::default(), &map).await
        };
        match written {
            Ok(_) => {
                let verb = if created { "created" } else { "updated" };
                for (key, wasm) in &entries {
                    lines.push(format!(
                        "configmap {ns}/{map_name}: {key} ({} bytes) {verb}",
                        wasm.0.len()
                    ));
                }
                let used: Vec<&str> = resource
                    .spec
                    .events
                    .iter()
                    .map(|e| e.wasm.as_str())
                    .collect();
                for key in entries.keys().filter(|k| !used.contains(&k.as_str())) {
                    lines.push(format!(
                        "note: no event of {ns}/{} runs {key} (its events run: {})",
                        args.resource,
                        used.join(", ")
                    ));
                }
                return Ok(lines);
            }
            Err(error)
                if attempt < ATTEMPTS
                    && api_status(&error).is_some_and(|(code, _)| code == 409) => {}
            Err(error) => {
                return Err(explain(
                    error,
                    &format!("writing ConfigMap {ns}/{map_name}"),
                ));
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// An API error with what was being done and, where there is one, what to do about it.
pub fn explain(error: kube::Error, doing: &str) -> anyhow::Error {
    let hint = match api_status(&error) {
        Some((401, _)) => Some("the cluster refused the kubeconfig's credentials"),
        Some((403, _)) => {
            Some("the kubeconfig's identity lacks that permission (kubectl auth can-i ...)")
        }
        Some((404, _)) if doing.contains("Job resource") => {
            Some("the CRD jobs.jobico.coeux.dev may be missing: kubectl apply -f crds/job.yaml")
        }
        _ => None,
    };
    let error = anyhow::Error::new(error).context(doing.to_owned());
    match hint {
        Some(hint) => error.context(hint),
        None => error,
    }
}

impl PushArgs {
    /// Runs the command, printing what was pushed.
    pub fn run(&self) -> anyhow::Result<()> {
        for line in crate::block_on(push(self))? {
            println!("{line}");
        }
        Ok(())
    }
}
