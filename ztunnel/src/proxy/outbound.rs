//! Outbound: a captured connection from a local workload, routed to its
//! destination over HBONE, directly, or passed through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::Proxy;
use super::conns::{ConnInfo, Direction, Protocol, Tracked};
use super::copy::{self, Counters};
use mesh_core::hbone::pool::PoolKey;
use mesh_core::hbone::{ConnectHeaders, new_traceparent};
use mesh_core::identity::Identity;
use mesh_core::metrics::{Reporter, ResponseFlags, TcpLabels};
use mesh_core::netns::Netns;
use mesh_core::socket;
use mesh_core::state::decide::{self, Route, RouteError, resolve};
use mesh_core::state::{Snapshot, Workload};

/// A 401 from the peer is its policy saying no: DENY, not CONNECT.
fn pool_error_flags(e: &mesh_core::hbone::pool::PoolError) -> ResponseFlags {
    match e {
        mesh_core::hbone::pool::PoolError::Open {
            source: mesh_core::hbone::OpenError::Status(s),
            ..
        } if *s == http::StatusCode::UNAUTHORIZED => ResponseFlags::Deny,
        _ => ResponseFlags::Connect,
    }
}

/// W3C baggage describing the source, in the keys Istio's peers read.
pub fn baggage(w: &Workload) -> String {
    crate::peer_meta::baggage(w)
}

/// Serves one outbound listener for the workload `source_uid`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    source_uid: String,
    fixed_target: Option<SocketAddr>,
) {
    let uid: Arc<str> = source_uid.into();
    super::accept_captured(
        proxy,
        listener,
        fixed_target,
        move |proxy, tcp, peer, dst| {
            let uid = uid.clone();
            async move { handle(proxy, tcp, peer, dst, Source::Uid(&uid)).await }
        },
    )
    .await
}

/// The pod whose network namespace a node-mode listener was opened in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPod {
    /// The node agent's (ZDS) uid.
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// Serves a pod's redirected outbound traffic (node mode): the source is
/// `pod`, the pod whose netns the listener lives in, and its workload's
/// identity; the destination the original one (SO_ORIGINAL_DST). A
/// connection from an address that is not one of that pod's own is refused:
/// another workload's address (spoofed, or stale) never lends its identity.
pub async fn serve_captured(proxy: Arc<Proxy>, listener: TcpListener, pod: Arc<CapturedPod>) {
    super::accept_captured(proxy, listener, None, move |proxy, tcp, peer, dst| {
        let pod = pod.clone();
        async move { handle(proxy, tcp, peer, dst, Source::Pod(&pod)).await }
    })
    .await
}

/// Whose traffic a listener carries.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// A configured listener's workload, by uid.
    Uid(&'a str),
    /// The pod a node-mode listener was opened in.
    Pod(&'a CapturedPod),
}

/// Why a captured connection's source workload is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("no workload {0}")]
    NoWorkload(String),
    #[error("no workload has the source address {0}")]
    NoWorkloadAt(IpAddr),
    #[error("source address {addr} is workload {workload}'s, not this pod's ({pod})")]
    NotThisPod {
        addr: IpAddr,
        workload: String,
        pod: String,
    },
}

/// The workload of `pod` that sent from `peer`, or why there is none:
/// the workload at the peer address must be that very pod's.
pub fn pod_source(
    snap: &Snapshot,
    network: &str,
    pod: &CapturedPod,
    peer: SocketAddr,
) -> Result<Arc<Workload>, SourceError> {
    let w = snap
        .workload_by_ip(network, peer.ip())
        .ok_or(SourceError::NoWorkloadAt(peer.ip()))?;
    if w.namespace != pod.namespace || w.name != pod.name {
        return Err(SourceError::NotThisPod {
            addr: peer.ip(),
            workload: format!("{}/{}", w.namespace, w.name),
            pod: format!("{}/{}", pod.namespace, pod.name),
        });
    }
    Ok(w.clone())
}

