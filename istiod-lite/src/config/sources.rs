//! How each watched kind stands: listed, not served by the API server (its
//! CRD is not installed), refused by RBAC, or failing (the API server is
//! away). The controller serves the mesh once every kind is *settled*, so
//! one missing kind never holds the rest back; what is not served is
//! reported in the log, in `/ready`'s body, in `/debug/config` and by
//! `meshctl check`.
//!
//! Fail closed: a kind that narrows access (AuthorizationPolicy,
//! PeerAuthentication) and that the API server refuses to show is not
//! settled until it has been listed once. Serving without policies that may
//! exist would allow what they deny. A kind that is not served at all has
//! no objects, so serving without it is the truth.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

/// Where a kind's watch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not listed yet.
    Listing,
    /// Listed, and watched.
    Listed,
    /// The API server does not serve the kind (404): its CRD is not
    /// installed, or not at the version the controller reads.
    Missing,
    /// RBAC refuses the controller the kind (403).
    Forbidden,
    /// The API server cannot be reached or answers errors.
    Failing,
}

/// One kind's state, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KindStatus {
    pub state: State,
    /// The API's answer, when not listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What to do about it, when not listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Listed at least once: its objects are known (perhaps stale).
    pub listed_once: bool,
    /// Serving without this kind's objects could allow what they deny.
    pub narrows_access: bool,
    /// The resource path the kind is read from.
    pub resource: String,
}

impl KindStatus {
    /// Whether the mesh may be served without waiting for this kind.
    pub fn settled(&self) -> bool {
        self.listed_once
            || match self.state {
                State::Missing => true,
                State::Forbidden => !self.narrows_access,
                State::Listing | State::Listed | State::Failing => false,
            }
    }

    fn line(&self, kind: &str) -> String {
        let state = match self.state {
            State::Listing => "not listed yet",
            State::Listed => "listed",
            State::Missing => "not served by the API server (CRD not installed?)",
            State::Forbidden => "forbidden by RBAC",
            State::Failing => "failing",
        };
        match &self.detail {
            Some(d) => format!("{kind}: {state}: {d}"),
            None => format!("{kind}: {state}"),
        }
    }
}

/// Every watched kind's state, shared by the watchers and whoever reports.
#[derive(Debug)]
pub struct Sources {
    kinds: Mutex<BTreeMap<&'static str, KindStatus>>,
    /// Bumped on every state change.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            kinds: Mutex::new(BTreeMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, KindStatus>> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kind to be watched, not listed yet.
    pub fn register(&self, kind: &'static str, resource: String, narrows_access: bool) {
        self.lock().insert(
            kind,
            KindStatus {
                state: State::Listing,
                detail: None,
                fix: None,
                listed_once: false,
                narrows_access,
                resource,
            },
        );
        self.changed.send_modify(|n| *n += 1);
    }

    /// A kind's new state; logged when it changes.
    pub fn set(&self, kind: &'static str, state: State, detail: Option<String>) {
        let mut kinds = self.lock();
        let Some(s) = kinds.get_mut(kind) else {
            return;
        };
        let was = s.state;
        s.state = state;
        s.fix = fix(kind, state, &s.resource);
        s.detail = if state == State::Listed { None } else { detail };
        if state == State::Listed {
            s.listed_once = true;
        }
        let line = s.line(kind);
        let (narrows, listed_once) = (s.narrows_access, s.listed_once);
        drop(kinds);
        if was == state {
            return;
        }
        match state {
            State::Listed if was == State::Listing => {}
            State::Listed => info!(kind, "{line}; served again"),
            State::Listing => {}
            State::Forbidden if narrows && !listed_once => warn!(
                kind,
                "{line}; the mesh is not served until it can be read (its policies may deny what serving without them would allow)"
            ),
            State::Missing | State::Forbidden => {
                warn!(kind, "{line}; the rest of the mesh is served without it")
            }
            State::Failing => warn!(kind, "{line}; retrying"),
        }
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn get(&self, kind: &str) -> Option<KindStatus> {
        self.lock().get(kind).cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<String, KindStatus> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    pub fn all_settled(&self) -> bool {
        self.lock().values().all(KindStatus::settled)
    }

    /// Changes whenever a kind's state changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// One line per kind that is not listed (all of them: listed is silent).
    pub fn not_listed(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.state != State::Listed)
            .map(|(k, s)| s.line(k))
            .collect()
    }

    /// One line per kind that holds the mesh back.
    pub fn unsettled(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| !s.settled())
            .map(|(k, s)| s.line(k))
            .collect()
    }
}

