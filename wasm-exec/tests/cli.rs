//! The `wasm-exec` binary: output format, summary, termination message and exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::fixture;
use jobico_common::EventState;
use jobico_common::summary::{TerminationMessage, final_states};
use wasm_exec::{EXIT_GUEST_FAILED, EXIT_HOST_ERROR, EXIT_OK, ErrorKind, RunSummary};

fn wasm_exec(args: &[&str], env: &[(&str, &str)], termination_log: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasm-exec"));
    for (name, _) in std::env::vars() {
        if name.starts_with("JOBICO_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .arg("--termination-log")
        .arg(termination_log)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn last_line_summary(output: &Output) -> RunSummary {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn all_succeeded_exits_zero_and_prints_tagged_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let events = r#"[{"id":"a","data":{"x":1}},{"id":"b","data":2}]"#;
    let output = wasm_exec(
        &[
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--events-json",
            events,
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_OK.into()), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines[..2], [r#"a stdout {"x":1}"#, "b stdout 2"]);
    let summary = last_line_summary(&output);
    assert_eq!(
        (summary.events, summary.succeeded, summary.failed),
        (2, 2, 0)
    );
    // Small runs fit whole: the message is the summary, plus each event's index and state.
    let written: RunSummary = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(written, summary);
    let message: TerminationMessage =
        serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(message.outcomes[1].index, 1);
    assert_eq!(serde_json::to_value(&message.states).unwrap(), "ss");
}

#[test]
fn guest_failure_exits_one_from_env_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let module = fixture("wasi_modes.wat");
    let output = wasm_exec(
        &["--deadline", "200ms"],
        &[
            ("JOBICO_MODULE", module.to_str().unwrap()),
            (
                "JOBICO_EVENTS",
                r#"[{"id":"ok","data":1},{"id":"bad","data":"loop"}]"#,
            ),
        ],
        &log,
    );
    assert_eq!(
        output.status.code(),
        Some(EXIT_GUEST_FAILED.into()),
        "{output:?}"
    );
    let summary = last_line_summary(&output);
    assert_eq!(summary.outcomes[1].error, Some(ErrorKind::Deadline));
}

#[test]
fn large_batches_write_a_bounded_termination_message() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let events_file = dir.path().join("events.json");
    let events: Vec<_> = (0..200)
        .map(|i| serde_json::json!({"id": format!("event-{i}"), "data": if i == 7 { "exit".into() } else { serde_json::json!(i) }}))
        .collect();
    std::fs::write(&events_file, serde_json::to_vec(&events).unwrap()).unwrap();
    let output = wasm_exec(
        &[
            "run",
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_GUEST_FAILED.into()));
    assert_eq!(last_line_summary(&output).outcomes.len(), 200);
    let written = std::fs::read(&log).unwrap();
    assert!(
        written.len() <= wasm_exec::TERMINATION_MESSAGE_LIMIT,
        "{}",
        written.len()
    );
    let cut: TerminationMessage = serde_json::from_slice(&written).unwrap();
    assert_eq!((cut.events, cut.succeeded, cut.failed), (200, 199, 1));
    assert!(cut.omitted > 0);
    assert!(
        cut.outcomes
            .iter()
            .any(|o| o.index == 7 && o.outcome.id == "event-7" && o.outcome.exit_code == Some(42))
    );
}

/// The largest batch the dispatcher makes, with the longest ids, one event failing: through
/// the real binary, its termination message still decides all 100 events.
#[test]
fn a_hundred_events_with_one_failure_end_ninety_nine_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let events_file = dir.path().join("events.json");
    let ids: Vec<String> = (0..100)
        .map(|i| format!("{i:03}-{}", "x".repeat(59)))
        .collect();
    let events: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let data = if i == 61 {
                serde_json::json!("nonzero")
            } else {
                serde_json::json!({"payload": "p".repeat(100)})
            };
            serde_json::json!({"id": id, "data": data})
        })
        .collect();
    std::fs::write(&events_file, serde_json::to_vec(&events).unwrap()).unwrap();
    let output = wasm_exec(
        &[
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--events",
            events_file.to_str().unwrap(),
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_GUEST_FAILED.into()));
    assert!(last_line_summary(&output).to_json().len() > wasm_exec::TERMINATION_MESSAGE_LIMIT);
    let message = std::fs::read_to_string(&log).unwrap();
    assert!(message.len() <= wasm_exec::TERMINATION_MESSAGE_LIMIT);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let finals = final_states(&ids, output.status.code(), Some(&message));
    let states: Vec<_> = finals
        .iter()
        .map(|f| f.as_ref().map(|f| f.state()))
        .collect();
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == Some(EventState::Succeeded))
            .count(),
        99,
        "{message}"
    );
    assert_eq!(states[61], Some(EventState::Failed));
    assert_eq!(
        finals[61].as_ref().unwrap().reason().as_deref(),
        Some("guest exited with code 1")
    );
}

