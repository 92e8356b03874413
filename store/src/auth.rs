//! How Jobico's binaries authenticate to NATS: one flag group, [`NatsAuthArgs`], flattened into
//! the arguments of the ingress, the dispatcher and `jobico up`, read once at start into a
//! [`NatsAuth`], which builds the [`async_nats::ConnectOptions`] of every connection.
//!
//! Secrets only ever come from files (mounted Kubernetes Secrets), never from the command line
//! or the environment, where `ps` and `kubectl describe` would show them. Every file is read
//! and checked when the process starts: an unreadable, empty or malformed file stops it with a
//! message naming the file, instead of failing later at the first connection or reconnection.
//! Files are read once: a rotated Secret takes effect at the next start.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::ConnectOptions;

/// The marker of a NATS `.creds` file (a user JWT followed by its nkey seed), as written by
/// `nsc` and the NATS operator tooling.
const CREDS_MARKER: &str = "-----BEGIN NATS USER JWT-----";

/// The marker of a PEM certificate: a CA file without one cannot verify any server.
const PEM_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";

/// The NATS credential flags, shared by every binary that connects to NATS.
///
/// At most one way of authenticating: a credentials file, a user with a password file, or a
/// token file. None of them connects without credentials (a NATS with no authorization, as
/// `nats-server -js` runs by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct NatsAuthArgs {
    /// NATS credentials file: a `.creds` file (user JWT and nkey seed, from `nsc` or your
    /// NATS operator) or a file holding a user nkey seed (`SU...`) the server lists by its
    /// public key.
    #[arg(
        long,
        env = "JOBICO_NATS_CREDS",
        value_name = "FILE",
        conflicts_with_all = ["nats_user", "nats_token_file"]
    )]
    pub nats_creds: Option<PathBuf>,
    /// NATS user name; its password is read from --nats-password-file.
    #[arg(
        long,
        env = "JOBICO_NATS_USER",
        value_name = "NAME",
        requires = "nats_password_file",
        conflicts_with = "nats_token_file"
    )]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user (a mounted Secret; one trailing newline is
    /// ignored). Passwords are never taken from the command line.
    #[arg(
        long,
        env = "JOBICO_NATS_PASSWORD_FILE",
        value_name = "FILE",
        requires = "nats_user"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS authorization token (one trailing newline is ignored).
    #[arg(long, env = "JOBICO_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate; TLS is then required
    /// (use it with a `tls://` URL or a server that offers TLS).
    #[arg(long, env = "JOBICO_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// Whether any of the flags is set.
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }

    /// Reads and checks the files named by the flags.
    pub fn load(&self) -> Result<NatsAuth, NatsAuthError> {
        let credential = match (&self.nats_creds, &self.nats_user, &self.nats_token_file) {
            (Some(path), _, _) => credentials(path)?,
            (None, Some(user), _) => {
                let path = self
                    .nats_password_file
                    .as_ref()
                    .ok_or_else(|| NatsAuthError::PasswordMissing { user: user.clone() })?;
                Credential::UserPassword {
                    user: user.clone(),
                    password: secret(path, "password")?,
                }
            }
            (None, None, Some(path)) => Credential::Token(secret(path, "token")?),
            (None, None, None) => Credential::None,
        };
        if let Some(path) = &self.nats_tls_ca {
            let pem = read(path, "TLS CA")?;
            if !pem.contains(PEM_CERTIFICATE) {
                return Err(NatsAuthError::Malformed {
                    what: "TLS CA",
                    path: path.clone(),
                    expected: "a PEM certificate",
                });
            }
        }
        Ok(NatsAuth {
            credential: Arc::new(credential),
            tls_ca: self.nats_tls_ca.clone(),
        })
    }
}

