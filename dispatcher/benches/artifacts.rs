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
}