/// A megabyte of newlines is not a million log lines: the cap bounds what the host writes.
#[test]
fn the_output_cap_bounds_the_bytes_written_not_the_guest_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let id = "0190a6b2-7c1d-7e3f-8a4b-5c6d7e8f9a0b";
    let cap: usize = 64 << 10;
    let output = wasm_exec(
        &[
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--output-cap",
            &cap.to_string(),
            "--events-json",
            &format!(r#"{{"id":"{id}","data":"Newlines"}}"#),
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_OK.into()), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let summary_line = stdout.lines().last().unwrap().len() + 1;
    let written = stdout.len() - summary_line;
    // Beyond the cap only the marker line: `<id> stdout <marker>\n`.
    let marker_line = format!(
        "{id} stdout {}\n",
        wasm_exec::output::cap_marker(cap as u64)
    );
    assert!(
        written <= cap + marker_line.len(),
        "{written} bytes written for a cap of {cap}"
    );
    assert!(stdout.contains(&marker_line));
    // Each empty line costs its prefix (44 bytes): about 1,500 lines, not a million.
    let lines = stdout.lines().count();
    assert!(lines < cap / (id.len() + 8) + 3, "{lines}");
    let summary = last_line_summary(&output);
    assert_eq!(summary.outcomes[0].output_bytes, 1 << 20);
    assert!(summary.outcomes[0].output_truncated);
}

#[test]
fn configuration_errors_exit_two_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let events = r#"{"id":"a","data":1}"#;
    let cases: Vec<Vec<String>> = vec![
        vec![
            "/nonexistent/module.wasm".into(),
            "--events-json".into(),
            events.into(),
        ],
        vec![
            fixture("neither.wat").display().to_string(),
            "--events-json".into(),
            events.into(),
        ],
        vec![
            fixture("wasi_modes.wat").display().to_string(),
            "--events-json".into(),
            "[1]".into(),
        ],
        vec![
            fixture("wasi_modes.wat").display().to_string(),
            "--events-json".into(),
            events.into(),
            "--dir".into(),
            "/nonexistent/dir::/data".into(),
        ],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = wasm_exec(&args, &[], &log);
        assert_eq!(
            output.status.code(),
            Some(EXIT_HOST_ERROR.into()),
            "{args:?} {output:?}"
        );
        let summary = last_line_summary(&output);
        assert!(summary.error.is_some(), "{args:?}");
        let written: RunSummary = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
        assert_eq!(written.error, summary.error);
    }
    // Usage errors (clap) use the same code.
    let output = wasm_exec(&["--memory", "lots", "m.wasm"], &[], &log);
    assert_eq!(output.status.code(), Some(EXIT_HOST_ERROR.into()));
}

