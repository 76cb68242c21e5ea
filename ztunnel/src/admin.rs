//! The ztunnel's own HTTP endpoints: admin (`/config_dump`, localhost only),
//! Prometheus metrics, and readiness (served by `mesh_core::admin`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use mesh_core::admin::{Readiness, endpoints, process_stats, respond};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

pub fn config_dump(proxy: &Proxy) -> serde_json::Value {
    let snap = proxy.state.snapshot();
    let dump = snap.dump();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": proxy.cfg.node,
        "same_node_fast_path": proxy.cfg.same_node_fast_path,
        "original_source": proxy.cfg.original_source,
        "workloads": dump.workloads,
        "services": dump.services,
        "policies": dump.policies,
        "certificates": proxy.certs.status(),
        "roots": proxy.certs.root_status(),
        "connections": proxy.conns.list(),
        "pool": {
            "connections": proxy.pool.connection_count(),
            "per_shard": proxy.pool.connections_per_shard(),
        },
        "process": process_stats(),
    })
}

/// Binds and serves the three endpoints; returns their bound addresses.
pub async fn start(
    proxy: Arc<Proxy>,
    readiness: Arc<dyn Readiness>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
    let p = proxy.clone();
    let admin = move |req: &Request<Incoming>| match req.uri().path() {
        "/config_dump" => respond(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&config_dump(&p)).unwrap_or_default(),
        ),
        "/debug/process" => respond(
            StatusCode::OK,
            "application/json",
            process_stats().to_string(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /config_dump\n"),
    };
    let cfg = &proxy.cfg;
    endpoints(
        (cfg.admin_addr, cfg.metrics_addr, cfg.readiness_addr),
        admin,
        proxy.metrics.clone(),
        readiness,
        stop,
    )
    .await
}
