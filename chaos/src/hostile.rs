//! Malformed requests against a running `jobico up --nats`: random bodies and headers, broken
//! CloudEvents attributes, deep JSON, huge `Content-Length`s, bodies that stop half way, long
//! paths. Counted: answers by class, 5xx other than 503 (a defect), whether the process
//! survived, and its peak memory.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use jobico_testkit::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::scenarios::{ACK_WAIT_SECS, Env};
use crate::up::{Up, peak_rss_kib};
use crate::{Profile, Rng, Row};

/// Requests in flight at once.
const CONCURRENCY: usize = 32;

/// How long one request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// One malformed request: the bytes to send, and whether to stop sending after them without
/// finishing (the body it announced never comes).
struct Hostile {
    bytes: Vec<u8>,
    abandon: bool,
}

fn request(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: chaos\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn random_text(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b' ' + (rng.next_u64() % 95) as u8))
        .collect()
}

/// The `i`-th hostile request of a run.
fn hostile(rng: &mut Rng) -> Hostile {
    let put = |headers: &[(String, String)], body: &[u8]| Hostile {
        bytes: request("PUT", "/execute/default/ev1", headers, body),
        abandon: false,
    };
    let h = |n: &str, v: String| (n.to_owned(), v);
    match rng.range(0, 12) {
        0 => {
            let n = rng.range(0, 4096) as usize;
            put(&[], &random_bytes(rng, n))
        }
        1 => {
            let n = rng.range(1, 200) as usize;
            let text = random_text(rng, n);
            put(
                &[h(&format!("x-{}", rng.next_u64()), text)],
                br#"{"firstName":"A","lastName":"B"}"#,
            )
        }
        2 => {
            // Binary-mode CloudEvents with broken attributes.
            let attrs = [
                h(
                    "ce-specversion",
                    ["9.9", "", "1.0\u{7f}", "1.0"][rng.range(0, 4) as usize].into(),
                ),
                h("ce-id", {
                    let n = rng.range(0, 600) as usize;
                    random_text(rng, n)
                }),
                h(
                    "ce-source",
                    ["", "/s", "%%%"][rng.range(0, 3) as usize].into(),
                ),
                h("ce-type", random_text(rng, 3)),
                h("content-type", "application/json".into()),
            ];
            let keep = rng.range(1, 5) as usize;
            put(&attrs[..keep], br#"{"firstName":"A","lastName":"B"}"#)
        }
        3 => Hostile {
            // A huge declared body, then nothing.
            bytes: request(
                "PUT",
                "/execute/default/ev1",
                &[h("content-length", "1000000000000".into())],
                b"{\"a\":",
            ),
            abandon: true,
        },
        4 => Hostile {
            // A body that stops half way.
            bytes: request(
                "PUT",
                "/execute/default/ev1",
                &[h("content-length", "200".into())],
                b"{\"firstName\":",
            ),
            abandon: true,
        },
        5 => {
            let depth = rng.range(50, 20_000) as usize;
            let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            put(&[], body.as_bytes())
        }
        6 => Hostile {
            bytes: request(
                ["GET", "PUT", "POST", "DELETE", "BREW"][rng.range(0, 5) as usize],
                &format!("/execute/{}/ev1", "a".repeat(rng.range(1, 9000) as usize)),
                &[],
                b"{}",
            ),
            abandon: false,
        },
        7 => {
            // Structured CloudEvents with wrong types.
            let body = format!(
                r#"{{"specversion":{},"id":{},"source":"/s","type":"t","data":{}}}"#,
                ["1", "\"1.0\"", "null"][rng.range(0, 3) as usize],
                ["7", "\"\"", "\"ok\"", "[1]"][rng.range(0, 4) as usize],
                [
                    "\"x\"",
                    "{}",
                    "[]",
                    "{\"firstName\":\"A\",\"lastName\":\"B\"}"
                ][rng.range(0, 4) as usize],
            );
            put(
                &[h("content-type", "application/cloudevents+json".into())],
                body.as_bytes(),
            )
        }
        8 => {
            let n = rng.range(1, 3000) as usize;
            let body = format!("[{}]", vec!["{\"x\":1}"; n].join(","));
            put(
                &[h(
                    "content-type",
                    "application/cloudevents-batch+json".into(),
                )],
                body.as_bytes(),
            )
        }
        9 => {
            let n = rng.range(1, 2000) as usize;
            let body = format!("{{\"data\":[{}]}}", vec!["{\"firstName\":1}"; n].join(","));
            put(&[], body.as_bytes())
        }
        10 => Hostile {
            // Not HTTP at all.
            bytes: {
                let n = rng.range(1, 512) as usize;
                random_bytes(rng, n)
            },
            abandon: false,
        },
        _ => {
            let n = rng.range(0, 80) as usize;
            put(
                &[h("content-type", random_text(rng, n))],
                br#"{"firstName":"A","lastName":"B"}"#,
            )
        }
    }
}

/// Sends one hostile request; the status of the answer, if one came.
async fn send(port: u16, hostile: Hostile) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    if stream.write_all(&hostile.bytes).await.is_err() {
        return None;
    }
    if hostile.abandon {
        // Hold the connection a little, then go away without finishing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        return None;
    }
    let mut head = Vec::new();
    let read = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let mut buffer = [0u8; 4096];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buffer).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        Some(())
    })
    .await;
    read.ok()??;
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The malformed-request row.
pub async fn malformed(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let nats = NatsServer::start();
    let logs = crate::scenarios::tempdir()?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    tokio::task::block_in_place(|| up.start())?;
    let port: u16 = up
        .base()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let requests: Vec<Hostile> = (0..profile.hostile_requests)
        .map(|_| hostile(rng))
        .collect();
    let statuses: Vec<Option<u16>> = futures::stream::iter(requests)
        .map(|h| send(port, h))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected = 0;
    for status in &statuses {
        let class = match status {
            Some(503) => "503".to_owned(),
            Some(s) if *s >= 500 => {
                unexpected += 1;
                s.to_string()
            }
            Some(s) => format!("{}xx", s / 100),
            None => "no answer".to_owned(),
        };
        *classes.entry(class).or_insert(0) += 1;
    }
    let alive = up.check();
    let peak = up.pid().and_then(peak_rss_kib);
    // Still serving: a valid event is accepted after all that.
    let after = reqwest::Client::new()
        .put(format!("{}/execute/default/ev1", up.base()))
        .body(r#"{"firstName":"A","lastName":"B"}"#)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    if alive && after != 202 {
        unexpected += 1;
    }
    up.stop();
    let note = classes
        .iter()
        .map(|(class, n)| format!("{class}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Row {
        name: "malformed requests".into(),
        attempted: profile.hostile_requests,
        crashes: up.crashes,
        unexpected,
        peak_rss_kib: peak,
        note: format!("{note}; a valid event afterwards: {after}"),
        ..Default::default()
    })
}

