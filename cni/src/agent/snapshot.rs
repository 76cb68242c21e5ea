//! A ztunnel that connects gets every pod the agent holds, then
//! SnapshotSent, on which it reconciles and becomes ready. SnapshotSent
//! waits until it has acked every pod of the snapshot: a pod it refused is
//! sent again with backoff (and reported each time), so a new ztunnel of a
//! roll is never ready, and the old one never told to go, while a pod has
//! no listeners in it.
//!
//! Every exchange has a deadline ([`ZDS_TIMEOUT`]; the hello too): a stuck
//! ztunnel is dropped rather than holding the agent's pods from the others.
//! Only the first pass holds the agent's operations lock; the retries take
//! it one round at a time.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::istio::workload::zds::{AddWorkload, SnapshotSent, workload_request::Payload};
use tokio_seqpacket::UnixSeqpacket;
use tracing::{info, warn};

use crate::agent::holders;
use crate::agent::ztunnels::{Sent, peer_pid, send};
use crate::agent::{Agent, AgentError, Pod, ZDS_TIMEOUT, info_of};

/// The longest wait between two rounds of re-sending refused pods.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The first wait between two rounds.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

fn add_of(p: &Pod) -> Result<(Payload, OwnedFd), AgentError> {
    let fd = p.netns.fd().try_clone_to_owned()?;
    let add = Payload::Add(AddWorkload {
        uid: p.spec.uid.clone(),
        workload_info: Some(info_of(&p.spec)),
    });
    Ok((add, fd))
}

/// Sends each of `pods` (all but those not held any more); the uids it
/// refused are returned, a broken connection is an error. An ack counts
/// only once the pod's ports are seen held by the connected ztunnels
/// (`pids`: the new one's and the older ones'), never by a process of the
/// pod's ([`holders`]).
async fn send_pods<'a>(
    sock: &UnixSeqpacket,
    pods: impl Iterator<Item = &'a Pod>,
    dns: bool,
    pids: &[i32],
) -> Result<BTreeSet<String>, AgentError> {
    let mut refused = BTreeSet::new();
    for p in pods {
        let (add, fd) = add_of(p)?;
        let sent = match send(sock, add, Some(&fd)).await {
            Sent::Acked => match holders::check(&p.netns, dns, pids) {
                Ok(()) => Sent::Acked,
                Err(e) => Sent::Refused(format!("acked, but {e}")),
            },
            other => other,
        };
        match sent {
            Sent::Acked => {}
            Sent::Refused(m) => {
                warn!(uid = %p.spec.uid, error = %m, "ztunnel refused a pod of its snapshot; will retry");
                refused.insert(p.spec.uid.clone());
            }
            Sent::Broken(e) => return Err(e),
        }
    }
    Ok(refused)
}

async fn snapshot_sent(sock: &UnixSeqpacket) -> Result<(), AgentError> {
    match send(sock, Payload::SnapshotSent(SnapshotSent {}), None).await {
        Sent::Acked => Ok(()),
        Sent::Refused(m) => Err(AgentError::Refused(m)),
        Sent::Broken(e) => Err(e),
    }
}

impl Agent {
    /// Serves one ztunnel connection: the snapshot, then the retries of
    /// what it refused.
    pub(crate) async fn snapshot(self: Arc<Self>, sock: UnixSeqpacket) -> Result<(), AgentError> {
        let Some(admitted) = self.ztunnels.admit(&sock).await else {
            warn!(
                max = crate::agent::ztunnels::MAX_ZTUNNELS,
                "a ZDS connection beyond the ztunnels allowed; refused"
            );
            return Ok(());
        };
        match tokio::time::timeout(ZDS_TIMEOUT, mesh_core::zds::recv_hello(&sock)).await {
            Ok(r) => r.map_err(AgentError::Lost)?,
            Err(_) => return Err(AgentError::Timeout(ZDS_TIMEOUT)),
        };
        let id = admitted.born.id;
        {
            let _op = self.ops.lock().await;
            let pods = self.pods.lock().await;
            let mut pids = self.ztunnels.pids().await;
            pids.extend(peer_pid(&sock));
            let pending = send_pods(&sock, pods.values(), self.cfg.dns, &pids).await?;
            if pending.is_empty() {
                snapshot_sent(&sock).await?;
                info!(
                    ztunnel = id,
                    pods = pods.len(),
                    "snapshot sent to the ztunnel"
                );
            }
            let complete = pending.is_empty();
            self.ztunnels.join(admitted, sock, pending).await;
            if complete {
                return Ok(());
            }
        }
        self.retry_pending(id).await;
        Ok(())
    }

    /// Re-sends the pods ztunnel `id` refused, with backoff, until it has
    /// them all (then SnapshotSent) or it is gone.
    async fn retry_pending(&self, id: u64) {
        let mut wait = FIRST_BACKOFF;
        for round in 1.. {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
            let _op = self.ops.lock().await;
            let pods = self.pods.lock().await;
            let mut conns = self.ztunnels.conns.lock().await;
            let Some(i) = conns.iter().position(|c| c.born.id == id) else {
                return;
            };
            let pids: Vec<i32> = conns.iter().filter_map(|c| c.pid).collect();
            let c = &mut conns[i];
            // Pods released meanwhile are no longer owed.
            c.pending.retain(|uid| pods.contains_key(uid));
            if !c.pending.is_empty() {
                let owed = c.pending.iter().filter_map(|u| pods.get(u));
                match send_pods(&c.sock, owed, self.cfg.dns, &pids).await {
                    Ok(refused) => c.pending = refused,
                    Err(e) => {
                        warn!(ztunnel = id, error = %e, "ztunnel lost during its snapshot; forgotten");
                        conns.remove(i);
                        return;
                    }
                }
            }
            if c.pending.is_empty() {
                match snapshot_sent(&c.sock).await {
                    Ok(()) => {
                        info!(
                            ztunnel = id,
                            pods = pods.len(),
                            rounds = round,
                            "snapshot sent to the ztunnel"
                        );
                    }
                    Err(e) => {
                        warn!(ztunnel = id, error = %e, "ztunnel did not take SnapshotSent; forgotten");
                        conns.remove(i);
                    }
                }
                return;
            }
            warn!(ztunnel = id, round, pending = ?c.pending, "ztunnel still refuses pods of its snapshot: not ready");
        }
    }
}
