//! One NATS connection per HTTP worker thread, so a request publishes and awaits its acks on
//! its own thread.
//!
//! actix-web runs each worker on a single-threaded runtime. With one shared connection, whose
//! task lives on the main runtime, every publish crosses threads twice (the request to the
//! connection task, the ack back), and each crossing wakes a parked thread. Measured with
//! `scripts/bench-apiserver.sh` on 2 cores: per-worker connections cut one client's latency
//! from 0.34 to 0.27 ms and raise 64 clients' throughput by about a tenth.
//!
//! Connections are made lazily, in the background, the first time a worker publishes; until one
//! is ready (or while it is disconnected) the worker uses the shared connection, so nothing
//! waits for it. Only single-threaded runtimes get their own: on a multi-threaded runtime the
//! shared connection is already local to the runtime.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream;
use tokio::runtime::{Handle, RuntimeFlavor};

/// How long a worker waits after a failed connection attempt before trying again (it keeps
/// publishing through the shared connection meanwhile).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Tells publisher instances apart in the per-thread table.
static NEXT_OWNER: AtomicUsize = AtomicUsize::new(0);

/// A worker thread's connection for one publisher.
enum Slot {
    /// A connection attempt is under way.
    Connecting,
    /// Connected (it reconnects by itself after an outage).
    Ready(Arc<Local>),
    /// The last attempt failed at that time.
    Failed(Instant),
}

thread_local! {
    /// Per publisher (by owner id), this thread's connection. A publisher that is dropped
    /// leaves its entry behind on threads that used it: only tests create more than one.
    static SLOTS: RefCell<HashMap<usize, Slot>> = RefCell::new(HashMap::new());
}

/// A worker thread's own connection.
pub struct Local {
    /// The client (for its connection state).
    pub client: async_nats::Client,
    /// The JetStream context publishing through it.
    pub context: jetstream::Context,
}

/// How to make a worker's connection: the same server and settings as the shared one.
pub type Connector = Arc<
    dyn Fn() -> futures::future::BoxFuture<
            'static,
            Result<(async_nats::Client, jetstream::Context), async_nats::ConnectError>,
        > + Send
        + Sync,
>;

/// The per-thread connections of one publisher.
pub struct WorkerConnections {
    owner: usize,
    connect: Connector,
}

impl WorkerConnections {
    /// Connections made with `connect`.
    pub fn new(connect: Connector) -> Self {
        Self {
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            connect,
        }
    }

    /// This thread's connection, if it has one and it is connected. Starts connecting in the
    /// background when it has none (or the last attempt failed long enough ago).
    pub fn local(&self) -> Option<Arc<Local>> {
        let Ok(handle) = Handle::try_current() else {
            return None;
        };
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return None;
        }
        let owner = self.owner;
        let connected = SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            match slots.get(&owner) {
                Some(Slot::Ready(local)) => Some(
                    (local.client.connection_state() == State::Connected).then(|| local.clone()),
                ),
                Some(Slot::Connecting) => Some(None),
                Some(Slot::Failed(at)) if at.elapsed() < RETRY_AFTER_FAILURE => Some(None),
                _ => {
                    slots.insert(owner, Slot::Connecting);
                    None
                }
            }
        });
        match connected {
            // Ready, connecting, or recently failed: whatever this thread has.
            Some(local) => local,
            // Nothing yet: connect in the background, use the shared connection meanwhile.
            None => {
                let connect = (self.connect)();
                // A single-threaded runtime runs this task on this thread, where the slot is.
                handle.spawn(async move {
                    let slot = match connect.await {
                        Ok((client, context)) => Slot::Ready(Arc::new(Local { client, context })),
                        Err(error) => {
                            tracing::debug!(%error, "worker connection to NATS failed; using the shared one");
                            Slot::Failed(Instant::now())
                        }
                    };
                    SLOTS.with(|slots| slots.borrow_mut().insert(owner, slot));
                });
                None
            }
        }
    }
}
