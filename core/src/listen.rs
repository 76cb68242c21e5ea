//! Accepting connections until the drain: one loop for every listener of
//! every proxy.

use std::future::Future;
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
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => handle(tcp, peer),
            Err(e) => accept_error(&e).await,
        }
    }
}

/// Out of descriptors (or similar): back off rather than spin.
pub async fn accept_error(e: &std::io::Error) {
    tracing::warn!(error = %e, "accept failed; backing off");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
