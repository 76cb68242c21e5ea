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

/// Why a transparent dial failed, by the step that failed: the caller
/// judges each differently (only a refused `IP_TRANSPARENT` says the
/// process may never make one).
#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("source {src} and destination {dst} differ in family")]
    Family { src: IpAddr, dst: SocketAddr },
    #[error("making a socket in the pod: {0}")]
    Socket(io::Error),
    #[error("IP_TRANSPARENT: {0}")]
    Transparent(io::Error),
    #[error("setting the mark: {0}")]
    Mark(io::Error),
    #[error("binding {src}: {source}")]
    Bind { src: IpAddr, source: io::Error },
    #[error("{0}")]
    Connect(io::Error),
}

impl From<TransparentError> for io::Error {
    fn from(e: TransparentError) -> io::Error {
        match e {
            TransparentError::Connect(e) => e,
            e => io::Error::other(e),
        }
    }
}

/// Dials `addr` from `src`, an address that need not be this host's (or
/// this pod's): a transparent socket (IP_TRANSPARENT, which needs
/// CAP_NET_ADMIN) bound to `src`, carrying `mark`. The port is chosen at
/// connect (IP_BIND_ADDRESS_NO_PORT), by the whole 4-tuple, so many dials
/// from one client address to different apps share ports as the client's
/// own would. The replies reach this socket only where routing sends
/// packets for `src` back to it (the pod's rules do, for connections of
/// the proxy's mark).
pub async fn dial_transparent(
    addr: SocketAddr,
    src: IpAddr,
    mark: u32,
    timeout: Duration,
    netns: Option<&crate::netns::Netns>,
) -> Result<TcpStream, TransparentError> {
    if src.is_ipv4() != addr.is_ipv4() {
        return Err(TransparentError::Family { src, dst: addr });
    }
    let sock = socket_for(addr, netns).map_err(TransparentError::Socket)?;
    {
        let r = SockRef::from(&sock);
        if src.is_ipv4() {
            r.set_ip_transparent_v4(true)
        } else {
            r.set_ip_transparent_v6(true)
        }
        .map_err(TransparentError::Transparent)?;
        r.set_mark(mark).map_err(TransparentError::Mark)?;
    }
    let bind = |source| TransparentError::Bind { src, source };
    bind_no_port(&sock).map_err(bind)?;
    sock.bind(SocketAddr::new(src, 0)).map_err(bind)?;
    connect(sock, addr, timeout)
        .await
        .map_err(TransparentError::Connect)
}

/// IP_BIND_ADDRESS_NO_PORT: a bind to port 0 leaves the port to connect.
fn bind_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket; the value is a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

/// How much a TLS session encrypts per write before it writes its socket.
/// rustls stops at 64 KiB, so a bulk flow cost one `writev` per 64 KiB, and
/// each of those ended in a short TCP segment of its own after the full
/// ones: more packets through the nodes' netfilter and bridge, paid by the
/// sender. At 256 KiB a DATA frame (one read from the app, at most 256 KiB)
/// goes out in one `writev` of up to 16 full 16 KiB records when the socket
/// keeps up (a full frame's 9-byte header spills into a second write).
/// rustls keeps the ciphertext until the socket takes it, so holding the
/// whole limit is normal for a bulk flow the network holds back, and for a
/// connection whose peer stops reading: up to 256 KiB (plus 22 bytes a
/// record) per connection, against 64 KiB with rustls's default.
pub const TLS_WRITE_BATCH: usize = 256 * 1024;

/// Lets an HBONE TLS session encrypt [`TLS_WRITE_BATCH`] per write.
pub fn tls_write_batch<D>(tls: &mut rustls::ConnectionCommon<D>) {
    tls.set_buffer_limit(Some(TLS_WRITE_BATCH));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The value of IP_BIND_ADDRESS_NO_PORT on `s`.
    fn no_port(s: &TcpStream) -> i32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and a c_int-sized buffer.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    /// Moves every TLS byte `from` has queued into `to`.
    fn pump<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut wire = &wire[..];
        while !wire.is_empty() {
            to.read_tls(&mut wire).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// After its handshake, a TLS session set up for HBONE takes a whole
    /// batch of plaintext in one write (rustls alone stops at 64 KiB).
    #[test]
    fn an_established_tls_session_takes_a_whole_batch_per_write() {
        use std::io::Write;
        let issued = rcgen::generate_simple_self_signed(vec!["peer.example".to_string()]).unwrap();
        let cert = issued.cert.der().clone();
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(issued.signing_key.serialize_der()).unwrap();
        let server_cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("peer.example").unwrap();
        let mut client =
            rustls::ClientConnection::new(std::sync::Arc::new(client_cfg), name).unwrap();
        let mut server = rustls::ServerConnection::new(std::sync::Arc::new(server_cfg)).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        pump(&mut client, &mut server);
        assert!(!client.wants_write());

        tls_write_batch(&mut client);
        let data = vec![7u8; 2 * TLS_WRITE_BATCH];
        assert_eq!(client.writer().write(&data).unwrap(), TLS_WRITE_BATCH);
    }

    /// A transparent dial binds its source without a port: the kernel
    /// picks the port at connect, by the 4-tuple.
    #[tokio::test]
    async fn a_transparent_dial_leaves_the_port_to_connect() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let s = match dial_transparent(to, src, 0, Duration::from_secs(2), None).await {
            // Not root: nothing to check here.
            Err(TransparentError::Transparent(e))
                if e.kind() == io::ErrorKind::PermissionDenied =>
            {
                return;
            }
            r => r.unwrap(),
        };
        assert_eq!(s.local_addr().unwrap().ip(), src);
        assert_eq!(no_port(&s), 1);
    }
}
