//! Sockets: upstream dials with the proxy's mark and the source's address,
//! and the original destination of a redirected connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// Dials `addr`, from `bind_ip` when given (so the destination sees the
/// workload's address), with `mark` on the socket (so redirect rules skip the
/// proxy's own traffic).
pub async fn dial(
    addr: SocketAddr,
    bind_ip: Option<IpAddr>,
    mark: Option<u32>,
    timeout: Duration,
    netns: Option<&crate::netns::Netns>,
) -> io::Result<TcpStream> {
    let new = || {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    // In node mode the socket is made inside the workload's pod.
    let sock = match netns {
        Some(ns) => ns.run(new)??,
        None => new()?,
    };
    if let Some(m) = mark {
        SockRef::from(&sock).set_mark(m)?;
    }
    // Never a source the kernel picks in place of the workload's: a bind
    // of the other family fails the dial.
    if let Some(ip) = bind_ip {
        if ip.is_ipv4() != addr.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source {ip} is not of the family of {addr}: no address to dial it from"),
            ));
        }
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The destination a redirect rule rewrote (SO_ORIGINAL_DST).
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(s);
    let local = s.local_addr()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    orig.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Closes with RST rather than FIN, so a reset upstream is seen as a reset.
pub fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// TCP keepalive on accepted sockets, so a peer whose node vanished is
/// noticed even when no HTTP/2 PING is outstanding.
pub fn keepalive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = SockRef::from(s).set_tcp_keepalive(&ka);
}

/// How much of a TLS socket is read at once. rustls asks for 4 KiB per
/// read, so a bulk flow cost a `read` syscall (and a readiness round) per
/// 4 KiB; reading ahead into this buffer takes one per 64 KiB.
pub const TLS_READ_AHEAD: usize = 64 * 1024;

/// The socket under a TLS session: reads ahead, writes straight through.
pub type TlsIo = tokio::io::BufReader<TcpStream>;

/// Wraps an HBONE socket for TLS (see [`TLS_READ_AHEAD`]).
pub fn tls_io(tcp: TcpStream) -> TlsIo {
    tokio::io::BufReader::with_capacity(TLS_READ_AHEAD, tcp)
}
