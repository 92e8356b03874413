//! The `jobico-dispatcher` binary: arguments and the process wiring.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use jobico_common::subject::DISPATCHER_INBOX;
use jobico_common::telemetry::LogArgs;
use jobico_store::{NatsAuthArgs, StreamArgs};

use crate::admin::{self, Readiness};
use crate::artifacts::{ArtifactSettings, Artifacts};
use crate::consumer::{ACK_WAIT, Dispatcher, RetryPolicy};
use crate::consumers::{ConsumerSet, ORPHAN_GRACE};
use crate::controller::{self, Context};
use crate::kubernetes::KubeBackend;
use crate::leader::{Elector, LeaseConfig};
use crate::metrics::Metrics;
use crate::render::{Renderer, ResultsConfig, TemplateChecker};
use crate::sinks::{self, SinkArgs, SinkClient, SinkPolicy};
use crate::tracker;
use crate::trust::Signer;

/// Turns events from the JetStream stream into Kubernetes Jobs running wasm-exec.
#[derive(Debug, Parser)]
#[command(name = "jobico-dispatcher", version)]
pub struct Args {
    /// NATS server URL.
    #[arg(long, env = "JOBICO_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// The namespaces' event streams: limits, retention, replicas.
    #[command(flatten)]
    pub streams: StreamArgs,
    /// Container image of the executor (runs `wasm-exec run`).
    #[arg(long, env = "JOBICO_EXEC_IMAGE")]
    pub exec_image: String,
    /// Address of the admin port (/healthz, /readyz, /metrics).
    #[arg(long, env = "JOBICO_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the dispatcher's own namespace).
    #[arg(long, env = "JOBICO_LEASE_NAMESPACE", default_value = "jobico-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "JOBICO_LEASE_NAME", default_value = "jobico-dispatcher")]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "HOSTNAME", default_value = "jobico-dispatcher")]
    pub identity: String,
    /// Seconds the backlog of an event no valid resource declares (deleted or invalid) is kept
    /// before it is dead-lettered.
    #[arg(long, env = "JOBICO_ORPHAN_GRACE_SECS", default_value_t = ORPHAN_GRACE.as_secs())]
    pub orphan_grace_secs: u64,
    /// Seconds an event may stay unacknowledged before NATS hands it out again: how soon the
    /// events a killed dispatcher held are dispatched by the next one (a live dispatcher keeps
    /// its events with progress acks). Applied to each event type's consumer at start.
    #[arg(long, env = "JOBICO_ACK_WAIT_SECS", default_value_t = ACK_WAIT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ack_wait_secs: u64,
    /// Base URL at which executor pods reach this dispatcher's artifact server (for example
    /// `http://jobico-artifacts.jobico-system.svc:8083`). With it, every module is compiled
    /// once, here, and pods load the compiled code; without it, every pod compiles its module.
    #[arg(long, env = "JOBICO_ARTIFACTS_URL", value_name = "URL", value_parser = parse_http_url)]
    pub artifacts_url: Option<String>,
    /// Base URL at which executor pods reach the ingress (for example
    /// `http://jobico-apiserver.jobico-system.svc:8080`): executors of events with `then`
    /// routes post their outcomes there. Needs --results-key-file; events with routes are
    /// held without them.
    #[arg(long, env = "JOBICO_RESULTS_URL", value_name = "URL", value_parser = parse_http_url,
          requires = "results_key_file")]
    pub results_url: Option<String>,
    /// File holding the key the results tokens are signed with (the ingress's
    /// `--results-key-file`, the same Secret; at least 32 bytes).
    #[arg(
        long,
        env = "JOBICO_RESULTS_KEY_FILE",
        value_name = "FILE",
        requires = "results_url"
    )]
    pub results_key_file: Option<std::path::PathBuf>,
    /// Address of the artifact server (used with --artifacts-url).
    #[arg(long, env = "JOBICO_ARTIFACTS_LISTEN", default_value = "0.0.0.0:8083")]
    pub artifacts_listen: SocketAddr,
    /// Most bytes of compiled modules kept in the NATS object store `jobico-artifacts` (a
    /// 3.4 MB module compiles to about 35 MB).
    #[arg(long, env = "JOBICO_ARTIFACT_STORE_BYTES", default_value_t = DEFAULT_ARTIFACT_STORE_BYTES)]
    pub artifact_store_bytes: i64,
    /// Delivering outcomes to the events' sinks.
    #[command(flatten)]
    pub sinks: SinkArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Room for about a hundred compiled modules of a few MB.
