//! The ztunnels connected to the agent. Usually one; two while the
//! DaemonSet rolls (the new one connects, takes the snapshot and binds
//! every pod's listeners beside the old one's, then the old one drains and
//! disconnects). Every request goes to each of them, so a pod added or
//! released during the overlap reaches both; the newest one's answer is
//! the answer. A ztunnel that disconnected is forgotten at the next request
//! or the next periodic look ([`Ztunnels::prune`]).

use std::os::fd::OwnedFd;

use mesh_proto::istio::workload::zds::workload_request::Payload;
use tokio::sync::Mutex;
use tokio_seqpacket::UnixSeqpacket;
use tracing::{info, warn};

use crate::agent::{AgentError, ZDS_TIMEOUT};
use mesh_core::zds;

/// One connected ztunnel.
struct Conn {
    /// Numbered in order of connection: the highest is the newest.
    id: u64,
    sock: UnixSeqpacket,
}

#[derive(Default)]
pub(crate) struct Ztunnels {
    /// Oldest first. Held across a whole exchange: one request at a time
    /// per connection, and never a look for hang-ups during one.
    conns: Mutex<Vec<Conn>>,
    next: std::sync::atomic::AtomicU64,
}

impl Ztunnels {
    /// Takes a ztunnel that has had the snapshot.
    pub(crate) async fn join(&self, sock: UnixSeqpacket) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut conns = self.conns.lock().await;
        conns.push(Conn { id, sock });
        info!(ztunnel = id, connected = conns.len(), "ztunnel joined");
    }

    /// How many are connected (after forgetting those gone).
    pub(crate) async fn count(&self) -> usize {
        let mut conns = self.conns.lock().await;
        forget_gone(&mut conns);
        conns.len()
    }

    /// Forgets the ztunnels that disconnected.
    pub(crate) async fn prune(&self) {
        forget_gone(&mut *self.conns.lock().await);
    }

    /// Sends one request to every connected ztunnel, each waiting for its
    /// ack; the newest one's answer is returned, the others' refusals are
    /// logged. A ztunnel that is lost or does not answer in time is
    /// dropped (a late ack would pair with the wrong request).
    pub(crate) async fn request(
        &self,
        payload: Payload,
        netns: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), AgentError> {
        let mut conns = self.conns.lock().await;
        forget_gone(&mut conns);
        if conns.is_empty() {
            return Err(AgentError::NotConnected);
        }
        let mut answers = Vec::new();
        let mut lost = Vec::new();
        for c in conns.iter() {
            let fd: Option<OwnedFd> = netns.map(|n| n.try_clone_to_owned()).transpose()?;
            let sent = zds::request(&c.sock, payload.clone(), fd.as_ref());
            let result = match tokio::time::timeout(ZDS_TIMEOUT, sent).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(zds::ZdsError::Protocol(m))) => Err(AgentError::Refused(m)),
                Ok(Err(e)) => {
                    lost.push(c.id);
                    Err(AgentError::Lost(e))
                }
                Err(_) => {
                    lost.push(c.id);
                    Err(AgentError::Timeout(ZDS_TIMEOUT))
                }
            };
            answers.push((c.id, result));
        }
        // The newest one's answer; the older ones' failures are logged.
        let (_, answer) = answers.pop().unwrap_or((0, Err(AgentError::NotConnected)));
        for (id, r) in answers {
            if let Err(e) = r {
                warn!(ztunnel = id, error = %e, "an older ztunnel did not take the request");
            }
        }
        conns.retain(|c| !lost.contains(&c.id));
        for id in lost {
            warn!(
                ztunnel = id,
                connected = conns.len(),
                "ztunnel lost; forgotten"
            );
        }
        answer
    }
}

/// Drops the connections whose ztunnel hung up.
fn forget_gone(conns: &mut Vec<Conn>) {
    conns.retain(|c| {
        let gone = zds::hung_up(&c.sock);
        if gone {
            info!(ztunnel = c.id, "ztunnel disconnected; forgotten");
        }
        !gone
    });
}
