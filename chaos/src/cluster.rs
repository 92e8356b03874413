//! The cluster path under fire: the real `jobico-dispatcher` binary against a fake Kubernetes
//! API server over HTTP ([`jobico_testkit::kube_api`]) that plays the Job controller, beside
//! the real cluster ingress and a real nats-server.
//!
//! Counted from what the cluster saw: **executed** is an acknowledged event whose state record
//! says `succeeded` (the dispatcher's tracker wrote it from the completed Job), **duplicated**
//! an event named by more than one Job the API server committed, **lost** an acknowledged
//! event that never succeeded. Dead-lettered counts the dead-letter stream.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jobico_common::executor::ArtifactRef;
use jobico_common::{EventState, EventStatus};
use jobico_dispatcher::kubernetes::job_ids;
use jobico_testkit::NatsServer;
use jobico_testkit::kube_api::{Fault, KubeApi, resource};
use serde_json::{Value, json};

use crate::clients::Sent;
use crate::scenarios::{Env, send_in_background, tempdir};
use crate::up::Up;
use crate::{Profile, Rng, Row};

/// The batch Jobs resource.
pub(crate) const JOBS: &str = "batch/v1/jobs";

/// How soon NATS hands out again what a killed dispatcher held.
const ACK_WAIT_SECS: u64 = 3;

/// How long after its creation the fake Job controller marks a Job complete.
const RUN_TIME: Duration = Duration::from_millis(50);

/// How long every acknowledged event has to succeed after the last 202.
const DRAIN_DEADLINE: Duration = Duration::from_secs(150);

/// A nats-server, a fake API server holding `samples/ev1.yaml`, and the cluster ingress.
pub(crate) struct Cluster {
    nats: Vec<NatsServer>,
    nats_url: String,
    /// Replicas of the streams and buckets (the NATS servers' count).
    replicas: usize,
    pub(crate) js: jetstream::Context,
    pub(crate) api: KubeApi,
    pub(crate) ingress: Up,
    dispatcher_bin: PathBuf,
    logs: PathBuf,
}

impl Cluster {
    /// With one NATS server, or (`nodes` > 1) a JetStream cluster whose streams and buckets
    /// have a replica on each node.
    async fn start(env: &Env, nodes: usize) -> anyhow::Result<Self> {
        Self::start_with(env, nodes, |_| {}).await
    }

    /// [`Cluster::start`] with the Jobico `Job` resource of the sample edited by `edit` first
    /// (its batching, say).
    pub(crate) async fn start_with(
        env: &Env,
        nodes: usize,
        edit: impl Fn(&mut Value),
    ) -> anyhow::Result<Self> {
        let nats = if nodes > 1 {
            tokio::task::block_in_place(|| NatsServer::cluster(nodes))
        } else {
            vec![NatsServer::start()]
        };
        let nats_url = nats
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let js = jetstream::new(async_nats::connect(jobico_store::Servers(&nats_url)).await?);
        // A new cluster answers JetStream requests once it has elected its meta leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(error) = js.query_account().await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "JetStream did not get ready: {error}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let api = KubeApi::start();
        for (plural, mut object) in sample_objects(&env.repo.join("samples/ev1.yaml"))? {
            if object["apiVersion"] == "jobico.coeux.dev/v1" {
                edit(&mut object);
            }
            api.apply(&plural, object);
        }
        api.run_jobs(Some(RUN_TIME));
        let logs = tempdir()?;
        let mut ingress = Up::ingress(
            &env.jobico.with_file_name("jobico-apiserver"),
            &env.repo,
            &logs,
            &nats_url,
        );
        if nodes > 1 {
            ingress.args = vec!["--state-replicas".into(), nodes.to_string()];
        }
        tokio::task::block_in_place(|| ingress.start())?;
        Ok(Self {
            nats,
            nats_url,
            replicas: nodes,
            js,
            api,
            ingress,
            dispatcher_bin: env.jobico.with_file_name("jobico-dispatcher"),
            logs,
        })
    }

