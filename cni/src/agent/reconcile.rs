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

use crate::agent::watch::{View, WatchError};
use crate::agent::{Agent, AgentError, Origin, PodSpec};
use crate::enroll::PodView;
use crate::find::FindError;

/// How often the watch is looked at without an event (the lab's directory
/// has none; on Kubernetes this retries what failed).
const RESYNC: Duration = Duration::from_secs(1);

/// How often a watch that stays behind is warned of.
const BEHIND_TOLD: Duration = Duration::from_secs(60);

/// Why a look at the watch did not bring the node's pods in line.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the agent watches nothing (no --node)")]
    NoWatch,
    /// The watch's first list is not in yet: nothing to decide on, not a
    /// failure worth a warning.
    #[error("the watch has not listed pods and namespaces yet")]
    NotListed,
    /// A watch failed and nothing has come from it since: what it shows
    /// may be from before an outage, so nothing is decided on it.
    #[error("a watch failed and has not caught up: waiting for it")]
    Behind,
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("netns scan: {0}")]
    Scan(#[source] tokio::task::JoinError),
    /// The pods whose capture or release failed (the others were acted on).
    #[error("{}", join(.0))]
    Pods(Vec<PodError>),
}

/// One pod the agent could not capture or release.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("releasing {uid}: {source}")]
    Release {
        uid: String,
        #[source]
        source: AgentError,
    },
    /// "namespace/name": its netns was not found among the node's.
    #[error("{pod}: {source}")]
    Find {
        pod: String,
        #[source]
        source: FindError,
    },
    #[error("capturing {pod}: {source}")]
    Capture {
        pod: String,
        #[source]
        source: AgentError,
    },
}

