//! The sink row: `jobico up --nats` killed with SIGKILL while every event's outcome goes to a
//! receiver that refuses every third event twice before taking it. Each acknowledged event must reach the receiver
//! (at least once: a delivery cut by a kill is POSTed again, with the same CloudEvent id).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobico_testkit::NatsServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::scenarios::{ACK_WAIT_SECS, Env, tempdir};
use crate::up::Up;
use crate::{Profile, Rng, Row};

/// A resource whose one event (the echo sample) has a sink at `{url}`.
const SINK_MANIFEST: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: schema-any}
data:
  schema-any.json: '{"type": "object"}'
---
apiVersion: jobico.coeux.dev/v1
kind: Job
metadata: {name: with-a-sink}
spec:
  events:
    - {name: sk, wasm: echo.wasm, schema: {key: schema-any}, sink: {url: "{url}"}}
"#;

/// How long every acknowledged event has to reach the receiver after the last 202: the
/// deliveries a kill cut are handed out again after the outbox's ack wait (30 s).
const DELIVERY_DEADLINE: Duration = Duration::from_secs(150);

/// CloudEvent ids the receiver took (answered 2xx), with how often.
type Taken = Arc<Mutex<HashMap<String, usize>>>;

/// Times each chosen event is refused before it is taken.
const REFUSALS: usize = 2;

/// A receiver on loopback refusing (500) every third event twice, answering 204 otherwise.
async fn flaky_receiver() -> anyhow::Result<(SocketAddr, Taken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let taken = Taken::default();
    let kept = taken.clone();
    let refusals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (kept, refusals) = (kept.clone(), refusals.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                // Keep-alive: one request after another on the connection.
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let id = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|event| event["id"].as_str().map(str::to_owned));
                    // Every third event (by its id) is refused twice, then taken: a fixed
                    // number of retries per event, whatever else the receiver is sent.
                    let refuse = id.as_ref().is_some_and(|id| {
                        let mut refused = refusals.lock().unwrap();
                        let times = refused.entry(id.clone()).or_insert(0);
                        let chosen = id.bytes().map(usize::from).sum::<usize>() % 3 == 0;
                        let refuse = chosen && *times < REFUSALS;
                        *times += usize::from(refuse);
                        refuse
                    });
                    if !refuse && let Some(id) = id {
                        *kept.lock().unwrap().entry(id).or_default() += 1;
                    }
                    let status = if refuse {
                        "500 Refused"
                    } else {
                        "204 No Content"
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((address, taken))
}

/// `jobico up --nats` killed `kills` times while events with a sink flow to a flaky receiver.
pub async fn kill_up_with_a_sink(
    env: &Env,
    profile: &Profile,
    rng: &mut Rng,
) -> anyhow::Result<Row> {
    let nats = NatsServer::start();
    let (address, taken) = flaky_receiver().await?;
    let logs = tempdir()?;
    let inputs = logs.join("inputs");
    std::fs::create_dir_all(&inputs)?;
    let manifest = SINK_MANIFEST.replace("{url}", &format!("http://{address}/events"));
    std::fs::write(inputs.join("sink.yaml"), manifest)?;
    std::fs::copy(env.repo.join("samples/echo.wasm"), inputs.join("echo.wasm"))?;
    let mut up = Up::new(&env.jobico, &env.repo, &logs, &nats.url(), ACK_WAIT_SECS);
    up.args = vec!["--manifests".into(), inputs.display().to_string()];
    tokio::task::block_in_place(|| up.start())?;
    let n = profile.kill_events / 2;
    let sending = tokio::spawn({
        let base = up.base();
        let keys = (0..n).map(|i| format!("sink-{i}")).collect();
        async move {
            crate::clients::send_to(
                &base,
                "default/sk",
                keys,
                8,
                Instant::now() + Duration::from_secs(120),
            )
            .await
        }
    });
    crate::scenarios::kill_repeatedly(&mut up, profile.kills, rng, (200, 1200)).await?;
    let sent = sending.await?;
    let since = sent.last_ack.unwrap_or_else(Instant::now);
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    let mut row = Row {
        name: format!(
            "kill -9 jobico up --nats x{}, outcomes to a flaky sink",
            profile.kills
        ),
        attempted: sent.attempted,
        acked: sent.acked.len(),
        unexpected: sent.unexpected.len(),
        ..Default::default()
    };
    loop {
        let delivered = {
            let taken = taken.lock().unwrap();
            sent.acked
                .iter()
                .filter(|id| taken.contains_key(*id))
                .count()
        };
        if delivered == sent.acked.len() {
            row.drain = Some(since.elapsed());
            break;
        }
        if Instant::now() > deadline || !up.check() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let taken = taken.lock().unwrap().clone();
    row.executed = sent
        .acked
        .iter()
        .filter(|id| taken.contains_key(*id))
        .count();
    row.lost = row.acked - row.executed;
    // Taken twice: a delivery (or the run before it) cut by a kill, POSTed again with the same
    // id, which is what at least once allows; counted, not a duplicate.
    row.rerun = taken.values().filter(|&&times| times > 1).count();
    row.note = format!(
        "executed = delivered to the sink; {} CloudEvents taken, every third event refused twice first",
        taken.values().sum::<usize>()
    );
    up.stop();
    row.crashes += up.crashes;
    Ok(row)
}
