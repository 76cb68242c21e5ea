//! Whether an add goes ahead, under the lock that orders adds and deletes:
//! the CNI DEL's hold on the watch ([`crate::agent::deleted`]), one netns
//! for one pod, and the CNI ADD's word over a stale entry.

use std::time::Instant;

use mesh_core::netns::Netns;
use tracing::{info, warn};

use crate::agent::{Agent, AgentError, Origin, PodSpec};

/// What an add does.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Capture it.
    Go,
    /// Nothing: already held there, or held off.
    Nothing,
}

impl Agent {
    /// Decides an add of `spec` in `netns` from `origin`. The caller holds
    /// the ops lock.
    pub(crate) async fn admit(
        &self,
        spec: &PodSpec,
        netns: &Netns,
        origin: Origin,
    ) -> Result<Admit, AgentError> {
        let behind = self.source.as_ref().is_some_and(|s| s.behind());
        if origin == Origin::Watch {
            if behind {
                // The watch failed since it looked: decide nothing on it.
                return Ok(Admit::Nothing);
            }
            let mut deleted = self.deleted();
            // A DEL between the watch's look and this capture wins.
            if deleted.holds(&spec.uid, Instant::now(), behind) {
                if deleted.first_held_off(&spec.uid) {
                    info!(uid = %spec.uid, pod = %format!("{}/{}", spec.namespace, spec.name), behind,
                        "not capturing a pod whose CNI DEL has passed: the watch still shows it running");
                }
                return Ok(Admit::Nothing);
            }
        }
        let stale = {
            let pods = self.pods.lock().await;
            match pods.get(&spec.uid) {
                Some(p) if p.netns.id() == netns.id() => return Ok(Admit::Nothing),
                // A held pod stays in its netns: the watch never moves it.
                Some(_) if origin == Origin::Watch => return Ok(Admit::Nothing),
                _ => {}
            }
            let other = pods
                .values()
                .find(|p| p.spec.uid != spec.uid && p.netns.id() == netns.id());
            match (other, origin) {
                (None, _) => None,
                // One netns is one pod: the watch found this one by an
                // address another pod held before.
                (Some(o), Origin::Watch) => {
                    return Err(AgentError::NetnsHeld {
                        netns: spec.netns.clone(),
                        uid: o.spec.uid.clone(),
                    });
                }
                // The kubelet made this sandbox for this pod now: an entry
                // naming it for another (a state file's path whose process
                // was reused while the agent was down) is stale.
                (Some(o), Origin::Cni) => Some(o.spec.uid.clone()),
            }
        };
        if let Some(uid) = stale {
            self.drop_stale(&uid, spec).await;
        }
        Ok(Admit::Go)
    }

    /// Forgets a held pod whose netns the CNI ADD gave to `to` (its rules
    /// are replaced by the add that follows).
    async fn drop_stale(&self, uid: &str, to: &PodSpec) {
        warn!(stale = uid, uid = %to.uid, netns = %to.netns,
            "the CNI ADD names a netns held for another pod: that entry is stale, dropped");
        if let Err(e) = self.tell_del(uid).await {
            warn!(uid, error = %e, "the ztunnel did not confirm the stale pod's removal");
        }
        let mut pods = self.pods.lock().await;
        if let Some(old) = pods.remove(uid) {
            // Its fence is the add's to decide anew.
            if self.fenced.lock().await.remove(uid).is_some()
                && let Err(e) = crate::fence::lift(&old.netns)
            {
                warn!(uid, error = %e, "lifting the stale pod's fence failed");
            }
            self.probe_snat(&pods, &old.spec.ips, false);
        }
        self.persist(&pods).await;
    }
}
