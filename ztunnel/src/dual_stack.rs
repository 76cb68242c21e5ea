//! Both address families in a captured pod. Each of a pod's listeners is
//! opened once per family: an IPv4 socket and an IPv6-only one (never one
//! dual-stack socket, whose IPv4 peers would appear as v4-mapped IPv6
//! addresses that match no workload). A kernel without IPv6 serves IPv4
//! alone; the pod then has no IPv6 to capture.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tracing::debug;

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
