//! The app sees its client's address. In node mode the inbound side dials
//! the app from inside the app's pod; with `original_source` on (the
//! default) it dials from the client's IP rather than the pod's own, as a
//! transparent socket carrying the proxy's mark. The pod's rules (the node
//! agent's, see `mesh_cni::rules`) send the app's replies back to that
//! socket within the pod.
//!
//! Which address: always the address of the connection the ztunnel itself
//! accepted, never one a peer names in a header (`forwarded`, `baggage`):
//!
//! - HBONE: the TCP peer of the mutual-TLS connection (the source pod's
//!   address, as its ztunnel dials from inside it), and only when that
//!   address is not another workload's: when the state places a workload
//!   of a different identity at it, the app sees the pod's own address;
//! - plaintext (15006): the TCP peer, what the app would have seen
//!   without the mesh;
//! - the same-node fast path: the client pod's address (the outbound
//!   listener already checked that it is that pod's).
//!
//! Loopback, link-local, unspecified and multicast addresses, an address
//! of the other family, and one equal to the app's own fall back to
//! today's dial, as does a process without CAP_NET_ADMIN (logged once).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpStream;
use tracing::warn;

use super::Proxy;
use mesh_core::identity::Identity;
use mesh_core::netns::Netns;
use mesh_core::socket;
use mesh_core::state::Snapshot;

/// Set once the fallback for a missing capability has been logged.
static NO_CAPABILITY_LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether `ip` may stand as a client's address toward an app: not
/// loopback, link-local, unspecified or multicast.
pub fn usable(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast(),
        IpAddr::V6(v6) => {
            !v6.is_unicast_link_local()
                && v6.to_ipv4_mapped().is_none_or(|v4| usable(IpAddr::V4(v4)))
        }
    }
}

/// Whether an HBONE peer at `peer` authenticated as `identity` may have
/// the app see `peer`: yes unless the state places a workload of another
/// identity there.
pub fn peer_owns(snap: &Snapshot, network: &str, peer: IpAddr, identity: &Identity) -> bool {
    snap.workload_by_ip(network, peer)
        .is_none_or(|w| w.identity == *identity)
}

/// The address to dial the app at `target` from, for a client at
/// `client`, when `netns` (the app's pod) is where the dial is made; None:
/// the pod's own.
pub fn source_for(
    proxy: &Proxy,
    client: IpAddr,
    target: SocketAddr,
    netns: Option<&Netns>,
) -> Option<IpAddr> {
    let on = proxy.cfg.original_source && netns.is_some();
    (on && usable(client) && client.is_ipv4() == target.is_ipv4() && client != target.ip())
        .then_some(client)
}

/// Dials the app at `target` inside `netns`, from `client`'s address when
/// [`source_for`] allows it, else as before (from the pod's own address).
pub async fn dial_app(
    proxy: &Proxy,
    client: Option<SocketAddr>,
    target: SocketAddr,
    netns: Option<&Netns>,
) -> io::Result<TcpStream> {
    let (mark, timeout) = (proxy.cfg.effective_mark(), proxy.cfg.connect_timeout);
    let src = client.and_then(|c| Some((source_for(proxy, c.ip(), target, netns)?, c.port())));
    if let (Some((ip, port)), Some(m)) = (src, mark) {
        match socket::dial_transparent(target, ip, Some(port), m, timeout, netns).await {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                if !NO_CAPABILITY_LOGGED.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot dial apps from their clients' addresses (CAP_NET_ADMIN?); they see the pod's own address");
                }
            }
            r => return r,
        }
    }
    socket::dial(target, None, mark, timeout, netns).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_a_peer_can_have_are_used() {
        for ip in [
            "127.0.0.1",
            "169.254.7.127",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "::",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!usable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.1.2.3", "192.168.0.1", "fd00::5", "2001:db8::1"] {
            assert!(usable(ip.parse().unwrap()), "{ip}");
        }
    }
}
