//! Inbound HBONE (15008): terminate mutual TLS as the destination workload,
//! and for each CONNECT stream check the request and the policy, dial the
//! app, then answer 200 and copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::conns::{ConnInfo, Direction, Protocol};
use super::copy::{self, Counters};
use super::{Finished, Proxy};
use mesh_core::hbone::{self, Conn, FORWARDED, Responder};
use mesh_core::identity::Identity;
use mesh_core::listen::accept_until;
use mesh_core::metrics::{Reporter, ResponseFlags, TcpLabels};
use mesh_core::socket;
use mesh_core::state::decide::authorize;
use mesh_core::state::{Snapshot, Workload};

/// Serves HBONE for the workload(s) at `listener`'s address.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    let draining = proxy.draining.clone();
    accept_until(&listener, draining.cancelled(), |tcp, peer| {
        tokio::spawn(handle_connection(proxy.clone(), tcp, peer));
    })
    .await
}

async fn handle_connection(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(e) => return warn!(%peer, error = %e, "no local address"),
    };
    socket::keepalive(&tcp);
    // The certificate is chosen by destination IP: there is no SNI.
    let Some(dst) = proxy
        .state
        .snapshot()
        .workload_by_ip(&proxy.cfg.network, local.ip())
        .cloned()
    else {
        return warn!(%peer, %local, "HBONE connection to an address with no workload; closing");
    };
    let handler = |req: Request<()>, respond: Responder, src_identity: Identity| {
        handle_stream(proxy.clone(), req, respond, peer, dst.clone(), src_identity)
    };
    let conn = Conn { tcp, peer, local };
    proxy.hbone.serve(conn, &dst.identity, handler).await
}

async fn handle_stream(
    proxy: Arc<Proxy>,
    req: Request<()>,
    respond: Responder,
    peer: SocketAddr,
    dst: Arc<Workload>,
    src_identity: Identity,
) {
    let target = match hbone::parse_connect(&req) {
        Ok(t) => t,
        Err(e) => {
            info!(%peer, identity = %src_identity, reason = %e, "HBONE request refused (400)");
            return respond.refuse(StatusCode::BAD_REQUEST);
        }
    };
    // Judge each stream on the workload as it is now: a pooled connection
    // outlives policy bindings and even the workload itself.
    let snap = proxy.state.snapshot();
    let Some(dst) = snap
        .workload(&dst.uid)
        .filter(|w| w.identity == dst.identity)
        .cloned()
    else {
        info!(%peer, %target, workload = %dst.uid, "destination workload is gone or changed identity (503)");
        return respond.refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    if !dst.addresses.contains(&target.ip()) {
        info!(%peer, %target, workload = %dst.uid, "HBONE target is not the connection's destination workload (400)");
        return respond.refuse(StatusCode::BAD_REQUEST);
    }
    let src_wl = crate::peer_meta::source_of(
        snap.workload_by_ip(&proxy.cfg.network, peer.ip()).cloned(),
        req.headers(),
        &src_identity,
    );
    let decision = authorize(
        &snap,
        &proxy.cfg.root_namespace,
        &dst,
        Some(&src_identity),
        peer.ip(),
        target,
    );
    // The app sees the peer's address only when the state gives it to a
    // workload of the peer's identity (see `orig_src`).
    let client = super::orig_src::peer_owns(&snap, &proxy.cfg.network, peer.ip(), &src_identity)
        .then_some(peer);
    drop(snap);
    let counters = Arc::new(Counters::default());
    let forwarded = req
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // The service the client addressed, when the peer names one this
    // workload backs.
    let service = crate::peer_meta::service_of(&dst, forwarded.as_deref());
    let labels = proxy.label_sets.share(TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        Some(&src_identity),
        Some(&dst),
        Some(&dst.identity),
        service
            .as_ref()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
        true,
    ));
    let tracked = proxy.conns.track(ConnInfo {
        direction: Direction::Inbound,
        protocol: Protocol::Hbone,
        src: peer,
        dst: target,
        hbone_peer: None,
        src_identity: Some(src_identity.clone()),
        dst_identity: Some(dst.identity.clone()),
        src_workload: src_wl.as_ref().map(|w| w.name.clone()),
        dst_workload: Some(dst.name.clone()),
        local_uid: Some(dst.uid.clone()),
        started: SystemTime::now(),
        counters: counters.clone(),
        close_reason: Default::default(),
    });
    proxy.opened(&labels);
    if !decision.is_allowed() {
        info!(%peer, %target, identity = %src_identity, %decision, forwarded = forwarded.as_deref().unwrap_or("-"), "HBONE connection denied (401)");
        proxy.record(Finished {
            labels,
            info: &tracked.info,
            flags: ResponseFlags::Deny,
            error: Some(decision.to_string()),
        });
        return respond.refuse(StatusCode::UNAUTHORIZED);
    }
    // What only the checks needed is not held for the connection's life.
    drop((req, forwarded, service, src_wl));
    // Dial first, then answer: 200 means the app accepted the connection.
    let netns = proxy.netns.for_workload(&dst);
    let dialed = super::orig_src::dial_app(&proxy, client, target, netns.as_deref()).await;
    let mut upstream = match dialed {
        Ok(s) => s,
        Err(e) => {
            info!(%peer, %target, error = %e, "upstream dial failed (503)");
            proxy.record(Finished {
                labels,
                info: &tracked.info,
                flags: ResponseFlags::Connect,
                error: Some(format!("connect to {target}: {e}")),
            });
            return respond.refuse(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    proxy.metrics.active_connections.inc();
    // The 200 names the destination, so the client can attribute it.
    let result = match respond.accept_with_baggage(Some(&crate::peer_meta::baggage(&dst))) {
        Ok(mut tunnel) => {
            copy::run_hbone(
                &tracked.cancel,
                &mut upstream,
                &mut tunnel,
                copy::TcpSide::Destination,
                counters,
            )
            .await
        }
        Err(e) => Err((ResponseFlags::None, format!("answering CONNECT: {e}"))),
    };
    proxy.metrics.active_connections.dec();
    proxy.finish(labels, &tracked.info, result);
}

/// Closes open inbound connections that a policy change now denies. Holds
/// the proxy weakly, so it ends when the proxy is dropped.
pub async fn revoke_on_policy_change(proxy: std::sync::Weak<Proxy>) {
    let mut rx = match proxy.upgrade() {
        Some(p) => p.state.subscribe_policies(),
        None => return,
    };
    while rx.changed().await.is_ok() {
        let Some(proxy) = proxy.upgrade() else { return };
        let snap = proxy.state.snapshot();
        let n = proxy
            .conns
            .cancel_where(|c| revocation(&snap, &proxy.cfg.root_namespace, c));
        if n > 0 {
            info!(closed = n, "policy change closed connections it now denies");
        }
    }
}

/// Why an open inbound connection `c` is to be closed under `snap`'s
/// policies, if it is (outbound ones never are).
pub(super) fn revocation(snap: &Snapshot, root_namespace: &str, c: &ConnInfo) -> Option<String> {
    if c.direction == Direction::Outbound {
        return None;
    }
    let Some(dst) = snap.workload(c.local_uid.as_deref()?) else {
        return Some("denied: the destination workload is gone".to_string());
    };
    let d = authorize(
        snap,
        root_namespace,
        dst,
        c.src_identity.as_ref(),
        c.src.ip(),
        c.dst,
    );
    (!d.is_allowed()).then(|| format!("now {d}"))
}
