//! The dispatcher's compile step and what it saves each pod, for generated modules of a few
//! hundred KB and a few MB (the WASI echo plus filler functions, like a real program's code).
//! Run with `scripts/bench-artifacts.sh`. Not a timed test.
//!
//! Per module, in the same run: (compile) the dispatcher compiling it and storing the code in
//! a real JetStream object store, paid once per module version; (found) another replica or
//! the next process finding it there instead; (pod-compile) what each pod pays without an
//! artifact: compiling the module in a fresh runtime; (pod-artifact) what each pod pays with
//! one: the GET from the artifact server (which streams it out of NATS), the digest checks and
//! loading the code, through wasm-exec's own client and loader.
//!
//! Then wasmtime's baseline compiler, Winch, against Cranelift (what wasm-exec uses), with
//! wasm-exec's settings (fuel and epochs): the time to compile each module, and the time a
//! compute-bound export takes to run, compiled each way — the trade-off for a pod that has to
//! compile its module (one without an artifact yet).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobico_dispatcher::artifacts::{ArtifactSettings, Artifacts, Compiled};
use jobico_dispatcher::trust::Signer;
use tokio_util::sync::CancellationToken;
use wasm_exec::{Runtime, RuntimeConfig};

/// The WASI echo with `kb` KB of filler functions (as `scripts/bench-wasm-exec.sh` makes).
fn generated_module(kb: usize) -> Vec<u8> {
    let echo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../samples/echo.wat"))
        .unwrap();
    let echo = echo.trim_end();
    let mut text = echo[..echo.len() - 1].to_owned();
    // About 32 bytes of binary per function.
    for i in 0..kb * 1024 / 32 {
        text.push_str(&format!(
            "(func $f{i} (param i32) (result i32) (i32.add (i32.mul (local.get 0) (i32.const {})) (i32.xor (local.get 0) (i32.const {}))) (i32.sub (i32.const {i})) (i32.rotl (i32.const 5)))\n",
            i + 3,
            i * 7 + 1
        ));
    }
    text.push(')');
    wat::parse_str(&text).unwrap()
}

