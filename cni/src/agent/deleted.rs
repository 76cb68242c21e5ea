//! The pods the CNI DEL tore down, so the watch never captures them again.
//!
//! The kubelet's DEL can come before the watch shows the pod being deleted
//! (a watch behind, or relisting after the API server's restart): to the
//! watch the pod is then still enrolled and running, and the reconcile would
//! look for its netns by IP, find the dying one (capturing a pod nobody will
//! ever delete again: held for good, the node's probe tables kept at an
//! uninstall) or, once the address is reused, another pod's (capturing it
//! under the old pod's name and account). A uid the DEL has seen is never
//! captured from the watch; a CNI ADD of it (a new sandbox of the same pod)
//! takes it off the list.
//!
//! Bounded: an entry goes once the watch no longer lists its pod and it is
//! older than [`KEEP`] (a watch that has not seen the pod yet could still
//! bring it), and the oldest go past [`CAP`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long an entry stays after its pod leaves the watch.
pub(crate) const KEEP: Duration = Duration::from_secs(120);

/// The most entries kept (a node runs a few hundred pods).
pub(crate) const CAP: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Deleted {
    since: HashMap<String, Instant>,
    order: VecDeque<String>,
}

impl Deleted {
    /// The CNI DEL of `uid`, at `now`.
    pub(crate) fn insert(&mut self, uid: &str, now: Instant) {
        if self.since.insert(uid.to_string(), now).is_none() {
            self.order.push_back(uid.to_string());
        }
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

    pub(crate) fn contains(&self, uid: &str) -> bool {
        self.since.contains_key(uid)
    }

    /// Forgets the entries older than [`KEEP`] whose pods `listed` says the
    /// watch no longer has.
    pub(crate) fn forget(&mut self, listed: impl Fn(&str) -> bool, now: Instant) {
        let since = &mut self.since;
        self.order.retain(|uid| {
            let keep = listed(uid)
                || since
                    .get(uid)
                    .is_some_and(|t| now.saturating_duration_since(*t) < KEEP);
            if !keep {
                since.remove(uid);
            }
            keep
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_while_listed_or_young_and_the_oldest_go_past_the_cap() {
        let t0 = Instant::now();
        let mut d = Deleted::default();
        d.insert("a", t0);
        d.insert("b", t0);
        d.insert("a", t0);
        assert_eq!(d.len(), 2);
        // Young: kept whether listed or not.
        d.forget(|_| false, t0 + Duration::from_secs(1));
        assert!(d.contains("a") && d.contains("b"));
        // Old: only the listed one stays.
        d.forget(|u| u == "a", t0 + KEEP);
        assert!(d.contains("a") && !d.contains("b"));
        d.remove("a");
        assert!(!d.contains("a"));
        assert_eq!(d.len(), 0);
        for i in 0..CAP + 10 {
            d.insert(&format!("u{i}"), t0);
        }
        assert_eq!(d.len(), CAP);
        assert!(!d.contains("u0") && !d.contains("u9") && d.contains("u10"));
    }
}