/// Schemas an attacker with write access to a schema ConfigMap might plant: patterns that
/// are catastrophic for a backtracking engine, and references that would make the ingress
/// fetch from the network (straight, nested, relative to a remote `$id`, and a remote
/// meta-schema), all at a listener that counts connections.
fn hostile_schemas(port: u16) -> Vec<(&'static str, String)> {
    let at = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    vec![
        (
            "backtrack",
            serde_json::json!({
                "type": "object",
                "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}},
                "patternProperties": {"^(x+x+)+y$": {"type": "string"}},
                "required": ["s"]
            })
            .to_string(),
        ),
        (
            "remote",
            serde_json::json!({"$ref": at("schema.json")}).to_string(),
        ),
        (
            "remotenest",
            serde_json::json!({"type": "object",
                "properties": {"x": {"$ref": at("defs.json#/x")}}})
            .to_string(),
        ),
        (
            "remoterel",
            serde_json::json!({"$id": at("root.json"), "type": "object",
                "properties": {"x": {"$ref": "other.json"}}})
            .to_string(),
        ),
        (
            "remotemeta",
            serde_json::json!({"$schema": at("meta.json"), "type": "object"}).to_string(),
        ),
    ]
}

/// A manifest declaring one event per schema (module `echo.wasm`), each schema in its own
/// ConfigMap.
fn schemas_manifest(schemas: &[(&str, String)]) -> String {
    let mut manifest = String::new();
    let mut events = String::new();
    for (name, schema) in schemas {
        manifest.push_str(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: hs-{name}}}\ndata:\n  hs-{name}.json: {}\n---\n",
            serde_json::to_string(schema).expect("a string serialises")
        ));
        events.push_str(&format!(
            "    - {{name: {name}, wasm: echo.wasm, schema: {{key: hs-{name}}}}}\n"
        ));
    }
    manifest.push_str(&format!(
        "apiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {{name: hostile-schemas}}\nspec:\n  events:\n{events}"
    ));
    manifest
}

