//! Running events on this machine through the wasm-exec library: one compiled module per module
//! file, a fresh instance per event, limits per event, output on stdout tagged with the event.
//!
//! [`Modules`] is shared by both local modes: [`LocalExecutor`] drains the in-memory queue, and
//! the durable mode's [`crate::local_backend::LocalBackend`] runs batches from JetStream.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use jobico_apiserver::catalog::EventMap;
use jobico_apiserver::chain::{Routed, Router};
use jobico_common::EventRecord;
use jobico_model::{EventSpec, Manifest};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use wasm_exec::{Capabilities, EnvVar, EventOutcome, Limits, Module, OutputSink, Runtime, Stream};

/// An event type ready to run: its compiled module and the limits from its declaration.
#[derive(Clone)]
struct Prepared {
    module: Module,
    limits: Limits,
    capabilities: Capabilities,
}

/// `(namespace, event name)`.
pub type EventKey = (String, String);

/// An event whose module could not be loaded, and why.
#[derive(Debug)]
pub struct Unloadable {
    /// The event.
    pub key: EventKey,
    /// Why its module cannot run.
    pub reason: String,
}

/// Compiled modules by `(namespace, event)`, with each event's limits and capabilities.
pub struct Modules {
    prepared: HashMap<EventKey, Prepared>,
}

/// Runs the in-memory queue's events through [`Modules`], a bounded number at once.
pub struct LocalExecutor {
    modules: Arc<Modules>,
    parallelism: usize,
    /// Follows each outcome's routes, publishing into the same queue.
    router: Router,
}

/// Where a module's bytes were found.
fn module_bytes(
    dirs: &[PathBuf],
    manifest: &Manifest,
    namespace: &str,
    job: &str,
    spec: &EventSpec,
) -> anyhow::Result<(String, Vec<u8>)> {
    // An uploaded module (`wasm: sha256:<digest>`): the `.wasm` file of a manifest directory
    // with that digest (local mode has no module store).
    if let Some(jobico_model::ModuleRef::Uploaded(digest)) = spec.module_ref() {
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for path in entries.flatten().map(|e| e.path()) {
                if path.extension().is_none_or(|e| e != "wasm") || !path.is_file() {
                    continue;
                }
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if jobico_common::executor::Sha256Digest::of(&bytes) == digest {
                    return Ok((path.display().to_string(), bytes));
                }
            }
        }
        let searched: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
        anyhow::bail!(
            "module {:?} is an uploaded module; in local mode it is the .wasm file with that SHA-256 in a manifest directory, and none of {} has one",
            spec.wasm,
            searched.join(", ")
        );
    }
    for dir in dirs {
        let path = dir.join(&spec.wasm);
        if path.is_file() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            return Ok((path.display().to_string(), bytes));
        }
    }
    // Then the Job's module ConfigMap, as the cluster would mount it.
    let cr = manifest.jobs.iter().find(|j| {
        j.metadata.namespace.as_deref() == Some(namespace)
            && j.metadata.name.as_deref() == Some(job)
    });
    if let Some(cr) = cr {
        let map_name = cr.modules_config_map();
        if let Some(data) = manifest
            .config_map(namespace, &map_name)
            .and_then(|m| m.binary_data.as_ref()?.get(&spec.wasm))
        {
            return Ok((format!("ConfigMap {namespace}/{map_name}"), data.0.clone()));
        }
    }
    let searched: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
    anyhow::bail!(
        "module {:?} not found in {} nor in the Job's module ConfigMap",
        spec.wasm,
        searched.join(", ")
    )
}

/// Limits for an event: the declaration's values over the executor's defaults.
pub fn limits_for(spec: &EventSpec) -> Limits {
    let mut limits = Limits::default();
    if let Some(declared) = &spec.limits {
        if let Some(mib) = declared.memory_mib {
            limits.memory_bytes = u64::from(mib) << 20;
        }
        if let Some(ms) = declared.timeout_millis {
            limits.deadline = Duration::from_millis(ms);
        }
        limits.fuel = declared.fuel.or(limits.fuel);
    }
    limits
}

