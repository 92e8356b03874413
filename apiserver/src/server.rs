//! Running the HTTP API until shutdown.

use std::net::SocketAddr;

use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::http::{AppState, configure};

/// How long in-flight requests may take to finish after shutdown is requested; a publish with
/// acks takes milliseconds, so this only bounds pathological cases.
const SHUTDOWN_GRACE_SECS: u64 = 30;

/// A bound, not yet running, HTTP server.
pub struct BoundServer {
    server: actix_web::dev::Server,
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
}

/// Binds the public API on `listen` with `workers` threads (0 = one per core).
pub fn bind(listen: SocketAddr, workers: usize, state: web::Data<AppState>) -> std::io::Result<BoundServer> {
    let mut http = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_GRACE_SECS);
    if workers > 0 {
        http = http.workers(workers);
    }
    let http = http.bind(listen)?;
    let local_addr = http.addrs()[0];
    Ok(BoundServer {
        server: http.run(),
        local_addr,
    })
}

impl BoundServer {
    /// Serves until `shutdown` is cancelled, then stops accepting and drains in-flight requests.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let handle = self.server.handle();
        let stopper = tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        });
        let result = self.server.await;
        stopper.abort();
        result
    }
}
