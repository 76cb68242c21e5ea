//! Bidirectional copy with half-close, byte counting and buffers that grow
//! with the flow: small for chatty connections, large for bulk. Between a
//! TCP socket and an HBONE stream ([`run_hbone`]) the bytes are not copied
//! in user space at all, and an idle connection holds no buffer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A connection's buffers start small: most connections are chatty or
/// idle, and a thousand open connections then cost a ztunnel ~2 KiB each
/// in buffers instead of 32 KiB (`just bench`, scenario 6). A bulk flow
/// fills the buffer and doubles it on each full read, reaching `MAX` in
/// eight reads.
const START: usize = 1024;
const MAX: usize = 256 * 1024;

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client -> destination.
    pub sent: AtomicU64,
    /// Destination -> client.
    pub received: AtomicU64,
}

async fn one_way<R, W>(mut r: R, mut w: W, count: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; START];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other side sees EOF, and may keep sending.
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Copies both ways until both directions have finished. An error in either
/// direction ends both (dropping the streams resets them, so a reset on one
/// side is seen on the other).
pub async fn bidirectional<A, B>(a: A, b: B, counters: Arc<Counters>) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let up = one_way(ar, bw, &counters.sent);
    let down = one_way(br, aw, &counters.received);
    tokio::try_join!(up, down).map(|_| ())
}

/// TCP -> HBONE without a copy in user space: each read lands in a fresh
/// buffer that becomes the DATA frame. The buffer is let go whenever the
/// socket is drained, so an idle connection holds none.
async fn tcp_to_h2(
    mut r: tokio::net::tcp::ReadHalf<'_>,
    mut w: mesh_core::hbone::H2Send<'_>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut want = START;
    loop {
        let buf = read_fresh(&mut r, want).await?;
        let n = buf.len();
        if n == 0 {
            return w.send_end();
        }
        w.send_bytes(buf.freeze()).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n >= want && want < MAX {
            want *= 2;
        }
    }
}

/// Waits until `r` is readable, then reads once into a fresh buffer of
/// `want` bytes (empty at end of stream). The buffer exists only once there
/// is something to read, so a connection waiting for data holds none.
async fn read_fresh(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    want: usize,
) -> std::io::Result<bytes::BytesMut> {
    use futures::FutureExt;
    loop {
        r.readable().await?;
        let mut buf = bytes::BytesMut::with_capacity(want);
        // One poll of `read_buf`, not `try_read_buf`: a short read marks
        // the socket drained, so the next wait costs no EAGAIN read.
        match r.read_buf(&mut buf).now_or_never() {
            Some(r) => return r.map(|_| buf),
            // Either the readiness was stale (the read saw EAGAIN and
            // cleared it, so `readable` waits again), or the task's
            // cooperative budget is spent: then the read declined without
            // touching the socket and woke no one, and `readable` would
            // answer at once, forever. Give the turn back first. That spin
            // once froze a 100 MiB echo through the mesh in CI.
            None => tokio::task::coop::consume_budget().await,
        }
    }
}

/// HBONE -> TCP: received DATA is written as it came, with no buffer of
/// our own; its window is given back once the socket took it.
async fn h2_to_tcp(
    mut r: mesh_core::hbone::H2Recv<'_>,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    while let Some(data) = r.recv_bytes().await? {
        w.write_all(&data).await?;
        r.release(data.len());
        count.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    w.shutdown().await
}

/// Which end of a proxied connection the TCP socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpSide {
    /// The client (outbound: the app that connected).
    Client,
    /// The destination (inbound: the app dialed for the tunnel).
    Destination,
}

