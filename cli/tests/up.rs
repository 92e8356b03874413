//! `jobico up` end to end: the real binary, real HTTP, real modules through wasmtime.

mod common;

use common::{Receiver, Up, repo, runs, sink_sample};
use serde_json::json;

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
    let ran = runs(&lines);
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
fn modules_get_variables_from_the_manifests_configmaps_and_granted_secrets_only() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(repo().join("samples/ev3.yaml")).unwrap();
    std::fs::write(dir.path().join("ev3.yaml"), &sample).unwrap();
    let mut up = Up::start(dir.path(), &["--manifests", "."]);
    let (status, body) = up.put("/execute/default/ev3", "{}");
    assert_eq!(status, 202, "{body}");
    let tag = format!("[default/ev3 {}]", body["ids"][0].as_str().unwrap());
    up.wait_for(|l| l.starts_with(&tag) && l.contains("succeeded in"));
    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    let mut printed: Vec<_> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("{tag} stdout: ")))
        .collect();
    printed.sort_unstable();
    assert_eq!(
        printed,
        [
            "API_TOKEN=demo-token-not-a-real-one",
            "GREETING=hello",
            "SETTINGS_greeting=hello",
            "SETTINGS_level=info"
        ]
    );

    // The same Secret without the label: the event is unavailable, saying how to grant it.
    let ungranted = sample.replace("    jobico.coeux.dev/modules-may-read: \"true\"\n", "");
    assert_ne!(ungranted, sample);
    std::fs::write(dir.path().join("ev3.yaml"), ungranted).unwrap();
    let up = Up::start(dir.path(), &["--manifests", "."]);
    let (status, body) = up.put("/execute/default/ev3", "{}");
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("env[1]: Secret default/printenv-credentials is not granted to modules; grant it with `kubectl label secret printenv-credentials -n default jobico.coeux.dev/modules-may-read=true`"),
        "{body}"
    );
    assert!(!error.contains("demo-token"), "{body}");
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

/// A precompiled module is native code: `jobico up` refuses it from a manifest directory and
/// from a module ConfigMap, whatever its name, and the event says why.
#[test]
fn precompiled_modules_are_refused_in_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = wasm_exec::Runtime::new(wasm_exec::RuntimeConfig::default()).unwrap();
    let echo = std::fs::read(repo().join("samples/echo.wasm")).unwrap();
    let cwasm = runtime.precompile("echo.wasm", &echo).unwrap();
    std::fs::copy(repo().join("samples/ev1.yaml"), dir.path().join("ev1.yaml")).unwrap();
    std::fs::write(dir.path().join("fast.cwasm"), &cwasm).unwrap();
    let encoded = serde_json::to_string(&k8s_openapi::ByteString(cwasm)).unwrap();
    std::fs::write(
        dir.path().join("pre.yaml"),
        format!(
            "apiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {{name: pre}}\nspec:\n  events:\n    - {{name: evfile, wasm: fast.cwasm, schema: {{key: schema-ev1}}}}\n    - {{name: evmap, wasm: disguised.wasm, schema: {{key: schema-ev1}}}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: pre-modules}}\nbinaryData:\n  disguised.wasm: {encoded}\n"
        ),
    )
    .unwrap();
    let mut up = Up::start(dir.path(), &["--manifests", "."]);
    let event = r#"{"firstName":"A","lastName":"B"}"#;
    for (name, module) in [("evfile", "fast.cwasm"), ("evmap", "disguised.wasm")] {
        let (status, body) = up.put(&format!("/execute/default/{name}"), event);
        assert_eq!(status, 500, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(module), "{error}");
        assert!(error.contains("precompiled native code"), "{error}");
    }
    // The WebAssembly event beside them runs.
    assert_eq!(up.put("/execute/default/ev1", event).0, 202);
    up.wait_for(|l| l.contains("[default/ev1") && l.contains("succeeded in"));
    let (status, lines) = up.stop();
    assert!(status.success());
    assert_eq!(runs(&lines).len(), 1, "only ev1 ran");
}

#[test]
fn a_restart_loads_compiled_modules_from_the_cache_instead_of_compiling() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("modules");
    let dir_arg = dir.display().to_string();
    let env = [("JOBICO_LOG", "info,wasm_exec::cache=debug")];
    let first = Up::start_with_env(&repo(), &["--cache-dir", &dir_arg], &env);
    let (_, lines) = first.stop();
    assert!(
        !lines.iter().any(|l| l.contains("found in cache")),
        "nothing was cached yet: {lines:?}"
    );
    let entries = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "cwasm")
        })
        .count();
    assert!(entries >= 1, "the first start cached its modules");

    let mut second = Up::start_with_env(&repo(), &["--cache-dir", &dir_arg], &env);
    second.wait_for(|l| l.contains("compiled module found in cache"));
    // And it still runs events.
    let (status, body) = second.put(
        "/execute/default/ev1",
        r#"{"firstName":"Ada","lastName":"Lovelace"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let id = body["ids"][0].as_str().unwrap().to_string();
    second
        .wait_for(|l| l.starts_with(&format!("[default/ev1 {id}]")) && l.contains("succeeded in"));
    // --no-cache compiles again, keeping nothing.
    let third = Up::start_with_env(&repo(), &["--no-cache"], &env);
    let (_, lines) = third.stop();
    assert!(
        !lines.iter().any(|l| l.contains("found in cache")),
        "{lines:?}"
    );
}

