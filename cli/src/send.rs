//! `jobico send` and `jobico status`: the ingress's HTTP API from the command line, with a
//! token the cluster issues for you (the TokenRequest API, for a ServiceAccount bound to the
//! `jobico-client` ClusterRole, audience `jobico.coeux.dev`), or one you pass.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use crate::kube_client::{KubeArgs, api_status, split_ref};

/// How long a token obtained for one command lives (the API server's minimum).
const TOKEN_SECONDS: i64 = 600;

/// The ServiceAccount a token is requested for when none is named.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "jobico-client";

/// How the ingress is reached, and as whom.
#[derive(Debug, Clone, clap::Args)]
pub struct IngressArgs {
    /// The ingress's base URL (kind: scripts/kind-up.sh maps it to localhost:8080; elsewhere
    /// e.g. `kubectl -n jobico-system port-forward svc/jobico-apiserver 8080`).
    #[arg(long, env = "JOBICO_INGRESS", default_value = "http://localhost:8080")]
    pub ingress: String,
    /// A bearer token to send as is (skips the TokenRequest).
    #[arg(
        long,
        env = "JOBICO_TOKEN",
        hide_env_values = true,
        conflicts_with = "anonymous"
    )]
    pub token: Option<String>,
    /// The ServiceAccount (`NAME` in the event's namespace, or `NAMESPACE/NAME`) to request a
    /// token for; default `jobico-client` in the event's namespace.
    #[arg(long, conflicts_with_all = ["token", "anonymous"])]
    pub service_account: Option<String>,
    /// Send no token (an ingress with `--auth off`, or `jobico up`).
    #[arg(long)]
    pub anonymous: bool,
    /// The audience of requested tokens (the ingress's `--audience`).
    #[arg(long, env = "JOBICO_AUDIENCE", default_value = "jobico.coeux.dev")]
    pub audience: String,
    /// The cluster (for the TokenRequest).
    #[command(flatten)]
    pub kube: KubeArgs,
}

impl IngressArgs {
    /// The bearer token to send for `namespace`, if any.
    pub async fn bearer(&self, namespace: &str) -> anyhow::Result<Option<String>> {
        if self.anonymous {
            return Ok(None);
        }
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let account = self
            .service_account
            .as_deref()
            .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
        let (sa_namespace, sa_name) = split_ref(account, namespace);
        let client = self.kube.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, sa_namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![self.audience.clone()],
                expiration_seconds: Some(TOKEN_SECONDS),
                ..Default::default()
            },
            ..Default::default()
        };
        match accounts
            .create_token_request(sa_name, &PostParams::default(), &request)
            .await
        {
            Ok(answer) => answer
                .status
                .map(|s| Some(s.token))
                .context("the TokenRequest was answered without a token"),
            Err(error) => Err(match api_status(&error) {
                Some((404, _)) => anyhow::anyhow!(
                    "no ServiceAccount {sa_namespace}/{sa_name} to request a token for: create it and bind it to the jobico-client ClusterRole (deploy/client-rbac.yaml: kubectl create serviceaccount {sa_name} -n {sa_namespace}; kubectl create rolebinding {sa_name} -n {sa_namespace} --clusterrole=jobico-client --serviceaccount={sa_namespace}:{sa_name}), or pass --token"
                ),
                Some((403, _)) => anyhow::anyhow!(
                    "the kubeconfig's identity may not request tokens for {sa_namespace}/{sa_name} (it needs create on serviceaccounts/token there): ask for that, or pass --token"
                ),
                _ => anyhow::Error::new(error).context(format!(
                    "requesting a token for ServiceAccount {sa_namespace}/{sa_name}"
                )),
            }),
        }
    }

    /// An HTTP request to the ingress at `path`, with the token for `namespace`.
    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        namespace: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let url = format!("{}{path}", self.ingress.trim_end_matches('/'));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build an HTTP client")?;
        let mut request = client.request(method, url);
        if let Some(token) = self.bearer(namespace).await? {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }
}

