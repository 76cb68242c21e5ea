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
    // Never SO_REUSEADDR on UDP: two such sockets share a port whatever
    // their owners (the last bound takes every datagram), where a
    // SO_REUSEPORT set admits only sockets of the same effective uid. On
    // TCP it only lets a listener bind over TIME_WAIT: a listening port
    // still conflicts with any socket outside its SO_REUSEPORT set.
    if ty == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// In a forked child that becomes uid/gid 65534 (only async-signal-safe
    /// calls between fork and `_exit`), binds (and for a stream, listens
    /// at) `addr` with the options given. Ok(()) when the bind succeeded.
    fn bind_as_nobody(
        addr: std::net::SocketAddrV4,
        ty: libc::c_int,
        reuse_addr: bool,
        reuse_port: bool,
    ) -> Result<(), i32> {
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the child runs only async-signal-safe calls and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain system calls on values built before the fork.
            unsafe {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    libc::_exit(100);
                }
                let fd = libc::socket(libc::AF_INET, ty, 0);
                let one: libc::c_int = 1;
                let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                let opt = &one as *const libc::c_int as *const libc::c_void;
                if reuse_addr {
                    libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, opt, len);
                }
                if reuse_port {
                    libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, opt, len);
                }
                let sl = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                let p = &sa as *const libc::sockaddr_in as *const libc::sockaddr;
                if libc::bind(fd, p, sl) != 0 {
                    libc::_exit(1);
                }
                if ty == libc::SOCK_STREAM && libc::listen(fd, 8) != 0 {
                    libc::_exit(2);
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child died: {status}");
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            100 => panic!("the child could not become uid 65534 (not root?)"),
            c => Err(c),
        }
    }

    fn v4(a: SocketAddr) -> std::net::SocketAddrV4 {
        match a {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => panic!("not IPv4: {a}"),
        }
    }

    /// A captured pod's process under another uid can neither bind beside
    /// the DNS socket (for UDP, two SO_REUSEADDR sockets would share the
    /// port and the last bound take every datagram) nor beside a TCP
    /// listener, whatever options it sets.
    #[test]
    fn another_uid_cannot_bind_beside_the_shared_sockets() {
        let udp = shared_udp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("udp");
        let tcp = shared_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("tcp");
        let (u, t) = (
            v4(udp.local_addr().expect("addr")),
            v4(tcp.local_addr().expect("addr")),
        );
        for (ra, rp) in [(true, false), (false, true), (true, true)] {
            assert!(
                bind_as_nobody(u, libc::SOCK_DGRAM, ra, rp).is_err(),
                "uid 65534 bound the UDP port (SO_REUSEADDR {ra}, SO_REUSEPORT {rp})"
            );
            assert!(
                bind_as_nobody(t, libc::SOCK_STREAM, ra, rp).is_err(),
                "uid 65534 listened on the TCP port (SO_REUSEADDR {ra}, SO_REUSEPORT {rp})"
            );
        }
    }

    /// Connections the kernel completed into a listener's backlog before
    /// the drain are handed over when the loop stops, not reset by the
    /// listener's close.
    #[tokio::test]
    async fn connections_queued_at_the_stop_are_served() {
        let n = 16;
        let std_l = shared_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("listener");
        let addr = std_l.local_addr().expect("addr");
        let listener = TcpListener::from_std(std_l).expect("tokio listener");
        let clients: Vec<std::net::TcpStream> = (0..n)
            .map(|_| std::net::TcpStream::connect(addr).expect("queued"))
            .collect();
        let mut served = Vec::new();
        // Stopped before it ever accepts: all it serves is the queue.
        accept_until(&listener, std::future::ready(()), |s, _| served.push(s)).await;
        assert_eq!(served.len(), n, "queued connections lost at the stop");
        drop(clients);
    }
}
