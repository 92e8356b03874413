//! `jobico up` end to end: the real binary, real HTTP, real modules through wasmtime.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Generous: the first request may wait for nothing, but a loaded CI machine is slow.
const WAIT: Duration = Duration::from_secs(30);

struct Up {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let port = jobico_testkit::free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_jobico"))
            .arg("up")
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http-workers",
                "2",
            ])
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let mut up = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            lines,
            seen: Vec::new(),
        };
        up.wait_for(|l| l.contains("local mode ready"));
        up
    }

    /// Waits for a line matching `pred`, returning it.
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no matching line; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// PUTs `body`; returns the status and the JSON answer.
    fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.put_with(path, body, None)
    }

    /// PUTs `body` with an optional bearer token.
    fn put_with(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let url = format!("{}{path}", self.base);
            let mut request = reqwest::Client::new().put(url).body(body.to_string());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        })
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what is left of the output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status, self.seen);
            }
            assert!(
                Instant::now() < deadline,
                "jobico up did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn local_mode_validates_runs_and_tags_output() {
    let mut up = Up::start(&repo(), &[]);

    // A valid event is accepted and the echo module's output is tagged with its id.
    let (status, body) = up.put(
        "/execute/default/ev1",
        r#"{"firstName":"Ada","lastName":"Lovelace"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let id = body["ids"][0].as_str().unwrap().to_string();
    let tag = format!("[default/ev1 {id}]");
    let echoed = up.wait_for(|l| l.starts_with(&tag) && l.contains("stdout:"));
    assert_eq!(
        echoed,
        format!(r#"{tag} stdout: {{"firstName":"Ada","lastName":"Lovelace"}}"#)
    );
    up.wait_for(|l| l.starts_with(&tag) && l.contains("succeeded in"));

    // Rejected events: precise answers, nothing executed.
    let (status, body) = up.put("/execute/default/ev1", r#"{"firstName":"Ada"}"#);
    assert_eq!(status, 422);
    assert!(
        body["violations"][0]["message"]
            .as_str()
            .unwrap()
            .contains("lastName"),
        "{body}"
    );
    let (status, body) = up.put(
        "/execute/default/ev1",
        r#"{"firstName":"Ada","lastName":"L","age":"x"}"#,
    );
    assert_eq!(
        (status, body["violations"][0]["instancePath"].clone()),
        (422, json!("/age"))
    );
    let (status, _) = up.put("/execute/default/nope", "{}");
    assert_eq!(status, 404);
    let (status, _) = up.put("/execute/default/ev1", "{oops");
    assert_eq!(status, 400);

    // The jobicolet sample: its env.log line and its result.
    let (status, body) = up.put(
        "/execute/default/ev2",
        r#"{"firstName":"Grace","lastName":"Hopper"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let tag2 = format!("[default/ev2 {}]", body["ids"][0].as_str().unwrap());
    let log = up.wait_for(|l| l.starts_with(&tag2) && l.contains("log.info"));
    assert!(log.ends_with("logecho: received an event"), "{log}");
    let result = up.wait_for(|l| l.starts_with(&tag2) && l.contains("result:"));
    assert!(
        result.ends_with(r#"{"firstName":"Grace","lastName":"Hopper"}"#),
        "{result}"
    );

    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    let ran: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("succeeded in") || l.contains("failed ("))
        .collect();
    assert_eq!(ran.len(), 2, "exactly the two accepted events ran: {ran:?}");
}

#[test]
fn built_in_samples_are_used_outside_the_repository() {
    let empty = tempfile::tempdir().unwrap();
    let mut up = Up::start(empty.path(), &[]);
    up.wait_for(|l| l.contains("using the built-in samples"));
    let (status, body) = up.put(
        "/execute/default/ev1",
        r#"{"firstName":"A","lastName":"B"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let tag = format!("[default/ev1 {}]", body["ids"][0].as_str().unwrap());
    up.wait_for(|l| l.starts_with(&tag) && l.contains("succeeded in"));
    assert!(up.stop().0.success());
}

#[test]
fn a_missing_module_makes_only_its_event_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("samples/ev1.yaml"), dir.path().join("ev1.yaml")).unwrap();
    std::fs::write(
        dir.path().join("ev3.yaml"),
        "apiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {name: j3}\nspec:\n  events:\n    - {name: ev3, wasm: gone.wasm, schema: {key: schema-ev1}}\n",
    )
    .unwrap();
    let mut up = Up::start(dir.path(), &["--manifests", "."]);
    let (status, body) = up.put(
        "/execute/default/ev3",
        r#"{"firstName":"A","lastName":"B"}"#,
    );
    assert_eq!(status, 500);
    assert!(
        body["error"].as_str().unwrap().contains("gone.wasm"),
        "{body}"
    );
    // ev1's module comes from its ConfigMap in ev1.yaml (no echo.wasm file in this directory).
    let (status, _) = up.put(
        "/execute/default/ev1",
        r#"{"firstName":"A","lastName":"B"}"#,
    );
    assert_eq!(status, 202);
    up.wait_for(|l| l.contains("[default/ev1") && l.contains("succeeded in"));
    assert!(up.stop().0.success());
}

#[test]
fn a_token_file_requires_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret default\nother-ns elsewhere\n").unwrap();
    let samples = repo().join("samples");
    let mut up = Up::start(
        dir.path(),
        &[
            "--manifests",
            samples.to_str().unwrap(),
            "--token-file",
            tokens.to_str().unwrap(),
        ],
    );
    let body = r#"{"firstName":"A","lastName":"B"}"#;
    assert_eq!(up.put("/execute/default/ev1", body).0, 401);
    assert_eq!(
        up.put_with("/execute/default/ev1", body, Some("wrong")).0,
        401
    );
    assert_eq!(
        up.put_with("/execute/default/ev1", body, Some("other-ns"))
            .0,
        403
    );
    let (status, answer) = up.put_with("/execute/default/ev1", body, Some("s3cret"));
    assert_eq!(status, 202, "{answer}");
    up.wait_for(|l| l.contains("[default/ev1") && l.contains("succeeded in"));
    let (status, lines) = up.stop();
    assert!(status.success());
    assert_eq!(
        lines.iter().filter(|l| l.contains("succeeded in")).count(),
        1,
        "only the authorised event ran"
    );
}
