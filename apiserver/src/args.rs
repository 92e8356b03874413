//! Flags of `jobico-apiserver` and the process that serves them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use clap::Parser;
use futures::future::BoxFuture;
use jobico_common::sink::SinkMessage;
use jobico_common::telemetry::LogArgs;
use jobico_common::{EventRecord, EventStatus};
use jobico_model::Manifest;
use jobico_store::NatsAuthArgs;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, DEFAULT_AUDIENCE, KubernetesAuth, StaticTokens};
use crate::catalog::{self, Catalog};
use crate::http::{AppState, DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES};
use crate::jetstream::{JetStreamPublisher, PublishSettings};
use crate::metrics::Metrics;
use crate::publish::{
    NullPublisher, PublishError, PublishFailure, Published, Publisher, StatusLookup,
};
use crate::{server, watch};

/// How requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication.
    Off,
    /// Bearer tokens listed in `--token-file`.
    TokenFile,
    /// Kubernetes TokenReview and SubjectAccessReview.
    Kubernetes,
}

/// Jobico's ingress: validates events against their JSON Schema and publishes them to NATS
/// JetStream.
#[derive(Debug, Parser)]
#[command(name = "jobico-apiserver", version)]
pub struct Args {
    /// Address of the public HTTP API.
    #[arg(long, env = "JOBICO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (/healthz, /readyz, /metrics).
    #[arg(long, env = "JOBICO_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// NATS server URL.
    #[arg(long, env = "JOBICO_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// NATS credentials and TLS.
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// Read Job resources and ConfigMaps from these manifest files or directories instead of
    /// watching the cluster (comma separated or repeated).
    #[arg(long, env = "JOBICO_MANIFESTS", value_delimiter = ',')]
    pub manifests: Vec<PathBuf>,
    /// Namespaces to watch (comma separated); all when empty.
    #[arg(long, env = "JOBICO_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Label selector narrowing the watched ConfigMaps (e.g. `jobico.coeux.dev/schema`); all
    /// ConfigMaps of the watched namespaces when absent.
    #[arg(long, env = "JOBICO_CONFIGMAP_SELECTOR")]
    pub configmap_selector: Option<String>,
    /// Milliseconds of quiet after a watched change before the catalog is rebuilt.
    #[arg(long, env = "JOBICO_DEBOUNCE_MS", default_value_t = watch::DEFAULT_DEBOUNCE.as_millis() as u64)]
    pub debounce_ms: u64,
    /// How requests are authenticated.
    #[arg(long, env = "JOBICO_AUTH", value_enum, default_value_t = AuthMode::Kubernetes)]
    pub auth: AuthMode,
    /// Token file for `--auth token-file`: one token per line, optionally followed by the
    /// comma-separated namespaces it may use.
    #[arg(long, env = "JOBICO_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Audience TokenReview checks tokens for.
    #[arg(long, env = "JOBICO_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Largest request body in bytes.
    #[arg(long, env = "JOBICO_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Milliseconds a client has to send a request body once its head arrived (408 beyond).
    #[arg(long, env = "JOBICO_BODY_TIMEOUT_MS", default_value_t = DEFAULT_BODY_TIMEOUT.as_millis() as u64)]
    pub body_timeout_ms: u64,
    /// HTTP worker threads (0: one per CPU core).
    #[arg(long, env = "JOBICO_HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,
    /// Replicas of the state bucket when the ingress creates it (3 for an R3 cluster). The
    /// event streams, their limits and replicas are the dispatcher's `--namespace-*` and
    /// `--stream-*` flags.
    #[arg(long, env = "JOBICO_STATE_REPLICAS", default_value_t = 1)]
    pub state_replicas: usize,
    /// Seconds event states are kept in the KV bucket (0: forever).
    #[arg(long, env = "JOBICO_STATE_TTL_SECS", default_value_t = PublishSettings::default().state_ttl.as_secs())]
    pub state_ttl_secs: u64,
    /// Longest a request's publish may take before the client gets 503, in milliseconds.
    #[arg(long, env = "JOBICO_PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,
    /// File holding the key results tokens are signed with (at least 32 bytes; the
    /// dispatcher's `--results-key-file`, the same Secret): executors of events with `then`
    /// routes post their outcomes to `POST /results/<namespace>/<event>` with such a token.
    /// Without it that route answers 404 and routes are followed only in local mode.
    #[arg(long, env = "JOBICO_RESULTS_KEY_FILE", value_name = "FILE")]
    pub results_key_file: Option<PathBuf>,
    /// Benchmark only: skip validation and publishing (measures the HTTP ceiling).
    #[arg(long, hide = true)]
    pub bench_http_ceiling: bool,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Longest pause between attempts to reach NATS at start.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// A publisher that answers 503 until its JetStream connection is set up in the background.
#[derive(Default)]
pub struct LazyPublisher {
    inner: OnceLock<JetStreamPublisher>,
}

impl LazyPublisher {
    fn not_yet() -> PublishError {
        PublishError::Unavailable {
            reason: "not connected to NATS yet".into(),
            retry_after: Duration::from_secs(2),
        }
    }
}

impl Publisher for LazyPublisher {
    fn link<'a>(&'a self, links: &'a EventStatus) -> BoxFuture<'a, Result<(), PublishError>> {
        match self.inner.get() {
            Some(inner) => inner.link(links),
            None => Box::pin(async { Err(Self::not_yet()) }),
        }
    }