fn join(errs: &[PodError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

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
    pub(crate) async fn sync(&self) -> Result<(), SyncError> {
        let Some(source) = &self.source else {
            return Err(SyncError::NoWatch);
        };
        let _one = self.reconciling.lock().await;
        if source.behind() {
            return Err(SyncError::Behind);
        }
        let Some(view) = source.view().await? else {
            return Err(SyncError::NotListed);
        };
        let held: Vec<(String, bool)> = self
            .pods
            .lock()
            .await
            .values()
            .map(|p| (p.spec.uid.clone(), p.spec.bypass_inbound))
            .collect();
        let now = std::time::Instant::now();
        let actions: Vec<Action> = {
            let behind = source.behind();
            let mut deleted = self.deleted();
            deleted.forget(now, behind);
            plan(&view, &held, &crate::default_excluded())
                .into_iter()
                .filter(|a| match a {
                    Action::Capture(p) if deleted.holds(&p.uid, now, behind) => {
                        if deleted.first_held_off(&p.uid) {
                            info!(pod = %format!("{}/{}", p.namespace, p.name), uid = %p.uid, behind,
                                "not capturing a pod whose CNI DEL has passed: the watch still shows it running");
                        }
                        false
                    }
                    _ => true,
                })
                .collect()
        };
        if actions.is_empty() {
            return Ok(());
        }
        let mut failed = Vec::new();
        let mut wanted: Vec<PodView> = Vec::new();
        for a in actions {
            match a {
                // The watch failed since it looked: decide nothing on it.
                _ if source.behind() => return Err(SyncError::Behind),
                Action::Release(uid) => {
                    info!(uid, "pod left the mesh: releasing");
                    if let Err(source) = self.del(&uid, super::Leave::Release).await {
                        failed.push(PodError::Release { uid, source });
                    }
                }
                Action::Rebypass(uid, bypass) => self.set_bypass(&uid, bypass).await,
                Action::Capture(p) => wanted.push(p),
            }
        }
        if !wanted.is_empty() {
            // One look at the node's netns for every pod to capture.
            let finder = self.cfg.finder.clone();
            let host = self.host_id();
            let scan = tokio::task::spawn_blocking(move || finder.scan(host))
                .await
                .map_err(SyncError::Scan)?;
            for p in wanted {
                let key = format!("{}/{}", p.namespace, p.name);
                let (path, netns) = match scan.find(&p.ips) {
                    Ok(found) => found,
                    Err(source) => {
                        failed.push(PodError::Find { pod: key, source });
                        continue;
                    }
                };
                let ns_mode = view
                    .namespaces
                    .get(&p.namespace)
                    .and_then(|l| l.get(crate::enroll::DATAPLANE_MODE));
                info!(pod = %key, netns = %path, ?ns_mode, pod_mode = ?p.labels.get(crate::enroll::DATAPLANE_MODE), "running pod enrolled: capturing");
                let spec = PodSpec {
                    uid: p.uid.clone(),
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    netns: path,
                    ips: p.ips.clone(),
                    bypass_inbound: p.bypass_inbound(),
                };
                if let Err(source) = self.add_opened(spec, netns, Origin::Watch).await {
                    failed.push(PodError::Capture { pod: key, source });
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(SyncError::Pods(failed))
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
        // Since when the watch is behind, and when that was last warned of.
        let mut behind: Option<(std::time::Instant, std::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
            let r = self.sync().await;
            let now = std::time::Instant::now();
            match r {
                Ok(()) => behind = None,
                Err(SyncError::Behind) => match &mut behind {
                    None => behind = Some((now, now)),
                    Some((since, told)) if now.duration_since(*told) >= BEHIND_TOLD => {
                        *told = now;
                        warn!(
                            secs = now.duration_since(*since).as_secs(),
                            "the watch has not caught up: no pod captured or released from it meanwhile (new pods are still captured by the CNI ADD)"
                        );
                    }
                    Some(_) => {}
                },
                Err(e @ SyncError::NotListed) => debug!("{e}"),
                Err(e) => {
                    behind = None;
                    warn!(error = %e, "enrollment not reconciled; retrying")
                }
            }
        }
    }
}

impl Agent {
    /// Puts the node's tables back, with every held pod, whenever they are
    /// gone (an older agent's late removal after this one installed them,
    /// an admin's), every [`RESYNC`]; holds off adds and deletes meanwhile.
    pub(crate) async fn tables_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some(host) = &self.host else { return };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESYNC) => {}
            }
            let _op = self.ops.lock().await;
            if stop.is_cancelled() {
                return; // the stop may have removed them: an uninstall
            }
            let pods = self.pods.lock().await;
            match crate::host::ensure(host, &crate::agent::held_ips(&pods)) {
                Ok(false) => {}
                Ok(true) => info!(
                    pods = pods.len(),
                    "the node's probe tables were gone: reinstalled"
                ),
                Err(e) => {
                    warn!(error = %e, "reinstalling the node's probe tables failed; retrying")
                }
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

    /// An agent on node-1 watching `source`, with no ztunnel, looking for
    /// netns under an empty /proc.
    fn agent(dir: &std::path::Path, source: Option<crate::agent::watch::Source>) -> Agent {
        use tokio::sync::Mutex;
        Agent {
            cfg: crate::agent::AgentConfig {
                zds_socket: dir.join("zds.sock"),
                control_socket: dir.join("control.sock"),
                state_file: dir.join("pods.json"),
                dns: false,
                host_netns: None,
                finder: crate::find::Finder {
                    proc_dir: dir.join("proc"),
                    pinned_dir: dir.join("netns"),
                },
                watch: Default::default(),
                uninstall: Default::default(),
            },
            host: None,
            source,
            reconciling: Mutex::new(()),
            ops: Mutex::new(()),
            pods: Mutex::new(BTreeMap::new()),
            ztunnels: Default::default(),
            fenced: Mutex::new(Default::default()),
            deleted: Default::default(),
        }
    }

    /// The `shop` namespace, enrolled, and its pod `web` (uid `u-1`,
    /// 10.1.1.5) on node-1, as the lab's object folder holds them.
    fn write_enrolled_web(objects: &std::path::Path) {
        std::fs::write(
            objects.join("shop.yaml"),
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u-1}
spec: {nodeName: node-1, containers: [{name: web, image: x}]}
status: {podIP: 10.1.1.5}
"#,
        )
        .expect("write");
    }

    /// A pod the CNI DEL tore down is not captured again from a watch that
    /// still shows it enrolled and running (behind, or relisting): its
    /// netns is dying, or its address someone else's by now.
    #[tokio::test]
    async fn a_pod_the_cni_deleted_is_not_captured_from_a_watch_behind() {
        use crate::agent::watch::Source;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(&objects).expect("objects");
        write_enrolled_web(&objects);
        let a = agent(
            dir.path(),
            Some(Source::Dir {
                node: "node-1".into(),
                dir: objects,
            }),
        );
        a.del("u-1", crate::agent::Leave::Delete)
            .await
            .expect("a delete of a pod not held");
        let r = a.sync().await;
        assert!(r.is_ok(), "the deleted pod was looked for: {r:?}");
    }

    fn spec(uid: &str, netns: &str) -> PodSpec {
        PodSpec {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            netns: netns.into(),
            ips: vec!["10.1.1.5".parse().unwrap()],
            bypass_inbound: false,
        }
    }

    /// A fresh netns (the node's own is refused as a pod's): its path, and
    /// an opener.
    fn pod_netns() -> (String, impl Fn() -> mesh_core::netns::Netns) {
        let path = crate::agent::tests::fresh_netns();
        let at = path.clone();
        (path, move || {
            mesh_core::netns::Netns::open(&at).expect("the pod's netns")
        })
    }

    /// A DEL landing between the watch's look and the capture wins; a CNI
    /// ADD that fails leaves the hold (only a capture ends it).
    #[tokio::test]
    async fn a_del_holds_off_the_watchs_capture_until_a_cni_add_captures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = agent(dir.path(), None);
        let (path, open) = pod_netns();
        a.del("u-1", crate::agent::Leave::Delete)
            .await
            .expect("del");
        let r = a
            .add_opened(spec("u-1", &path), open(), Origin::Watch)
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert!(a.pods.lock().await.is_empty());
        // The CNI ADD goes ahead (to the ztunnel, absent here: it fails).
        let r = a.add_opened(spec("u-1", &path), open(), Origin::Cni).await;
        assert!(matches!(r, Err(AgentError::NotConnected)), "{r:?}");
        assert!(a.deleted().holds("u-1", std::time::Instant::now(), false));
    }

    /// The hold ends: KEEP after the DEL the watch looks for the pod again
    /// (one made again while unenrolled is captured then).
    #[tokio::test]
    async fn a_hold_ends_keep_after_the_del() {
        use crate::agent::watch::Source;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(&objects).expect("objects");
        write_enrolled_web(&objects);
        let a = agent(
            dir.path(),
            Some(Source::Dir {
                node: "node-1".into(),
                dir: objects,
            }),
        );
        let long_ago = std::time::Instant::now()
            .checked_sub(super::super::deleted::KEEP + Duration::from_secs(1))
            .expect("a monotonic clock past KEEP");
        a.deleted().insert("u-1", long_ago);
        let r = a.sync().await;
        assert!(
            matches!(&r, Err(SyncError::Pods(p)) if matches!(&p[..], [PodError::Find { .. }])),
            "the pod was not looked for again: {r:?}"
        );
    }

    /// One netns is one pod: the watch finding a held pod's netns (by any
    /// path) by an address another pod had does not capture it under the
    /// other's name; the CNI ADD's word drops the other, stale entry; and
    /// the watch never moves a held pod to another netns.
    #[tokio::test]
    async fn one_netns_is_one_pod() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let a = agent(dir.path(), None);
        let (path, open) = pod_netns();
        a.pods.lock().await.insert(
            "u-old".into(),
            crate::agent::Pod {
                spec: spec("u-old", &path),
                netns: open(),
                no_orig_src: None,
            },
        );
        let again = open();
        let by_fd = format!("/proc/self/fd/{}", again.fd().as_raw_fd());
        let r = a
            .add_opened(spec("u-new", &by_fd), open(), Origin::Watch)
            .await;
        assert!(
            matches!(&r, Err(AgentError::NetnsHeld { uid, .. }) if uid == "u-old"),
            "{r:?}"
        );
        assert!(a.pods.lock().await.contains_key("u-old"));
        // The watch finds u-old elsewhere: it stays where it is.
        let (other, open_other) = pod_netns();
        let r = a
            .add_opened(spec("u-old", &other), open_other(), Origin::Watch)
            .await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(a.pods.lock().await["u-old"].spec.netns, path);
        // The kubelet made this netns for u-new now: u-old's entry goes,
        // and the add goes on (to the ztunnel, absent here).
        let r = a
            .add_opened(spec("u-new", &path), open(), Origin::Cni)
            .await;
        assert!(matches!(r, Err(AgentError::NotConnected)), "{r:?}");
        assert!(a.pods.lock().await.is_empty());
    }

    /// A watch that failed and has shown nothing since is not acted on:
    /// its store is what it was before (an outage, a 403 while the API
    /// server's RBAC loads after a restart), and a namespace label removed
    /// meanwhile would still capture its new pods.
    #[tokio::test]
    async fn a_watch_behind_is_not_acted_on() {
        use crate::agent::watch::Source;
        use kube::runtime::watcher::Event;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        let (pods, mut pw) = kube::runtime::reflector::store();
        let (namespaces, mut nw) = kube::runtime::reflector::store();
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {"nodeName": "node-1", "containers": []},
            "status": {"podIP": "10.1.1.5"}
        }))
        .expect("a pod");
        let ns: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}
        }))
        .expect("a namespace");
        for e in [Event::Init, Event::InitApply(pod), Event::InitDone] {
            pw.apply_watcher_event(&e);
        }
        for e in [Event::Init, Event::InitApply(ns), Event::InitDone] {
            nw.apply_watcher_event(&e);
        }
        let behind: [std::sync::Arc<std::sync::atomic::AtomicBool>; 2] = Default::default();
        let a = agent(
            dir.path(),
            Some(Source::Kube {
                node: "node-1".into(),
                pods,
                namespaces,
                behind: behind.clone(),
            }),
        );
        // Current: the enrolled pod is looked for (and not found here).
        let r = a.sync().await;
        assert!(matches!(r, Err(SyncError::Pods(_))), "{r:?}");
        behind[1].store(true, std::sync::atomic::Ordering::Relaxed);
        let r = a.sync().await;
        assert!(matches!(r, Err(SyncError::Behind)), "{r:?}");
    }

    /// Why a look at the watch did nothing is a variant the loop branches
    /// on (a watch not listed yet is no warning), with what it is about.
    #[tokio::test]
    async fn a_sync_says_why_it_did_nothing() {
        use crate::agent::watch::Source;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");

        let r = agent(dir.path(), None).sync().await;
        assert!(matches!(r, Err(SyncError::NoWatch)), "{r:?}");

        // Reflector stores nothing has filled yet: not listed.
        let (pods, _pw) = kube::runtime::reflector::store();
        let (namespaces, _nw) = kube::runtime::reflector::store();
        let kube = Source::Kube {
            node: "node-1".into(),
            pods,
            namespaces,
            behind: Default::default(),
        };
        let r = agent(dir.path(), Some(kube)).sync().await;
        assert!(matches!(r, Err(SyncError::NotListed)), "{r:?}");

        let objects = dir.path().join("objects");
        let dir_source = |d: &std::path::Path| Source::Dir {
            node: "node-1".into(),
            dir: d.to_path_buf(),
        };
        let r = agent(dir.path(), Some(dir_source(&objects))).sync().await;
        assert!(
            matches!(r, Err(SyncError::Watch(WatchError::Read { .. }))),
            "{r:?}"
        );

        // An enrolled pod whose netns is nowhere on the node: named.
        std::fs::create_dir_all(&objects).expect("objects");
        write_enrolled_web(&objects);
        let r = agent(dir.path(), Some(dir_source(&objects))).sync().await;
        let Err(SyncError::Pods(failed)) = &r else {
            panic!("a pod failure expected: {r:?}")
        };
        assert!(
            matches!(
                &failed[..],
                [PodError::Find { pod, source: FindError::NotFound(_) }] if pod == "shop/web"
            ),
            "{failed:?}"
        );
        assert!(
            r.as_ref()
                .unwrap_err()
                .to_string()
                .starts_with("shop/web: no netns on the node holds"),
            "{r:?}"
        );
    }
}
