//! Wiring: config -> certificate for the waypoint's identity -> xDS
//! (endpoints and routes, or the ingress's listeners) -> HBONE listener
//! (waypoint) or the Gateway's listener ports (ingress) -> admin, metrics,
//! readiness -> drain on SIGTERM.

use crate::extauthz::{ExtAuthz, ExtAuthzMetrics};
use crate::ratelimit::{RateLimitMetrics, RateLimiter};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use mesh_core::admin::{NotReady, Readiness, endpoints, process_stats, respond};
use mesh_core::app::{AppError, start_err};
use mesh_core::certs::CertState;
use mesh_core::hbone::pool::{Pool, PoolSettings};
use mesh_core::identity::Identity;
use mesh_core::metrics::Metrics;
use mesh_core::state::ProxyState;
use mesh_core::xds::{StateSink, XdsClient, XdsConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Role};
use crate::ingress::IngressTable;
use crate::proxy::Waypoint;
use crate::routes::RouteTable;
use crate::sink::WaypointSink;
use crate::telemetry::{Exporter, HttpMetrics};
use crate::upstream::Upstreams;

/// A running waypoint.
pub struct App {
    pub waypoint: Arc<Waypoint>,
    pub xds: Arc<XdsClient>,
    /// Waypoint role only.
    pub hbone_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    stop: CancellationToken,
}

struct Ready {
    waypoint: Arc<Waypoint>,
    xds: Arc<XdsClient>,
}

impl Readiness for Ready {
    fn check(&self) -> Result<(), NotReady> {
        let wp = &self.waypoint;
        if wp.draining.is_cancelled() {
            return Err(NotReady::Draining);
        }
        if !self.xds.synced() {
            return Err(NotReady::NoControllerConfig);
        }
        let ok = wp
            .certs
            .status()
            .iter()
            .any(|s| s.identity == wp.identity && s.state == CertState::Available);
        if !ok {
            return Err(NotReady::Certificate(wp.identity.to_string()));
        }
        Ok(())
    }
}

