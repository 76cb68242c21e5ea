//! The node agent (`ztunnel-cni`): serves ZDS to the node's ztunnel, installs
//! each captured pod's redirect rules, and takes pod adds and deletes on a
//! control socket (from the CNI plugin on Kubernetes, from the lab here).
//!
//! A pod is handed to the ztunnel first and its rules installed only once the
//! ztunnel acked, so traffic is never redirected to listeners that are not
//! there yet; removal goes the other way. The agent keeps its pods in a state
//! file, so a restarted agent re-syncs the ztunnel from the same snapshot.
//!
//! Every connected ztunnel gets every request ([`crate::agent::ztunnels`]):
//! during a roll the new ztunnel and the old one are both connected, and a
//! pod added or released meanwhile reaches both.
//!
//! With a watch ([`crate::agent::watch`]) the agent also captures running pods that
//! become enrolled and releases those that leave ([`crate::agent::reconcile`]), and
//! keeps the node's probe SNAT ([`crate::host`]) in step with its pods.

mod admit;
mod deleted;
mod fenced;
mod follow;
mod holders;
pub mod reconcile;
pub mod shutdown;
mod snapshot;
mod startup;
pub mod watch;
mod ztunnels;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, WorkloadInfo, workload_request::Payload,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio_seqpacket::UnixSeqpacketListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::fenced::FencedPods;
use crate::agent::startup::{
    bind_fresh, load_state, lock_state, open_pod_netns, owner_only, private_dir, refuse_node_netns,
    wait_for_other_agent,
};
use crate::agent::ztunnels::Ztunnels;
use crate::rules::{self, Capture};
use crate::{find, host, migrate};
use mesh_core::netns::Netns;
use mesh_core::zds;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub zds_socket: PathBuf,
    pub control_socket: PathBuf,
    pub state_file: PathBuf,
    /// Redirect DNS to the ztunnel's 15053.
    pub dns: bool,
    /// The node's own netns, where the probe SNAT goes (`/proc/self/ns/net`
    /// when the agent runs in it; `/host/proc/1/ns/net` in a pod that
    /// mounts the node's /proc). None: no probe SNAT.
    pub host_netns: Option<String>,
    /// Where running pods' netns are looked for.
    pub finder: find::Finder,
    /// Where enrollment is watched: none (CNI adds and deletes only), the
    /// API server, or a directory of objects (the lab).
    pub watch: Watch,
    /// Where a stop asks whether it is an uninstall (then the node's probe
    /// tables go; see [`crate::agent::shutdown`]).
    pub uninstall: crate::uninstalling::Check,
}

/// What the agent watches for enrollment.
#[derive(Debug, Clone, Default)]
pub enum Watch {
    #[default]
    None,
    /// The API server (in-cluster credentials), pods of this node.
    Kube { node: String },
    /// A directory of Pod and Namespace YAML, pods of this node.
    Dir { node: String, dir: PathBuf },
}

/// How long the ztunnel has to ack one request (or say hello).
#[cfg(not(test))]
pub(crate) const ZDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
#[cfg(test)]
pub(crate) const ZDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a pod could not be handed over or released, or the agent not
/// reached: what the CNI plugin (and through it the kubelet) reports.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "pod {uid}: its ports are not a ztunnel's ({why}) and its fence cannot go up: not captured"
    )]
    Unfenced { uid: String, why: String },
    #[error("the node's ztunnel is not connected")]
    NotConnected,
    #[error("the node's ztunnel is draining: it takes no new pod")]
    Draining,
    /// The node's own netns, never a pod's.
    #[error("netns {0} is the node's own, not a pod's")]
    NodeNetns(String),
    #[error("netns {netns} is already held by pod {uid}")]
    NetnsHeld { netns: String, uid: String },
    #[error("netns {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The ztunnel refused the pod (its ZDS answer).
    #[error("{0}")]
    Refused(String),
    #[error("lost the ztunnel: {0}")]
    Lost(#[source] zds::ZdsError),
    #[error("the ztunnel did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error(transparent)]
    Rules(#[from] rules::RulesError),
    #[error("cannot reach the node agent at {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("the node agent closed the connection")]
    Closed,
    /// The agent's answer to a request it could not carry out.
    #[error("{0}")]
    Answer(String),
}

/// A pod as the CNI plugin describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Path of the pod's netns, e.g. /var/run/netns/<name>.
    pub netns: String,
    /// The pod's addresses (read from its netns when not given).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `ambient.istio.io/bypass-inbound-capture`: outbound capture only.
    #[serde(default)]
    pub bypass_inbound: bool,
}

