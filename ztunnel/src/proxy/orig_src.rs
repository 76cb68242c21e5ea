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
//! Loopback, link-local, unspecified and multicast addresses, the node's
//! probe sources, an address of the other family, and one equal to the
//! app's own fall back to today's dial (an IPv4-mapped IPv6 address is
//! read as the IPv4 address it is first). So does a pod whose reply
//! routing is missing (asked of its kernel before each such dial: its
//! node agent could not install it, or is older), and, for the rest of
//! the process, a ztunnel that may not make transparent sockets (no
//! CAP_NET_ADMIN): each logged once and counted in
//! `ztunnel_original_source_fallbacks`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpStream;
use tracing::warn;

use super::Proxy;
use mesh_core::config::{ORIG_SRC_REPLY_MARK, PROBE_SOURCE_V4, PROBE_SOURCE_V6};
use mesh_core::identity::Identity;
use mesh_core::metrics::{FallbackLabels, FallbackReason, Metrics};
use mesh_core::netns::Netns;
use mesh_core::socket;
use mesh_core::state::Snapshot;

/// Whether transparent dials are still tried, once for the process.
pub struct Transparent {
    /// Set when one failed for want of permission: it will again.
    refused: AtomicBool,
    /// Set once a pod without reply routing has been logged.
    no_route_logged: AtomicBool,
}

impl Transparent {
    pub const fn new() -> Self {
        Transparent {
            refused: AtomicBool::new(false),
            no_route_logged: AtomicBool::new(false),
        }
    }

    /// Whether to try a transparent dial at all.
    pub fn allowed(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Takes a transparent dial's failure: true when it was for want of
    /// permission (EPERM or EACCES), which is then remembered, logged once
    /// and counted, and the caller dials from the pod's address.
    pub fn refused(&self, e: &io::Error, metrics: &Metrics) -> bool {
        if e.kind() != io::ErrorKind::PermissionDenied {
            return false;
        }
        fallback(metrics, FallbackReason::no_permission);
        if !self.refused.swap(true, Ordering::Relaxed) {
            warn!(error = %e, "cannot dial apps from their clients' addresses (CAP_NET_ADMIN?); from now on they see the pod's own address");
        }
        true
    }

    /// Notes a pod without reply routing (logged once per process; the
    /// metric counts every dial).
    fn no_route(&self, target: SocketAddr, metrics: &Metrics) {
        fallback(metrics, FallbackReason::no_reply_route);
        if !self.no_route_logged.swap(true, Ordering::Relaxed) {
            warn!(%target, "a pod has no reply routing for original source (see its node agent's log); its app sees the pod's own address");
        }
    }
}

impl Default for Transparent {
    fn default() -> Self {
        Self::new()
    }
}

fn fallback(metrics: &Metrics, reason: FallbackReason) {
    metrics
        .original_source_fallbacks
        .get_or_create(&FallbackLabels { reason })
        .inc();
}

/// This process's.
static TRANSPARENT: Transparent = Transparent::new();

/// Whether `ip` may stand as a client's address toward an app: not
/// loopback, link-local, unspecified, multicast or a probe source.
pub fn usable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_broadcast() && v4 != PROBE_SOURCE_V4,
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && v6 != PROBE_SOURCE_V6,
    }
}

/// Whether an HBONE peer at `peer` authenticated as `identity` may have
/// the app see `peer`: yes unless the state places a workload of another
/// identity there (an IPv4-mapped address is looked up as IPv4).
pub fn peer_owns(snap: &Snapshot, network: &str, peer: IpAddr, identity: &Identity) -> bool {
    snap.workload_by_ip(network, peer.to_canonical())
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
    let client = client.to_canonical();
    let on = proxy.cfg.original_source && netns.is_some();
    (on && usable(client) && client.is_ipv4() == target.is_ipv4() && client != target.ip())
        .then_some(client)
}

/// Whether the app's replies to `src` come back to the ztunnel in `netns`
/// (the pod's reply routing is there). A kernel that cannot say counts as
/// no.
fn replies_return(src: IpAddr, netns: Option<&Netns>) -> bool {
    mesh_core::route::delivered_locally(src, ORIG_SRC_REPLY_MARK, netns).unwrap_or(false)
}

/// Dials the app at `target` inside `netns`, from `client`'s address when
/// [`source_for`] allows it and the pod routes the replies back, else as
/// before (from the pod's own address).
pub async fn dial_app(
    proxy: &Proxy,
    client: Option<SocketAddr>,
    target: SocketAddr,
    netns: Option<&Netns>,
) -> io::Result<TcpStream> {
    let (mark, timeout) = (proxy.cfg.effective_mark(), proxy.cfg.connect_timeout);
    let src = client.and_then(|c| Some((source_for(proxy, c.ip(), target, netns)?, c.port())));
    if let (Some((ip, port)), Some(m)) = (src, mark)
        && TRANSPARENT.allowed()
    {
        if !replies_return(ip, netns) {
            TRANSPARENT.no_route(target, &proxy.metrics);
        } else {
            match socket::dial_transparent(target, ip, Some(port), m, timeout, netns).await {
                Err(e) if TRANSPARENT.refused(&e, &proxy.metrics) => {}
                r => return r,
            }
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
            // The node's probe sources, IPv4 (also mapped) and IPv6.
            "::ffff:169.254.7.127",
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
        ] {
            assert!(!usable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.1.2.3", "192.168.0.1", "fd00::5", "2001:db8::1"] {
            assert!(usable(ip.parse().unwrap()), "{ip}");
        }
    }

    /// The state with one workload at 10.1.2.3 of identity `server`.
    fn state() -> Snapshot {
        use mesh_proto::istio::workload::{self as wl, Address, address};
        let w = wl::Workload {
            uid: "uid-a".into(),
            name: "a".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 1, 2, 3]],
            service_account: "server".into(),
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        let a = Address {
            r#type: Some(address::Type::Workload(w)),
        };
        let st = mesh_core::state::ProxyState::default();
        let u = mesh_core::state::Update::from_address(&a, "cluster.local").unwrap();
        st.apply(vec![u]);
        (*st.snapshot()).clone()
    }

    #[test]
    fn a_mapped_address_is_judged_as_the_ipv4_address_it_is() {
        let snap = state();
        let other: Identity = "spiffe://cluster.local/ns/shop/sa/other".parse().unwrap();
        let owner: Identity = "spiffe://cluster.local/ns/shop/sa/server".parse().unwrap();
        for ip in ["10.1.2.3", "::ffff:10.1.2.3"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!peer_owns(&snap, "", ip, &other), "{ip}");
            assert!(peer_owns(&snap, "", ip, &owner), "{ip}");
        }
    }

    fn io(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn a_refused_transparent_dial_is_remembered_and_counted() {
        let metrics = Metrics::default();
        let t = Transparent::new();
        // Other failures are the dial's own (the app, the network).
        assert!(!t.refused(&io(libc::ECONNREFUSED), &metrics));
        assert!(t.allowed());
        for code in [libc::EPERM, libc::EACCES] {
            assert!(t.refused(&io(code), &metrics), "{code}");
            assert!(!t.allowed(), "{code}");
        }
        let n = metrics
            .original_source_fallbacks
            .get_or_create(&FallbackLabels {
                reason: FallbackReason::no_permission,
            })
            .get();
        assert_eq!(n, 2);
    }
}
