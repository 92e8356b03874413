//! `jobico up`: local mode.
//!
//! The same ingress as in a cluster (catalog, schema validation, error shapes), with the
//! dispatcher's Kubernetes backend replaced by the local executor. By default JetStream is
//! replaced by a bounded in-memory queue: events accepted but not yet run are lost if the
//! process is killed. With `--nats URL` events go through JetStream and the dispatcher's
//! consumers ([`crate::durable`]), so they survive a crash.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context;
use clap::Args;
use jobico_apiserver::auth::{Auth, StaticTokens};
use jobico_apiserver::chain::Router;
use jobico_apiserver::http::DEFAULT_MAX_BODY_BYTES;
use jobico_apiserver::{AppState, Catalog, MemoryQueue, Publisher, catalog, server};
use jobico_dispatcher::sinks::SinkSettings;

use crate::local_sinks::DirectSinks;
use jobico_dispatcher::consumer::ACK_WAIT;
use jobico_model::Manifest;
use jobico_store::NatsAuthArgs;

use crate::durable;
use crate::embedded;
use crate::local_exec::{LocalExecutor, Modules, existing_dirs};

/// Where local mode looks for manifests and modules unless told otherwise.
const DEFAULT_DIR: &str = "samples";

/// Events the in-memory queue holds before the ingress answers 503; enough to absorb bursts of
/// a few hundred requests while the executor catches up, small enough to lose little on a crash.
const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Flags of `jobico up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Manifest file or directory (ConfigMaps and Job resources, multi-document YAML); repeat
    /// for more. Default: ./samples, or the built-in samples when that does not exist.
    #[arg(long = "manifests", env = "JOBICO_MANIFESTS", value_delimiter = ',')]
    pub manifests: Vec<PathBuf>,
    /// Directory holding the modules named by the Job resources; repeat for more. A module not
    /// found there is taken from the Job's module ConfigMap. Default: the manifest directories.
    #[arg(long = "modules", env = "JOBICO_MODULES", value_delimiter = ',')]
    pub modules: Vec<PathBuf>,
    /// Address of the HTTP API.
    #[arg(long, env = "JOBICO_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Events held in memory between the ingress and the executor.
    #[arg(long, env = "JOBICO_QUEUE_CAPACITY", default_value_t = DEFAULT_QUEUE_CAPACITY)]
    pub queue_capacity: usize,
    /// Largest request body in bytes.
    #[arg(long, env = "JOBICO_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Events run at once (0: one per CPU core).
    #[arg(long, env = "JOBICO_EXECUTORS", default_value_t = 0)]
    pub executors: usize,
    /// File of accepted bearer tokens (one per line, optionally followed by the namespaces it
    /// may use, comma separated). Without it anyone may send events.
    #[arg(long, env = "JOBICO_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// HTTP worker threads (0: one per CPU core).
    #[arg(long, env = "JOBICO_HTTP_WORKERS", default_value_t = 0)]
    pub http_workers: usize,
    /// Durable local mode: keep accepted events and their states in NATS JetStream at this
    /// URL (e.g. nats://127.0.0.1:4222, a `nats-server -js`) instead of in memory, and run
    /// each at least once, surviving a crash of this process.
    #[arg(long = "nats", env = "JOBICO_NATS_URL", value_name = "URL")]
    pub nats: Option<String>,
    /// With --nats: how to authenticate to it.
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// With --nats: seconds an event may stay unacknowledged before NATS hands it out again;
    /// how soon events a crashed process was running are run again after a restart. Applied
    /// to each event type's consumer in NATS at start.
    #[arg(long, env = "JOBICO_ACK_WAIT_SECS", default_value_t = ACK_WAIT.as_secs(), requires = "nats")]
    pub ack_wait_secs: u64,
    /// Compiled modules kept between starts, keyed by the module's digest and the runtime's
    /// version, configuration and CPU (wasm-exec's cache: an entry loads only if its MAC
    /// verifies and the directory is this user's alone). Default: $XDG_CACHE_HOME/jobico/modules,
    /// else ~/.cache/jobico/modules.
    #[arg(long, env = "JOBICO_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile every module at each start, keeping nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

/// Where `jobico up` keeps compiled modules unless told otherwise.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("jobico").join("modules"))
}

/// Runs local mode until SIGTERM or Ctrl-C.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: UpArgs) -> anyhow::Result<()> {
    // Before anything else: credentials without a server, or files that cannot be read.
    if args.nats.is_none() && args.nats_auth.is_set() {
        anyhow::bail!("the --nats-* credential and TLS flags need --nats URL");
    }
    let nats_auth = args.nats_auth.load()?;
    let mut _extracted = None;
    let manifests = if !args.manifests.is_empty() {
        args.manifests.clone()
    } else if std::path::Path::new(DEFAULT_DIR).is_dir() {
        vec![PathBuf::from(DEFAULT_DIR)]
    } else {
        let dir = embedded::extract().context("cannot unpack the built-in samples")?;
        tracing::info!(dir = %dir.path().display(), "no ./samples here, using the built-in samples");
        let path = dir.path().to_path_buf();
        _extracted = Some(dir);
        vec![path]
    };
    let module_dirs = if args.modules.is_empty() {
        manifests.iter().filter(|p| p.is_dir()).cloned().collect()
    } else {
        args.modules.clone()
    };

    let mut manifest = Manifest::default();
    for path in &manifests {
        manifest.read_path(path)?;
    }
    let (events, problems) = catalog::from_manifest(&manifest);
    for p in &problems {
        tracing::error!(job = %format!("{}/{}", p.namespace, p.job), "{}", p.message);
    }
    if events.is_empty() {
        anyhow::bail!(
            "no usable events in {}: add Job resources (see samples/ev1.yaml)",
            manifests
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let parallelism = match args.executors {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let cache_dir = match (args.no_cache, &args.cache_dir) {
        (true, _) => None,
        (false, Some(dir)) => Some(dir.clone()),
        (false, None) => default_cache_dir(),
    };
    if let Some(dir) = &cache_dir {
        tracing::info!(dir = %dir.display(), "compiled modules are cached");
    }
    let runtime = wasm_exec::Runtime::new(wasm_exec::RuntimeConfig {
        cache_dir,
        ..wasm_exec::RuntimeConfig::default()
    })
    .context("cannot start the WebAssembly runtime")?;
    let (modules, failures) = tokio::task::block_in_place(|| {
        Modules::prepare(&runtime, &events, &manifest, &existing_dirs(&module_dirs))
    });
    let modules = Arc::new(modules);
    let catalog = Arc::new(Catalog::new());
    catalog.replace(events.clone());
    for failure in failures {
        let (namespace, event) = &failure.key;
        tracing::error!(event = %format!("{namespace}/{event}"), "{}", failure.reason);
        catalog.set_unavailable(namespace, event, failure.reason);
    }

    let shutdown = jobico_common::shutdown::on_signals();
    let (publisher, worker, mode): (Arc<dyn Publisher>, _, _) = match &args.nats {
        None => {
            let (queue, receiver) = MemoryQueue::new(args.queue_capacity);
            let sinks = DirectSinks::new(queue.clone(), SinkSettings::default());
            let router = Router::new(catalog.clone(), Arc::new(sinks));
            let executor = LocalExecutor::new(modules, parallelism, router);
            let worker = tokio::spawn(executor.run(receiver, shutdown.clone()));
            let mode =
                "in-memory queue: accepted events not yet run are lost if this process is killed"
                    .to_owned();
            (Arc::new(queue), worker, mode)
        }
        Some(url) => {
            let ack_wait = Duration::from_secs(args.ack_wait_secs);
            let nats = durable::Nats {
                url,
                auth: &nats_auth,
                ack_wait,
            };
            let durable = durable::start(
                nats,
                &manifest,
                &catalog,
                modules,
                parallelism,
                shutdown.clone(),
            )
            .await?;
            let mode = format!(
                "durable: events kept in NATS at {url} (as {nats_auth}), each run at least once"
            );
            (durable.publisher, durable.drained, mode)
        }
    };
    let mut state = AppState::new(catalog.clone(), publisher, args.max_body_bytes);
    if let Some(path) = &args.token_file {
        let tokens = StaticTokens::read(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        state.auth = Arc::new(Auth::Static(tokens));
        tracing::info!(file = %path.display(), "bearer tokens required");
    }
    let state = web::Data::new(state);
    let bound = server::bind(args.listen, args.http_workers, state)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut names: Vec<_> = catalog
        .snapshot()
        .values()
        .map(|e| (e.namespace.clone(), e.spec.name.clone(), e.schema.is_ok()))
        .collect();
    names.sort();
    for (namespace, event, ready) in names {
        let url = format!("http://{}/execute/{namespace}/{event}", bound.local_addr);
        if ready {
            tracing::info!("accepting PUT {url}");
        } else {
            tracing::warn!("unavailable: {url}");
        }
    }
    tracing::info!(listen = %bound.local_addr, "local mode ready ({mode})");

    let served = bound.run(shutdown.clone()).await;
    shutdown.cancel();
    worker.await.context("the executor task failed")?;
    served.context("the HTTP server failed")
}
