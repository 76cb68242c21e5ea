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
//! So for [`KEEP`] after its DEL a uid is not captured from the watch, and
//! for longer while the watch is behind (it failed and nothing has come
//! from it since: an outage longer than [`KEEP`] would otherwise outlast the
//! hold). Only for that long: a pod that lives on (its sandbox made again
//! while its namespace was not enrolled, which no CNI ADD tells the agent
//! of) is captured by the watch once it has passed. A CNI ADD of the uid (a
//! new sandbox of the pod) that captures it ends the hold. The oldest
//! entries go past [`CAP`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long after its DEL a uid is not captured from the watch: longer
/// than a watch takes to catch up after the API server's return (a new
/// list at most 8 s after its failure, and the list itself).
pub(crate) const KEEP: Duration = Duration::from_secs(90);

/// The most entries kept (a node runs a few hundred pods).
pub(crate) const CAP: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Deleted {
    /// When the DEL came, and whether a held-off capture was logged.
    since: HashMap<String, (Instant, bool)>,
    /// Oldest first (a repeated DEL moves its uid to the back).
    order: VecDeque<String>,
}

impl Deleted {
    /// The CNI DEL of `uid`, at `now`.
    pub(crate) fn insert(&mut self, uid: &str, now: Instant) {
        if self.since.insert(uid.to_string(), (now, false)).is_some() {
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

    /// Whether `uid` had its DEL less than [`KEEP`] before `now`, or at
    /// all while the watch is `behind`.
    pub(crate) fn holds(&self, uid: &str, now: Instant, behind: bool) -> bool {
        self.since
            .get(uid)
            .is_some_and(|(t, _)| behind || now.saturating_duration_since(*t) < KEEP)
    }

    /// True the first time a capture of `uid` is held off (to log it once).
    pub(crate) fn first_held_off(&mut self, uid: &str) -> bool {
        match self.since.get_mut(uid) {
            Some((_, logged)) if !*logged => {
                *logged = true;
                true
            }
            _ => false,
        }
    }

    /// Drops the entries [`KEEP`] old, unless the watch is `behind`.
    pub(crate) fn forget(&mut self, now: Instant, behind: bool) {
        while let Some(uid) = self.order.front() {
            if self.holds(uid, now, behind) {
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
        assert!(d.holds("a", later, false) && !d.holds("b", later, false));
        // A watch behind keeps every hold, however old.
        assert!(d.holds("b", later, true));
        d.forget(later, true);
        assert_eq!(d.len(), 2);
        d.forget(later, false);
        assert_eq!(d.len(), 1);
        assert!(d.first_held_off("a") && !d.first_held_off("a") && !d.first_held_off("b"));
        d.remove("a");
        assert!(!d.holds("a", t0, true) && d.len() == 0);
        for i in 0..CAP + 10 {
            d.insert(&format!("u{i}"), t0);
        }
        assert_eq!(d.len(), CAP);
        assert!(!d.holds("u9", t0, false) && d.holds("u10", t0, false));
        d.forget(t0 + KEEP, false);
        assert_eq!(d.len(), 0);
    }
}
