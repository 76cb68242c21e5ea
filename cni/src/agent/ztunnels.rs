//! The ztunnels connected to the agent. Usually one; two while the
//! DaemonSet rolls (the new one connects, takes the snapshot and binds
//! every pod's listeners beside the old one's, then the old one drains and
//! disconnects). At most [`MAX_ZTUNNELS`] at once: a third connection is
//! refused.
//!
//! Every request goes to each of them, so a pod added or released during
//! the overlap reaches both; the answer that counts is the newest
//! ztunnel's: the one whose process started last (its peer credentials,
//! then `/proc/<pid>/stat`), the connection order only when that is not
//! known. A draining ztunnel acks a pod it only holds (it serves nothing
//! new), and one that reconnects while draining (the agent restarted
//! mid-roll) is the newest connection but not the newest ztunnel: its ack
//! must never be what installs a pod's rules. A refusal by the newest one
//! is retried with backoff, then reported as the answer.
//!
//! A ztunnel that disconnected is forgotten at the next request or the
//! next periodic look ([`Ztunnels::try_prune`]).

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::istio::workload::zds::workload_request::Payload;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_seqpacket::UnixSeqpacket;
use tracing::{info, warn};

use crate::agent::holders::Ours;
use crate::agent::{AgentError, ZDS_TIMEOUT};
use mesh_core::zds;

/// The most ztunnels connected at once: the running one and the new one of
/// a roll (the DaemonSet's maxSurge is 1).
pub(crate) const MAX_ZTUNNELS: usize = 2;

/// Waits between tries of a request the newest ztunnel refused.
pub(crate) const RETRY_BACKOFF: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(900),
];

/// A ztunnel's age: the start time of its process (clock ticks since boot,
/// when the agent can see the process), then the order of connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Born {
    pub(crate) started: Option<u64>,
    pub(crate) id: u64,
}

/// The start time of the process at the other end of `sock`, from the
/// agent's /proc (the node's, with hostPID); None when not visible.
fn peer_started(sock: &UnixSeqpacket) -> Option<u64> {
    let pid = peer_pid(sock)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    start_time(&stat)
}

/// The pid of the process at the other end of `sock` (its peer
/// credentials, in the agent's pid namespace: the node's, with hostPID).
pub(crate) fn peer_pid(sock: &UnixSeqpacket) -> Option<i32> {
    sock.peer_cred().ok()?.pid()
}

/// Field 22 of a `/proc/<pid>/stat` line (the fields after the command,
/// which is in parentheses and may hold spaces).
pub(crate) fn start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One connected ztunnel.
pub(crate) struct Conn {
    pub(crate) born: Born,
    /// Its process, when the agent can see it: whose sockets may hold a
    /// pod's ports ([`crate::agent::holders`]).
    pub(crate) pid: Option<i32>,
    pub(crate) sock: UnixSeqpacket,
    /// Pods of its snapshot it has not acked yet: it is sent SnapshotSent
    /// (and so becomes ready) only once this is empty.
    pub(crate) pending: BTreeSet<String>,
    /// Its slot of the [`MAX_ZTUNNELS`].
    _slot: OwnedSemaphorePermit,
}

pub(crate) struct Ztunnels {
    /// Held across a whole exchange: one request at a time per connection,
    /// and never a look for hang-ups during one.
    pub(crate) conns: Mutex<Vec<Conn>>,
    next: std::sync::atomic::AtomicU64,
    slots: Arc<Semaphore>,
    /// The connections of ztunnels forgotten (gone, or draining: a
    /// notice read as a hang-up), kept open until the fence watch has
    /// fenced the pods if none other is connected: closing one is a
    /// draining ztunnel's ack.
    retired: std::sync::Mutex<Vec<UnixSeqpacket>>,
    /// How many times the fence watch fenced every pod for a gap.
    gaps: std::sync::atomic::AtomicU64,
    /// How many ztunnels joined.
    joined: std::sync::atomic::AtomicU64,
}

impl Default for Ztunnels {
    fn default() -> Self {
        Ztunnels {
            conns: Mutex::new(Vec::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(MAX_ZTUNNELS)),
            retired: std::sync::Mutex::new(Vec::new()),
            gaps: Default::default(),
            joined: Default::default(),
        }
    }
}

/// A connection let in: its slot and its age.
pub(crate) struct Admitted {
    pub(crate) born: Born,
    pub(crate) pid: Option<i32>,
    slot: OwnedSemaphorePermit,
}

