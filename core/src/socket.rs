//! Sockets: upstream dials with the proxy's mark and the source's address
//! (transparently, from a client's address, for the inbound side), and the
//! original destination of a redirected connection.

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
    let sock = socket_for(addr, netns)?;
    if let Some(m) = mark {
        SockRef::from(&sock).set_mark(m)?;
    }
    if let Some(ip) = bind_ip
        && ip.is_ipv4() == addr.is_ipv4()
    {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    connect(sock, addr, timeout).await
}

/// A TCP socket of `addr`'s family, made inside `netns` when given (in
/// node mode, the workload's pod).
fn socket_for(addr: SocketAddr, netns: Option<&crate::netns::Netns>) -> io::Result<TcpSocket> {
    let new = || {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    match netns {
        Some(ns) => ns.run(new)?,
        None => new(),
    }
}

/// Connects `sock` to `addr` within `timeout`, without Nagle.
async fn connect(sock: TcpSocket, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
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

/// Dials `addr` from `src`, an address that need not be this host's (or
/// this pod's): a transparent socket (IP_TRANSPARENT, which needs
/// CAP_NET_ADMIN) bound to `src` on a port the kernel picks, other than
/// `avoid_port` (the client's own, whose tuple the pod's connection
/// tracking may already hold), carrying `mark`. The replies reach this
/// socket only where routing sends packets for `src` back to it (the
/// pod's rules do, for connections of the proxy's mark).
pub async fn dial_transparent(
    addr: SocketAddr,
    src: IpAddr,
    avoid_port: Option<u16>,
    mark: u32,
    timeout: Duration,
    netns: Option<&crate::netns::Netns>,
) -> io::Result<TcpStream> {
    if src.is_ipv4() != addr.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {src} and destination {addr} differ in family"),
        ));
    }
    // A second try when the kernel hands out exactly the port to avoid.
    for _ in 0..2 {
        let sock = socket_for(addr, netns)?;
        {
            let r = SockRef::from(&sock);
            if src.is_ipv4() {
                r.set_ip_transparent_v4(true)?;
            } else {
                r.set_ip_transparent_v6(true)?;
            }
            r.set_mark(mark)?;
        }
        sock.bind(SocketAddr::new(src, 0))?;
        if Some(sock.local_addr()?.port()) == avoid_port {
            continue;
        }
        return connect(sock, addr, timeout).await;
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no source port from {src} other than the client's"),
    ))
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
