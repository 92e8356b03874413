//! WASI preview1 guests through real wasmtime instances: output, limits, traps, capabilities.

mod common;

use std::time::{Duration, Instant};

use common::{event, fixture, load, run, run_with};
use serde_json::json;
use wasm_exec::output::cap_marker;
use wasm_exec::{
    Abi, Capabilities, DirGrant, EnvVar, Error, ErrorKind, Limits, Status, Stream, VecSink,
};

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
fn standard_output_is_the_result_only_when_kept_for_routes() {
    let module = load("wasi_modes.wat");
    let (plain, _) = run(&module, json!({"total": 12}));
    assert_eq!(plain.result, None);
    let capabilities = Capabilities {
        stdout_result: true,
        ..Capabilities::default()
    };
    let mut sink = VecSink::new();
    let kept = module.run(
        &event("e1", json!({"total": 12})),
        &Limits::default(),
        &capabilities,
        &mut sink,
    );
    assert_eq!(kept.status, Status::Succeeded, "{kept:?}");
    assert_eq!(kept.result.as_deref(), Some("{\"total\":12}\n"));
    // The log still has the line, as without routes.
    assert_eq!(sink.texts(Stream::Stdout), [r#"{"total":12}"#]);
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
        ..Capabilities::default()
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
    let mut sink = VecSink::new();
    let outcome = module.run(
        &event("e2", json!("vars")),
        &Limits::default(),
        &capabilities,
        &mut sink,
    );
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?} {sink:?}");
    assert_eq!(sink.texts(Stream::Stdout), ["A=1"]);
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
    // Each line costs what the binary writes for it: `e1 stdout flood line 01234567\n`, 30
    // bytes. Three fit; the fourth would not even fit its prefix.
    let lines = sink.texts(Stream::Stdout);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[..3].iter().all(|l| *l == "flood line 01234567"));
    assert_eq!(lines[3], cap_marker(100));
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
        ..Capabilities::default()
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
fn precompiled_bytes_are_refused_everywhere_but_a_trusted_load() {
    let runtime = common::runtime();
    let wat = std::fs::read(fixture("wasi_modes.wat")).unwrap();
    let wasm = wat::parse_bytes(&wat).unwrap().into_owned();
    let module = runtime.load_bytes("modes.wasm", &wasm).unwrap();
    let cwasm = runtime.precompile("modes.wasm", &wasm).unwrap();
    let refused = |result: Result<wasm_exec::Module, Error>| {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::Precompiled { .. }), "{error:?}");
    };
    refused(runtime.load_bytes("modes.cwasm", &cwasm));
    // Whatever the file is called.
    let dir = tempfile::tempdir().unwrap();
    let disguised = dir.path().join("modes.wasm");
    std::fs::write(&disguised, &cwasm).unwrap();
    refused(runtime.load_file(&disguised));
    assert!(matches!(
        runtime.precompile("modes.cwasm", &cwasm),
        Err(Error::Precompiled { .. })
    ));
    let trusted = runtime.load_trusted_precompiled_file(&disguised).unwrap();
    for module in [module, trusted] {
        assert_eq!(
            run(&module, json!([1, 2])).1.texts(Stream::Stdout),
            ["[1,2]"]
        );
    }
}

fn cached_runtime(dir: &std::path::Path) -> wasm_exec::Runtime {
    wasm_exec::Runtime::new(wasm_exec::RuntimeConfig {
        cache_dir: Some(dir.to_owned()),
        ..Default::default()
    })
    .unwrap()
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// An echo guest and a guest printing "planted", both WASI commands.
fn two_modules() -> (Vec<u8>, Vec<u8>) {
    let echo = wat::parse_bytes(&std::fs::read(fixture("wasi_modes.wat")).unwrap())
        .unwrap()
        .into_owned();
    let planted = wat::parse_str(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "planted\n")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 16))
            (i32.store (i32.const 4) (i32.const 8))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    (echo, planted)
}

