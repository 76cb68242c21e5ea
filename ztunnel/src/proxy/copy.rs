//! Bidirectional copy with half-close, byte counting and buffers that grow
//! with the flow: small for chatty connections, large for bulk.

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

/// Copies until done or cancelled (policy revocation, drain deadline). The
/// streams are borrowed so the caller can reset its TCP side after an error.
pub async fn run<A, B>(
    cancel: &tokio_util::sync::CancellationToken,
    a: &mut A,
    b: &mut B,
    counters: Arc<Counters>,
) -> Result<(), (crate::metrics::ResponseFlags, String)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use crate::metrics::ResponseFlags;
    tokio::select! {
        r = bidirectional(a, b, counters) => r.map_err(|e| (ResponseFlags::None, e.to_string())),
        _ = cancel.cancelled() => Err((ResponseFlags::None, "closed by the proxy".to_string())),
    }
}
