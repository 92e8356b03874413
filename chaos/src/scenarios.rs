//! The fault scenarios: `jobico up --nats` killed while events flow, nats-server killed and
//! restarted on the same store, and the hostile-input row ([`crate::hostile`]).

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
    ("kill -9 nats-server, restart on its store", |e, p, r| {
        Box::pin(kill_nats(e, p, r))
    }),
    ("malformed requests", |e, p, r| {
        Box::pin(crate::hostile::malformed(e, p, r))
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
    let sending = tokio::spawn({
        let base = up.base();
        let keys = keys("kill-up", profile.kill_events);
        async move { send_all(&base, keys, CLIENTS, Instant::now() + SEND_DEADLINE).await }
    });
    for _ in 0..profile.kills {
        tokio::time::sleep(Duration::from_millis(rng.range(200, 1200))).await;
        tokio::task::block_in_place(|| {
            up.kill9();
            up.start()
        })?;
    }
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
    let sending = tokio::spawn({
        let base = up.base();
        let keys = keys("kill-nats", profile.nats_events);
        async move { send_all(&base, keys, CLIENTS, Instant::now() + SEND_DEADLINE).await }
    });
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

/// A directory for one scenario's logs, kept (printed on failure) under the system temp dir.
fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "jobico-chaos-{}-{}",
        std::process::id(),
        crate::up::free_port()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
