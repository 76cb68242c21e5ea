//! The lab as the kubelet of a real Kubernetes API server (`lab up
//! --kube`): it registers the lab's nodes as Node objects and plays, for
//! them, the parts of a cluster that the bare API server lacks:
//!
//! - the scheduler (a pod without `nodeName` is bound to the node with the
//!   fewest pods) and the kubelet (pods run as processes in netns of their
//!   node, with their volumes, environment and projected tokens, their
//!   status written through the status subresource): [`pods`];
//! - the controllers a lab needs: Deployments -> ReplicaSets -> Pods and
//!   DaemonSets (with owner references), each namespace's `default`
//!   ServiceAccount and `kube-root-ca.crt`: [`controllers`]; the garbage
//!   collector and the namespace controller: [`gc`]; EndpointSlices,
//!   kube-proxy and the cluster's DNS names: [`endpoints`].
//!
//! Images map to the workspace's binaries ([`images`]); a container is a
//! process with its volumes bind-mounted ([`runtime`]); CNI plugins chained
//! after the lab's network run as a runtime runs them ([`cni`]). The mesh
//! itself comes from `manifests/` through `kubectl` like any workload.

mod apiserver;
mod cni;
mod container;
mod controllers;
mod endpoints;
mod error;
mod gc;
mod images;
mod logs;
mod pods;
mod probes;
mod runtime;
mod status;
mod streaming;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use tokio::sync::mpsc;

pub use apiserver::{SERVICE_IP, SERVICE_PORT, plane_down, plane_script, plane_up};
pub use error::KubeletError;
pub use images::IMAGES;

use crate::lab::{KubeState, Lab};
use error::Result;

/// How often the kubelet and the controllers look at the API server.
const TICK: Duration = Duration::from_millis(400);

/// The kubelet of every node of one lab, and the controllers.
pub struct Kubelet {
    lab: Lab,
    client: Client,
    ca_pem: String,
    root: PathBuf,
    pods: BTreeMap<String, pods::RunPod>,
    used: BTreeMap<String, BTreeSet<u8>>,
    next_netns: u32,
    done_tx: mpsc::UnboundedSender<pods::Finished>,
    done_rx: mpsc::UnboundedReceiver<pods::Finished>,
    terminating: BTreeSet<String>,
    endpoints: endpoints::Last,
}

/// The node's root directory: its `hostPath` volumes, CNI config and
/// binaries.
pub fn node_root(dir: &Path, node: &str) -> PathBuf {
    dir.join("kube/nodes").join(node)
}

/// The node's `/proc` as its `hostPath` shows it: the node's pid 1, whose
/// `ns/net` is the node's netns (where the node agent puts the probe SNAT).
/// The pods' netns are found under `/var/run/netns`, the machine's.
fn node_proc(root: &Path, node_netns: &str) -> Result<()> {
    let ns = root.join("proc/1/ns");
    std::fs::create_dir_all(&ns)
        .map_err(|e| KubeletError::Setup(format!("{}: {e}", ns.display())))?;
    let link = ns.join("net");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(PathBuf::from("/var/run/netns").join(node_netns), &link)
            .map_err(|e| KubeletError::Setup(format!("{}: {e}", link.display())))?;
    }
    Ok(())
}

impl Kubelet {
    /// Takes the lab at `dir` (its network made), the API server of
    /// `kubeconfig`: routes the lab's network to the API server, registers
    /// the nodes.
    pub async fn new(dir: &Path, kubeconfig: &Path) -> Result<Kubelet> {
        let lab = Lab::load(dir).map_err(|e| KubeletError::Setup(e.to_string()))?;
        let client = apiserver::client(kubeconfig).await?;
        let ca_pem = apiserver::ca_pem(kubeconfig)?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut k = Kubelet {
            lab,
            client,
            ca_pem,
            root: dir.join("kube"),
            pods: BTreeMap::new(),
            used: BTreeMap::new(),
            next_netns: 1,
            done_tx,
            done_rx,
            terminating: BTreeSet::new(),
            endpoints: endpoints::Last::default(),
        };
        apiserver::route_to_api(&k.lab)?;
        let upstream = apiserver::server_addr(kubeconfig)?;
        let ctl = PathBuf::from("/var/run/netns").join(k.lab.ns_name("ctl"));
        apiserver::forward_api(&ctl, upstream).await?;
        for n in k.lab.state.nodes.clone() {
            let root = node_root(dir, &n.name);
            cni::write_primary(&root)?;
            node_proc(&root, &n.netns)?;
        }
        let streaming = streaming::serve(dir.to_path_buf()).await?;
        controllers::register_nodes(&k.client, &k.lab, streaming).await?;
        k.lab
            .state
            .kube
            .get_or_insert_with(KubeState::default)
            .kubelet_pid = Some(std::process::id());
        k.lab
            .save()
            .map_err(|e| KubeletError::Setup(e.to_string()))?;
        Ok(k)
    }

