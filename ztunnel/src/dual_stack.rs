//! Both address families in a captured pod. Each of a pod's listeners is
//! opened once per family: an IPv4 socket and an IPv6-only one (never one
//! dual-stack socket, whose IPv4 peers would appear as v4-mapped IPv6
//! addresses that match no workload). A kernel without IPv6 serves IPv4
//! alone; the pod then has no IPv6 to capture.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tracing::debug;

use crate::config::DNS_PORT;

/// The wildcard addresses a pod listener on `port` binds: IPv4, then IPv6.
pub fn wildcards(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

/// The outcome of binding `addr`: an IPv6 listener the kernel cannot make
/// at all (no IPv6 in it) is left out; any other failure stays one.
pub fn bound(addr: SocketAddr, r: io::Result<SocketAddr>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            debug!(%addr, "no IPv6 in this kernel: IPv4 listener only");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The DNS proxy's sockets in a pod (run inside its netns): UDP and TCP on
/// `127.0.0.1:15053` and, where the pod has IPv6, on `[::1]:15053`, where
/// the redirect of a query to an IPv6 nameserver lands. Loopback, where an
/// output-chain REDIRECT lands: a wildcard-bound UDP socket would answer
/// from the pod's address, which the NAT entry does not expect.
pub fn dns_sockets() -> io::Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>> {
    let pair = |addr: SocketAddr| -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
        let u = std::net::UdpSocket::bind(addr)?;
        u.set_nonblocking(true)?;
        let t = std::net::TcpListener::bind(addr)?;
        t.set_nonblocking(true)?;
        Ok((u, t))
    };
    let mut out = vec![pair(SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PORT)))?];
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PORT));
    match pair(v6) {
        Ok(p) => out.push(p),
        // No IPv6 in the kernel, or none on the pod's loopback.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
            ) =>
        {
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
    fn only_a_missing_ipv6_is_forgiven() {
        let [v4, v6] = wildcards(15001);
        assert!(v4.is_ipv4() && v6.is_ipv6() && v6.port() == 15001);
        let no_af = || io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert!(bound(v6, Err(no_af())).is_ok());
        assert!(bound(v4, Err(no_af())).is_err());
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(bound(v6, Err(in_use)).is_err());
    }
}