    fn dead_letter<'a>(
        &'a self,
        record: &'a EventRecord,
        status: &'a EventStatus,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        match self.inner.get() {
            Some(inner) => inner.dead_letter(record, status),
            None => Box::pin(async { Err(Self::not_yet()) }),
        }
    }

    fn sink<'a>(&'a self, message: &'a SinkMessage) -> BoxFuture<'a, Result<(), PublishError>> {
        match self.inner.get() {
            Some(inner) => inner.sink(message),
            None => Box::pin(async { Err(Self::not_yet()) }),
        }
    }

    fn publish(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Result<Vec<Published>, PublishFailure>> {
        match self.inner.get() {
            Some(inner) => inner.publish(events),
            None => {
                Box::pin(
                    async move { Err(PublishFailure::nothing_stored(Self::not_yet(), &events)) },
                )
            }
        }
    }

    fn is_ready(&self) -> bool {
        self.inner.get().is_some_and(Publisher::is_ready)
    }

    fn status<'a>(
        &'a self,
        namespace: &'a str,
        event: Option<&'a str>,
        id: &'a str,
    ) -> BoxFuture<'a, Result<StatusLookup, PublishError>> {
        match self.inner.get() {
            Some(inner) => inner.status(namespace, event, id),
            None => Box::pin(async { Err(Self::not_yet()) }),
        }
    }
}

impl Args {
    fn publish_settings(&self) -> PublishSettings {
        PublishSettings {
            replicas: self.state_replicas,
            state_ttl: Duration::from_secs(self.state_ttl_secs),
            publish_timeout: Duration::from_millis(self.publish_timeout_ms),
        }
    }

