//! The same-node fast path. A connection from one workload this ztunnel
//! serves to another skips the tunnel: the outbound side hands it to the
//! inbound side in memory. The inbound side then does what it does for an
//! HBONE stream: checks the destination's policy against the source's
//! identity, dials the app inside the destination's pod, and records its
//! own half (reporter destination). Metrics, access logs, policy
//! revocation, pod removal and the admin view read as for a tunnelled
//! connection, with protocol `LOCAL`.
//!
//! Why it is safe: both identities' keys are in this process already, and
//! the bytes never leave the node. TLS from the ztunnel to itself would
//! protect them only from someone with root on the node, who can read the
//! keys anyway.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpStream;
use tracing::info;

use super::conns::{ConnInfo, Direction, Protocol, Tracked};
use super::copy::Counters;
use super::{Finished, Proxy};
use mesh_core::metrics::{Reporter, ResponseFlags, TcpLabels};
use mesh_core::netns::Netns;
use mesh_core::state::Workload;

/// Where the inbound half dials from, when this ztunnel serves `dst` (at
/// `target`) itself and the fast path is on: `Some(Some(netns))` for a
/// captured pod (node mode), `Some(None)` when `target`'s IP is one of the
/// configured HBONE listeners, `None` when the destination is elsewhere.
pub fn served_here(proxy: &Proxy, dst: &Workload, target: IpAddr) -> Option<Option<Arc<Netns>>> {
    if !proxy.cfg.same_node_fast_path {
        return None;
    }
    if let Some(ns) = proxy.netns.for_workload(dst) {
        return Some(Some(ns));
    }
    proxy
        .cfg
        .listeners
        .inbound_ips
        .contains(&target)
        .then_some(None)
}

/// The inbound half, connected to the app.
pub struct Delivered {
    pub upstream: TcpStream,
    pub tracked: Tracked,
    pub labels: Arc<TcpLabels>,
}

/// The inbound half of a same-node connection: policy, then the dial.
/// `outbound` is the outbound half; closing either half closes both.
#[allow(clippy::too_many_arguments)]
pub async fn deliver(
    proxy: &Proxy,
    outbound: &Tracked,
    src: &Workload,
    peer: SocketAddr,
    dst: &Arc<Workload>,
    target: SocketAddr,
    dst_netns: Option<&Netns>,
    counters: Arc<Counters>,
) -> Result<Delivered, (ResponseFlags, String)> {
    // Policy judges, and the app sees, the address the source's tunnel
    // would carry (its address of the target's family), as on another node.
    let judged = {
        let snap = proxy.state.snapshot();
        mesh_core::state::decide::authorize_local(
            &snap,
            &proxy.cfg.root_namespace,
            src,
            dst,
            target,
        )
    };
    let (src_ip, decision) = judged.map_err(|e| {
        info!(%peer, %target, error = %e, "same-node connection has no source address");
        (ResponseFlags::Connect, e.to_string())
    })?;
    let client = SocketAddr::new(src_ip, peer.port());
    // The identity is the one this ztunnel authenticated the source pod
    // as, exactly what an HBONE peer's certificate would carry.
    let labels = proxy.label_sets.share(TcpLabels::new(
        Reporter::destination,
        Some(src),
        Some(&src.identity),
        Some(dst),
        Some(&dst.identity),
        None,
        true,
    ));
    let tracked = proxy
        .conns
        .track_linked(conn_info(src, client, dst, target, counters), outbound);
    proxy.opened(&labels);
    if !decision.is_allowed() {
        info!(%peer, %src_ip, %target, identity = %src.identity, %decision, "same-node connection denied");
        let reason = decision.to_string();
        proxy.record(Finished {
            labels,
            info: &tracked.info,
            flags: ResponseFlags::Deny,
            error: Some(reason.clone()),
        });
        return Err((ResponseFlags::Deny, reason));
    }
    // The app sees the client pod (the address judged above, one of that
    // pod's: the outbound side checked the peer's).
    match super::orig_src::dial_app(proxy, Some(client), target, dst_netns).await {
        Ok(upstream) => Ok(Delivered {
            upstream,
            tracked,
            labels,
        }),
        Err(e) => {
            let reason = format!("connect to {target}: {e}");
            info!(%peer, %target, error = %e, "same-node dial failed");
            proxy.record(Finished {
                labels,
                info: &tracked.info,
                flags: ResponseFlags::Connect,
                error: Some(reason.clone()),
            });
            Err((ResponseFlags::Connect, reason))
        }
    }
}