#[test]
fn cache_directory_reuses_its_own_compilations() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let runtime = cached_runtime(&cache);
    let (echo, _) = two_modules();
    runtime.load_bytes("echo.wasm", &echo).unwrap();
    let entry = runtime.cache_entry(&echo).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let entry_name = entry.file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(names, [entry_name, "key".to_owned()]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&cache.join("key")), 0o600);
        assert_eq!(mode(&entry), 0o600);
    }
    // A hit reads the entry and leaves it in place (a refused one would be replaced).
    let before = inode(&entry);
    let cached = cached_runtime(&cache)
        .load_bytes("echo.wasm", &echo)
        .unwrap();
    assert_eq!(run(&cached, json!(7)).1.texts(Stream::Stdout), ["7"]);
    assert_eq!(inode(&entry), before);
}

#[test]
fn cache_entries_not_written_by_the_cache_are_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let runtime = cached_runtime(&cache);
    let (echo, planted) = two_modules();
    runtime.load_bytes("planted.wasm", &planted).unwrap();
    let planted_entry = runtime.cache_entry(&planted).unwrap();
    let echo_entry = runtime.cache_entry(&echo).unwrap();
    let echo_runs = |runtime: &wasm_exec::Runtime| {
        let module = runtime.load_bytes("echo.wasm", &echo).unwrap();
        assert_eq!(run(&module, json!(5)).1.texts(Stream::Stdout), ["5"]);
    };

    // Another module's valid entry, renamed to echo's name: its MAC names the other module.
    std::fs::copy(&planted_entry, &echo_entry).unwrap();
    echo_runs(&cached_runtime(&cache));
    // A real compilation without the cache's MAC (what `wasm-exec compile` writes).
    let bare = runtime.precompile("planted.wasm", &planted).unwrap();
    for forged in [bare.clone(), [vec![0u8; 32], bare.clone()].concat()] {
        std::fs::write(&echo_entry, &forged).unwrap();
        echo_runs(&cached_runtime(&cache));
    }
    // After each refusal the entry was replaced by the cache's own, which then loads.
    echo_runs(&cached_runtime(&cache));
}

/// Writes a key of our choosing and an entry MACed under it: what only the cache's own write
/// path may do, and what anyone able to write the directory could.
fn forge(cache: &std::path::Path, entry: &std::path::Path, code: &[u8]) {
    use hmac::{Hmac, Mac};
    use std::os::unix::fs::PermissionsExt;
    let secret = [7u8; 32];
    let name = entry.file_stem().unwrap().to_str().unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&secret).unwrap();
    mac.update(b"wasm-exec cache entry v2\0");
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(code);
    let tag = mac.finalize().into_bytes();
    let _ = std::fs::remove_file(cache.join("key"));
    std::fs::write(cache.join("key"), secret).unwrap();
    std::fs::write(entry, [&tag[..], code].concat()).unwrap();
    for file in [cache.join("key"), entry.to_owned()] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn cache_entries_are_trusted_only_in_a_directory_no_one_else_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let runtime = cached_runtime(&cache);
    let (echo, planted) = two_modules();
    runtime.load_bytes("echo.wasm", &echo).unwrap();
    let entry = runtime.cache_entry(&echo).unwrap();
    let code = runtime.precompile("planted.wasm", &planted).unwrap();
    let output = |runtime: &wasm_exec::Runtime| {
        let module = runtime.load_bytes("echo.wasm", &echo).unwrap();
        run(&module, json!(5)).1.texts(Stream::Stdout).join("")
    };

    // The control: a forged pair in a private directory is indistinguishable from our own.
    forge(&cache, &entry, &code);
    assert_eq!(output(&cached_runtime(&cache)), "planted");

    // So the directory, the entry and the key must be closed to everyone else.
    forge(&cache, &entry, &code);
    mode(&cache, 0o777);
    assert_eq!(
        output(&cached_runtime(&cache)),
        "5",
        "directory writable by others"
    );
    mode(&cache, 0o700);
    forge(&cache, &entry, &code);
    mode(&entry, 0o666);
    assert_eq!(
        output(&cached_runtime(&cache)),
        "5",
        "entry writable by others"
    );
    forge(&cache, &entry, &code);
    mode(&cache.join("key"), 0o644);
    assert_eq!(
        output(&cached_runtime(&cache)),
        "5",
        "key readable by others"
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
