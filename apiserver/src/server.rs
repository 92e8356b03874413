//! Running the HTTP API until shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::http::{AppState, configure};

/// Worker threads of the admin listener: probes and scrapes are rare and cheap.
const ADMIN_WORKERS: usize = 1;

/// How long in-flight requests may take to finish after shutdown is requested; a publish with
/// acks takes milliseconds, so this only bounds pathological cases.
const SHUTDOWN_GRACE_SECS: u64 = 30;

/// Time a client has to send a request's head (line and headers) after connecting or after
/// the previous response: a client that sends nothing only holds a socket for this long.
pub const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a closing connection has to finish, after which it is dropped.
pub const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an idle keep-alive connection stays open: long enough for a client sending a
/// stream of events to reuse it, short enough that idle ones do not pile up.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A bound, not yet running, HTTP server.
pub struct BoundServer {
    server: actix_web::dev::Server,
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
}

/// Binds the public API on `listen` with `workers` threads (0 = one per core).
pub fn bind(
    listen: SocketAddr,
    workers: usize,
    state: web::Data<AppState>,
) -> std::io::Result<BoundServer> {
    let mut http = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .disable_signals()
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        .keep_alive(KEEP_ALIVE)
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

/// Binds the admin endpoints (`/healthz`, `/readyz`, `/metrics`) on `listen`.
pub fn bind_admin(listen: SocketAddr, state: web::Data<AppState>) -> std::io::Result<BoundServer> {
    let http = HttpServer::new(move || App::new().configure(configure_admin(state.clone())))
        .disable_signals()
        .workers(ADMIN_WORKERS)
        .shutdown_timeout(1)
        .bind(listen)?;
    let local_addr = http.addrs()[0];
    Ok(BoundServer {
        server: http.run(),
        local_addr,
    })
}

/// Registers the admin routes; `App::new().configure(configure_admin(state))`.
pub fn configure_admin(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(state)
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
            .route(
                "/readyz",
                web::get().to(|state: web::Data<AppState>| async move {
                    let publisher = state.publisher.is_ready();
                    let catalog = state
                        .catalog_synced
                        .load(std::sync::atomic::Ordering::Acquire);
                    let body = serde_json::json!({"publisher": publisher, "catalog": catalog});
                    if publisher && catalog {
                        HttpResponse::Ok().json(body)
                    } else {
                        HttpResponse::ServiceUnavailable().json(body)
                    }
                }),
            )
            .route(
                "/metrics",
                web::get().to(|state: web::Data<AppState>| async move {
                    HttpResponse::Ok()
                        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
                        .body(state.metrics.encode())
                }),
            );
    }
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
