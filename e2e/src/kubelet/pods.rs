//! The scheduler and the kubelet: pods bound to the lab's nodes run as
//! processes in a netns of their node (wired as the lab wires its pods),
//! after the node's chained CNI plugins ran and their volumes are there;
//! containers that exit are restarted with a growing delay; readiness
//! probes decide `Ready`; the status is written through the status
//! subresource. A deleted pod's processes get SIGTERM and its grace period
//! (at most 10 s in the lab), then CNI DEL, and the pod object goes.

use std::collections::BTreeSet;
use std::process::Child;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::cni::{CniPod, run_chain};
use super::container::{ContainerSpec, containers};
use super::error::{KubeletError, Result};
use super::runtime::{Launch, ensure_mountpoint, spawn};
use super::status::{ContainerView, now, pod_status};
use super::volumes::{PodVolumes, Volumes};
use super::{Kubelet, node_root};
use crate::lab::{KubeState, NodeState, PodState, start_time};

/// Where a pod's CNI ADD is.
pub enum Cni {
    Pending(Instant),
    Running(JoinHandle<std::result::Result<(), String>>),
    Done,
}

/// One container's process.
pub struct Running {
    pub spec: ContainerSpec,
    pub child: Option<Child>,
    pub restarts: i32,
    pub started_at: Option<String>,
    pub ready: bool,
    pub exited_at: Option<Instant>,
}

/// A pod this kubelet runs (or is getting ready to).
pub struct RunPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: NodeState,
    pub netns: String,
    pub ip: String,
    pub k: u8,
    pub volumes: PodVolumes,
    pub containers: Vec<Running>,
    pub cni: Cni,
    pub waiting: Option<String>,
    pub start_time: String,
    pub last_status: Option<Value>,
    pub last_refresh: Instant,
    pub last_probe: Instant,
}

impl RunPod {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn cni_pod(&self) -> CniPod {
        CniPod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            netns: self.netns.clone(),
            ip: self.ip.clone(),
            gateway: gateway(&self.ip),
        }
    }
}

fn gateway(ip: &str) -> String {
    match ip.rsplit_once('.') {
        Some((net, _)) => format!("{net}.1"),
        None => ip.to_string(),
    }
}

/// What a terminated pod leaves for the kubelet to clean up.
pub struct Finished {
    pub uid: String,
    pub key: String,
    pub node: String,
    pub netns: String,
    pub k: u8,
}

fn node_of(p: &Pod) -> Option<&str> {
    p.spec.as_ref()?.node_name.as_deref()
}

