//! Prometheus metrics of the ingress, served on the admin port.
//!
//! Labels stay low-cardinality: the route template (never the namespace, event or id), the
//! method and the status code.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route template (`/execute/{namespace}/{event}`, `/events/{namespace}/{id}`, `other`).
    pub route: &'static str,
    /// HTTP status code.
    pub status: u16,
}

/// The ingress's metrics; cheap to clone (every member is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Events rejected because they break their schema.
    pub validation_failures: Counter,
    /// Time to publish one request's events and receive every ack, in seconds.
    pub publish_seconds: Histogram,
    /// Requests being handled.
    pub in_flight: Gauge,
    /// Authorization decisions answered from the cache.
    pub auth_cache_hits: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("jobico_apiserver");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let validation_failures = Counter::default();
        registry.register(
            "validation_failures",
            "Events rejected for breaking their schema",
            validation_failures.clone(),
        );
        // 100 µs to ~6.5 s: loopback acks take ~1 ms, a struggling cluster seconds.
        let publish_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17),
        );
        registry.register(
            "publish_seconds",
            "Time to publish a request's events and receive every ack",
            publish_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests being handled",
            in_flight.clone(),
        );
        let auth_cache_hits = Counter::default();
        registry.register(
            "auth_cache_hits",
            "Authorization decisions answered from the cache",
            auth_cache_hits.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            validation_failures,
            publish_seconds,
            in_flight,
            auth_cache_hits,
        }
    }

    /// Counts one answered request.
    pub fn observe_request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Records one request's publish time.
    pub fn observe_publish(&self, elapsed: Duration) {
        self.publish_seconds.observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_route_and_status() {
        let metrics = Metrics::new();
        metrics.observe_request("/execute/{namespace}/{event}", 202);
        metrics.observe_publish(Duration::from_millis(2));
        metrics.validation_failures.inc();
        let text = metrics.encode();
        assert!(
            text.contains(r#"jobico_apiserver_http_requests_total{route="/execute/{namespace}/{event}",status="202"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("jobico_apiserver_publish_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("jobico_apiserver_validation_failures_total 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
