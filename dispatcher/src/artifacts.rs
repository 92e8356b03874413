//! Compiled modules: each module compiled once, by the dispatcher, never in every pod.
//!
//! When the module check before a batch reads an event's module, [`Artifacts::request`]
//! returns the module's artifact if it is compiled, and otherwise starts compiling it (once per
//! module digest and engine, one compilation at a time, off the async threads) while that
//! batch's pod compiles the module itself. The code is compiled by wasm-exec's own library for
//! the architecture's baseline (any node of it can load it) and kept in the JetStream object
//! store [`BUCKET`] under `<module sha256>.<engine tag>`, so other replicas and later
//! processes find it instead of compiling again.
//!
//! Executor pods have no NATS credentials: they fetch the code from this process's artifact
//! server ([`serve`]), `GET /v1/artifacts/<namespace>/<name>` with a bearer token that grants
//! that namespace that artifact ([`Signer::artifact_token`]). The Job names the artifact's
//! SHA-256 and the module's (see [`jobico_common::executor`]), written by the dispatcher after
//! the template renders; the executor loads the code only when both match. So neither a tenant
//! nor anyone who can reach the server can make a pod load code the dispatcher did not compile
//! from that pod's own module.
//!
//! Uploaded modules (a resource's `wasm: sha256:<digest>`, kept by the ingress in
//! [`jobico_store::modules`]: too large for a ConfigMap, so no volume carries them) are served
//! by the same server under `<namespace>/<digest>.wasm`, with a token of their own
//! ([`Artifacts::uploaded`]): a pod downloads one only when it has no artifact to load.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use jobico_common::executor::{ArtifactRef, Sha256Digest, UploadedModuleRef};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use crate::trust::Signer;

/// The JetStream object store of compiled modules (its stream is `OBJ_jobico-artifacts`).
pub const BUCKET: &str = "jobico-artifacts";
/// The artifact server's path prefix: `/v1/artifacts/<namespace>/<name>`.
pub const PATH_PREFIX: &str = "/v1/artifacts/";
/// Longest `--artifacts-url`: the template check counts the artifact variables at this size
/// against the `execve` bound.
pub const MAX_BASE_URL_BYTES: usize = 400;
/// How the server names an uploaded module: `<digest>.wasm` (an artifact's name ends in its
/// engine tag, never `wasm`).
const UPLOADED_SUFFIX: &str = ".wasm";
/// Object metadata key holding the compiled bytes' SHA-256 in hex.
const DIGEST_KEY: &str = "sha256";
/// How long after a failed compilation (or store) it is tried again: a module that does not
/// compile is not retried on every batch.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);
/// How long a known artifact is believed before the store is asked again (it may have aged
/// out or been removed); pods fall back to compiling meanwhile anyway.
const RECHECK_READY_AFTER: Duration = Duration::from_secs(600);
/// Compilations at once: compiling a module keeps a core busy for up to seconds, and the
/// dispatcher's own work must go on beside it.
const CONCURRENT_COMPILATIONS: usize = 1;
/// Downloads served at once: each streams from NATS in 128 KiB chunks, so this bounds the
/// memory and the NATS consumers held; a pod that waits only delays its start.
const CONCURRENT_DOWNLOADS: usize = 32;
/// How long a client may take to send its request head: a connection that sends nothing
/// gives its download slot back this soon.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a download may take before the connection is dropped.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the dispatcher keeps artifacts and how pods reach them.
#[derive(Debug, Clone)]
pub struct ArtifactSettings {
    /// The server's base URL as executor pods reach it (`http://host:port`).
    pub base_url: String,
    /// Most bytes the object store keeps.
    pub max_bytes: i64,
    /// How long an artifact is kept after it was stored.
    pub max_age: Duration,
    /// Replicas of the object store's stream.
    pub replicas: usize,
}

#[derive(Debug, Clone)]
enum Known {
    Compiling,
    Ready { compiled: Compiled, at: Instant },
    Failed { at: Instant },
}

/// The dispatcher's compiled modules.
pub struct Artifacts {
    store: object_store::ObjectStore,
    uploads: jobico_store::ModuleStore,
    base_url: String,
    signer: Signer,
    compiler: wasm_exec::Runtime,
    engine_tag: String,
    known: Mutex<HashMap<Sha256Digest, Known>>,
    compilations: Semaphore,
    compiled: AtomicU64,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("base_url", &self.base_url)
            .field("engine_tag", &self.engine_tag)
            .finish_non_exhaustive()
    }
}

/// A compiled module found or made for a batch: which module, which object, which bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// SHA-256 of the module.
    pub module: Sha256Digest,
    /// The object's name in [`BUCKET`].
    pub name: String,
    /// SHA-256 of the compiled bytes.
    pub digest: Sha256Digest,
}

