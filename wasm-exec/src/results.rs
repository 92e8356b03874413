//! Posting a batch's outcomes to the ingress when its event has `then` routes (cluster
//! chaining): the Job names where ([`RESULTS_URL_VAR`]) and the token for exactly this batch
//! ([`RESULTS_TOKEN_VAR`]); the ingress follows each outcome's routes.
//!
//! The post happens before the executor exits. One that does not get through (after retries)
//! makes the run a host error, so Kubernetes runs the pod again: the routed events' ids are
//! derived from their parents', so a second post publishes nothing twice, and no outcome's
//! routes are lost.

use std::time::Duration;

use jobico_common::chain::{
    MAX_RESULT_BYTES, RESULTS_BATCH_HEADER, RESULTS_TOKEN_VAR, RESULTS_URL_VAR, ResultsReport,
};
use jobico_common::summary::{EventOutcome, batch_digest};

/// Longest wait for the ingress to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one post may take (a batch of large results, routes published in NATS).
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses between attempts: about 15 s in all, through an ingress restart.
const RETRY_PAUSES: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// Where and with what token this Job posts its outcomes.
#[derive(Clone, PartialEq, Eq)]
pub struct ResultsTarget {
    /// `http://<ingress>/results/<namespace>/<event>`.
    pub url: String,
    /// The batch's bearer token.
    pub token: String,
}

impl std::fmt::Debug for ResultsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultsTarget")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ResultsTarget {
    /// The target the environment names through `lookup`: `None` when neither variable is
    /// set (an event without routes), an error when only one is or the URL is not http://.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        match (lookup(RESULTS_URL_VAR), lookup(RESULTS_TOKEN_VAR)) {
            (None, None) => Ok(None),
            (Some(url), Some(token)) if url.starts_with("http://") => Ok(Some(Self { url, token })),
            (Some(url), Some(_)) => Err(format!("{RESULTS_URL_VAR} {url:?} is not an http:// URL")),
            _ => Err(format!(
                "the Job sets one of {RESULTS_URL_VAR} and {RESULTS_TOKEN_VAR} without the other"
            )),
        }
    }
}

/// The outcomes as posted: every one, in batch order, each result cut just past
/// [`MAX_RESULT_BYTES`] (such a result is refused by its routes, saying it is too long).
pub fn report(outcomes: &[EventOutcome]) -> ResultsReport {
    let outcomes = outcomes
        .iter()
        .map(|outcome| {
            let mut outcome = outcome.clone();
            if let Some(result) = &mut outcome.result
                && result.len() > MAX_RESULT_BYTES
            {
                let mut end = MAX_RESULT_BYTES + 1;
                while !result.is_char_boundary(end) {
                    end += 1;
                }
                result.truncate(end);
            }
            outcome
        })
        .collect();
    ResultsReport { outcomes }
}

/// Posts `outcomes` to `target`, retrying while the ingress is away or answers 5xx; an error
/// says why it never got through.
pub fn post(target: &ResultsTarget, outcomes: &[EventOutcome]) -> Result<(), String> {
    let ids: Vec<&str> = outcomes.iter().map(|o| o.id.as_str()).collect();
    let digest = batch_digest(&ids);
    let body = serde_json::to_vec(&report(outcomes)).expect("a results report serialises");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(POST_TIMEOUT))
        .http_status_as_error(false)
        // Only the ingress, straight: no proxy from the environment, no redirects.
        .proxy(None)
        .max_redirects(0)
        .build()
        .into();
    let mut last = String::new();
    for pause in std::iter::once(Duration::ZERO).chain(RETRY_PAUSES) {
        std::thread::sleep(pause);
        let answer = agent
            .post(&target.url)
            .header("authorization", format!("Bearer {}", target.token))
            .header(RESULTS_BATCH_HEADER, &digest)
            .header("content-type", "application/json")
            .send(&body[..]);
        match answer {
            Ok(mut response) => {
                let status = response.status().as_u16();
                if status == 200 {
                    return Ok(());
                }
                let text = response
                    .body_mut()
                    .with_config()
                    .limit(1024)
                    .read_to_string()
                    .unwrap_or_default();
                last = format!("POST {} answered {status}: {}", target.url, text.trim());
                if status < 500 {
                    // The token or the report is wrong: another attempt would be too.
                    return Err(last);
                }
            }
            Err(error) => last = format!("POST {}: {error}", target.url),
        }
        tracing::warn!(error = %last, "cannot post the outcomes for their routes yet; retrying");
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_both_variables_or_neither() {
        let env = |pairs: &'static [(&str, &str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(ResultsTarget::from_env(env(&[])), Ok(None));
        let both = ResultsTarget::from_env(env(&[
            (RESULTS_URL_VAR, "http://ingress/results/ns/order"),
            (RESULTS_TOKEN_VAR, "t"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(both.url, "http://ingress/results/ns/order");
        assert!(ResultsTarget::from_env(env(&[(RESULTS_TOKEN_VAR, "t")])).is_err());
        assert!(
            ResultsTarget::from_env(env(&[
                (RESULTS_URL_VAR, "file:///x"),
                (RESULTS_TOKEN_VAR, "t")
            ]))
            .is_err()
        );
    }
}
