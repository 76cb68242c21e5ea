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

/// Who the two ends are, in Istio's labels: the part the TCP metrics (the
/// ztunnel's) and the request metrics (the waypoint's) share, so both spell
/// and order them alike. Each is `unknown` when not known.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
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
}

const UNKNOWN: &str = "unknown";

/// `s`, or `unknown` when it is empty.
pub fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.into()
    } else {
        s.into()
    }
}

/// The workload label: the owning workload's name (a Deployment's), else
/// the pod's.
fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

impl PeerLabels {
    /// Every label `unknown`.
    pub fn unknown() -> Self {
        let u = || UNKNOWN.to_string();
        PeerLabels {
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
        }
    }

    /// The source's labels: its workload's (when known), the namespace and
    /// principal given (the waypoint takes both from the peer's
    /// certificate).
    pub fn set_source(
        &mut self,
        w: Option<&Workload>,
        namespace: &str,
        principal: Option<&Identity>,
    ) {
        let wl = |f: fn(&Workload) -> &str| or_unknown(w.map(f).unwrap_or(""));
        self.source_workload = wl(workload_name);
        self.source_canonical_service = wl(|w| &w.canonical_name);
        self.source_canonical_revision = wl(|w| &w.canonical_revision);
        self.source_workload_namespace = or_unknown(namespace);
        self.source_principal = principal.map_or_else(|| UNKNOWN.into(), |i| i.to_string());
        // As Istio's: the app and version are the canonical service and
        // revision (from `app.kubernetes.io/name` or `app`,
        // `app.kubernetes.io/version` or `version`).
        self.source_app = wl(|w| &w.canonical_name);
        self.source_version = wl(|w| &w.canonical_revision);
        self.source_cluster = wl(|w| &w.cluster_id);
    }

    /// The destination workload's labels (when known), with the principal
    /// given.
    pub fn set_destination(&mut self, w: Option<&Workload>, principal: Option<&Identity>) {
        let wl = |f: fn(&Workload) -> &str| or_unknown(w.map(f).unwrap_or(""));
        self.destination_workload = wl(workload_name);
        self.destination_canonical_service = wl(|w| &w.canonical_name);
        self.destination_canonical_revision = wl(|w| &w.canonical_revision);
        self.destination_workload_namespace = wl(|w| &w.namespace);
        self.destination_principal = principal.map_or_else(|| UNKNOWN.into(), |i| i.to_string());
        self.destination_app = wl(|w| &w.canonical_name);
        self.destination_version = wl(|w| &w.canonical_revision);
        self.destination_cluster = wl(|w| &w.cluster_id);
    }
}

/// Istio's TCP metric labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub request_protocol: String,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
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
        let mut peers = PeerLabels::unknown();
        peers.set_source(src, src.map_or("", |w| &w.namespace), src_identity);
        if let Some((host, ns, name)) = service {
            peers.destination_service = host.into();
            peers.destination_service_namespace = ns.into();
            peers.destination_service_name = name.into();
        }
        peers.set_destination(dst, dst_identity);
        TcpLabels {
            reporter,
            peers,
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
    /// Inbound dials made from the pod's own address although the
    /// app should have seen its client's (see the ztunnel's `orig_src`).
    pub original_source_fallbacks: Family<FallbackLabels, Counter>,
    /// Pods a ztunnel acked whose listeners it could not bind since (a
    /// deferred bind that failed): served by nothing of its own.
    pub pods_unserved: Gauge,
}