fn source_workload(
    snap: &Snapshot,
    network: &str,
    source: Source<'_>,
    peer: SocketAddr,
) -> Result<Arc<Workload>, SourceError> {
    match source {
        Source::Uid(uid) => snap
            .workload(uid)
            .cloned()
            .ok_or_else(|| SourceError::NoWorkload(uid.to_string())),
        Source::Pod(pod) => pod_source(snap, network, pod, peer),
    }
}

/// What the access log and metrics say about where a connection goes.
struct Facts {
    protocol: Protocol,
    hbone_peer: Option<SocketAddr>,
    dst_identity: Option<Identity>,
    dst_workload: Option<Arc<Workload>>,
    service: Option<String>,
    /// The address finally dialled (or asked for through the tunnel).
    dst: SocketAddr,
}

impl Facts {
    fn of(route: &Result<Route, RouteError>, local: bool, dst: SocketAddr) -> Facts {
        let (protocol, hbone_peer, dst_identity, dst_workload, service) = match route {
            Ok(Route::Hbone {
                next_hop,
                peer_identity,
                dst_workload,
                service,
                ..
            }) => (
                if local {
                    Protocol::Local
                } else {
                    Protocol::Hbone
                },
                (!local).then_some(*next_hop),
                Some(peer_identity.clone()),
                Some(dst_workload.clone()),
                service.clone(),
            ),
            Ok(Route::Direct {
                dst_workload,
                service,
                ..
            }) => (
                Protocol::Tcp,
                None,
                None,
                Some(dst_workload.clone()),
                service.clone(),
            ),
            _ => (Protocol::Tcp, None, None, None, None),
        };
        let dst = match route {
            Ok(Route::Hbone { target, .. }) => *target,
            Ok(Route::Direct { addr, .. }) | Ok(Route::Passthrough { addr }) => *addr,
            Err(_) => dst,
        };
        Facts {
            protocol,
            hbone_peer,
            dst_identity,
            dst_workload,
            service,
            dst,
        }
    }

    fn labels(&self, src: &Workload) -> TcpLabels {
        let svc_parts = self.service.as_ref().and_then(|k| {
            let (ns, host) = k.split_once('/')?;
            Some((
                host.to_string(),
                ns.to_string(),
                host.split('.').next().unwrap_or(host).to_string(),
            ))
        });
        TcpLabels::new(
            Reporter::source,
            Some(src),
            Some(&src.identity),
            self.dst_workload.as_deref(),
            self.dst_identity.as_ref(),
            svc_parts
                .as_ref()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
            self.protocol != Protocol::Tcp,
        )
    }
}

async fn handle(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    source: Source<'_>,
) {
    let _ = tcp.set_nodelay(true);
    let snap = proxy.state.snapshot();
    let src = match source_workload(&snap, &proxy.cfg.network, source, peer) {
        Ok(w) => w,
        Err(why) => {
            warn!(%peer, %dst, ?source, reason = %why, "source workload unknown; closing");
            return;
        }
    };
    let route = resolve(&snap, &proxy.cfg.network, &src, dst);
    drop(snap);
    let counters = Arc::new(Counters::default());
    // A destination this ztunnel serves itself takes the same-node path.
    let local = match &route {
        Ok(Route::Hbone {
            via_waypoint: false,
            dst_workload,
            target,
            ..
        }) => super::local::served_here(&proxy, dst_workload, target.ip()),
        _ => None,
    };
    let facts = Facts::of(&route, local.is_some(), dst);
    let labels = proxy.label_sets.share(facts.labels(&src));
    let tracked = proxy.conns.track(ConnInfo {
        direction: Direction::Outbound,
        protocol: facts.protocol,
        src: peer,
        dst: facts.dst,
        hbone_peer: facts.hbone_peer,
        src_identity: Some(src.identity.clone()),
        dst_identity: facts.dst_identity.clone(),
        src_workload: Some(src.name.clone()),
        dst_workload: facts.dst_workload.as_ref().map(|w| w.name.clone()),
        local_uid: Some(src.uid.clone()),
        started: SystemTime::now(),
        counters: counters.clone(),
        close_reason: Default::default(),
    });
    proxy.opened(&labels);
    proxy.metrics.active_connections.inc();
    // Connect first; the copy then runs where it is cheapest.
    let service_host = facts
        .service
        .as_deref()
        .and_then(|k| k.split_once('/'))
        .map(|(_, host)| host);
    let out = Outgoing {
        proxy: &proxy,
        src: &src,
        peer,
        service_host,
        tracked: &tracked,
        counters: &counters,
    };
    let connected = out.connect(route, local).await;
    copy_to_end(
        proxy.clone(),
        tcp,
        connected,
        labels,
        tracked,
        counters,
        peer,
        dst,
    )
    .await;
}