    /// Runs until the process is ended (`lab down`). A failed step is
    /// logged and tried again on the next tick: the API server may be away.
    pub async fn run(mut self) -> Result<()> {
        loop {
            self.tick().await;
            tokio::time::sleep(TICK).await;
        }
    }

    async fn tick(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.finished(done);
        }
        let client = self.client.clone();
        if let Err(e) = controllers::sync(&client, &self.lab, &self.ca_pem).await {
            tracing::warn!("controllers: {e}");
        }
        if let Err(e) = gc::sync(&client).await {
            tracing::warn!("garbage collection: {e}");
        }
        if let Err(e) = self.sync_pods().await {
            tracing::warn!("pods: {e}");
        }
        if let Err(e) = self.sync_endpoints().await {
            tracing::warn!("endpoints: {e}");
        }
    }
}

/// At `lab down`: the kubelet first (so it starts nothing more), then,
/// after the rest of the lab is gone, the control plane the lab started and
/// the mount points its runtime made.
pub fn stop_kubelet(lab: &mut Lab) {
    let Some(pid) = lab.state.kube.as_ref().and_then(|k| k.kubelet_pid) else {
        return;
    };
    lab.end_pid(pid, false);
    // What it recorded up to its end.
    if let Ok(l) = Lab::load(&lab.dir) {
        lab.state = l.state;
        lab.state.pids.retain(|(p, _)| *p != pid);
    }
}

/// See [`stop_kubelet`].
pub fn after_down(kube: &KubeState, lab_dir: &Path) {
    if let Some((script, dir)) = &kube.plane {
        plane_down(Path::new(script), Path::new(dir));
    }
    runtime::remove_mountpoints(&kube.mountpoints);
    // The nodes' and pods' files (the images' links and the control
    // plane's unpacked server stay for the next run).
    for d in ["kube/nodes", "kube/pods"] {
        let _ = std::fs::remove_dir_all(lab_dir.join(d));
    }
}

/// Starts `lab kubelet` for `lab` (its network made, `lab.state.kube`
/// set) and waits until it has registered the nodes. From then on the
/// kubelet writes the lab's state: `lab` is reloaded from it here, and the
/// caller must not save its own copy.
pub fn start(lab: &mut Lab, kubeconfig: &Path) -> Result<()> {
    let cmd = vec![
        crate::mesh::binary("lab").display().to_string(),
        "--dir".into(),
        lab.dir.display().to_string(),
        "kubelet".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    let pid = lab
        .spawn("kubelet.log", &cmd)
        .map_err(|e| KubeletError::Setup(format!("starting lab kubelet: {e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(l) = Lab::load(&lab.dir)
            && l.state.kube.as_ref().and_then(|k| k.kubelet_pid) == Some(pid)
        {
            lab.state = l.state;
            return Ok(());
        }
        let log = std::fs::read_to_string(lab.dir.join("logs/kubelet.log")).unwrap_or_default();
        if !Path::new(&format!("/proc/{pid}")).exists()
            || crate::procfs::pid_stat(pid)
                .is_some_and(|f| f.first().map(String::as_str) == Some("Z"))
        {
            return Err(KubeletError::Setup(format!("lab kubelet exited:\n{log}")));
        }
        if std::time::Instant::now() > deadline {
            return Err(KubeletError::Setup(format!(
                "lab kubelet did not start in 60 s:\n{log}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
