//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never dispatch the
//! same consumer. The leader renews the Lease every [`LeaseConfig::renew`]; a standby takes it
//! over once its `renewTime` is older than `leaseDurationSeconds`. Every write is a create or a
//! replace carrying the read `resourceVersion`, so two candidates can never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta};
use tokio_util::sync::CancellationToken;

use crate::kubernetes::post_params;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the dispatcher's own).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the leader renews; well under `duration` so one slow renewal is survivable.
    pub renew: Duration,
    /// How often a standby tries to take the lease.
    pub retry: Duration,
}

impl LeaseConfig {
    /// Kubernetes' own controller-manager timings: 15 s lease, renew every 5 s, retry every 2 s.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            retry: Duration::from_secs(2),
        }
    }
}

/// The Lease cannot be created: its namespace does not exist (run out of cluster, or with a
/// `--lease-namespace` that names no namespace). Retrying would wait forever.
#[derive(Debug, thiserror::Error)]
#[error(
    "the namespace {namespace} of the leader Lease does not exist: create it (`kubectl create namespace {namespace}`) or pass --lease-namespace (JOBICO_LEASE_NAMESPACE) naming the dispatcher's own namespace"
)]
pub struct NoLeaseNamespace {
    /// The namespace asked for.
    pub namespace: String,
}

/// Whether a create failed because its namespace does not exist (the API server answers 404
/// `namespaces "<ns>" not found`; nothing else makes a create 404).
fn namespace_missing(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// Why one attempt on the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The Lease's namespace does not exist (not worth retrying).
    #[error(transparent)]
    NoNamespace(NoLeaseNamespace),
    /// Any other API failure (tried again).
    #[error(transparent)]
    Kube(kube::Error),
}

/// Takes and keeps the Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .finish()
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    /// An elector for `config` through `client`.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// One attempt to take or renew the Lease. `Ok(true)` when this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, AcquireError> {
        let me = &self.config.identity;
        let duration = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let current = match self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(AcquireError::Kube)?
        {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now()),
                        renew_time: Some(now()),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&post_params(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                    Err(e) if namespace_missing(&e) => {
                        Err(AcquireError::NoNamespace(NoLeaseNamespace {
                            namespace: self.config.namespace.clone(),
                        }))
                    }
                    Err(e) => Err(AcquireError::Kube(e)),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let mine = holder == me;
        if !mine && !holder.is_empty() {
            let valid_for =
                Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(0) as u64);
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let expired = match renewed {
                Some(at) => {
                    let age = jiff::Timestamp::now().duration_since(at);
                    age.as_secs_f64() > valid_for.as_secs_f64()
                }
                None => true,
            };
            if !expired {
                return Ok(false);
            }
        }
        let mut lease = current;
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !mine {
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now());
        // `replace` sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &post_params(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(AcquireError::Kube(e)),
        }
    }

    /// Waits until this replica holds the Lease; `Ok(false)` if `shutdown` came first. A Lease
    /// namespace that does not exist is an error at once, saying how to fix it.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> Result<bool, NoLeaseNamespace> {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(
                        lease = self.config.name,
                        identity = self.config.identity,
                        "became leader"
                    );
                    return Ok(true);
                }
                Ok(false) => {}
                Err(AcquireError::NoNamespace(missing)) => return Err(missing),
                Err(AcquireError::Kube(error)) => {
                    tracing::warn!(%error, "cannot read or write the lease")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.config.retry) => {}
            }
        }
    }

    /// Renews the Lease until `shutdown` or until it is lost (returns at once: the caller must
    /// stop dispatching). Returns whether leadership was lost. On shutdown the Lease is kept:
    /// the caller drains, then calls [`Elector::release`].
    pub async fn hold(&self, shutdown: &CancellationToken) -> bool {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.config.renew) => {}
            }
            match self.try_acquire().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(
                        lease = self.config.name,
                        "lost the lease to another replica"
                    );
                    return true;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the lease");
                    // Stop before another replica may take over.
                    if last_renewal.elapsed() + self.config.renew >= self.config.duration {
                        tracing::error!(lease = self.config.name, "lease not renewed in time");
                        return true;
                    }
                }
            }
        }
    }

    /// Gives the Lease up (best effort) so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(error) = self
            .api
            .replace(&self.config.name, &post_params(), &lease)
            .await
        {
            tracing::debug!(%error, "cannot release the lease; it expires by itself");
        }
    }
}
