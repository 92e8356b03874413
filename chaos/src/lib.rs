//! Jobico's fault and hostile-input runner (`scripts/chaos.sh [--short|--full]`).
//!
//! Every scenario runs the real binaries on loopback (a real `nats-server`, `jobico up
//! --nats`), attacks them (processes are killed by PID only) while clients send events and
//! retry as the README says, then counts: events attempted, acknowledged (`202`), executed
//! (a completed run printed by `jobico up`), **lost** (acknowledged, never executed),
//! **duplicated** (more than one completed run, other than the re-run of a run whose process
//! we killed before it recorded the outcome: local durable mode is at least once, and those
//! are counted in a column of their own), dead-lettered, the time to drain after the
//! last acknowledgement, and crashes (an exit nobody caused). It prints one table and exactly
//! one summary line, `chaos: <N> scenarios, <L> lost, <D> duplicated, <C> crashes`, and
//! succeeds only when all three are zero (and no request got a 5xx other than 503).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub mod burst;
pub mod clients;
pub mod cluster;
pub mod hostile;
pub mod modules;
pub mod scenarios;
pub mod sinks;
pub mod up;

/// Command line of `jobico-chaos`.
#[derive(Debug, Parser)]
#[command(name = "jobico-chaos", version)]
pub struct Args {
    /// The short profile (fewer events and kills; what CI runs).
    #[arg(long, conflicts_with = "full")]
    pub short: bool,
    /// The full profile (the README's table).
    #[arg(long)]
    pub full: bool,
    /// The `jobico` binary.
    #[arg(long, default_value = "target/debug/jobico")]
    pub jobico: PathBuf,
    /// The repository root (`jobico up` serves its samples).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Run only the scenarios whose name contains this (case-insensitive).
    #[arg(long)]
    pub only: Option<String>,
    /// Seed of the random kill moments and hostile requests (printed, so a run can be
    /// repeated).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// The profile's name.
    pub name: &'static str,
    /// Events of the `jobico up` kill scenario.
    pub kill_events: usize,
    /// Kills of `jobico up` while they flow.
    pub kills: usize,
    /// Events of the nats-server kill scenario.
    pub nats_events: usize,
    /// Malformed requests.
    pub hostile_requests: usize,
    /// How long the Kubernetes API answers every request 503.
    pub api_outage: Duration,
}

impl Profile {
    /// Under five minutes on 2 cores: what CI runs.
    pub const SHORT: Self = Self {
        name: "short",
        kill_events: 300,
        kills: 3,
        nats_events: 300,
        hostile_requests: 2_000,
        api_outage: Duration::from_secs(10),
    };
    /// The sizes.
    pub const FULL: Self = Self {
        name: "full",
        kill_events: 2_000,
        kills: 10,
        nats_events: 2_000,
        hostile_requests: 10_000,
        api_outage: Duration::from_secs(30),
    };
}

/// One scenario's counts.
#[derive(Debug, Default, Clone)]
pub struct Row {
    /// Scenario name.
    pub name: String,
    /// Events (or requests) attempted.
    pub attempted: usize,
    /// Acknowledged with 202.
    pub acked: usize,
    /// Acknowledged events that ran.
    pub executed: usize,
    /// Acknowledged, never run.
    pub lost: usize,
    /// Run more than once, other than [`Row::rerun`]: a second run caused by us.
    pub duplicated: usize,
    /// Run again because the process running it was killed before its outcome was recorded
    /// (local durable mode is at least once; counted, not a duplicate).
    pub rerun: usize,
    /// Dead-lettered.
    pub dead_lettered: usize,
    /// Seconds from the last 202 until every acknowledged event had run.
    pub drain: Option<Duration>,
    /// Exits nobody caused.
    pub crashes: usize,
    /// Answers that should never happen (5xx other than 503, unexpected 4xx to valid events).
    pub unexpected: usize,
    /// Peak resident memory of the attacked process, KiB.
    pub peak_rss_kib: Option<u64>,
    /// A note (what was done).
    pub note: String,
}

/// A small deterministic generator (xorshift64*): the kill moments and hostile inputs of a
/// seed are the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (never zero inside).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `low..high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low).max(1)
    }
}

/// Runs every scenario of the profile, prints the table and the summary line; true when
/// nothing was lost, duplicated or crashed and no request got an unexpected answer.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    let profile = if args.full {
        Profile::FULL
    } else {
        Profile::SHORT
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let jobico = std::fs::canonicalize(&args.jobico).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (build it with cargo build -p jobico)",
            args.jobico.display()
        )
    })?;
    let repo = std::fs::canonicalize(&args.repo)?;
    println!(
        "chaos: profile {}, seed {seed}, {} cores",
        profile.name,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let env = scenarios::Env { jobico, repo };
    let mut rng = Rng::new(seed);
    let mut rows = Vec::new();
    let chosen = |name: &str| {
        args.only
            .as_ref()
            .is_none_or(|only| name.to_lowercase().contains(&only.to_lowercase()))
    };
    for scenario in scenarios::ALL.iter().filter(|s| chosen(s.0)) {
        let started = std::time::Instant::now();
        let row = match scenario.1(&env, &profile, &mut rng).await {
            Ok(row) => row,
            Err(error) => Row {
                name: scenario.0.into(),
                crashes: 1,
                note: format!("could not run: {error:#}"),
                ..Default::default()
            },
        };
        eprintln!(
            "chaos: {} done in {:.1} s",
            row.name,
            started.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    print_table(&rows);
    let lost: usize = rows.iter().map(|r| r.lost).sum();
    let duplicated: usize = rows.iter().map(|r| r.duplicated).sum();
    let crashes: usize = rows.iter().map(|r| r.crashes).sum();
    let unexpected: usize = rows.iter().map(|r| r.unexpected).sum();
    println!(
        "chaos: {} scenarios, {lost} lost, {duplicated} duplicated, {crashes} crashes",
        rows.len()
    );
    Ok(lost == 0 && duplicated == 0 && crashes == 0 && unexpected == 0)
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| scenario | attempted | acked (202) | executed | lost | duplicated | re-run after kill -9 | dead-lettered | drain | crashes | unexpected answers | peak RSS | note |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.attempted,
            r.acked,
            r.executed,
            r.lost,
            r.duplicated,
            r.rerun,
            r.dead_lettered,
            r.drain
                .map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            r.crashes,
            r.unexpected,
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
            r.note
        );
    }
    println!();
}
