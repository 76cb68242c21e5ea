//! The pods the CNI DEL tore down a moment ago, so a watch behind the
//! kubelet does not capture them again.
//!
//! The kubelet's DEL can come before the watch shows the pod being deleted
//! (a watch behind, or waiting out its backoff after the API server's
//! restart): to the watch the pod is then still enrolled and running, and
//! the reconcile would look for its netns by IP, find the dying one
//! (capturing a pod nobody deletes again: held for good, and the node's
//! probe tables kept at an uninstall) or, once the address is reused,
//! another pod's (capturing it under the old pod's name and account).
//!
//! So for [`KEEP`] after its DEL a uid is not captured from the watch. Only
//! for that long: a pod that lives on (its sandbox made again while its
//! namespace was not enrolled, which no CNI ADD tells the agent of) is
//! captured by the watch once it has passed. A CNI ADD of the uid (a new
//! sandbox of the pod) ends it at once. The oldest entries go past [`CAP`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long after its DEL a uid is not captured from the watch: longer
/// than a watch takes to catch up after the API server's return (its
/// backoff reaches 30 s).
pub(crate) const KEEP: Duration = Duration::from_secs(90);

/// The most entries kept (a node runs a few hundred pods).
pub(crate) const CAP: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Deleted {
    since: HashMap<String, Instant>,
    /// Oldest first (a repeated DEL moves its uid to the back).
    order: VecDeque<String>,
}

impl Deleted {
    /// The CNI DEL of `uid`, at `now`.
    pub(crate) fn insert(&mut self, uid: &str, now: Instant) {
        self.forget(now);
        if self.since.insert(uid.to_string(), now).is_some() {
            self.order.retain(|u| u != uid);
        }
        self.order.push_back(uid.to_string());
        while self.order.len() > CAP {
            if let Some(old) = self.order.pop_front() {
                self.since.remove(&old);
            }
        }
    }

    /// A CNI ADD of `uid`: a new sandbox of the same pod.
    pub(crate) fn remove(&mut self, uid: &str) {
        if self.since.remove(uid).is_some() {
            self.order.retain(|u| u != uid);
        }
    }

    /// Whether `uid` had its DEL less than [`KEEP`] before `now`.
    pub(crate) fn holds(&self, uid: &str, now: Instant) -> bool {
        self.since
            .get(uid)
            .is_some_and(|t| now.saturating_duration_since(*t) < KEEP)
    }

    /// Drops the entries [`KEEP`] old.
    pub(crate) fn forget(&mut self, now: Instant) {
        while let Some(uid) = self.order.front() {
            if self.holds(uid, now) {
                break;
            }
            self.since.remove(uid);
            self.order.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_holds_for_keep_and_the_oldest_go_past_the_cap() {
        let t0 = Instant::now();
        let mut d = Deleted::default();
        d.insert("a", t0);
        d.insert("b", t0 + Duration::from_secs(10));
        // A repeated DEL starts its time again.
        d.insert("a", t0 + Duration::from_secs(20));
        assert_eq!(d.len(), 2);
        let later = t0 + KEEP + Duration::from_secs(15);
        assert!(d.holds("a", later) && !d.holds("b", later));
        d.forget(later);
        assert_eq!(d.len(), 1);
        d.remove("a");
        assert!(!d.holds("a", t0) && d.len() == 0);
        for i in 0..CAP + 10 {
            d.insert(&format!("u{i}"), t0);
        }
        assert_eq!(d.len(), CAP);
        assert!(!d.holds("u9", t0) && d.holds("u10", t0));
        d.forget(t0 + KEEP);
        assert_eq!(d.len(), 0);
    }
}
