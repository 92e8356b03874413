//! The fault scenarios: `jobico up --nats` killed while events flow, nats-server killed and
//! restarted on the same store, the cluster ingress killed, the cluster path's dispatcher
//! under fire ([`crate::cluster`]), a poison event, and the hostile-input row
//! ([`crate::hostile`]).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use jobico_testkit::NatsServer;

use crate::clients::{Sent, send_all};
use crate::up::Up;
use crate::{Profile, Rng, Row};

/// What every scenario runs.
pub struct Env {
    /// The `jobico` binary.
    pub jobico: PathBuf,
    /// The repository (samples).
    pub repo: PathBuf,
}

/// A scenario: its name and what runs it.
pub type Scenario = (
    &'static str,
    for<'a> fn(&'a Env, &'a Profile, &'a mut Rng) -> BoxFuture<'a, anyhow::Result<Row>>,
);

/// Every scenario, in the table's order.
pub const ALL: &[Scenario] = &[
    ("kill -9 jobico up --nats", |e, p, r| {
        Box::pin(kill_up(e, p, r))
    }),
    (
        "kill -9 jobico up --nats, outcomes to a flaky sink",
        |e, p, r| Box::pin(crate::sinks::kill_up_with_a_sink(e, p, r)),
    ),
    ("kill -9 nats-server, restart on its store", |e, p, r| {
        Box::pin(kill_nats(e, p, r))
    }),
    ("kill -9 the cluster ingress", |e, p, r| {
        Box::pin(kill_ingress(e, p, r))
    }),
    ("3-node NATS, stream leader killed", |e, p, r| {
        Box::pin(crate::cluster::kill_stream_leader(e, p, r))
    }),
    ("kill -9 the dispatcher", |e, p, r| {
        Box::pin(crate::cluster::kill_dispatcher(e, p, r))
    }),
    ("Kubernetes API faults", |e, p, r| {
        Box::pin(crate::cluster::api_faults(e, p, r))
    }),
    ("two dispatchers, leader change", |e, p, r| {
        Box::pin(crate::cluster::leader_change(e, p, r))
    }),
    ("a poison event beside healthy ones", |e, p, _| {
        Box::pin(poison(e, p))
    }),
    ("malformed requests", |e, p, r| {
        Box::pin(crate::hostile::malformed(e, p, r))
    }),
    ("hostile schemas", |e, p, r| {
        Box::pin(crate::hostile::schemas(e, p, r))
    }),
    ("hostile modules", |e, p, _| {
        Box::pin(crate::modules::hostile_modules(e, p))
    }),
];

/// How soon NATS hands out again an event a killed process held: short, so a run drains in
/// seconds (what it costs is re-runs of events in flight at the kill, which are counted).
pub const ACK_WAIT_SECS: u64 = 2;

/// Clients sending at once.
const CLIENTS: usize = 8;

/// How long clients keep retrying one event.
const SEND_DEADLINE: Duration = Duration::from_secs(120);

/// How long every acknowledged event has to run after the last 202.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Clients sending `n` events keyed `<prefix>-<i>` to `base`, in a task of their own.
pub(crate) fn send_in_background(
    base: String,
    prefix: &str,
    n: usize,
) -> tokio::task::JoinHandle<Sent> {
    let keys = keys(prefix, n);
    tokio::spawn(
        async move { send_all(&base, keys, CLIENTS, Instant::now() + SEND_DEADLINE).await },
    )
}

/// `kill -9` of `process` `kills` times, each after a random pause of `pause_ms` (low, high)
/// milliseconds, starting it again each time.
pub(crate) async fn kill_repeatedly(
    process: &mut Up,
    kills: usize,
    rng: &mut Rng,
    pause_ms: (u64, u64),
) -> anyhow::Result<()> {
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(pause_ms.0, pause_ms.1))).await;
        tokio::task::block_in_place(|| {
            process.kill9();
            process.start()
        })?;
    }
    Ok(())
}

