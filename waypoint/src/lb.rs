//! Per-request load balancing across a backend's endpoints, outlier
//! ejection, and the counters behind the circuit breaker and retry budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::state::Workload;

use crate::routes::{BackendPolicy, LbKind, Outlier};

/// The longest an endpoint stays ejected, however often it misbehaves
/// (Envoy's default max_ejection_time).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What the waypoint knows about one endpoint (by workload uid).
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests in flight to it: the least-request weight.
    pub active: AtomicU32,
    consecutive_5xx: AtomicU32,
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl EndpointStats {
    pub fn ejected_at(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t > now)
    }
}

/// One request in flight to an endpoint (the least-request weight), for as
/// long as it lives.
pub struct InFlight(Arc<EndpointStats>);

impl InFlight {
    pub fn new(ep: Arc<EndpointStats>) -> InFlight {
        ep.active.fetch_add(1, Ordering::AcqRel);
        InFlight(ep)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per backend service: what the circuit breaker and the retry budget count.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub active_requests: AtomicU32,
    pub pending_requests: AtomicU32,
    pub active_retries: AtomicU32,
    rr: AtomicUsize,
}

/// Holds a counter up for as long as it lives.
pub struct Held(Arc<dyn Fn() + Send + Sync>);

impl Drop for Held {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn hold<T: Send + Sync + 'static>(owner: Arc<T>, get: fn(&T) -> &AtomicU32) -> Held {
    get(&owner).fetch_add(1, Ordering::AcqRel);
    Held(Arc::new(move || {
        get(&owner).fetch_sub(1, Ordering::AcqRel);
    }))
}

/// Takes a slot if fewer than `max` are taken (0 = unlimited).
fn try_hold<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    get: fn(&T) -> &AtomicU32,
    max: u32,
) -> Option<Held> {
    if max == 0 {
        return Some(hold(owner.clone(), get));
    }
    get(owner)
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
    let owner = owner.clone();
    Some(Held(Arc::new(move || {
        get(&owner).fetch_sub(1, Ordering::AcqRel);
    })))
}

#[derive(Default)]
pub struct Balancer {
    endpoints: Mutex<HashMap<String, Arc<EndpointStats>>>,
    backends: Mutex<HashMap<String, Arc<BackendStats>>>,
}

