//! Which Kubernetes Jobs and pods the dispatcher believes.
//!
//! Anyone who may create Jobs or pods in a namespace can copy the labels and annotations the
//! dispatcher puts on its own, and a pod's termination message says whatever its image
//! writes. So the dispatcher signs every Job it creates — an HMAC-SHA256 over the namespace,
//! name, event and event ids, in the annotation [`SIGNATURE`] — with a key only it holds (kept
//! in the NATS KV bucket [`KEY_BUCKET`], shared by every replica). The state tracker records
//! states only from Jobs whose signature verifies, and from pods whose controlling owner is
//! such a Job (by uid) and that run the executor image; the event ids always come from the
//! signed Job, never from the pod. A Job squatting a name the dispatcher would use is never
//! taken for its own.
//!
//! The same key makes the tokens with which executor pods fetch compiled modules from the
//! artifact server ([`Signer::artifact_token`]): one namespace, one artifact.

use async_nats::jetstream::{self, kv};
use hmac::{Hmac, Mac};
use k8s_openapi::api::batch::v1::Job as BatchJob;
use sha2::Sha256;

use crate::backend::keys;

/// Annotation on every Job the dispatcher creates: its signature, in hex.
pub const SIGNATURE: &str = "jobico.coeux.dev/signature";
/// KV bucket holding the dispatcher's signing key.
pub const KEY_BUCKET: &str = "jobico-dispatcher";
/// Key of the signing key in [`KEY_BUCKET`].
const KEY_NAME: &str = "job-signing-key";
/// First part of an artifact token's MAC: keeps tokens and Job signatures apart.
const ARTIFACT_TOKEN_DOMAIN: &str = "artifact:";
/// Bytes of the signing key: the HMAC-SHA256 block-size-independent recommendation (≥ 32).
pub const KEY_BYTES: usize = 32;

/// Signs and verifies the dispatcher's Jobs.
#[derive(Clone)]
pub struct Signer {
    key: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

/// Why the signing key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("signing key in NATS KV bucket {KEY_BUCKET}: {0}")]
pub struct KeyError(String);

impl Signer {
    /// A signer with a fresh random key, known to this process only (tests, and backends
    /// whose Jobs no other process must verify).
    pub fn ephemeral() -> Self {
        let mut key = [0; KEY_BYTES];
        getrandom::fill(&mut key).expect("the operating system provides random bytes");
        Self { key }
    }

    /// A signer with the given key (tests that need the same signatures every run).
    pub fn from_key(key: [u8; KEY_BYTES]) -> Self {
        Self { key }
    }

    /// The key every replica shares: read from [`KEY_BUCKET`], or created there (by whichever
    /// replica comes first; the others read the winner's).
    pub async fn load_or_create(js: &jetstream::Context) -> Result<Self, KeyError> {
        let error = |e: &dyn std::fmt::Display| KeyError(e.to_string());
        let store = match js.get_key_value(KEY_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: KEY_BUCKET.into(),
                    description: "Jobico dispatcher secrets".into(),
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| error(&e))?,
        };
        for _ in 0..2 {
            if let Some(value) = store.get(KEY_NAME).await.map_err(|e| error(&e))? {
                let key: [u8; KEY_BYTES] = value
                    .as_ref()
                    .try_into()
                    .map_err(|_| KeyError(format!("{KEY_NAME} is not {KEY_BYTES} bytes")))?;
                return Ok(Self { key });
            }
            let fresh = Self::ephemeral();
            // Create only: a replica that lost the race reads the winner's key next round.
            if store
                .create(KEY_NAME, fresh.key.to_vec().into())
                .await
                .is_ok()
            {
                return Ok(fresh);
            }
        }
        Err(KeyError("cannot read or create the key".into()))
    }

    fn mac(&self, namespace: &str, name: &str, event: &str, ids: &str) -> Hmac<Sha256> {
        self.mac_of(&[namespace, name, event, ids])
    }

    fn mac_of(&self, parts: &[&str]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        // NUL never occurs in a namespace, name, event name, id list or artifact name.
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac
    }