impl Modules {
    /// Compiles the module of every event in `events`. Events whose module cannot be loaded are
    /// returned with the reason, so the caller can mark them unavailable.
    pub fn prepare(
        runtime: &Runtime,
        events: &EventMap,
        manifest: &Manifest,
        module_dirs: &[PathBuf],
    ) -> (Self, Vec<Unloadable>) {
        let mut compiled: HashMap<Vec<u8>, Module> = HashMap::new();
        let mut prepared = HashMap::new();
        let mut failures = Vec::new();
        let mut keys: Vec<_> = events.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let entry = &events[&key];
            let env = jobico_model::env::resolve(
                &entry.namespace,
                &entry.spec,
                &manifest.env_sources(&entry.namespace, &entry.spec),
            );
            let env = match env {
                Ok(env) => env,
                Err(problems) => {
                    failures.push(Unloadable {
                        key,
                        reason: problems.join("; "),
                    });
                    continue;
                }
            };
            let loaded = module_bytes(module_dirs, manifest, &entry.namespace, &entry.job, &entry.spec)
                .and_then(|(origin, bytes)| {
                    if let Some(module) = compiled.get(&bytes) {
                        return Ok(module.clone());
                    }
                    let module = runtime
                        .load_bytes(&entry.spec.wasm, &bytes)
                        .with_context(|| format!("cannot load module {:?} from {origin}", entry.spec.wasm))?;
                    tracing::info!(module = %entry.spec.wasm, %origin, abi = ?module.abi(), "module compiled");
                    compiled.insert(bytes, module.clone());
                    Ok(module)
                });
            match loaded {
                Ok(module) => {
                    let capabilities = Capabilities {
                        env: env
                            .into_iter()
                            .map(|(name, value)| EnvVar { name, value })
                            .collect(),
                        // Routes hand on a WASI command's standard output.
                        stdout_result: entry.spec.hands_on_outcomes(),
                        ..Capabilities::default()
                    };
                    prepared.insert(
                        key,
                        Prepared {
                            module,
                            limits: limits_for(&entry.spec),
                            capabilities,
                        },
                    );
                }
                Err(error) => failures.push(Unloadable {
                    key,
                    reason: format!("{error:#}"),
                }),
            }
        }
        (Self { prepared }, failures)
    }

    /// Whether event `event` of `namespace` has a module ready to run.
    pub fn contains(&self, namespace: &str, event: &str) -> bool {
        self.prepared
            .contains_key(&(namespace.to_owned(), event.to_owned()))
    }

    /// Runs one event and prints its output, then how it ended, each line tagged
    /// `[namespace/event id]`. Blocks: call it from a blocking thread. `None` when the event
    /// has no module prepared.
    pub fn run(&self, record: &EventRecord) -> Option<EventOutcome> {
        let p = self
            .prepared
            .get(&(record.namespace.clone(), record.event.clone()))?;
        let tag = format!("{}/{} {}", record.namespace, record.event, record.id);
        let outcome = p.module.run(
            &record.to_exec(),
            &p.limits,
            &p.capabilities,
            &mut TaggedStdout { tag: &tag },
        );
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{tag}] {}", describe(&outcome));
        let _ = out.flush();
        Some(outcome)
    }
}

impl LocalExecutor {
    /// An executor running at most `parallelism` events at once (at least one), following
    /// their routes with `router`.
    pub fn new(modules: Arc<Modules>, parallelism: usize, router: Router) -> Self {
        Self {
            modules,
            parallelism: parallelism.max(1),
            router,
        }
    }

