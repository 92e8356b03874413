//! WASI preview1 guests through real wasmtime instances: output, limits, traps, capabilities.

mod common;

use std::time::{Duration, Instant};

use common::{event, fixture, load, run, run_with};
use serde_json::json;
use wasm_exec::output::cap_marker;
use wasm_exec::{Abi, Capabilities, DirGrant, EnvVar, ErrorKind, Limits, Status, Stream, VecSink};

#[test]
fn echo_prints_the_event_json_on_stdout() {
    let module = load("wasi_modes.wat");
    assert_eq!(module.abi(), Abi::Wasi);
    let (outcome, sink) = run(&module, json!({"firstName": "Ada"}));
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.error, None);
    assert_eq!(sink.texts(Stream::Stdout), [r#"{"firstName":"Ada"}"#]);
    assert!(sink.lines.iter().all(|line| line.event_id == "e1"));
    assert_eq!(outcome.output_bytes, 20);
}

#[test]
fn infinite_loop_stops_at_the_deadline() {
    let module = load("wasi_modes.wat");
    let limits = Limits {
        deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = Instant::now();
    let (outcome, _) = run_with(&module, json!("loop"), &limits);
    let elapsed = started.elapsed();
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.error, Some(ErrorKind::Deadline), "{outcome:?}");
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1200), "{elapsed:?}");
    // The module stays usable: the next event runs normally.
    let (next, _) = run(&module, json!(1));
    assert_eq!(next.status, Status::Succeeded);
}

#[test]
fn a_guest_cannot_sleep_past_its_deadline() {
    // poll_oneoff would block in host code, where epoch interruption cannot reach; it is
    // refused with NOTSUP (58) instead, which this guest turns into its exit code.
    let module = load("wasi_modes.wat");
    let limits = Limits {
        deadline: Duration::from_millis(500),
        ..Limits::default()
    };
    let started = Instant::now();
    let (outcome, _) = run_with(&module, json!("zzz"), &limits);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome.error, Some(ErrorKind::Exit), "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(58));
}

#[test]
fn memory_growth_past_the_limit_fails_with_memory() {
    let module = load("wasi_modes.wat");
    let limits = Limits {
        memory_bytes: 4 << 20,
        ..Limits::default()
    };
    let (outcome, _) = run_with(&module, json!("grow"), &limits);
    assert_eq!(outcome.error, Some(ErrorKind::Memory), "{outcome:?}");
    let message = outcome.message.unwrap();
    assert!(
        message.contains("memory limit of 4194304 bytes"),
        "{message}"
    );
}

#[test]
fn initial_memory_above_the_limit_fails_with_memory() {
    let module = load("big_memory.wat");
    let (outcome, _) = run(&module, json!(null));
    assert_eq!(outcome.error, Some(ErrorKind::Memory), "{outcome:?}");
    let roomy = Limits {
        memory_bytes: 256 << 20,
        ..Limits::default()
    };
    assert_eq!(
        run_with(&module, json!(null), &roomy).0.status,
        Status::Succeeded
    );
}

#[test]
fn traps_fail_the_event_with_their_reason() {
    let module = load("wasi_modes.wat");
    let cases = [
        ("unreachable", "unreachable"),
        ("bounds", "out of bounds memory access"),
        ("stack", "call stack exhausted"),
    ];
    for (mode, reason) in cases {
        let (outcome, _) = run(&module, json!(mode));
        assert_eq!(outcome.error, Some(ErrorKind::Trap), "{mode}: {outcome:?}");
        let message = outcome.message.unwrap();
        assert!(message.contains(reason), "{mode}: {message}");
        assert!(!message.contains("backtrace"), "{mode}: {message}");
    }
}

#[test]
fn proc_exit_code_is_the_status() {
    let module = load("wasi_modes.wat");
    let (outcome, _) = run(&module, json!("exit"));
    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.error, Some(ErrorKind::Exit));
    assert_eq!(outcome.exit_code, Some(42));
    let (outcome, sink) = run(&module, json!("nonzero"));
    assert_eq!(outcome.exit_code, Some(1));
    assert_eq!(sink.texts(Stream::Stderr), ["something went wrong"]);
}

#[test]
fn files_cannot_be_opened_without_a_grant() {
    let module = load("wasi_modes.wat");
    let (outcome, sink) = run(&module, json!("open"));
    // EBADF (8): there is no preopened directory at fd 3.
    assert_eq!(outcome.exit_code, Some(8), "{outcome:?}");
    assert_eq!(sink.texts(Stream::Stderr), ["open failed"]);
}

