//! A ztunnel that connects gets every pod the agent holds, then
//! SnapshotSent, on which it reconciles and becomes ready. SnapshotSent
//! waits until it has acked every pod of the snapshot: a pod it refused is
//! sent again with backoff (and reported each time), so a new ztunnel of a
//! roll is never ready, and the old one never told to go, while it refuses
//! a pod. An acked pod's ports are then checked ([`super::holders`]): one
//! that fails is fenced ([`super::fenced`]), which never holds the
//! ztunnel back; unless the ztunnels fail as a whole (the newest one's
//! sockets unreadable, or none holds a port of any acked pod whose ports
//! no other process holds): then nothing is fenced and the pods stay owed,
//! the ztunnel unready ([`ztunnels_failing`]).
//!
//! Every exchange has a deadline ([`ZDS_TIMEOUT`]; the hello too): a stuck
//! ztunnel is dropped rather than holding the agent's pods from the others.
//! Only the first pass holds the agent's operations lock; the retries take
//! it one round at a time. The pods' lock is never held across an
//! exchange (the fence watch takes it when the last ztunnel goes). A
//! ztunnel that answers with its drain notice, or is lost, is forgotten
//! and its connection left to the fence watch to close.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::istio::workload::zds::{AddWorkload, SnapshotSent, workload_request::Payload};
use tokio_seqpacket::UnixSeqpacket;
use tracing::{error, info, warn};

use crate::agent::fenced::{self, FencedPods};
use crate::agent::holders::{self, HolderError, Ours};
use crate::agent::ztunnels::{Sent, ours_of, send};
use crate::agent::{Agent, AgentError, Pod, ZDS_TIMEOUT, info_of};

/// The longest wait between two rounds of re-sending refused pods.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The first wait between two rounds.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// One pod to send: its uid, its Add and its netns (taken under the pods'
/// lock, sent without it: the fence watch needs it meanwhile).
struct Owed {
    uid: String,
    add: Payload,
    fd: OwnedFd,
}

fn owed_of(p: &Pod) -> Result<Owed, AgentError> {
    let fd = p.netns.fd().try_clone_to_owned()?;
    let add = Payload::Add(AddWorkload {
        uid: p.spec.uid.clone(),
        workload_info: Some(info_of(&p.spec)),
    });
    Ok(Owed {
        uid: p.spec.uid.clone(),
        add,
        fd,
    })
}

/// What one pass over a snapshot's pods gave.
struct Pass {
    /// Acked: their ports are checked next.
    acked: Vec<String>,
    /// Refused: sent again.
    refused: BTreeSet<String>,
}

/// Sends each of `pods`; a broken connection, or the ztunnel's drain
/// notice, is an error.
async fn send_pods(sock: &UnixSeqpacket, pods: Vec<Owed>) -> Result<Pass, AgentError> {
    let mut pass = Pass {
        acked: Vec::new(),
        refused: BTreeSet::new(),
    };
    for p in pods {
        match send(sock, p.add, Some(&p.fd)).await {
            Sent::Acked => pass.acked.push(p.uid),
            Sent::Refused(m) => {
                warn!(uid = %p.uid, error = %m, "ztunnel refused a pod of its snapshot; will retry");
                pass.refused.insert(p.uid);
            }
            Sent::Broken(e) => return Err(e),
            Sent::Draining => return Err(AgentError::Draining),
        }
    }
    Ok(pass)
}

/// The check of each pod acked in a pass (the ztunnels' sockets read
/// once: `ours`).
fn check_acked(
    pods: &BTreeMap<String, Pod>,
    acked: &[String],
    dns: bool,
    ours: &Ours,
) -> Vec<(String, Result<(), HolderError>)> {
    acked
        .iter()
        .filter_map(|uid| pods.get(uid))
        .map(|p| {
            let outcome = fenced::check(&p.spec, &p.netns, dns, ours);
            (p.spec.uid.clone(), outcome)
        })
        .collect()
}

/// Why the ztunnels, not the acked pods, are failing, if they are (a
/// circuit breaker): the newest one's sockets cannot be read, or no
/// connected ztunnel holds a socket on the ports of any acked pod that
/// has no socket of another process's there. Fencing every pod for that
/// would take the node's pods down for one ztunnel's fault (an older one
/// of a roll still serves them); the ztunnel is kept unready instead. A
/// pod whose port a process of its own holds (it bound it in a gap) is
/// that pod's failure, fenced on its own: it never counts against the
/// ztunnel, or a node whose every pod is like that (one pod) would never
/// get a ready ztunnel.
fn ztunnels_failing(
    pods: &BTreeMap<String, Pod>,
    checked: &[(String, Result<(), HolderError>)],
    dns: bool,
    ours: &Ours,
) -> Option<&'static str> {
    if checked.is_empty() {
        return None;
    }
    if !ours.newest_seen {
        return Some("the newest ztunnel's sockets cannot be read (its /proc/<pid>/fd)");
    }
    let mut servable = checked
        .iter()
        .filter(|(_, o)| !matches!(o, Err(HolderError::Foreign { .. })))
        .filter_map(|(u, _)| pods.get(u))
        .peekable();
    // None left: each pod's own failure, each fenced.
    servable.peek()?;
    let any = servable.any(|p| holders::any_ztunnels(&p.netns, dns, ours));
    (!any).then_some("no connected ztunnel holds a port of any pod it acked")
}

