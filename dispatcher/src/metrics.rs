//! Prometheus metrics, served on the admin port at `/metrics`. Labels are low-cardinality:
//! no namespace, event or id labels.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The dispatcher's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Kubernetes Jobs (or local runs) created.
    pub jobs_created: Counter,
    /// Events handed to a Job and acked.
    pub events_dispatched: Counter,
    /// Redelivered or replayed events found already dispatched and acked without a new Job.
    pub events_skipped: Counter,
    /// Dispatch attempts that failed and were retried.
    pub dispatch_retries: Counter,
    /// Events moved to the dead-letter subject.
    pub events_dead_lettered: Counter,
    /// Event state records written.
    pub state_updates: Counter,
    /// Time from a batch's dispatch start to the Job existing, in seconds.
    pub dispatch_seconds: Histogram,
    /// Running consumers (one per declared event while leader).
    pub consumers: Gauge,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jobico_dispatcher");
        let jobs_created = Counter::default();
        let events_dispatched = Counter::default();
        let events_skipped = Counter::default();
        let dispatch_retries = Counter::default();
        let events_dead_lettered = Counter::default();
        let state_updates = Counter::default();
        // 1 ms to ~16 s: a local create takes milliseconds, a throttled one seconds.
        let dispatch_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let consumers = Gauge::default();
        let leader = Gauge::default();
        registry.register("jobs_created", "Jobs created", jobs_created.clone());
        registry.register(
            "events_dispatched",
            "Events handed to a Job and acked",
            events_dispatched.clone(),
        );
        registry.register(
            "events_skipped",
            "Redelivered events already dispatched",
            events_skipped.clone(),
        );
        registry.register(
            "dispatch_retries",
            "Dispatch attempts retried",
            dispatch_retries.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events moved to the dead-letter subject",
            events_dead_lettered.clone(),
        );
        registry.register(
            "state_updates",
            "Event state records written",
            state_updates.clone(),
        );
        registry.register(
            "dispatch_seconds",
            "Time to create a batch's Job",
            dispatch_seconds.clone(),
        );
        registry.register("consumers", "Running event consumers", consumers.clone());
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            leader.clone(),
        );
        Self {
            registry,
            jobs_created,
            events_dispatched,
            events_skipped,
            dispatch_retries,
            events_dead_lettered,
            state_updates,
            dispatch_seconds,
            consumers,
            leader,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