#[test]
fn granted_directories_and_env_are_visible() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from the host\n").unwrap();
    let module = load("wasi_modes.wat");
    let grant: DirGrant = format!("{}::/data:ro", dir.path().display())
        .parse()
        .unwrap();
    let capabilities = Capabilities {
        dirs: vec![grant],
        env: vec!["A=1".parse::<EnvVar>().unwrap()],
    };
    let mut sink = VecSink::new();
    let outcome = module.run(
        &event("e1", json!("open")),
        &Limits::default(),
        &capabilities,
        &mut sink,
    );
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?} {sink:?}");
    assert_eq!(sink.texts(Stream::Stdout), ["hello from the host"]);
}

#[test]
fn output_is_capped_with_one_marker() {
    let module = load("wasi_modes.wat");
    let limits = Limits {
        output_cap_bytes: 100,
        ..Limits::default()
    };
    let (outcome, sink) = run_with(&module, json!("flood"), &limits);
    assert_eq!(outcome.status, Status::Succeeded);
    assert!(outcome.output_truncated);
    assert_eq!(outcome.output_bytes, 100 * 20);
    let lines = sink.texts(Stream::Stdout);
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert!(lines[..5].iter().all(|l| *l == "flood line 01234567"));
    assert_eq!(lines[5], cap_marker(100));
}

#[test]
fn control_characters_are_escaped() {
    let module = load("wasi_modes.wat");
    let (_, sink) = run(&module, json!("ctrl"));
    assert_eq!(
        sink.texts(Stream::Stdout),
        ["a\\x1b[31mred", "bell\\x07", "tail"]
    );
}

#[test]
fn fuel_limits_the_instructions() {
    let module = load("wasi_modes.wat");
    let limits = Limits {
        fuel: Some(100_000),
        ..Limits::default()
    };
    let (outcome, _) = run_with(&module, json!("loop"), &limits);
    assert_eq!(outcome.error, Some(ErrorKind::Fuel), "{outcome:?}");
    let (outcome, _) = run_with(&module, json!({"small": true}), &limits);
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
}

#[test]
fn missing_granted_directory_is_a_host_failure() {
    let module = load("wasi_modes.wat");
    let capabilities = Capabilities {
        dirs: vec!["/nonexistent/wasm-exec-test::/data".parse().unwrap()],
        env: vec![],
    };
    let mut sink = VecSink::new();
    let outcome = module.run(
        &event("e1", json!(1)),
        &Limits::default(),
        &capabilities,
        &mut sink,
    );
    assert_eq!(outcome.error, Some(ErrorKind::Host), "{outcome:?}");
    assert_eq!(wasm_exec::exit_code(&[outcome]), wasm_exec::EXIT_HOST_ERROR);
}

#[test]
fn modules_load_from_bytes_and_precompiled() {
    let runtime = common::runtime();
    let wat = std::fs::read(fixture("wasi_modes.wat")).unwrap();
    let wasm = wat::parse_bytes(&wat).unwrap().into_owned();
    let module = runtime.load_bytes("modes.wasm", &wasm).unwrap();
    let cwasm = runtime.precompile("modes.wasm", &wasm).unwrap();
    assert!(runtime.precompile("modes.cwasm", &cwasm).is_err());
    let precompiled = runtime.load_bytes("modes.cwasm", &cwasm).unwrap();
    for module in [module, precompiled] {
        assert_eq!(
            run(&module, json!([1, 2])).1.texts(Stream::Stdout),
            ["[1,2]"]
        );
    }
}

#[test]
fn cache_directory_reuses_compilations() {
    let dir = tempfile::tempdir().unwrap();
    let config = wasm_exec::RuntimeConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..Default::default()
    };
    let runtime = wasm_exec::Runtime::new(config).unwrap();
    runtime.load_file(fixture("wasi_modes.wat")).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .collect();
    assert_eq!(entries.len(), 1);
    let cached = runtime.load_file(fixture("wasi_modes.wat")).unwrap();
    assert_eq!(run(&cached, json!(7)).1.texts(Stream::Stdout), ["7"]);
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        1
    );
}

#[test]
fn modules_run_concurrently_from_threads() {
    let module = load("wasi_modes.wat");
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let module = module.clone();
            std::thread::spawn(move || run(&module, json!(i)).1.texts(Stream::Stdout).join(""))
        })
        .collect();
    let outputs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(outputs, ["0", "1", "2", "3"]);
}
