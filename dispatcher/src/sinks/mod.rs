//! Results out: delivering the outcomes kept in the sink outbox to their receivers.
//!
//! The ingress (or local mode) keeps each outcome of an event with a `sink` in the JetStream
//! stream `JOBICO_SINKS` as a CloudEvent (see [`jobico_common::sink`]). [`run`] pulls them
//! from one durable consumer and POSTs each to its URL; a 2xx answer acks it, anything else
//! (a refusal, a timeout, a redirect) retries it later with exponential backoff, until
//! [`SinkSettings::max_attempts`]. Every attempt is recorded in the event's state record
//! (`sink: {url, attempts, lastError, deliveredAt, gaveUp}`), so `GET /events/<ns>/<id>`
//! shows it. Delivery is at least once: a crash between the POST and the ack posts again,
//! with the same CloudEvent id.
//!
//! The deliverer runs with the dispatcher's network reach, and a tenant chooses the URL, so
//! [`SinkPolicy`] decides which addresses a sink may resolve to: never loopback (unless
//! allowed, as local mode does), link-local (cloud metadata endpoints), unspecified, multicast
//! or broadcast addresses, the addresses of the NATS servers and of the Kubernetes API this
//! dispatcher holds credentials for, nor the operator's `--sink-deny-cidr` ranges. The check
//! is made on the addresses the connection actually uses (the resolver filters them, so a
//! name that re-resolves elsewhere gains nothing), redirects are not followed and no proxy is
//! used.
//!
//! - [`policy`]: which addresses a sink may reach; [`client`]: the POST under that policy;
//!   [`outbox`]: the consumer that delivers, records and retries.

use std::time::Duration;

use ipnet::IpNet;

pub mod client;
pub mod outbox;
pub mod policy;

pub use client::SinkClient;
pub use outbox::{SINK_CONSUMER, run};
pub use policy::SinkPolicy;

/// How outcomes are delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Deliveries of one namespace's outcomes in flight at once.
    pub per_namespace: usize,
    /// POSTs tried before an outcome is given up (recorded `gaveUp`).
    pub max_attempts: u32,
    /// How long one POST may take, connection included.
    pub timeout: Duration,
    /// Wait before the second attempt; doubled each time after.
    pub first_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for SinkSettings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            per_namespace: 8,
            // 1 s doubling to 5 min: about 2 hours of trying.
            max_attempts: 30,
            timeout: Duration::from_secs(10),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl SinkSettings {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.first_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// The sink flags of the dispatcher (and `jobico up`).
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Address ranges sinks may not reach, besides those always refused (loopback,
    /// link-local, the NATS servers, the Kubernetes API); e.g. the cluster's service range.
    /// Repeat or separate with commas.
    #[arg(
        long,
        env = "JOBICO_SINK_DENY_CIDR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub sink_deny_cidr: Vec<IpNet>,
    /// Deliveries in flight at once.
    #[arg(long, env = "JOBICO_SINK_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sink_concurrency: u16,
    /// Deliveries of one namespace's outcomes in flight at once (its share of
    /// --sink-concurrency: a tenant whose receiver hangs holds no more).
    #[arg(long, env = "JOBICO_SINK_CONCURRENCY_PER_NAMESPACE", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sink_concurrency_per_namespace: u16,
    /// POSTs tried before an outcome is given up.
    #[arg(long, env = "JOBICO_SINK_MAX_ATTEMPTS", default_value_t = SinkSettings::default().max_attempts,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sink_max_attempts: u32,
}

impl SinkArgs {
    /// The delivery settings these flags describe.
    pub fn settings(&self) -> SinkSettings {
        SinkSettings {
            concurrency: usize::from(self.sink_concurrency),
            per_namespace: usize::from(self.sink_concurrency_per_namespace),
            max_attempts: self.sink_max_attempts,
            ..SinkSettings::default()
        }
    }
}

/// The record of attempt number `attempts` to `url`, which ended as `posted`: delivered now, or
/// failed with its error and, when `last` (no attempt follows), given up. The one rule both
/// the outbox and local mode's direct delivery record attempts by.
pub fn attempt_record(
    url: &str,
    attempts: u32,
    posted: Result<(), String>,
    last: bool,
) -> jobico_common::sink::SinkStatus {
    let mut status = jobico_common::sink::SinkStatus {
        url: url.to_owned(),
        attempts,
        ..Default::default()
    };
    match posted {
        Ok(()) => status.delivered_at = Some(jobico_store::now()),
        Err(error) => {
            status.last_error = Some(error);
            status.gave_up = last;
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let settings = SinkSettings::default();
        assert_eq!(settings.backoff(1), Duration::from_secs(1));
        assert_eq!(settings.backoff(2), Duration::from_secs(2));
        assert_eq!(settings.backoff(5), Duration::from_secs(16));
        assert_eq!(settings.backoff(12), Duration::from_secs(300));
        assert_eq!(settings.backoff(u32::MAX), Duration::from_secs(300));
    }
}
