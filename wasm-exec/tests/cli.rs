//! The `wasm-exec` binary: output format, summary, termination message and exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::fixture;
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
    let written: RunSummary = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    assert_eq!(written, summary);
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
    let cut: RunSummary = serde_json::from_slice(&written).unwrap();
    assert_eq!((cut.events, cut.succeeded, cut.failed), (200, 199, 1));
    assert!(cut.omitted > 0);
    assert!(
        cut.outcomes
            .iter()
            .any(|o| o.id == "event-7" && o.exit_code == Some(42))
    );
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

#[test]
fn compile_then_run_the_cwasm() {
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
    let output = wasm_exec(
        &[
            cwasm.to_str().unwrap(),
            "--events-json",
            r#"{"id":"j1","data":{"k":"v"}}"#,
        ],
        &[],
        &log,
    );
    assert_eq!(output.status.code(), Some(EXIT_OK.into()), "{output:?}");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    assert!(stdout.contains("j1 log.debug init called\n"), "{stdout}");
    assert!(stdout.contains("j1 log.info {\"k\":\"v\"}\n"), "{stdout}");
    assert!(stdout.contains("j1 result {\"k\":\"v\"}\n"), "{stdout}");
    let summary = last_line_summary(&output);
    assert_eq!(summary.outcomes[0].result.as_deref(), Some(r#"{"k":"v"}"#));
}
