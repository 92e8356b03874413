//! The cluster commands (`jobico module push`, `send`, `status`, `logs`) through the real
//! binary, against the fake Kubernetes API server over HTTP (reached through a kubeconfig, as
//! a cluster is) and a real or recording ingress.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobico_testkit::NatsServer;
use jobico_testkit::kube_api::{KubeApi, resource};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn jobico(api: &KubeApi, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobico"))
        .args(args)
        .env("KUBECONFIG", api.kubeconfig())
        .env_remove("JOBICO_TOKEN")
        .env_remove("JOBICO_INGRESS")
        .current_dir(repo())
        .output()
        .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The Job resource of `samples/ev1.yaml` in `default` (its ConfigMaps not applied).
fn apply_sample_resource(api: &KubeApi) {
    api.apply(
        "jobs",
        json!({"apiVersion": "jobico.coeux.dev/v1", "kind": "Job",
               "metadata": {"name": "job-for-ev1", "namespace": "default"},
               "spec": {"events": [{"name": "ev1", "wasm": "echo.wasm",
                                    "schema": {"key": "schema-ev1"}}]}}),
    );
}

fn modules_map(api: &KubeApi) -> Option<Value> {
    api.objects(&resource("v1", "configmaps"), Some("default"))
        .into_iter()
        .find(|m| m["metadata"]["name"] == "job-for-ev1-modules")
}

#[test]
fn module_push_creates_then_updates_the_resource_s_config_map_keeping_other_modules() {
    let api = KubeApi::start();
    apply_sample_resource(&api);
    let out = jobico(
        &api,
        &["module", "push", "job-for-ev1", "samples/echo.wasm"],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("configmap default/job-for-ev1-modules: echo.wasm")
            && stdout.contains("created"),
        "{stdout}"
    );
    let map = modules_map(&api).expect("the ConfigMap was created");
    let echo = std::fs::read(repo().join("samples/echo.wasm")).unwrap();
    let stored = map["binaryData"]["echo.wasm"].as_str().unwrap();
    assert_eq!(decode(stored), echo);

    // A .wat is compiled; echo.wasm stays; the unused module is pointed out.
    let out = jobico(
        &api,
        &["module", "push", "job-for-ev1", "samples/logecho.wat"],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("logecho.wasm") && stdout.contains("updated"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: no event of default/job-for-ev1 runs logecho.wasm"),
        "{stdout}"
    );
    let map = modules_map(&api).unwrap();
    assert!(map["binaryData"]["echo.wasm"].is_string());
    assert!(decode(map["binaryData"]["logecho.wasm"].as_str().unwrap()).starts_with(b"\0asm"));
}

#[test]
fn module_push_refuses_what_a_config_map_cannot_hold_and_what_is_not_webassembly() {
    let api = KubeApi::start();
    apply_sample_resource(&api);
    let dir = tempfile::tempdir().unwrap();
    // A valid module header and a 1.1 MiB custom section.
    let mut big = b"\0asm\x01\0\0\0".to_vec();
    let payload = 1_100_000usize;
    big.push(0);
    leb128(&mut big, payload + 2);
    big.extend([1, b'x']);
    big.extend(std::iter::repeat_n(0u8, payload));
    std::fs::write(dir.path().join("big.wasm"), &big).unwrap();
    let big_path = dir.path().join("big.wasm").display().to_string();
    let out = jobico(&api, &["module", "push", "job-for-ev1", &big_path]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("more than the 1048576 a ConfigMap may hold"),
        "{stderr}"
    );
    assert!(modules_map(&api).is_none(), "nothing was written");

    std::fs::write(dir.path().join("evil.cwasm"), b"\x7fELF\x02\x01\x01\0junk").unwrap();
    let evil = dir.path().join("evil.cwasm").display().to_string();
    let out = jobico(&api, &["module", "push", "job-for-ev1", &evil]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("precompiled modules are never accepted"),
        "{stderr}"
    );

    let out = jobico(&api, &["module", "push", "nope", "samples/echo.wasm"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("no Job resource default/nope"), "{stderr}");
}

/// The request line, the headers (lowercased) and the body of a recorded request.
type Seen = Arc<Mutex<Option<(String, Vec<String>, String)>>>;

/// An HTTP server that records one request and answers `status` with `body`.
struct Recorder {
    url: String,
    seen: Seen,
}

impl Recorder {
    fn start(status: u16, body: &'static str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let keep = seen.clone();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut headers = Vec::new();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                let header = header.trim_end().to_lowercase();
                if header.is_empty() {
                    break;
                }
                if let Some(n) = header.strip_prefix("content-length: ") {
                    length = n.parse().unwrap();
                }
                headers.push(header);
            }
            let mut request_body = vec![0; length];
            reader.read_exact(&mut request_body).unwrap();
            *keep.lock().unwrap() = Some((
                line.trim_end().to_owned(),
                headers,
                String::from_utf8(request_body).unwrap(),
            ));
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        Self { url, seen }
    }
}

#[test]
fn send_gets_a_token_for_the_client_service_account_and_puts_the_event() {
    let api = KubeApi::start();
    api.apply(
        "serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "jobico-client", "namespace": "default"}}),
    );
    let ingress = Recorder::start(202, r#"{"ids":["order-1"]}"#);
    let out = jobico(
        &api,
        &[
            "send",
            "default/ev1",
            r#"{"firstName":"Ada","lastName":"Lovelace"}"#,
            "--idempotency-key",
            "order-1",
            "--ingress",
            &ingress.url,
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("order-1"), "{stdout}");
    let (line, headers, body) = ingress.seen.lock().unwrap().clone().unwrap();
    assert_eq!(line, "PUT /execute/default/ev1 HTTP/1.1");
    assert!(
        headers.contains(&"authorization: bearer fake-token.default.jobico-client.1".to_owned()),
        "{headers:?}"
    );
    assert!(
        headers.contains(&"idempotency-key: order-1".to_owned()),
        "{headers:?}"
    );
    assert_eq!(body, r#"{"firstName":"Ada","lastName":"Lovelace"}"#);
    let requests = api.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].2["spec"]["audiences"],
        json!(["jobico.coeux.dev"])
    );
    assert_eq!(requests[0].2["spec"]["expirationSeconds"], 600);
}

#[test]
fn send_says_how_to_create_a_missing_service_account_and_what_a_refusal_means() {
    let api = KubeApi::start();
    let out = jobico(
        &api,
        &[
            "send",
            "default/ev1",
            "{}",
            "--ingress",
            "http://127.0.0.1:9",
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no ServiceAccount default/jobico-client")
            && stderr.contains("kubectl create serviceaccount jobico-client -n default"),
        "{stderr}"
    );
    let ingress = Recorder::start(
        422,
        r#"{"error":"1 violation(s) of the event schema; nothing was accepted","violations":[{"item":0,"instancePath":"","keyword":"required","message":"\"lastName\" is a required property"}]}"#,
    );
    let out = jobico(
        &api,
        &[
            "send",
            "ev1",
            r#"{"firstName":"Ada"}"#,
            "--anonymous",
            "--ingress",
            &ingress.url,
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("422: 1 violation(s)") && stderr.contains("lastName"),
        "{stderr}"
    );
    let out = jobico(&api, &["send", "ev1", "not json", "--anonymous"]);
    assert!(text(&out).1.contains("the event is not JSON"));
    let out = jobico(
        &api,
        &[
            "status",
            "x",
            "--anonymous",
            "--ingress",
            "http://127.0.0.1:9",
        ],
    );
    assert!(
        text(&out)
            .1
            .contains("cannot reach the ingress at http://127.0.0.1:9")
    );
}

#[test]
fn send_then_status_against_a_real_ingress() {
    let nats = NatsServer::start();
    let up = common::Up::start(repo(), &["--nats", &nats.url()]);
    let api = KubeApi::start();
    let out = jobico(
        &api,
        &[
            "send",
            "default/ev1",
            r#"{"firstName":"Ada","lastName":"Lovelace"}"#,
            "--idempotency-key",
            "cli-1",
            "--anonymous",
            "--ingress",
            &up.base(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("cli-1"), "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = jobico(
            &api,
            &[
                "status",
                "default/cli-1",
                "--anonymous",
                "--ingress",
                &up.base(),
            ],
        );
        let (stdout, stderr) = text(&out);
        if out.status.success() && stdout.contains("\"succeeded\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never succeeded: {stdout} {stderr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn logs_prints_one_event_s_lines_from_its_batch_job_s_pod() {
    let api = KubeApi::start();
    api.apply(
        "jobs",
        json!({"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": "ev1-batch", "namespace": "default",
                            "labels": {"app.kubernetes.io/managed-by": "jobico-dispatcher", "event": "ev1"},
                            "annotations": {"jobico.coeux.dev/event-ids": "a-1,b-2"}}}),
    );
    api.apply(
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "ev1-batch-x7", "namespace": "default",
                            "labels": {"batch.kubernetes.io/job-name": "ev1-batch"}}}),
    );
    api.set_pod_log(
        "default",
        "ev1-batch-x7",
        "a-1 stdout hello from a\nb-2 stdout hello from b\na-10 stdout not a\nb-2 stderr done\n",
    );
    let out = jobico(&api, &["logs", "default/b-2"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, "b-2 stdout hello from b\nb-2 stderr done\n");
    let out = jobico(&api, &["logs", "a-1"]);
    assert_eq!(text(&out).0, "a-1 stdout hello from a\n");
    let out = jobico(&api, &["logs", "default/zz"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no Job in default holds event zz"),
        "{stderr}"
    );
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A ConfigMap's binaryData value (base64), decoded as k8s-openapi decodes it.
fn decode(text: &str) -> Vec<u8> {
    serde_json::from_value::<k8s_openapi::ByteString>(json!(text))
        .expect("base64")
        .0
}
