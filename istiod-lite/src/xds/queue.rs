//! A connection's responses waiting for its proxy to read them, bounded by
//! count (16) and by bytes: a queued response pins what it carries
//! (resources the model may since have replaced, names the proxy stated),
//! so a proxy that stops reading pins at most [`MAX_QUEUED_BYTES`]. A push
//! that cannot queue for [`PUSH_STALL`] ends the stream
//! (RESOURCE_EXHAUSTED) and drops what was queued for it.

use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, timeout_at};

use super::wire::Response;

/// Responses queued per connection, at most.
pub const MAX_QUEUED: usize = 16;

/// Bytes of responses queued per connection, at most (one response larger
/// than this is queued alone).
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// How long a push may wait for room in its queue before its stream is
/// ended (the proxy has stopped reading).
pub const PUSH_STALL: Duration = Duration::from_secs(30);

/// The budget is counted in KiB (a semaphore takes at most u32 permits).
const KIB: usize = 1024;

/// A queued response and its share of the byte bound, held until it has
/// been encoded.
pub struct Queued {
    pub response: Response,
    pub permit: OwnedSemaphorePermit,
}

/// Why a response was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the proxy has taken none of its responses for {0:?}")]
    Stalled(Duration),
    #[error("the proxy's stream is gone")]
    Gone,
}

/// The connection's side: queues responses.
pub struct QueueTx {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    /// Weak: once the response body is gone, so is the receiver, and a
    /// push fails at once ([`QueueError::Gone`]).
    rx: Weak<Mutex<mpsc::Receiver<Queued>>>,
    stall: Duration,
}

/// The response body's side: takes them. Shared, so that the connection
/// can drop what is queued for a proxy that stopped reading.
#[derive(Clone)]
pub struct QueueRx(Arc<Mutex<mpsc::Receiver<Queued>>>);

/// A queue whose pushes wait at most `stall` for room.
pub fn queue(stall: Duration) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(MAX_QUEUED);
    let rx = QueueRx(Arc::new(Mutex::new(rx)));
    let tx = QueueTx {
        tx,
        bytes: Arc::new(Semaphore::new(MAX_QUEUED_BYTES / KIB)),
        rx: Arc::downgrade(&rx.0),
        stall,
    };
    (tx, rx)
}

/// What a queued response pins: its encoding (the resources it shares,
/// which the model may have replaced since), and its lists.
fn weight(r: &Response) -> usize {
    r.encoded_len() + 8 * r.resources.len() + 16 * r.removed.len()
}

impl QueueTx {
    /// Queues `response`, waiting up to the stall deadline for room.
    pub async fn send(&self, response: Response) -> Result<(), QueueError> {
        let deadline = Instant::now() + self.stall;
        let kib = weight(&response)
            .div_ceil(KIB)
            .clamp(1, MAX_QUEUED_BYTES / KIB);
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        let permit = timeout_at(deadline, self.bytes.clone().acquire_many_owned(kib))
            .await
            .map_err(|_| QueueError::Stalled(self.stall))?
            .map_err(|_| QueueError::Gone)?;
        timeout_at(deadline, self.tx.send(Queued { response, permit }))
            .await
            .map_err(|_| QueueError::Stalled(self.stall))?
            .map_err(|_| QueueError::Gone)
    }

    /// Drops every queued response (the stream is ended).
    pub fn drain(&self) {
        if let Some(rx) = self.rx.upgrade() {
            let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            while rx.try_recv().is_ok() {}
        }
    }

    /// Bytes queued now (KiB granularity).
    pub fn queued_bytes(&self) -> usize {
        MAX_QUEUED_BYTES - self.bytes.available_permits() * KIB
    }
}

impl QueueRx {
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Queued>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::XdsResource;

    fn response(bytes: usize) -> Response {
        Response {
            type_url: "t".into(),
            nonce: "n".into(),
            resources: vec![Arc::new(XdsResource::new(
                "type.googleapis.com/x.Y",
                "ns/r".into(),
                &vec![7u8; bytes],
                1,
            ))],
            ..Default::default()
        }
    }

    async fn take(rx: &QueueRx) -> Option<Queued> {
        std::future::poll_fn(|cx| rx.poll_recv(cx)).await
    }

    /// Queued responses are bounded by bytes, not only by count: past
    /// the bound a push waits, and one that waits too long fails.
    #[tokio::test]
    async fn a_queue_is_bounded_by_bytes_and_a_stalled_push_fails() {
        let (tx, rx) = queue(Duration::from_millis(300));
        let big = MAX_QUEUED_BYTES / 3;
        for _ in 0..3 {
            tx.send(response(big - 4096)).await.expect("room");
        }
        assert!(tx.queued_bytes() <= MAX_QUEUED_BYTES);
        let stalled = tx.send(response(big)).await;
        assert_eq!(
            stalled,
            Err(QueueError::Stalled(Duration::from_millis(300)))
        );
        // Room once the proxy reads (the permit goes with the encoding).
        drop(take(&rx).await.expect("queued"));
        tx.send(response(big - 4096)).await.expect("room again");
        // One response over the bound is queued alone.
        drop(take(&rx).await);
        drop(take(&rx).await);
        drop(take(&rx).await);
        assert_eq!(tx.queued_bytes(), 0);
        tx.send(response(MAX_QUEUED_BYTES + 1))
            .await
            .expect("alone");
        // Draining frees it.
        tx.drain();
        assert_eq!(tx.queued_bytes(), 0);
    }
}