/// Fences or lifts the fence of each acked pod by its check ([`fenced`])
/// unless the ztunnels are failing: then the acked pods stay owed (sent
/// again), nothing is fenced, and an error is logged.
fn judge_pass(
    id: u64,
    pods: &BTreeMap<String, Pod>,
    pass: Pass,
    dns: bool,
    ours: &Ours,
    fenced: &mut FencedPods,
) -> BTreeSet<String> {
    let checked = check_acked(pods, &pass.acked, dns, ours);
    if let Some(why) = ztunnels_failing(pods, &checked, dns, ours) {
        error!(
            ztunnel = id,
            why,
            "the ztunnel is failing, not its pods: kept unready (its pods sent again), nothing fenced"
        );
        let mut owed = pass.refused;
        owed.extend(pass.acked);
        return owed;
    }
    for (uid, outcome) in checked {
        if let Some(p) = pods.get(&uid) {
            fenced::judge(&p.spec, &p.netns, outcome, fenced);
        }
    }
    pass.refused
}

async fn snapshot_sent(sock: &UnixSeqpacket) -> Result<(), AgentError> {
    match send(sock, Payload::SnapshotSent(SnapshotSent {}), None).await {
        Sent::Acked => Ok(()),
        Sent::Refused(m) => Err(AgentError::Refused(m)),
        Sent::Broken(e) => Err(e),
        Sent::Draining => Err(AgentError::Draining),
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
            let owed = {
                let pods = self.pods.lock().await;
                pods.values().map(owed_of).collect::<Result<Vec<_>, _>>()?
            };
            let pass = match send_pods(&sock, owed).await {
                Ok(p) => p,
                Err(e) => {
                    // Closed once the fence watch has looked (a drain's ack).
                    self.ztunnels.retire(sock);
                    return Err(e);
                }
            };
            let ours = self.ztunnels.ours_with(Some(&admitted)).await;
            let ours = ours.unwrap_or_default();
            let pods = self.pods.lock().await;
            let mut fenced = self.fenced.lock().await;
            let pending = judge_pass(id, &pods, pass, self.cfg.dns, &ours, &mut fenced);
            drop(fenced);
            let held = pods.len();
            drop(pods);
            if pending.is_empty() {
                if let Err(e) = snapshot_sent(&sock).await {
                    self.ztunnels.retire(sock);
                    return Err(e);
                }
                info!(ztunnel = id, pods = held, "snapshot sent to the ztunnel");
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
            let mut conns = self.ztunnels.conns.lock().await;
            let Some(i) = conns.iter().position(|c| c.born.id == id) else {
                return;
            };
            let owed = {
                let pods = self.pods.lock().await;
                let c = &mut conns[i];
                // Pods released meanwhile are no longer owed.
                c.pending.retain(|uid| pods.contains_key(uid));
                c.pending
                    .iter()
                    .filter_map(|u| pods.get(u))
                    .map(owed_of)
                    .collect::<Result<Vec<_>, _>>()
            };
            let sent = match owed {
                Ok(o) if o.is_empty() => Ok(None),
                Ok(o) => send_pods(&conns[i].sock, o).await.map(Some),
                Err(e) => Err(e),
            };
            match sent {
                Ok(None) => {}
                Ok(Some(pass)) => {
                    let ours = ours_of(&conns, None).unwrap_or_default();
                    let pods = self.pods.lock().await;
                    let mut fenced = self.fenced.lock().await;
                    let owed = judge_pass(id, &pods, pass, self.cfg.dns, &ours, &mut fenced);
                    conns[i].pending = owed;
                }
                Err(e) => {
                    warn!(ztunnel = id, error = %e, "ztunnel lost or draining during its snapshot; forgotten");
                    self.ztunnels.retire(conns.remove(i).sock);
                    return;
                }
            }
            let c = &mut conns[i];
            if c.pending.is_empty() {
                match snapshot_sent(&c.sock).await {
                    Ok(()) => {
                        info!(ztunnel = id, rounds = round, "snapshot sent to the ztunnel");
                    }
                    Err(e) => {
                        warn!(ztunnel = id, error = %e, "ztunnel did not take SnapshotSent; forgotten");
                        self.ztunnels.retire(conns.remove(i).sock);
                    }
                }
                return;
            }
            warn!(ztunnel = id, round, pending = ?c.pending, "ztunnel still refuses pods of its snapshot: not ready");
        }
    }
}