const DEFAULT_ARTIFACT_STORE_BYTES: i64 = 4 << 30;
/// How long a compiled module is kept: one no event ran for that long is compiled again
/// when it is needed.
const ARTIFACT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

fn parse_http_url(text: &str) -> Result<String, String> {
    if text.len() > crate::artifacts::MAX_BASE_URL_BYTES {
        return Err(format!(
            "is longer than {} bytes",
            crate::artifacts::MAX_BASE_URL_BYTES
        ));
    }
    if text.starts_with("http://") && text.len() > "http://".len() {
        Ok(text.trim_end_matches('/').to_owned())
    } else {
        Err("must be an http:// URL (executor pods speak plain HTTP inside the cluster)".into())
    }
}

/// Runs the dispatcher until SIGTERM / Ctrl-C or until leadership is lost.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // First: an unreadable credentials file stops the process before anything else starts.
    let nats_auth = args.nats_auth.load()?;
    let results = match (&args.results_url, &args.results_key_file) {
        (Some(base_url), Some(path)) => Some(ResultsConfig {
            base_url: base_url.clone(),
            key: jobico_common::chain::read_results_key(path).map_err(anyhow::Error::msg)?,
        }),
        _ => None,
    };
    let shutdown = jobico_common::shutdown::on_signals();
    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::default();
    let listener = admin::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", args.admin_listen))?;
    let admin = tokio::spawn(admin::serve(
        listener,
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let kube_config = kube::Config::infer()
        .await
        .context("loading the kubeconfig or in-cluster configuration")?;
    let kube_api = kube_config.cluster_url.to_string();
    let client = kube::Client::try_from(kube_config)
        .context("loading the kubeconfig or in-cluster configuration")?;
    controller::check_crd(&client).await?;
    let nats = nats_auth
        .options("jobico-dispatcher", DISPATCHER_INBOX)
        .connect(jobico_store::Servers(&args.nats))
        .await
        .with_context(|| format!("connecting to NATS at {} with {nats_auth}", args.nats))?;
    tracing::info!(url = %args.nats, identity = %nats_auth, "connected to NATS");
    let js = async_nats::jetstream::new(nats);
    readiness.set(true);

    // Loaded before the election: standby replicas serve artifacts too (the Service sends
    // pods to any ready replica).
    let signer = Signer::load_or_create(&js)
        .await
        .context("loading the Job signing key")?;
    let mut artifact_server = None;
    let artifacts = match &args.artifacts_url {
        Some(base_url) => {
            let settings = ArtifactSettings {
                base_url: base_url.clone(),
                max_bytes: args.artifact_store_bytes,
                max_age: ARTIFACT_MAX_AGE,
                replicas: args.streams.settings().replicas,
            };
            let artifacts = Arc::new(
                Artifacts::open(&js, signer.clone(), &settings)
                    .await
                    .context("opening the artifact store")?,
            );
            let listener = tokio::net::TcpListener::bind(args.artifacts_listen)
                .await
                .with_context(|| format!("binding the artifact port {}", args.artifacts_listen))?;
            artifact_server = Some(tokio::spawn(
                artifacts.clone().serve(listener, shutdown.clone()),
            ));
            tracing::info!(listen = %args.artifacts_listen, url = %base_url, "serving compiled modules");
            Some(artifacts)
        }
        None => None,
    };

    let elector = Elector::new(
        client.clone(),
        LeaseConfig::new(&args.lease_namespace, &args.lease_name, &args.identity),
    );
    if !elector.acquire(&shutdown).await? {
        return Ok(());
    }
    metrics.leader.set(1);

    // The single stream of an earlier release would keep every namespace's stream from being
    // created: removed when empty, else the process stops saying how to drain it.
    jobico_store::streams::retire_legacy(&js)
        .await
        .context("checking for the event stream of an earlier release")?;
    let renderer = || {
        let renderer = Renderer::new(&args.exec_image);
        match &results {
            Some(results) => renderer.with_results(results.clone()),
            None => renderer,
        }
    };
    let mut backend = KubeBackend::new(client.clone(), renderer()).with_signer(signer);
    if let Some(artifacts) = &artifacts {
        backend = backend.with_artifacts(artifacts.clone());
    }
    let backend = Arc::new(backend);
    let retry = RetryPolicy::default();
    let dispatcher = Dispatcher::connect_with(
        js,
        backend.clone(),
        metrics.clone(),
        retry,
        std::time::Duration::from_secs(args.ack_wait_secs),
        args.streams.settings(),
    )
    .await
    .context("opening the state bucket and dead-letter stream")?;
    // Everything below stops on `work`: a signal, or the lease lost.
    let work = shutdown.child_token();
    let consumers = Arc::new(ConsumerSet::new(dispatcher.clone(), work.clone()));
    let mut ctx = Context::new(
        client.clone(),
        consumers.clone(),
        Some(args.identity.clone()),
    )
    .with_templates(Arc::new(TemplateChecker::new(renderer())));
    if let Some(artifacts) = artifacts {
        ctx = ctx.with_artifacts(artifacts);
    }
    let ctx = Arc::new(ctx);
    let mut tracker = tokio::spawn(tracker::run(
        client.clone(),
        tracker::TrackerConfig {
            states: dispatcher.states.clone(),
            active: backend.active.clone(),
            counters: dispatcher.counters.clone(),
            metrics: metrics.clone(),
            signer: backend.signer().clone(),
            image: args.exec_image.clone(),
            results: results.clone(),
        },
        work.clone(),
    ));
    // Sinks never reach the services this process holds credentials for.
    let mut own_services: Vec<String> = args.nats.split(',').map(str::to_owned).collect();
    own_services.push(kube_api);
    let policy = SinkPolicy {
        allow_loopback: false,
        denied: args.sinks.sink_deny_cidr.clone(),
    }
    .denying_hosts_of(&own_services)
    .await;
    let sink_settings = args.sinks.settings();
    let mut sinks = tokio::spawn(sinks::run(
        dispatcher.js.clone(),
        dispatcher.states.clone(),
        SinkClient::new(policy, sink_settings.timeout),
        sink_settings,
        args.streams.settings(),
        work.clone(),
    ));
    let counters = tokio::spawn(controller::flush_counters(
        client.clone(),
        dispatcher.counters.clone(),
        work.clone(),
    ));
    let mut controller = tokio::spawn(controller::run(ctx, work.clone()));
    let sweeper = tokio::spawn({
        let (consumers, work) = (consumers.clone(), work.clone());
        let grace = std::time::Duration::from_secs(args.orphan_grace_secs);
        async move { consumers.sweep_orphans(grace, work).await }
    });

    // Any of these ending is the end of the process: Kubernetes restarts it.
    let failure = tokio::select! {
        lost = elector.hold(&shutdown) => lost.then_some("lost the leader lease"),
        // On SIGTERM these end too (their token is a child of `shutdown`): not a failure.
        _ = &mut tracker => (!shutdown.is_cancelled()).then_some("the state tracker stopped"),
        _ = &mut controller => (!shutdown.is_cancelled()).then_some("the controller stopped"),
        stopped = &mut sinks => {
            if let Ok(Err(error)) = &stopped {
                tracing::error!(error = format!("{error:#}"), "the sink deliverer stopped");
            }
            (!shutdown.is_cancelled()).then_some("the sink deliverer stopped")
        }
    };
    work.cancel();
    // Drain: in-flight batches finish and are acked before the process ends.
    consumers.shutdown().await;
    for task in [tracker, controller, counters, sweeper] {
        if !task.is_finished() {
            let _ = task.await;
        }
    }
    if !sinks.is_finished() {
        let _ = sinks.await;
    }
    metrics.leader.set(0);
    if let Some(failure) = failure {
        anyhow::bail!("{failure}; exiting so a fresh start campaigns again");
    }
    elector.release().await;
    shutdown.cancel();
    let _ = admin.await;
    if let Some(server) = artifact_server {
        let _ = server.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let args =
            Args::try_parse_from(["jobico-dispatcher", "--exec-image", "wasm-exec:1"]).unwrap();
        assert_eq!(args.exec_image, "wasm-exec:1");
        assert_eq!(args.admin_listen.port(), 9090);
        assert_eq!(args.ack_wait_secs, ACK_WAIT.as_secs());
        assert!(!args.nats_auth.is_set());
        let args = Args::try_parse_from([
            "jobico-dispatcher",
            "--exec-image",
            "x",
            "--nats-user",
            "jobico-dispatcher",
            "--nats-password-file",
            "/var/run/secrets/jobico/nats/password",
        ])
        .unwrap();
        assert_eq!(
            args.nats_auth.nats_user.as_deref(),
            Some("jobico-dispatcher")
        );
        assert!(
            Args::try_parse_from([
                "jobico-dispatcher",
                "--admin-listen",
                "nope",
                "--exec-image",
                "x"
            ])
            .is_err()
        );
    }
}
