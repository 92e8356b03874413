//! Who may send events: off, a static token file, or Kubernetes bearer tokens.
//!
//! Kubernetes mode checks `Authorization: Bearer <token>` with a TokenReview (audience
//! [`DEFAULT_AUDIENCE`] unless configured) and then a SubjectAccessReview: group
//! `jobico.coeux.dev`, resource `jobs`, subresource `execute`, verb `create`, in the event's
//! namespace, on the Job resource that declares the event. Status reads ask for verb `get` on
//! the subresource `events`, namespace-wide. A TokenReview that authenticates the token but
//! does not list our audience in `status.audiences` is a refusal: the authenticator did not
//! check the audience, so the token may have been minted for another service.
//!
//! Decisions are cached for [`DECISION_TTL`] by token hash, so a busy client costs the
//! Kubernetes API a few calls a minute, and a revoked token or role stops working within that
//! time. The caches are bounded LRUs, and tokens that do not authenticate have one of their own:
//! a flood of made-up tokens evicts only other made-up tokens, never the decisions of real
//! clients.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// The token audience we ask TokenReview to check: tokens minted for other services are refused.
pub const DEFAULT_AUDIENCE: &str = "jobico.coeux.dev";
/// API group of the Job resource.
pub const GROUP: &str = "jobico.coeux.dev";
/// How long a decision is reused: short enough that revocations bite quickly.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Most cached decisions for tokens that authenticated (allowed or denied); beyond, the least
/// recently used is evicted. Each entry is ~150 bytes, so this bounds the cache near 1.5 MiB.
pub const MAX_CACHED_DECISIONS: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();
/// Most cached refusals of tokens that did not authenticate: a client retrying with a bad
/// token costs one review per [`DECISION_TTL`], and a flood of fresh tokens stays in here.
pub const MAX_CACHED_REFUSALS: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();
/// Retry hint when the Kubernetes API cannot be asked.
const AUTH_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a request wants to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Access {
    /// Namespace.
    pub namespace: String,
    /// Name of the Job resource, when known.
    pub name: Option<String>,
    /// Kubernetes verb (`create` to send events, `get` to read states, `update` to upload
    /// modules).
    pub verb: &'static str,
    /// Subresource of `jobs` (`execute`, `events` or `modules`).
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

    /// Uploading a module for the Job resource `job` (as changing that resource would).
    pub fn upload_module(namespace: &str, job: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: Some(job.to_string()),
            verb: "update",
            subresource: "modules",
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

/// Cached decisions with the time each was made.
type DecisionCache = Mutex<LruCache<CacheKey, (Decision, Instant)>>;

/// Kubernetes TokenReview + SubjectAccessReview with a short decision cache.
pub struct KubernetesAuth {
    client: Client,
    audience: String,
    /// Boxed: two caches would make every `Auth` value large.
    caches: Box<Caches>,
    metrics: Metrics,
}

struct Caches {
    /// Decisions for tokens that authenticated.
    decisions: DecisionCache,
    /// Refusals of tokens that did not.
    refusals: DecisionCache,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Unauthenticated,
    /// Authenticated, but not for our audience (or by an authenticator that ignores audiences).
    WrongAudience,
    Denied,
    Allowed,
}

impl Decision {
    fn authenticated(self) -> bool {
        matches!(self, Decision::Denied | Decision::Allowed)
    }
}

impl KubernetesAuth {
    /// Checks tokens against the cluster behind `client`.
    pub fn new(client: Client, audience: String, metrics: Metrics) -> Self {
        Self {
            client,
            audience,
            caches: Box::new(Caches {
                decisions: Mutex::new(LruCache::new(MAX_CACHED_DECISIONS)),
                refusals: Mutex::new(LruCache::new(MAX_CACHED_REFUSALS)),
            }),
            metrics,
        }
    }

    fn cached(&self, key: &CacheKey) -> Option<Decision> {
        [&self.caches.decisions, &self.caches.refusals]
            .into_iter()
            .find_map(|cache| {
                let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
                match cache.get(key) {
                    Some((decision, at)) if at.elapsed() < DECISION_TTL => Some(*decision),
                    Some(_) => {
                        cache.pop(key);
                        None
                    }
                    None => None,
                }
            })
    }

    fn remember(&self, key: CacheKey, decision: Decision) {
        let cache = if decision.authenticated() {
            &self.caches.decisions
        } else {
            &self.caches.refusals
        };
        let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.put(key, (decision, Instant::now()));
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
        // The TokenReview API asks clients that set `spec.audiences` to check that the answer
        // names one: an authenticator unaware of audiences accepts tokens minted for anyone.
        if !status
            .audiences
            .is_some_and(|audiences| audiences.contains(&self.audience))
        {
            return Ok(Decision::WrongAudience);
        }
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
            Decision::WrongAudience => Err(ApiError::Unauthorized(match self {
                Auth::Kubernetes(kube) => format!(
                    "the bearer token is not for the audience {:?}; create one with `kubectl create token <service-account> --audience {}`",
                    kube.audience, kube.audience
                ),
                _ => "the bearer token is not for this service".into(),
            })),
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
