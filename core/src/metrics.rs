//! Prometheus metrics with Istio's names and labels, so existing dashboards
//! work unchanged.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::Workload;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// Why a connection did not complete normally, as Istio spells it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, serde::Serialize)]
pub enum ResponseFlags {
    None,
    /// Refused by authorization policy.
    Deny,
    /// The upstream could not be reached.
    Connect,
    /// The service has no healthy endpoint.
    NoHealthyUpstream,
}

impl ResponseFlags {
    pub fn as_str(&self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
            ResponseFlags::NoHealthyUpstream => "UH",
        }
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Istio's TCP metric labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        src: Option<&Workload>,
        src_identity: Option<&Identity>,
        dst: Option<&Workload>,
        dst_identity: Option<&Identity>,
        service: Option<(&str, &str, &str)>,
        mtls: bool,
    ) -> Self {
        let wl =
            |w: Option<&Workload>, f: fn(&Workload) -> &str| or_unknown(w.map(f).unwrap_or(""));
        let (svc_host, svc_ns, svc_name) = service.unwrap_or((UNKNOWN, UNKNOWN, UNKNOWN));
        TcpLabels {
            reporter,
            source_workload: wl(src, |w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            source_canonical_service: wl(src, |w| &w.canonical_name),
            source_canonical_revision: wl(src, |w| &w.canonical_revision),
            source_workload_namespace: wl(src, |w| &w.namespace),
            source_principal: src_identity
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            // As Istio's ztunnel: the app and version are the canonical
            // service and revision (from `app.kubernetes.io/name` or
            // `app`, `app.kubernetes.io/version` or `version`).
            source_app: wl(src, |w| &w.canonical_name),
            source_version: wl(src, |w| &w.canonical_revision),
            source_cluster: wl(src, |w| &w.cluster_id),
            destination_service: svc_host.into(),
            destination_service_namespace: svc_ns.into(),
            destination_service_name: svc_name.into(),
            destination_workload: wl(dst, |w| {
                if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                }
            }),
            destination_canonical_service: wl(dst, |w| &w.canonical_name),
            destination_canonical_revision: wl(dst, |w| &w.canonical_revision),
            destination_workload_namespace: wl(dst, |w| &w.namespace),
            destination_principal: dst_identity
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_app: wl(dst, |w| &w.canonical_name),
            destination_version: wl(dst, |w| &w.canonical_revision),
            destination_cluster: wl(dst, |w| &w.cluster_id),
            request_protocol: "tcp".into(),
            response_flags: ResponseFlags::None,
            connection_security_policy: if mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
    pub active_connections: Gauge,
    pub hbone_pool_connections: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        let active_connections = Gauge::default();
        let hbone_pool_connections = Gauge::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the destination",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the destination",
            received.clone(),
        );
        registry.register(
            "ztunnel_active_connections",
            "Connections being proxied now",
            active_connections.clone(),
        );
        registry.register(
            "ztunnel_hbone_pool_connections",
            "Pooled outbound HBONE HTTP/2 connections",
            hbone_pool_connections.clone(),
        );
        Metrics {
            registry,
            opened,
            closed,
            sent,
            received,
            active_connections,
            hbone_pool_connections,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