/// Waits until every acknowledged id has run, then one more ack wait (a redelivery would show
/// as a second run), and fills in the counts.
async fn settle(up: &mut Up, sent: &Sent, row: &mut Row) {
    let since = sent.last_ack.unwrap_or_else(Instant::now);
    let deadline = Instant::now() + DRAIN_DEADLINE;
    loop {
        let runs = up.runs();
        if sent.acked.iter().all(|id| runs.contains_key(id)) {
            row.drain = Some(since.elapsed());
            break;
        }
        if Instant::now() > deadline || !up.check() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(ACK_WAIT_SECS * 2)).await;
    let runs = up.runs();
    row.attempted = sent.attempted;
    row.acked = sent.acked.len();
    row.executed = sent
        .acked
        .iter()
        .filter(|id| runs.contains_key(*id))
        .count();
    row.lost = row.acked - row.executed;
    row.rerun = runs
        .values()
        .filter(|incarnations| up.is_rerun_after_kill(incarnations))
        .count();
    row.duplicated = runs
        .values()
        .filter(|incarnations| incarnations.len() > 1 && !up.is_rerun_after_kill(incarnations))
        .count();
    row.unexpected += sent.unexpected.len();
    for answer in sent.unexpected.iter().take(3) {
        eprintln!("chaos: {}: unexpected answer {answer}", row.name);
    }
    let acked: HashSet<&String> = sent.acked.iter().collect();
    let strays = runs.keys().filter(|id| !acked.contains(id)).count();
    if strays > 0 {
        row.note = format!("{strays} run(s) of events never acknowledged (accepted as a 503 said)");
    }
    up.stop();
    row.crashes += up.crashes;
}

/// `jobico up --nats` killed with SIGKILL `kills` times at random moments while clients send,
/// restarted each time on the same NATS store.
async fn kill_up(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let nats = NatsServer::start();
    let logs = tempdir()?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    tokio::task::block_in_place(|| up.start())?;
    let sending = send_in_background(up.base(), "kill-up", profile.kill_events);
    kill_repeatedly(&mut up, profile.kills, rng, (200, 1200)).await?;
    let sent = sending.await?;
    let mut row = Row {
        name: format!("kill -9 jobico up --nats x{}", profile.kills),
        ..Default::default()
    };
    settle(&mut up, &sent, &mut row).await;
    Ok(row)
}

/// nats-server killed with SIGKILL mid-stream and started again on the same store and port;
/// `jobico up --nats` stays up (503 meanwhile, then reconnects).
async fn kill_nats(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let mut nats = NatsServer::start();
    let logs = tempdir()?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    tokio::task::block_in_place(|| up.start())?;
    let sending = send_in_background(up.base(), "kill-nats", profile.nats_events);
    tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
    tokio::task::block_in_place(|| {
        nats.kill();
        std::thread::sleep(Duration::from_millis(500));
        nats.restart();
    });
    let sent = sending.await?;
    let mut row = Row {
        name: "kill -9 nats-server, restart on its store".into(),
        ..Default::default()
    };
    settle(&mut up, &sent, &mut row).await;
    Ok(row)
}

/// The cluster ingress (`jobico-apiserver`, no dispatcher) killed with SIGKILL `kills` times
/// while clients send and retry: every acknowledged event is in the namespace's stream exactly
/// once ("executed" here: stored).
async fn kill_ingress(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    // The dispatcher's part: the namespace's stream.
    jobico_store::streams::ensure(&js, "default", &jobico_store::StreamSettings::default()).await?;
    let logs = tempdir()?;
    let bin = env.jobico.with_file_name("jobico-apiserver");
    let mut ingress = Up::ingress(&bin, &env.repo, &logs, &nats.url());
    tokio::task::block_in_place(|| ingress.start())?;
    let sending = send_in_background(ingress.base(), "ingress", profile.kill_events);
    kill_repeatedly(&mut ingress, profile.kills, rng, (100, 600)).await?;
    let sent = sending.await?;
    ingress.stop();
    let stored = stored_ids(&js).await?;
    let mut row = Row {
        name: format!("kill -9 the cluster ingress x{}", profile.kills),
        attempted: sent.attempted,
        acked: sent.acked.len(),
        crashes: ingress.crashes,
        unexpected: sent.unexpected.len(),
        note: "no dispatcher: executed = stored in the stream".into(),
        ..Default::default()
    };
    row.executed = sent
        .acked
        .iter()
        .filter(|id| stored.contains_key(*id))
        .count();
    row.lost = row.acked - row.executed;
    row.duplicated = stored.values().filter(|&&n| n > 1).count();
    Ok(row)
}

