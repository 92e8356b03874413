//! The executor's contract with the Jobs that start it: the flags a Job may not pass, and
//! the compiled module the dispatcher hands it.
//!
//! A Job's arguments are written by its template, and a resource's template is written by the
//! tenant. So the flags that only the operator may pass (they decide whether native code is
//! loaded) are listed here, refused in every rendered Job by the dispatcher's pod policy and
//! defined by `wasm-exec` under these names (its tests check both: that each is a real flag
//! and that clap infers no abbreviation of it).
//!
//! The compiled module ([`ArtifactRef`]) travels in the environment variables
//! [`ARTIFACT_VARS`], which the dispatcher writes into every Job after its template has
//! rendered, replacing whatever the template wrote under those names: so the digest the
//! executor checks the downloaded code against is always the dispatcher's. An uploaded module
//! (too large for a ConfigMap, so carried by no volume) is named the same way, by
//! [`UploadedModuleRef`] in [`MODULE_VARS`].

use std::fmt;

use sha2::{Digest as _, Sha256};

/// `wasm-exec` flags a Job may not pass: `--trust-precompiled` loads a `.cwasm` file as
/// native code, unchecked.
pub const OPERATOR_ONLY_FLAGS: &[&str] = &["--trust-precompiled"];

/// The operator-only flag `arg` passes, if any (`--flag` or `--flag=value`). Arguments after a
/// `--` are values, never flags: pass only those before it.
pub fn operator_only_flag(arg: &str) -> Option<&'static str> {
    OPERATOR_ONLY_FLAGS.iter().copied().find(|flag| {
        arg.strip_prefix(flag)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    })
}

/// Where the executor fetches the compiled module (an `http://` URL of the dispatcher's
/// artifact server).
pub const ARTIFACT_URL_VAR: &str = "JOBICO_ARTIFACT_URL";
/// The SHA-256 of the compiled bytes, in hex: the executor loads nothing else.
pub const ARTIFACT_DIGEST_VAR: &str = "JOBICO_ARTIFACT_DIGEST";
/// The SHA-256 of the WebAssembly module it was compiled from, in hex: the executor uses the
/// artifact only for that module.
pub const ARTIFACT_MODULE_VAR: &str = "JOBICO_ARTIFACT_MODULE";
/// The bearer token the artifact server asks for (it grants this namespace this artifact).
pub const ARTIFACT_TOKEN_VAR: &str = "JOBICO_ARTIFACT_TOKEN";
/// Every variable of an [`ArtifactRef`]: a Job carries all of them or none.
pub const ARTIFACT_VARS: [&str; 4] = [
    ARTIFACT_URL_VAR,
    ARTIFACT_DIGEST_VAR,
    ARTIFACT_MODULE_VAR,
    ARTIFACT_TOKEN_VAR,
];

/// Where the executor fetches an uploaded module (a resource's `wasm: sha256:<digest>`, too
/// large for a ConfigMap): an `http://` URL of the dispatcher's artifact server.
pub const MODULE_URL_VAR: &str = "JOBICO_MODULE_URL";
/// The uploaded module's SHA-256, in hex: the executor runs nothing else.
pub const MODULE_DIGEST_VAR: &str = "JOBICO_MODULE_DIGEST";
/// The bearer token that grants this namespace this module.
pub const MODULE_TOKEN_VAR: &str = "JOBICO_MODULE_TOKEN";
/// Every variable of an [`UploadedModuleRef`]: a Job carries all of them or none. Like
/// [`ARTIFACT_VARS`], written by the dispatcher alone.
pub const MODULE_VARS: [&str; 3] = [MODULE_URL_VAR, MODULE_DIGEST_VAR, MODULE_TOKEN_VAR];

/// The prefix of the executor container's variables that are the guest's: `wasm-exec` grants
/// each `JOBICO_GUEST_<NAME>` of its own environment to the guest as `<NAME>` (see
/// [`guest_env`]), and nothing else of its environment. The dispatcher writes them after the
/// template has rendered (values written out, or `valueFrom`/`envFrom` references the kubelet
/// resolves), replacing whatever the template wrote under this prefix.
pub const GUEST_ENV_PREFIX: &str = "JOBICO_GUEST_";

/// Most bytes the guest's variables from references may take in the executor's `execve`
/// (each `NAME=value` with its NUL and pointer): 1 MiB of events and the executor's own
/// variables leave about 1 MiB of `ARG_MAX`; a quarter of it keeps a wide margin.
pub const MAX_GUEST_ENV_BYTES: usize = 256 << 10;

