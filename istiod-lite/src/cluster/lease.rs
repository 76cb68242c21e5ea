//! Leader election through a `coordination.k8s.io/v1` Lease, the way
//! client-go does it: the holder renews `holderIdentity`/`renewTime` every
//! `renew_every`; another replica takes over once it has seen no change to
//! the Lease for `lease_duration` (judged by its own clock, so clock skew
//! between replicas does not matter). Every update carries the
//! resourceVersion it read, so two replicas racing for the Lease get one
//! success and one 409 Conflict; the loser stays (or becomes) a follower.
//!
//! Only the writes depend on this; every replica serves xDS and the CA.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ClusterError, status_code};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// A leader that cannot renew for this long steps down (before anyone
    /// else can take over: keep it below `lease_duration`).
    pub renew_deadline: Duration,
    /// How often a follower looks at the Lease.
    pub retry_every: Duration,
}

impl LeaseConfig {
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// What the elector last saw of the Lease.
struct Observed {
    resource_version: Option<String>,
    holder: Option<String>,
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Option<Observed>,
    leader: watch::Sender<bool>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    pub fn new(api: Api<Lease>, cfg: LeaseConfig) -> Self {
        Elector {
            api,
            cfg,
            observed: None,
            leader: watch::Sender::new(false),
        }
    }

    /// True while this replica holds the Lease.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn set_leader(&self, is: bool) {
        // Notify only on a change: the writer treats every notification as
        // a possible loss and abandons what it is doing.
        let changed = self
            .leader
            .send_if_modified(|v| std::mem::replace(v, is) != is);
        if changed {
            if is {
                info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became the leader");
            } else {
                warn!(lease = %self.cfg.name, identity = %self.cfg.identity, "no longer the leader; writes stop");
            }
        }
    }

    fn spec(&self, prev: Option<&LeaseSpec>) -> LeaseSpec {
        let ours = prev.and_then(|p| p.holder_identity.as_deref()) == Some(&self.cfg.identity);
        let transitions = prev.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                prev.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now())
            },
            renew_time: Some(now()),
            lease_transitions: Some(if ours || prev.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One round: create, renew or take over the Lease if this replica may.
    /// Ok(true) when it holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, ClusterError> {
        let name = self.cfg.name.clone();
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(ClusterError::api(format!("reading Lease {name}")))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.observe(&l);
                    Ok(true)
                }
                Err(e) if status_code(&e) == Some(409) => Ok(false),
                Err(e) => Err(ClusterError::api(format!("creating Lease {name}"))(e)),
            };
        };
        self.observe(&lease);
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let duration = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.cfg.lease_duration);
        let ours = holder.as_deref() == Some(&self.cfg.identity);
        let vacant = holder.as_deref().is_none_or(str::is_empty);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= duration);
        if !ours && !vacant && !expired {
            return Ok(false);
        }
        lease.spec = Some(self.spec(lease.spec.as_ref()));
        // resourceVersion stays as read: a concurrent writer makes this 409.
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.observe(&l);
                Ok(true)
            }
            Err(e) if status_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(ClusterError::api(format!("updating Lease {name}"))(e)),
        }
    }

    fn observe(&mut self, l: &Lease) {
        let rv = l.metadata.resource_version.clone();
        let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != rv || o.holder != holder);
        if changed {
            self.observed = Some(Observed {
                resource_version: rv,
                holder,
                at: Instant::now(),
            });
        }
    }

    /// Gives the Lease up (on shutdown) so another replica need not wait
    /// for it to expire.
    async fn release(&mut self) {
        let name = self.cfg.name.clone();
        let Ok(Some(mut lease)) = self.api.get_opt(&name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.cfg.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %name, "released the Lease"),
            Err(e) => warn!(lease = %name, error = %e, "could not release the Lease"),
        }
    }

    /// Runs until `stop`, then releases the Lease if held.
    pub async fn run(mut self, stop: CancellationToken) {
        let deadline = self.cfg.renew_deadline;
        let mut last_renew: Option<Instant> = None;
        loop {
            let started = Instant::now();
            // No round may outlast the moment a leader must step down: an
            // API server that stalls or throttles must not keep a leader
            // writing after a follower may have taken over.
            let budget = match last_renew {
                Some(t) if *self.leader.borrow() => deadline.saturating_sub(t.elapsed()),
                _ => deadline,
            };
            let outcome = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout(budget, self.try_acquire_or_renew()) => r,
            };
            match outcome {
                Ok(Ok(true)) => {
                    // From when the request went out, as client-go counts.
                    last_renew = Some(started);
                    self.set_leader(true);
                }
                Ok(Ok(false)) => {
                    last_renew = None;
                    self.set_leader(false);
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "leader election");
                    // Keep leading through short API outages, but never past
                    // the point where another replica may have taken over.
                    if last_renew.is_none_or(|t| t.elapsed() >= deadline) {
                        self.set_leader(false);
                    }
                }
                Err(_) => {
                    warn!(after = ?budget, "leader election: the API server did not answer in time");
                    if last_renew.is_none_or(|t| t.elapsed() >= deadline) {
                        self.set_leader(false);
                    }
                }
            }
            let wait = if *self.leader.borrow() {
                self.cfg.renew_every
            } else {
                self.cfg.retry_every
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let was = *self.leader.borrow();
        self.set_leader(false);
        if was {
            let _ = tokio::time::timeout(Duration::from_secs(3), self.release()).await;
        }
    }
}
