//! A proxy's own HTTP endpoints: admin (localhost only), Prometheus
//! metrics and readiness, served the same way by every binary; each
//! brings its own admin handler.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::RuntimeKind;

/// What must be true before the proxy reports ready.
pub trait Readiness: Send + Sync + 'static {
    /// `Err` names what is still missing.
    fn check(&self) -> Result<(), NotReady>;
}

/// What keeps a proxy from being ready: the readiness endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("draining")]
    Draining,
    #[error("no config from the controller yet")]
    NoControllerConfig,
    #[error("no pod snapshot from the node agent yet")]
    NoPodSnapshot,
    #[error("no config yet")]
    NoConfig,
    /// The identities whose certificates have not arrived.
    #[error("certificates pending: {}", .0.join(", "))]
    Certificates(Vec<String>),
    /// The one identity a waypoint serves as.
    #[error("certificate for {0} pending")]
    Certificate(String),
}

pub fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Process facts: live tokio tasks and open descriptors (for leak checks),
/// the runtime's model and threads, and with shards each shard's live tasks
/// (an uneven spread of connections shows there).
pub fn process_stats() -> serde_json::Value {
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    if tokio::runtime::Handle::try_current().is_err() {
        return json!({ "tasks": 0, "open_fds": fds, "worker_threads": 0 });
    }
    let shards = crate::shards::current();
    let mut v = json!({
        "tasks": shards.alive_tasks(),
        "open_fds": fds,
        "worker_threads": shards.threads(),
        "runtime": if shards.is_sharded() {
            RuntimeKind::Sharded
        } else {
            RuntimeKind::WorkStealing
        }
        .as_str(),
    });
    if shards.is_sharded() {
        v["shard_tasks"] = json!(shards.shard_tasks());
    }
    v
}

/// The address a request came from, in its extensions (what [`serve`]'s
/// handlers see of the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// Serves plain HTTP/1 GETs with `handler` until `stop`; shared by the
/// controller's debug endpoint. Each request carries its [`Peer`].
pub async fn serve<F>(listener: TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { warn!(error = %e, "admin accept failed"); continue; }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(&req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}

/// Binds a proxy's three endpoints (admin, metrics, readiness) and serves
/// them until `stop`; the admin one with `admin`. Shared by the ztunnel and
/// the waypoint. Returns the bound addresses.
pub async fn endpoints<F>(
    (admin_addr, metrics_addr, ready_addr): (SocketAddr, SocketAddr, SocketAddr),
    admin: F,
    metrics: Arc<crate::metrics::Metrics>,
    readiness: Arc<dyn Readiness>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)>
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let admin_l = TcpListener::bind(admin_addr).await?;
    let metrics_l = TcpListener::bind(metrics_addr).await?;
    let ready = TcpListener::bind(ready_addr).await?;
    let addrs = (
        admin_l.local_addr()?,
        metrics_l.local_addr()?,
        ready.local_addr()?,
    );
    tokio::spawn(serve(admin_l, stop.clone(), admin));
    tokio::spawn(serve(metrics_l, stop.clone(), move |req| {
        match req.uri().path() {
            "/metrics" | "/stats/prometheus" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.encode(),
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /metrics\n"),
        }
    }));
    tokio::spawn(serve(ready, stop, move |req| match req.uri().path() {
        "/healthz/ready" => match readiness.check() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /healthz/ready\n"),
    }));
    Ok(addrs)
}