impl Artifacts {
    /// Opens (or creates) the object store and the compiler.
    pub async fn open(
        js: &jetstream::Context,
        signer: Signer,
        settings: &ArtifactSettings,
    ) -> anyhow::Result<Self> {
        let store = match js.get_object_store(BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.into(),
                    description: Some("Jobico: modules compiled by the dispatcher".into()),
                    max_bytes: settings.max_bytes,
                    max_age: settings.max_age,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the object store {BUCKET}: {e}"))?,
        };
        let uploads = jobico_store::ModuleStore::open(js, settings.replicas).await?;
        let compiler = wasm_exec::Runtime::new(wasm_exec::RuntimeConfig {
            max_concurrent_instances: 1,
            portable: true,
            ..wasm_exec::RuntimeConfig::default()
        })?;
        Ok(Self {
            store,
            uploads,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            signer,
            engine_tag: compiler.compatibility_tag(),
            compiler,
            known: Mutex::new(HashMap::new()),
            compilations: Semaphore::new(CONCURRENT_COMPILATIONS),
            compiled: AtomicU64::new(0),
        })
    }

    /// The artifact of `module` if it is compiled; otherwise starts compiling it in the
    /// background (once) and returns `None`, so that this batch's pod compiles it itself.
    pub fn request(self: &Arc<Self>, module: &[u8]) -> Option<Compiled> {
        let bytes = module.to_vec();
        self.request_digest(Sha256Digest::of(module), async move { Ok(bytes) })
    }