/// One control request (a JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(PodSpec),
    Del {
        uid: String,
    },
    List,
    /// Look at the watch now and act on it; answers once done, with the
    /// pods captured then (what the lab waits on after changing labels).
    Sync,
}

/// Who asks for a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The CNI ADD: the kubelet made the sandbox now.
    Cni,
    /// The watch: a running pod became enrolled.
    Watch,
}

/// How a pod leaves the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leave {
    /// It lives on (opted out): its rules go but the guard
    /// ([`rules::guard_only`]).
    Release,
    /// It is deleted (CNI DEL): everything goes.
    Delete,
}

pub(crate) struct Pod {
    pub(crate) spec: PodSpec,
    pub(crate) netns: Netns,
    /// Captured without the original-source part of its rules: why.
    pub(crate) no_orig_src: Option<String>,
}

/// Installs a pod's rules; a capture without original source is logged
/// (the ztunnel then dials its app from the pod's own address) and its
/// reason returned.
fn install_rules(
    netns: &Netns,
    spec: &PodSpec,
    c: Capture,
) -> Result<Option<String>, rules::RulesError> {
    match rules::install(netns, c, spec.ips.iter().any(IpAddr::is_ipv6))? {
        rules::OrigSrc::On => Ok(None),
        rules::OrigSrc::Off(e) => {
            warn!(uid = %spec.uid, pod = %format!("{}/{}", spec.namespace, spec.name), error = %e,
                "pod captured without original source: its app sees the pod's own address as its clients'");
            Ok(Some(e.to_string()))
        }
    }
}

/// The held pods captured without original source, for the control
/// socket's answers.
fn without_orig_src(pods: &BTreeMap<String, Pod>) -> serde_json::Value {
    pods.values()
        .filter_map(|p| {
            let why = p.no_orig_src.as_ref()?;
            Some(serde_json::json!({"uid": p.spec.uid, "pod": format!("{}/{}", p.spec.namespace, p.spec.name), "error": why}))
        })
        .collect()
}

pub(crate) struct Agent {
    pub(crate) cfg: AgentConfig,
    /// The node's netns, for the probe SNAT.
    pub(crate) host: Option<Netns>,
    /// The watch, when there is one.
    pub(crate) source: Option<crate::agent::watch::Source>,
    /// One reconcile at a time (the periodic one and a Sync).
    pub(crate) reconciling: Mutex<()>,
    /// One add, delete or snapshot at a time: each is a ZDS exchange plus
    /// rule changes, and they must not interleave (a delete overtaking the
    /// add it cancels would leave the pod captured).
    pub(crate) ops: Mutex<()>,
    pub(crate) pods: Mutex<BTreeMap<String, Pod>>,
    pub(crate) ztunnels: Ztunnels,
    /// Pods fenced ([`crate::agent::fenced`]); taken after `pods` and
    /// the ztunnels' connections.
    pub(crate) fenced: Mutex<crate::agent::fenced::FencedPods>,
    /// The uids the CNI DEL tore down a moment ago
    /// ([`crate::agent::deleted`]).
    pub(crate) deleted: std::sync::Mutex<deleted::Deleted>,
}

pub(crate) fn info_of(p: &PodSpec) -> WorkloadInfo {
    WorkloadInfo {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: p.service_account.clone(),
    }
}

