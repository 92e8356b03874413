//! Fetching the dispatcher's compiled module for this Job (see
//! [`jobico_common::executor::ArtifactRef`]) and deciding whether it may be loaded.
//!
//! Compiled code runs outside the sandbox, so it is loaded only when the bytes hash to the
//! digest the Job names, the module it was compiled from is the one this pod mounts, and the
//! bytes are wasmtime's (wasmtime then checks version, settings and CPU features). The Job's
//! artifact variables are the dispatcher's: it writes them after the template renders,
//! replacing any the template wrote. Anything else — no answer, another digest, a module
//! changed since — is a refusal with its reason, and the module is compiled here instead.
//!
//! An uploaded module ([`UploadedModuleRef`], too large for a ConfigMap) comes from the same
//! server, by digest: it is downloaded only when there is no artifact to load, and run only
//! when it hashes to the digest the Job names.

use std::time::Duration;

use jobico_common::executor::{ArtifactRef, Sha256Digest, UploadedModuleRef};

use crate::engine::is_precompiled;

/// Longest wait for the artifact server to accept the connection: it runs in the cluster, so
/// longer only delays compiling the module here instead.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest the whole download may take: a 35 MB artifact (a 3.4 MB module) takes well under
/// a second inside a cluster; past this, compiling it here is the faster way.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes accepted: ten times the compiled size of a 3.4 MB module.
pub const MAX_ARTIFACT_BYTES: u64 = 384 << 20;
/// Most bytes of an uploaded module accepted (the ingress takes up to 64 MiB).
pub const MAX_MODULE_BYTES: u64 = 64 << 20;

/// Downloads the artifact and checks it against the Job and the module bytes: the verified
/// compiled code, or why it cannot be used.
pub fn fetch(artifact: &ArtifactRef, module: &[u8]) -> Result<Vec<u8>, String> {
    fetch_for(artifact, Sha256Digest::of(module))
}

/// [`fetch`] for the module whose digest is `module` (an uploaded one, not yet downloaded).
pub fn fetch_for(artifact: &ArtifactRef, module: Sha256Digest) -> Result<Vec<u8>, String> {
    if module != artifact.module {
        return Err(format!(
            "it was compiled from module {:?}, and this pod has {module:?} (the module changed since the Job was made)",
            artifact.module
        ));
    }
    let code = get(&artifact.url, &artifact.token, MAX_ARTIFACT_BYTES)?;
    verify(artifact, &code)?;
    Ok(code)
}

/// Downloads the uploaded module the Job names: its bytes, which hash to the Job's digest, or
/// why not.
pub fn fetch_module(module: &UploadedModuleRef) -> Result<Vec<u8>, String> {
    let bytes = get(&module.url, &module.token, MAX_MODULE_BYTES)?;
    let got = Sha256Digest::of(&bytes);
    if got != module.digest {
        return Err(format!(
            "the module downloaded from {} hashes to {got:?}, not the {:?} the Job names",
            module.url, module.digest
        ));
    }
    Ok(bytes)
}

/// GETs `url` from the artifact server with `token`, at most `limit` bytes.
fn get(url: &str, token: &str, limit: u64) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        // Only the dispatcher, straight: no proxy from the environment, no redirects.
        .proxy(None)
        .max_redirects(0)
        .build()
        .into();
    let mut response = agent
        .get(url)
        .header("authorization", format!("Bearer {token}"))
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status != 200 {
        let text = response
            .body_mut()
            .with_config()
            .limit(512)
            .read_to_string()
            .unwrap_or_default();
        return Err(format!("GET {url} answered {status}: {}", text.trim()));
    }
    response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: {e}"))
}

/// The checks on downloaded bytes: the Job's digest, and wasmtime's format.
pub fn verify(artifact: &ArtifactRef, code: &[u8]) -> Result<(), String> {
    let got = Sha256Digest::of(code);
    if got != artifact.digest {
        return Err(format!(
            "the download hashes to {got:?}, not the {:?} the Job names",
            artifact.digest
        ));
    }
    if !is_precompiled(code) {
        return Err("the download is not compiled code".into());
    }
    Ok(())
}
