//! Who may send events: off, a static token file, or Kubernetes bearer tokens.
//!
//! Kubernetes mode checks `Authorization: Bearer <token>` with a TokenReview (audience
//! [`DEFAULT_AUDIENCE`] unless configured) and then a SubjectAccessReview: group
//! `jobico.coeux.dev`, resource `jobs`, subresource `execute`, verb `create`, in the event's
//! namespace, on the Job resource that declares the event. Status reads ask for verb `get` on
//! the subresource `events`, namespace-wide. Decisions (allowed or denied) are cached for
//! [`DECISION_TTL`] by token hash, so a busy client costs the Kubernetes API a few calls a
//! minute, and a revoked token or role stops working within that time.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// The token audience we ask TokenReview to check: tokens minted for other services are refused.
pub const DEFAULT_AUDIENCE: &str = "jobico.coeux.dev";
/// API group of the Job resource.
pub const GROUP: &str = "jobico.coeux.dev";
/// How long a decision is reused: short enough that revocations bite quickly.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Most cached decisions; beyond, expired entries are dropped, then everything. Each entry is
/// ~100 bytes, so this bounds the cache near 1 MiB even under a flood of distinct tokens.
const MAX_CACHED_DECISIONS: usize = 10_000;
/// Retry hint when the Kubernetes API cannot be asked.
const AUTH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a request wants to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Access {
    /// Namespace.
    pub namespace: String,
    /// Name of the Job resource, when known.
    pub name: Option<String>,
    /// Kubernetes verb (`create` to send events, `get` to read states).
    pub verb: &'static str,
    /// Subresource of `jobs` (`execute` or `events`).
    pub subresource: &'static str,
}

impl Access {
    /// Sending events to an event of the Job resource `job`.
    pub fn execute(namespace: &str, job: Option<&str>) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: job.map(str::to_string),
            verb: "create",
            subresource: "execute",
        }
    }

    /// Reading event states in a namespace.
    pub fn read_states(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: None,
            verb: "get",
            subresource: "events",
        }
    }
}

/// Tokens read from a file: one per line, optionally followed by whitespace and a
/// comma-separated list of the namespaces it may use (all when absent). `#` starts a comment.
#[derive(Debug, Clone, Default)]
pub struct StaticTokens {
    tokens: HashMap<String, Option<HashSet<String>>>,
}

impl StaticTokens {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Self {
        let tokens = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default().trim())
            .filter(|line| !line.is_empty())
            .map(|line| {
                let mut parts = line.split_whitespace();
                let token = parts.next().unwrap_or_default().to_string();
                let namespaces = parts
                    .next()
                    .map(|list| list.split(',').map(str::to_string).collect());
                (token, namespaces)
            })
            .collect();
        Self { tokens }
    }

    /// Reads a token file.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    fn allows(&self, token: &str, namespace: &str) -> Option<bool> {
        self.tokens
            .get(token)
            .map(|namespaces| namespaces.as_ref().is_none_or(|n| n.contains(namespace)))
    }
}

/// A cached decision's key: the SHA-256 of the token (never the token itself) and the access.
type CacheKey = ([u8; 32], Access);

/// Kubernetes TokenReview + SubjectAccessReview with a short decision cache.
pub struct KubernetesAuth {
    client: Client,
    audience: String,
    cache: Mutex<HashMap<CacheKey, (Decision, Instant)>>,
    metrics: Metrics,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Unauthenticated,
    Denied,
    Allowed,
}

impl KubernetesAuth {
    /// Checks tokens against the cluster behind `client`.
    pub fn new(client: Client, audience: String, metrics: Metrics) -> Self {
        Self {
            client,
            audience,
            cache: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn cached(&self, key: &CacheKey) -> Option<Decision> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < DECISION_TTL)
            .map(|(decision, _)| *decision)
    }