impl Agent {
    async fn persist(&self, pods: &BTreeMap<String, Pod>) {
        let specs: Vec<&PodSpec> = pods.values().map(|p| &p.spec).collect();
        let tmp = self.cfg.state_file.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&specs).unwrap_or_default();
        if let Err(e) =
            std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.cfg.state_file))
        {
            warn!(path = %self.cfg.state_file.display(), error = %e, "cannot persist the agent's pods");
        }
    }

    /// Sends one request to the connected ztunnels and waits for their
    /// acks (the newest one's is the answer).
    async fn to_ztunnel(&self, payload: Payload, netns: Option<&Netns>) -> Result<(), AgentError> {
        self.ztunnels.request(payload, netns.map(Netns::fd)).await
    }

    /// Tells the ztunnels a pod is gone (DelWorkload).
    pub(crate) async fn tell_del(&self, uid: &str) -> Result<(), AgentError> {
        let del = Payload::Del(DelWorkload {
            uid: uid.to_string(),
        });
        self.to_ztunnel(del, None).await
    }

    fn capture_of(&self, spec: &PodSpec) -> Capture {
        Capture {
            dns: self.cfg.dns,
            bypass_inbound: spec.bypass_inbound,
        }
    }

    /// Adds or removes pod addresses in the node's probe SNAT set; `held`
    /// are the pods held besides (for a reinstall when the table is gone).
    fn probe_snat(&self, held: &BTreeMap<String, Pod>, ips: &[IpAddr], captured: bool) {
        let Some(h) = &self.host else { return };
        let mut all = held_ips(held);
        for ip in ips {
            if captured {
                all.insert(*ip);
            } else {
                all.remove(ip);
            }
        }
        if let Err(e) = host::update(h, ips, captured, &all) {
            warn!(?ips, captured, error = %e, "updating the node's probe SNAT failed");
        }
    }

    pub(crate) async fn add(&self, spec: PodSpec) -> Result<(), AgentError> {
        let netns = open_pod_netns(&self.cfg, &spec.netns)?;
        self.add_opened(spec, netns, Origin::Cni).await
    }

    /// The uids the CNI DEL tore down (a poisoned lock is still a list).
    pub(crate) fn deleted(&self) -> std::sync::MutexGuard<'_, deleted::Deleted> {
        self.deleted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Captures a pod whose netns is open: an add for a pod already held
    /// (the CNI plugin and the watch both saw it) changes nothing.
    pub(crate) async fn add_opened(
        &self,
        mut spec: PodSpec,
        netns: Netns,
        origin: Origin,
    ) -> Result<(), AgentError> {
        refuse_node_netns(&self.cfg, &spec.netns, &netns)?;
        let _op = self.ops.lock().await;
        if self.admit(&spec, &netns, origin).await? == admit::Admit::Nothing {
            return Ok(());
        }
        if spec.ips.is_empty() {
            spec.ips = find::addresses(&netns).map_err(|source| AgentError::Netns {
                path: spec.netns.clone(),
                source,
            })?;
        }
        let payload = Payload::Add(AddWorkload {
            uid: spec.uid.clone(),
            workload_info: Some(info_of(&spec)),
        });
        // Before any listener of its could close (a roll).
        if let Err(e) = migrate::enable(&netns) {
            warn!(uid = %spec.uid, error = %e, "cannot turn on tcp_migrate_req in the pod: a ztunnel roll may reset connections queued at its switch");
        }
        // A gap from here on may have fenced every pod but this one.
        let gaps = self.ztunnels.gaps();
        self.to_ztunnel(payload, Some(&netns)).await?;
        // Whose sockets the redirects would land on: a pod that fails is
        // fenced before its rules go in.
        let ours = self.ztunnels.ours().await.unwrap_or_default();
        let outcome = fenced::check(&spec, &netns, self.cfg.dns, &ours);
        let mut fence = FencedPods::new();
        fenced::judge(&spec, &netns, outcome, &mut fence);
        if let Some(f) = fence.get(&spec.uid).filter(|f| !f.up) {
            // Neither a ztunnel's ports nor a fence: its rules would hand
            // its connections to whoever holds them. Not captured.
            let why = f.why.clone();
            let _ = self.tell_del(&spec.uid).await;
            return Err(AgentError::Unfenced {
                uid: spec.uid.clone(),
                why,
            });
        }
        let no_orig_src = match install_rules(&netns, &spec, self.capture_of(&spec)) {
            Ok(n) => n,
            Err(e) => {
                // Undo the hand-over: the ztunnel must not hold a pod whose
                // traffic nothing redirects (and that nobody would release).
                let _ = self.tell_del(&spec.uid).await;
                if !fence.is_empty() {
                    let _ = crate::fence::lift(&netns);
                }
                return Err(e.into());
            }
        };
        let mut pods = self.pods.lock().await;
        self.probe_snat(&pods, &spec.ips, true);
        info!(uid = %spec.uid, pod = %format!("{}/{}", spec.namespace, spec.name), "pod captured");
        if origin == Origin::Cni {
            // A new sandbox of the pod, captured: a DEL before it is over.
            self.deleted().remove(&spec.uid);
        }
        let ips = spec.ips.clone();
        let uid = spec.uid.clone();
        // The same pod in a new sandbox: its old addresses leave the set.
        let pod = Pod {
            spec,
            netns,
            no_orig_src,
        };
        if let Some(old) = pods.insert(pod.spec.uid.clone(), pod) {
            let gone: Vec<IpAddr> = old
                .spec
                .ips
                .into_iter()
                .filter(|ip| !ips.contains(ip))
                .collect();
            self.probe_snat(&pods, &gone, false);
        }
        self.persist(&pods).await;
        let mut fenced = self.fenced.lock().await;
        fenced.remove(&uid);
        fenced.extend(fence);
        if self.ztunnels.gaps() != gaps
            && let Some(p) = pods.get(&uid)
        {
            let why = "no ztunnel is connected".to_string();
            fenced::put_up(&p.spec, &p.netns, why, &mut fenced);
        }
        Ok(())
    }

    /// Re-applies a held pod's rules with a changed bypass (the annotation
    /// changed while it was captured).
    pub(crate) async fn set_bypass(&self, uid: &str, bypass_inbound: bool) {
        let _op = self.ops.lock().await;
        let mut pods = self.pods.lock().await;
        let Some(p) = pods.get_mut(uid) else { return };
        p.spec.bypass_inbound = bypass_inbound;
        match install_rules(&p.netns, &p.spec, self.capture_of(&p.spec)) {
            Ok(n) => p.no_orig_src = n,
            Err(e) => {
                warn!(uid, error = %e, "re-applying the pod's rules failed");
                p.no_orig_src = Some(e.to_string());
            }
        }
        self.persist(&pods).await;
    }

    pub(crate) async fn del(&self, uid: &str, how: Leave) -> Result<(), AgentError> {
        let _op = self.ops.lock().await;
        if how == Leave::Delete {
            self.deleted().insert(uid, std::time::Instant::now());
        }
        // Never held across the ztunnels' answer (the fence watch takes
        // it): the pod is gone from the agent's list first.
        let Some(pod) = self.pods.lock().await.remove(uid) else {
            return Ok(()); // already gone: deletes are idempotent
        };
        // The ztunnel first: it closes the pod's connections. It may not
        // answer (not connected, slow): a released pod keeps the guard, so
        // the replies of a transparent connection still open never leave
        // the pod in cleartext.
        if let Err(e) = self.tell_del(uid).await {
            warn!(uid, error = %e, "the ztunnel did not confirm the pod's removal");
        }
        let removed = match how {
            Leave::Release => rules::release(&pod.netns),
            Leave::Delete => rules::remove(&pod.netns),
        };
        if let Err(e) = removed {
            warn!(uid, error = %e, "removing the pod's rules failed (its netns may be gone)");
        }
        // After the redirects went: never a moment with them unfenced.
        if self.fenced.lock().await.remove(uid).is_some()
            && let Err(e) = crate::fence::lift(&pod.netns)
        {
            warn!(uid, error = %e, "lifting the pod's fence failed (its netns may be gone)");
        }
        let pods = self.pods.lock().await;
        self.probe_snat(&pods, &pod.spec.ips, false);
        info!(uid, "pod released");
        self.persist(&pods).await;
        Ok(())
    }
}

