//! A drain's notice to the node agent. A draining ztunnel closes its pods'
//! listeners; while it is still connected the agent would count it as
//! serving them, and a process of a pod could bind a freed port and take
//! its connections. So before closing them it tells the agent (a refusal
//! sent outside any request, which the agent reads as this ztunnel gone)
//! and waits for the agent's ack: the agent closes the connection, having
//! first fenced every pod when no other ztunnel is connected. A request
//! that crossed the notice takes it as its answer (a draining ztunnel
//! refuses); later ones are not answered. No agent connected, or none
//! answering in time: the listeners close all the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use mesh_core::zds::{self, ZdsError};

/// The notice's state, shared by the shutdown and the ZDS session.
pub(super) struct Notice {
    asked: CancellationToken,
    acked: CancellationToken,
    /// ZDS sessions connected now (0 or 1).
    sessions: Arc<AtomicUsize>,
}

impl Default for Notice {
    fn default() -> Self {
        Notice {
            asked: CancellationToken::new(),
            acked: CancellationToken::new(),
            sessions: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// A connected session, counted until dropped.
pub(super) struct Connected(Arc<AtomicUsize>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Notice {
    pub(super) fn asked(&self) -> bool {
        self.asked.is_cancelled()
    }

    /// Cancelled once the drain is asked for.
    pub(super) fn token(&self) -> CancellationToken {
        self.asked.clone()
    }

    pub(super) fn connected(&self) -> Connected {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        Connected(self.sessions.clone())
    }

    /// Asks the session to announce the drain; waits for the agent's ack.
    pub(super) async fn ask(&self, wait: Duration) {
        self.asked.cancel();
        if self.sessions.load(Ordering::SeqCst) == 0 {
            info!("draining with no node agent connected: nothing to announce");
            return;
        }
        match tokio::time::timeout(wait, self.acked.cancelled()).await {
            Ok(_) => info!("the node agent acked the drain"),
            Err(_) => warn!(?wait, "the node agent did not ack the drain in time"),
        }
    }

    /// Sends the notice on `sock`, then waits until the agent closes it.
    pub(super) async fn announce(&self, sock: &zds::Socket) -> Result<(), ZdsError> {
        let sent = zds::send_ack(sock, Some(zds::DRAINING.into())).await;
        if sent.is_ok() {
            info!("drain announced to the node agent");
            // Requests that crossed it go unanswered; the end of the
            // connection is the ack.
            while !matches!(
                zds::recv_request(sock).await,
                Err(ZdsError::Closed | ZdsError::Io(_))
            ) {}
        }
        self.acked.cancel();
        sent
    }
}
