//! Fenced pods: captured pods whose ports the agent cannot vouch for
//! ([`holders`]: a socket where a redirect lands that no connected ztunnel
//! holds, a port the newest ztunnel does not listen on, or no ztunnel at
//! all). Such a pod's captured openings are rejected ([`crate::fence`])
//! rather than handed to whoever holds the port; its redirect rules stay,
//! so nothing of it leaves un-meshed. It is reported (a warning, and the
//! control socket's `fenced`), and it does not hold back the ztunnel's
//! snapshot: the node's other pods are served and the roll goes on.
//!
//! The fence goes up when a check fails (after each ack of a pod, in a
//! snapshot or a live capture) and, for every pod, when the last ztunnel
//! disconnects or announces its drain (the gap of a crash or of a stop
//! without a next one: seen within [`WATCH`]; a draining ztunnel waits
//! for its connection to close, which comes after the fence, and that
//! round never waits on the agent's operations lock) or none has
//! connected within [`START_GRACE`] of the agent's start. Every
//! [`RECHECK`] each fence that is down (it failed to go up, or a process
//! of the pod's with NET_ADMIN deleted or replaced it) goes up again, and
//! the fenced pods are checked again (the connected ztunnels' sockets read
//! once for the round): the fence of each that passes is lifted. A pod
//! that fails its check when captured and cannot be fenced is not
//! captured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::agent::holders::{self, HolderError, Ours};
use crate::agent::{Agent, Pod, PodSpec};
use crate::fence;
use mesh_core::netns::Netns;

/// How often the agent looks whether any ztunnel is still connected.
pub(crate) const WATCH: Duration = Duration::from_millis(200);
/// How long a starting agent waits for a ztunnel before it takes the
/// node for a gap (a restart's ztunnel reconnects well within it).
pub(crate) const START_GRACE: Duration = Duration::from_secs(2);
/// How often fenced pods are checked again.
pub(crate) const RECHECK: Duration = Duration::from_secs(2);

/// One fenced pod.
#[derive(Debug, Clone)]
pub(crate) struct Fenced {
    /// Why (the failed check).
    pub(crate) why: String,
    /// Whether the fence is up (putting it up can fail: tried again each
    /// round).
    pub(crate) up: bool,
}

/// The fenced pods, by uid.
pub(crate) type FencedPods = BTreeMap<String, Fenced>;

/// Puts up a pod's fence (again, when it failed before) for `why`.
pub(crate) fn put_up(spec: &PodSpec, netns: &Netns, why: String, fenced: &mut FencedPods) {
    let uid = &spec.uid;
    let was_up = fenced.get(uid).is_some_and(|f| f.up);
    let up = was_up
        || match fence::put_up(netns) {
            Ok(()) => true,
            Err(e) => {
                warn!(uid, error = %e, "cannot fence the pod; trying again");
                false
            }
        };
    // Logged when it is fenced, and again when the reason changes (an
    // older ztunnel that held the ports gone, a process of the pod's in
    // its place).
    if fenced.get(uid).is_none_or(|f| f.why != why) {
        warn!(uid, pod = %format!("{}/{}", spec.namespace, spec.name), why = %why,
            "pod fenced: its captured connections are refused until a connected ztunnel holds its ports");
    }
    fenced.insert(uid.clone(), Fenced { why, up });
}

/// Applies a check's outcome to a pod: a failure fences it, a pass lifts
/// its fence.
pub(crate) fn judge(
    spec: &PodSpec,
    netns: &Netns,
    outcome: Result<(), HolderError>,
    fenced: &mut FencedPods,
) {
    let uid = &spec.uid;
    match outcome {
        Err(e) => put_up(spec, netns, e.to_string(), fenced),
        Ok(()) => {
            if !fenced.contains_key(uid) {
                return;
            }
            match fence::lift(netns) {
                Ok(()) => {
                    fenced.remove(uid);
                    info!(
                        uid,
                        "pod's fence lifted: a connected ztunnel holds its ports"
                    );
                }
                Err(e) => warn!(uid, error = %e, "cannot lift the pod's fence; trying again"),
            }
        }
    }
}

/// Checks a pod against `ours`.
pub(crate) fn check(
    spec: &PodSpec,
    netns: &Netns,
    dns: bool,
    ours: &Ours,
) -> Result<(), HolderError> {
    holders::check(netns, dns, spec.bypass_inbound, &spec.ips, ours)
}

/// Checks `pod` and applies the outcome.
pub(crate) fn check_and_judge(pod: &Pod, dns: bool, ours: &Ours, fenced: &mut FencedPods) {
    let outcome = check(&pod.spec, &pod.netns, dns, ours);
    judge(&pod.spec, &pod.netns, outcome, fenced);
}

