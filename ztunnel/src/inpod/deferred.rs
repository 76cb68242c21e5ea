//! Pods of a snapshot whose listeners could not be bound when they came
//! (a port in use, an address flushed or not usable yet, no descriptors:
//! acked all the same, so the snapshot completes; the node agent fences
//! the pod until they are bound). Mostly a port in use: an older
//! ztunnel held them exclusively (a version from before the SO_REUSEPORT
//! sets). The node agent counts such a pod as taken only once it has seen
//! that every socket on its ports is a connected ztunnel's; the older one
//! serves it meanwhile, and this one binds it as soon as it lets go.
//!
//! A bind that then fails for any other reason, or a port still in use
//! past [`IN_USE_LIMIT`] (in a roll the older ztunnel closes its listeners
//! as soon as this one is ready), leaves the pod without listeners of
//! ours: it is reported (a warning at each try, `ztunnel_pods_unserved`)
//! and tried again with backoff up to [`MAX_BACKOFF`], never given up.
//! It does not make this ztunnel unready: that one pod's failure would
//! hold every other pod of the node back (a roll never completes, a
//! process of the pod that keeps a port holds the node). The node agent
//! fences the pod meanwhile: it finds no ztunnel's socket on its ports.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::istio::workload::zds::WorkloadInfo;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::InPod;
use mesh_core::netns::Netns;

/// How often a pod whose ports an older ztunnel still holds is tried again.
pub(super) const BIND_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a bind that failed.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a port may stay in use before that is a failure too.
pub(super) const IN_USE_LIMIT: Duration = Duration::from_secs(60);

/// One pod waiting for its ports.
pub(super) struct Deferred {
    /// Cancelled by whoever takes the entry out (the pod taken again or
    /// released), under the lock of the map.
    pub(super) token: CancellationToken,
    /// The last bind's failure, when it was not (or no longer) a port an
    /// older ztunnel holds: the pod is served by nobody.
    pub(super) failed: Option<String>,
    /// The pod's netns ([`Netns::id`]): the same pod sent again keeps
    /// its deferral; a new sandbox replaces it.
    pub(super) netns: (u64, u64),
}

impl Deferred {
    /// Whether this deferral is of the pod in `netns`.
    pub(super) fn is_of(&self, netns: &Netns) -> bool {
        self.netns == netns.id()
    }
}

/// The wait after `failures` failed binds in a row.
pub(super) fn backoff(failures: u32) -> Duration {
    BIND_RETRY
        .saturating_mul(1 << failures.min(8))
        .min(MAX_BACKOFF)
}

impl InPod {
    /// Binds a deferred pod's listeners once its ports are free.
    pub(super) async fn bind_later(
        self: Arc<Self>,
        uid: String,
        info: WorkloadInfo,
        netns: Arc<Netns>,
        token: CancellationToken,
    ) {
        let since = Instant::now();
        let mut failures = 0u32;
        loop {
            let wait = if failures == 0 {
                BIND_RETRY
            } else {
                backoff(failures)
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // Under the lock: a release (which cancels the token under it)
            // either comes first, and nothing is bound, or after, and
            // closes what was.
            let mut deferred = self.deferred();
            if token.is_cancelled() {
                return;
            }
            let error = match self.add(&uid, info.clone(), netns.clone()) {
                Ok(()) => {
                    if deferred.remove(&uid).is_some_and(|d| d.failed.is_some()) {
                        info!(uid, namespace = %info.namespace, name = %info.name, "the pod's listeners are bound at last");
                    }
                    self.count_unserved(&deferred);
                    return;
                }
                Err(e) if e.in_use() && since.elapsed() < IN_USE_LIMIT => continue,
                Err(e) => e.to_string(),
            };
            failures += 1;
            warn!(uid, namespace = %info.namespace, name = %info.name, error = %error, retry_in = ?backoff(failures), "the pod's listeners cannot be bound: nothing of this ztunnel's serves the pod (the node agent fences it)");
            if let Some(d) = deferred.get_mut(&uid) {
                d.failed = Some(error);
            }
            self.count_unserved(&deferred);
        }
    }

    /// Sets `ztunnel_pods_unserved` from the deferred pods.
    pub(super) fn count_unserved(&self, deferred: &HashMap<String, Deferred>) {
        let n = deferred.values().filter(|d| d.failed.is_some()).count();
        self.proxy
            .metrics
            .pods_unserved
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod sent again in the same netns is the deferral's pod (its
    /// failure and timer are kept); another netns is not.
    #[test]
    fn a_resend_in_the_same_netns_keeps_the_deferral() {
        let own = Netns::open("/proc/self/ns/net").unwrap();
        let d = Deferred {
            token: CancellationToken::new(),
            failed: Some("no descriptors".into()),
            netns: own.id(),
        };
        assert!(d.is_of(&own));
        let other = Deferred { netns: (0, 0), ..d };
        assert!(!other.is_of(&own));
    }

    /// In a snapshot, a pod whose listeners cannot be bound for any reason
    /// (its address flushed, an IPv6 address that failed DAD, no
    /// descriptors) is acked and tried again, never refused: a refusal
    /// kept the pod owed, so SnapshotSent never came and the roll froze.
    /// The node agent fences it meanwhile (no ztunnel socket on its
    /// ports). Only a draining ztunnel refuses. Failed first: only a port
    /// in use waited.
    #[test]
    fn in_a_snapshot_only_draining_refuses_a_pod() {
        use super::super::PodError;
        use std::io::{Error, ErrorKind};
        let listen = |k: ErrorKind| PodError::Listen {
            port: 15006,
            source: Error::from(k),
        };
        assert!(PodError::NoAddress.waits_in_snapshot());
        assert!(listen(ErrorKind::AddrNotAvailable).waits_in_snapshot());
        assert!(listen(ErrorKind::AddrInUse).waits_in_snapshot());
        assert!(PodError::Dns(Error::from(ErrorKind::OutOfMemory)).waits_in_snapshot());
        assert!(!PodError::Draining.waits_in_snapshot());
    }

    #[test]
    fn the_backoff_doubles_up_to_its_bound() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(5), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
