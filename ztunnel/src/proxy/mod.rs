//! The data path. One [`Proxy`] holds what every connection needs; the
//! listeners in `outbound`, `inbound` and `inbound_plain` run on it.
//!
//! app -> outbound (15001) -> route -> HBONE pool -> peer inbound (15008)
//! -> L4 policy -> dial the app (from the client's address: `orig_src`).
//! Plaintext peers enter at 15006.
//! Between two pods of one ztunnel, `local` replaces the tunnel.

pub mod conns;
pub mod copy;
pub mod inbound;
pub mod inbound_plain;
pub mod local;
pub mod orig_src;
pub mod outbound;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use conns::Registry;
use mesh_core::certs::CertificateManager;
use mesh_core::hbone::pool::{Pool, PoolSettings};
use mesh_core::hbone::{Server, ServerSettings, StreamTasks};
use mesh_core::identity::Identity;
use mesh_core::listen::accept_until;
use mesh_core::metrics::{LabelSets, Metrics, ResponseFlags, TcpLabels};
use mesh_core::state::ProxyState;

/// Shared by every listener and connection.
pub struct Proxy {
    pub cfg: Arc<Config>,
    pub state: ProxyState,
    pub certs: CertificateManager,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub conns: Registry,
    /// Open connections' metric labels, one copy of each distinct set.
    pub label_sets: LabelSets,
    /// Cancelled when the proxy stops accepting (drain).
    pub draining: CancellationToken,
    /// Captured pods' network namespaces (node mode).
    pub netns: mesh_core::netns::NetnsRegistry,
    /// Inbound HBONE: TLS as the destination workload, then its streams.
    pub hbone: Server,
    /// Whether inbound dials to apps are still made from clients'
    /// addresses (original source).
    pub transparent: orig_src::Transparent,
}

impl Proxy {
    pub fn new(
        cfg: Arc<Config>,
        state: ProxyState,
        certs: CertificateManager,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let pool = Pool::new(
            certs.clone(),
            PoolSettings {
                h2: cfg.h2.clone(),
                cfg: cfg.pool.clone(),
                connect_timeout: cfg.connect_timeout,
                handshake_timeout: cfg.handshake_timeout,
                mark: cfg.effective_mark(),
            },
            metrics.clone(),
        );
        let draining = CancellationToken::new();
        let hbone = Server::new(
            certs.clone(),
            ServerSettings {
                h2: cfg.h2.clone(),
                max_streams: cfg.pool.max_streams,
                handshake_timeout: cfg.handshake_timeout,
                tasks: StreamTasks::Inline,
            },
            draining.clone(),
        );
        let proxy = Arc::new(Proxy {
            cfg,
            state,
            certs,
            pool,
            metrics,
            conns: Registry::default(),
            label_sets: LabelSets::default(),
            draining,
            netns: Default::default(),
            hbone,
            transparent: orig_src::Transparent::new(),
        });
        tokio::spawn(inbound::revoke_on_policy_change(Arc::downgrade(&proxy)));
        proxy
    }

    /// Stops accepting, waits up to `deadline` for open connections to
    /// finish, then closes what is left.
    pub async fn drain(&self, deadline: Duration) {
        self.draining.cancel();
        let open = self.conns.len();
        info!(open, ?deadline, "draining");
        if tokio::time::timeout(deadline, self.conns.wait_empty())
            .await
            .is_err()
        {
            info!(
                left = self.conns.len(),
                "drain deadline passed; closing the rest"
            );
            self.conns.cancel_all();
            let _ = tokio::time::timeout(Duration::from_secs(1), self.conns.wait_empty()).await;
        }
        info!("drained");
    }
}

/// Accepts on a captured listener until the drain starts; each connection
/// is handed to `handle` with its original destination (`fixed_target`, or
/// SO_ORIGINAL_DST from the redirect).
pub async fn accept_captured<F, Fut>(
    proxy: Arc<Proxy>,
    listener: tokio::net::TcpListener,
    fixed_target: Option<std::net::SocketAddr>,
    handle: F,
) where
    F: Fn(Arc<Proxy>, tokio::net::TcpStream, std::net::SocketAddr, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let draining = proxy.draining.clone();
    accept_until(&listener, draining.cancelled(), |tcp, peer| {
        let dst = match fixed_target {
            Some(t) => Ok(t),
            None => mesh_core::socket::original_dst(&tcp),
        };
        match dst {
            Ok(dst) => {
                tokio::spawn(handle(proxy.clone(), tcp, peer, dst));
            }
            Err(e) => tracing::warn!(%peer, error = %e, "no original destination; closing"),
        }
    })
    .await
}

/// Records a finished connection: metrics and one access-log line.
pub struct Finished<'a> {
    pub labels: Arc<TcpLabels>,
    pub info: &'a conns::ConnInfo,
    pub flags: ResponseFlags,
    pub error: Option<String>,
}

impl Proxy {
    /// Counts a connection as opened (Istio counts at open, flags "-").
    pub fn opened(&self, labels: &TcpLabels) {
        self.metrics.opened.get_or_create(labels).inc();
    }

    /// Records the end of a copied connection. A connection the proxy closed
    /// because policy now denies it is flagged DENY.
    pub fn finish(
        &self,
        labels: Arc<TcpLabels>,
        info: &conns::ConnInfo,
        result: Result<(), (ResponseFlags, String)>,
    ) {
        let (flags, error) = match (result, info.close_reason.get()) {
            (Ok(()), _) => (ResponseFlags::None, None),
            (Err(_), Some(r @ conns::CloseReason::Denied(_))) => {
                (ResponseFlags::Deny, Some(r.to_string()))
            }
            (Err(_), Some(r @ conns::CloseReason::Drained)) => {
                (ResponseFlags::None, Some(r.to_string()))
            }
            (Err((f, e)), _) => (f, Some(e)),
        };
        self.record(Finished {
            labels,
            info,
            flags,
            error,
        });
    }

    pub fn record(&self, f: Finished<'_>) {
        use std::sync::atomic::Ordering;
        // The shared set, unless this connection ended with flags of its own.
        let flagged;
        let labels: &TcpLabels = if f.labels.response_flags == f.flags {
            &f.labels
        } else {
            flagged = TcpLabels {
                response_flags: f.flags,
                ..(*f.labels).clone()
            };
            &flagged
        };
        let sent = f.info.counters.sent.load(Ordering::Relaxed);
        let received = f.info.counters.received.load(Ordering::Relaxed);
        self.metrics.closed.get_or_create(labels).inc();
        self.metrics.sent.get_or_create(labels).inc_by(sent);
        self.metrics.received.get_or_create(labels).inc_by(received);
        let duration = SystemTime::now()
            .duration_since(f.info.started)
            .unwrap_or_default();
        let ident = |i: &Option<Identity>| {
            i.as_ref()
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into())
        };
        info!(
            target: "access",
            direction = ?f.info.direction,
            protocol = ?f.info.protocol,
            src.addr = %f.info.src,
            src.workload = f.info.src_workload.as_deref().unwrap_or("-"),
            src.identity = %ident(&f.info.src_identity),
            dst.addr = %f.info.dst,
            dst.hbone = %f.info.hbone_peer.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            dst.workload = f.info.dst_workload.as_deref().unwrap_or("-"),
            dst.identity = %ident(&f.info.dst_identity),
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = duration.as_millis() as u64,
            response_flags = f.flags.as_str(),
            error = f.error.as_deref().unwrap_or("-"),
            "connection complete"
        );
    }
}