    /// The token that lets the executor pods of `namespace` fetch artifact `name` from the
    /// artifact server. Its first part, `artifact:`, can begin no namespace (no `:` in a DNS
    /// label), so no token is ever a Job's signature.
    pub fn artifact_token(&self, namespace: &str, name: &str) -> String {
        hex::encode(
            self.mac_of(&[ARTIFACT_TOKEN_DOMAIN, namespace, name])
                .finalize()
                .into_bytes(),
        )
    }

    /// Whether `token` is [`Signer::artifact_token`] for `namespace` and `name` (compared in
    /// constant time).
    pub fn verify_artifact_token(&self, namespace: &str, name: &str, token: &str) -> bool {
        let Ok(token) = hex::decode(token) else {
            return false;
        };
        self.mac_of(&[ARTIFACT_TOKEN_DOMAIN, namespace, name])
            .verify_slice(&token)
            .is_ok()
    }

    /// The signature of Job `namespace/name` running events `ids` (the comma-separated
    /// annotation) of `event`.
    pub fn sign(&self, namespace: &str, name: &str, event: &str, ids: &str) -> String {
        hex::encode(
            self.mac(namespace, name, event, ids)
                .finalize()
                .into_bytes(),
        )
    }

    /// Puts the signature on a rendered Job (replacing anything a template wrote there).
    pub fn sign_job(&self, job: &mut BatchJob) {
        let meta = &job.metadata;
        let signature = self.sign(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
            label(job, keys::EVENT),
            annotation(job, keys::EVENT_IDS),
        );
        job.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SIGNATURE.to_owned(), signature);
    }

    /// Whether `job` carries this dispatcher's signature over its namespace, name, event and ids.
    pub fn verify(&self, job: &BatchJob) -> bool {
        let meta = &job.metadata;
        let Ok(signature) = hex::decode(annotation(job, SIGNATURE)) else {
            return false;
        };
        self.mac(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
            label(job, keys::EVENT),
            annotation(job, keys::EVENT_IDS),
        )
        .verify_slice(&signature)
        .is_ok()
    }
}

fn label<'a>(job: &'a BatchJob, key: &str) -> &'a str {
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map_or("", String::as_str)
}

fn annotation<'a>(job: &'a BatchJob, key: &str) -> &'a str {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map_or("", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ids: &str) -> BatchJob {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "jobico-ev1-x", "namespace": "default",
                "labels": {"event": "ev1"}, "annotations": {"jobico.coeux.dev/event-ids": ids}}
        }))
        .unwrap()
    }

    #[test]
    fn artifact_tokens_grant_one_namespace_one_artifact() {
        let signer = Signer::ephemeral();
        let token = signer.artifact_token("team-a", "abc.0123");
        assert!(signer.verify_artifact_token("team-a", "abc.0123", &token));
        assert!(!signer.verify_artifact_token("team-b", "abc.0123", &token));
        assert!(!signer.verify_artifact_token("team-a", "abd.0123", &token));
        assert!(!Signer::ephemeral().verify_artifact_token("team-a", "abc.0123", &token));
        assert!(!signer.verify_artifact_token("team-a", "abc.0123", "zz"));
        assert!(!signer.verify_artifact_token("team-a", "abc.0123", ""));
    }

    #[test]
    fn only_jobs_signed_with_the_key_verify() {
        let signer = Signer::ephemeral();
        let mut ours = job("a,b");
        assert!(!signer.verify(&ours), "unsigned");
        signer.sign_job(&mut ours);
        assert!(signer.verify(&ours));
        // Another key, other ids, another namespace: refused.
        assert!(!Signer::ephemeral().verify(&ours));
        let mut forged = job("a,b,c");
        forged.metadata.annotations.as_mut().unwrap().insert(
            SIGNATURE.into(),
            ours.metadata.annotations.as_ref().unwrap()[SIGNATURE].clone(),
        );
        assert!(!signer.verify(&forged));
        let mut moved = ours.clone();
        moved.metadata.namespace = Some("other".into());
        assert!(!signer.verify(&moved));
        let mut garbage = job("a,b");
        garbage
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SIGNATURE.into(), "zz".into());
        assert!(!signer.verify(&garbage));
    }
}
