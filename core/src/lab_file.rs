//! The lab's state file (`<dir>/lab.json`): what the lab (`e2e`) writes
//! and `meshctl --lab` reads to find the proxies, one schema for both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state file's name inside a lab's directory.
pub const FILE_NAME: &str = "lab.json";

/// Why a lab's state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LabFileError {
    #[error("reading {FILE_NAME}: {0}")]
    Read(#[source] std::io::Error),
    #[error("{FILE_NAME}: {0}")]
    Parse(#[source] serde_json::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub index: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    pub ip: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub args: Vec<String>,
    /// "labapp" (the lab's app, run with `args`), "waypoint", "ingress"
    /// (the waypoint binary in its ingress role), or "redis" (redis-server
    /// on the pod's IP, port 6379).
    #[serde(default = "labapp")]
    pub image: String,
    pub pid: Option<u32>,
    pub captured: bool,
}

fn labapp() -> String {
    "labapp".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    pub name: String,
    pub namespace: String,
    pub vip: String,
    pub selector: BTreeMap<String, String>,
    /// (port, targetPort)
    pub ports: Vec<(u16, u16)>,
}

/// A process the lab runs, restartable by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcState {
    pub netns: String,
    pub cmd: Vec<String>,
    pub log: String,
    pub env: Vec<(String, String)>,
    pub pid: Option<u32>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Named processes: "istiod-lite", "<node>-ztunnel", "<node>-cni".
    #[serde(default)]
    pub procs: BTreeMap<String, ProcState>,
    pub id: u8,
    pub prefix: String,
    pub nodes: Vec<NodeState>,
    pub pods: BTreeMap<String, PodState>,
    pub services: BTreeMap<String, ServiceState>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Every netns the lab made, in creation order.
    pub netns: Vec<String>,
    /// Every process the lab started, with its start time (clock ticks after
    /// boot), so a pid the system has since reused is never signalled.
    pub pids: Vec<(u32, u64)>,
    pub next_vip: u8,
    /// Ingress listener ports published on the machine's loopback, as a
    /// cloud load balancer would: "namespace/gateway:port" -> "127.0.0.1:N".
    #[serde(default)]
    pub published: BTreeMap<String, String>,
    /// The mesh's `pathNormalization`, written into every waypoint's and
    /// ingress's config as istiod-lite's `--path-normalization` is on
    /// Kubernetes; unset, the waypoint's default (BASE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<String>,
    /// YAML lines added under every waypoint's and ingress's `limits:`
    /// (each indented two spaces), for tests of those limits; empty: the
    /// lab's usual limits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub waypoint_limits: String,
    /// Ties the lab to its id's record (the lab's `Owner`).
    #[serde(default)]
    pub claim: String,
    /// YAML added to every ztunnel's config (experiments: the `lab` CLI and
    /// the benchmark take it from `LAB_ZTUNNEL_EXTRA`; tests never do).
    #[serde(default)]
    pub ztunnel_extra: String,
    /// The `PATH` the node agents run with (tests of an agent that lacks
    /// a program, e.g. `ip`); unset, the lab's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_path: Option<String>,
    /// Set when the lab is the kubelet of a real API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeState>,
}

impl LabState {
    /// The state file of the lab in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads the state of the lab in `dir`.
    pub fn read(dir: &Path) -> Result<LabState, LabFileError> {
        let text = std::fs::read_to_string(Self::path(dir)).map_err(LabFileError::Read)?;
        serde_json::from_str(&text).map_err(LabFileError::Parse)
    }
}

/// A lab that plays the kubelet of a real API server (`lab up --kube`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KubeState {
    /// The API server's admin kubeconfig (what `kubectl` uses).
    pub kubeconfig: String,
    /// The control plane the lab started: (its script, its directory),
    /// stopped at `lab down`. None when the lab was given a running one.
    #[serde(default)]
    pub plane: Option<(String, String)>,
    /// The `lab kubelet` process: stopped first at `lab down`, so it starts
    /// nothing more while the rest goes.
    #[serde(default)]
    pub kubelet_pid: Option<u32>,
    /// Mount points the lab's container runtime created on this machine
    /// (empty directories), removed at `lab down` when still empty.
    #[serde(default)]
    pub mountpoints: Vec<String>,
}