/// One outbound connection on its way to its upstream.
struct Outgoing<'a> {
    proxy: &'a Arc<Proxy>,
    src: &'a Arc<Workload>,
    peer: SocketAddr,
    /// The hostname of the service the client addressed, if any.
    service_host: Option<&'a str>,
    tracked: &'a Tracked,
    counters: &'a Arc<Counters>,
}

impl Outgoing<'_> {
    /// Dials the route: the pool for HBONE, the same-node path for a
    /// workload this ztunnel serves, plain TCP otherwise.
    async fn connect(
        &self,
        route: Result<Route, RouteError>,
        local: Option<Option<Arc<Netns>>>,
    ) -> Result<Upstream, (ResponseFlags, String)> {
        let proxy = self.proxy;
        let src = self.src;
        let src_netns = proxy.netns.for_workload(src);
        let route = route.map_err(|e| match e {
            RouteError::NoHealthyEndpoints(_) => (ResponseFlags::NoHealthyUpstream, e.to_string()),
            _ => (ResponseFlags::Connect, e.to_string()),
        })?;
        // The source's address in the family of the hop it dials; a source
        // with none of that family fails the connection (fail closed).
        let src_ip = match &route {
            Route::Hbone { next_hop: a, .. }
            | Route::Direct { addr: a, .. }
            | Route::Passthrough { addr: a } => decide::source_ip(src, a.ip()),
        }
        .map_err(|e| {
            warn!(peer = %self.peer, error = %e, "no source address of the destination's family");
            (ResponseFlags::Connect, e.to_string())
        });
        match route {
            Route::Hbone {
                next_hop,
                target,
                peer_identity,
                dst_workload,
                ..
            } => {
                if let Some(dst_netns) = local {
                    return super::local::deliver(
                        proxy,
                        self.tracked,
                        src,
                        self.peer,
                        &dst_workload,
                        target,
                        dst_netns.as_deref(),
                        self.counters.clone(),
                    )
                    .await
                    .map(|d| Upstream::Local(Box::new(d)));
                }
                let key = PoolKey {
                    src: src.identity.clone(),
                    src_ip: Some(src_ip?),
                    dst: peer_identity,
                    next_hop,
                };
                let headers = ConnectHeaders {
                    baggage: Some(baggage(src)),
                    forwarded_for: Some(self.peer),
                    // The service the client addressed, so the destination
                    // attributes the connection to it.
                    forwarded_host: self.service_host.map(str::to_string),
                    traceparent: Some(new_traceparent()),
                };
                let (stream, guard) = proxy
                    .pool
                    .connect(&key, target, &headers, src_netns.as_deref())
                    .await
                    .map_err(|e| (pool_error_flags(&e), e.to_string()))?;
                Ok(Upstream::Hbone(stream, guard))
            }
            Route::Direct { addr, .. } | Route::Passthrough { addr } => socket::dial(
                addr,
                Some(src_ip?),
                proxy.cfg.effective_mark(),
                proxy.cfg.connect_timeout,
                src_netns.as_deref(),
            )
            .await
            .map(Upstream::Tcp)
            .map_err(|e| (ResponseFlags::Connect, format!("connect to {addr}: {e}"))),
        }
    }
}