/// Why a dial did not use the client's address.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FallbackReason {
    /// The ztunnel may not make transparent sockets (no CAP_NET_ADMIN).
    no_permission,
    /// The pod has no reply routing (its node agent could not install it).
    no_reply_route,
    /// Asking the pod's kernel about its reply routing failed (no answer
    /// in time, no sockets left).
    route_check_failed,
    /// The transparent dial failed for its source, not as the app's
    /// answer (the bind, a connect refused at once for the source).
    dial_failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub reason: FallbackReason,
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
        let original_source_fallbacks = Family::<FallbackLabels, Counter>::default();
        let pods_unserved = Gauge::default();
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
        registry.register(
            "ztunnel_original_source_fallbacks",
            "Inbound dials from the pod's own address instead of the client's",
            original_source_fallbacks.clone(),
        );
        registry.register(
            "ztunnel_pods_unserved",
            "Captured pods whose listeners this ztunnel could not bind (retried)",
            pods_unserved.clone(),
        );
        Metrics {
            registry,
            opened,
            closed,
            sent,
            received,
            active_connections,
            hbone_pool_connections,
            original_source_fallbacks,
            pods_unserved,
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

/// One shared copy of each distinct [`TcpLabels`] that open connections
/// hold. A connection keeps its labels from open to close (opened, then
/// closed and bytes counted under the same set), and a thousand connections
/// between the same two workloads would otherwise hold a thousand copies of
/// the same twenty strings (about 1.3 KiB each). Sets no connection holds
/// any more are dropped as the table grows.
#[derive(Debug, Default)]
pub struct LabelSets {
    inner: std::sync::Mutex<LabelTable>,
}

#[derive(Debug, Default)]
struct LabelTable {
    sets: std::collections::HashSet<std::sync::Arc<TcpLabels>>,
    /// How many sets were left after the last sweep.
    after_sweep: usize,
}

/// The table is swept once it holds twice as many sets as after the last
/// sweep, and at least this many.
const LABEL_SWEEP_MIN: usize = 64;

impl LabelSets {
    /// The shared copy of `labels`.
    pub fn share(&self, labels: TcpLabels) -> std::sync::Arc<TcpLabels> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = t.sets.get(&labels) {
            return shared.clone();
        }
        // Swept sets are freed after the lock is let go, so a large sweep
        // does not hold up other shards' new connections while it frees.
        let mut swept = Vec::new();
        if t.sets.len() >= (t.after_sweep * 2).max(LABEL_SWEEP_MIN) {
            t.sets.retain(|s| {
                let held = std::sync::Arc::strong_count(s) > 1;
                if !held {
                    swept.push(s.clone());
                }
                held
            });
            t.after_sweep = t.sets.len();
        }
        let shared = std::sync::Arc::new(labels);
        t.sets.insert(shared.clone());
        drop(t);
        drop(swept);
        shared
    }

    /// How many distinct sets are kept now (held or not yet swept).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sets
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition is what dashboards read: label names, their order and
    /// the `unknown` defaults, byte for byte.
    #[test]
    fn tcp_labels_are_exposed_in_istios_order() {
        let m = Metrics::default();
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/client"
            .parse()
            .expect("identity");
        let src = Workload::from_proto(
            &mesh_proto::istio::workload::Workload {
                uid: "Kubernetes//Pod/shop/client-0".into(),
                name: "client-0".into(),
                namespace: "shop".into(),
                canonical_name: "client".into(),
                canonical_revision: "v1".into(),
                cluster_id: "Kubernetes".into(),
                ..Default::default()
            },
            "cluster.local",
        )
        .expect("workload");
        let labels = TcpLabels::new(
            Reporter::destination,
            Some(&src),
            Some(&id),
            None,
            None,
            Some(("server.shop.svc.cluster.local", "shop", "server")),
            true,
        );
        m.opened.get_or_create(&labels).inc();
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .expect("the counter is exposed");
        assert_eq!(
            line,
            "istio_tcp_connections_opened_total{reporter=\"destination\",\
             source_workload=\"client-0\",source_canonical_service=\"client\",\
             source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",\
             source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",\
             source_app=\"client\",source_version=\"v1\",source_cluster=\"Kubernetes\",\
             destination_service=\"server.shop.svc.cluster.local\",\
             destination_service_namespace=\"shop\",destination_service_name=\"server\",\
             destination_workload=\"unknown\",destination_canonical_service=\"unknown\",\
             destination_canonical_revision=\"unknown\",\
             destination_workload_namespace=\"unknown\",destination_principal=\"unknown\",\
             destination_app=\"unknown\",destination_version=\"unknown\",\
             destination_cluster=\"unknown\",request_protocol=\"tcp\",response_flags=\"-\",\
             connection_security_policy=\"mutual_tls\"} 1"
        );
    }

    fn labels_for(ns: &str) -> TcpLabels {
        let mut l = TcpLabels::new(Reporter::source, None, None, None, None, None, true);
        l.peers.source_workload_namespace = ns.into();
        l
    }

    #[test]
    fn equal_label_sets_share_one_copy_and_unheld_ones_are_swept() {
        let sets = LabelSets::default();
        let a = sets.share(labels_for("a"));
        let a2 = sets.share(labels_for("a"));
        let b = sets.share(labels_for("b"));
        assert!(std::sync::Arc::ptr_eq(&a, &a2), "one copy of an equal set");
        assert!(!std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(sets.len(), 2);
        drop((a2, b));
        // Sets nobody holds go when the table has grown enough to sweep.
        let held: Vec<_> = (0..LABEL_SWEEP_MIN)
            .map(|i| sets.share(labels_for(&format!("n{i}"))))
            .collect();
        assert_eq!(
            sets.len(),
            LABEL_SWEEP_MIN + 1,
            "b was swept at the sweep; a and the {LABEL_SWEEP_MIN} held stay"
        );
        assert!(std::sync::Arc::ptr_eq(&a, &sets.share(labels_for("a"))));
        drop(held);
    }
}