/// Every address of the pods `held`.
pub(crate) fn held_ips(held: &BTreeMap<String, Pod>) -> BTreeSet<IpAddr> {
    held.values().flat_map(|p| p.spec.ips.clone()).collect()
}

/// The node's netns with the probe SNAT installed for `pods`; None when not
/// configured or it cannot be set up (probes then go through the mesh, as
/// before: nothing is opened wider).
fn open_host(cfg: &AgentConfig, pods: &BTreeMap<String, Pod>) -> Option<Netns> {
    let path = cfg.host_netns.as_deref()?;
    let ips = held_ips(pods);
    match Netns::open(path).map(|h| host::install(&h, &ips).map(|()| h)) {
        Ok(Ok(h)) => Some(h),
        Ok(Err(e)) => {
            warn!(netns = path, error = %e, "cannot install the node's probe SNAT");
            None
        }
        Err(e) => {
            warn!(netns = path, error = %e, "cannot open the node's netns");
            None
        }
    }
}

/// Runs the agent until `stop`.
pub async fn run(cfg: AgentConfig, stop: CancellationToken) -> std::io::Result<()> {
    // Another agent's sockets are never unlinked under it, nor its state
    // file written.
    tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        _ = wait_for_other_agent(&cfg.control_socket) => {}
    }
    let _state_lock = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        l = lock_state(&cfg.state_file) => l?,
    };
    let pods = load_state(&cfg);
    let fenced = fenced::left_fenced(&pods);
    for s in [&cfg.zds_socket, &cfg.control_socket] {
        if let Some(dir) = s.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(dir)?;
        }
        bind_fresh(s)?;
    }
    let zds_listener = UnixSeqpacketListener::bind(&cfg.zds_socket)?;
    let control = UnixListener::bind(&cfg.control_socket)?;
    owner_only(&cfg.zds_socket)?;
    owner_only(&cfg.control_socket)?;
    let host = open_host(&cfg, &pods);
    let changed = Arc::new(tokio::sync::Notify::new());
    let source = crate::agent::watch::Source::start(&cfg.watch, changed.clone())
        .await
        .map_err(std::io::Error::other)?;
    info!(zds = %cfg.zds_socket.display(), control = %cfg.control_socket.display(), pods = pods.len(), watch = ?cfg.watch, "node agent started");
    let agent = Arc::new(Agent {
        cfg,
        host,
        source,
        reconciling: Mutex::new(()),
        ops: Mutex::new(()),
        pods: Mutex::new(pods),
        ztunnels: Ztunnels::default(),
        fenced: Mutex::new(fenced),
        deleted: Default::default(),
    });
    tokio::spawn(agent.clone().fence_loop(stop.clone()));
    if agent.source.is_some() {
        tokio::spawn(agent.clone().watch_loop(changed, stop.clone()));
    }
    if agent.host.is_some() {
        tokio::spawn(agent.clone().tables_loop(stop.clone()));
    }
    // Which DaemonSet this agent runs under, for the stop to judge by.
    let check = agent.cfg.uninstall.clone();
    let seen = tokio::spawn(async move { crate::uninstalling::observe(&check).await });
    serve(agent.clone(), zds_listener, control, stop).await;
    // No add or delete between the count and the removal.
    let _op = agent.ops.lock().await;
    let captured = agent.pods.lock().await.len();
    let seen = match seen.is_finished() {
        true => seen.await.unwrap_or(crate::uninstalling::Seen::Unknown),
        false => crate::uninstalling::Seen::Unknown,
    };
    shutdown::on_stop(agent.host.as_ref(), &agent.cfg.uninstall, &seen, captured).await;
    Ok(())
}