    /// Serves until SIGTERM or Ctrl-C, or until a background task fails.
    pub async fn run(self) -> anyhow::Result<()> {
        // First: a credentials file that cannot be read stops the process here, not at the
        // first connection attempt in the background.
        let nats_auth = self.nats_auth.load()?;
        let results_key = match &self.results_key_file {
            Some(path) => Some(Arc::new(
                jobico_common::chain::read_results_key(path).map_err(anyhow::Error::msg)?,
            )),
            None => None,
        };
        let shutdown = jobico_common::shutdown::on_signals();
        let metrics = Metrics::new();
        let catalog = Arc::new(Catalog::new());
        let synced = Arc::new(AtomicBool::new(false));
        let needs_cluster = self.manifests.is_empty() || self.auth == AuthMode::Kubernetes;
        let client = if needs_cluster {
            Some(
                kube::Client::try_default()
                    .await
                    .context("cannot reach the Kubernetes API")?,
            )
        } else {
            None
        };

        let mut background = tokio::task::JoinSet::new();
        if self.manifests.is_empty() {
            let client = client.clone().expect("a client exists when watching");
            watch::check_crd(&client, &self.namespaces).await?;
            let config = watch::WatchConfig {
                namespaces: self.namespaces.clone(),
                config_map_selector: self.configmap_selector.clone(),
                debounce: Duration::from_millis(self.debounce_ms),
            };
            background.spawn(watch::run(
                client,
                config,
                catalog.clone(),
                synced.clone(),
                shutdown.clone(),
            ));
        } else {
            let mut manifest = Manifest::default();
            for path in &self.manifests {
                manifest.read_path(path)?;
            }
            let (events, problems) = catalog::from_manifest(&manifest);
            for p in &problems {
                tracing::error!(job = %format!("{}/{}", p.namespace, p.job), "{}", p.message);
            }
            catalog.replace(events);
            synced.store(true, Ordering::Release);
        }

        let auth = match self.auth {
            AuthMode::Off => Auth::Off,
            AuthMode::TokenFile => {
                let path = self
                    .token_file
                    .as_ref()
                    .context("--auth token-file needs --token-file")?;
                Auth::Static(
                    StaticTokens::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
            }
            AuthMode::Kubernetes => Auth::Kubernetes(KubernetesAuth::new(
                client.clone().expect("a client exists for Kubernetes auth"),
                self.audience.clone(),
                metrics.clone(),
            )),
        };

        let publisher: Arc<dyn Publisher> = if self.bench_http_ceiling {
            tracing::warn!("benchmark mode: events are neither validated nor kept");
            Arc::new(NullPublisher)
        } else {
            let lazy = Arc::new(LazyPublisher::default());
            let (url, settings, metrics, target, stop) = (
                self.nats.clone(),
                self.publish_settings(),
                metrics.clone(),
                lazy.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(200);
                loop {
                    let connected = JetStreamPublisher::connect(
                        &url,
                        &nats_auth,
                        settings.clone(),
                        metrics.clone(),
                    )
                    .await;
                    match connected {
                        Ok(publisher) => {
                            tracing::info!(%url, identity = %nats_auth, "connected to NATS, state bucket ready");
                            let _ = target.inner.set(publisher);
                            return;
                        }
                        Err(error) => {
                            // The whole chain: "authorization violation" is the cause's text.
                            let error = format!("{:#}", anyhow::Error::from(error));
                            tracing::warn!(%url, identity = %nats_auth, %error, "cannot set up NATS, retrying");
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                    delay = (delay * 2).min(MAX_CONNECT_BACKOFF);
                }
            });
            lazy
        };

        let state = web::Data::new(AppState {
            catalog,
            publisher,
            max_body_bytes: self.max_body_bytes,
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            auth: Arc::new(auth),
            metrics,
            validate: !self.bench_http_ceiling,
            catalog_synced: synced,
            module_uploads: crate::http::module_upload_slots(),
            results_key,
        });
        let public = server::bind(self.listen, self.http_workers, state.clone())
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let admin = server::bind_admin(self.admin_listen, state)
            .with_context(|| format!("cannot listen on {}", self.admin_listen))?;
        tracing::info!(listen = %public.local_addr, admin = %admin.local_addr, "serving");
        let public = tokio::spawn(public.run(shutdown.clone()));
        let admin = tokio::spawn(admin.run(shutdown.clone()));
        run_until_done(background, shutdown.clone()).await;
        shutdown.cancel();
        public
            .await
            .context("the HTTP server task failed")?
            .context("the HTTP server failed")?;
        admin
            .await
            .context("the admin server task failed")?
            .context("the admin server failed")?;
        Ok(())
    }
}

/// Waits for shutdown; a background task ending before it is a failure that stops the process
/// (so Kubernetes restarts it).
async fn run_until_done(mut background: tokio::task::JoinSet<()>, shutdown: CancellationToken) {
    if background.is_empty() {
        shutdown.cancelled().await;
        return;
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = background.join_next() => {
            if !shutdown.is_cancelled() {
                tracing::error!("a background task stopped; shutting down");
            }
        }
    }
}
