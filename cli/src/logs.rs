//! `jobico logs`: the module output of one event, from the pod of the Job that ran it, even
//! inside a batch (wasm-exec tags every output line with its event id).

use anyhow::Context;
use jobico_dispatcher::kubernetes::job_ids;
use jobico_dispatcher::tracker;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};

use crate::kube_client::{KubeArgs, split_ref};
use crate::push::explain;

/// The executor container of the dispatcher's Jobs.
const CONTAINER: &str = tracker::CONTAINER;

/// Arguments of `jobico logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// `NAMESPACE/ID` (or `ID` in `default`): an id `jobico send` printed.
    pub target: String,
    /// The cluster.
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// The lines of `log` that belong to event `id` (`<id> <stream> <line>`).
pub fn event_lines<'a>(log: &'a str, id: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|line| {
            line.strip_prefix(id)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .collect()
}

/// The output lines of the event, from every pod of every Job that holds it (a retried pod
/// shows each attempt).
pub async fn logs(args: &LogsArgs) -> anyhow::Result<Vec<String>> {
    let (namespace, id) = split_ref(&args.target, "default");
    let client = args.kube.client().await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let listed = jobs
        .list(&ListParams::default().labels(&tracker::selector()))
        .await
        .map_err(|e| explain(e, &format!("listing the Jobs of namespace {namespace}")))?;
    let holding: Vec<&Job> = listed
        .items
        .iter()
        .filter(|job| job_ids(job).iter().any(|held| held == id))
        .collect();
    anyhow::ensure!(
        !holding.is_empty(),
        "no Job in {namespace} holds event {id}: it has not been dispatched yet, or its Job was removed after ttlSecondsAfterFinished (`jobico status {namespace}/{id}` shows its recorded outcome)"
    );
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let mut lines = Vec::new();
    for job in holding {
        let name = job.metadata.name.clone().unwrap_or_default();
        let selector = format!("{}={name}", tracker::JOB_NAME_LABEL);
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| explain(e, &format!("listing the pods of Job {namespace}/{name}")))?;
        anyhow::ensure!(
            !listed.items.is_empty(),
            "Job {namespace}/{name} holds event {id} but has no pods (not started yet, or removed)"
        );
        for pod in &listed.items {
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let params = LogParams {
                container: Some(CONTAINER.to_owned()),
                ..Default::default()
            };
            let log = pods.logs(&pod_name, &params).await.map_err(|e| {
                explain(e, &format!("reading the log of pod {namespace}/{pod_name}"))
            })?;
            lines.extend(event_lines(&log, id).into_iter().map(str::to_owned));
        }
    }
    if lines.is_empty() {
        lines.push(format!("(event {id} printed nothing)"));
    }
    Ok(lines)
}

impl LogsArgs {
    /// Runs the command, printing the event's lines.
    pub fn run(&self) -> anyhow::Result<()> {
        for line in crate::block_on(logs(self)).context("jobico logs")? {
            println!("{line}");
        }
        Ok(())
    }
}
