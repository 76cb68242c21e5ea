//! The waypoint's own counters beside Istio's request metrics: requests
//! whose body outgrew the retry buffer (Envoy counts these as
//! `retry_or_shadow_abandoned`), and upgraded connections (WebSocket and
//! other `Upgrade`s, and CONNECT) with the bytes they relay.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeLabels {
    pub destination_service: String,
    /// `websocket`, another `Upgrade` token, or `connect`.
    pub upgrade: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeBytesLabels {
    pub destination_service: String,
    pub upgrade: String,
    /// `sent` (to the client) or `received` (from it).
    pub direction: &'static str,
}

#[derive(Clone, Default)]
pub struct ProxyMetrics {
    pub retry_buffer_overflows: Family<ServiceLabels, Counter>,
    pub upgrades: Family<UpgradeLabels, Counter>,
    pub upgrade_bytes: Family<UpgradeBytesLabels, Counter>,
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics::default();
        registry.register(
            "waypoint_retry_buffer_overflows",
            "Requests whose body outgrew the retry buffer: streamed on, not retried or mirrored",
            m.retry_buffer_overflows.clone(),
        );
        registry.register(
            "waypoint_upgraded_connections",
            "Requests upgraded to a relayed byte stream (WebSocket, other Upgrades, CONNECT)",
            m.upgrades.clone(),
        );
        registry.register(
            "waypoint_upgraded_bytes",
            "Bytes relayed on upgraded connections",
            m.upgrade_bytes.clone(),
        );
        m
    }

    pub fn overflowed(&self, service: &str) {
        self.retry_buffer_overflows
            .get_or_create(&ServiceLabels {
                destination_service: service.to_string(),
            })
            .inc();
    }
}