/// The guest's variables in an environment (`vars`: the executor's own, in order): every
/// `JOBICO_GUEST_<NAME>=value` as `(NAME, value)`, a later one replacing an earlier of the same
/// name. Variables that are not UTF-8 are skipped (WASI takes strings).
pub fn guest_env(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, String)> {
    let mut granted: Vec<(String, String)> = Vec::new();
    for (name, value) in vars {
        let (Some(name), Some(value)) = (name.to_str(), value.to_str()) else {
            continue;
        };
        let Some(name) = name
            .strip_prefix(GUEST_ENV_PREFIX)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        set_var(&mut granted, name.to_owned(), value.to_owned());
    }
    granted
}

/// Sets `name` to `value` in `vars` as an environment does: an earlier entry of that name is
/// replaced, the new one comes last.
pub fn set_var(vars: &mut Vec<(String, String)>, name: String, value: String) {
    vars.retain(|(n, _)| *n != name);
    vars.push((name, value));
}

/// An uploaded module a Job runs, which no volume carries into the pod: where the executor
/// fetches it, what it must hash to, and the token that lets this Job fetch it.
#[derive(Clone, PartialEq, Eq)]
pub struct UploadedModuleRef {
    /// Where to GET it.
    pub url: String,
    /// Its SHA-256.
    pub digest: Sha256Digest,
    /// Bearer token for the artifact server.
    pub token: String,
}

impl fmt::Debug for UploadedModuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadedModuleRef")
            .field("url", &self.url)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl UploadedModuleRef {
    /// The environment entries that carry it, in [`MODULE_VARS`] order.
    pub fn env(&self) -> [(&'static str, String); 3] {
        [
            (MODULE_URL_VAR, self.url.clone()),
            (MODULE_DIGEST_VAR, self.digest.to_string()),
            (MODULE_TOKEN_VAR, self.token.clone()),
        ]
    }

    /// Reads it from the environment through `lookup`: `None` when none of its variables is
    /// set, an error when only some are or one is malformed.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let Some([url, digest, token]) = all_or_none(lookup, MODULE_VARS, "JOBICO_MODULE_")? else {
            return Ok(None);
        };
        Ok(Some(Self {
            url: http_url(MODULE_URL_VAR, url)?,
            digest: Sha256Digest::parse(&digest)
                .map_err(|e| format!("{MODULE_DIGEST_VAR}: {e}"))?,
            token,
        }))
    }
}

/// The values of the variables `names` through `lookup`: `None` when none is set, an error
/// naming the first one missing when only some are (`family`: their common prefix).
fn all_or_none<const N: usize>(
    lookup: impl Fn(&str) -> Option<String>,
    names: [&str; N],
    family: &str,
) -> Result<Option<[String; N]>, String> {
    let values = names.map(&lookup);
    if values.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut read = Vec::with_capacity(N);
    for (value, name) in values.into_iter().zip(names) {
        read.push(
            value
                .ok_or_else(|| format!("{name} is not set, though other {family} variables are"))?,
        );
    }
    Ok(Some(read.try_into().expect("N values")))
}

