//! The `jobico-apiserver` binary's NATS credentials, through a real execve against a real
//! nats-server that requires a password: unreadable files stop it at once, a wrong password
//! is retried saying why, the right one connects.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use jobico_testkit::NatsServer;

/// How long the binary may take to say something; generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// `jobico-apiserver` on loopback ports with the samples and `args`; its stderr lines.
fn apiserver(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/../samples");
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobico-apiserver"))
        .args(["--auth", "off", "--manifests", samples])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, lines)
}

/// The first line holding every one of `needles`.
fn wait_for(lines: &mpsc::Receiver<String>, needles: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if needles.iter().all(|n| line.contains(n)) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {needles:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn the_apiserver_connects_only_with_a_readable_right_password() {
    let nats = NatsServer::start_with_config(
        "authorization { users = [ { user: jobico-apiserver, password: $PASSWORD } ] }",
        &[("PASSWORD", "s3cret")],
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (right, wrong) = (write("right", "s3cret\n"), write("wrong", "guess\n"));
    let missing = dir.path().join("missing").to_str().unwrap().to_owned();
    let url = nats.url();
    let with = |file: &str| {
        [
            "--nats",
            &url,
            "--nats-user",
            "jobico-apiserver",
            "--nats-password-file",
            file,
        ]
        .map(str::to_owned)
    };

    // Unreadable: it does not start.
    let args = with(&missing);
    let (mut child, lines) = apiserver(&args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for(&lines, &["cannot read the NATS password file", &missing]);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "it kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());

    // Wrong: refused by the server, retried, and the log says so (and never the password).
    let args = with(&wrong);
    let (mut child, lines) = apiserver(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let line = wait_for(&lines, &["cannot set up NATS", "user jobico-apiserver"]);
    assert!(line.contains("authorization violation"), "{line}");
    assert!(!line.contains("guess"), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Right: connected, the stream set up.
    let args = with(&right);
    let (mut child, lines) = apiserver(&args.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for(
        &lines,
        &[
            "connected to NATS, state bucket ready",
            "user jobico-apiserver",
        ],
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