/// The agent's loop: ZDS and control connections until `stop`. Nothing in
/// it waits on a ztunnel: a ztunnel that hangs holds only the requests
/// that need it, never the accepts.
async fn serve(
    agent: Arc<Agent>,
    mut zds_listener: UnixSeqpacketListener,
    control: UnixListener,
    stop: CancellationToken,
) {
    // A ztunnel that ended (the old one of a roll, once drained) is
    // forgotten within a second, not only at the next request; skipped
    // while a request holds the connections (it prunes them itself).
    let mut prune = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = prune.tick() => agent.ztunnels.try_prune(),
            c = zds_listener.accept() => match c {
                Ok(sock) => {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        if let Err(e) = agent.snapshot(sock).await {
                            warn!(error = %e, "ZDS snapshot to the ztunnel failed");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "ZDS accept failed"),
            },
            c = control.accept() => match c {
                Ok((stream, _)) => {
                    tokio::spawn(serve_control(agent.clone(), stream));
                }
                Err(e) => warn!(error = %e, "control accept failed"),
            },
        }
    }
}

async fn serve_control(agent: Arc<Agent>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
            Ok(Request::Add(spec)) => match agent.add(spec).await {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            Ok(Request::Del { uid }) => match agent.del(&uid, Leave::Delete).await {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            Ok(Request::Sync) => match agent.sync().await {
                Ok(()) => {
                    let pods = agent.pods.lock().await;
                    serde_json::json!({"ok": true, "pods": pods.values().map(|p| &p.spec).collect::<Vec<_>>(), "without_original_source": without_orig_src(&pods)})
                }
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            Ok(Request::List) => {
                // Whether an add would reach a ztunnel now (taken before the
                // pods, never both at once: adds hold this lock).
                let ztunnels = agent.ztunnels.count().await;
                let unready = agent.ztunnels.pending().await;
                let pods = agent.pods.lock().await;
                let fenced: BTreeMap<String, String> = agent
                    .fenced
                    .lock()
                    .await
                    .iter()
                    .map(|(u, f)| (u.clone(), f.why.clone()))
                    .collect();
                serde_json::json!({"ok": true, "ztunnel_connected": ztunnels > 0, "ztunnels": ztunnels, "unready": unready, "fenced": fenced, "pods": pods.values().map(|p| &p.spec).collect::<Vec<_>>(), "without_original_source": without_orig_src(&pods)})
            }
        };
        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Client side (the CNI plugin, the lab): one request, one answer.
pub async fn call(control_socket: &Path, req: &Request) -> Result<serde_json::Value, AgentError> {
    let stream = UnixStream::connect(control_socket)
        .await
        .map_err(|source| AgentError::Unreachable {
            path: control_socket.display().to_string(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let line = serde_json::to_string(req)?;
    w.write_all(format!("{line}\n").as_bytes()).await?;
    let reply = BufReader::new(r)
        .lines()
        .next_line()
        .await?
        .ok_or(AgentError::Closed)?;
    let v: serde_json::Value = serde_json::from_str(&reply)?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) => Err(AgentError::Answer(e.to_string())),
        None => Ok(v),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fence;
#[cfg(test)]
mod tests_roll;
