//! Jobicolet guests through real wasmtime instances, and ABI refusal.

mod common;

use std::time::{Duration, Instant};

use common::{fixture, load, run, run_with};
use serde_json::json;
use wasm_exec::{Abi, Error, ErrorKind, Limits, LogLevel, Status, Stream};

#[test]
fn echo_logs_and_returns_the_event() {
    let module = load("jobicolet_echo.wat");
    assert_eq!(module.abi(), Abi::Jobicolet);
    let (outcome, sink) = run(&module, json!({"firstName": "Ada"}));
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.result.as_deref(), Some(r#"{"firstName":"Ada"}"#));
    assert_eq!(sink.texts(Stream::Log(LogLevel::Debug)), ["init called"]);
    assert_eq!(
        sink.texts(Stream::Log(LogLevel::Info)),
        [r#"{"firstName":"Ada"}"#]
    );
    assert_eq!(sink.texts(Stream::Result), [r#"{"firstName":"Ada"}"#]);
    // Log (11 + 19 bytes) and result (19 bytes).
    assert_eq!(outcome.output_bytes, 49);
}

#[test]
fn error_code_fails_the_event_and_keeps_the_result() {
    let module = load("jobicolet_echo.wat");
    let (outcome, sink) = run(&module, json!("fail"));
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.error, Some(ErrorKind::GuestError));
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.result.as_deref(), Some("failed on purpose"));
    assert_eq!(sink.texts(Stream::Result), ["failed on purpose"]);
}

#[test]
fn wild_result_pointer_is_an_abi_failure() {
    let module = load("jobicolet_echo.wat");
    let (outcome, _) = run(&module, json!("wild"));
    assert_eq!(outcome.error, Some(ErrorKind::Abi), "{outcome:?}");
    assert!(outcome.message.unwrap().contains("outside memory"));
}

#[test]
fn deadline_applies_inside_event() {
    let module = load("jobicolet_echo.wat");
    let limits = Limits {
        deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = Instant::now();
    let (outcome, _) = run_with(&module, json!("loop"), &limits);
    assert_eq!(outcome.error, Some(ErrorKind::Deadline));
    assert!(started.elapsed() < Duration::from_millis(1200));
}

#[test]
fn version_one_frees_with_size_and_never_calls_start() {
    let module = load("jobicolet_v1.wat");
    assert_eq!(module.abi(), Abi::Jobicolet);
    let (outcome, _) = run(&module, json!("hi!"));
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(outcome.result.as_deref(), Some("ok"));
    // Its `free` traps on a wrong size, which would show as a warning.
    assert_eq!(outcome.warning, None);
}

#[test]
fn a_trap_in_the_trailing_free_keeps_the_result_and_warns() {
    let module = load("jobicolet_free_traps.wat");
    let (outcome, sink) = run(&module, json!("x"));
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.result.as_deref(), Some("kept"));
    assert_eq!(sink.texts(Stream::Result), ["kept"]);
    let warning = outcome.warning.expect("a warning");
    assert!(warning.contains("`free` failed"), "{warning}");
    assert!(warning.contains("unreachable"), "{warning}");

    // The guest's own error code still decides, with the result kept.
    let (outcome, _) = run(&module, json!("fail"));
    assert_eq!(
        (outcome.status, outcome.error, outcome.exit_code),
        (Status::Failed, Some(ErrorKind::GuestError), Some(7))
    );
    assert_eq!(outcome.result.as_deref(), Some("kept"));
    assert!(outcome.warning.is_some());

    // A `free` that hangs is cut by the deadline, and ignored the same way.
    let limits = Limits {
        deadline: Duration::from_millis(100),
        ..Limits::default()
    };
    let (outcome, _) = run_with(&module, json!("loop"), &limits);
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert!(outcome.warning.unwrap().contains("interrupt"));
}

#[test]
fn a_trap_before_the_result_still_fails_the_event() {
    let module = load("jobicolet_free_traps.wat");
    for data in ["malloc", "event"] {
        let (outcome, _) = run(&module, json!(data));
        assert_eq!(
            (outcome.status, outcome.error),
            (Status::Failed, Some(ErrorKind::Trap)),
            "{data}: {outcome:?}"
        );
        assert_eq!((outcome.result, outcome.warning), (None, None), "{data}");
    }
}

#[test]
fn a_module_fitting_neither_abi_is_refused() {
    let error = common::runtime()
        .load_file(fixture("neither.wat"))
        .unwrap_err();
    assert!(matches!(error, Error::Abi { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("neither.wat"), "{text}");
    assert!(text.contains("`_start` (missing)"), "{text}");
    assert!(text.contains("missing: malloc, init"), "{text}");
}

#[test]
fn unknown_imports_are_refused_at_load() {
    let wat = r#"(module (import "env" "nope" (func)) (func (export "_start")))"#;
    let error = common::runtime()
        .load_bytes("nope.wat", wat.as_bytes())
        .unwrap_err();
    assert!(matches!(error, Error::Link { .. }), "{error:?}");
}
