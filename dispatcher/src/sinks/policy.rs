//! Which addresses a sink may resolve to, and the resolver that holds the HTTP client to them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Which addresses a sink may resolve to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SinkPolicy {
    /// Whether loopback addresses are allowed (local mode: the receiver is on this machine).
    pub allow_loopback: bool,
    /// Ranges refused besides the always refused ones.
    pub denied: Vec<IpNet>,
}

impl SinkPolicy {
    /// Why a sink may not reach `ip`, or `None` when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        // An IPv4 address written as IPv6 (::ffff:a.b.c.d) is that IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        let kind = match ip {
            _ if ip.is_loopback() && !self.allow_loopback => Some("a loopback address"),
            _ if ip.is_unspecified() => Some("an unspecified address"),
            _ if ip.is_multicast() => Some("a multicast address"),
            IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
            IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
            _ => None,
        };
        if let Some(kind) = kind {
            return Some(format!("{ip} is {kind}, which sinks may not reach"));
        }
        self.denied
            .iter()
            .find(|net| net.contains(&ip))
            .map(|net| format!("{ip} is in {net}, which sinks may not reach"))
    }

    /// This policy, also refusing every address `hosts` (`host[:port]` or URLs, e.g. the NATS
    /// servers) resolve to now.
    pub async fn denying_hosts_of(mut self, hosts: &[String]) -> Self {
        for host in hosts {
            let Some(authority) = authority(host) else {
                continue;
            };
            let target = if authority.contains(':') && !authority.ends_with(']') {
                authority.to_owned()
            } else {
                format!("{authority}:0")
            };
            match tokio::net::lookup_host(target.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        if self.refusal(addr.ip()).is_none() {
                            self.denied.push(IpNet::from(addr.ip()));
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(host, %error, "cannot resolve a host sinks may not reach")
                }
            }
        }
        self
    }
}

/// The host and port of `url` (`scheme://[user@]host[:port][/…]`, or a bare `host[:port]`).
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    let end = rest.find(['/', '?', ',']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|a| !a.is_empty())
}

/// A resolver that hands the HTTP client only the addresses the policy allows.
pub(super) struct GuardedResolver(pub(super) Arc<SinkPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusals = Vec::new();
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.refusal(addr.ip()) {
                    Some(refusal) => {
                        refusals.push(refusal);
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let why = refusals
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "no address".into());
                return Err(
                    format!("{host} resolves to no address sinks may reach ({why})").into(),
                );
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_refuses_what_sinks_may_not_reach() {
        let policy = SinkPolicy {
            allow_loopback: false,
            denied: vec!["10.96.0.0/12".parse().unwrap()],
        };
        let refused = |ip: &str| policy.refusal(ip.parse().unwrap());
        assert!(refused("127.0.0.1").unwrap().contains("loopback"));
        assert!(refused("::1").unwrap().contains("loopback"));
        assert!(refused("::ffff:127.0.0.1").unwrap().contains("loopback"));
        assert!(refused("169.254.169.254").unwrap().contains("link-local"));
        assert!(refused("fe80::1").unwrap().contains("link-local"));
        assert!(refused("0.0.0.0").unwrap().contains("unspecified"));
        assert!(refused("224.0.0.1").unwrap().contains("multicast"));
        assert_eq!(
            refused("10.96.0.1").unwrap(),
            "10.96.0.1 is in 10.96.0.0/12, which sinks may not reach"
        );
        assert_eq!(refused("10.1.2.3"), None);
        assert_eq!(refused("93.184.216.34"), None);
        let local = SinkPolicy {
            allow_loopback: true,
            ..SinkPolicy::default()
        };
        assert_eq!(local.refusal("127.0.0.1".parse().unwrap()), None);
        assert!(local.refusal("169.254.169.254".parse().unwrap()).is_some());
    }

    #[test]
    fn authorities_come_out_of_urls_and_server_lists() {
        assert_eq!(
            authority("nats://nats.jobico:4222"),
            Some("nats.jobico:4222")
        );
        assert_eq!(authority("tls://u:p@10.0.0.5:4222/"), Some("10.0.0.5:4222"));
        assert_eq!(authority("https://[::1]:6443"), Some("[::1]:6443"));
        assert_eq!(
            authority("kubernetes.default.svc"),
            Some("kubernetes.default.svc")
        );
        assert_eq!(authority(""), None);
    }
}