/// How many messages of `default`'s stream hold each event id.
async fn stored_ids(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<std::collections::HashMap<String, usize>> {
    use futures::StreamExt;
    let mut stream = js
        .get_stream(jobico_common::subject::stream_name("default"))
        .await?;
    let total = stream.info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            // Work-queue streams take explicit-ack consumers only; nothing is acked (read once).
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            // Unacked, every message must still be handed out (the default stops at 1,000).
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;
    let mut counts = std::collections::HashMap::new();
    let mut seen = 0;
    while seen < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        let before = seen;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some((_, _, id)) = jobico_common::subject::parse_event_subject(&message.subject)
            {
                *counts.entry(id.to_owned()).or_insert(0) += 1;
            }
            seen += 1;
        }
        if seen == before {
            break;
        }
    }
    Ok(counts)
}

/// A resource with a healthy event (`ev1`, the echo sample) and a poison one whose module
/// traps on every event.
const POISON_MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-any}
data:
  schema-any.json: '{"type": "object"}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: poison-and-healthy}
spec:
  events:
    - {name: ev1, wasm: echo.wasm, schema: {key: schema-any}}
    - {name: poison, wasm: trap.wat, schema: {key: schema-any}}
"#;

/// A WASI command that traps at once.
const TRAP_WAT: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#;

/// Poison events (their module traps every time) sent between healthy ones: each poison event
/// ends `failed` after one run (a trap is the module's outcome, not retried), and the healthy
/// events all run, unaffected.
async fn poison(env: &Env, profile: &Profile) -> anyhow::Result<Row> {
    let nats = NatsServer::start();
    let logs = tempdir()?;
    let inputs = logs.join("inputs");
    std::fs::create_dir_all(&inputs)?;
    std::fs::write(inputs.join("poison.yaml"), POISON_MANIFEST)?;
    std::fs::write(inputs.join("trap.wat"), TRAP_WAT)?;
    std::fs::copy(env.repo.join("samples/echo.wasm"), inputs.join("echo.wasm"))?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    up.args = vec!["--manifests".into(), inputs.display().to_string()];
    tokio::task::block_in_place(|| up.start())?;
    let n = profile.nats_events / 2;
    let deadline = Instant::now() + SEND_DEADLINE;
    let base = up.base();
    let (healthy, poisoned) = tokio::join!(
        crate::clients::send_to(
            &base,
            "default/ev1",
            keys("healthy", n),
            CLIENTS / 2,
            deadline
        ),
        crate::clients::send_to(
            &base,
            "default/poison",
            keys("poison", n),
            CLIENTS / 2,
            deadline
        ),
    );
    let mut sent = healthy.clone();
    sent.attempted += poisoned.attempted;
    sent.acked.extend(poisoned.acked.iter().cloned());
    sent.last_ack = sent.last_ack.max(poisoned.last_ack);
    sent.unexpected.extend(poisoned.unexpected.iter().cloned());
    // Every poison event's state says failed.
    let client = reqwest::Client::new();
    let mut failed = 0;
    let mut not_failed = Vec::new();
    let settle_deadline = Instant::now() + DRAIN_DEADLINE;
    for id in &poisoned.acked {
        loop {
            let state = client
                .get(format!("{}/events/default/poison/{id}", up.base()))
                .send()
                .await
                .ok();
            let state = match state {
                Some(answer) => {
                    answer.json::<serde_json::Value>().await.unwrap_or_default()["state"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                }
                None => String::new(),
            };
            if state == "failed" {
                failed += 1;
                break;
            }
            if Instant::now() > settle_deadline {
                not_failed.push(format!("{id}: {state}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut row = Row {
        name: "a poison event beside healthy ones".into(),
        unexpected: not_failed.len(),
        ..Default::default()
    };
    settle(&mut up, &sent, &mut row).await;
    let healthy_ok = healthy.acked.len();
    row.note = format!(
        "{failed} poison events failed once each; {healthy_ok} healthy events ran{}",
        if not_failed.is_empty() {
            String::new()
        } else {
            format!("; not failed: {}", not_failed.join(", "))
        }
    );
    Ok(row)
}

/// A directory for one scenario's logs, kept (printed on failure) under the system temp dir.
pub(crate) fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "jobico-chaos-{}-{}",
        std::process::id(),
        crate::up::free_port()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
