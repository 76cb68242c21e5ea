//! The DNS proxy's counters, named ztunnel_dns_* (without Istio's workload labels, so not istio_*).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct DnsMetrics {
    pub requests: Counter,
    pub upstream_requests: Counter,
    pub upstream_failures: Counter,
    /// Forwarded questions answered from the cache.
    pub cache_hits: Counter,
    /// Queries and connections refused by a pod's limits.
    pub dropped: Counter,
}

impl DnsMetrics {
    pub fn register(registry: &mut Registry) -> DnsMetrics {
        let m = DnsMetrics::default();
        registry.register(
            "ztunnel_dns_requests",
            "DNS queries received",
            m.requests.clone(),
        );
        registry.register(
            "ztunnel_dns_upstream_requests",
            "DNS queries sent to the node's nameservers (cache misses)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "ztunnel_dns_upstream_failures",
            "Forwarded DNS queries no nameserver answered",
            m.upstream_failures.clone(),
        );
        registry.register(
            "ztunnel_dns_cache_hits",
            "Forwarded DNS queries answered from the cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "ztunnel_dns_dropped",
            "DNS queries and connections dropped by a pod's or the node's limits",
            m.dropped.clone(),
        );
        m
    }
}