impl Kubelet {
    pub(super) async fn sync_pods(&mut self) -> Result<()> {
        let list = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| KubeletError::api("listing pods", e))?;
        self.schedule(&list.items).await?;
        let ours: BTreeSet<String> = self
            .lab
            .state
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let mut seen = BTreeSet::new();
        for p in &list.items {
            if !node_of(p).is_some_and(|n| ours.contains(n)) {
                continue;
            }
            let uid = p.uid().unwrap_or_default();
            seen.insert(uid.clone());
            if p.metadata.deletion_timestamp.is_some() {
                self.terminate(&uid, Some(p));
                continue;
            }
            if self.terminating.contains(&uid) {
                continue;
            }
            if !self.pods.contains_key(&uid)
                && let Err(e) = self.admit(p)
            {
                tracing::warn!(
                    "pod {}/{}: {e}",
                    p.namespace().unwrap_or_default(),
                    p.name_any()
                );
                continue;
            }
            if let Some(mut run) = self.pods.remove(&uid) {
                if let Err(e) = self.tend(&mut run, p).await {
                    tracing::warn!("pod {}: {e}", run.key());
                }
                self.pods.insert(uid, run);
            }
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            self.terminate(&uid, None);
        }
        Ok(())
    }

    /// Binds each pod without a node to the lab node with the fewest pods.
    async fn schedule(&self, pods: &[Pod]) -> Result<()> {
        let mut load: Vec<(usize, String)> = self
            .lab
            .state
            .nodes
            .iter()
            .map(|n| {
                (
                    pods.iter()
                        .filter(|p| node_of(p) == Some(n.name.as_str()))
                        .count(),
                    n.name.clone(),
                )
            })
            .collect();
        for p in pods
            .iter()
            .filter(|p| node_of(p).is_none() && p.metadata.deletion_timestamp.is_none())
        {
            load.sort();
            let Some((count, node)) = load.first_mut() else {
                return Ok(());
            };
            let binding = json!({"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": p.name_any()}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
            let api =
                Api::<Pod>::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
            match api
                .create_subresource::<Value, Value>(
                    "binding",
                    &p.name_any(),
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => *count += 1,
                Err(e) => tracing::warn!("binding {}: {e}", p.name_any()),
            }
        }
        Ok(())
    }

    /// A new pod on one of the lab's nodes: its netns, address and wiring.
    fn admit(&mut self, p: &Pod) -> Result<()> {
        let node_name = node_of(p).unwrap_or_default().to_string();
        let node = self
            .lab
            .state
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .cloned()
            .ok_or_else(|| KubeletError::pod(p.name_any(), format!("no node {node_name}")))?;
        let used = self.used.entry(node_name.clone()).or_default();
        let k = (10..=250u8)
            .find(|k| !used.contains(k))
            .ok_or_else(|| KubeletError::pod(p.name_any(), format!("node {node_name} is full")))?;
        used.insert(k);
        let n = self.next_netns;
        self.next_netns += 1;
        let netns = self.lab.ns_name(&format!("k{n}"));
        let ip = format!("{}.{}.{k}", self.lab.net(), node.index);
        let wire = |lab: &mut crate::lab::Lab| -> std::result::Result<(), crate::lab::Error> {
            lab.add_netns(&netns)?;
            lab.wire_pod(&node, &netns, &ip, &format!("k{n}"))
        };
        wire(&mut self.lab)
            .map_err(|e| KubeletError::lab(format!("wiring pod {}", p.name_any()), e))?;
        let namespace = p.namespace().unwrap_or_default();
        self.write_dns(&netns, &namespace)?;
        let uid = p.uid().unwrap_or_default();
        let run = RunPod {
            namespace,
            name: p.name_any(),
            uid: uid.clone(),
            node: node.clone(),
            netns,
            ip,
            k,
            volumes: PodVolumes::new(
                self.root.join("pods").join(&uid),
                node_root(&self.lab.dir, &node.name),
            ),
            containers: Vec::new(),
            cni: Cni::Pending(Instant::now()),
            waiting: Some("waiting for the network (CNI ADD)".into()),
            start_time: now(),
            last_status: None,
            last_refresh: Instant::now(),
            last_probe: Instant::now(),
        };
        self.pods.insert(uid, run);
        Ok(())
    }

    /// One look at a pod: get it started, or keep it running; then its status.
    async fn tend(&mut self, run: &mut RunPod, p: &Pod) -> Result<()> {
        if run.containers.is_empty() {
            self.start(run, p).await?;
        } else {
            self.keep(run, p).await?;
        }
        self.write_status(run, p).await
    }

    async fn start(&mut self, run: &mut RunPod, p: &Pod) -> Result<()> {
        match &mut run.cni {
            Cni::Pending(not_before) if Instant::now() >= *not_before => {
                let kube = self.lab.state.kube.get_or_insert_with(KubeState::default);
                for m in super::cni::NODE_MOUNTS {
                    ensure_mountpoint(m, &mut kube.mountpoints)?;
                }
                let (node_ns, root, pod) = (
                    run.node.netns.clone(),
                    run.volumes.node_root.clone(),
                    run.cni_pod(),
                );
                run.cni = Cni::Running(tokio::spawn(async move {
                    run_chain(&node_ns, &root, &pod, "ADD").await
                }));
                return Ok(());
            }
            Cni::Running(h) if h.is_finished() => {
                let out = h.await.unwrap_or_else(|e| Err(e.to_string()));
                match out {
                    Ok(()) => run.cni = Cni::Done,
                    Err(e) => {
                        tracing::warn!("pod {}: {e}", run.key());
                        run.waiting = Some(e);
                        run.cni = Cni::Pending(Instant::now() + Duration::from_secs(2));
                        return Ok(());
                    }
                }
            }
            Cni::Done => {}
            _ => return Ok(()),
        }
        let vols = match run.volumes.sync(&self.client, p).await? {
            Volumes::Ready(v) => v,
            Volumes::Waiting(w) => {
                run.waiting = Some(w);
                return Ok(());
            }
        };
        let specs = match containers(p, &vols, &self.root.join("images"), &run.ip, &run.node.ip) {
            Ok(s) => s,
            Err(w) => {
                run.waiting = Some(w);
                return Ok(());
            }
        };
        for spec in specs {
            let child = self.start_container(run, &spec)?;
            run.containers.push(Running {
                spec,
                child: Some(child),
                restarts: 0,
                started_at: Some(now()),
                ready: false,
                exited_at: None,
            });
        }
        run.waiting = None;
        let main = run
            .containers
            .last()
            .and_then(|c| c.child.as_ref())
            .map(|c| c.id());
        self.lab.state.pods.insert(
            run.key(),
            PodState {
                name: run.name.clone(),
                namespace: run.namespace.clone(),
                node: run.node.name.clone(),
                netns: run.netns.clone(),
                ip: run.ip.clone(),
                uid: run.uid.clone(),
                service_account: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                labels: p.labels().clone(),
                args: Vec::new(),
                image: run
                    .containers
                    .last()
                    .map(|c| c.spec.image.clone())
                    .unwrap_or_default(),
                pid: main,
                captured: false,
            },
        );
        self.save()
    }

    fn save(&self) -> Result<()> {
        self.lab
            .save()
            .map_err(|e| KubeletError::Setup(format!("saving the lab's state: {e}")))
    }

    fn start_container(&mut self, run: &RunPod, spec: &ContainerSpec) -> Result<Child> {
        let kube = self.lab.state.kube.get_or_insert_with(KubeState::default);
        for m in &spec.mounts {
            ensure_mountpoint(&m.target, &mut kube.mountpoints)?;
        }
        let log = self.lab.dir.join("logs").join(format!(
            "pod-{}-{}-{}.log",
            run.namespace, run.name, spec.name
        ));
        let child = spawn(&Launch {
            netns: &run.netns,
            mounts: &spec.mounts,
            argv: &spec.argv,
            env: &spec.env,
            log: &log,
        })?;
        let pid = child.id();
        self.lab
            .state
            .pids
            .push((pid, start_time(pid).unwrap_or(0)));
        self.save()?;
        tracing::info!(
            "pod {} container {}: started {:?} (pid {pid})",
            run.key(),
            spec.name,
            spec.argv
        );
        Ok(child)
    }

    /// A running pod: restarts, volume refreshes, probes.
    async fn keep(&mut self, run: &mut RunPod, p: &Pod) -> Result<()> {
        let key = run.key();
        for i in 0..run.containers.len() {
            let c = &mut run.containers[i];
            if let Some(child) = c.child.as_mut()
                && let Ok(Some(code)) = child.try_wait()
            {
                tracing::warn!("pod {} container {} exited: {code}", key, c.spec.name);
                c.child = None;
                c.started_at = None;
                c.ready = false;
                c.exited_at = Some(Instant::now());
            }
            let backoff = Duration::from_secs(1 << c.restarts.clamp(0, 3));
            if c.child.is_none() && c.exited_at.is_some_and(|t| t.elapsed() >= backoff) {
                let spec = c.spec.clone();
                let child = self.start_container(run, &spec)?;
                let c = &mut run.containers[i];
                c.child = Some(child);
                c.restarts += 1;
                c.started_at = Some(now());
                c.exited_at = None;
            }
        }
        if run.last_refresh.elapsed() >= Duration::from_secs(3) {
            run.last_refresh = Instant::now();
            run.volumes.sync(&self.client, p).await?;
        }
        if run.last_probe.elapsed() >= Duration::from_millis(800) {
            run.last_probe = Instant::now();
            for c in &mut run.containers {
                c.ready = match (&c.child, &c.spec.probe) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(_), Some(probe)) => {
                        super::probes::http_ready(&run.node.netns, &run.ip, probe.port, &probe.path)
                            .await
                    }
                };
            }
        }
        Ok(())
    }

    async fn write_status(&self, run: &mut RunPod, p: &Pod) -> Result<()> {
        let views: Vec<ContainerView> = if run.containers.is_empty() {
            p.spec
                .as_ref()
                .map(|s| s.containers.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|c| ContainerView {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    running_since: None,
                    ready: false,
                    restarts: 0,
                    waiting: run.waiting.clone(),
                })
                .collect()
        } else {
            run.containers
                .iter()
                .map(|c| ContainerView {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone(),
                    running_since: c.started_at.clone(),
                    ready: c.ready,
                    restarts: c.restarts,
                    waiting: None,
                })
                .collect()
        };
        let status = pod_status(
            &run.ip,
            &run.node.ip,
            &run.start_time,
            run.waiting.as_deref(),
            &views,
        );
        if run.last_status.as_ref() == Some(&status) {
            return Ok(());
        }
        let api = Api::<Pod>::namespaced(self.client.clone(), &run.namespace);
        match api
            .patch_status(
                &run.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => {
                run.last_status = Some(status);
                Ok(())
            }
            Err(e) => Err(KubeletError::api(
                format!("writing the status of pod {}", run.key()),
                e,
            )),
        }
    }

    /// Stops a pod (deleted in the API, or gone from it): its processes,
    /// then CNI DEL, then the pod object (grace period 0).
    fn terminate(&mut self, uid: &str, pod: Option<&Pod>) {
        if self.terminating.contains(uid) {
            return;
        }
        let client = self.client.clone();
        let delete = pod.map(|p| (p.namespace().unwrap_or_default(), p.name_any()));
        let grace = pod
            .and_then(|p| p.metadata.deletion_grace_period_seconds)
            .unwrap_or(30)
            .clamp(0, 10) as u64;
        let run = self.pods.remove(uid);
        if run.is_some() {
            self.terminating.insert(uid.to_string());
        }
        let done = self.done_tx.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            if let Some(mut run) = run {
                stop_containers(&mut run.containers, Duration::from_secs(grace)).await;
                if matches!(run.cni, Cni::Done)
                    && let Err(e) = run_chain(
                        &run.node.netns,
                        &run.volumes.node_root,
                        &run.cni_pod(),
                        "DEL",
                    )
                    .await
                {
                    tracing::warn!("pod {}: {e}", run.key());
                }
                let _ = done.send(Finished {
                    uid: uid.clone(),
                    key: run.key(),
                    node: run.node.name.clone(),
                    netns: run.netns.clone(),
                    k: run.k,
                });
            }
            if let Some((ns, name)) = delete {
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                if let Err(e) = Api::<Pod>::namespaced(client, &ns).delete(&name, &dp).await {
                    tracing::debug!("deleting pod {ns}/{name}: {e}");
                }
            }
        });
    }

    /// A terminated pod's netns, address and record go.
    pub(super) fn finished(&mut self, f: Finished) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &f.netns])
            .status();
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&f.netns));
        let _ = std::fs::remove_dir_all(self.root.join("pods").join(&f.uid));
        self.lab.state.netns.retain(|n| *n != f.netns);
        if self
            .lab
            .state
            .pods
            .get(&f.key)
            .is_some_and(|p| p.uid == f.uid)
        {
            self.lab.state.pods.remove(&f.key);
        }
        if let Some(used) = self.used.get_mut(&f.node) {
            used.remove(&f.k);
        }
        self.terminating.remove(&f.uid);
        if let Err(e) = self.save() {
            tracing::warn!("{e}");
        }
    }
}

/// SIGTERM to every container, up to `grace` for them to exit, then SIGKILL.
async fn stop_containers(containers: &mut [Running], grace: Duration) {
    for c in containers.iter() {
        if let Some(child) = &c.child {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        let alive = containers
            .iter_mut()
            .filter_map(|c| c.child.as_mut())
            .any(|ch| matches!(ch.try_wait(), Ok(None)));
        if !alive || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in containers.iter_mut() {
        if let Some(mut child) = c.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
