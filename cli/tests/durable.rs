//! `jobico up --nats`: durable local mode end to end, the real binary against a real
//! nats-server.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Receiver, Up, repo, runs, sink_sample};
use jobico_testkit::NatsServer;
use serde_json::Value;

/// How long an event may take to reach a state; generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// A valid `ev1` event of the samples.
const ADA: &str = r#"{"firstName":"Ada","lastName":"Lovelace"}"#;

/// A WASI command that spins for about half a second (200 million iterations) and prints
/// `done`: long enough to kill `jobico up` while it runs. Guests cannot sleep (wasm-exec
/// refuses poll_oneoff).
const SLOW_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "done\n")
  (func (export "_start")
    (local $i i64)
    (local.set $i (i64.const 200000000))
    (loop $spin
      (local.set $i (i64.sub (local.get $i) (i64.const 1)))
      (br_if $spin (i64.ne (local.get $i) (i64.const 0))))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// A WASI command that traps at once.
const TRAP_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") unreachable))"#;

/// Events `slow` and `trap` (any JSON accepted), with their modules, in `dir`.
fn write_fixtures(dir: &Path) {
    std::fs::write(dir.join("slow.wasm"), wat::parse_str(SLOW_WAT).unwrap()).unwrap();
    std::fs::write(dir.join("trap.wasm"), wat::parse_str(TRAP_WAT).unwrap()).unwrap();
    std::fs::write(
        dir.join("fixtures.yaml"),
        "apiVersion: jobico.coeux.dev/v1\nkind: Job\nmetadata: {name: fixtures}\nspec:\n  events:\n    - {name: slow, wasm: slow.wasm, schema: {key: any, optional: true}}\n    - {name: trap, wasm: trap.wasm, schema: {key: any, optional: true}}\n",
    )
    .unwrap();
}

/// Polls the event's state record until `done` holds for it; returns the record.
fn wait_for_state(up: &Up, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, record) = up.get(&format!("/events/default/{id}"));
        if status == 200 && done(&record) {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} did not reach the expected state; last answer {status}: {record}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn accepted_id(up: &Up, path: &str, body: &str) -> String {
    let (status, answer) = up.put(path, body);
    assert_eq!(status, 202, "{answer}");
    answer["ids"][0].as_str().unwrap().to_owned()
}

#[test]
fn durable_mode_runs_events_and_records_their_states() {
    let nats = NatsServer::start();
    let fixtures = tempfile::tempdir().unwrap();
    write_fixtures(fixtures.path());
    let samples = repo().join("samples");
    let mut up = Up::start(
        &repo(),
        &[
            "--nats",
            &nats.url(),
            "--manifests",
            samples.to_str().unwrap(),
            "--manifests",
            fixtures.path().to_str().unwrap(),
        ],
    );
    up.wait_for(|l| l.contains("local mode ready (durable"));

    // Accepted, run with its output tagged as in memory mode, then recorded with the summary.
    let id = accepted_id(&up, "/execute/default/ev1", ADA);
    let tag = format!("[default/ev1 {id}]");
    let echoed = up.wait_for(|l| l.starts_with(&tag) && l.contains("stdout:"));
    assert_eq!(echoed, format!("{tag} stdout: {ADA}"));
    let record = wait_for_state(&up, &id, |r| r["state"] == "succeeded");
    assert_eq!(record["exitCode"], 0, "{record}");
    assert_eq!(record["summary"]["id"], id.as_str(), "{record}");
    assert_eq!(record["summary"]["status"], "succeeded", "{record}");
    assert_eq!(record["summary"]["output_bytes"], ADA.len(), "{record}");
    assert!(
        record["job"].as_str().unwrap().starts_with("jobico-ev1-"),
        "{record}"
    );

    // A guest failure is recorded as failed, with wasm-exec's exit code and the reason.
    let trapped = accepted_id(&up, "/execute/default/trap", "{}");
    let record = wait_for_state(&up, &trapped, |r| r["state"] == "failed");
    assert_eq!(record["exitCode"], 1, "{record}");
    assert_eq!(record["summary"]["error"], "trap", "{record}");
    assert!(record["reason"].is_string(), "{record}");

    // A rejected event is never published, so never run.
    let (status, _) = up.put("/execute/default/ev1", r#"{"firstName":"Ada"}"#);
    assert_eq!(status, 422);

    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    let ran = runs(&lines);
    assert_eq!(ran.len(), 2, "exactly the two accepted events ran: {ran:?}");
}

#[test]
fn accepted_events_survive_a_crash_and_run_after_a_restart() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_fixtures(dir.path());
    let url = nats.url();
    // One event at a time, so the first runs while the others wait in the stream; a short ack
    // wait so the event the crash interrupted is handed out again quickly.
    let args = [
        "--manifests",
        ".",
        "--nats",
        &url,
        "--executors",
        "1",
        "--ack-wait-secs",
        "2",
    ];
    let up = Up::start(dir.path(), &args);
    let ids: Vec<_> = (0..3)
        .map(|_| accepted_id(&up, "/execute/default/slow", "{}"))
        .collect();
    // Kill while the first event runs: it is claimed and not finished.
    wait_for_state(&up, &ids[0], |r| {
        r["state"] == "dispatched" || r["state"] == "running"
    });
    let (_, before) = up.kill();
    let finished_before: Vec<_> = ids
        .iter()
        .filter(|id| {
            before
                .iter()
                .any(|l| l.contains(id.as_str()) && l.contains("succeeded in"))
        })
        .collect();
    assert!(
        finished_before.len() < ids.len(),
        "the crash came after every event had run: {finished_before:?}"
    );

    let mut up = Up::start(dir.path(), &args);
    for id in &ids {
        let record = wait_for_state(&up, id, |r| r["state"] == "succeeded");
        assert_eq!(record["summary"]["status"], "succeeded", "{record}");
    }
    // Every event the crash interrupted or kept from running ran in the new process.
    for id in ids.iter().filter(|id| !finished_before.contains(id)) {
        up.wait_for(|l| l.contains(&format!("[default/slow {id}] succeeded in")));
    }
    assert!(up.stop().0.success());
}

#[test]
fn sigterm_lets_a_running_event_finish_before_exiting() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_fixtures(dir.path());
    let up = Up::start(dir.path(), &["--manifests", ".", "--nats", &nats.url()]);
    let id = accepted_id(&up, "/execute/default/slow", "{}");
    wait_for_state(&up, &id, |r| r["state"] == "dispatched");
    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("[default/slow {id}] succeeded in"))),
        "the running event was drained: {lines:?}"
    );
}