    /// Runs events from `queue` until it is closed and empty, at most `parallelism` at once.
    /// When `shutdown` fires the queue is closed to new events and what is in it still runs.
    pub async fn run(self, mut queue: mpsc::Receiver<EventRecord>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.parallelism));
        loop {
            let record = tokio::select! {
                record = queue.recv() => record,
                _ = shutdown.cancelled() => {
                    queue.close();
                    queue.recv().await
                }
            };
            let Some(record) = record else { break };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let modules = self.modules.clone();
            let router = self.router.clone();
            tokio::spawn(async move {
                let ran = tokio::task::spawn_blocking(move || {
                    let outcome = modules.run(&record);
                    if outcome.is_none() {
                        // Cannot happen: the ingress only accepts events whose module is
                        // prepared.
                        tracing::error!(event = %format!("{}/{} {}", record.namespace, record.event, record.id),
                            "no module prepared for this event; event dropped");
                    }
                    drop(permit);
                    outcome.map(|outcome| (record, outcome))
                })
                .await;
                if let Ok(Some((record, outcome))) = ran {
                    let event = (record.namespace.as_str(), record.event.as_str());
                    follow_routes(&router, event, &outcome, ROUTE_RETRY).await;
                }
            });
        }
        // Wait for the events still running.
        let _ = permits.acquire_many(self.parallelism as u32).await;
    }
}

/// Prints guest output to stdout, each line tagged `[namespace/event id]`.
struct TaggedStdout<'a> {
    tag: &'a str,
}

impl OutputSink for TaggedStdout<'_> {
    fn line(&mut self, _event_id: &str, stream: Stream, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{}] {}: {line}", self.tag, stream);
    }

    /// `[`, `] `, `: ` and the newline around the tag, stream and line.
    fn framing(&self, _event_id: &str) -> usize {
        self.tag.len() + 6
    }
}

/// Follows `outcome`'s routes (of event `namespace/event`) until the publisher keeps them,
/// waiting `pause` between attempts (a full in-memory queue drains, NATS reconnects): the
/// event has run, and its routed events must not be lost (nor published twice: their ids are
/// derived). Prints what the routes did and returns it.
pub async fn follow_routes(
    router: &Router,
    (namespace, event): (&str, &str),
    outcome: &EventOutcome,
    pause: Duration,
) -> Routed {
    let mut warned = false;
    loop {
        match router.follow(namespace, event, outcome).await {
            Ok(routed) => {
                print_routed(namespace, event, outcome, &routed);
                return routed;
            }
            Err(error) => {
                if !warned {
                    tracing::warn!(id = %outcome.id, %error, "ran, but cannot publish its routed events yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Pause before queueing routed events again when the queue is full.
const ROUTE_RETRY: Duration = Duration::from_millis(200);

/// Prints one line per route followed, tagged like the event's output:
/// `[ns/order id] routed to invoice <child id>` or `... route to alert refused: <why>`.
fn print_routed(namespace: &str, event: &str, outcome: &EventOutcome, routed: &Routed) {
    let tag = format!("{namespace}/{event} {}", outcome.id);
    let mut out = std::io::stdout().lock();
    for child in &routed.children {
        let _ = writeln!(out, "[{tag}] routed to {} {}", child.event, child.id);
    }
    for failure in &routed.failures {
        let _ = writeln!(
            out,
            "[{tag}] {} (dead-lettered as {})",
            failure.reason, failure.id
        );
    }
    let _ = out.flush();
}

/// One line saying how an event ended.
pub fn describe(outcome: &EventOutcome) -> String {
    let millis = outcome.duration.as_secs_f64() * 1000.0;
    if outcome.succeeded() {
        return format!("succeeded in {millis:.1} ms");
    }
    let kind = outcome
        .error
        .and_then(|k| serde_json::to_value(k).ok()?.as_str().map(String::from))
        .unwrap_or_else(|| "error".into());
    let code = outcome
        .exit_code
        .map(|c| format!(", code {c}"))
        .unwrap_or_default();
    let message = outcome.message.as_deref().unwrap_or("");
    format!("failed ({kind}{code}) in {millis:.1} ms: {message}")
}

/// The module directories to search, ignoring ones that do not exist.
pub fn existing_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter(|d| Path::new(d).is_dir())
        .cloned()
        .collect()
}