/// The answer of the ingress: the status and its JSON body (or text).
pub(crate) async fn answer(
    ingress: &str,
    request: reqwest::RequestBuilder,
) -> anyhow::Result<(u16, serde_json::Value, Option<String>)> {
    let response = request.send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the ingress at {ingress}: {e} (set --ingress or JOBICO_INGRESS; kind: scripts/kind-up.sh maps it to localhost:8080; elsewhere: kubectl -n jobico-system port-forward svc/jobico-apiserver 8080)"
        )
    })?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Ok((status, body, retry_after))
}

/// A failed answer as an error: its status, the ingress's own sentence, and what to do.
pub(crate) fn refused(
    status: u16,
    body: &serde_json::Value,
    retry_after: Option<&str>,
) -> anyhow::Error {
    let sentence = body["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    let hint = match status {
        401 => " (the token was refused: is it for audience jobico.coeux.dev?)".to_owned(),
        403 => {
            " (the ServiceAccount needs the jobico-client ClusterRole in this namespace)".to_owned()
        }
        503 => format!(
            " (try again after {} s, with the same --idempotency-key)",
            retry_after.unwrap_or("1")
        ),
        _ => String::new(),
    };
    let details = if body.get("violations").is_some() {
        format!(
            "\n{}",
            serde_json::to_string_pretty(&body["violations"]).unwrap_or_default()
        )
    } else {
        String::new()
    };
    anyhow::anyhow!("{status}: {sentence}{hint}{details}")
}

/// Arguments of `jobico send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// `NAMESPACE/EVENT` (or `EVENT` in `default`).
    pub target: String,
    /// The event: JSON, `@FILE`, or `-` for stdin (default `{}`).
    pub data: Option<String>,
    /// `Idempotency-Key`: the event's id, so a retry never stores it twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The ingress and the token.
    #[command(flatten)]
    pub ingress: IngressArgs,
}

/// The event text `data` names.
fn event_text(data: Option<&str>) -> anyhow::Result<String> {
    Ok(match data {
        None => "{}".to_owned(),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the event from stdin")?;
            text
        }
        Some(path) if path.starts_with('@') => std::fs::read_to_string(&path[1..])
            .with_context(|| format!("cannot read the event from {}", &path[1..]))?,
        Some(json) => json.to_owned(),
    })
}

/// Sends the event; returns the ingress's answer (`{"ids":[...]}`).
pub async fn send(args: &SendArgs) -> anyhow::Result<serde_json::Value> {
    let (namespace, event) = split_ref(&args.target, "default");
    let text = event_text(args.data.as_deref())?;
    serde_json::from_str::<serde_json::Value>(&text)
        .with_context(|| format!("the event is not JSON: {text:.200}"))?;
    let mut request = args
        .ingress
        .request(
            reqwest::Method::PUT,
            &format!("/execute/{namespace}/{event}"),
            namespace,
        )
        .await?
        .header("content-type", "application/json")
        .body(text);
    if let Some(key) = &args.idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let (status, body, retry_after) = answer(&args.ingress.ingress, request).await?;
    if status == 202 {
        Ok(body)
    } else {
        Err(refused(status, &body, retry_after.as_deref()))
    }
}

/// Arguments of `jobico status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// `NAMESPACE/ID` (or `ID` in `default`).
    pub target: String,
    /// The ingress and the token.
    #[command(flatten)]
    pub ingress: IngressArgs,
}

/// The recorded state of the event.
pub async fn status(args: &StatusArgs) -> anyhow::Result<serde_json::Value> {
    let (namespace, id) = split_ref(&args.target, "default");
    let request = args
        .ingress
        .request(
            reqwest::Method::GET,
            &format!("/events/{namespace}/{id}"),
            namespace,
        )
        .await?;
    let (status, body, retry_after) = answer(&args.ingress.ingress, request).await?;
    match status {
        200 => Ok(body),
        404 => anyhow::bail!(
            "no event {id} in namespace {namespace} (ids are what `jobico send` printed; a record expires after the ingress's --state-ttl-secs)"
        ),
        _ => Err(refused(status, &body, retry_after.as_deref())),
    }
}