/// Hostile schemas in a running `jobico up --nats`: events against the backtracking patterns
/// are answered at once (422 for the hostile strings, 202 for a matching one), the events whose
/// schema refers to the network are unavailable with the reason (500, as documented), and the
/// listener those references name sees no connection.
pub async fn schemas(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = connections.clone();
    let accepting = tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let nats = NatsServer::start();
    let logs = crate::scenarios::tempdir()?;
    let inputs = logs.join("inputs");
    std::fs::create_dir_all(&inputs)?;
    let schemas = hostile_schemas(port);
    std::fs::write(inputs.join("hostile.yaml"), schemas_manifest(&schemas))?;
    std::fs::copy(env.repo.join("samples/echo.wasm"), inputs.join("echo.wasm"))?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    up.args = vec!["--manifests".into(), inputs.display().to_string()];
    tokio::task::block_in_place(|| up.start())?;
    let client = reqwest::Client::new();
    let base = up.base();
    let n = (profile.hostile_requests / 4).max(20);
    // (event, body, the answer it must get)
    let mut requests: Vec<(String, String, u16)> = Vec::new();
    for i in 0..n {
        let k = rng.range(1, 60_000) as usize;
        let (body, expected) = match i % 4 {
            0 => (format!(r#"{{"s":"{}!"}}"#, "a".repeat(k)), 422),
            // A property the pattern names, not a string.
            1 => (
                format!(r#"{{"s":"a","{}y":1}}"#, "x".repeat(k.min(5_000))),
                422,
            ),
            2 => (format!(r#"{{"s":"{}"}}"#, "a".repeat(k)), 202),
            // Catastrophic for a backtracking engine: a long run that never matches.
            _ => (
                format!(r#"{{"s":"a","{}":"v"}}"#, "x".repeat(k.min(5_000))),
                202,
            ),
        };
        requests.push(("backtrack".into(), body, expected));
    }
    for (name, _) in schemas.iter().filter(|(n, _)| n.starts_with("remote")) {
        for _ in 0..10 {
            requests.push(((*name).into(), r#"{"x":1}"#.into(), 500));
        }
    }
    let attempted = requests.len();
    let answers: Vec<(u16, u16, String, Duration)> = futures::stream::iter(requests)
        .map(|(event, body, expected)| {
            let client = client.clone();
            let url = format!("{base}/execute/default/{event}");
            async move {
                let started = std::time::Instant::now();
                let answer = client.put(url).body(body).send().await;
                let (status, text) = match answer {
                    Ok(a) => (a.status().as_u16(), a.text().await.unwrap_or_default()),
                    Err(_) => (0, String::new()),
                };
                (status, expected, text, started.elapsed())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut unexpected = 0;
    for (status, expected, text, _) in &answers {
        // An unavailable event must say why (the external reference it refused).
        let explained = *expected != 500 || text.contains("unavailable");
        if status != expected || !explained {
            unexpected += 1;
            if unexpected <= 3 {
                eprintln!("chaos: hostile schemas: {status} (expected {expected}): {text:.200}");
            }
        }
    }
    let slowest = answers.iter().map(|a| a.3).max().unwrap_or_default();
    up.check();
    let peak = up.pid().and_then(peak_rss_kib);
    up.stop();
    accepting.abort();
    let connected = connections.load(std::sync::atomic::Ordering::SeqCst);
    Ok(Row {
        name: "hostile schemas (backtracking patterns, remote $ref)".into(),
        attempted,
        crashes: up.crashes,
        unexpected: unexpected + connected,
        peak_rss_kib: peak,
        note: format!(
            "slowest answer {:.0} ms; connections to the $ref listener: {connected}",
            slowest.as_secs_f64() * 1000.0
        ),
        ..Default::default()
    })
}
