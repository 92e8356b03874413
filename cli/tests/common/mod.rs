//! The `jobico up` harness shared by the end-to-end tests: the real binary on a port it picks
//! (`--listen 127.0.0.1:0`, read back from its ready line, so parallel tests never race for a
//! port), its output collected line by line, requests through reqwest.

// Each test crate compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long to wait for a line or an exit. Generous: the first request may wait for nothing, but a loaded CI machine is slow.
const WAIT: Duration = Duration::from_secs(30);

pub struct Up {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(dir, args, &[])
    }

    /// [`Up::start`] with environment variables set for the process.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_jobico"))
            .envs(env.iter().copied())
            .arg("up")
            .args(["--listen", "127.0.0.1:0", "--http-workers", "2"])
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
            base: String::new(),
            lines,
            seen: Vec::new(),
        };
        let ready = up.wait_for(|l| l.contains("local mode ready"));
        // `... listen=127.0.0.1:PORT ...` (plain log format).
        let address = ready
            .split_whitespace()
            .find_map(|field| field.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen address in {ready:?}"));
        up.base = format!("http://{address}");
        up
    }

    /// The base URL it serves on.
    pub fn base(&self) -> String {
        self.base.clone()
    }

    /// Waits for a line matching `pred`, returning it.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
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
    pub fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.put_with(path, body, None)
    }

    /// PUTs `body` with an optional bearer token.
    pub fn put_with(&self, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
        let answer = self.send(reqwest::Method::PUT, path, Some(body), token);
        (answer.status, answer.body)
    }

    /// GETs `path`; returns the status and the JSON answer.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let answer = self.send(reqwest::Method::GET, path, None, None);
        (answer.status, answer.body)
    }

    /// PUTs `body` with extra request headers; returns the status and the JSON answer.
    pub fn put_headers(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let answer = self.send_with(reqwest::Method::PUT, path, Some(body), None, headers);
        (answer.status, answer.body)
    }

    /// Sends one request and waits for the whole answer.
    pub fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> Answer {
        self.send_with(method, path, body, token, &[])
    }

    /// [`Up::send`] with extra request headers.
    pub fn send_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let url = format!("{}{path}", self.base);
            let mut request = reqwest::Client::new().request(method, url);
            if let Some(body) = body {
                request = request.body(body.to_string());
            }
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = response.json::<Value>().await.unwrap();
            Answer {
                status,
                retry_after,
                body,
            }
        })
    }

    /// SIGTERM, then the exit status.
    pub fn stop(self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal("TERM")
    }

    /// SIGKILL, as a crash would; then the exit status and the output.
    pub fn kill(self) -> (std::process::ExitStatus, Vec<String>) {
        self.signal("KILL")
    }

    fn signal(mut self, signal: &str) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect what is left of the output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status, std::mem::take(&mut self.seen));
            }
            assert!(
                Instant::now() < deadline,
                "jobico up did not stop on SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    /// A failed test must not leave `jobico up` running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer to one request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The JSON body.
    pub body: Value,
}

/// The repository root (the samples live there).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every object of every YAML file below `dir` (kustomization.yaml aside, and not below the
/// subdirectories named in `skip`), with its file, in file order.
pub fn yaml_objects(dir: &Path, skip: &[&str]) -> Vec<(PathBuf, serde_yaml::Value)> {
    use serde::Deserialize;
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !skip
                    .iter()
                    .any(|s| path.file_name().is_some_and(|n| n == *s))
                {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yaml")
                && path.file_name().unwrap() != "kustomization.yaml"
            {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                objects.push((file.clone(), value));
            }
        }
    }
    objects
}

/// The lines saying how an event ended: one per run.
pub fn runs(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.contains("succeeded in") || l.contains("failed ("))
        .collect()
}

/// An HTTP receiver for sinks on a free loopback port: answers each POST with the next status
/// of its script (then 200), and keeps each request's content type and JSON body.
pub struct Receiver {
    /// `http://127.0.0.1:<port>/events`.
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
}

impl Receiver {
    pub fn start(script: &[u16]) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let received = std::sync::Arc::<std::sync::Mutex<Vec<(String, Value)>>>::default();
        let kept = received.clone();
        let mut script: std::collections::VecDeque<u16> = script.iter().copied().collect();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut length, mut content_type) = (0, String::new());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    } else if let Some(value) = lower.strip_prefix("content-type:") {
                        content_type = value.trim().to_owned();
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                kept.lock().unwrap().push((
                    content_type,
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                ));
                let status = script.pop_front().unwrap_or(200);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} Scripted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Self { url, received }
    }

    /// What it was sent so far.
    pub fn received(&self) -> Vec<(String, Value)> {
        self.received.lock().unwrap().clone()
    }
}

/// `samples/sink.yaml` with its sink pointed at `url`, written into `dir`.
pub fn sink_sample(dir: &Path, url: &str) {
    let sample = std::fs::read_to_string(repo().join("samples/sink.yaml")).unwrap();
    let pointed = sample.replace("http://127.0.0.1:9900/jobico", url);
    assert_ne!(pointed, sample, "samples/sink.yaml names its receiver");
    std::fs::write(dir.join("sink.yaml"), pointed).unwrap();
}
