//! A stream's requests, read by a task of its own and handed one at a
//! time to the stream's connection task.
//!
//! The reader reads a request only once the last one has been taken, so
//! nothing more is buffered while the connection task is busy (handling a
//! request, or pushing to a proxy that reads slowly): no header is read,
//! so nothing is taken from the budget, and HTTP/2 flow control holds the
//! proxy back. Once a header is read, the reader polls its body until it
//! has arrived, so its deadline runs in wall time from the header and no
//! caller can stretch it. A request over [`SMALL`] keeps its bytes taken
//! from the budget ([`Charge`]) until the connection task takes it; if the
//! task has not within [`allowance`] of its arrival, the stream is cut
//! (RESOURCE_EXHAUSTED) and the bytes given back. A small request may come
//! in one chunk with a large one's header, which takes the large one's
//! bytes ([`Unread`]): the reader then waits for the small one to be taken
//! no longer than the large one's allowance either, and when it reads on,
//! the large one's deadline starts again (its body was held back by flow
//! control meanwhile, not by the proxy). So a request's bytes stay taken
//! for at most three allowances (the wait behind the small one, its body's
//! restarted deadline, the wait to be taken) when one small request came
//! with its header; each further small request in that chunk, taken just
//! before its limit, adds one more allowance (a proxy that packs many small
//! requests before a large header and reads its pushes slowly can hold the
//! large one's bytes that long, within its node's share).

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::{Status, Streaming};
use tracing::warn;

use super::budget::{SMALL, Unread, allowance};
use super::request::Limits;

/// A decoded request's bytes, given back to the budget (and its caller's
/// share) when dropped.
pub(super) struct Charge {
    limits: Limits,
    size: usize,
}

impl Charge {
    pub(super) fn new(limits: Limits, size: usize) -> Charge {
        Charge { limits, size }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.limits.decoded(self.size);
    }
}

/// A decoded request, with its bytes still taken.
pub(super) struct Charged {
    pub(super) req: DeltaDiscoveryRequest,
    pub(super) charge: Charge,
}

/// Why the reader ended the stream, once it has; pending forever after a
/// clean end (the proxy closed its side).
pub(super) struct Cut(Option<oneshot::Receiver<Status>>);

impl Cut {
    pub(super) async fn wait(&mut self) -> Status {
        if let Some(rx) = &mut self.0 {
            let got = rx.await;
            self.0 = None;
            if let Ok(why) = got {
                return why;
            }
        }
        std::future::pending().await
    }
}

/// The connection task's end of the reader.
pub(super) struct Incoming {
    rx: mpsc::Receiver<Charged>,
    task: Option<JoinHandle<()>>,
}

impl Incoming {
    /// Starts reading `stream`; the reader's requests, and why it cut
    /// the stream if it does.
    pub(super) fn spawn(stream: Streaming<Charged>, unread: Arc<Unread>) -> (Incoming, Cut) {
        let (tx, rx) = mpsc::channel(1);
        let (cut_tx, cut_rx) = oneshot::channel();
        let task = tokio::spawn(read(stream, unread, tx, cut_tx));
        let incoming = Incoming {
            rx,
            task: Some(task),
        };
        (incoming, Cut(Some(cut_rx)))
    }

    /// The next request, its bytes given back as it is taken; None once
    /// the reader has ended (see [`Cut`] for why).
    pub(super) async fn next(&mut self) -> Option<DeltaDiscoveryRequest> {
        let Charged { req, charge } = self.rx.recv().await?;
        drop(charge);
        Some(req)
    }

    /// Ends the reader and waits until it is gone, its stream (and what
    /// its request body holds of the budget and its caller's share)
    /// dropped: done before a stream's slot is given back, so a new
    /// stream never finds its caller's share forgotten while an old one
    /// still holds part of it.
    pub(super) async fn stop(mut self) {
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn read(
    mut stream: Streaming<Charged>,
    unread: Arc<Unread>,
    tx: mpsc::Sender<Charged>,
    cut: oneshot::Sender<Status>,
) {
    loop {
        // Nothing is read while the last request waits to be taken.
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let msg = tokio::select! {
            m = stream.message() => m,
            () = tx.closed() => return,
        };
        let charged = match msg {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                let _ = cut.send(e);
                return;
            }
        };
        let size = charged.charge.size;
        permit.send(charged);
        // What stays taken while this one waits: itself if charged, and
        // any message whose header came with it (read, not yet decoded).
        let later = unread.bytes();
        let held = if size > SMALL { size } else { 0 }.max(later);
        if held == 0 {
            continue;
        }
        let bound = allowance(held);
        match tokio::time::timeout(bound, tx.reserve()).await {
            Ok(Ok(_taken)) => {
                if later > 0 {
                    // The next message's body was held back by flow
                    // control while this wait lasted: its deadline starts
                    // again now that it is read.
                    unread.resume();
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                let now = std::time::Instant::now();
                if let Some(left_out) =
                    crate::metrics::log_limit().admit("xds request not taken", now)
                {
                    warn!(
                        bytes = held,
                        left_out,
                        "xDS stream cut: its request was not taken in time \
                    (the controller was held up pushing to a proxy that reads slowly)"
                    );
                }
                let _ = cut.send(too_slow(held, bound));
                return;
            }
        }
    }
}

fn too_slow(size: usize, bound: Duration) -> Status {
    Status::resource_exhausted(format!(
        "a request of {size} bytes waited {bound:?} for the controller, held up pushing \
         responses this proxy did not read: read faster, or reconnect stating what you hold"
    ))
}