#[test]
fn nats_away_means_503_with_retry_after() {
    let mut nats = NatsServer::start();
    let up = Up::start(&repo(), &["--nats", &nats.url()]);
    nats.kill();
    let answer = up.send(
        reqwest::Method::PUT,
        "/execute/default/ev1",
        Some(ADA),
        None,
    );
    assert_eq!(
        (answer.status, answer.retry_after.as_deref()),
        (503, Some("2")),
        "{}",
        answer.body
    );
    assert!(up.stop().0.success());
}

/// Waits for the record at `path` (`/events/<ns>/<event>/<id>`) to be final.
fn wait_for_final(up: &Up, path: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, record) = up.get(path);
        if status == 200 && (record["state"] == "succeeded" || record["state"] == "failed") {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not reach a final state; last answer {status}: {record}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_same_key_for_two_event_types_or_two_sources_gives_distinct_events() {
    let nats = NatsServer::start();
    let mut up = Up::start(&repo(), &["--nats", &nats.url()]);
    up.wait_for(|l| l.contains("local mode ready (durable"));
    let key = [("Idempotency-Key", "order-42")];

    // One client key, two event types: two events, each runs, each has its own record.
    let (status, first) = up.put_headers("/execute/default/ev1", ADA, &key);
    assert_eq!(status, 202, "{first}");
    let ev1_id = first["ids"][0].as_str().unwrap().to_owned();
    wait_for_final(&up, &format!("/events/default/ev1/{ev1_id}"));
    let (status, second) = up.put_headers("/execute/default/ev2", ADA, &key);
    assert_eq!(status, 202, "{second}");
    assert_ne!(second["duplicate"], true, "{second}");
    let ev2_id = second["ids"][0].as_str().unwrap().to_owned();
    let record = wait_for_final(&up, &format!("/events/default/ev2/{ev2_id}"));
    assert_eq!(
        (record["event"].as_str(), record["state"].as_str()),
        (Some("ev2"), Some("succeeded")),
        "{record}"
    );
    let record = wait_for_final(&up, &format!("/events/default/ev1/{ev1_id}"));
    assert_eq!(record["event"], "ev1", "{record}");
    // The key alone names two events: the answer says which, instead of picking one.
    if ev1_id == ev2_id {
        let (status, answer) = up.get(&format!("/events/default/{ev1_id}"));
        assert_eq!(status, 409, "{answer}");
        assert_eq!(
            answer["events"],
            serde_json::json!(["ev1", "ev2"]),
            "{answer}"
        );
    }
    // A repeat of the same (event type, key) is still a duplicate.
    let (status, again) = up.put_headers("/execute/default/ev2", ADA, &key);
    assert_eq!(
        (status, again["duplicate"].as_bool()),
        (202, Some(true)),
        "{again}"
    );

    // Two CloudEvents sources using the same id: two events.
    let cloud_event = |source: &str| {
        format!(r#"{{"specversion":"1.0","id":"1","source":"{source}","type":"t","data":{ADA}}}"#)
    };
    let structured = [("Content-Type", "application/cloudevents+json")];
    let mut ce_ids = Vec::new();
    for source in ["/a", "/b"] {
        let (status, answer) =
            up.put_headers("/execute/default/ev1", &cloud_event(source), &structured);
        assert_eq!(status, 202, "{answer}");
        assert_ne!(answer["duplicate"], true, "{answer}");
        ce_ids.push(answer["ids"][0].as_str().unwrap().to_owned());
    }
    assert_ne!(ce_ids[0], ce_ids[1]);
    for id in &ce_ids {
        wait_for_final(&up, &format!("/events/default/ev1/{id}"));
    }

    // Batch items of key K never collide with a literal key that looks like an item id.
    let (status, batch) = up.put_headers(
        "/execute/default/ev1",
        &format!(r#"{{"data":[{ADA},{ADA}]}}"#),
        &[("Idempotency-Key", "K")],
    );
    assert_eq!(status, 202, "{batch}");
    let items: Vec<String> = batch["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let mut all = items.clone();
    for literal in ["K-0", "K-1"] {
        let (status, answer) =
            up.put_headers("/execute/default/ev1", ADA, &[("Idempotency-Key", literal)]);
        assert_eq!(status, 202, "{answer}");
        assert_ne!(answer["duplicate"], true, "key {literal:?}: {answer}");
        all.push(answer["ids"][0].as_str().unwrap().to_owned());
    }
    // An item id sent back as a key is that item (the 503 retry recipe): stored once.
    let (status, again) = up.put_headers(
        "/execute/default/ev1",
        ADA,
        &[("Idempotency-Key", &items[1])],
    );
    assert_eq!(
        (status, again["duplicate"].as_bool()),
        (202, Some(true)),
        "{again}"
    );
    assert_eq!(again["ids"][0], items[1].as_str());
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 4, "{all:?}");
    for id in &all {
        wait_for_final(&up, &format!("/events/default/ev1/{id}"));
    }

    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    assert_eq!(runs(&lines).len(), 2 + 2 + 4, "{:?}", runs(&lines));
}

/// A NATS user with every permission, for `jobico up` (which is the ingress and the
/// dispatcher in one process).
const LOCAL_USER_CONFIG: &str =
    "authorization { users = [ { user: local, password: $LOCAL_PASSWORD } ] }";

/// Runs `jobico up ARGS` expecting it to stop by itself; its exit status and output.
fn refused(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_jobico"))
        .arg("up")
        .args(["--listen", "127.0.0.1:0", "--manifests"])
        .arg(repo().join("samples"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("jobico up {args:?} did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status, text)
}

#[test]
fn durable_mode_connects_with_a_user_and_a_password_file_and_refuses_to_start_without() {
    let nats = NatsServer::start_with_config(LOCAL_USER_CONFIG, &[("LOCAL_PASSWORD", "s3cret")]);
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let missing = dir.path().join("missing");
    let (url, password, wrong, missing) = (
        nats.url(),
        password.to_str().unwrap().to_owned(),
        wrong.to_str().unwrap().to_owned(),
        missing.to_str().unwrap().to_owned(),
    );

    // Without credentials, with a wrong password, with an unreadable password file, with
    // credentials but no server: it says why and stops.
    let with_user =
        |file: &str| ["--nats-user", "local", "--nats-password-file", file].map(str::to_owned);
    let cases: [(Vec<String>, String); 4] = [
        (
            vec!["--nats".into(), url.clone()],
            format!("cannot use NATS at {url} as no credentials"),
        ),
        (
            [
                vec!["--nats".into(), url.clone()],
                with_user(&wrong).to_vec(),
            ]
            .concat(),
            format!("cannot use NATS at {url} as user local"),
        ),
        (
            [
                vec!["--nats".into(), url.clone()],
                with_user(&missing).to_vec(),
            ]
            .concat(),
            format!("cannot read the NATS password file {missing}"),
        ),
        (with_user(&password).to_vec(), "need --nats URL".into()),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, output) = refused(&args);
        assert!(!status.success(), "{args:?} started");
        assert!(
            output.contains(&expected),
            "{args:?}: {expected:?} not in {output}"
        );
    }
    assert!(
        nats.log().contains("authentication error"),
        "the server refused nobody:\n{}",
        nats.log()
    );

    // With its user: events are kept and run as without authorization.
    let samples = repo().join("samples");
    let mut up = Up::start(
        &repo(),
        &[
            "--nats",
            &url,
            "--nats-user",
            "local",
            "--nats-password-file",
            &password,
            "--manifests",
            samples.to_str().unwrap(),
        ],
    );
    up.wait_for(|l| l.contains("local mode ready (durable") && l.contains("as user local"));
    let id = accepted_id(&up, "/execute/default/ev1", ADA);
    let record = wait_for_state(&up, &id, |r| r["state"] == "succeeded");
    assert_eq!(record["exitCode"], 0, "{record}");
    assert!(up.stop().0.success());
}

#[test]
fn module_upload_puts_a_large_module_into_the_store_through_the_ingress() {
    let nats = NatsServer::start();
    let up = Up::start(&repo(), &["--nats", &nats.url()]);
    let dir = tempfile::tempdir().unwrap();
    // samples/echo.wasm with a 1.5 MiB custom section: past a ConfigMap's 1 MiB.
    let echo = std::fs::read(repo().join("samples/echo.wasm")).unwrap();
    let module = jobico_testkit::with_custom_section(echo, 3 << 19);
    let file = dir.path().join("big.wasm");
    std::fs::write(&file, &module).unwrap();
    let digest = jobico_common::executor::Sha256Digest::of(&module);
    let upload = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_jobico"))
            .args(["module", "upload", "orders"])
            .arg(&file)
            .args(["-n", "default", "--anonymous", "--ingress", &up.base()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let printed = upload();
    assert!(
        printed.contains(&format!("wasm: sha256:{digest}")),
        "{printed}"
    );
    assert!(
        printed.contains(" uploaded in namespace default"),
        "{printed}"
    );
    assert!(upload().contains("was there already"));
    let kept = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let store = jobico_store::ModuleStore::open(&js, 1).await.unwrap();
        store.get("default", digest).await.unwrap()
    });
    assert_eq!(kept, Some(module));
    assert!(up.stop().0.success());
}

#[test]
fn routes_chain_events_and_the_records_show_the_chain() {
    let nats = NatsServer::start();
    let samples = repo().join("samples");
    let mut up = Up::start(
        &repo(),
        &[
            "--nats",
            &nats.url(),
            "--manifests",
            samples.to_str().unwrap(),
        ],
    );
    up.wait_for(|l| l.contains("local mode ready (durable"));
    let child_of = |parent: &Value, event: &str| -> String {
        let children = parent["children"].as_array().expect("children listed");
        assert_eq!(children.len(), 1, "{parent}");
        assert_eq!(children[0]["event"], event, "{parent}");
        children[0]["id"].as_str().unwrap().to_owned()
    };

    // Success: the order's result is the invoice's data.
    let order = accepted_id(&up, "/execute/default/order", r#"{"item":"book","qty":2}"#);
    let parent = wait_for_state(&up, &order, |r| r["state"] == "succeeded");
    let invoice = child_of(&parent, "invoice");
    let child = wait_for_state(&up, &invoice, |r| r["state"] == "succeeded");
    assert_eq!(child["event"], "invoice", "{child}");
    assert_eq!(
        child["parent"],
        serde_json::json!({"event": "order", "id": order})
    );
    let echoed = up.wait_for(|l| l.starts_with(&format!("[default/invoice {invoice}] stdout:")));
    assert!(
        echoed.ends_with(r#"{"order":{"item":"book","qty":2}}"#),
        "{echoed}"
    );

    // Failure: the alert gets what went wrong.
    let failing = accepted_id(&up, "/execute/default/order", r#"{"item":"book","qty":0}"#);
    let parent = wait_for_state(&up, &failing, |r| r["state"] == "failed");
    let alert = child_of(&parent, "alert");
    let child = wait_for_state(&up, &alert, |r| r["state"] == "succeeded");
    assert_eq!(child["parent"]["id"], failing.as_str(), "{child}");
    let echoed = up.wait_for(|l| l.starts_with(&format!("[default/alert {alert}] stdout:")));
    assert!(
        echoed.contains(&format!(
            r#""error":"exit","event":"order","exitCode":3,"id":"{failing}""#
        )),
        "{echoed}"
    );

    // A result its target refuses: recorded on the parent, dead-lettered under the child's id.
    let big = accepted_id(
        &up,
        "/execute/default/order",
        r#"{"item":"book","qty":500}"#,
    );
    let parent = wait_for_state(&up, &big, |r| r["state"] == "succeeded");
    assert!(parent["children"].is_null(), "{parent}");
    let failure = &parent["routeFailures"][0];
    assert_eq!(failure["event"], "invoice", "{parent}");
    let reason = failure["reason"].as_str().unwrap();
    assert!(
        reason.contains("/order/qty (maximum): 500 is greater than the maximum of 100"),
        "{reason}"
    );
    let dead = wait_for_state(&up, failure["id"].as_str().unwrap(), |r| {
        r["state"] == "dead-lettered"
    });
    assert_eq!(dead["reason"], reason, "{dead}");
    assert_eq!(dead["parent"]["id"], big.as_str(), "{dead}");

    // The same order again (same key, same id): no second run, no second invoice.
    let again = |up: &Up| {
        let (status, body) = up.put_headers(
            "/execute/default/order",
            r#"{"item":"pen","qty":1}"#,
            &[("Idempotency-Key", "order-42")],
        );
        assert_eq!(status, 202, "{body}");
        body["ids"][0].as_str().unwrap().to_owned()
    };
    let keyed = again(&up);
    let parent = wait_for_state(&up, &keyed, |r| r["state"] == "succeeded");
    let invoice = child_of(&parent, "invoice");
    wait_for_state(&up, &invoice, |r| r["state"] == "succeeded");
    assert_eq!(again(&up), keyed);
    let (status, lines) = up.stop();
    assert!(status.success(), "{status}");
    let ran = runs(&lines);
    let invoices = ran
        .iter()
        .filter(|l| l.starts_with("[default/invoice "))
        .count();
    assert_eq!(invoices, 2, "one invoice per accepted order: {ran:?}");
    assert_eq!(
        ran.len(),
        4 + 3,
        "four orders, two invoices, one alert: {ran:?}"
    );
}

#[test]
fn outcomes_reach_a_sink_through_the_outbox_and_the_record_shows_the_attempts() {
    let nats = NatsServer::start();
    let receiver = Receiver::start(&[500, 502]);
    let dir = tempfile::tempdir().unwrap();
    sink_sample(dir.path(), &receiver.url);
    let mut up = Up::start(
        &repo(),
        &[
            "--nats",
            &nats.url(),
            "--manifests",
            dir.path().to_str().unwrap(),
        ],
    );
    up.wait_for(|l| l.contains("local mode ready (durable"));
    let id = accepted_id(
        &up,
        "/execute/default/ship",
        r#"{"item":"pen","to":"Alan"}"#,
    );
    let record = wait_for_state(&up, &id, |r| {
        r["state"] == "succeeded" && r["sink"]["deliveredAt"].is_string()
    });
    assert_eq!(record["sink"]["url"], receiver.url.as_str(), "{record}");
    assert_eq!(record["sink"]["attempts"], 3, "{record}");
    assert!(record["sink"]["lastError"].is_null(), "{record}");
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|(_, event)| *event == received[2].1));
    assert_eq!(
        received[2].1["data"],
        serde_json::json!({"item": "pen", "to": "Alan"})
    );
    assert_eq!(received[2].1["subject"], id.as_str());
    assert!(up.stop().0.success());
}