    fn remember(&self, key: CacheKey, decision: Decision) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_DECISIONS {
            cache.retain(|_, (_, at)| at.elapsed() < DECISION_TTL);
            if cache.len() >= MAX_CACHED_DECISIONS {
                cache.clear();
            }
        }
        cache.insert(key, (decision, Instant::now()));
    }

    async fn decide(&self, token: &str, access: &Access) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let review = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = review.status.unwrap_or_default();
        let user: UserInfo = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => return Ok(Decision::Unauthenticated),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_string()),
                    resource: Some("jobs".to_string()),
                    subresource: Some(access.subresource.to_string()),
                    verb: Some(access.verb.to_string()),
                    namespace: Some(access.namespace.clone()),
                    name: access.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let review = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        Ok(match review.status {
            Some(status) if status.allowed => Decision::Allowed,
            _ => Decision::Denied,
        })
    }
}

/// How requests are authenticated.
pub enum Auth {
    /// Everyone may do everything (local mode's default).
    Off,
    /// Tokens from a file.
    Static(StaticTokens),
    /// Kubernetes tokens and RBAC.
    Kubernetes(KubernetesAuth),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Off => "Auth::Off",
            Auth::Static(_) => "Auth::Static",
            Auth::Kubernetes(_) => "Auth::Kubernetes",
        })
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Auth {
    /// Whether requests are checked at all.
    pub fn is_on(&self) -> bool {
        !matches!(self, Auth::Off)
    }

    /// Checks that the holder of `authorization` (the header value) may do `access`.
    pub async fn check(
        &self,
        authorization: Option<&str>,
        access: &Access,
    ) -> Result<(), ApiError> {
        if let Auth::Off = self {
            return Ok(());
        }
        let Some(token) = bearer(authorization) else {
            return Err(ApiError::Unauthorized(
                "send a bearer token: Authorization: Bearer <token>".into(),
            ));
        };
        let decision = match self {
            Auth::Off => Decision::Allowed,
            Auth::Static(tokens) => match tokens.allows(token, &access.namespace) {
                None => Decision::Unauthenticated,
                Some(false) => Decision::Denied,
                Some(true) => Decision::Allowed,
            },
            Auth::Kubernetes(kube) => {
                let key = (Sha256::digest(token.as_bytes()).into(), access.clone());
                match kube.cached(&key) {
                    Some(decision) => {
                        kube.metrics.auth_cache_hits.inc();
                        decision
                    }
                    None => {
                        let decision = kube.decide(token, access).await.map_err(|error| {
                            tracing::warn!(%error, "cannot check a token with the Kubernetes API");
                            ApiError::Unavailable {
                                reason: "cannot check the token with the Kubernetes API".into(),
                                retry_after: AUTH_RETRY_AFTER,
                            }
                        })?;
                        kube.remember(key, decision);
                        decision
                    }
                }
            }
        };
        match decision {
            Decision::Allowed => Ok(()),
            Decision::Unauthenticated => Err(ApiError::Unauthorized(
                "the bearer token is not valid for this service".into(),
            )),
            Decision::Denied => Err(ApiError::Forbidden(format!(
                "not allowed to {} jobs/{} in namespace {:?}{}",
                access.verb,
                access.subresource,
                access.namespace,
                access
                    .name
                    .as_ref()
                    .map(|n| format!(" (Job {n})"))
                    .unwrap_or_default()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer   abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[tokio::test]
    async fn static_tokens_limit_namespaces() {
        let auth = Auth::Static(StaticTokens::parse("# comment\nroot\nteam-a a,b # two\n\n"));
        let access = |ns: &str| Access::execute(ns, Some("job"));
        assert!(auth.check(Some("Bearer root"), &access("x")).await.is_ok());
        assert!(
            auth.check(Some("Bearer team-a"), &access("b"))
                .await
                .is_ok()
        );
        assert!(matches!(
            auth.check(Some("Bearer team-a"), &access("c")).await,
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            auth.check(Some("Bearer nope"), &access("a")).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            auth.check(None, &access("a")).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(Auth::Off.check(None, &access("a")).await.is_ok());
    }
}
