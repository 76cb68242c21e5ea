//! The per-connection decisions every proxy makes from the state: where a
//! connection goes ([`resolve`], [`target_port`]) and whether the
//! destination's policies let it in ([`authorize`]). The ztunnel, the
//! waypoint and `meshctl why` all decide through these.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::policy::{self, Connection, Decision};
use super::{GatewayAddress, GatewayDestination, ServiceEntry, Snapshot, TunnelProtocol, Workload};
use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::identity::Identity;

/// The addresses of the workload `ip` is attributed to on `network`: only a
/// workload that has `ip` and, when the peer is authenticated, that runs as
/// `identity`; empty when there is none.
pub fn attributed<'s>(
    snap: &'s Snapshot,
    network: &str,
    ip: IpAddr,
    identity: Option<&Identity>,
) -> &'s [IpAddr] {
    match snap.workload_by_ip(network, ip.to_canonical()) {
        Some(w) if identity.is_none_or(|id| *id == w.identity) => &w.addresses,
        _ => &[],
    }
}

/// Whether a peer can be judged by its address: false for an address
/// that names no workload on any network and may be anyone on the link it
/// came over: IPv6 link-local (fe80::/10, and the deprecated site-local
/// fec0::/10), IPv4 link-local (169.254/16), unspecified, multicast and
/// broadcast (a v4-mapped address as its IPv4). Loopback is kept: the
/// kernel takes it from no interface but `lo`. The kubelet's probe source
/// (169.254.7.127) never reaches a proxy: the pod's rules let it through
/// before capture.
pub fn attributable_peer(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_link_local() || v4.octets()[0] == 0 || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            let scoped = matches!(v6.segments()[0] & 0xffc0, 0xfe80 | 0xfec0);
            !(scoped || v6.is_unspecified() || v6.is_multicast())
        }
    }
}

/// Evaluates the destination's policies for a connection. The one decision
/// function: inbound HBONE, inbound plaintext and policy revocation use it.
/// IP blocks are judged on every address of the source and destination
/// workloads where a policy denies (see [`Connection`]).
pub fn authorize(
    snap: &Snapshot,
    root_namespace: &str,
    dst: &Workload,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    target: SocketAddr,
) -> Decision {
    if !attributable_peer(src_ip) {
        return Decision::Unattributable { peer: src_ip };
    }
    let policies = snap.policies_for(dst, root_namespace);
    let target_ip = target.ip().to_canonical();
    let dst_addrs: &[IpAddr] = if dst.addresses.contains(&target_ip) {
        &dst.addresses
    } else {
        &[]
    };
    policy::evaluate(
        policies.iter().map(|p| p.as_ref()),
        &Connection {
            src_identity,
            src_ip,
            dst_ip: target.ip(),
            dst_port: target.port(),
            src_addrs: attributed(snap, &dst.network, src_ip, src_identity),
            dst_addrs,
        },
    )
}

/// The same-node path's judgement: the address `src` is taken to come
/// from (the one its tunnel would carry, [`source_ip`] of the target) and
/// the destination's decision on it. The inbound half dials the app from
/// that address too, so policy and the app see one source, the one a
/// ztunnel on another node would see. Not the client socket's address
/// (one of the source pod's, as the outbound side checked): the tunnel
/// carries its address of the target's family, which may be another.
pub fn authorize_local(
    snap: &Snapshot,
    root_namespace: &str,
    src: &Workload,
    dst: &Workload,
    target: SocketAddr,
) -> Result<(IpAddr, Decision), RouteError> {
    let from = source_ip(src, target.ip())?;
    let decision = authorize(snap, root_namespace, dst, Some(&src.identity), from, target);
    Ok((from, decision))
}

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
    #[error("source workload {workload} has no {family} address to dial {hop} from")]
    NoSourceAddress {
        workload: String,
        family: &'static str,
        hop: IpAddr,
    },
}

/// The address `src` dials `hop` from: its address of `hop`'s family. A
/// source with none fails the connection (fail closed) rather than leave
/// the kernel to pick a source that is not the workload's.
pub fn source_ip(src: &Workload, hop: IpAddr) -> Result<IpAddr, RouteError> {
    let v4 = hop.to_canonical().is_ipv4();
    src.addresses
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .copied()
        .ok_or_else(|| RouteError::NoSourceAddress {
            workload: format!("{}/{}", src.namespace, src.name),
            family: if v4 { "IPv4" } else { "IPv6" },
            hop,
        })
}

fn waypoint_route(
    snap: &Snapshot,
    src: &Workload,
    wp: &GatewayAddress,
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
    // In the connection's family, as any hop (its first address when it
    // has none of it: the tunnel carries either).
    let Some(wp_ip) = w.address_like(target.ip()) else {
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
            .address_like(dst.ip())
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