/// Copies a connected connection to its end (an HBONE one on its HTTP/2
/// connection's task) and records it; a failed one is recorded at once.
#[allow(clippy::too_many_arguments)]
async fn copy_to_end(
    proxy: Arc<Proxy>,
    mut tcp: TcpStream,
    connected: Result<Upstream, (ResponseFlags, String)>,
    labels: Arc<TcpLabels>,
    tracked: Tracked,
    counters: Arc<Counters>,
    peer: SocketAddr,
    dst: SocketAddr,
) {
    match connected {
        Err(e) => {
            debug!(%peer, %dst, error = %e.1, "outbound connection failed");
            proxy.metrics.active_connections.dec();
            proxy.finish(labels, &tracked.info, Err(e));
        }
        Ok(Upstream::Local(mut inbound)) => {
            // Both halves are open, as an HBONE pair would be.
            proxy.metrics.active_connections.inc();
            let result =
                copy::run_tcp(&tracked.cancel, &mut tcp, &mut inbound.upstream, counters).await;
            proxy.metrics.active_connections.dec();
            proxy.metrics.active_connections.dec();
            if let Err((_, e)) = &result {
                debug!(%peer, %dst, error = %e, "same-node connection failed");
            }
            proxy.finish(inbound.labels, &inbound.tracked.info, result.clone());
            proxy.finish(labels, &tracked.info, result);
        }
        Ok(Upstream::Tcp(mut up)) => {
            let result = copy::run_tcp(&tracked.cancel, &mut tcp, &mut up, counters).await;
            proxy.metrics.active_connections.dec();
            if let Err((_, e)) = &result {
                debug!(%peer, %dst, error = %e, "outbound connection failed");
            }
            proxy.finish(labels, &tracked.info, result);
        }
        Ok(Upstream::Hbone(mut stream, guard)) => {
            // The rest of the connection's life runs on the HBONE
            // connection's task; this one ends here, and its memory with it.
            let runner = guard.runner().clone();
            runner.spawn(async move {
                let result = copy::run_hbone(
                    &tracked.cancel,
                    &mut tcp,
                    &mut stream,
                    copy::TcpSide::Client,
                    counters,
                )
                .await;
                drop(guard);
                proxy.metrics.active_connections.dec();
                if let Err((_, e)) = &result {
                    debug!(%peer, %dst, error = %e, "outbound connection failed");
                }
                proxy.finish(labels, &tracked.info, result);
            });
        }
    }
}

/// A connected upstream, before the copy.
enum Upstream {
    Hbone(
        mesh_core::hbone::H2Stream,
        mesh_core::hbone::pool::StreamGuard,
    ),
    Tcp(TcpStream),
    /// The inbound half of a same-node connection.
    Local(Box<super::local::Delivered>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::state::{LocalConfig, ProxyState};

    #[test]
    fn a_pods_source_is_that_pod_from_its_own_addresses_only() {
        let local: LocalConfig = serde_yaml::from_str(
            r#"
workloads:
- {uid: "c//Pod/shop/client", name: client, namespace: shop, addresses: [10.1.1.1, 10.1.1.5], tunnel_protocol: HBONE, service_account: client, node: n1}
- {uid: "c//Pod/shop/victim", name: victim, namespace: shop, addresses: [10.1.1.2], tunnel_protocol: HBONE, service_account: victim, node: n1}
"#,
        )
        .expect("local config");
        let state = ProxyState::default();
        state.replace(local.to_updates("cluster.local", "test").expect("updates"));
        let snap = state.snapshot();
        let pod = CapturedPod {
            uid: "uid-1".into(),
            namespace: "shop".into(),
            name: "client".into(),
        };
        let from =
            |ip: &str| pod_source(&snap, "", &pod, SocketAddr::new(ip.parse().unwrap(), 40000));
        for own in ["10.1.1.1", "10.1.1.5"] {
            let w = from(own).expect(own);
            assert_eq!(
                w.identity.to_string(),
                "spiffe://cluster.local/ns/shop/sa/client"
            );
        }
        let err = from("10.1.1.2").unwrap_err().to_string();
        assert!(err.contains("shop/victim's, not this pod's"), "{err}");
        let err = from("10.9.9.9").unwrap_err().to_string();
        assert!(err.contains("no workload has the source address"), "{err}");
    }
}
