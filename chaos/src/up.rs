//! The processes a scenario attacks: `jobico up --nats` (real binary, output to one log file
//! per incarnation) and what it printed. Killed by PID only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a starting `jobico up` may take to say it is ready (it compiles the samples).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The line `jobico up` prints when it serves.
const READY: &str = "local mode ready";

/// One `jobico up --nats` (or the cluster ingress, [`Up::ingress`]) on a fixed port,
/// restartable.
pub struct Up {
    bin: PathBuf,
    /// The arguments before [`Up::args`]; `None`: `jobico up`'s.
    command: Option<Vec<String>>,
    /// The line saying it serves.
    ready: &'static str,
    repo: PathBuf,
    logs: PathBuf,
    port: u16,
    nats_url: String,
    ack_wait_secs: u64,
    /// Further `jobico up` arguments (other manifests and modules).
    pub args: Vec<String>,
    /// Environment variables of every incarnation (`KUBECONFIG`).
    pub env: Vec<(String, String)>,
    incarnations: usize,
    /// Per incarnation: whether we ended it with `kill -9`.
    killed: Vec<bool>,
    child: Option<Child>,
    /// Exits we did not cause.
    pub crashes: usize,
    /// Designed exits (see [`Up::supervise`]) after which it was started again.
    pub restarts: usize,
    /// Log file prefix.
    name: String,
}

/// The executor image the cluster dispatcher is given (the fake API runs no pods).
pub const EXEC_IMAGE: &str = "jobico/wasm-exec:chaos";

/// What the dispatcher says when it ends itself so that a fresh start campaigns again.
pub const DESIGNED_EXIT: &str = "exiting so a fresh start campaigns again";

impl Up {
    /// An `Up` (not started) running `bin` in `repo` against `nats_url`, logs under `logs`.
    pub fn new(bin: &Path, repo: &Path, logs: &Path, nats_url: &str, ack_wait_secs: u64) -> Self {
        Self {
            bin: bin.to_owned(),
            command: None,
            ready: READY,
            repo: repo.to_owned(),
            logs: logs.to_owned(),
            port: free_port(),
            nats_url: nats_url.to_owned(),
            ack_wait_secs,
            args: Vec::new(),
            env: Vec::new(),
            incarnations: 0,
            killed: Vec::new(),
            child: None,
            crashes: 0,
            restarts: 0,
            name: "up".into(),
        }
    }

    /// The cluster ingress binary `jobico-apiserver` serving the samples' events (`--manifests
    /// samples --auth off`) against `nats_url`; no dispatcher.
    pub fn ingress(bin: &Path, repo: &Path, logs: &Path, nats_url: &str) -> Self {
        let mut up = Self::new(bin, repo, logs, nats_url, 0);
        up.command = Some(
            [
                "--listen",
                &format!("127.0.0.1:{}", up.port),
                "--admin-listen",
                "127.0.0.1:0",
                "--nats",
                nats_url,
                "--manifests",
                "samples",
                "--auth",
                "off",
                "--http-workers",
                "2",
            ]
            .map(String::from)
            .to_vec(),
        );
        up.ready = "serving";
        up.name = "ingress".into();
        up
    }

    /// The cluster dispatcher binary `jobico-dispatcher` as replica `identity`, against
    /// `nats_url` and the Kubernetes API of `kubeconfig`; started once connected to NATS (it
    /// campaigns for the lease from then on).
    pub fn dispatcher(
        bin: &Path,
        logs: &Path,
        nats_url: &str,
        kubeconfig: &Path,
        identity: &str,
        ack_wait_secs: u64,
    ) -> Self {
        let mut up = Self::new(bin, logs, logs, nats_url, ack_wait_secs);
        up.command = Some(
            [
                "--nats",
                nats_url,
                "--exec-image",
                EXEC_IMAGE,
                "--admin-listen",
                "127.0.0.1:0",
                "--identity",
                identity,
                "--ack-wait-secs",
                &ack_wait_secs.to_string(),
            ]
            .map(String::from)
            .to_vec(),
        );
        up.env = vec![("KUBECONFIG".into(), kubeconfig.display().to_string())];
        up.ready = "connected to NATS";
        up.name = identity.to_owned();
        up
    }

