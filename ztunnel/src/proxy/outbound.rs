//! Outbound: a captured connection from a local workload, routed to its
//! destination over HBONE, directly, or passed through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::conns::{ConnInfo, Direction, Protocol};
use super::copy::{self, Counters};
use super::pool::PoolKey;
use super::{Proxy, socket};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::hbone::{ConnectHeaders, new_traceparent};
use crate::identity::Identity;
use crate::metrics::{Reporter, ResponseFlags, TcpLabels};
use crate::state::{GatewayDestination, ServiceEntry, Snapshot, TunnelProtocol, Workload};

/// Where a connection goes.
#[derive(Debug, Clone, Serialize)]
pub enum Route {
    /// Through an HBONE tunnel to `next_hop` (the destination pod, or a
    /// waypoint), asking it for `target`.
    Hbone {
        next_hop: SocketAddr,
        target: SocketAddr,
        peer_identity: Identity,
        dst_workload: Arc<Workload>,
        via_waypoint: bool,
        service: Option<String>,
    },
    /// Plain TCP to a known workload that is not in the mesh.
    Direct {
        addr: SocketAddr,
        dst_workload: Arc<Workload>,
        service: Option<String>,
    },
    /// Not a known address: plain TCP to the original destination.
    Passthrough { addr: SocketAddr },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum RouteError {
    #[error("destination port {0} is one of the proxy's own ports")]
    ProxyPort(u16),
    #[error("service {0} has no healthy endpoints")]
    NoHealthyEndpoints(String),
    #[error("waypoint {0} is not a known workload")]
    UnknownWaypoint(String),
}

fn waypoint_route(
    snap: &Snapshot,
    src: &Workload,
    wp: &crate::state::GatewayAddress,
    target: SocketAddr,
    service: Option<String>,
) -> Option<Result<Route, RouteError>> {
    let GatewayDestination::Address { network, ip } = &wp.destination else {
        return Some(Err(RouteError::UnknownWaypoint(format!(
            "{:?}",
            wp.destination
        ))));
    };
    // Traffic from the waypoint itself goes on to the destination.
    if src.addresses.contains(ip) {
        return None;
    }
    // The waypoint is published as its Service's VIP (or, for a waypoint
    // without one, its pod's address); a VIP resolves to one of its pods.
    let w = if let Some(svc) = snap.service_by_vip(network, *ip) {
        if src.services.contains_key(&svc.service.key()) {
            return None;
        }
        match snap.pick_endpoint(svc) {
            Some(w) => w,
            None => return Some(Err(RouteError::NoHealthyEndpoints(svc.service.key()))),
        }
    } else {
        match snap.workload_by_ip(network, *ip) {
            Some(w) => w.clone(),
            None => return Some(Err(RouteError::UnknownWaypoint(ip.to_string()))),
        }
    };
    let Some(wp_ip) = w.addresses.first().copied() else {
        return Some(Err(RouteError::UnknownWaypoint(w.uid.clone())));
    };
    Some(Ok(Route::Hbone {
        next_hop: SocketAddr::new(wp_ip, wp.hbone_port),
        target,
        peer_identity: w.identity.clone(),
        dst_workload: w,
        via_waypoint: true,
        service,
    }))
}

fn to_workload(w: Arc<Workload>, target: SocketAddr, service: Option<String>) -> Route {
    match w.protocol {
        TunnelProtocol::Hbone => Route::Hbone {
            next_hop: SocketAddr::new(target.ip(), HBONE_PORT),
            target,
            peer_identity: w.identity.clone(),
            dst_workload: w,
            via_waypoint: false,
            service,
        },
        TunnelProtocol::None => Route::Direct {
            addr: target,
            dst_workload: w,
            service,
        },
    }
}

/// The port on `ep` that service port `port` of `svc` leads to.
pub fn target_port(svc: &ServiceEntry, ep: &Workload, port: u16) -> u16 {
    let key = svc.service.key();
    ep.services
        .get(&key)
        .and_then(|ports| ports.iter().find(|p| p.service_port == port))
        .or_else(|| svc.service.ports.iter().find(|p| p.service_port == port))
        .map(|p| {
            if p.target_port == 0 {
                port
            } else {
                p.target_port
            }
        })
        .unwrap_or(port)
}

/// Decides where a connection from `src` to `dst` goes.
pub fn resolve(
    snap: &Snapshot,
    network: &str,
    src: &Workload,
    dst: SocketAddr,
) -> Result<Route, RouteError> {
    if let Some(svc) = snap.service_by_vip(network, dst.ip()) {
        let key = svc.service.key();
        if let Some(wp) = &svc.service.waypoint
            && let Some(r) = waypoint_route(snap, src, wp, dst, Some(key.clone()))
        {
            return r;
        }
        let ep = snap
            .pick_endpoint(svc)
            .ok_or_else(|| RouteError::NoHealthyEndpoints(key.clone()))?;
        let ip = ep
            .addresses
            .first()
            .copied()
            .ok_or_else(|| RouteError::NoHealthyEndpoints(key.clone()))?;
        let target = SocketAddr::new(ip, target_port(svc, &ep, dst.port()));
        return Ok(to_workload(ep, target, Some(key)));
    }
    if let Some(w) = snap.workload_by_ip(network, dst.ip()) {
        if w.protocol == TunnelProtocol::Hbone
            && [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&dst.port())
        {
            return Err(RouteError::ProxyPort(dst.port()));
        }
        if let Some(wp) = &w.waypoint
            && let Some(r) = waypoint_route(snap, src, wp, dst, None)
        {
            return r;
        }
        return Ok(to_workload(w.clone(), dst, None));
    }
    Ok(Route::Passthrough { addr: dst })
}

/// A 401 from the peer is its policy saying no: DENY, not CONNECT.
fn pool_error_flags(e: &super::pool::PoolError) -> ResponseFlags {
    match e {
        super::pool::PoolError::Open {
            source: crate::hbone::OpenError::Status(s),
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

/// The workload of `pod` that sent from `peer`, or why there is none:
/// the workload at the peer address must be that very pod's.
pub fn pod_source(
    snap: &Snapshot,
    network: &str,
    pod: &CapturedPod,
    peer: SocketAddr,
) -> Result<Arc<Workload>, String> {
    let w = snap
        .workload_by_ip(network, peer.ip())
        .ok_or_else(|| format!("no workload has the source address {}", peer.ip()))?;
    if w.namespace != pod.namespace || w.name != pod.name {
        return Err(format!(
            "source address {} is workload {}/{}'s, not this pod's ({}/{})",
            peer.ip(),
            w.namespace,
            w.name,
            pod.namespace,
            pod.name
        ));
    }
    Ok(w.clone())
}

fn source_workload(
    snap: &Snapshot,
    network: &str,
    source: Source<'_>,
    peer: SocketAddr,
) -> Result<Arc<Workload>, String> {
    match source {
        Source::Uid(uid) => snap
            .workload(uid)
            .cloned()
            .ok_or_else(|| format!("no workload {uid}")),
        Source::Pod(pod) => pod_source(snap, network, pod, peer),
    }
}

async fn handle(
    proxy: Arc<Proxy>,
    mut tcp: TcpStream,
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
    let (protocol, hbone_peer, dst_identity, dst_workload, service) = match &route {
        Ok(Route::Hbone {
            next_hop,
            peer_identity,
            dst_workload,
            service,
            ..
        }) => (
            if local.is_some() {
                Protocol::Local
            } else {
                Protocol::Hbone
            },
            local.is_none().then_some(*next_hop),
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
    let final_dst = match &route {
        Ok(Route::Hbone { target, .. }) => *target,
        Ok(Route::Direct { addr, .. }) | Ok(Route::Passthrough { addr }) => *addr,
        Err(_) => dst,
    };
    let svc_parts = service.as_ref().and_then(|k| {
        let (ns, host) = k.split_once('/')?;
        Some((
            host.to_string(),
            ns.to_string(),
            host.split('.').next().unwrap_or(host).to_string(),
        ))
    });
    let labels = TcpLabels::new(
        Reporter::source,
        Some(&src),
        Some(&src.identity),
        dst_workload.as_deref(),
        dst_identity.as_ref(),
        svc_parts
            .as_ref()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
        protocol != Protocol::Tcp,
    );
    let tracked = proxy.conns.track(ConnInfo {
        direction: Direction::Outbound,
        protocol,
        src: peer,
        dst: final_dst,
        hbone_peer,
        src_identity: Some(src.identity.clone()),
        dst_identity: dst_identity.clone(),
        src_workload: Some(src.name.clone()),
        dst_workload: dst_workload.as_ref().map(|w| w.name.clone()),
        local_uid: Some(src.uid.clone()),
        started: SystemTime::now(),
        counters: counters.clone(),
        close_reason: Default::default(),
    });
    proxy.opened(&labels);
    proxy.metrics.active_connections.inc();
    let src_ip = src.addresses.first().copied();
    let src_netns = proxy.netns.for_workload(&src);
    // Connect first; the copy then runs where it is cheapest.
    let connected: Result<Upstream, (ResponseFlags, String)> = async {
        let route = route.map_err(|e| match e {
            RouteError::NoHealthyEndpoints(_) => (ResponseFlags::NoHealthyUpstream, e.to_string()),
            _ => (ResponseFlags::Connect, e.to_string()),
        })?;
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
                        &proxy,
                        &tracked,
                        &src,
                        peer,
                        &dst_workload,
                        target,
                        dst_netns.as_deref(),
                        counters.clone(),
                    )
                    .await
                    .map(|d| Upstream::Local(Box::new(d)));
                }
                let key = PoolKey {
                    src: src.identity.clone(),
                    src_ip,
                    dst: peer_identity,
                    next_hop,
                };
                let headers = ConnectHeaders {
                    baggage: Some(baggage(&src)),
                    forwarded_for: Some(peer),
                    // The service the client addressed, so the destination
                    // attributes the connection to it.
                    forwarded_host: svc_parts.as_ref().map(|(host, _, _)| host.clone()),
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
                src_ip,
                proxy.cfg.effective_mark(),
                proxy.cfg.connect_timeout,
                src_netns.as_deref(),
            )
            .await
            .map(Upstream::Tcp)
            .map_err(|e| (ResponseFlags::Connect, format!("connect to {addr}: {e}"))),
        }
    }
    .await;
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
    Hbone(crate::hbone::H2Stream, super::pool::StreamGuard),
    Tcp(TcpStream),
    /// The inbound half of a same-node connection.
    Local(Box<super::local::Delivered>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LocalConfig, ProxyState};

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
        let err = from("10.1.1.2").unwrap_err();
        assert!(err.contains("shop/victim's, not this pod's"), "{err}");
        let err = from("10.9.9.9").unwrap_err();
        assert!(err.contains("no workload has the source address"), "{err}");
    }
}
