//! Live enrollment: the agent compares the pods on its node, as the watch
//! sees them, with the pods it holds, and captures or releases the
//! difference. A running pod that becomes enrolled is found by its IP among
//! the node's netns ([`crate::find`]) and captured like a new one; one that
//! leaves gets its rules removed and the ztunnel a DelWorkload.
//!
//! Capture changes only where new connections go (NAT decides at a
//! connection's first packet): connections already open stay as they are.
//!
//! What the agent does not know it leaves alone (fail closed): a pod whose
//! namespace it has not seen, a pod being deleted (the CNI DEL releases it
//! once its containers are gone), a pod held but missing from the watch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::watch::View;
use crate::agent::{Agent, PodSpec};
use crate::enroll::PodView;

/// How often the watch is looked at without an event (the lab's directory
/// has none; on Kubernetes this retries what failed).
const RESYNC: Duration = Duration::from_secs(1);

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Capture(PodView),
    Release(String),
    /// Held; its bypass-inbound setting changed.
    Rebypass(String, bool),
}

/// The actions that bring `held` (uid, bypass_inbound) in line with `view`.
/// Pods in `excluded` namespaces (the mesh's own, kube-system: the CNI
/// plugin's `exclude_namespaces`) are never captured.
pub fn plan(view: &View, held: &[(String, bool)], excluded: &[String]) -> Vec<Action> {
    let mut out = Vec::new();
    for p in view
        .pods
        .iter()
        .filter(|p| !excluded.contains(&p.namespace))
    {
        let Some(ns_labels) = view.namespaces.get(&p.namespace) else {
            continue; // its namespace is not known yet: no decision
        };
        if p.deleting {
            continue;
        }
        let holding = held.iter().find(|(uid, _)| *uid == p.uid);
        match (p.wanted(ns_labels), holding) {
            (true, None) if !p.ips.is_empty() => out.push(Action::Capture(p.clone())),
            (true, Some((uid, bypass))) if *bypass != p.bypass_inbound() => {
                out.push(Action::Rebypass(uid.clone(), p.bypass_inbound()))
            }
            (false, Some((uid, _))) => out.push(Action::Release(uid.clone())),
            _ => {}
        }
    }
    out
}

impl Agent {
    /// Looks at the watch and acts on it.
    pub(crate) async fn sync(&self) -> Result<(), String> {
        let Some(source) = &self.source else {
            return Err("the agent watches nothing (no --node)".into());
        };
        let _one = self.reconciling.lock().await;
        let Some(view) = source.view().await.map_err(|e| e.to_string())? else {
            return Err("the watch has not listed pods and namespaces yet".into());
        };
        let held: Vec<(String, bool)> = self
            .pods
            .lock()
            .await
            .values()
            .map(|p| (p.spec.uid.clone(), p.spec.bypass_inbound))
            .collect();
        let actions = plan(&view, &held, &crate::default_excluded());
        if actions.is_empty() {
            return Ok(());
        }
        let wanted: Vec<PodView> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Capture(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        // One look at the node's netns for every pod to capture.
        let scan = if wanted.is_empty() {
            None
        } else {
            let finder = self.cfg.finder.clone();
            let host = self.host_id();
            Some(
                tokio::task::spawn_blocking(move || finder.scan(host))
                    .await
                    .map_err(|e| format!("netns scan: {e}"))?,
            )
        };
        let mut failed = Vec::new();
        for a in actions {
            match a {
                Action::Release(uid) => {
                    info!(uid, "pod left the mesh: releasing");
                    if let Err(e) = self.del(&uid, super::Leave::Release).await {
                        failed.push(format!("releasing {uid}: {e}"));
                    }
                }
                Action::Rebypass(uid, bypass) => self.set_bypass(&uid, bypass).await,
                Action::Capture(p) => {
                    let key = format!("{}/{}", p.namespace, p.name);
                    let found = scan.as_ref().map(|s| s.find(&p.ips));
                    let Some(Ok((path, netns))) = found else {
                        let e = found.and_then(|f| f.err()).map(|e| e.to_string());
                        failed.push(format!("{key}: {}", e.unwrap_or_default()));
                        continue;
                    };
                    info!(pod = %key, netns = %path, "running pod enrolled: capturing");
                    let spec = PodSpec {
                        uid: p.uid.clone(),
                        name: p.name.clone(),
                        namespace: p.namespace.clone(),
                        service_account: p.service_account.clone(),
                        netns: path,
                        ips: p.ips.clone(),
                        bypass_inbound: p.bypass_inbound(),
                    };
                    if let Err(e) = self.add_opened(spec, netns).await {
                        failed.push(format!("capturing {key}: {e}"));
                    }
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// The node's netns identity (never a pod's), or the agent's own.
    fn host_id(&self) -> (u64, u64) {
        match &self.host {
            Some(h) => h.id(),
            None => mesh_core::netns::Netns::open("/proc/self/ns/net")
                .map(|n| n.id())
                .unwrap_or_default(),
        }
    }

    /// Reconciles on every watch event, and every [`RESYNC`] regardless.
    pub(crate) async fn watch_loop(self: Arc<Self>, changed: Arc<Notify>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
            match self.sync().await {
                Ok(()) => {}
                Err(e) if e.contains("not listed") => debug!("{e}"),
                Err(e) => warn!(error = %e, "enrollment not reconciled; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::enroll::{BYPASS_INBOUND, DATAPLANE_MODE};

    fn pod(uid: &str, ns: &str) -> PodView {
        PodView {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            service_account: "default".into(),
            node: "node-1".into(),
            host_network: false,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ips: vec!["10.1.1.5".parse().unwrap()],
            terminated: false,
            deleting: false,
        }
    }

    #[test]
    fn enrolled_pods_are_captured_and_leavers_released_and_the_unknown_left_alone() {
        let ambient = BTreeMap::from([(DATAPLANE_MODE.to_string(), "ambient".to_string())]);
        let mut optout = pod("optout", "shop");
        optout.labels.insert(DATAPLANE_MODE.into(), "none".into());
        let mut bypass = pod("bypass", "shop");
        bypass
            .annotations
            .insert(BYPASS_INBOUND.into(), "true".into());
        let mut going = pod("going", "legacy");
        going.deleting = true;
        let view = View {
            pods: vec![
                pod("new", "shop"),
                optout,
                bypass,
                pod("left", "legacy"),
                going,
                pod("unknown-ns", "nowhere"),
                pod("dns", "kube-system"),
            ],
            namespaces: BTreeMap::from([
                ("shop".to_string(), ambient.clone()),
                ("legacy".to_string(), BTreeMap::new()),
                ("kube-system".to_string(), ambient.clone()),
            ]),
        };
        let held = [
            ("optout".to_string(), false),
            ("bypass".to_string(), false),
            ("left".to_string(), false),
            ("going".to_string(), false),
            ("unknown-ns".to_string(), false),
            ("not-in-view".to_string(), false),
        ];
        let got = plan(&view, &held, &crate::default_excluded());
        assert_eq!(
            got,
            vec![
                Action::Capture(pod("new", "shop")),
                Action::Release("optout".into()),
                Action::Rebypass("bypass".into(), true),
                Action::Release("left".into()),
            ]
        );
    }
}
