//! Each way of authenticating that [`NatsAuthArgs`] offers, against a real nats-server that
//! requires it: an nkey seed file, a token file, and TLS with a CA file.

use std::path::Path;
use std::process::Command;

use jobico_store::{NatsAuth, NatsAuthArgs};
use jobico_testkit::NatsServer;

/// Connects to `url` as `auth`; the error's text when refused.
async fn connect(url: &str, auth: &NatsAuth) -> Result<(), String> {
    let client = auth
        .options("test", "_INBOX.test")
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn an_nkey_seed_file_authenticates_the_user_the_server_lists_by_its_public_key() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}",
            user.public_key()
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let creds = |pair: &nkeys::KeyPair, name: &str| {
        NatsAuthArgs {
            nats_creds: Some(write(dir.path(), name, &pair.seed().unwrap())),
            ..Default::default()
        }
        .load()
        .unwrap()
    };
    connect(&server.url(), &creds(&user, "user.nk"))
        .await
        .unwrap();
    assert!(
        connect(&server.url(), &creds(&stranger, "stranger.nk"))
            .await
            .is_err()
    );
    assert!(connect(&server.url(), &NatsAuth::default()).await.is_err());
}

#[tokio::test]
async fn a_token_file_authenticates() {
    let server =
        NatsServer::start_with_config("authorization { token: $TOKEN }", &[("TOKEN", "t0ken")]);
    let dir = tempfile::tempdir().unwrap();
    let token = |text: &str, name: &str| {
        NatsAuthArgs {
            nats_token_file: Some(write(dir.path(), name, text)),
            ..Default::default()
        }
        .load()
        .unwrap()
    };
    connect(&server.url(), &token("t0ken\n", "right"))
        .await
        .unwrap();
    assert!(
        connect(&server.url(), &token("guess", "wrong"))
            .await
            .is_err()
    );
    assert!(connect(&server.url(), &NatsAuth::default()).await.is_err());
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed to make the test certificates");
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
}

#[tokio::test]
async fn a_tls_ca_file_verifies_the_server_and_tls_is_then_required() {
    // A CA, and a certificate it signs for 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir.path(),
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &[
                "-subj",
                "/CN=jobico test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    openssl(
        dir.path(),
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=nats",
            ],
        ]
        .concat(),
    );
    write(
        dir.path(),
        "server.ext",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    openssl(
        dir.path(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // Another CA, which did not sign it.
    openssl(
        dir.path(),
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "other.key", "-out", "other.pem", "-days", "2"],
            &[
                "-subj",
                "/CN=other CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        ]
        .concat(),
    );
    let server = NatsServer::start_with_config(
        &format!(
            "tls {{ cert_file: \"{0}/server.pem\", key_file: \"{0}/server.key\" }}",
            dir.path().display()
        ),
        &[],
    );
    let with_ca = |name: &str| {
        NatsAuthArgs {
            nats_tls_ca: Some(dir.path().join(name)),
            ..Default::default()
        }
        .load()
        .unwrap()
    };
    connect(&server.url(), &with_ca("ca.pem")).await.unwrap();
    assert!(connect(&server.url(), &with_ca("other.pem")).await.is_err());

    // A plain server: the CA flag requires TLS, so no connection in the clear.
    let plain = NatsServer::start();
    assert!(connect(&plain.url(), &with_ca("ca.pem")).await.is_err());
    connect(&plain.url(), &NatsAuth::default()).await.unwrap();
}
