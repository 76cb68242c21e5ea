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
//!   address, as its ztunnel dials from inside it), and only when the
//!   state gives that address to a workload of exactly the authenticated
//!   identity: an address of another identity, or one the state does not
//!   know (a node's, a masqueraded source, a VM's, a pod address just
//!   reused), gives the app the pod's own address;
//! - plaintext (15006): the TCP peer, what the app would have seen
//!   without the mesh;
//! - the same-node fast path: the client pod's address of the target's
//!   family, the one policy judged (`decide::authorize_local`; the
//!   outbound listener already checked the client's socket is that pod's).
//!
//! Loopback, link-local, unspecified and multicast addresses, the node's
//! probe sources, an address of the other family, and one equal to the
//! app's own fall back to today's dial (an IPv4-mapped IPv6 address is
//! read as the IPv4 address it is first). So does a pod whose reply
//! routing is missing (asked of its kernel before each such dial: its
//! node agent could not install it, or is older; the question has 100 ms
//! to be answered, and an error asking it counts as missing), a dial
//! whose transparent socket fails for its source (see
//! [`Transparent::judge`]), and, for the rest of the proxy's life, a
//! ztunnel that may not make transparent sockets (no CAP_NET_ADMIN). Each
//! is counted in `ztunnel_original_source_fallbacks` and logged, once a
//! minute per pod at most (the permission once).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::warn;

use super::Proxy;
use mesh_core::config::{ORIG_SRC_REPLY_MARK, PROBE_SOURCE_V4, PROBE_SOURCE_V6};
use mesh_core::identity::Identity;
use mesh_core::metrics::{FallbackLabels, FallbackReason, Metrics};
use mesh_core::netns::Netns;
use mesh_core::socket::{self, TransparentError};
use mesh_core::state::Snapshot;

/// How often one pod's fallback is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// How many pods' last log times are kept (then forgotten at once).
const LOGGED_MAX: usize = 4096;

/// Whether transparent dials are still tried (one per proxy).
pub struct Transparent {
    /// Set when `IP_TRANSPARENT` was refused for want of permission: it
    /// will be again.
    refused: AtomicBool,
    /// When each pod's (app address's) fallback was last logged.
    logged: Mutex<HashMap<IpAddr, Instant>>,
}

/// What follows a failed transparent dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Dial again from the pod's own address: the failure was the
    /// transparent socket's, not the app's answer.
    Plain,
    /// The app's (or the network's) answer: it stands.
    Fail,
}