/// Why the NATS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    /// A file could not be read.
    #[error("cannot read the NATS {what} file {}", path.display())]
    Read {
        /// Which file (password, token, credentials, TLS CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A secret file is empty.
    #[error("the NATS {what} file {} is empty", path.display())]
    Empty {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// A file does not hold what it should.
    #[error("the NATS {what} file {} does not hold {expected}", path.display())]
    Malformed {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
    },
    /// A user without a password file (only when the flags were not parsed by clap, which
    /// refuses this itself).
    #[error("NATS user {user} needs --nats-password-file")]
    PasswordMissing {
        /// The user.
        user: String,
    },
}

/// How a process authenticates to NATS, read once at start; cheap to clone.
#[derive(Clone, Default)]
pub struct NatsAuth {
    credential: Arc<Credential>,
    tls_ca: Option<PathBuf>,
}

/// The secret a connection presents.
#[derive(Default)]
enum Credential {
    /// None: for a server without authorization.
    #[default]
    None,
    /// A `.creds` file's contents (user JWT and seed), checked when read.
    Creds(String),
    /// A user nkey seed, checked when read, and its public key (for logs).
    Nkey { seed: String, public_key: String },
    /// A user and password.
    UserPassword { user: String, password: String },
    /// A token.
    Token(String),
}

impl NatsAuth {
    /// Options for a new connection named `name` (shown by the server's monitoring) whose
    /// replies arrive below the subject prefix `inbox` (see
    /// [`jobico_common::subject::INGRESS_INBOX`]), with these credentials and TLS settings.
    /// Callers add their reconnection settings and connect.
    pub fn options(&self, name: &str, inbox: &str) -> ConnectOptions {
        let options = ConnectOptions::new().name(name).custom_inbox_prefix(inbox);
        let options = match &*self.credential {
            Credential::None => options,
            Credential::Creds(text) => options
                .credentials(text)
                .expect("the credentials were parsed when they were read"),
            Credential::Nkey { seed, .. } => options.nkey(seed.clone()),
            Credential::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Credential::Token(token) => options.token(token.clone()),
        };
        match &self.tls_ca {
            Some(ca) => options.add_root_certificates(ca.clone()).require_tls(true),
            None => options,
        }
    }
}

/// A `--nats` value: one server URL, or several separated by commas (the seed servers of a
/// cluster; the client learns the others from them), e.g. `nats://a:4222,nats://b:4222`.
#[derive(Debug, Clone, Copy)]
pub struct Servers<'a>(pub &'a str);

impl async_nats::ToServerAddrs for Servers<'_> {
    type Iter = std::vec::IntoIter<async_nats::ServerAddr>;
    fn to_server_addrs(&self) -> std::io::Result<Self::Iter> {
        let servers = self
            .0
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::parse)
            .collect::<std::io::Result<Vec<async_nats::ServerAddr>>>()?;
        if servers.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no NATS server URL given",
            ));
        }
        Ok(servers.into_iter())
    }
}

/// Who the process connects as, for logs: never a secret.
impl fmt::Display for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.credential {
            Credential::None => f.write_str("no credentials"),
            Credential::Creds(_) => f.write_str("a credentials file"),
            Credential::Nkey { public_key, .. } => write!(f, "nkey {public_key}"),
            Credential::UserPassword { user, .. } => write!(f, "user {user}"),
            Credential::Token(_) => f.write_str("a token"),
        }?;
        if self.tls_ca.is_some() {
            f.write_str(", TLS required")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NatsAuth({self})")
    }
}