async fn wait_for(artifacts: &Arc<Artifacts>, module: &[u8]) -> Compiled {
    loop {
        if let Some(compiled) = artifacts.request(module) {
            return compiled;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let nats = jobico_testkit::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = ArtifactSettings {
        base_url: format!("http://{}", listener.local_addr().unwrap()),
        max_bytes: 4 << 30,
        max_age: Duration::from_secs(3600),
        replicas: 1,
    };
    let signer = Signer::ephemeral();
    let artifacts = Arc::new(
        Artifacts::open(&js, signer.clone(), &settings)
            .await
            .unwrap(),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(artifacts.clone().serve(listener, shutdown.clone()));
    println!(
        "| module | compiled | (compile) once, compile + store | (found) in the store | (pod-compile) per pod | (pod-artifact) per pod: GET + verify + load | (pod-compile)/(pod-artifact) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for kb in [400, 3000] {
        let module = generated_module(kb);
        let module_bytes = module.len();
        let started = Instant::now();
        let compiled = wait_for(&artifacts, &module).await;
        let compile = started.elapsed();
        let replica = Arc::new(
            Artifacts::open(&js, signer.clone(), &settings)
                .await
                .unwrap(),
        );
        let started = Instant::now();
        assert_eq!(wait_for(&replica, &module).await, compiled);
        let found = started.elapsed();
        assert_eq!(replica.compilations(), 0);
        let reference = artifacts.reference("default", &compiled);
        let (pod_compile, pod_artifact, size) = tokio::task::spawn_blocking(move || {
            let mut compile = Duration::ZERO;
            let mut artifact = Duration::ZERO;
            let mut size = 0;
            for _ in 0..runs {
                // A fresh runtime per run, as each pod starts one.
                let runtime = Runtime::new(RuntimeConfig {
                    max_concurrent_instances: 1,
                    ..RuntimeConfig::default()
                })
                .unwrap();
                let started = Instant::now();
                runtime.load_bytes("m.wasm", &module).unwrap();
                compile += started.elapsed();
                let runtime = Runtime::new(RuntimeConfig {
                    max_concurrent_instances: 1,
                    ..RuntimeConfig::default()
                })
                .unwrap();
                let started = Instant::now();
                let (_, load) = runtime
                    .load_with_artifact("m.wasm", &module, Some(&reference))
                    .unwrap();
                artifact += started.elapsed();
                assert_eq!(
                    load.source,
                    jobico_common::summary::ModuleSource::Artifact,
                    "{load:?}"
                );
                size = wasm_exec::artifact::fetch(&reference, &module)
                    .unwrap()
                    .len();
            }
            (compile / runs as u32, artifact / runs as u32, size)
        })
        .await
        .unwrap();
        println!(
            "| {:.0} KB | {:.1} MB | {:.0} ms | {:.1} ms | {:.0} ms | {:.1} ms | {:.0}x |",
            module_bytes as f64 / 1024.0,
            size as f64 / 1_048_576.0,
            millis(compile),
            millis(found),
            millis(pod_compile),
            millis(pod_artifact),
            pod_compile.as_secs_f64() / pod_artifact.as_secs_f64()
        );
    }
    shutdown.cancel();
    compare_winch(runs);
}

/// An engine with wasm-exec's code-generation settings and the given compiler.
fn engine(strategy: wasmtime::Strategy) -> wasmtime::Engine {
    let mut config = wasmtime::Config::new();
    config.strategy(strategy);
    config.epoch_interruption(true);
    config.consume_fuel(true);
    wasmtime::Engine::new(&config).unwrap()
}

/// A compute-bound function: `n` rounds of integer mixing.
const SPIN: &str = r#"(module (func (export "spin") (param $n i32) (result i32) (local $x i32)
  (local.set $x (i32.const 1))
  (block $done (loop $next
    (br_if $done (i32.eqz (local.get $n)))
    (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 1103515245)) (i32.const 12345)))
    (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 7))))
    (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (br $next)))
  (local.get $x)))"#;

fn compare_winch(runs: usize) {
    let cranelift = engine(wasmtime::Strategy::Cranelift);
    let winch = engine(wasmtime::Strategy::Winch);
    let compile = |engine: &wasmtime::Engine, bytes: &[u8]| {
        let started = Instant::now();
        for _ in 0..runs {
            wasmtime::Module::new(engine, bytes).unwrap();
        }
        started.elapsed() / runs as u32
    };
    println!();
    println!("| module | Cranelift compile | Winch compile | Cranelift/Winch |");
    println!("|---:|---:|---:|---:|");
    for kb in [400, 3000] {
        let module = generated_module(kb);
        let (c, w) = (compile(&cranelift, &module), compile(&winch, &module));
        println!(
            "| {:.0} KB | {:.0} ms | {:.0} ms | {:.1}x |",
            module.len() as f64 / 1024.0,
            millis(c),
            millis(w),
            c.as_secs_f64() / w.as_secs_f64()
        );
    }
    let spin = wat::parse_str(SPIN).unwrap();
    let rounds = 100_000_000;
    let run = |engine: &wasmtime::Engine| {
        let module = wasmtime::Module::new(engine, &spin).unwrap();
        let mut store = wasmtime::Store::new(engine, ());
        store.set_fuel(u64::MAX).unwrap();
        store.set_epoch_deadline(u64::MAX);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let spin = instance
            .get_typed_func::<i32, i32>(&mut store, "spin")
            .unwrap();
        let started = Instant::now();
        let result = spin.call(&mut store, rounds).unwrap();
        (started.elapsed(), result)
    };
    let ((c, cr), (w, wr)) = (run(&cranelift), run(&winch));
    assert_eq!(cr, wr, "both compilers compute the same");
    println!(
        "compute-bound export, {rounds} rounds: Cranelift {:.0} ms, Winch {:.0} ms (Winch/Cranelift {:.1}x)",
        millis(c),
        millis(w),
        w.as_secs_f64() / c.as_secs_f64()
    );
}