/// `value`, the variable `name`, when it is an `http://` URL.
fn http_url(name: &str, value: String) -> Result<String, String> {
    if value.starts_with("http://") {
        Ok(value)
    } else {
        Err(format!("{name} {value:?} is not an http:// URL"))
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Parses 64 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Self, String> {
        let valid = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(format!(
                "{text:?} is not a SHA-256 digest (64 lowercase hex digits)"
            ));
        }
        let mut digest = [0; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Self(digest))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// A compiled module the dispatcher made for a Job: where to fetch it, what it must hash to,
/// which module it was compiled from, and the token that lets this Job fetch it.
#[derive(Clone, PartialEq, Eq)]
pub struct ArtifactRef {
    /// Where to GET it.
    pub url: String,
    /// SHA-256 of the compiled bytes.
    pub digest: Sha256Digest,
    /// SHA-256 of the module it was compiled from.
    pub module: Sha256Digest,
    /// Bearer token for the artifact server.
    pub token: String,
}

impl fmt::Debug for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactRef")
            .field("url", &self.url)
            .field("digest", &self.digest)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl ArtifactRef {
    /// The environment entries that carry it, in [`ARTIFACT_VARS`] order.
    pub fn env(&self) -> [(&'static str, String); 4] {
        [
            (ARTIFACT_URL_VAR, self.url.clone()),
            (ARTIFACT_DIGEST_VAR, self.digest.to_string()),
            (ARTIFACT_MODULE_VAR, self.module.to_string()),
            (ARTIFACT_TOKEN_VAR, self.token.clone()),
        ]
    }

    /// Reads it from the environment through `lookup`: `None` when none of its variables is
    /// set, an error when only some are or one is malformed.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let Some([url, digest, module, token]) =
            all_or_none(lookup, ARTIFACT_VARS, "JOBICO_ARTIFACT_")?
        else {
            return Ok(None);
        };
        Ok(Some(Self {
            url: http_url(ARTIFACT_URL_VAR, url)?,
            digest: Sha256Digest::parse(&digest)
                .map_err(|e| format!("{ARTIFACT_DIGEST_VAR}: {e}"))?,
            module: Sha256Digest::parse(&module)
                .map_err(|e| format!("{ARTIFACT_MODULE_VAR}: {e}"))?,
            token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_its_prefixed_variables_and_nothing_else() {
        let vars = [
            ("JOBICO_EVENTS", "[]"),
            ("JOBICO_GUEST_DB_URL", "postgres://db"),
            ("JOBICO_GUEST_", "no name"),
            ("PATH", "/bin"),
            ("JOBICO_GUEST_MODE", "first"),
            ("JOBICO_GUEST_MODE", "second"),
            ("JOBICO_GUEST_cfg.key", "dotted"),
        ]
        .map(|(n, v)| (n.into(), v.into()));
        let granted = guest_env(vars);
        let names: Vec<_> = granted.iter().map(|(n, v)| format!("{n}={v}")).collect();
        assert_eq!(
            names,
            ["DB_URL=postgres://db", "MODE=second", "cfg.key=dotted"]
        );
    }

    #[test]
    fn uploaded_module_refs_round_trip_through_the_environment() {
        let uploaded = UploadedModuleRef {
            url: "http://jobico-artifacts:8083/v1/artifacts/team/ab.wasm".into(),
            digest: Sha256Digest::of(b"module"),
            token: "t0k".into(),
        };
        let env: std::collections::HashMap<_, _> = uploaded
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let read = UploadedModuleRef::from_env(|name| env.get(name).cloned()).unwrap();
        assert_eq!(read, Some(uploaded));
        assert_eq!(UploadedModuleRef::from_env(|_| None).unwrap(), None);
        let partial = UploadedModuleRef::from_env(|name| {
            (name == MODULE_URL_VAR).then(|| "http://x".to_owned())
        })
        .unwrap_err();
        assert!(partial.contains(MODULE_DIGEST_VAR), "{partial}");
        let https = UploadedModuleRef::from_env(|name| {
            env.get(name).cloned().map(|v| {
                if name == MODULE_URL_VAR {
                    "https://x".to_owned()
                } else {
                    v
                }
            })
        })
        .unwrap_err();
        assert!(https.contains("http://"), "{https}");
    }

    #[test]
    fn artifact_refs_round_trip_through_the_environment() {
        let artifact = ArtifactRef {
            url: "http://jobico-artifacts.jobico-system:8083/v1/artifacts/ns/x".into(),
            digest: Sha256Digest::of(b"code"),
            module: Sha256Digest::of(b"wasm"),
            token: "t0k3n".into(),
        };
        let env: std::collections::HashMap<_, _> = artifact.env().into_iter().collect();
        let read = ArtifactRef::from_env(|name| env.get(name).cloned()).unwrap();
        assert_eq!(read, Some(artifact));
        assert_eq!(ArtifactRef::from_env(|_| None).unwrap(), None);
        let partial = ArtifactRef::from_env(|name| {
            env.get(name)
                .filter(|_| name != ARTIFACT_TOKEN_VAR)
                .cloned()
        });
        assert!(partial.unwrap_err().contains(ARTIFACT_TOKEN_VAR));
        let bad = ArtifactRef::from_env(|name| {
            if name == ARTIFACT_DIGEST_VAR {
                Some("ABC".into())
            } else {
                env.get(name).cloned()
            }
        });
        assert!(bad.unwrap_err().contains("not a SHA-256"));
        let digest = Sha256Digest::of(b"x");
        assert_eq!(Sha256Digest::parse(&digest.to_string()), Ok(digest));
        assert!(Sha256Digest::parse(&digest.to_string().to_uppercase()).is_err());
    }

    #[test]
    fn a_flag_is_found_alone_or_with_a_value() {
        assert_eq!(
            operator_only_flag("--trust-precompiled"),
            Some("--trust-precompiled")
        );
        assert_eq!(
            operator_only_flag("--trust-precompiled=true"),
            Some("--trust-precompiled")
        );
        assert_eq!(operator_only_flag("--trust-precompiledx"), None);
        assert_eq!(operator_only_flag("--dir"), None);
        assert_eq!(operator_only_flag("run"), None);
    }
}