#[test]
fn an_uploaded_module_runs_from_the_manifest_file_with_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let echo = std::fs::read(repo().join("samples/echo.wasm")).unwrap();
    std::fs::write(dir.path().join("any-name.wasm"), &echo).unwrap();
    let digest = jobico_common::executor::Sha256Digest::of(&echo);
    let other = "0".repeat(64);
    std::fs::write(
        dir.path().join("up.yaml"),
        format!(
            "apiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {{name: big}}\nspec:\n  events:\n    - {{name: big, wasm: \"sha256:{digest}\", schema: {{key: any, optional: true}}}}\n    - {{name: none, wasm: \"sha256:{other}\", schema: {{key: any, optional: true}}}}\n"
        ),
    )
    .unwrap();
    let mut up = Up::start(dir.path(), &["--manifests", "."]);
    let (status, body) = up.put("/execute/default/big", r#"{"n":1}"#);
    assert_eq!(status, 202, "{body}");
    let id = body["ids"][0].as_str().unwrap().to_owned();
    up.wait_for(|l| l.contains(&format!("[default/big {id}] stdout: {{\"n\":1}}")));
    // No file has the other digest: that event alone is unavailable, saying why.
    let (status, body) = up.put("/execute/default/none", "{}");
    assert_eq!(status, 500);
    assert!(
        body["error"].as_str().unwrap().contains("uploaded module"),
        "{body}"
    );
    assert!(up.stop().0.success());
}

#[test]
fn routes_chain_events_through_the_in_memory_queue() {
    let mut up = Up::start(&repo(), &[]);
    let (status, body) = up.put("/execute/default/order", r#"{"item":"book","qty":2}"#);
    assert_eq!(status, 202, "{body}");
    let order = body["ids"][0].as_str().unwrap().to_owned();
    let routed = up.wait_for(|l| l.starts_with(&format!("[default/order {order}] routed to")));
    let invoice = routed.rsplit(' ').next().unwrap().to_owned();
    assert!(routed.contains("routed to invoice h--"), "{routed}");
    let echoed = up.wait_for(|l| l.starts_with(&format!("[default/invoice {invoice}] stdout:")));
    assert!(
        echoed.ends_with(r#"{"order":{"item":"book","qty":2}}"#),
        "{echoed}"
    );

    let (status, body) = up.put("/execute/default/order", r#"{"item":"book","qty":500}"#);
    assert_eq!(status, 202, "{body}");
    let big = body["ids"][0].as_str().unwrap().to_owned();
    let refused = up.wait_for(|l| l.starts_with(&format!("[default/order {big}] route to")));
    assert!(
        refused.contains(r#"route to "invoice" refused: the data is invalid for its schema: /order/qty (maximum)"#),
        "{refused}"
    );
    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    assert_eq!(
        runs(&lines).len(),
        3,
        "two orders and one invoice ran: {lines:?}"
    );
}

#[test]
fn outcomes_reach_a_sink_as_cloud_events_retried_until_taken() {
    let receiver = Receiver::start(&[503]);
    let dir = tempfile::tempdir().unwrap();
    sink_sample(dir.path(), &receiver.url);
    let mut up = Up::start(&repo(), &["--manifests", dir.path().to_str().unwrap()]);
    let (status, body) = up.put("/execute/default/ship", r#"{"item":"book","to":"Ada"}"#);
    assert_eq!(status, 202, "{body}");
    let id = body["ids"][0].as_str().unwrap().to_owned();
    let tag = format!("[default/ship {id}] sink:");
    let failed = up.wait_for(|l| l.starts_with(&tag) && l.contains("attempt 1"));
    assert_eq!(
        failed,
        format!(
            "{tag} attempt 1 to {} failed: the receiver answered 503 Service Unavailable; retrying",
            receiver.url
        )
    );
    let delivered = up.wait_for(|l| l.starts_with(&tag) && l.contains("delivered"));
    assert_eq!(
        delivered,
        format!("{tag} delivered to {} (attempt 2)", receiver.url)
    );
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    let (content_type, event) = &received[1];
    assert_eq!(content_type, "application/cloudevents+json");
    assert_eq!(event["type"], "dev.coeux.jobico.ship.succeeded");
    assert_eq!(event["id"], id.as_str());
    assert_eq!(
        event["source"],
        "/apis/jobico.coeux.dev/v1/namespaces/default/jobs/job-for-ship"
    );
    assert_eq!(
        event["data"],
        serde_json::json!({"item": "book", "to": "Ada"})
    );
    assert!(up.stop().0.success());
}