impl Transparent {
    pub fn new() -> Self {
        Transparent {
            refused: AtomicBool::new(false),
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to try a transparent dial at all.
    pub fn allowed(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Judges a transparent dial's failure. Only `IP_TRANSPARENT` itself
    /// refused for want of permission (EPERM, EACCES) stops transparent
    /// dials for this proxy (logged once, counted `no_permission`). The
    /// socket's other steps failing (the pod's netns, the mark, the bind:
    /// EADDRINUSE, EADDRNOTAVAIL), and a connect that fails at once for
    /// the source (EADDRINUSE, EADDRNOTAVAIL: no port free for the
    /// 4-tuple; EPERM, EACCES: a rule refused the packet) fall back to a
    /// plain dial for this connection (counted `dial_failed`). Any other
    /// connect failure (ECONNREFUSED, a timeout, unreachable) is the app's
    /// answer and stands.
    pub fn judge(&self, target: SocketAddr, e: &TransparentError, metrics: &Metrics) -> After {
        use TransparentError as T;
        let denied = |e: &io::Error| e.kind() == io::ErrorKind::PermissionDenied;
        match e {
            T::Transparent(io) if denied(io) => {
                fallback(metrics, FallbackReason::no_permission);
                if !self.refused.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot dial apps from their clients' addresses (CAP_NET_ADMIN?); from now on they see the pod's own address");
                }
                return After::Plain;
            }
            T::Connect(io) => {
                let at_once = [
                    libc::EADDRINUSE,
                    libc::EADDRNOTAVAIL,
                    libc::EPERM,
                    libc::EACCES,
                ];
                if !io.raw_os_error().is_some_and(|c| at_once.contains(&c)) {
                    return After::Fail;
                }
            }
            _ => {}
        }
        fallback(metrics, FallbackReason::dial_failed);
        self.log(target, &format!("transparent dial failed: {e}"));
        After::Plain
    }

    /// Logs a pod's fallback, at most once per [`LOG_EVERY`] per pod.
    fn log(&self, target: SocketAddr, why: &str) {
        let Ok(mut logged) = self.logged.lock() else {
            return;
        };
        let now = Instant::now();
        let last = logged.get(&target.ip());
        if last.is_some_and(|t| now.duration_since(*t) < LOG_EVERY) {
            return;
        }
        if logged.len() >= LOGGED_MAX {
            logged.clear();
        }
        logged.insert(target.ip(), now);
        warn!(%target, why, "dialing the app from its pod's own address, not the client's (logged once a minute per pod)");
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
/// the app see `peer`: only when the state gives that address to a
/// workload of exactly that identity (an IPv4-mapped address is looked up
/// as IPv4). An address the state does not know (a node's, a masqueraded
/// source, a VM's, a pod address just reused) is not used.
pub fn peer_owns(snap: &Snapshot, network: &str, peer: IpAddr, identity: &Identity) -> bool {
    snap.workload_by_ip(network, peer.to_canonical())
        .is_some_and(|w| w.identity == *identity)
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
    choose(proxy.cfg.original_source, netns.is_some(), client, target)
}

/// [`source_for`]: `on`, original source is switched on; `in_pod`, the
/// dial is made inside the app's pod.
fn choose(on: bool, in_pod: bool, client: IpAddr, target: SocketAddr) -> Option<IpAddr> {
    let client = client.to_canonical();
    (on && in_pod
        && usable(client)
        && client.is_ipv4() == target.is_ipv4()
        && client != target.ip())
    .then_some(client)
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
    let t = &proxy.transparent;
    let src = client.and_then(|c| source_for(proxy, c.ip(), target, netns));
    if let (Some(ip), Some(m)) = (src, mark)
        && t.allowed()
    {
        // Whether the app's replies to `ip` come back to the ztunnel (the
        // pod's reply routing is there).
        match mesh_core::route::delivered_locally(ip, ORIG_SRC_REPLY_MARK, netns) {
            Ok(true) => match socket::dial_transparent(target, ip, m, timeout, netns).await {
                Ok(s) => return Ok(s),
                Err(e) if t.judge(target, &e, &proxy.metrics) == After::Fail => {
                    return Err(e.into());
                }
                Err(_) => {}
            },
            Ok(false) => {
                fallback(&proxy.metrics, FallbackReason::no_reply_route);
                t.log(
                    target,
                    "the pod has no reply routing (see its node agent's log)",
                );
            }
            Err(e) => {
                fallback(&proxy.metrics, FallbackReason::route_check_failed);
                t.log(target, &format!("asking the pod's routing failed: {e}"));
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

    /// An address the state does not know (a node's, a masqueraded one, a
    /// VM's, a pod's just given up) is not the peer's to claim: the app
    /// sees the pod's own address.
    #[test]
    fn an_address_the_state_does_not_know_is_not_used() {
        let snap = state();
        let owner: Identity = "spiffe://cluster.local/ns/shop/sa/server".parse().unwrap();
        for ip in ["10.1.2.4", "192.168.0.1", "::ffff:10.9.9.9", "fd00::5"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!peer_owns(&snap, "", ip, &owner), "{ip}");
        }
    }

    #[test]
    fn the_source_is_the_clients_only_when_it_can_be() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let app = sa("10.1.2.3:8080");
        // On, in a pod: the client.
        assert_eq!(
            choose(true, true, ip("10.9.9.9"), app),
            Some(ip("10.9.9.9"))
        );
        // A v4-mapped client toward an IPv4 app: as IPv4.
        assert_eq!(
            choose(true, true, ip("::ffff:10.9.9.9"), app),
            Some(ip("10.9.9.9"))
        );
        // The other family, the app's own address, switched off, no
        // netns (not node mode), an unusable address: the pod's own.
        assert_eq!(choose(true, true, ip("fd00::9"), app), None);
        assert_eq!(choose(true, true, ip("10.9.9.9"), sa("[fd00::1]:80")), None);
        assert_eq!(choose(true, true, ip("10.1.2.3"), app), None);
        assert_eq!(choose(false, true, ip("10.9.9.9"), app), None);
        assert_eq!(choose(true, false, ip("10.9.9.9"), app), None);
        assert_eq!(choose(true, true, ip("127.0.0.1"), app), None);
    }

    fn io(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    fn count(metrics: &Metrics, reason: FallbackReason) -> i64 {
        metrics
            .original_source_fallbacks
            .get_or_create(&FallbackLabels { reason })
            .get() as i64
    }

    /// Only IP_TRANSPARENT refused stops transparent dials (per proxy,
    /// never for another instance); a permission error of another step
    /// falls back for that connection only, and the app's own answer
    /// stands.
    #[test]
    fn only_a_refused_ip_transparent_is_remembered() {
        use TransparentError as T;
        let metrics = Metrics::default();
        let app: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let t = Transparent::new();
        let bind = |code| T::Bind {
            src: "10.9.9.9".parse().unwrap(),
            source: io(code),
        };
        for (e, after) in [
            (T::Connect(io(libc::EPERM)), After::Plain),
            (T::Connect(io(libc::EACCES)), After::Plain),
            (T::Connect(io(libc::EADDRNOTAVAIL)), After::Plain),
            (T::Connect(io(libc::EADDRINUSE)), After::Plain),
            (T::Connect(io(libc::ECONNREFUSED)), After::Fail),
            (T::Connect(io(libc::ETIMEDOUT)), After::Fail),
            (T::Connect(io(libc::EHOSTUNREACH)), After::Fail),
            (T::Socket(io(libc::EPERM)), After::Plain),
            (T::Mark(io(libc::EPERM)), After::Plain),
            (bind(libc::EPERM), After::Plain),
            (bind(libc::EADDRINUSE), After::Plain),
            (bind(libc::EADDRNOTAVAIL), After::Plain),
        ] {
            assert_eq!(t.judge(app, &e, &metrics), after, "{e:?}");
            assert!(t.allowed(), "{e:?}");
        }
        assert_eq!(count(&metrics, FallbackReason::dial_failed), 9);
        assert_eq!(count(&metrics, FallbackReason::no_permission), 0);
        for code in [libc::EPERM, libc::EACCES] {
            let e = T::Transparent(io(code));
            assert_eq!(t.judge(app, &e, &metrics), After::Plain);
            assert!(!t.allowed(), "{code}");
        }
        assert_eq!(count(&metrics, FallbackReason::no_permission), 2);
        // Another proxy's latch is its own.
        assert!(Transparent::new().allowed());
    }
}