    /// [`Artifacts::request`] for module `module` uploaded to `namespace` (see
    /// [`Artifacts::uploaded`]): its bytes are read from the module store only when it must be
    /// compiled. The caller has checked the upload exists.
    pub fn request_uploaded(
        self: &Arc<Self>,
        namespace: &str,
        module: Sha256Digest,
    ) -> Option<Compiled> {
        let (uploads, namespace) = (self.uploads.clone(), namespace.to_owned());
        self.request_digest(module, async move {
            uploads
                .get(&namespace, module)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("module sha256:{module} is not uploaded to {namespace}"))
        })
    }

    /// The artifact of the module whose digest is `digest` if it is compiled; otherwise starts
    /// compiling it (once), with its bytes from `bytes`, and returns `None`.
    fn request_digest(
        self: &Arc<Self>,
        digest: Sha256Digest,
        bytes: impl std::future::Future<Output = Result<Vec<u8>, String>> + Send + 'static,
    ) -> Option<Compiled> {
        let mut known = self.known.lock().expect("artifacts lock");
        match known.get(&digest) {
            Some(Known::Ready { compiled, at }) if at.elapsed() < RECHECK_READY_AFTER => {
                return Some(compiled.clone());
            }
            Some(Known::Compiling) => return None,
            Some(Known::Failed { at }) if at.elapsed() < RETRY_FAILED_AFTER => return None,
            // Unknown, failed long enough ago, or to be checked again: (re)start.
            _ => {}
        }
        let previous = known.insert(digest, Known::Compiling);
        drop(known);
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.find_or_compile(digest, bytes).await;
            let entry = match outcome {
                Ok(compiled) => Known::Ready {
                    compiled,
                    at: Instant::now(),
                },
                Err(reason) => {
                    tracing::warn!(module = ?digest, reason, "cannot make the module's artifact; its pods compile it");
                    Known::Failed { at: Instant::now() }
                }
            };
            this.known
                .lock()
                .expect("artifacts lock")
                .insert(digest, entry);
        });
        // A recheck keeps using the artifact believed so far while the store is asked.
        match previous {
            Some(Known::Ready { compiled, .. }) => Some(compiled),
            _ => None,
        }
    }

    /// Modules this process has compiled (not those it found in the store).
    pub fn compilations(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// What a Job of `namespace` carries to load `compiled`.
    pub fn reference(&self, namespace: &str, compiled: &Compiled) -> ArtifactRef {
        ArtifactRef {
            url: format!(
                "{}{PATH_PREFIX}{namespace}/{}",
                self.base_url, compiled.name
            ),
            digest: compiled.digest,
            module: compiled.module,
            token: self.signer.artifact_token(namespace, &compiled.name),
        }
    }

    /// What a Job of `namespace` carries to fetch its uploaded module `module`.
    pub fn uploaded(&self, namespace: &str, module: Sha256Digest) -> UploadedModuleRef {
        let name = format!("{module}{UPLOADED_SUFFIX}");
        UploadedModuleRef {
            url: format!("{}{PATH_PREFIX}{namespace}/{name}", self.base_url),
            digest: module,
            token: self.signer.artifact_token(namespace, &name),
        }
    }

    /// Whether module `module` was uploaded to `namespace`.
    pub async fn is_uploaded(
        &self,
        namespace: &str,
        module: Sha256Digest,
    ) -> Result<bool, jobico_store::ModuleStoreError> {
        self.uploads.exists(namespace, module).await
    }

    /// The object name of `module`'s code for this engine.
    fn name(&self, module: Sha256Digest) -> String {
        format!("{module}.{}", self.engine_tag)
    }

    /// The stored artifact of `module`, or a new one compiled and stored.
    async fn find_or_compile(
        &self,
        module: Sha256Digest,
        bytes: impl std::future::Future<Output = Result<Vec<u8>, String>>,
    ) -> Result<Compiled, String> {
        let name = self.name(module);
        match self.store.info(&name).await {
            Ok(info) => {
                if let Some(digest) = info.metadata.get(DIGEST_KEY) {
                    let digest = Sha256Digest::parse(digest)?;
                    tracing::debug!(name, "artifact found in the store");
                    return Ok(Compiled {
                        module,
                        name,
                        digest,
                    });
                }
            }
            Err(error) if error.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(error) => return Err(format!("looking up {name}: {error}")),
        }
        let _permit = self
            .compilations
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let bytes = bytes.await?;
        let compiler = self.compiler.clone();
        let started = Instant::now();
        let code = tokio::task::spawn_blocking(move || compiler.precompile("module.wasm", &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("compiling: {:#}", anyhow::Error::new(e)))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256Digest::of(&code);
        let metadata = object_store::ObjectMetadata {
            name: name.clone(),
            description: Some(format!("module sha256:{module}")),
            metadata: HashMap::from([(DIGEST_KEY.to_owned(), digest.to_string())]),
            ..Default::default()
        };
        self.store
            .put(metadata, &mut code.as_slice())
            .await
            .map_err(|e| format!("storing {name}: {e}"))?;
        tracing::info!(
            name,
            bytes = code.len(),
            compile_ms = started.elapsed().as_millis() as u64,
            "module compiled into an artifact"
        );
        Ok(Compiled {
            module,
            name,
            digest,
        })
    }

    /// Serves executor pods on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let downloads = Arc::new(Semaphore::new(CONCURRENT_DOWNLOADS));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "artifact server accept failed");
                        continue;
                    }
                },
            };
            let (this, downloads) = (self.clone(), downloads.clone());
            tokio::spawn(async move {
                let Ok(_permit) = downloads.acquire_owned().await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.answer(&request, peer).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let _ = tokio::time::timeout(DOWNLOAD_TIMEOUT, connection).await;
            });
        }
    }

    async fn answer(&self, request: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let refuse = |status: StatusCode, message: &str| {
            tracing::debug!(%peer, path = request.uri().path(), status = status.as_u16(), message, "artifact request refused");
            text(status, message)
        };
        if request.method() != hyper::Method::GET {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        }
        let Some((namespace, name)) = request
            .uri()
            .path()
            .strip_prefix(PATH_PREFIX)
            .and_then(|rest| rest.split_once('/'))
        else {
            return refuse(StatusCode::NOT_FOUND, "no such path");
        };
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !self.signer.verify_artifact_token(namespace, name, token) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "the token does not grant this namespace this artifact",
            );
        }
        if let Some(module) = name.strip_suffix(UPLOADED_SUFFIX) {
            let Ok(module) = Sha256Digest::parse(module) else {
                return refuse(StatusCode::NOT_FOUND, "no such module");
            };
            // Streamed, like artifacts: the executor checks the digest of what it receives.
            return match self.uploads.reader(namespace, module).await {
                Ok(Some((object, size))) => streamed("application/wasm", size, object),
                Ok(None) => refuse(StatusCode::NOT_FOUND, "no such uploaded module"),
                Err(error) => {
                    tracing::warn!(name, %error, "cannot read an uploaded module");
                    refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the module store did not answer",
                    )
                }
            };
        }
        match self.store.get(name).await {
            Ok(object) => {
                let size = object.info().size;
                streamed("application/octet-stream", size, object)
            }
            Err(error) if error.kind() == object_store::GetErrorKind::NotFound => refuse(
                StatusCode::NOT_FOUND,
                "no such artifact (the pod compiles the module)",
            ),
            Err(error) => {
                tracing::warn!(name, %error, "cannot read an artifact");
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the artifact store did not answer",
                )
            }
        }
    }
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A 200 streaming `size` bytes of `object` out of the store.
fn streamed(
    content_type: &'static str,
    size: usize,
    object: object_store::Object,
) -> Response<Body> {
    let stream = ReaderStream::new(object).map_ok(Frame::data);
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CONTENT_LENGTH, size)
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .expect("a valid response")
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain")
        .body(
            Full::new(Bytes::from(format!("{message}\n")))
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}