/// [`run`] for a TCP socket and an HBONE stream, with the copy-free loops
/// above. After an error both sides are reset, so each far end sees one.
pub async fn run_hbone(
    cancel: &tokio_util::sync::CancellationToken,
    tcp: &mut tokio::net::TcpStream,
    stream: &mut mesh_core::hbone::H2Stream,
    side: TcpSide,
    counters: Arc<Counters>,
) -> Result<(), (mesh_core::metrics::ResponseFlags, String)> {
    use mesh_core::metrics::ResponseFlags;
    let (tcp_in, tcp_out) = match side {
        TcpSide::Client => (&counters.sent, &counters.received),
        TcpSide::Destination => (&counters.received, &counters.sent),
    };
    let (r, mut w) = tcp.split();
    let (send, recv) = stream.split();
    let copy =
        async { tokio::try_join!(tcp_to_h2(r, send, tcp_in), h2_to_tcp(recv, &mut w, tcp_out)) };
    let result = tokio::select! {
        r = copy => r.map(|_| ()).map_err(|e| (ResponseFlags::None, e.to_string())),
        _ = cancel.cancelled() => Err((ResponseFlags::None, "closed by the proxy".to_string())),
    };
    if result.is_err() {
        stream.reset();
        mesh_core::socket::reset(tcp);
    }
    result
}

/// Copies until done or cancelled (policy revocation, drain deadline). The
/// streams are borrowed so the caller can reset its TCP side after an error.
pub async fn run<A, B>(
    cancel: &tokio_util::sync::CancellationToken,
    a: &mut A,
    b: &mut B,
    counters: Arc<Counters>,
) -> Result<(), (mesh_core::metrics::ResponseFlags, String)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use mesh_core::metrics::ResponseFlags;
    tokio::select! {
        r = bidirectional(a, b, counters) => r.map_err(|e| (ResponseFlags::None, e.to_string())),
        _ = cancel.cancelled() => Err((ResponseFlags::None, "closed by the proxy".to_string())),
    }
}

/// [`run`] for two TCP sockets: each split into halves that need no lock
/// between them. After an error both sockets are reset, so each far end
/// sees one.
pub async fn run_tcp(
    cancel: &tokio_util::sync::CancellationToken,
    a: &mut tokio::net::TcpStream,
    b: &mut tokio::net::TcpStream,
    counters: Arc<Counters>,
) -> Result<(), (mesh_core::metrics::ResponseFlags, String)> {
    use mesh_core::metrics::ResponseFlags;
    let result = {
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        let copy = async {
            tokio::try_join!(
                one_way(ar, bw, &counters.sent),
                one_way(br, aw, &counters.received)
            )
        };
        tokio::select! {
            r = copy => r.map(|_| ()).map_err(|e| (ResponseFlags::None, e.to_string())),
            _ = cancel.cancelled() => Err((ResponseFlags::None, "closed by the proxy".to_string())),
        }
    };
    if result.is_err() {
        mesh_core::socket::reset(a);
        mesh_core::socket::reset(b);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A read attempted when the task's cooperative budget is spent must
    /// give the turn back, not spin: `readable` does not count against the
    /// budget, and the read declines without registering a waker.
    #[test]
    fn a_read_with_the_budget_spent_yields_instead_of_spinning() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // On a thread of its own: the bug this guards against never returns.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let got = rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let mut client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
                let (mut server, _) = listener.accept().await?;
                client.write_all(b"hello").await?;
                let (mut r, _w) = server.split();
                r.readable().await?;
                let read = read_fresh(&mut r, 64);
                tokio::pin!(read);
                let mut first = true;
                std::future::poll_fn(|cx| {
                    // Spend the budget in the poll that reads, as a busy
                    // connection task's other streams do.
                    while std::mem::take(&mut first) && tokio::task::coop::has_budget_remaining() {
                        let spend = tokio::task::coop::consume_budget();
                        tokio::pin!(spend);
                        let _ = spend.poll(cx);
                        first = true;
                    }
                    read.as_mut().poll(cx)
                })
                .await
            });
            let _ = done_tx.send(got.map(|b| b.to_vec()));
        });
        let got = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the read spun instead of yielding when the budget was spent");
        assert_eq!(got.expect("read"), b"hello");
    }
}
