//! The cluster commands' Kubernetes client: kubeconfig-aware like kubectl (`--kubeconfig`,
//! `--context`, else `$KUBECONFIG` or `~/.kube/config`, else the pod's service account).

use std::path::PathBuf;

use anyhow::Context;

/// Where the cluster is.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig file (default: $KUBECONFIG, else ~/.kube/config; in a pod, its service
    /// account).
    #[arg(long, env = "KUBECONFIG", hide_env_values = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
}

impl KubeArgs {
    /// A client for the chosen cluster and context.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("cannot use the kubeconfig (~/.kube/config)")?,
            None => kube::Config::infer().await.context(
                "no cluster configured: set KUBECONFIG or --kubeconfig (kind: `kind get kubeconfig --name jobico`)",
            )?,
        };
        kube::Client::try_from(config).context("cannot build a Kubernetes client")
    }
}

/// `namespace/name` split, or `name` in `default_namespace`.
pub fn split_ref<'a>(text: &'a str, default_namespace: &'a str) -> (&'a str, &'a str) {
    match text.split_once('/') {
        Some((namespace, name)) => (namespace, name),
        None => (default_namespace, text),
    }
}

/// An API error's status code and message, for errors that say what to do.
pub fn api_status(error: &kube::Error) -> Option<(u16, &str)> {
    match error {
        kube::Error::Api(status) => Some((status.code, status.message.as_str())),
        _ => None,
    }
}
