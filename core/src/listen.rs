//! Accepting connections until the drain: one loop for every listener of
//! every proxy; and the sockets of SO_REUSEPORT sets that a second process
//! can bind beside (a captured pod's listeners, during a ztunnel roll).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Accepts on `listener` until `stop` completes, handing each connection
/// to `handle`. A failed accept (out of descriptors, or similar) backs off
/// rather than spins.
pub async fn accept_until<S, F>(listener: &TcpListener, stop: S, mut handle: F)
where
    S: Future<Output = ()>,
    F: FnMut(TcpStream, SocketAddr),
{
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return take_queued(listener, &mut handle),
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => handle(tcp, peer),
            Err(e) => accept_error(&e).await,
        }
    }
}

/// Hands over what the kernel has already queued on `listener`: closing it
/// would reset those connections (unless `net.ipv4.tcp_migrate_req` moves
/// them to another listener of its SO_REUSEPORT set). Asked of the socket
/// itself, not of the runtime's readiness, which may not know of them yet.
fn take_queued<F>(listener: &TcpListener, handle: &mut F)
where
    F: FnMut(TcpStream, SocketAddr),
{
    let sock = socket2::SockRef::from(listener);
    // The listener is non-blocking: WouldBlock once the queue is empty.
    while let Ok((s, peer)) = sock.accept() {
        let tcp = std::net::TcpStream::from(s);
        let tcp = tcp
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(tcp));
        match (tcp, peer.as_socket()) {
            (Ok(tcp), Some(peer)) => handle(tcp, peer),
            (Err(e), _) => tracing::warn!(error = %e, "a queued connection is lost"),
            (Ok(_), None) => {}
        }
    }
}

/// A non-blocking TCP listener at `addr`, one of a SO_REUSEPORT set (all
/// of whose sockets must have the option, and one effective uid).
pub fn shared_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = reuse_port_socket(addr, socket2::Type::STREAM)?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking UDP socket at `addr`, one of a SO_REUSEPORT set.
pub fn shared_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    Ok(reuse_port_socket(addr, socket2::Type::DGRAM)?.into())
}

fn reuse_port_socket(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Out of descriptors (or similar): back off rather than spin.
pub async fn accept_error(e: &std::io::Error) {
    tracing::warn!(error = %e, "accept failed; backing off");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