/// What to do about a kind that is not listed.
fn fix(kind: &str, state: State, resource: &str) -> Option<String> {
    let group = resource
        .strip_prefix("/apis/")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let plural = resource.rsplit('/').next().unwrap_or(resource);
    match state {
        State::Listing | State::Listed => None,
        State::Missing if group == "gateway.networking.k8s.io" => Some(format!(
            "install the Gateway API CRDs (v1): the upstream standard channel, or `kubectl apply -k manifests/gateway-api` where the cluster has none; {kind} is picked up when it appears"
        )),
        State::Missing => Some(format!(
            "install the mesh's CRDs: `kubectl apply -k manifests/crds`; {kind} is picked up when it appears"
        )),
        State::Forbidden => Some(format!(
            "grant istiod-lite's ClusterRole get, list and watch on {plural}{} (manifests/install/rbac.yaml)",
            if group.is_empty() {
                String::new()
            } else {
                format!(".{group}")
            }
        )),
        State::Failing => Some("check that the API server is up and reachable".into()),
    }
}

/// How long to wait after a failed list or watch: from `initial`, doubling
/// up to `max`. Reset by any success, so a long outage never leaves a long
/// wait behind once the API server is back.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// The next wait, at most `cap` (and never more than the max).
    pub fn next(&mut self, cap: Duration) -> Duration {
        let d = self.next.min(cap);
        self.next = (self.next * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_to_its_cap_and_a_success_resets_it() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let waits: Vec<u64> = (0..7)
            .map(|_| b.next(Duration::MAX).as_millis() as u64)
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next(Duration::MAX), Duration::from_millis(200));
        assert_eq!(
            b.next(Duration::from_millis(300)),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn a_policy_kind_that_cannot_be_read_holds_the_mesh_back_until_listed() {
        let s = Sources::default();
        s.register(
            "AuthorizationPolicy",
            "/apis/security.istio.io/v1/authorizationpolicies".into(),
            true,
        );
        s.register("Secret", "/api/v1/secrets".into(), false);
        s.register(
            "Gateway",
            "/apis/gateway.networking.k8s.io/v1/gateways".into(),
            false,
        );
        assert!(!s.all_settled());
        s.set("Secret", State::Forbidden, Some("forbidden".into()));
        s.set("Gateway", State::Missing, Some("404".into()));
        s.set(
            "AuthorizationPolicy",
            State::Forbidden,
            Some("forbidden".into()),
        );
        assert_eq!(s.unsettled().len(), 1, "{:?}", s.unsettled());
        assert!(s.unsettled()[0].starts_with("AuthorizationPolicy: forbidden"));
        // A policy kind that is not served at all has no objects to miss.
        s.set("AuthorizationPolicy", State::Missing, None);
        assert!(s.all_settled());
        s.set("AuthorizationPolicy", State::Listed, None);
        // Once listed, a refusal keeps what was listed: still settled.
        s.set("AuthorizationPolicy", State::Forbidden, None);
        assert!(s.all_settled());
        let fix = s.get("Secret").and_then(|k| k.fix).unwrap_or_default();
        assert!(fix.contains("list and watch on secrets ("), "{fix}");
        let fix = s.get("Gateway").and_then(|k| k.fix).unwrap_or_default();
        assert!(fix.contains("manifests/gateway-api"), "{fix}");
    }
}
