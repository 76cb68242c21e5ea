//! The waypoint's data path.
//!
//! HBONE in (15008, mutual TLS as the waypoint's own identity) -> CONNECT
//! target (a service VIP it serves) -> protocol (declared by the service
//! port, else sniffed) -> per HTTP request: authorization -> route ->
//! filters and faults -> backend and endpoint -> attempts with retries
//! under a budget -> HBONE out to the endpoint's node with the waypoint's
//! identity. Opaque TCP is copied to an endpoint of the service.
//!
//! One file per stage, each using only those before it: this file (the
//! [`Waypoint`] every connection shares, `Downstream`, endpoint
//! resolution), `sniff` (what a client speaks), `rewrite` (header and path
//! edits), `record` (metrics, access log, span), `forward` (attempts,
//! retries, timeouts), `mirror`, `request` (one HTTP request, start to
//! finish), `tcp` (opaque TCP), `listen` (accept loops, TLS, the HBONE
//! stream entry, HTTP serving).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::certs::CertificateManager;
use mesh_core::hbone::{Server, ServerSettings, StreamTasks};
use mesh_core::identity::Identity;
use mesh_core::state::decide::target_port;
use mesh_core::state::{ProxyState, ServiceEntry, Workload};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::extauthz::ExtAuthz;
use crate::ingress::IngressTable;
use crate::lb::Balancer;
use crate::ratelimit::RateLimiter;
use crate::routes::{RouteTable, WORKLOAD_KEY};
use crate::telemetry::{Exporter, HttpMetrics};
use crate::upstream::Upstreams;

mod forward;
mod grpc;
mod lifetime;
mod listen;
mod mirror;
mod record;
mod request;
mod rewrite;
mod sniff;
mod tcp;
mod upgrade;

/// Shared by every connection.
pub struct Waypoint {
    pub cfg: Arc<Config>,
    pub identity: Identity,
    pub state: ProxyState,
    pub routes: RouteTable,
    pub certs: CertificateManager,
    pub upstreams: Upstreams,
    pub balancer: Balancer,
    pub http_metrics: HttpMetrics,
    pub exporter: Exporter,
    pub limiter: RateLimiter,
    /// Providers of CUSTOM policies.
    pub ext_authz: ExtAuthz,
    /// Ingress role: the Gateway's listeners (empty for a waypoint).
    pub ingress: IngressTable,
    pub draining: CancellationToken,
    /// Open downstream HBONE connections, for the drain.
    pub open: tokio::sync::watch::Sender<usize>,
    /// The ingress's per-connection refusal lines, a few per period.
    refusals: crate::loglimit::LogLimit,
    /// The HBONE server: TLS as the waypoint's identity, then its streams.
    hbone: Server,
}

/// Where a backend key leads.
struct Resolved {
    endpoints: Vec<Arc<Workload>>,
    /// The service, for port mapping and labels; `None` for a pod.
    service: Option<Arc<ServiceEntry>>,
}

impl Resolved {
    fn port_on(&self, ep: &Workload, port: u16) -> u16 {
        match &self.service {
            Some(s) => target_port(s, ep, port),
            None => port,
        }
    }
}

/// Which connection a request came on.
struct Downstream {
    peer: SocketAddr,
    /// The HBONE peer's identity; None for a client outside the mesh
    /// (at an ingress).
    src_identity: Option<Identity>,
    src_workload: Option<Arc<Workload>>,
    /// The source workload's addresses, for IP blocks (empty unless the
    /// peer's identity owns the workload its address belongs to).
    src_addrs: Vec<IpAddr>,
    /// The service (or workload) whose routes apply; at an ingress, the
    /// port's key, and the routes come from `ingress`.
    service_key: String,
    target: SocketAddr,
    protocol: &'static str,
    ingress: Option<IngressScope>,
}

/// Where an ingress connection came in. The port's config is looked up
/// per request, so a keep-alive connection follows config changes; an
/// HTTPS connection stays with the listener its SNI name chose, an HTTP
/// request goes to the listener its Host names.
struct IngressScope {
    port: u16,
    https: bool,
    sni: Option<String>,
}

impl Downstream {
    fn principal(&self) -> &str {
        self.src_identity.as_ref().map_or("", |i| i.principal())
    }
}

impl Waypoint {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        identity: Identity,
        state: ProxyState,
        routes: RouteTable,
        certs: CertificateManager,
        upstreams: Upstreams,
        http_metrics: HttpMetrics,
        exporter: Exporter,
        limiter: RateLimiter,
        ext_authz: ExtAuthz,
        ingress: IngressTable,
    ) -> Arc<Waypoint> {
        let draining = CancellationToken::new();
        let hbone = Server::new(
            certs.clone(),
            ServerSettings {
                h2: cfg.h2.clone(),
                max_streams: cfg.pool.max_streams,
                handshake_timeout: cfg.handshake_timeout,
                tasks: StreamTasks::Spawn,
            },
            draining.clone(),
        );
        Arc::new(Waypoint {
            cfg,
            identity,
            state,
            routes,
            certs,
            upstreams,
            balancer: Balancer::default(),
            http_metrics,
            exporter,
            limiter,
            ext_authz,
            ingress,
            draining,
            open: tokio::sync::watch::Sender::new(0),
            refusals: crate::loglimit::LogLimit::default(),
            hbone,
        })
    }

    /// A service's healthy endpoints, or the one workload a `workload:`
    /// key names.
    fn resolve(&self, key: &str) -> Option<Resolved> {
        let snap = self.state.snapshot();
        if let Some(uid) = key.strip_prefix(WORKLOAD_KEY) {
            return snap.workload(uid).map(|w| Resolved {
                endpoints: vec![w.clone()],
                service: None,
            });
        }
        let svc = snap.service(key)?.clone();
        Some(Resolved {
            endpoints: snap.endpoints(key).cloned().collect(),
            service: Some(svc),
        })
    }
}