/// The pods an agent from before a restart left fenced.
pub(crate) fn left_fenced(pods: &BTreeMap<String, Pod>) -> FencedPods {
    pods.values()
        .filter(|p| fence::present(&p.netns))
        .map(|p| {
            let f = Fenced {
                why: "fenced before the agent restarted".into(),
                up: true,
            };
            (p.spec.uid.clone(), f)
        })
        .collect()
}

/// Puts up again each fence that is down: one that failed to go up, and
/// one no longer there whole (a process of the pod's with NET_ADMIN
/// deleted it, or replaced it with a table of its own).
pub(crate) fn restore(pods: &BTreeMap<String, Pod>, fenced: &mut FencedPods) {
    for (uid, f) in fenced.iter_mut() {
        let Some(p) = pods.get(uid) else { continue };
        if f.up && !fence::present(&p.netns) {
            warn!(
                uid,
                "the pod's fence is gone or altered; putting it up again"
            );
            f.up = false;
        }
        if !f.up {
            match fence::put_up(&p.netns) {
                Ok(()) => f.up = true,
                Err(e) => {
                    error!(uid, error = %e, "cannot fence the pod: its captured connections go to whoever holds its ports");
                }
            }
        }
    }
}

impl Agent {
    /// Fences every pod: no ztunnel is connected. Called with no lock
    /// held, and never waits on the operations lock (a long snapshot or
    /// add holds it, and a draining ztunnel's ack waits on this): the
    /// pods' lock is never held across a ZDS exchange. An add that
    /// captures a pod meanwhile sees the gap ([`Ztunnels::gaps`]) and
    /// fences it itself. True when a ztunnel joined meanwhile (its
    /// snapshot vouched for what it took): the fenced pods are checked
    /// again at once.
    ///
    /// [`Ztunnels::gaps`]: crate::agent::ztunnels::Ztunnels::gaps
    async fn fence_all(&self) -> bool {
        let joined = self.ztunnels.joined();
        if self.ztunnels.count().await > 0 {
            return false;
        }
        self.ztunnels.gap();
        let pods = self.pods.lock().await;
        let mut fenced = self.fenced.lock().await;
        for p in pods.values() {
            put_up(
                &p.spec,
                &p.netns,
                "no ztunnel is connected".into(),
                &mut fenced,
            );
        }
        self.ztunnels.joined() != joined
    }

    /// Checks the fenced pods again, with the connected ztunnels' sockets
    /// read once; lifts the fence of each that passes.
    pub(crate) async fn recheck(&self) {
        if self.fenced.lock().await.is_empty() {
            return;
        }
        let _op = self.ops.lock().await;
        let pods = self.pods.lock().await;
        let ours = self.ztunnels.ours().await;
        let mut fenced = self.fenced.lock().await;
        fenced.retain(|uid, _| pods.contains_key(uid));
        restore(&pods, &mut fenced);
        let Some(ours) = ours else {
            return; // none connected: all stay fenced
        };
        let uids: Vec<String> = fenced.keys().cloned().collect();
        for uid in uids {
            if let Some(p) = pods.get(&uid) {
                check_and_judge(p, self.cfg.dns, &ours, &mut fenced);
            }
        }
    }

    /// The agent's watch over its fences, until `stop`. The checks of
    /// the fenced pods run in a task of their own: they take the
    /// operations lock, which must never hold up the watch (a draining
    /// ztunnel's ack waits on it).
    pub(crate) async fn fence_loop(self: Arc<Self>, stop: CancellationToken) {
        let now = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(self.clone().recheck_loop(now.clone(), stop.clone()));
        let mut watch = tokio::time::interval(WATCH);
        // As if one were: none connected within START_GRACE of the start
        // is a gap too (an agent started while no ztunnel runs).
        let mut connected = true;
        let mut seen = false;
        let start = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = watch.tick() => {}
            }
            let mut live = self.ztunnels.count().await > 0;
            // Those forgotten before this look (a drain notice read by a
            // request too): closed below, once fenced for; any forgotten
            // later waits for the next look.
            let retired = self.ztunnels.take_retired();
            if !retired.is_empty() {
                live = self.ztunnels.count().await > 0;
            }
            // A ztunnel seen: its end is a gap at once.
            seen |= live;
            let settled = seen || start.elapsed() >= START_GRACE;
            if !live && (!retired.is_empty() || connected && settled) {
                warn!("no ztunnel connected: every pod fenced until one holds its ports");
                if self.fence_all().await {
                    now.notify_one();
                }
            }
            // Only now: a draining ztunnel closes its listeners once its
            // connection is.
            drop(retired);
            if live || settled {
                connected = live;
            }
        }
    }

    /// Checks the fenced pods every [`RECHECK`], and at once when `now`
    /// is notified, until `stop`.
    async fn recheck_loop(self: Arc<Self>, now: Arc<tokio::sync::Notify>, stop: CancellationToken) {
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = recheck.tick() => {}
                _ = now.notified() => {}
            }
            self.recheck().await;
        }
    }
}