fn config_dump(wp: &Waypoint, xds: &XdsClient) -> serde_json::Value {
    let routes: serde_json::Map<String, serde_json::Value> = wp
        .routes
        .keys()
        .into_iter()
        .filter_map(|k| {
            let s = wp.routes.get(&k)?;
            Some((
                k,
                json!({
                    "routes": s.routes.iter().map(|r| json!({
                        "name": r.name,
                        "backends": r.backends.iter().map(|b| format!("{}:{} weight {}", b.service, b.port, b.weight)).collect::<Vec<_>>(),
                        "request_timeout": r.request_timeout.map(|d| format!("{d:?}")),
                        "per_try_timeout": r.per_try_timeout.map(|d| format!("{d:?}")),
                        "retry": r.retry.as_ref().map(|r| format!("{r:?}")),
                        "fault": r.fault.as_ref().map(|f| format!("{f:?}")),
                    })).collect::<Vec<_>>(),
                    "policies": s.policies.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|(p, v)| (p.to_string(), json!(format!("{v:?}")))).collect::<serde_json::Map<_, _>>(),
                    "backend": format!("{:?}", s.backend),
                }),
            ))
        })
        .collect();
    let dump = wp.state.snapshot().dump();
    let ing = wp.ingress.load();
    let ingress: serde_json::Map<String, serde_json::Value> = ing
        .ports
        .iter()
        .map(|(port, p)| {
            (
                port.to_string(),
                json!({
                    "protocol": if p.https { "HTTPS" } else { "HTTP" },
                    "listeners": p.listeners.iter().map(|l| json!({
                        "name": l.name,
                        "hostname": l.hostname,
                        // The Secret's name only, never the key.
                        "certificate": l.certificate.as_ref().map(|c| c.source.clone()),
                        "virtual_hosts": l.virtual_hosts.iter().map(|v| json!({
                            "hostnames": v.hostnames,
                            "routes": v.routes.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    json!({
        "identity": wp.identity.to_string(),
        "role": format!("{:?}", wp.cfg.role).to_lowercase(),
        "ingress": ingress,
        "synced": xds.synced(),
        "services": dump.services,
        "workloads": dump.workloads,
        "routes": routes,
        "certificates": wp.certs.status(),
        "upstream": {
            "hbone_connections": wp.upstreams.pool().connection_count(),
            "http_connections": wp.upstreams.connection_count(),
        },
        "process": process_stats(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

impl App {
    pub async fn start(cfg: Config) -> Result<App, AppError> {
        mesh_core::tls::install_default_provider();
        let cfg = Arc::new(cfg);
        let identity = Identity::new(&cfg.trust_domain, &cfg.namespace, &cfg.service_account)
            .map_err(|e| start_err("identity", e))?;
        let (certs, root, token) = mesh_core::app::certificates(&cfg.ca)?;
        certs.prefetch(&identity);

        let state = ProxyState::default();
        let routes = RouteTable::default();
        let ingress = IngressTable::default();
        let stop = CancellationToken::new();
        let xds = XdsClient::new(
            XdsConfig {
                address: cfg.xds_address.clone(),
                ca_root_pem: root,
                server_name: cfg.ca.server_name.clone(),
                token,
                proxy_id: cfg.proxy_id(),
                user_agent: "waypoint".into(),
            },
            Arc::new(WaypointSink {
                role: cfg.role,
                state: StateSink {
                    state: state.clone(),
                    trust_domain: cfg.trust_domain.clone(),
                },
                routes: routes.clone(),
                ingress: ingress.clone(),
                gateway: format!("{}/{}", cfg.namespace, cfg.gateway),
            }),
        );
        tokio::spawn(xds.clone().run(stop.clone()));

        let mut metrics = Metrics::default();
        let http_metrics = HttpMetrics::register(&mut metrics.registry);
        let limiter = RateLimiter::new(RateLimitMetrics::register(&mut metrics.registry));
        let ext_authz = ExtAuthz::new(ExtAuthzMetrics::register(&mut metrics.registry));
        let metrics = Arc::new(metrics);
        let pool = Pool::new(
            certs.clone(),
            PoolSettings {
                h2: cfg.h2.clone(),
                cfg: cfg.pool.clone(),
                connect_timeout: cfg.connect_timeout,
                handshake_timeout: cfg.handshake_timeout,
                mark: None,
            },
            metrics.clone(),
        );
        let exporter = match &cfg.otlp_endpoint {
            Some(e) => Exporter::start(e.clone(), format!("{}.{}", cfg.gateway, cfg.namespace)),
            None => Exporter::disabled(),
        };
        let waypoint = Waypoint::new(
            cfg.clone(),
            identity.clone(),
            state,
            routes,
            certs,
            Upstreams::new(pool, identity.clone(), cfg.connect_timeout),
            http_metrics,
            exporter,
            limiter,
            ext_authz,
            ingress.clone(),
        );
        // Idle upstream HTTP/1 connections and forgotten endpoints are swept.
        let weak = Arc::downgrade(&waypoint);
        let sweep_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sweep_stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let Some(wp) = weak.upgrade() else { return };
                wp.upstreams.evict_idle(Duration::from_secs(60));
                let snap = wp.state.snapshot();
                wp.balancer.retain(|uid| snap.workload(uid).is_some());
            }
        });

        let hbone_addr = match cfg.role {
            Role::Waypoint => {
                // Both families, as the ztunnel's pod listeners: a
                // dual-stack client's ztunnel dials its IPv6 address.
                let mut addr = None;
                for l in listeners(cfg.hbone_addr)
                    .map_err(|e| start_err(format!("bind {}", cfg.hbone_addr), e))?
                {
                    let a = l.local_addr().map_err(|e| start_err("HBONE listener", e))?;
                    addr.get_or_insert(a);
                    tokio::spawn(waypoint.clone().serve(l));
                }
                addr
            }
            Role::Ingress => {
                tokio::spawn(ingress_ports(waypoint.clone(), stop.clone()));
                tokio::spawn(waypoint.clone().log_left_out_refusals());
                None
            }
        };

        let (wp, x) = (waypoint.clone(), xds.clone());
        let admin = move |req: &http::Request<hyper::body::Incoming>| match req.uri().path() {
            "/config_dump" => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&config_dump(&wp, &x)).unwrap_or_default(),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /config_dump\n"),
        };
        let (admin_addr, metrics_addr, readiness_addr) = endpoints(
            (cfg.admin_addr, cfg.metrics_addr, cfg.readiness_addr),
            admin,
            metrics,
            Arc::new(Ready {
                waypoint: waypoint.clone(),
                xds: xds.clone(),
            }),
            stop.clone(),
        )
        .await
        .map_err(|e| start_err("admin endpoints", e))?;
        info!(role = ?cfg.role, hbone_addr = ?hbone_addr, %admin_addr, %metrics_addr, %readiness_addr, identity = %waypoint.identity, path_normalization = cfg.path_normalization.as_str(), "waypoint started");
        Ok(App {
            waypoint,
            xds,
            hbone_addr,
            admin_addr,
            metrics_addr,
            readiness_addr,
            stop,
        })
    }

    /// Stops accepting, lets open connections finish (HTTP/2 clients get a
    /// GOAWAY) up to the drain deadline.
    pub async fn shutdown(self) {
        let wp = &self.waypoint;
        wp.draining.cancel();
        let mut rx = wp.open.subscribe();
        info!(open = *rx.borrow(), deadline = ?wp.cfg.drain_timeout, "draining");
        let drained = tokio::time::timeout(wp.cfg.drain_timeout, rx.wait_for(|n| *n == 0)).await;
        if drained.is_err() {
            info!("drain deadline passed; closing the rest");
        }
        self.stop.cancel();
        info!("drained");
    }
}

/// Ingress role: keeps one accepting socket per listener port of the
/// Gateway, opening and closing them as the config changes. A port that
/// cannot be bound is logged and tried again at the next change or after
/// a few seconds; the other ports are served meanwhile.
async fn ingress_ports(wp: Arc<Waypoint>, stop: CancellationToken) {
    let mut open: BTreeMap<u16, CancellationToken> = BTreeMap::new();
    let mut changed = wp.ingress.subscribe();
    loop {
        let cfg = wp.ingress.load();
        open.retain(|port, token| {
            let keep = cfg.ports.contains_key(port);
            if !keep {
                info!(port, "ingress port closed");
                token.cancel();
            }
            keep
        });
        let mut failed = false;
        for port in cfg.ports.keys() {
            if open.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::new(wp.cfg.ingress_bind, *port);
            match listeners(addr) {
                Ok(ls) => {
                    info!(%addr, families = ls.len(), "ingress port open");
                    let token = stop.child_token();
                    for l in ls {
                        tokio::spawn(wp.clone().serve_ingress(l, *port, token.clone()));
                    }
                    open.insert(*port, token);
                }
                Err(e) => {
                    warn!(%addr, error = %e, "cannot bind an ingress port; retrying");
                    failed = true;
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(Duration::from_secs(2)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wp.draining.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
            _ = retry => {}
        }
    }
}

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let app = App::start(cfg).await?;
    mesh_core::app::shutdown_signal()
        .await
        .map_err(|e| start_err("SIGTERM handler", e))?;
    app.shutdown().await;
    Ok(())
}

/// The accepting sockets for `addr`: on the IPv4 wildcard, one per family
/// (`mesh_core::shards::bind_both_families`).
fn listeners(addr: SocketAddr) -> std::io::Result<Vec<TcpListener>> {
    mesh_core::shards::bind_both_families(addr)?
        .into_iter()
        .map(TcpListener::from_std)
        .collect()
}