/// The file at `path`.
fn read(path: &Path, what: &'static str) -> Result<String, NatsAuthError> {
    std::fs::read_to_string(path).map_err(|source| NatsAuthError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The secret in the file at `path`, without one trailing newline (`echo` and editors add
/// one; a Secret created with `--from-literal` has none).
fn secret(path: &Path, what: &'static str) -> Result<String, NatsAuthError> {
    let text = read(path, what)?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(NatsAuthError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(value.to_owned())
}

/// A `.creds` file or an nkey seed file, checked.
fn credentials(path: &Path) -> Result<Credential, NatsAuthError> {
    const WHAT: &str = "credentials";
    let malformed = || NatsAuthError::Malformed {
        what: WHAT,
        path: path.to_path_buf(),
        expected: "a user JWT with its nkey seed (.creds) or a user nkey seed (SU...)",
    };
    let text = read(path, WHAT)?;
    if text.contains(CREDS_MARKER) {
        ConnectOptions::with_credentials(&text).map_err(|_| malformed())?;
        return Ok(Credential::Creds(text));
    }
    let seed = text.trim();
    if seed.is_empty() {
        return Err(NatsAuthError::Empty {
            what: WHAT,
            path: path.to_path_buf(),
        });
    }
    let pair = nkeys::KeyPair::from_seed(seed).map_err(|_| malformed())?;
    if pair.key_pair_type() != nkeys::KeyPairType::User {
        return Err(malformed());
    }
    Ok(Credential::Nkey {
        seed: seed.to_owned(),
        public_key: pair.public_key(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsAuthArgs,
    }

    fn parse(args: &[&str]) -> Result<NatsAuthArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied())).map(|c| c.nats)
    }

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn one_way_of_authenticating_at_a_time() {
        for refused in [
            &["--nats-user", "u"][..],
            &["--nats-password-file", "p"],
            &[
                "--nats-creds",
                "c",
                "--nats-user",
                "u",
                "--nats-password-file",
                "p",
            ],
            &["--nats-creds", "c", "--nats-token-file", "t"],
            &[
                "--nats-token-file",
                "t",
                "--nats-user",
                "u",
                "--nats-password-file",
                "p",
            ],
            // Secrets come from files only.
            &["--nats-password", "p"],
            &["--nats-token", "t"],
        ] {
            assert!(parse(refused).is_err(), "{refused:?} was accepted");
        }
        for accepted in [
            &[][..],
            &["--nats-creds", "c"],
            &["--nats-user", "u", "--nats-password-file", "p"],
            &["--nats-token-file", "t", "--nats-tls-ca", "ca.pem"],
        ] {
            assert!(parse(accepted).is_ok(), "{accepted:?} was refused");
        }
        assert!(!parse(&[]).unwrap().is_set());
        assert!(parse(&["--nats-tls-ca", "ca.pem"]).unwrap().is_set());
    }

    #[test]
    fn secrets_are_read_from_files_without_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (text, expected) in [
            ("s3cret\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("a b\r\n", "a b"),
        ] {
            let args = NatsAuthArgs {
                nats_user: Some("jobico-apiserver".into()),
                nats_password_file: Some(file(&dir, "password", text).into()),
                ..Default::default()
            };
            let auth = args.load().unwrap();
            match &*auth.credential {
                Credential::UserPassword { user, password } => {
                    assert_eq!(
                        (user.as_str(), password.as_str()),
                        ("jobico-apiserver", expected)
                    );
                }
                _ => panic!("not a user and password"),
            }
            assert_eq!(auth.to_string(), "user jobico-apiserver");
            assert!(!format!("{auth:?}").contains("s3cret"));
        }
        let token = NatsAuthArgs {
            nats_token_file: Some(file(&dir, "token", "t0ken\n").into()),
            ..Default::default()
        };
        assert!(matches!(&*token.load().unwrap().credential, Credential::Token(t) if t == "t0ken"));
    }

    #[test]
    fn unreadable_empty_or_malformed_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing").to_str().unwrap().to_owned();
        let user = |password: &str| NatsAuthArgs {
            nats_user: Some("u".into()),
            nats_password_file: Some(password.into()),
            ..Default::default()
        };
        let creds = |path: &str| NatsAuthArgs {
            nats_creds: Some(path.into()),
            ..Default::default()
        };
        let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
        let cases = [
            (
                user(&missing),
                format!("cannot read the NATS password file {missing}"),
            ),
            (
                user(&file(&dir, "empty", "\n")),
                format!(
                    "the NATS password file {}/empty is empty",
                    dir.path().display()
                ),
            ),
            (
                NatsAuthArgs {
                    nats_token_file: Some(missing.clone().into()),
                    ..Default::default()
                },
                format!("cannot read the NATS token file {missing}"),
            ),
            (
                creds(&missing),
                format!("cannot read the NATS credentials file {missing}"),
            ),
            (
                creds(&file(&dir, "junk", "not a seed\n")),
                "does not hold a user JWT with its nkey seed".into(),
            ),
            // An account seed is no user's.
            (
                creds(&file(&dir, "account", &account_seed)),
                "does not hold".into(),
            ),
            (
                creds(&file(&dir, "bad.creds", &format!("{CREDS_MARKER}\nnope\n"))),
                "does not hold".into(),
            ),
            (
                NatsAuthArgs {
                    nats_tls_ca: Some(file(&dir, "ca.pem", "hello").into()),
                    ..Default::default()
                },
                "does not hold a PEM certificate".into(),
            ),
            (
                NatsAuthArgs {
                    nats_tls_ca: Some(missing.clone().into()),
                    ..Default::default()
                },
                format!("cannot read the NATS TLS CA file {missing}"),
            ),
        ];
        for (args, expected) in cases {
            let error = args.load().unwrap_err().to_string();
            assert!(error.contains(&expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn a_creds_file_is_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let text = format!(
            "{CREDS_MARKER}\neyJ0eXAiOiJqd3QifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let args = NatsAuthArgs {
            nats_creds: Some(file(&dir, "user.creds", &text).into()),
            ..Default::default()
        };
        let auth = args.load().unwrap();
        assert_eq!(auth.to_string(), "a credentials file");
        assert!(!format!("{auth:?}").contains(&seed));
        // Building the options parses it again, as it was parsed when read.
        let _ = auth.options("test", "_INBOX.test");
    }

    #[test]
    fn an_nkey_seed_file_is_shown_by_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let pair = nkeys::KeyPair::new_user();
        let args = NatsAuthArgs {
            nats_creds: Some(file(&dir, "seed", &format!("{}\n", pair.seed().unwrap())).into()),
            ..Default::default()
        };
        let auth = args.load().unwrap();
        assert_eq!(auth.to_string(), format!("nkey {}", pair.public_key()));
        assert!(!format!("{auth:?}").contains(&pair.seed().unwrap()));
    }
}