/// What one request to one ztunnel gave.
pub(crate) enum Sent {
    Acked,
    Refused(String),
    /// Lost or no answer in time: the connection is unusable.
    Broken(AgentError),
    /// Its drain notice ([`zds::DRAINING`]), whether sent between
    /// requests or crossing this one: it serves nothing new, and its
    /// connection is retired (closed once the fence watch has fenced its
    /// pods if none other is connected).
    Draining,
}

/// Sends one request and waits for its ack, at most [`ZDS_TIMEOUT`].
pub(crate) async fn send(sock: &UnixSeqpacket, payload: Payload, fd: Option<&OwnedFd>) -> Sent {
    match tokio::time::timeout(ZDS_TIMEOUT, zds::request(sock, payload, fd)).await {
        Ok(Ok(())) => Sent::Acked,
        Ok(Err(zds::ZdsError::Protocol(m))) => Sent::Refused(m),
        Ok(Err(zds::ZdsError::Draining)) => Sent::Draining,
        Ok(Err(e)) => Sent::Broken(AgentError::Lost(e)),
        Err(_) => Sent::Broken(AgentError::Timeout(ZDS_TIMEOUT)),
    }
}

impl Ztunnels {
    /// Lets a new connection in when a slot is free (after forgetting the
    /// ztunnels gone); None: refused.
    pub(crate) async fn admit(&self, sock: &UnixSeqpacket) -> Option<Admitted> {
        self.prune().await;
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Admitted {
            born: Born {
                started: peer_started(sock),
                id,
            },
            pid: peer_pid(sock),
            slot,
        })
    }

    /// Takes a ztunnel that has had the snapshot (`pending`: the pods it
    /// has not acked yet).
    pub(crate) async fn join(&self, a: Admitted, sock: UnixSeqpacket, pending: BTreeSet<String>) {
        let mut conns = self.conns.lock().await;
        self.joined
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        conns.push(Conn {
            born: a.born,
            pid: a.pid,
            sock,
            pending,
            _slot: a.slot,
        });
        info!(ztunnel = a.born.id, started = ?a.born.started, connected = conns.len(), "ztunnel joined");
    }

    /// The connected ztunnels' sockets (those gone forgotten first; a pid
    /// that is no longer the process that connected counts for nothing),
    /// with `joining` (a ztunnel in its snapshot, not joined yet) added;
    /// None when there is none.
    pub(crate) async fn ours_with(&self, joining: Option<&Admitted>) -> Option<Ours> {
        let mut conns = self.conns.lock().await;
        forget_gone(&mut conns, &self.retired);
        ours_of(&conns, joining)
    }

    /// The connected ztunnels' sockets; None when none is connected.
    pub(crate) async fn ours(&self) -> Option<Ours> {
        self.ours_with(None).await
    }

    /// How many are connected (after forgetting those gone).
    pub(crate) async fn count(&self) -> usize {
        let mut conns = self.conns.lock().await;
        forget_gone(&mut conns, &self.retired);
        conns.len()
    }

    /// The pods each ztunnel still has to ack before its SnapshotSent (the
    /// ztunnels not ready for want of them), by connection number.
    pub(crate) async fn pending(&self) -> std::collections::BTreeMap<u64, Vec<String>> {
        let conns = self.conns.lock().await;
        conns
            .iter()
            .filter(|c| !c.pending.is_empty())
            .map(|c| (c.born.id, c.pending.iter().cloned().collect()))
            .collect()
    }

    /// How many times every pod was fenced for a gap: an add that sees it
    /// change while it captures a pod fences that pod too (the gap's
    /// round may have missed it).
    pub(crate) fn gaps(&self) -> u64 {
        self.gaps.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A gap: counted before its round takes the pods.
    pub(crate) fn gap(&self) {
        self.gaps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many ztunnels joined.
    pub(crate) fn joined(&self) -> u64 {
        self.joined.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Takes the retired connections: closing them (dropped) is a
    /// draining ztunnel's ack.
    pub(crate) fn take_retired(&self) -> Vec<UnixSeqpacket> {
        std::mem::take(&mut *self.retired.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Keeps a connection forgotten (lost, or its ztunnel draining) open
    /// until the fence watch has looked whether any other is connected.
    pub(crate) fn retire(&self, sock: UnixSeqpacket) {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sock);
    }

    pub(crate) async fn prune(&self) {
        forget_gone(&mut *self.conns.lock().await, &self.retired);
    }

    /// Forgets the ztunnels that disconnected, unless a request holds the
    /// connections (it forgets them itself): never waits on a ztunnel.
    pub(crate) fn try_prune(&self) {
        if let Ok(mut conns) = self.conns.try_lock() {
            forget_gone(&mut conns, &self.retired);
        }
    }

    /// Sends one request to every connected ztunnel, each waiting for its
    /// ack; the newest one's answer is returned (its refusal retried with
    /// [`RETRY_BACKOFF`] first), the others' refusals are logged. A
    /// ztunnel that is lost or does not answer in time is dropped (a late
    /// ack would pair with the wrong request).
    pub(crate) async fn request(
        &self,
        payload: Payload,
        netns: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), AgentError> {
        let mut conns = self.conns.lock().await;
        forget_gone(&mut conns, &self.retired);
        let newest = conns
            .iter()
            .map(|c| c.born)
            .max()
            .ok_or(AgentError::NotConnected)?;
        let fd: Option<OwnedFd> = netns.map(|n| n.try_clone_to_owned()).transpose()?;
        let mut answer = Err(AgentError::NotConnected);
        let mut lost = Vec::new();
        let mut draining = Vec::new();
        for c in conns.iter() {
            let mut sent = send(&c.sock, payload.clone(), fd.as_ref()).await;
            if c.born == newest {
                for (n, wait) in RETRY_BACKOFF.iter().enumerate() {
                    let Sent::Refused(m) = &sent else { break };
                    warn!(ztunnel = c.born.id, attempt = n + 1, error = %m, "the newest ztunnel refused the request; retrying");
                    tokio::time::sleep(*wait).await;
                    sent = send(&c.sock, payload.clone(), fd.as_ref()).await;
                }
            }
            let result = match sent {
                Sent::Acked => Ok(()),
                Sent::Refused(m) => Err(AgentError::Refused(m)),
                Sent::Broken(e) => {
                    lost.push(c.born);
                    Err(e)
                }
                Sent::Draining => {
                    draining.push(c.born);
                    Err(AgentError::Draining)
                }
            };
            if c.born == newest {
                if let Err(e) = &result {
                    warn!(ztunnel = c.born.id, error = %e, "the newest ztunnel did not take the request");
                }
                answer = result;
            } else if let Err(e) = result {
                warn!(ztunnel = c.born.id, error = %e, "an older ztunnel did not take the request");
            }
        }
        let (gone, kept): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|c| lost.contains(&c.born) || draining.contains(&c.born));
        *conns = kept;
        for c in gone {
            let why = match lost.contains(&c.born) {
                true => "ztunnel lost; forgotten",
                false => "ztunnel draining; forgotten",
            };
            warn!(ztunnel = c.born.id, connected = conns.len(), "{why}");
            self.retire(c.sock);
        }
        answer
    }
}

/// `pid`, while it is still the process that started at `started` (a pid
/// reused by another process, or one whose start is unknown, is not).
pub(crate) fn live_pid(pid: Option<i32>, started: Option<u64>) -> Option<i32> {
    let (pid, started) = (pid?, started?);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    (start_time(&stat)? == started).then_some(pid)
}

/// The sockets of `conns` and `joining`, the newest ztunnel's apart (by
/// [`Born`]); None when there is none.
pub(crate) fn ours_of(conns: &[Conn], joining: Option<&Admitted>) -> Option<Ours> {
    let mut all: Vec<(Born, Option<i32>)> = conns
        .iter()
        .map(|c| (c.born, live_pid(c.pid, c.born.started)))
        .chain(joining.map(|a| (a.born, live_pid(a.pid, a.born.started))))
        .collect();
    let newest = *all.iter().max_by_key(|(b, _)| *b)?;
    all.retain(|(b, _)| *b != newest.0);
    let pids: Vec<i32> = all.iter().filter_map(|(_, p)| *p).collect();
    Some(Ours::read(&pids, newest.1))
}

/// Forgets the connections whose ztunnel hung up or announced its drain
/// (anything to read outside a request); their sockets go to `retired`.
fn forget_gone(conns: &mut Vec<Conn>, retired: &std::sync::Mutex<Vec<UnixSeqpacket>>) {
    let mut i = 0;
    while i < conns.len() {
        if !zds::hung_up(&conns[i].sock) {
            i += 1;
            continue;
        }
        let c = conns.remove(i);
        info!(
            ztunnel = c.born.id,
            "ztunnel disconnected or draining; forgotten"
        );
        retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c.sock);
    }
}

#[cfg(test)]
mod tests;
