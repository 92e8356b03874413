//! The cluster path's burst benchmark (`scripts/bench-burst.sh`): the real ingress and
//! dispatcher binaries against the fake Kubernetes API server (each write taking a set
//! latency, as an API server's round trip to etcd does; Jobs completed by its Job
//! controller; a control plane's limited write capacity modelled, which each Job's pod also
//! spends, see [`jobico_testkit::kube_api::ControlPlane`]), one event type configured three
//! ways — one Job per event, fixed batching (`maxEvents: 50, maxWaitMillis: 300`), adaptive
//! batching (`maxEvents: 50, maxWaitMillis: 0`). For each: a lone event's PUT → `succeeded` latency (median of several, the consumer
//! idle), then a burst of N events sent at once: events/s until all succeeded, Jobs created,
//! mean events per Job, and Kubernetes writes per event counted by the fake API: the
//! requests' by resource, and with the modelled controllers' writes for pods and Job status.
//! Figures are same-run ratios to the one-per-event row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

use crate::clients::send_to;
use crate::cluster::{Cluster, JOBS, succeeded, until_leader};
use crate::scenarios::Env;
use jobico_testkit::kube_api::ControlPlane;

/// Command line of `jobico-burst`.
#[derive(Debug, Parser)]
#[command(name = "jobico-burst", version)]
pub struct BurstArgs {
    /// Events in the burst.
    #[arg(long, default_value_t = 1000)]
    pub events: usize,
    /// Clients sending at once.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Latency of each Kubernetes write, milliseconds.
    #[arg(long, default_value_t = 10)]
    pub write_latency_ms: u64,
    /// Writes per second the modelled control plane serves, all writers together (0: no
    /// limit, and no pod writes). The default is what the 2-core control plane of the
    /// 2026-12 trial sustained: 20.8 events/s at 11.3 writes per event, one Job per event.
    #[arg(long, default_value_t = 235.0)]
    pub write_capacity: f64,
    /// Writes the modelled controllers make for each Job (its pod's create, binding and
    /// status, the Job's status), besides the Job's create.
    #[arg(long, default_value_t = 10)]
    pub writes_per_job: usize,
    /// Lone events measured per configuration (the median is printed).
    #[arg(long, default_value_t = 7)]
    pub lone: usize,
    /// The directory holding `jobico-apiserver` and `jobico-dispatcher`.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: std::path::PathBuf,
    /// The repository root (samples).
    #[arg(long, default_value = ".")]
    pub repo: std::path::PathBuf,
}

/// One configuration's figures.
struct Figures {
    name: &'static str,
    lone_p50: Duration,
    events_per_sec: f64,
    jobs: usize,
    writes: BTreeMap<String, usize>,
    controller_writes: usize,
}