impl Balancer {
    pub fn endpoint(&self, uid: &str) -> Arc<EndpointStats> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.to_string())
            .or_default()
            .clone()
    }

    pub fn backend(&self, key: &str) -> Arc<BackendStats> {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Forgets endpoints that no longer exist.
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| alive(k));
    }

    /// A request slot on the backend, or `None` when `max_requests` are in
    /// flight (the circuit is open: 503 UO).
    pub fn admit(&self, backend: &Arc<BackendStats>, policy: &BackendPolicy) -> Option<Held> {
        try_hold(backend, |b| &b.active_requests, policy.max_requests)
    }

    /// A retry slot, if the budget allows: outstanding retries stay under
    /// `percent` of active requests, with `min` as a floor, and under the
    /// backend's `max_retries` when it sets one.
    pub fn retry_slot(
        &self,
        backend: &Arc<BackendStats>,
        percent: u32,
        min: u32,
        max_retries: u32,
    ) -> Option<Held> {
        let active = backend.active_requests.load(Ordering::Acquire);
        let budget = ((u64::from(active) * u64::from(percent)) / 100) as u32;
        let mut cap = budget.max(min);
        if max_retries > 0 {
            cap = cap.min(max_retries);
        }
        if cap == 0 {
            return None;
        }
        try_hold(backend, |b| &b.active_retries, cap)
    }

    /// Picks an endpoint for one request: not ejected, not one already
    /// tried when another exists, then by the policy's algorithm.
    pub fn pick(
        &self,
        backend: &BackendStats,
        endpoints: &[Arc<Workload>],
        tried: &[String],
        policy: &BackendPolicy,
    ) -> Option<(Arc<Workload>, Arc<EndpointStats>)> {
        if endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        let with_stats: Vec<(&Arc<Workload>, Arc<EndpointStats>)> = endpoints
            .iter()
            .map(|w| (w, self.endpoint(&w.uid)))
            .collect();
        let live: Vec<&(&Arc<Workload>, Arc<EndpointStats>)> = with_stats
            .iter()
            .filter(|(_, s)| !s.ejected_at(now))
            .collect();
        // Every endpoint ejected: use them all rather than fail (Envoy's
        // panic mode).
        let pool: Vec<&(&Arc<Workload>, Arc<EndpointStats>)> = if live.is_empty() {
            with_stats.iter().collect()
        } else {
            live
        };
        let fresh: Vec<_> = pool
            .iter()
            .copied()
            .filter(|(w, _)| !tried.contains(&w.uid))
            .collect();
        let cands = if fresh.is_empty() { pool } else { fresh };
        let chosen = match policy.lb {
            LbKind::RoundRobin => cands[backend.rr.fetch_add(1, Ordering::Relaxed) % cands.len()],
            LbKind::Random => cands[fastrand::usize(..cands.len())],
            LbKind::LeastRequest => {
                // Power of two choices: two at random, the less loaded wins.
                let a = cands[fastrand::usize(..cands.len())];
                let b = cands[fastrand::usize(..cands.len())];
                if b.1.active.load(Ordering::Relaxed) < a.1.active.load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
        };
        Some(((*chosen.0).clone(), chosen.1.clone()))
    }

    /// Records an attempt's outcome for outlier detection. Returns true when
    /// this outcome ejected the endpoint.
    pub fn observe(
        &self,
        ep: &EndpointStats,
        failed: bool,
        outlier: Option<&Outlier>,
        peers: &[Arc<Workload>],
    ) -> bool {
        if !failed {
            ep.consecutive_5xx.store(0, Ordering::Release);
            return false;
        }
        let Some(o) = outlier else { return false };
        let n = ep.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
        if n < o.consecutive_5xx {
            return false;
        }
        let now = Instant::now();
        if ep.ejected_at(now) {
            return false;
        }
        // Never more than the set share ejected at once, but at least one
        // may be (as Envoy does).
        let ejected = peers
            .iter()
            .filter(|w| self.endpoint(&w.uid).ejected_at(now))
            .count();
        let allowed = ((peers.len() * o.max_ejection_percent as usize) / 100).max(1);
        if ejected >= allowed {
            return false;
        }
        let times = ep.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let for_how_long = (o.base_ejection * times).min(MAX_EJECTION.max(o.base_ejection));
        *ep.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + for_how_long);
        ep.consecutive_5xx.store(0, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(uid: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec!["10.0.0.1".parse().expect("ip")],
            network: String::new(),
            protocol: mesh_core::state::TunnelProtocol::Hbone,
            identity: "spiffe://cluster.local/ns/ns/sa/x"
                .parse()
                .expect("identity"),
            waypoint: None,
            node: "n".into(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            workload_name: String::new(),
            services: Default::default(),
            authorization_policies: vec![],
            healthy: true,
            native_tunnel: false,
            cluster_id: String::new(),
            workload_type: Default::default(),
        })
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_time_but_not_everyone() {
        let b = Balancer::default();
        let eps = vec![wl("a"), wl("b")];
        let o = Outlier {
            consecutive_5xx: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        };
        let a = b.endpoint("a");
        assert!(!b.observe(&a, true, Some(&o), &eps));
        assert!(b.observe(&a, true, Some(&o), &eps));
        assert!(a.ejected_at(Instant::now()));
        // 10% of two is less than one; one may still go, but not a second.
        let bs = b.endpoint("b");
        b.observe(&bs, true, Some(&o), &eps);
        assert!(!b.observe(&bs, true, Some(&o), &eps));
        // The picker avoids the ejected one.
        let stats = BackendStats::default();
        for _ in 0..20 {
            let (w, _) = b
                .pick(&stats, &eps, &[], &BackendPolicy::default())
                .expect("pick");
            assert_eq!(w.uid, "b");
        }
    }

    #[test]
    fn the_retry_budget_is_a_share_of_active_requests() {
        let b = Balancer::default();
        let stats = Arc::new(BackendStats::default());
        let policy = BackendPolicy::default();
        let held: Vec<Held> = (0..10).filter_map(|_| b.admit(&stats, &policy)).collect();
        assert_eq!(held.len(), 10);
        // 20% of 10 active = 2, floor 1.
        let r1 = b.retry_slot(&stats, 20, 1, 0);
        let r2 = b.retry_slot(&stats, 20, 1, 0);
        let r3 = b.retry_slot(&stats, 20, 1, 0);
        assert!(r1.is_some() && r2.is_some() && r3.is_none());
        drop(r1);
        assert!(b.retry_slot(&stats, 20, 1, 0).is_some());
        // max_requests caps admission.
        let capped = BackendPolicy {
            max_requests: 10,
            ..Default::default()
        };
        assert!(b.admit(&stats, &capped).is_none());
        drop(held);
        assert!(b.admit(&stats, &capped).is_some());
    }
}
