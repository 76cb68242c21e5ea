//! Live connections: what the admin view lists, what a policy change
//! re-checks, and what a drain waits for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::copy::Counters;
use mesh_core::identity::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPlaintext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "HBONE")]
    Hbone,
    #[serde(rename = "TCP")]
    Tcp,
    /// Between two workloads of this ztunnel, handed over in memory (see
    /// `same_node_fast_path`).
    #[serde(rename = "LOCAL")]
    Local,
}

/// Why the proxy itself closed a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Policy now denies it (or its workload is gone).
    Denied(String),
    /// Still open when the drain deadline passed.
    Drained,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Denied(r) => f.write_str(r),
            CloseReason::Drained => f.write_str("drain deadline passed"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ConnInfo {
    pub direction: Direction,
    pub protocol: Protocol,
    pub src: SocketAddr,
    /// Where the bytes finally go (the app, or the original destination).
    pub dst: SocketAddr,
    /// The HBONE peer, when tunnelled.
    pub hbone_peer: Option<SocketAddr>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// uid of the local workload (for inbound, the destination).
    #[serde(skip)]
    pub local_uid: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub started: SystemTime,
    #[serde(skip)]
    pub counters: Arc<Counters>,
    /// Set when the proxy closes the connection itself (policy, drain).
    #[serde(skip)]
    pub close_reason: std::sync::OnceLock<CloseReason>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let v = time::OffsetDateTime::from(*t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    s.serialize_str(&v)
}

#[derive(Debug, Serialize)]
pub struct ConnView<'a> {
    pub id: u64,
    #[serde(flatten)]
    pub info: &'a ConnInfo,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

struct Entry {
    info: Arc<ConnInfo>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
    changed: Notify,
}

/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Inner>,
}

/// Removes its connection from the registry when dropped.
pub struct Tracked {
    id: u64,
    registry: Registry,
    pub cancel: CancellationToken,
    pub info: Arc<ConnInfo>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.registry.inner.changed.notify_waiters();
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.inner.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn track(&self, info: ConnInfo) -> Tracked {
        self.track_with(info, CancellationToken::new())
    }

    /// Tracks the other half of a connection `linked` already tracks (the
    /// inbound side of a same-node hand-over): closing either closes both.
    pub fn track_linked(&self, info: ConnInfo, linked: &Tracked) -> Tracked {
        self.track_with(info, linked.cancel.clone())
    }

    fn track_with(&self, info: ConnInfo, cancel: CancellationToken) -> Tracked {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(info);
        self.lock().insert(
            id,
            Entry {
                info: info.clone(),
                cancel: cancel.clone(),
            },
        );
        Tracked {
            id,
            registry: self.clone(),
            cancel,
            info,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection, for the admin view.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let conns = self.lock();
        let mut ids: Vec<&u64> = conns.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| {
                let e = &conns[id];
                serde_json::to_value(ConnView {
                    id: *id,
                    info: &e.info,
                    bytes_sent: e.info.counters.sent.load(Ordering::Relaxed),
                    bytes_received: e.info.counters.received.load(Ordering::Relaxed),
                })
                .ok()
            })
            .collect()
    }

    /// Cancels every connection for which `f` says so; returns how many.
    /// `f` runs without the registry lock, so the data path is not held up.
    pub fn cancel_where(&self, f: impl Fn(&ConnInfo) -> Option<String>) -> usize {
        let conns: Vec<(u64, Arc<ConnInfo>, CancellationToken)> = self
            .lock()
            .iter()
            .map(|(id, e)| (*id, e.info.clone(), e.cancel.clone()))
            .collect();
        let mut n = 0;
        for (id, info, cancel) in conns {
            if let Some(reason) = f(&info) {
                tracing::info!(id, src = %info.src, dst = %info.dst, %reason, "closing connection");
                let _ = info.close_reason.set(CloseReason::Denied(reason));
                cancel.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn cancel_all(&self) {
        for e in self.lock().values() {
            let _ = e.info.close_reason.set(CloseReason::Drained);
            e.cancel.cancel();
        }
    }

    /// Waits until no connection is left.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.inner.changed.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}