async fn measure(
    env: &Env,
    args: &BurstArgs,
    (name, slug): (&'static str, &'static str),
    batch: Option<Value>,
) -> anyhow::Result<Figures> {
    let mut cluster = Cluster::start_with(env, 1, |job| {
        if let Some(batch) = &batch {
            job["spec"]["events"][0]["batch"] = batch.clone();
        }
    })
    .await?;
    cluster
        .api
        .write_latency(Some(Duration::from_millis(args.write_latency_ms)));
    cluster
        .api
        .control_plane((args.write_capacity > 0.0).then_some(ControlPlane {
            writes_per_second: args.write_capacity,
            writes_per_job: args.writes_per_job,
        }));
    // The production ack wait: the scenarios' short one would have messages waiting for a
    // dispatch slot behind a slow control plane redelivered, as they would not be in a cluster.
    let mut dispatcher = cluster.dispatcher_acking(
        "dispatcher-0",
        jobico_dispatcher::consumer::ACK_WAIT.as_secs(),
    );
    tokio::task::block_in_place(|| dispatcher.start())?;
    until_leader(&dispatcher, Duration::from_secs(30)).await?;
    // The ingress opened (or created) the state bucket before it served.
    let kv = cluster
        .js
        .get_key_value(jobico_common::subject::STATE_BUCKET)
        .await?;
    let base = cluster.ingress.base();
    let deadline = || Instant::now() + Duration::from_secs(60);
    // Lone events, the consumer idle between them.
    let mut lone = Vec::new();
    for i in 0..args.lone + 1 {
        let key = format!("{slug}-lone-{i}");
        let started = Instant::now();
        let sent = send_to(&base, "default/ev1", vec![key.clone()], 1, deadline()).await;
        anyhow::ensure!(sent.acked.contains(&key), "lone event {key} not accepted");
        while !succeeded(&kv, &key).await {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "{key} never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The first one also waits for the consumer to start: not counted.
        if i > 0 {
            lone.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lone.sort();
    // The burst.
    let jobs_before = cluster.api.created(JOBS).len();
    let writes_before = cluster.api.writes();
    let controller_writes_before = cluster.api.controller_writes();
    let keys: Vec<String> = (0..args.events)
        .map(|i| format!("{slug}-burst-{i}"))
        .collect();
    let started = Instant::now();
    let sent = send_to(&base, "default/ev1", keys.clone(), args.clients, deadline()).await;
    anyhow::ensure!(
        sent.acked.len() == keys.len(),
        "not every burst event was accepted"
    );
    let mut pending: Vec<String> = keys;
    while !pending.is_empty() {
        let mut left = Vec::new();
        for key in pending {
            if !succeeded(&kv, &key).await {
                left.push(key);
            }
        }
        pending = left;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the burst did not drain"
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let took = started.elapsed();
    let mut writes = cluster.api.writes();
    for (resource, n) in writes_before {
        if let Some(total) = writes.get_mut(&resource) {
            *total -= n;
        }
    }
    writes.retain(|_, n| *n > 0);
    let jobs = cluster.api.created(JOBS).len() - jobs_before;
    let controller_writes = cluster.api.controller_writes() - controller_writes_before;
    dispatcher.stop();
    let mut row = crate::Row::default();
    cluster.stop(&mut row);
    Ok(Figures {
        name,
        lone_p50: lone[lone.len() / 2],
        events_per_sec: args.events as f64 / took.as_secs_f64(),
        jobs,
        writes,
        controller_writes,
    })
}

/// Runs the three configurations and prints the table.
pub async fn run(args: BurstArgs) -> anyhow::Result<()> {
    let env = Env {
        jobico: std::fs::canonicalize(&args.bin_dir)?.join("jobico"),
        repo: std::fs::canonicalize(&args.repo)?,
    };
    let capacity = if args.write_capacity > 0.0 {
        format!(
            "a control plane serving {} writes/s, {} writes per Job for its pod",
            args.write_capacity, args.writes_per_job
        )
    } else {
        "no write capacity modelled".to_owned()
    };
    println!(
        "burst: {} events from {} clients, {} ms per Kubernetes write, {capacity}, {} cores",
        args.events,
        args.clients,
        args.write_latency_ms,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let configs = [
        (("one Job per event", "single"), None),
        (
            ("batch {maxEvents: 50, maxWaitMillis: 300}", "fixed"),
            Some(json!({"maxEvents": 50, "maxWaitMillis": 300})),
        ),
        (
            (
                "batch {maxEvents: 50, maxWaitMillis: 0} (adaptive)",
                "adaptive",
            ),
            Some(json!({"maxEvents": 50, "maxWaitMillis": 0})),
        ),
    ];
    let mut rows = Vec::new();
    for (name, batch) in configs {
        rows.push(measure(&env, &args, name, batch).await?);
    }
    let base = &rows[0];
    println!(
        "\n| event config | events/s until all succeeded | x one-per-event | Jobs | events per Job | Kubernetes writes per event: requests | with the pods' | lone event PUT → succeeded p50 | x one-per-event |"
    );
    println!("|---|---:|---:|---:|---:|---|---:|---:|---:|");
    for row in &rows {
        let total: usize = row.writes.values().sum();
        let detail = row
            .writes
            .iter()
            .map(|(resource, n)| format!("{resource} {:.2}", *n as f64 / args.events as f64))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {} | {:.1} | {:.1}x | {} | {:.1} | {:.2} ({detail}) | {:.2} | {:.0} ms | {:.2}x |",
            row.name,
            row.events_per_sec,
            row.events_per_sec / base.events_per_sec,
            row.jobs,
            args.events as f64 / row.jobs.max(1) as f64,
            total as f64 / args.events as f64,
            (total + row.controller_writes) as f64 / args.events as f64,
            row.lone_p50.as_secs_f64() * 1000.0,
            row.lone_p50.as_secs_f64() / base.lone_p50.as_secs_f64(),
        );
    }
    Ok(())
}