    /// A dispatcher replica named `identity` (not started), with the scenarios' short ack
    /// wait.
    pub(crate) fn dispatcher(&self, identity: &str) -> Up {
        self.dispatcher_acking(identity, ACK_WAIT_SECS)
    }

    /// A dispatcher replica named `identity` (not started) whose consumers wait
    /// `ack_wait_secs` for an ack before redelivering.
    pub(crate) fn dispatcher_acking(&self, identity: &str, ack_wait_secs: u64) -> Up {
        let mut up = Up::dispatcher(
            &self.dispatcher_bin,
            &self.logs,
            &self.nats_url,
            &self.api.kubeconfig(),
            identity,
            ack_wait_secs,
        );
        if self.replicas > 1 {
            up.args = vec!["--stream-replicas".into(), self.replicas.to_string()];
        }
        // Each replica serves compiled modules on a port of its own (pods would reach them
        // through one Service).
        let artifacts = format!("127.0.0.1:{}", jobico_testkit::free_port());
        up.args.extend([
            "--artifacts-url".into(),
            format!("http://{artifacts}"),
            "--artifacts-listen".into(),
            artifacts,
        ]);
        up
    }

    /// The compiled modules the Jobs made so far name (see [`ArtifactRef`]), and the Jobs.
    fn artifact_references(&self) -> (Vec<ArtifactRef>, usize) {
        let jobs = self.api.created(JOBS);
        let references = jobs
            .iter()
            .filter_map(|job| {
                let env = job["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?;
                let lookup = |name: &str| {
                    env.iter()
                        .find(|var| var["name"] == name)
                        .and_then(|var| var["value"].as_str().map(str::to_owned))
                };
                ArtifactRef::from_env(lookup).ok().flatten()
            })
            .collect();
        (references, jobs.len())
    }

    /// The compiled-module path of the dispatcher binary, while its replica runs: waits for a
    /// Job naming the dispatcher's artifact and fetches it as the pod's wasm-exec would,
    /// verifying it. Why not, if it fails.
    async fn fetch_an_artifact(&self, module: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let reference = loop {
            if let Some(reference) = self.artifact_references().0.pop() {
                break reference;
            }
            if Instant::now() > deadline {
                return Err("no Job named a compiled module within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let module = module.to_vec();
        tokio::task::spawn_blocking(move || wasm_exec::artifact::fetch(&reference, &module))
            .await
            .map_err(|e| e.to_string())?
            .map(|_| ())
    }

    /// The holder of the dispatcher's Lease.
    fn leader(&self) -> Option<String> {
        self.api
            .objects(&resource("coordination.k8s.io/v1", "leases"), None)
            .first()
            .and_then(|lease| lease["spec"]["holderIdentity"].as_str().map(str::to_owned))
    }

    /// Waits (keeping the replicas running, as Kubernetes does) until every acknowledged event
    /// succeeded, then a little longer (a late second Job would show), and fills in the row.
    async fn settle(&self, sent: &Sent, replicas: &mut [Up], row: &mut Row) -> anyhow::Result<()> {
        let since = sent.last_ack.unwrap_or_else(Instant::now);
        let deadline = Instant::now() + DRAIN_DEADLINE;
        // Through a NATS leader election the bucket may not answer for a while.
        let kv = loop {
            match self
                .js
                .get_key_value(jobico_common::subject::STATE_BUCKET)
                .await
            {
                Ok(kv) => break kv,
                Err(error) if Instant::now() > deadline => {
                    anyhow::bail!("the state bucket did not answer: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let mut pending: HashSet<String> = sent.acked.clone();
        loop {
            let mut done = Vec::new();
            for id in &pending {
                if succeeded(&kv, id).await {
                    done.push(id.clone());
                }
            }
            for id in done {
                pending.remove(&id);
            }
            if pending.is_empty() {
                row.drain = Some(since.elapsed());
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            for replica in replicas.iter_mut() {
                tokio::task::block_in_place(|| replica.supervise())?;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(ACK_WAIT_SECS * 2)).await;
        let mut jobs_per_event: HashMap<String, usize> = HashMap::new();
        for job in self.api.created(JOBS) {
            let job = serde_json::from_value(job)?;
            for id in job_ids(&job) {
                *jobs_per_event.entry(id).or_default() += 1;
            }
        }
        row.attempted = sent.attempted;
        row.acked = sent.acked.len();
        row.executed = row.acked - pending.len();
        row.lost = pending.len();
        row.duplicated = jobs_per_event.values().filter(|&&n| n > 1).count();
        row.unexpected += sent.unexpected.len();
        for answer in sent.unexpected.iter().take(3) {
            eprintln!("chaos: {}: unexpected answer {answer}", row.name);
        }
        for id in pending.iter().take(3) {
            eprintln!(
                "chaos: {}: {id} acknowledged, never succeeded (in {} Job(s)); logs in {}",
                row.name,
                jobs_per_event.get(id).copied().unwrap_or(0),
                self.logs.display()
            );
        }
        row.dead_lettered = dead_lettered(&self.js).await;
        for replica in replicas.iter_mut() {
            replica.stop();
            row.crashes += replica.crashes;
        }
        let restarts: usize = replicas.iter().map(|r| r.restarts).sum();
        if restarts > 0 {
            row.note.push_str(&format!(
                "; {restarts} designed exit(s) (lease lost or not renewable), restarted as Kubernetes would"
            ));
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self, row: &mut Row) {
        self.ingress.stop();
        row.crashes += self.ingress.crashes;
    }

    /// [`Cluster::settle`], then the ingress stopped: the scenario's row.
    async fn finish(
        mut self,
        sent: &Sent,
        replicas: &mut [Up],
        mut row: Row,
    ) -> anyhow::Result<Row> {
        self.settle(sent, replicas, &mut row).await?;
        self.stop(&mut row);
        Ok(row)
    }
}

/// Whether the state record of `default/ev1/<id>` says succeeded.
pub(crate) async fn succeeded(kv: &jetstream::kv::Store, id: &str) -> bool {
    let key = jobico_common::subject::state_key("default", "ev1", id);
    match kv.get(key).await {
        Ok(Some(bytes)) => serde_json::from_slice::<EventStatus>(&bytes)
            .is_ok_and(|status| status.state == EventState::Succeeded),
        _ => false,
    }
}

/// Messages in the dead-letter stream (0 when it does not exist).
async fn dead_lettered(js: &jetstream::Context) -> usize {
    match js
        .get_stream(jobico_dispatcher::dead_letter::DEAD_LETTER_STREAM)
        .await
    {
        Ok(mut stream) => stream
            .info()
            .await
            .map_or(0, |info| info.state.messages as usize),
        Err(_) => 0,
    }
}

/// The objects of a sample manifest, in namespace `default`, with their plural.
fn sample_objects(path: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path)?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let mut object: Value = Value::deserialize(document)?;
        if object.is_null() {
            continue;
        }
        object["metadata"]["namespace"] = json!("default");
        let plural = match object["kind"].as_str() {
            Some("ConfigMap") => "configmaps",
            Some("Job") => "jobs",
            other => anyhow::bail!("{}: unexpected kind {other:?}", path.display()),
        };
        objects.push((plural.to_owned(), object));
    }
    Ok(objects)
}

/// Waits until the log of `replica` says it leads.
pub(crate) async fn until_leader(replica: &Up, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !replica.log().contains("became leader") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the dispatcher did not become leader within {within:?}:\n{}",
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The dispatcher killed with SIGKILL at random moments while events flow, started again each
/// time (a container restart: same identity, so it takes its Lease back at once). What it held
/// unacked is dispatched again after the ack wait; the Job names and the state records keep
/// that to one Job per event.
pub async fn kill_dispatcher(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let cluster = Cluster::start(env, 1).await?;
    let mut dispatcher = cluster.dispatcher("dispatcher-0");
    tokio::task::block_in_place(|| dispatcher.start())?;
    let sending = send_in_background(
        cluster.ingress.base(),
        "kill-dispatcher",
        profile.kill_events,
    );
    for _ in 0..profile.kills {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 1500))).await;
        tokio::task::block_in_place(|| {
            dispatcher.kill9();
            dispatcher.start()
        })?;
    }
    let sent = sending.await?;
    // The dispatcher binary's compiled modules, from the replica now running.
    let module = std::fs::read(env.repo.join("samples/echo.wasm"))?;
    let fetched = cluster.fetch_an_artifact(&module).await;
    let mut row = Row {
        name: format!("kill -9 the dispatcher x{}", profile.kills),
        ..Default::default()
    };
    let mut cluster = cluster;
    cluster
        .settle(&sent, std::slice::from_mut(&mut dispatcher), &mut row)
        .await?;
    let (references, jobs) = cluster.artifact_references();
    let fetched = match fetched {
        Ok(()) => "one fetched and verified".to_owned(),
        Err(error) => {
            row.unexpected += 1;
            format!("FAILED to fetch one: {error}")
        }
    };
    row.note = format!(
        "cluster path: fake API; {} of {jobs} Jobs named the dispatcher's compiled module, {fetched}",
        references.len()
    );
    cluster.stop(&mut row);
    Ok(row)
}

/// The Kubernetes API failing under the dispatcher while events flow: Job creates answered
/// 500, then 504 after the create committed, then 429 with `Retry-After`, and every request
/// 503 for a while (the lease cannot be renewed either: a longer outage ends the leader, which
/// Kubernetes would restart).
pub async fn api_faults(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let mut cluster = Cluster::start(env, 1).await?;
    let mut dispatcher = cluster.dispatcher("dispatcher-0");
    tokio::task::block_in_place(|| dispatcher.start())?;
    let sending = send_in_background(cluster.ingress.base(), "api-faults", profile.kill_events);
    // Job creates fail in turn (500s, then 504s for creates that committed, then 429s with
    // Retry-After) from the first events on; then, at a random moment, the whole API answers
    // 503 for a while.
    let api = &cluster.api;
    api.inject(Fault::answer(500).on("create", JOBS).times(25));
    api.inject(
        Fault::answer(504)
            .after_commit()
            .on("create", JOBS)
            .times(25),
    );
    api.inject(
        Fault::answer(429)
            .retry_after(1)
            .on("create", JOBS)
            .times(25),
    );
    tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
    api.inject(Fault::answer(503).lasting(profile.api_outage));
    let sent = sending.await?;
    let mut row = Row {
        name: format!(
            "Kubernetes API: 500s, 504 after commit, 429 Retry-After, {} s of 503",
            profile.api_outage.as_secs()
        ),
        note: "cluster path: fake API".into(),
        ..Default::default()
    };
    cluster
        .settle(&sent, std::slice::from_mut(&mut dispatcher), &mut row)
        .await?;
    let creates: usize = cluster
        .api
        .requests()
        .iter()
        .filter(|((verb, r), _)| verb == "create" && r == JOBS)
        .map(|(_, n)| n)
        .sum();
    let served = cluster
        .api
        .faults_served()
        .iter()
        .map(|(fault, n)| format!("{n}x {fault}"))
        .collect::<Vec<_>>()
        .join(", ");
    row.note.push_str(&format!(
        "; answered {served}; {creates} Job create requests for {} Jobs",
        cluster.api.created(JOBS).len()
    ));
    cluster.stop(&mut row);
    Ok(row)
}

/// Two dispatcher replicas; mid-stream the Lease is handed to the standby behind the leader's
/// back (the old leader keeps dispatching until its next renewal finds the Lease gone, so both
/// dispatch at once for a while), then the new leader is killed with SIGKILL and the other
/// takes over once the Lease expires (15 s).
pub async fn leader_change(env: &Env, profile: &Profile, rng: &mut Rng) -> anyhow::Result<Row> {
    let cluster = Cluster::start(env, 1).await?;
    let mut replicas = [
        cluster.dispatcher("dispatcher-a"),
        cluster.dispatcher("dispatcher-b"),
    ];
    tokio::task::block_in_place(|| replicas[0].start())?;
    until_leader(&replicas[0], Duration::from_secs(30)).await?;
    tokio::task::block_in_place(|| replicas[1].start())?;
    let sending = send_in_background(cluster.ingress.base(), "leader-change", profile.kill_events);
    tokio::time::sleep(Duration::from_millis(rng.range(300, 1000))).await;
    // The forced change: the Lease now names the standby, freshly renewed.
    let mut lease = cluster
        .api
        .objects(&resource("coordination.k8s.io/v1", "leases"), None)
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no Lease after the leader started"))?;
    lease["spec"]["holderIdentity"] = json!("dispatcher-b");
    lease["spec"]["renewTime"] = json!(
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
            .to_string()
    );
    cluster.api.apply("leases", lease);
    // The old leader ends itself at its next renewal; started again, it stands by.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tokio::task::block_in_place(|| replicas[0].supervise())? {
        anyhow::ensure!(Instant::now() < deadline, "the old leader kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_leader(&replicas[1], Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(rng.range(300, 1000))).await;
    // The new leader killed: the other takes over once the Lease expires, and the killed one,
    // started again, stands by.
    replicas[1].kill9();
    until_leader(&replicas[0], Duration::from_secs(60)).await?;
    tokio::task::block_in_place(|| replicas[1].start())?;
    let leaders = format!(
        "Lease holders: dispatcher-a, dispatcher-b (handed over), {} (after the kill)",
        cluster.leader().unwrap_or_default()
    );
    let sent = sending.await?;
    let row = Row {
        name: "two dispatchers, lease handed over, then the leader killed".into(),
        note: format!("cluster path: fake API; {leaders}"),
        ..Default::default()
    };
    cluster.finish(&sent, &mut replicas, row).await
}

/// A 3-node JetStream cluster with every stream and bucket on all three: the leader of the
/// namespace's stream is killed with SIGKILL mid-stream and started again on its store later;
/// the ingress and dispatcher ride it out on the other two.
pub async fn kill_stream_leader(
    env: &Env,
    profile: &Profile,
    rng: &mut Rng,
) -> anyhow::Result<Row> {
    let mut cluster = Cluster::start(env, 3).await?;
    let mut dispatcher = cluster.dispatcher("dispatcher-0");
    tokio::task::block_in_place(|| dispatcher.start())?;
    let sending = send_in_background(cluster.ingress.base(), "r3", profile.nats_events);
    tokio::time::sleep(Duration::from_millis(rng.range(500, 1500))).await;
    let stream_name = jobico_common::subject::stream_name("default");
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let leader = match cluster.js.get_stream(&stream_name).await {
            Ok(mut stream) => stream
                .info()
                .await
                .ok()
                .and_then(|info| info.cluster.as_ref().and_then(|c| c.leader.clone())),
            Err(_) => None,
        };
        if let Some(leader) = leader {
            break leader;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stream {stream_name} has no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let index = cluster
        .nats
        .iter()
        .position(|n| n.name().as_deref() == Some(leader.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no server is named {leader}"))?;
    tokio::task::block_in_place(|| cluster.nats[index].kill());
    tokio::time::sleep(Duration::from_millis(rng.range(2000, 4000))).await;
    tokio::task::block_in_place(|| cluster.nats[index].restart());
    let sent = sending.await?;
    let row = Row {
        name: "3-node NATS (R3): stream leader kill -9, restart".into(),
        note: format!("cluster path: fake API; killed {leader}"),
        ..Default::default()
    };
    cluster
        .finish(&sent, std::slice::from_mut(&mut dispatcher), row)
        .await
}
