//! The dispatcher's compiled artifact, as a pod loads it: the `wasm-exec` binary started with
//! a Job's artifact variables against a local HTTP server. Loaded only when it verifies; every
//! other case compiles the module and says why in the summary.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use jobico_common::executor::{ArtifactRef, Sha256Digest};
use jobico_common::summary::{ModuleLoad, ModuleSource};
use wasm_exec::{EXIT_OK, RunSummary, Runtime, RuntimeConfig};

const TOKEN: &str = "capability-for-this-job";

fn echo_module() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples/echo.wasm")
}

/// What the dispatcher makes: the module compiled by a portable runtime.
fn portable_artifact(module: &[u8]) -> Vec<u8> {
    Runtime::new(RuntimeConfig {
        portable: true,
        max_concurrent_instances: 1,
        ..RuntimeConfig::default()
    })
    .unwrap()
    .precompile("echo.wasm", module)
    .unwrap()
}

/// Serves `body` with `status` to every GET that carries the token (401 otherwise); records
/// the request heads.
struct Server {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

fn serve(status: u16, body: Vec<u8>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/v1/artifacts/default/x",
        listener.local_addr().unwrap()
    );
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let authorized = head
                .to_ascii_lowercase()
                .contains(&format!("authorization: bearer {TOKEN}\r\n"));
            seen.lock().unwrap().push(head);
            let (status, body) = if authorized {
                (status, body.clone())
            } else {
                (401, b"no token".to_vec())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    Server { url, heads }
}

fn run_pod(module: &Path, artifact: Option<&ArtifactRef>) -> (i32, RunSummary) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-exec"));
    for (name, _) in std::env::vars() {
        if name.starts_with("JOBICO_") {
            command.env_remove(name);
        }
    }
    command
        .arg("run")
        .arg(module)
        .arg("--termination-log")
        .arg(dir.path().join("termination-log"))
        .env(
            "JOBICO_EVENTS",
            r#"[{"id":"e1","data":{"firstName":"Ada","lastName":"Lovelace"}}]"#,
        )
        .stdin(Stdio::null());
    for (name, value) in artifact.map(ArtifactRef::env).into_iter().flatten() {
        command.env(name, value);
    }
    let output = command.output().expect("binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().expect("a summary line");
    let summary = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (output.status.code().unwrap(), summary)
}

fn reference(url: &str, code: &[u8], module: &[u8]) -> ArtifactRef {
    ArtifactRef {
        url: url.to_owned(),
        digest: Sha256Digest::of(code),
        module: Sha256Digest::of(module),
        token: TOKEN.to_owned(),
    }
}

fn load_of(summary: &RunSummary) -> &ModuleLoad {
    summary
        .module
        .as_ref()
        .expect("the summary says how the module loaded")
}

#[test]
fn a_verified_artifact_is_loaded_instead_of_compiling() {
    let module = std::fs::read(echo_module()).unwrap();
    let code = portable_artifact(&module);
    let server = serve(200, code.clone());
    let artifact = reference(&server.url, &code, &module);
    let (exit, summary) = run_pod(&echo_module(), Some(&artifact));
    assert_eq!(exit, i32::from(EXIT_OK), "{summary:?}");
    assert_eq!(summary.succeeded, 1);
    let load = load_of(&summary);
    assert_eq!(load.source, ModuleSource::Artifact, "{load:?}");
    assert_eq!(load.artifact_refused, None);
    let heads = server.heads.lock().unwrap();
    assert_eq!(heads.len(), 1, "one GET");
    assert!(
        heads[0].starts_with("GET /v1/artifacts/default/x HTTP/1.1"),
        "{}",
        heads[0]
    );

    // Without an artifact the same module is compiled, and the summary says so.
    let (exit, summary) = run_pod(&echo_module(), None);
    assert_eq!(exit, i32::from(EXIT_OK));
    assert_eq!(load_of(&summary).source, ModuleSource::Compiled);
}

#[test]
fn artifacts_that_do_not_verify_are_refused_and_the_module_compiled() {
    let module = std::fs::read(echo_module()).unwrap();
    let code = portable_artifact(&module);
    let mut tampered = code.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x40;
    // Compiled code of another module, under its own correct digest.
    let other_module =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
            .unwrap();
    let foreign = portable_artifact(&other_module);
    // Not compiled code at all, under its correct digest.
    let not_code = b"#!/bin/sh\necho owned\n".to_vec();

    let cases: Vec<(&str, Server, ArtifactRef, &str)> = vec![
        {
            // The Job names the real artifact's digest; the server sends a tampered copy.
            let server = serve(200, tampered.clone());
            let artifact = reference(&server.url, &code, &module);
            ("tampered bytes", server, artifact, "hashes to")
        },
        {
            // A foreign artifact whose digest the Job names, but for another module.
            let server = serve(200, foreign.clone());
            let artifact = reference(&server.url, &foreign, &other_module);
            (
                "another module's artifact",
                server,
                artifact,
                "module changed since",
            )
        },
        {
            let server = serve(200, not_code.clone());
            let artifact = reference(&server.url, &not_code, &module);
            ("not compiled code", server, artifact, "not compiled code")
        },
        {
            let server = serve(404, b"no such artifact".to_vec());
            let artifact = reference(&server.url, &code, &module);
            ("a 404", server, artifact, "answered 404")
        },
        {
            let server = serve(200, code.clone());
            let mut artifact = reference(&server.url, &code, &module);
            artifact.token = "a guessed token".into();
            ("a wrong token", server, artifact, "answered 401")
        },
    ];
    for (what, _server, artifact, expected) in cases {
        let (exit, summary) = run_pod(&echo_module(), Some(&artifact));
        assert_eq!(
            exit,
            i32::from(EXIT_OK),
            "{what}: the event still runs: {summary:?}"
        );
        assert_eq!(summary.succeeded, 1, "{what}");
        let load = load_of(&summary);
        assert_eq!(load.source, ModuleSource::Compiled, "{what}: {load:?}");
        let refused = load.artifact_refused.as_deref().unwrap_or_default();
        assert!(
            refused.contains(expected),
            "{what}: {refused:?} says {expected:?}"
        );
    }

    // Nobody listening: refused at once (connection refused), compiled.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let artifact = reference(
        &format!("http://127.0.0.1:{port}/v1/artifacts/default/x"),
        &code,
        &module,
    );
    let (exit, summary) = run_pod(&echo_module(), Some(&artifact));
    assert_eq!(exit, i32::from(EXIT_OK));
    let load = load_of(&summary);
    assert_eq!(load.source, ModuleSource::Compiled);
    assert!(
        load.artifact_refused
            .as_deref()
            .unwrap_or_default()
            .contains("GET http://127.0.0.1"),
        "{load:?}"
    );
}

#[test]
fn a_portable_artifact_uses_no_cpu_feature_beyond_the_baseline() {
    // Compiled for this CPU, the code names the CPU's features; portable, it names none, so
    // it loads on any node of the architecture.
    let module = std::fs::read(echo_module()).unwrap();
    let native = Runtime::new(RuntimeConfig {
        max_concurrent_instances: 1,
        ..RuntimeConfig::default()
    })
    .unwrap()
    .precompile("echo.wasm", &module)
    .unwrap();
    let portable = portable_artifact(&module);
    assert_ne!(
        native, portable,
        "portable code differs from native code here"
    );
}