    /// The output of the running (or last) incarnation.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.logs.join(format!(
            "{}-{}.log",
            self.name,
            self.incarnations.saturating_sub(1)
        )))
        .unwrap_or_default()
    }

    /// As Kubernetes restarts a container: an incarnation that ended by itself is started
    /// again. An exit the process explains as designed ([`DESIGNED_EXIT`]: it lost the lease,
    /// or could not renew it) counts in [`Up::restarts`]; any other is a crash. True when it
    /// had ended.
    pub fn supervise(&mut self) -> anyhow::Result<bool> {
        let crashes = self.crashes;
        if self.check() {
            return Ok(false);
        }
        if self.crashes > crashes && self.log().contains(DESIGNED_EXIT) {
            self.crashes = crashes;
            self.restarts += 1;
        }
        self.start()?;
        Ok(true)
    }

    /// The base URL, the same for every incarnation.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The PID of the running incarnation.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a new incarnation and waits until it serves.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = self
            .logs
            .join(format!("{}-{}.log", self.name, self.incarnations));
        self.incarnations += 1;
        self.killed.push(false);
        let out = std::fs::File::create(&log).context("cannot create the log file")?;
        let command = self.command.clone().unwrap_or_else(|| {
            [
                "up",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--nats",
                &self.nats_url,
                "--ack-wait-secs",
                &self.ack_wait_secs.to_string(),
                "--http-workers",
                "2",
            ]
            .map(String::from)
            .to_vec()
        });
        let child = Command::new(&self.bin)
            .args(&command)
            .args(&self.args)
            .current_dir(&self.repo)
            .env(
                "JOBICO_LOG",
                std::env::var("JOBICO_CHAOS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::fs::read_to_string(&log)?.contains(self.ready) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "{} exited at start with {status}:\n{}",
                    self.bin.display(),
                    std::fs::read_to_string(&log)?
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not get ready within {START_TIMEOUT:?}:\n{}",
                    self.bin.display(),
                    std::fs::read_to_string(&log)?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts an exit we did not cause as a crash; true while it runs.
    pub fn check(&mut self) -> bool {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(_)) = child.try_wait()
        {
            self.crashes += 1;
            self.child = None;
        }
        self.child.is_some()
    }

    /// `kill -9` of the running incarnation (by its PID), as a crash would.
    pub fn kill9(&mut self) {
        self.check();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(killed) = self.killed.last_mut() {
                *killed = true;
            }
        }
    }

    /// SIGTERM, and the wait for the exit.
    pub fn stop(&mut self) {
        self.check();
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Completed runs per event id, over every incarnation's output (the `succeeded in` or
    /// `failed (` line `jobico up` prints once a run ends): the incarnation of each run.
    pub fn runs(&self) -> HashMap<String, Vec<usize>> {
        let mut runs: HashMap<String, Vec<usize>> = HashMap::new();
        for n in 0..self.incarnations {
            let text = std::fs::read_to_string(self.logs.join(format!("{}-{n}.log", self.name)))
                .unwrap_or_default();
            for line in text.lines() {
                if !(line.contains("] succeeded in") || line.contains("] failed (")) {
                    continue;
                }
                // `[default/ev1 <id>] succeeded in 0.5 ms`
                if let Some(id) = line
                    .strip_prefix('[')
                    .and_then(|rest| rest.split_once(']'))
                    .and_then(|(tag, _)| tag.split_once(' '))
                    .map(|(_, id)| id.to_owned())
                {
                    runs.entry(id).or_default().push(n);
                }
            }
        }
        runs
    }

    /// Whether the runs of one event (their incarnations, in order) are the at-least-once
    /// re-run of a run cut by `kill -9`: each run but the last in a different incarnation,
    /// one we killed (its outcome was not recorded before the kill, so it ran again).
    /// Anything else with several runs is a duplicate.
    pub fn is_rerun_after_kill(&self, incarnations: &[usize]) -> bool {
        incarnations.len() > 1
            && incarnations.windows(2).all(|w| w[0] < w[1])
            && incarnations[..incarnations.len() - 1]
                .iter()
                .all(|&n| self.killed.get(n).copied().unwrap_or(false))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use jobico_testkit::free_port;

/// Peak resident memory of process `pid` in KiB (`VmHWM`), if readable.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