/// A `.cwasm` is native code: never loaded from a path unless the operator says so.
#[test]
fn precompiled_modules_are_refused_unless_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let cwasm = dir.path().join("echo.cwasm");
    let status = Command::new(env!("CARGO_BIN_EXE_wasm-exec"))
        .args([
            "compile",
            fixture("jobicolet_echo.wat").to_str().unwrap(),
            "-o",
        ])
        .arg(&cwasm)
        .status()
        .unwrap();
    assert!(status.success());
    // Crafted: ELF bytes under a harmless name.
    let crafted = dir.path().join("innocent.wasm");
    std::fs::write(&crafted, b"\x7fELF\x02\x01\x01\0not really code").unwrap();
    let event = r#"{"id":"j1","data":{"k":"v"}}"#;
    for module in [&cwasm, &crafted] {
        for env in [&[][..], &[("JOBICO_TRUST_PRECOMPILED", "true")][..]] {
            let output = wasm_exec(
                &[module.to_str().unwrap(), "--events-json", event],
                env,
                &log,
            );
            assert_eq!(
                output.status.code(),
                Some(EXIT_HOST_ERROR.into()),
                "{output:?}"
            );
            let stdout = String::from_utf8(output.stdout.clone()).unwrap();
            assert_eq!(stdout.lines().count(), 1, "nothing ran: {stdout}");
            let error = last_line_summary(&output).error.unwrap();
            assert!(error.contains("precompiled native code"), "{error}");
            assert!(error.contains("--trust-precompiled"), "{error}");
        }
    }
    // The operator's explicit flag loads the real one.
    let output = wasm_exec(
        &[
            cwasm.to_str().unwrap(),
            "--trust-precompiled",
            "--events-json",
            event,
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_OK.into()), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    assert!(stdout.contains("j1 log.debug init called\n"), "{stdout}");
    assert!(stdout.contains("j1 result {\"k\":\"v\"}\n"), "{stdout}");
    let summary = last_line_summary(&output);
    assert_eq!(summary.outcomes[0].result.as_deref(), Some(r#"{"k":"v"}"#));
}

/// A one-shot HTTP server on a free port answering each request with `status`; hands back
/// each request's head and body.
fn results_server(
    statuses: Vec<u16>,
) -> (
    String,
    std::thread::JoinHandle<Vec<(String, serde_json::Value)>>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/results/default/order",
        listener.local_addr().unwrap()
    );
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for status in statuses {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: 2\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{{}}"
            );
            reader.get_mut().write_all(answer.as_bytes()).unwrap();
            seen.push((head, serde_json::from_slice(&body).unwrap()));
        }
        seen
    });
    (url, handle)
}

#[test]
fn a_job_with_routes_posts_every_outcome_with_the_stdout_as_result_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let (url, server) = results_server(vec![503, 200]);
    let events = r#"[{"id":"a","data":{"total":12}},{"id":"b","data":"unreachable"}]"#;
    let output = wasm_exec(
        &[
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--events-json",
            events,
        ],
        &[
            ("JOBICO_RESULTS_URL", &url),
            ("JOBICO_RESULTS_TOKEN", "batch-token"),
        ],
        &log,
    );
    // b trapped in the guest: exit 1, and the post got through on its second attempt.
    assert_eq!(
        output.status.code(),
        Some(EXIT_GUEST_FAILED.into()),
        "{output:?}"
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 2);
    let (head, body) = &seen[1];
    assert!(head.starts_with("POST /results/default/order "), "{head}");
    assert!(head.contains("authorization: Bearer batch-token"), "{head}");
    let digest = jobico_common::summary::batch_digest(&["a", "b"]);
    assert!(head.contains(&format!("jobico-batch: {digest}")), "{head}");
    let outcomes = body["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 2, "{body}");
    assert_eq!(outcomes[0]["result"], "{\"total\":12}\n", "{body}");
    assert_eq!(outcomes[1]["status"], "failed", "{body}");
    assert_eq!(outcomes[1]["error"], "trap", "{body}");
}

#[test]
fn outcomes_the_ingress_refuses_make_a_host_error_so_the_pod_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let (url, server) = results_server(vec![403]);
    let output = wasm_exec(
        &[
            fixture("wasi_modes.wat").to_str().unwrap(),
            "--events-json",
            r#"[{"id":"a","data":1}]"#,
        ],
        &[
            ("JOBICO_RESULTS_URL", &url),
            ("JOBICO_RESULTS_TOKEN", "wrong"),
        ],
        &log,
    );
    assert_eq!(
        output.status.code(),
        Some(EXIT_HOST_ERROR.into()),
        "{output:?}"
    );
    assert_eq!(server.join().unwrap().len(), 1, "a 4xx is not retried");
    let message: TerminationMessage =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    let error = message.error.clone().unwrap();
    assert!(error.contains("answered 403"), "{error}");
    // The tracker leaves such a run to the Job, which runs the pod again.
    assert_eq!(
        final_states(
            &["a"],
            Some(EXIT_HOST_ERROR.into()),
            Some(&message.to_json())
        ),
        [None]
    );
}
