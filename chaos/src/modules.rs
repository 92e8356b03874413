//! Hostile modules through the executor binary, as a Job's pod runs it (`wasm-exec MODULE`
//! with the event in `JOBICO_EVENTS` and a termination log): each must be contained as
//! `wasm-exec/README.md` documents — the event fails with the named kind (or succeeds with its
//! output cut at the cap), within the deadline, in bounded memory and output, and the process
//! ends by itself with the documented exit code, never by a signal.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scenarios::Env;
use crate::up::peak_rss_kib;
use crate::{Profile, Row};

/// The executor's limits in this row.
const DEADLINE: &str = "2s";
const MEMORY: &str = "32Mi";
const OUTPUT_CAP: u64 = 1 << 20;

/// Longest a contained run may take: the deadline plus start-up and compilation.
const RUN_BOUND: Duration = Duration::from_secs(20);

/// Most resident memory a contained run may use: the memory limit plus the runtime's own.
const RSS_BOUND_KIB: u64 = 512 * 1024;

/// What a hostile module's run must end as.
enum Expect {
    /// The event failed with this error kind (exit code 1).
    Fails(&'static str),
    /// The guest's own exit with a non-zero code: what it tried was refused (exit code 1).
    Refused,
    /// The event succeeded with its output cut at the cap (exit code 0).
    Truncated,
    /// The module itself is refused before anything runs (exit code 2, message).
    NotLoaded(&'static str),
}

const WASI: &str = r#"(import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))"#;

fn modules() -> Vec<(&'static str, String, Expect)> {
    vec![
        (
            "infinite loop",
            r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#
                .into(),
            Expect::Fails("deadline"),
        ),
        (
            "memory bomb",
            r#"(module (memory (export "memory") 1)
                 (func (export "_start")
                   (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
                   unreachable))"#
                .into(),
            Expect::Fails("memory"),
        ),
        (
            "4 GiB initial memory",
            r#"(module (memory (export "memory") 65536) (func (export "_start")))"#.into(),
            Expect::Fails("memory"),
        ),
        (
            "deep recursion",
            r#"(module (memory (export "memory") 1)
                 (func $r (param i32) (result i32) (i32.add (call $r (local.get 0)) (i32.const 1)))
                 (func (export "_start") (drop (call $r (i32.const 0)))))"#
                .into(),
            Expect::Fails("trap"),
        ),
        (
            "1 GiB of output",
            format!(
                r#"(module {WASI} (memory (export "memory") 2)
                 (func (export "_start") (local $i i32)
                   (i32.store (i32.const 0) (i32.const 1024))
                   (i32.store (i32.const 4) (i32.const 65536))
                   (memory.fill (i32.const 1024) (i32.const 120) (i32.const 65536))
                   (loop $l
                     (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
                     (local.set $i (i32.add (local.get $i) (i32.const 1)))
                     (br_if $l (i32.lt_u (local.get $i) (i32.const 16384))))))"#
            ),
            Expect::Truncated,
        ),
        (
            "a million newlines",
            format!(
                r#"(module {WASI} (memory (export "memory") 17)
                 (func (export "_start")
                   (i32.store (i32.const 0) (i32.const 1024))
                   (i32.store (i32.const 4) (i32.const 1000000))
                   (memory.fill (i32.const 1024) (i32.const 10) (i32.const 1000000))
                   (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))"#
            ),
            Expect::Truncated,
        ),
        (
            "open /etc/passwd",
            format!(
                r#"(module {WASI}
                 (import "wasi_snapshot_preview1" "path_open"
                   (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (data (i32.const 100) "/etc/passwd")
                 (func (export "_start") (local $fd i32) (local $errno i32)
                   ;; every descriptor a preopen could have, asking to read: all must refuse
                   (local.set $fd (i32.const 3))
                   (loop $l
                     (local.set $errno (call $open (local.get $fd) (i32.const 0) (i32.const 100)
                       (i32.const 11) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0)
                       (i32.const 200)))
                     (if (i32.eqz (local.get $errno)) (then (call $exit (i32.const 0))))
                     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
                     (br_if $l (i32.lt_u (local.get $fd) (i32.const 64))))
                   (call $exit (local.get $errno))))"#
            ),
            Expect::Refused,
        ),
        (
            "accept on a socket",
            format!(
                r#"(module {WASI}
                 (import "wasi_snapshot_preview1" "sock_accept"
                   (func $accept (param i32 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (func (export "_start") (local $fd i32) (local $errno i32)
                   (local.set $fd (i32.const 0))
                   (loop $l
                     (local.set $errno (call $accept (local.get $fd) (i32.const 0) (i32.const 200)))
                     (if (i32.eqz (local.get $errno)) (then (call $exit (i32.const 0))))
                     (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
                     (br_if $l (i32.lt_u (local.get $fd) (i32.const 64))))
                   (call $exit (local.get $errno))))"#
            ),
            Expect::Refused,
        ),
        (
            "crafted .cwasm",
            // An ELF header and junk, named as a precompiled module.
            String::new(),
            Expect::NotLoaded("precompiled native code"),
        ),
    ]
}

/// How one run ended.
struct Run {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
    peak_kib: Option<u64>,
}

fn run(exec: &Path, module: &Path, dir: &Path) -> anyhow::Result<Run> {
    let stdout_path = dir.join("stdout");
    let stderr_path = dir.join("stderr");
    let started = Instant::now();
    let mut child = Command::new(exec)
        .arg(module)
        .env_clear()
        .env("JOBICO_EVENTS", r#"[{"id":"hostile-1","data":{"n":1}}]"#)
        .env("JOBICO_DEADLINE", DEADLINE)
        .env("JOBICO_MEMORY", MEMORY)
        .env("JOBICO_OUTPUT_CAP", OUTPUT_CAP.to_string())
        .env("JOBICO_TERMINATION_LOG", dir.join("termination-log"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let mut peak = None;
    let status = loop {
        // Read before reaping: the peak is gone with the process.
        peak = peak_rss_kib(child.id()).or(peak);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > RUN_BOUND * 3 {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Run {
        code: status.code(),
        stdout: std::fs::read(&stdout_path)?,
        stderr: std::fs::read_to_string(&stderr_path)?,
        took: started.elapsed(),
        peak_kib: peak,
    })
}

/// Whether `run` is what `expect` says, and if not, why.
fn check(run: &Run, expect: &Expect) -> Result<(), String> {
    if run.took > RUN_BOUND {
        return Err(format!("took {:?}", run.took));
    }
    if run.peak_kib.is_some_and(|k| k > RSS_BOUND_KIB) {
        return Err(format!("peak RSS {} KiB", run.peak_kib.unwrap_or(0)));
    }
    // At most the cap, its marker line and the summary line.
    if run.stdout.len() as u64 > OUTPUT_CAP + 16 * 1024 {
        return Err(format!("{} bytes of output", run.stdout.len()));
    }
    let summary: Option<Value> = String::from_utf8_lossy(&run.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    let outcome = summary
        .as_ref()
        .and_then(|s| s["outcomes"].as_array())
        .and_then(|o| o.first())
        .cloned()
        .unwrap_or_default();
    let field = |name: &str| outcome[name].as_str().unwrap_or_default().to_owned();
    match expect {
        Expect::Fails(kind) if run.code == Some(1) && field("error") == *kind => Ok(()),
        Expect::Refused
            if run.code == Some(1)
                && field("error") == "exit"
                && outcome["exit_code"].as_i64().is_some_and(|c| c != 0) =>
        {
            Ok(())
        }
        Expect::Truncated
            if run.code == Some(0)
                && field("status") == "succeeded"
                && outcome["output_truncated"] == Value::Bool(true) =>
        {
            Ok(())
        }
        Expect::NotLoaded(message) if run.code == Some(2) && run.stderr.contains(message) => Ok(()),
        _ => Err(format!(
            "exit {:?}, outcome {outcome}, stderr {:.300}",
            run.code, run.stderr
        )),
    }
}

/// The hostile-module row: every module contained as documented.
pub async fn hostile_modules(env: &Env, _profile: &Profile) -> anyhow::Result<Row> {
    let exec = env.jobico.with_file_name("wasm-exec");
    let dir = crate::scenarios::tempdir()?;
    let modules = modules();
    let mut row = Row {
        name: "hostile modules through wasm-exec".into(),
        attempted: modules.len(),
        ..Default::default()
    };
    let mut notes = Vec::new();
    for (name, text, expect) in &modules {
        let module = if text.is_empty() {
            let path = dir.join("crafted.cwasm");
            let mut elf = b"\x7fELF\x02\x01\x01\0".to_vec();
            elf.extend(std::iter::repeat_n(0xcc_u8, 4096));
            std::fs::write(&path, elf)?;
            path
        } else {
            let path = dir.join(format!("{}.wat", name.replace([' ', '/'], "-")));
            std::fs::write(&path, text)?;
            path
        };
        let ran = tokio::task::block_in_place(|| run(&exec, &module, &dir))?;
        row.peak_rss_kib = row.peak_rss_kib.max(ran.peak_kib);
        if ran.code.is_none() {
            row.crashes += 1;
        }
        match check(&ran, expect) {
            Ok(()) => notes.push(format!("{name}: {:.1} s", ran.took.as_secs_f64())),
            Err(why) => {
                row.unexpected += 1;
                eprintln!("chaos: hostile module {name}: {why}");
                notes.push(format!("{name}: NOT CONTAINED"));
            }
        }
    }
    row.note = notes.join(", ");
    Ok(row)
}
