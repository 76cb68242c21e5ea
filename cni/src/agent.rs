//! The node agent (`ztunnel-cni`): serves ZDS to the node's ztunnel, installs
//! each captured pod's redirect rules, and takes pod adds and deletes on a
//! control socket (from the CNI plugin on Kubernetes, from the lab here).
//!
//! A pod is handed to the ztunnel first and its rules installed only once the
//! ztunnel acked, so traffic is never redirected to listeners that are not
//! there yet; removal goes the other way. The agent keeps its pods in a state
//! file, so a restarted agent re-syncs the ztunnel from the same snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo, workload_request::Payload,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::rules;
use mesh_core::netns::Netns;
use mesh_core::zds;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub zds_socket: PathBuf,
    pub control_socket: PathBuf,
    pub state_file: PathBuf,
    /// Redirect DNS to the ztunnel's 15053.
    pub dns: bool,
}

/// How long the ztunnel has to ack one request.
const ZDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a pod could not be handed over or released, or the agent not
/// reached: what the CNI plugin (and through it the kubelet) reports.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the node's ztunnel is not connected")]
    NotConnected,
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
}

/// One control request (a JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Add(PodSpec),
    Del { uid: String },
    List,
}

struct Pod {
    spec: PodSpec,
    netns: Netns,
}

struct Agent {
    cfg: AgentConfig,
    /// One add, delete or snapshot at a time: each is a ZDS exchange plus
    /// rule changes, and they must not interleave (a delete overtaking the
    /// add it cancels would leave the pod captured).
    ops: Mutex<()>,
    pods: Mutex<BTreeMap<String, Pod>>,
    ztunnel: Mutex<Option<UnixSeqpacket>>,
}

fn info_of(p: &PodSpec) -> WorkloadInfo {
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

    /// Sends one request to the connected ztunnel and waits for its ack.
    async fn to_ztunnel(&self, payload: Payload, netns: Option<&Netns>) -> Result<(), AgentError> {
        let mut slot = self.ztunnel.lock().await;
        let Some(sock) = slot.as_ref() else {
            return Err(AgentError::NotConnected);
        };
        let fd = netns.map(|n| n.fd().try_clone_to_owned()).transpose()?;
        // A ztunnel that stops answering must not hold every CNI call: give
        // up, and drop the connection (a late ack would pair with the wrong
        // request otherwise).
        match tokio::time::timeout(ZDS_TIMEOUT, zds::request(sock, payload, fd.as_ref())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(zds::ZdsError::Protocol(m))) => Err(AgentError::Refused(m)),
            Ok(Err(e)) => {
                *slot = None;
                Err(AgentError::Lost(e))
            }
            Err(_) => {
                *slot = None;
                Err(AgentError::Timeout(ZDS_TIMEOUT))
            }
        }
    }

    async fn add(&self, spec: PodSpec) -> Result<(), AgentError> {
        let _op = self.ops.lock().await;
        let netns = Netns::open(&spec.netns).map_err(|source| AgentError::Netns {
            path: spec.netns.clone(),
            source,
        })?;
        let payload = Payload::Add(AddWorkload {
            uid: spec.uid.clone(),
            workload_info: Some(info_of(&spec)),
        });
        self.to_ztunnel(payload, Some(&netns)).await?;
        if let Err(e) = rules::install(&netns, self.cfg.dns) {
            // Undo the hand-over: the ztunnel must not hold a pod whose
            // traffic nothing redirects (and that nobody would release).
            let _ = self
                .to_ztunnel(
                    Payload::Del(DelWorkload {
                        uid: spec.uid.clone(),
                    }),
                    None,
                )
                .await;
            return Err(e.into());
        }
        let mut pods = self.pods.lock().await;
        info!(uid = %spec.uid, pod = %format!("{}/{}", spec.namespace, spec.name), "pod captured");
        pods.insert(spec.uid.clone(), Pod { spec, netns });
        self.persist(&pods).await;
        Ok(())
    }

    async fn del(&self, uid: &str) -> Result<(), AgentError> {
        let _op = self.ops.lock().await;
        let mut pods = self.pods.lock().await;
        let Some(pod) = pods.remove(uid) else {
            return Ok(()); // already gone: deletes are idempotent
        };
        if let Err(e) = rules::remove(&pod.netns) {
            warn!(uid, error = %e, "removing the pod's rules failed (its netns may be gone)");
        }
        let _ = self
            .to_ztunnel(
                Payload::Del(DelWorkload {
                    uid: uid.to_string(),
                }),
                None,
            )
            .await;
        info!(uid, "pod released");
        self.persist(&pods).await;
        Ok(())
    }

    /// A (re)connected ztunnel gets every pod, then SnapshotSent.
    async fn snapshot(&self, sock: UnixSeqpacket) -> Result<(), zds::ZdsError> {
        zds::recv_hello(&sock).await?;
        let _op = self.ops.lock().await;
        let pods = self.pods.lock().await;
        for p in pods.values() {
            let fd = p.netns.fd().try_clone_to_owned()?;
            let add = Payload::Add(AddWorkload {
                uid: p.spec.uid.clone(),
                workload_info: Some(info_of(&p.spec)),
            });
            if let Err(e) = zds::request(&sock, add, Some(&fd)).await {
                warn!(uid = %p.spec.uid, error = %e, "ztunnel refused a pod in the snapshot");
            }
        }
        zds::request(&sock, Payload::SnapshotSent(SnapshotSent {}), None).await?;
        info!(pods = pods.len(), "snapshot sent to the ztunnel");
        *self.ztunnel.lock().await = Some(sock);
        Ok(())
    }
}

fn bind_fresh(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Runs the agent until `stop`.
pub async fn run(cfg: AgentConfig, stop: CancellationToken) -> std::io::Result<()> {
    // Pods from before a restart: re-open their netns and re-apply rules.
    let mut pods = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&cfg.state_file) {
        let specs: Vec<PodSpec> = serde_json::from_str(&text).unwrap_or_default();
        for spec in specs {
            match Netns::open(&spec.netns) {
                Ok(netns) => {
                    if let Err(e) = rules::install(&netns, cfg.dns) {
                        warn!(uid = %spec.uid, error = %e, "re-applying rules failed");
                    }
                    pods.insert(spec.uid.clone(), Pod { spec, netns });
                }
                Err(e) => {
                    warn!(uid = %spec.uid, netns = %spec.netns, error = %e, "pod from the state file is gone")
                }
            }
        }
    }
    bind_fresh(&cfg.zds_socket)?;
    bind_fresh(&cfg.control_socket)?;
    let mut zds_listener = UnixSeqpacketListener::bind(&cfg.zds_socket)?;
    let control = UnixListener::bind(&cfg.control_socket)?;
    info!(zds = %cfg.zds_socket.display(), control = %cfg.control_socket.display(), pods = pods.len(), "node agent started");
    let agent = Arc::new(Agent {
        cfg,
        ops: Mutex::new(()),
        pods: Mutex::new(pods),
        ztunnel: Mutex::new(None),
    });
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
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
            Ok(Request::Del { uid }) => match agent.del(&uid).await {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            },
            Ok(Request::List) => {
                // Whether an add would reach a ztunnel now (taken before the
                // pods, never both at once: adds hold this lock).
                let connected = agent.ztunnel.lock().await.is_some();
                let pods = agent.pods.lock().await;
                serde_json::json!({"ok": true, "ztunnel_connected": connected, "pods": pods.values().map(|p| &p.spec).collect::<Vec<_>>()})
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
