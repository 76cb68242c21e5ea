//! Both address families in a captured pod. Each of a pod's listeners is
//! opened once per family, at the addresses the redirects land on: an
//! IPv4 socket and an IPv6-only one (never one dual-stack socket, whose
//! IPv4 peers would appear as v4-mapped IPv6 addresses that match no
//! workload). A kernel without IPv6, or a pod without an IPv6 loopback,
//! is served over IPv4 alone; the pod then has no IPv6 to capture.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tracing::debug;

use crate::config::DNS_PORT;

/// Where a pod's outbound listener on `port` binds: each family's
/// loopback, where the output chain's REDIRECT lands (IPv4, then IPv6).
pub fn loopbacks(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}

/// The outcome of binding `addr`: an IPv6 loopback listener the kernel
/// cannot make (no IPv6 in it, or none on the pod's loopback, so nothing
/// is redirected there either) is left out; any other failure stays one,
/// an address of the pod's own included.
pub fn bound(addr: SocketAddr, r: io::Result<SocketAddr>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if is_missing_v6_loopback(addr, &e) => {
            debug!(%addr, "no IPv6 loopback in the pod: IPv4 listener only");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn is_missing_v6_loopback(addr: SocketAddr, e: &io::Error) -> bool {
    addr.ip() == Ipv6Addr::LOCALHOST
        && matches!(
            e.raw_os_error(),
            Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
        )
}

/// The DNS proxy's sockets in a pod (run inside its netns): UDP and TCP on
/// `127.0.0.1:15053` and, where the pod has IPv6, on `[::1]:15053`, where
/// the redirect of a query to an IPv6 nameserver lands. Loopback, where an
/// output-chain REDIRECT lands: a wildcard-bound UDP socket would answer
/// from the pod's address, which the NAT entry does not expect. Of
/// SO_REUSEPORT sets, as the TCP listeners, so the next ztunnel of a roll
/// binds beside them.
pub fn dns_sockets() -> io::Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>> {
    let pair = |addr: SocketAddr| -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
        let u = mesh_core::listen::shared_udp(addr)?;
        let t = mesh_core::listen::shared_tcp(addr)?;
        Ok((u, t))
    };
    let mut out = vec![pair(SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)))?];
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PORT));
    match pair(v6) {
        Ok(p) => out.push(p),
        // No IPv6 in the kernel, or none on the pod's loopback.
        Err(e) if is_missing_v6_loopback(v6, &e) => {
            debug!(%v6, "no IPv6 loopback: DNS over IPv4 only");
        }
        Err(e) => return Err(e),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_ipv6_loopback_is_forgiven() {
        let [v4, v6] = loopbacks(15001);
        assert!(v4.ip().is_loopback() && v6.ip() == Ipv6Addr::LOCALHOST && v6.port() == 15001);
        let err = |n| io::Error::from_raw_os_error(n);
        assert!(bound(v6, Err(err(libc::EAFNOSUPPORT))).is_ok());
        assert!(bound(v6, Err(err(libc::EADDRNOTAVAIL))).is_ok());
        assert!(bound(v4, Err(err(libc::EAFNOSUPPORT))).is_err());
        assert!(bound(v6, Err(err(libc::EADDRINUSE))).is_err());
        // A pod's own IPv6 address is never left out.
        let own = SocketAddr::from(("fd00::5".parse::<Ipv6Addr>().unwrap(), 15006));
        assert!(bound(own, Err(err(libc::EADDRNOTAVAIL))).is_err());
        assert!(bound(own, Err(err(libc::EAFNOSUPPORT))).is_err());
    }
}