/// The record of a same-node connection. Its client is `client`, the
/// address judged (and the one the app sees, with the client socket's
/// port), so a policy change re-judges what was judged at the start, not
/// the client socket's address (another family when the target has only
/// the other one).
fn conn_info(
    src: &Workload,
    client: SocketAddr,
    dst: &Workload,
    target: SocketAddr,
    counters: Arc<Counters>,
) -> ConnInfo {
    ConnInfo {
        direction: Direction::Inbound,
        protocol: Protocol::Local,
        src: client,
        dst: target,
        hbone_peer: None,
        src_identity: Some(src.identity.clone()),
        dst_identity: Some(dst.identity.clone()),
        src_workload: Some(src.name.clone()),
        dst_workload: Some(dst.name.clone()),
        local_uid: Some(dst.uid.clone()),
        started: SystemTime::now(),
        counters,
        close_reason: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::state::{LocalConfig, ProxyState};

    const STATE: &str = r#"
workloads:
- {uid: "c//Pod/shop/client", name: client, namespace: shop, addresses: [10.1.1.1, "fd00:1::1"], tunnel_protocol: HBONE, service_account: client, node: n1}
- {uid: "c//Pod/shop/old", name: old, namespace: shop, addresses: [10.1.3.1], tunnel_protocol: HBONE, service_account: old, node: n1}
"#;

    fn state(blocks: &str) -> ProxyState {
        let policies = format!(
            "\n- {{name: p, namespace: shop, scope: NAMESPACE, action: ALLOW, rules: [{{clauses: [{{matches: [{{source_ips: [{blocks}]}}]}}]}}]}}\n"
        );
        let local: LocalConfig =
            serde_yaml::from_str(&format!("{STATE}policies: {policies}")).expect("local config");
        let state = ProxyState::default();
        state.replace(local.to_updates("cluster.local", "test").expect("updates"));
        state
    }

    /// A client calling an IPv6 VIP whose one endpoint has only IPv4 is
    /// admitted as its IPv4 address; a policy change re-judges that
    /// address, not the client socket's IPv6 one: an ALLOW of the IPv4
    /// address keeps the connection, an ALLOW of the IPv6 one alone cuts
    /// it. Failed first: the record kept the socket's address.
    #[test]
    fn a_policy_change_re_judges_the_address_judged_at_the_start() {
        let peer: SocketAddr = "[fd00:1::1]:40000".parse().expect("peer");
        let target: SocketAddr = "10.1.3.1:8080".parse().expect("target");
        for (blocks, kept) in [("\"10.1.1.1/32\"", true), ("\"fd00:1::/64\"", false)] {
            let s = state(blocks);
            let snap = s.snapshot();
            let client = snap.workload("c//Pod/shop/client").expect("client");
            let old = snap.workload("c//Pod/shop/old").expect("old");
            let (ip, d) = mesh_core::state::decide::authorize_local(
                &snap,
                "istio-system",
                client,
                old,
                target,
            )
            .expect("a source address");
            assert_eq!(d.is_allowed(), kept, "{blocks}: {d}");
            let info = conn_info(
                client,
                SocketAddr::new(ip, peer.port()),
                old,
                target,
                Arc::new(Counters::default()),
            );
            let revoked = super::super::inbound::revocation(&snap, "istio-system", &info);
            assert_eq!(revoked.is_none(), kept, "{blocks}: {revoked:?}");
        }
    }
}
