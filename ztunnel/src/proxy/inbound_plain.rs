//! Inbound plaintext (15006): connections from peers outside the mesh. They
//! carry no identity, so policy sees none (STRICT mTLS denies them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use super::conns::{ConnInfo, Direction, Protocol};
use super::copy::{self, Counters};
use super::outbound::CapturedPod;
use super::{Finished, Proxy};
use crate::config::PROXY_PORTS;
use mesh_core::metrics::{Reporter, ResponseFlags, TcpLabels};
use mesh_core::socket;
use mesh_core::state::decide::authorize;

/// Serves plaintext inbound; `pod`, in node mode, the pod whose netns the
/// listener lives in: only connections for its own addresses are served.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    fixed_target: Option<SocketAddr>,
    pod: Option<Arc<CapturedPod>>,
) {
    super::accept_captured(
        proxy,
        listener,
        fixed_target,
        move |proxy, tcp, peer, dst| handle(proxy, tcp, peer, dst, pod.clone()),
    )
    .await
}

async fn handle(
    proxy: Arc<Proxy>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    pod: Option<Arc<CapturedPod>>,
) {
    let _ = tcp.set_nodelay(true);
    if PROXY_PORTS.contains(&target.port()) {
        return info!(%peer, %target, "plaintext connection to a proxy port refused");
    }
    let snap = proxy.state.snapshot();
    let Some(dst) = snap
        .workload_by_ip(&proxy.cfg.network, target.ip())
        .cloned()
    else {
        return warn!(%peer, %target, "plaintext connection to an address with no workload; closing");
    };
    // A pod's listener serves its pod: a neighbour on its bridge can send
    // it a connection for another pod's address (a route via this pod),
    // which must not be dialed into that pod.
    if let Some(pod) = pod
        && (dst.namespace != pod.namespace || dst.name != pod.name)
    {
        return warn!(%peer, %target, pod = %format!("{}/{}", pod.namespace, pod.name),
            "plaintext connection for another pod's address refused");
    }
    let src_wl = snap.workload_by_ip(&proxy.cfg.network, peer.ip()).cloned();
    let decision = authorize(
        &snap,
        &proxy.cfg.root_namespace,
        &dst,
        None,
        peer.ip(),
        target,
    );
    drop(snap);
    let counters = Arc::new(Counters::default());
    let labels = proxy.label_sets.share(TcpLabels::new(
        Reporter::destination,
        src_wl.as_deref(),
        None,
        Some(&dst),
        Some(&dst.identity),
        None,
        false,
    ));
    let tracked = proxy.conns.track(ConnInfo {
        direction: Direction::InboundPlaintext,
        protocol: Protocol::Tcp,
        src: peer,
        dst: target,
        hbone_peer: None,
        src_identity: None,
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
        info!(%peer, %target, %decision, "plaintext connection denied");
        return proxy.record(Finished {
            labels,
            info: &tracked.info,
            flags: ResponseFlags::Deny,
            error: Some(decision.to_string()),
        });
    }
    proxy.metrics.active_connections.inc();
    // The app sees the peer, as it would without the mesh.
    let netns = proxy.netns.for_workload(&dst);
    let dialed = super::orig_src::dial_app(&proxy, Some(peer), target, netns.as_deref()).await;
    let result = match dialed {
        Ok(mut up) => copy::run(&tracked.cancel, &mut tcp, &mut up, counters)
            .await
            .inspect_err(|_| {
                socket::reset(&tcp);
                socket::reset(&up);
            }),
        Err(e) => Err((ResponseFlags::Connect, format!("connect to {target}: {e}"))),
    };
    proxy.metrics.active_connections.dec();
    proxy.finish(labels, &tracked.info, result);
}
