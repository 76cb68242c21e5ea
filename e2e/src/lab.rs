//! The lab: a multi-node mesh on one machine, out of network namespaces.
//!
//! The lab plays kubelet, CNI and kube-proxy, nothing more: every mesh
//! program in it is the production binary with production config.
//!
//! ```text
//!  switch netns: bridge br0 ── ctl netns (10.L.0.100: istiod-lite)
//!                         ├── node-i netns (10.L.0.i: ztunnel + ztunnel-cni)
//!                         │      bridge cbr0 10.L.i.1/24 ── pod netns 10.L.i.k
//! ```
//!
//! Everything it creates is listed in `<dir>/lab.json`, so `lab down` (or a
//! test's drop) removes it all, also after a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::mesh::binary;

mod claim;
mod forward;
pub use claim::{
    ALL_IDS, BENCH_IDS, ClaimError, DEFAULT_ID, DEMO_IDS, Keeper, Owner, PEOPLE_IDS, TEST_IDS,
    claim, claim_free, namespaces_of, owner_of, record, release, sweep, sweep_unheld,
};
pub use forward::forward;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

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

/// What the lab runs for a pod spec.
struct Spec {
    service_account: String,
    /// The first container's image ("labapp" or "waypoint") and args.
    image: String,
    args: Vec<String>,
    /// `spec.nodeName`: the node it must run on, as a scheduler's binding.
    node: Option<String>,
}

fn pod_spec(spec: &Value) -> Spec {
    let c = &spec["containers"][0];
    Spec {
        service_account: spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        image: c["image"].as_str().unwrap_or("labapp").to_string(),
        args: serde_json::from_value(c["args"].clone()).unwrap_or_default(),
        node: spec["nodeName"].as_str().map(str::to_string),
    }
}

/// The Gateway class that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The label that ties a waypoint's pods and Service to its Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a waypoint Gateway expands to, as istiod-lite's deployment
/// controller makes it on Kubernetes: a Service on 15008 and a pod of the
/// waypoint binary, outside the mesh's capture, running as its own
/// service account.
fn waypoint_objects(ns: &str, name: &str, replicas: usize) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {GATEWAY_NAME_LABEL: name}},
        "spec": {"selector": {GATEWAY_NAME_LABEL: name},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008, "appProtocol": "all"}]},
    })];
    for i in 0..replicas {
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{i}"), "namespace": ns,
                         "labels": {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "waypoint", "image": "waypoint"}]},
        }));
    }
    out
}

/// istiod-lite's `--mesh-config` file in the lab's directory: written
/// before `start_mesh` (and before a restart of istiod-lite) to set
/// mesh-wide settings.
pub const MESH_CONFIG: &str = "mesh.yaml";

/// The workspace's programs the lab runs (found with [`binary`]).
pub const PROGRAMS: &[&str] = &[
    "lab",
    "labapp",
    "istiod-lite",
    "ztunnel",
    "ztunnel-cni",
    "waypoint",
];

/// Environment variable whose YAML is added to every ztunnel's config by
/// the `lab` CLI and the benchmark (into [`LabState::ztunnel_extra`]).
pub const LAB_ZTUNNEL_EXTRA: &str = "LAB_ZTUNNEL_EXTRA";

/// [`LAB_ZTUNNEL_EXTRA`]'s value, or nothing.
pub fn ztunnel_extra_from_env() -> String {
    std::env::var(LAB_ZTUNNEL_EXTRA).unwrap_or_default()
}

/// The Gateway class that declares an ingress gateway.
pub const INGRESS_CLASS: &str = "mesh-ingress";
/// Gateway annotation pinning the loopback ports an ingress's listener
/// ports are published on: "443=8443,80=8080". Unpinned ports get a free one.
pub const LOOPBACK_PORTS: &str = "lab.mesh.dev/loopback-ports";

/// The distinct listener ports of a Gateway.
fn listener_ports(gateway: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = gateway["spec"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// What an ingress Gateway expands to, as istiod-lite's deployment
/// controller makes it on Kubernetes: a LoadBalancer Service on the
/// listener ports and pods of the waypoint binary in its ingress role,
/// outside the mesh's capture, running as their own service account.
fn ingress_objects(ns: &str, name: &str, gateway: &Value) -> Vec<Value> {
    let ports: Vec<Value> = listener_ports(gateway)
        .into_iter()
        .map(|p| json!({"name": format!("port-{p}"), "port": p, "targetPort": p}))
        .collect();
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {GATEWAY_NAME_LABEL: name}},
        "spec": {"type": "LoadBalancer", "selector": {GATEWAY_NAME_LABEL: name}, "ports": ports},
    })];
    for i in 0..waypoint_replicas(gateway) {
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-{i}"), "namespace": ns,
                         "labels": {GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "ingress", "image": "ingress"}]},
        }));
    }
    out
}

/// The lab's stand-in for scaling a waypoint's Deployment: the Gateway
/// annotation `lab.mesh.dev/replicas` (1 to 4; default 1).
pub const WAYPOINT_REPLICAS: &str = "lab.mesh.dev/replicas";

fn waypoint_replicas(gateway: &Value) -> usize {
    gateway["metadata"]["annotations"][WAYPOINT_REPLICAS]
        .as_str()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 4)
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
    /// Ties the lab to its id's record (see [`Owner`]).
    #[serde(default)]
    pub claim: String,
    /// YAML added to every ztunnel's config (experiments: the `lab` CLI and
    /// the benchmark take it from `LAB_ZTUNNEL_EXTRA`; tests never do).
    #[serde(default)]
    pub ztunnel_extra: String,
}

pub struct Lab {
    pub dir: PathBuf,
    pub state: LabState,
}

fn sh(args: &[&str]) -> Result<(), Error> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

fn nft_in(netns: &str, script: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

pub const CONTROL_IP_HOST: u8 = 100;

fn check_nodes(nodes: usize) -> Result<(), Error> {
    if (1..=20).contains(&nodes) {
        Ok(())
    } else {
        Err(format!("{nodes} nodes: between 1 and 20").into())
    }
}

impl Lab {
    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    pub fn load(dir: &Path) -> Result<Lab, Error> {
        let text = std::fs::read_to_string(Self::state_file(dir))
            .map_err(|e| format!("no lab at {}: {e}", dir.display()))?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            state: serde_json::from_str(&text)?,
        })
    }

    fn save(&self) -> Result<(), Error> {
        std::fs::write(
            Self::state_file(&self.dir),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        Ok(())
    }

    pub fn net(&self) -> String {
        format!("10.{}", 100 + self.state.id as u32)
    }

    pub fn control_ip(&self) -> String {
        format!("{}.0.{CONTROL_IP_HOST}", self.net())
    }

    fn ns_name(&self, tag: &str) -> String {
        format!("{}{tag}", self.state.prefix)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), Error> {
        sh(&["ip", "netns", "add", name])?;
        self.state.netns.push(name.to_string());
        self.save()?;
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    fn spawn_in(
        &mut self,
        netns: &str,
        log: &str,
        env: &[(&str, &str)],
        cmd: &[String],
    ) -> Result<u32, Error> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).args(cmd);
        for (k, v) in env {
            c.env(k, v);
        }
        self.spawn_command(c, log)
    }

    /// Starts a process in the machine's own netns (a published port's
    /// forwarder), ended with the lab.
    fn spawn(&mut self, log: &str, cmd: &[String]) -> Result<u32, Error> {
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        self.spawn_command(c, log)
    }

    fn spawn_command(&mut self, mut c: Command, log: &str) -> Result<u32, Error> {
        let logf = std::fs::File::create(self.dir.join("logs").join(log))?;
        let child = c
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        // The lab outlives this handle: `lab down` ends the process by pid.
        std::mem::forget(child);
        self.state.pids.push((pid, start_time(pid).unwrap_or(0)));
        self.save()?;
        Ok(pid)
    }

    /// Starts a named process (and remembers how, for restarts).
    fn start_named(
        &mut self,
        name: &str,
        netns: &str,
        env: &[(&str, &str)],
        cmd: Vec<String>,
    ) -> Result<(), Error> {
        let log = format!("{name}.log");
        let pid = self.spawn_in(netns, &log, env, &cmd)?;
        self.state.procs.insert(
            name.to_string(),
            ProcState {
                netns: netns.to_string(),
                cmd,
                log,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                pid: Some(pid),
            },
        );
        self.save()
    }

    /// Stops a named process (SIGKILL with `kill`, else SIGTERM) and waits.
    pub fn stop(&mut self, name: &str, kill: bool) -> Result<(), Error> {
        let p = self
            .state
            .procs
            .get_mut(name)
            .ok_or_else(|| format!("no process {name}"))?;
        if let Some(pid) = p.pid.take() {
            self.end_pid(pid, kill);
        }
        self.save()
    }

    /// Signals one process this lab started (SIGKILL with `kill`, else
    /// SIGTERM), forgets it, and waits (bounded) until it is gone.
    fn end_pid(&mut self, pid: u32, kill: bool) {
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        let started = self
            .state
            .pids
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, t)| *t);
        if started.is_some_and(|t| start_time(pid) == Some(t)) {
            // SAFETY: kill(2) on a process this lab started (same pid and
            // start time, so not a reused pid).
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
        self.state.pids.retain(|(p, _)| *p != pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && Path::new(&format!("/proc/{pid}")).exists()
            && !zombie(pid)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the process a pod runs (its app, or its waypoint) with
    /// `cmd`, started in the pod's netns and ended with the lab like any
    /// other. The old process gets SIGTERM and is waited for. (The bench puts
    /// Envoy in a waypoint pod's place this way.) Returns the new pid.
    pub fn replace_pod_process(
        &mut self,
        key: &str,
        log: &str,
        env: &[(&str, &str)],
        cmd: &[String],
    ) -> Result<u32, Error> {
        let p = self
            .state
            .pods
            .get(key)
            .cloned()
            .ok_or_else(|| format!("no pod {key}"))?;
        if let Some(pid) = p.pid {
            self.end_pid(pid, false);
        }
        let pid = self.spawn_in(&p.netns, log, env, cmd)?;
        if let Some(pod) = self.state.pods.get_mut(key) {
            pod.pid = Some(pid);
        }
        self.save()?;
        Ok(pid)
    }

    /// Starts one more process in a pod's netns (a second container: the
    /// bench's iperf3 or sockperf server, an Envoy beside the app), logged
    /// to `<dir>/logs/<log>` and ended with the lab like the pod's own.
    /// Returns its pid.
    pub fn spawn_in_pod(
        &mut self,
        key: &str,
        log: &str,
        env: &[(&str, &str)],
        cmd: &[String],
    ) -> Result<u32, Error> {
        let netns = self
            .pod(key)
            .map(|p| p.netns.clone())
            .ok_or_else(|| format!("no pod {key}"))?;
        self.spawn_in(&netns, log, env, cmd)
    }

    /// Ends one process [`Lab::spawn_in_pod`] started (SIGTERM, then waits,
    /// bounded), before the lab goes.
    pub fn end_process(&mut self, pid: u32) -> Result<(), Error> {
        self.end_pid(pid, false);
        self.save()
    }

    /// Starts a stopped named process again, as it was first started.
    pub fn restart(&mut self, name: &str) -> Result<(), Error> {
        let p = self
            .state
            .procs
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no process {name}"))?;
        let env: Vec<(&str, &str)> = p
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let pid = self.spawn_in(&p.netns, &p.log, &env, &p.cmd)?;
        if let Some(p) = self.state.procs.get_mut(name) {
            p.pid = Some(pid);
        }
        self.save()
    }

    /// Creates the network: switch, control netns, nodes, as lab `id`, kept
    /// by this process (taken down by it; debris once it is gone). An id
    /// someone else holds is refused, never swept. On failure, whatever was
    /// made is removed again.
    pub fn create(dir: &Path, id: u8, nodes: usize) -> Result<Lab, Error> {
        Self::create_kept(dir, id, nodes, Keeper::Process)
    }

    /// [`Lab::create`], with what keeps the lab said.
    pub fn create_kept(dir: &Path, id: u8, nodes: usize, keeper: Keeper) -> Result<Lab, Error> {
        check_nodes(nodes)?;
        let owner = claim::claim(id, dir, keeper)?;
        Self::create_claimed(dir, owner, nodes)
    }

    /// [`Lab::create`] with the first free id of `ids` (the tests take
    /// theirs from [`TEST_IDS`]).
    pub fn create_in(
        dir: &Path,
        ids: std::ops::RangeInclusive<u8>,
        nodes: usize,
    ) -> Result<Lab, Error> {
        check_nodes(nodes)?;
        let owner = claim::claim_free(ids, dir, Keeper::Process)?;
        Self::create_claimed(dir, owner, nodes)
    }

    fn create_claimed(dir: &Path, owner: Owner, nodes: usize) -> Result<Lab, Error> {
        let mut lab = Lab {
            dir: dir.to_path_buf(),
            state: LabState {
                id: owner.id,
                claim: owner.token.clone(),
                ..Default::default()
            },
        };
        match Self::build(dir, &owner, nodes, &mut lab) {
            Ok(()) => Ok(lab),
            Err(e) => {
                lab.down();
                Err(e)
            }
        }
    }

    fn build(dir: &Path, owner: &Owner, nodes: usize, out: &mut Lab) -> Result<(), Error> {
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("config"))?;
        std::fs::create_dir_all(dir.join("data"))?;
        let id = owner.id;
        let lab = Lab {
            dir: dir.to_path_buf(),
            state: LabState {
                id,
                claim: owner.token.clone(),
                prefix: format!("lab{id}-"),
                next_vip: 1,
                ..Default::default()
            },
        };
        lab.save()?;
        *out = Lab {
            dir: lab.dir.clone(),
            state: lab.state.clone(),
        };
        let lab = out;
        let net = lab.net();
        let sw = lab.ns_name("sw");
        lab.add_netns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let attach = |ns: &str, port: &str, ip: &str| -> Result<(), Error> {
            sh(&[
                "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", port, "netns",
                &sw,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", port, "master", "br0", "up"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])
        };
        let ctl = lab.ns_name("ctl");
        lab.add_netns(&ctl)?;
        attach(&ctl, "ctl", &lab.control_ip())?;
        for i in 1..=nodes as u8 {
            let ns = lab.ns_name(&format!("n{i}"));
            lab.add_netns(&ns)?;
            let ip = format!("{net}.0.{i}");
            attach(&ns, &format!("n{i}"), &ip)?;
            sh(&["ip", "-n", &ns, "link", "add", "cbr0", "type", "bridge"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{net}.{i}.1/24"),
                "dev",
                "cbr0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "cbr0", "up"])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            lab.state.nodes.push(NodeState {
                name: format!("node-{i}"),
                netns: ns,
                ip,
                index: i,
            });
        }
        // Every node and the control netns reach every pod CIDR.
        let nodes_copy = lab.state.nodes.clone();
        for n in &nodes_copy {
            for m in &nodes_copy {
                if n.index != m.index {
                    sh(&[
                        "ip",
                        "-n",
                        &n.netns,
                        "route",
                        "add",
                        &format!("{net}.{}.0/24", m.index),
                        "via",
                        &m.ip,
                    ])?;
                }
            }
            sh(&[
                "ip",
                "-n",
                &ctl,
                "route",
                "add",
                &format!("{net}.{}.0/24", n.index),
                "via",
                &n.ip,
            ])?;
        }
        lab.save()
    }

    /// Starts istiod-lite, and an agent and a ztunnel per node.
    pub async fn start_mesh(&mut self) -> Result<(), Error> {
        let tokens: String = self
            .state
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{}: lab-token-{}-{}-0000000000\n",
                    n.name, self.state.id, n.name
                )
            })
            .collect();
        std::fs::write(self.dir.join("tokens.yaml"), tokens)?;
        let ctl = self.ns_name("ctl");
        let cip = self.control_ip();
        let mut cmd: Vec<String> = vec![
            binary("istiod-lite").display().to_string(),
            "--config-dir".into(),
            self.dir.join("config").display().to_string(),
            "--data-dir".into(),
            self.dir.join("data").display().to_string(),
            "--node-tokens".into(),
            self.dir.join("tokens.yaml").display().to_string(),
            "--grpc-addr".into(),
            format!("{cip}:15012"),
            // Loopback in the control netns: `meshctl --lab` and
            // `Lab::controller_debug` read it from inside.
            "--debug-addr".into(),
            "127.0.0.1:15014".into(),
            "--serving-ip".into(),
            cip.clone(),
        ];
        // Mesh-wide settings (extension providers), when a test wrote them.
        let mesh = self.dir.join(MESH_CONFIG);
        if mesh.exists() {
            cmd.extend(["--mesh-config".into(), mesh.display().to_string()]);
        }
        self.start_named("istiod-lite", &ctl, &[("RUST_LOG", "info")], cmd)?;
        let root = self.dir.join("data/root-cert.pem");
        for _ in 0..200 {
            if root.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for n in self.state.nodes.clone() {
            let zds = self.dir.join(format!("{}-zds.sock", n.name));
            let control = self.dir.join(format!("{}-cni.sock", n.name));
            let cmd = vec![
                binary("ztunnel-cni").display().to_string(),
                "--control-socket".into(),
                control.display().to_string(),
                "serve".into(),
                "--zds-socket".into(),
                zds.display().to_string(),
                "--state-file".into(),
                self.dir
                    .join(format!("{}-pods.json", n.name))
                    .display()
                    .to_string(),
                "--dns".into(),
            ];
            self.start_named(
                &format!("{}-cni", n.name),
                &n.netns,
                &[("RUST_LOG", "info")],
                cmd,
            )?;
            let token = self.dir.join(format!("{}.token", n.name));
            std::fs::write(
                &token,
                format!("lab-token-{}-{}-0000000000", self.state.id, n.name),
            )?;
            let cfg = self.dir.join(format!("{}-ztunnel.yaml", n.name));
            // For experiments (the benchmark's A/B runs): YAML appended to
            // every ztunnel's config, e.g. "pool: {connections_per_destination: 1}".
            let extra = &self.state.ztunnel_extra;
            std::fs::write(
                &cfg,
                format!(
                    "{extra}\nnode: {node}\nca:\n  address: https://{cip}:15012\n  root_cert: {root}\n  token_file: {token}\nstate:\n  xds_address: https://{cip}:15012\nnode_mode:\n  zds_socket: {zds}\n  dns: true\nadmin_addr: \"127.0.0.1:15000\"\nmetrics_addr: \"{ip}:15020\"\nreadiness_addr: \"{ip}:15021\"\ndrain_timeout: 3s\n",
                    node = n.name,
                    root = root.display(),
                    token = token.display(),
                    zds = zds.display(),
                    ip = n.ip,
                ),
            )?;
            for _ in 0..100 {
                if zds.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let cmd = vec![
                binary("ztunnel").display().to_string(),
                "--config".into(),
                cfg.display().to_string(),
            ];
            self.start_named(
                &format!("{}-ztunnel", n.name),
                &n.netns,
                &[("RUST_LOG", "info")],
                cmd,
            )?;
        }
        self.save()
    }

    fn write_object(&self, file: &str, v: &Value) -> Result<(), Error> {
        let path = self.dir.join("config").join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_yaml::to_string(v)?)?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }

    fn enrolled(&self, p: &PodState) -> bool {
        match p.labels.get("istio.io/dataplane-mode").map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => self
                .state
                .namespaces
                .get(&p.namespace)
                .and_then(|l| l.get("istio.io/dataplane-mode"))
                .is_some_and(|v| v == "ambient"),
        }
    }

    /// Creates a pod: netns, address, Pod object for the controller, its app
    /// process, and capture when its namespace is enrolled. It runs on
    /// `spec.node` when that is set, else the nodes take pods in turn.
    async fn add_pod(
        &mut self,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        spec: Spec,
    ) -> Result<(), Error> {
        let Spec {
            service_account,
            image,
            args,
            node,
        } = spec;
        let (service_account, image) = (service_account.as_str(), image.as_str());
        let node = match node {
            Some(n) => self
                .state
                .nodes
                .iter()
                .find(|x| x.name == n)
                .cloned()
                .ok_or_else(|| format!("pod {namespace}/{name}: no node {n}"))?,
            None => self.state.nodes[self.state.pods.len() % self.state.nodes.len()].clone(),
        };
        let k = self
            .state
            .pods
            .values()
            .filter(|p| p.node == node.name)
            .count() as u8
            + 10;
        let ns = self.ns_name(&format!("p{}", self.state.pods.len() + 1));
        self.add_netns(&ns)?;
        let ip = format!("{}.{}.{k}", self.net(), node.index);
        let port = format!("p{k}");
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            &port,
            "netns",
            &node.netns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &node.netns,
            "link",
            "set",
            &port,
            "master",
            "cbr0",
            "up",
        ])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{}.{}.1", self.net(), node.index),
        ])?;

        let uid = format!("lab-{}-{namespace}-{name}", self.state.id);
        let pod = PodState {
            name: name.into(),
            namespace: namespace.into(),
            node: node.name.clone(),
            netns: ns.clone(),
            ip: ip.clone(),
            uid: uid.clone(),
            service_account: service_account.into(),
            labels: labels.clone(),
            args: args.clone(),
            image: image.to_string(),
            pid: None,
            captured: false,
        };
        self.write_object(
            &format!("pod-{namespace}-{name}.yaml"),
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
                "spec": {"nodeName": node.name, "serviceAccountName": service_account,
                         "containers": [{"name": "app", "image": image, "args": args}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }),
        )?;
        let key = format!("{namespace}/{name}");
        self.state.pods.insert(key.clone(), pod);
        self.save()?;
        // Captured before its app starts, as CNI does before the container
        // runs: no early connection escapes the mesh.
        self.reconcile_capture(&key).await?;
        if image == "waypoint" || image == "ingress" {
            let role = if image == "ingress" {
                "ingress"
            } else {
                "waypoint"
            };
            let pid =
                self.start_waypoint(namespace, name, service_account, &node, &ip, &ns, role)?;
            if let Some(p) = self.state.pods.get_mut(&key) {
                p.pid = Some(pid);
            }
        } else if image == "redis" {
            // A Redis-protocol store on the pod's IP (Debian's redis-server),
            // for global rate limits.
            let data = self.dir.join(format!("redis-{namespace}-{name}"));
            std::fs::create_dir_all(&data)?;
            let cmd: Vec<String> = [
                "redis-server",
                "--bind",
                ip.as_str(),
                "--port",
                "6379",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([data.display().to_string()])
            .collect();
            let pid = self.spawn_in(&ns, &format!("pod-{namespace}-{name}.log"), &[], &cmd)?;
            if let Some(p) = self.state.pods.get_mut(&key) {
                p.pid = Some(pid);
            }
        } else if !args.is_empty() {
            let mut cmd = vec![binary("labapp").display().to_string()];
            cmd.extend(args);
            let (ld, ro) = resolver_env(namespace);
            let env = [
                ("POD_NAME", name),
                ("LOCALDOMAIN", ld.as_str()),
                ("RES_OPTIONS", ro),
            ];
            let pid = self.spawn_in(&ns, &format!("pod-{namespace}-{name}.log"), &env, &cmd)?;
            if let Some(p) = self.state.pods.get_mut(&key) {
                p.pid = Some(pid);
            }
        }
        self.save()
    }

    /// Runs the waypoint binary in its pod (as a waypoint or an ingress).
    /// A waypoint proves where it runs with the node's bootstrap token (as
    /// the ztunnel has); an ingress gateway with a token of its own, added
    /// to the controller's token file as `<namespace>/<pod>`: its Gateway's
    /// private keys go to no node token.
    #[allow(clippy::too_many_arguments)]
    fn start_waypoint(
        &mut self,
        namespace: &str,
        pod: &str,
        service_account: &str,
        node: &NodeState,
        ip: &str,
        netns: &str,
        role: &str,
    ) -> Result<u32, Error> {
        // Pods are <gateway>-<n>.
        let gateway = pod.rsplit_once('-').map_or(pod, |(g, _)| g);
        let cip = self.control_ip();
        let token = if role == "ingress" {
            self.pod_token(namespace, pod)?
        } else {
            self.dir.join(format!("{}.token", node.name))
        };
        let cfg = self.dir.join(format!("waypoint-{namespace}-{pod}.yaml"));
        let mesh = match &self.state.path_normalization {
            Some(p) => format!("path_normalization: {p}\n"),
            None => String::new(),
        };
        std::fs::write(
            &cfg,
            format!(
                "{mesh}role: {role}\nnamespace: {namespace}\ngateway: {gateway}\npod_name: {pod}\nservice_account: {service_account}\nca:\n  address: https://{cip}:15012\n  root_cert: {root}\n  token_file: {token}\nxds_address: https://{cip}:15012\nmetrics_addr: \"{ip}:15020\"\nreadiness_addr: \"{ip}:15021\"\ndrain_timeout: 3s\nlimits:\n  header_read_timeout: 2s\n",
                root = self.dir.join("data/root-cert.pem").display(),
                token = token.display(),
            ),
        )?;
        let cmd = vec![
            binary("waypoint").display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ];
        self.spawn_in(
            netns,
            &format!("pod-{namespace}-{pod}.log"),
            &[("RUST_LOG", "info")],
            &cmd,
        )
    }

    /// A pod's own token: written to `<dir>/pod-<ns>-<pod>.token` and added
    /// to the controller's token file (replaced whole, so the controller,
    /// which re-reads it when it changes, never sees half of it).
    fn pod_token(&self, namespace: &str, pod: &str) -> Result<PathBuf, Error> {
        let token = format!(
            "lab-pod-token-{}-{namespace}-{pod}-0000000000",
            self.state.id
        );
        let file = self.dir.join(format!("pod-{namespace}-{pod}.token"));
        std::fs::write(&file, &token)?;
        let tokens = self.dir.join("tokens.yaml");
        let key = format!("{namespace}/{pod}:");
        let mut text: String = std::fs::read_to_string(&tokens)?
            .lines()
            .filter(|l| !l.starts_with(&key))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!("{key} {token}\n"));
        let tmp = self.dir.join("tokens.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &tokens)?;
        Ok(file)
    }

    /// Captures or releases one pod to match its enrollment.
    async fn reconcile_capture(&mut self, key: &str) -> Result<(), Error> {
        let Some(p) = self.state.pods.get(key).cloned() else {
            return Ok(());
        };
        let want = self.enrolled(&p);
        if want == p.captured {
            return Ok(());
        }
        let control = self.dir.join(format!("{}-cni.sock", p.node));
        let req = if want {
            ztunnel::inpod::agent::Request::Add(ztunnel::inpod::agent::PodSpec {
                uid: p.uid.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                netns: format!("/var/run/netns/{}", p.netns),
            })
        } else {
            ztunnel::inpod::agent::Request::Del { uid: p.uid.clone() }
        };
        // The ztunnel may still be connecting to its agent: retry briefly.
        let mut last = String::new();
        for _ in 0..100 {
            match ztunnel::inpod::agent::call(&control, &req).await {
                Ok(_) => {
                    if let Some(pod) = self.state.pods.get_mut(key) {
                        pod.captured = want;
                    }
                    return self.save();
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("capturing {key}: {last}").into())
    }

    fn kube_proxy(&self) -> Result<(), Error> {
        let mut rules = String::new();
        for s in self.state.services.values() {
            let eps: Vec<&PodState> = self
                .state
                .pods
                .values()
                .filter(|p| {
                    p.namespace == s.namespace
                        && !s.selector.is_empty()
                        && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect();
            if eps.is_empty() {
                continue;
            }
            for (port, target) in &s.ports {
                let map: Vec<String> = eps
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{i} : {} . {target}", p.ip))
                    .collect();
                rules.push_str(&format!(
                    "    ip daddr {} tcp dport {port} dnat ip to numgen inc mod {} map {{ {} }}\n",
                    s.vip,
                    eps.len(),
                    map.join(", ")
                ));
            }
        }
        let script = format!(
            "table ip lab-kube-proxy\ndelete table ip lab-kube-proxy\ntable ip lab-kube-proxy {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n}}\n"
        );
        for n in &self.state.nodes {
            nft_in(&n.netns, &script)?;
        }
        Ok(())
    }

    /// Applies Kubernetes objects: namespaces (labels, live), deployments and
    /// pods (started), services (a VIP), and everything else handed to the
    /// controller as it is.
    pub async fn apply(&mut self, docs: Vec<Value>) -> Result<(), Error> {
        let mut relabelled = Vec::new();
        let ingresses: Vec<Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == INGRESS_CLASS)
            .cloned()
            .collect();
        let docs: Vec<Value> = docs
            .into_iter()
            .flat_map(|d| {
                let mut out = vec![d.clone()];
                let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                if d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == WAYPOINT_CLASS {
                    out.extend(waypoint_objects(ns, name, waypoint_replicas(&d)));
                }
                if d["kind"] == "Gateway" && d["spec"]["gatewayClassName"] == INGRESS_CLASS {
                    out.extend(ingress_objects(ns, name, &d));
                }
                out
            })
            .collect();
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_string();
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ns = d["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let labels: BTreeMap<String, String> =
                serde_json::from_value(d["metadata"]["labels"].clone()).unwrap_or_default();
            match kind.as_str() {
                "Namespace" => {
                    self.state.namespaces.insert(name.clone(), labels);
                    self.write_object(&format!("namespace-{name}.yaml"), &d)?;
                    relabelled.push(name);
                }
                "Deployment" => {
                    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
                    let tmpl = &d["spec"]["template"];
                    let plabels: BTreeMap<String, String> =
                        serde_json::from_value(tmpl["metadata"]["labels"].clone())
                            .unwrap_or_default();
                    for i in 0..replicas {
                        let pname = format!("{name}-{i}");
                        if !self.state.pods.contains_key(&format!("{ns}/{pname}")) {
                            self.add_pod(&ns, &pname, plabels.clone(), pod_spec(&tmpl["spec"]))
                                .await?;
                        }
                    }
                }
                "Pod" => {
                    let key = format!("{ns}/{name}");
                    if let Some(p) = self.state.pods.get_mut(&key) {
                        p.labels = labels;
                        self.save()?;
                        self.reconcile_capture(&key).await?;
                    } else {
                        self.add_pod(&ns, &name, labels, pod_spec(&d["spec"]))
                            .await?;
                    }
                }
                "Service" => {
                    let key = format!("{ns}/{name}");
                    let vip = match self.state.services.get(&key) {
                        Some(s) => s.vip.clone(),
                        None => {
                            let v = format!("{}.250.{}", self.net(), self.state.next_vip);
                            self.state.next_vip += 1;
                            v
                        }
                    };
                    let selector: BTreeMap<String, String> =
                        serde_json::from_value(d["spec"]["selector"].clone()).unwrap_or_default();
                    let ports: Vec<(u16, u16)> = d["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let port = p["port"].as_u64().unwrap_or(80) as u16;
                            (
                                port,
                                p["targetPort"].as_u64().map(|t| t as u16).unwrap_or(port),
                            )
                        })
                        .collect();
                    let mut obj = d.clone();
                    obj["metadata"]["namespace"] = json!(ns);
                    obj["spec"]["clusterIP"] = json!(vip);
                    self.write_object(&format!("service-{ns}-{name}.yaml"), &obj)?;
                    self.state.services.insert(
                        key,
                        ServiceState {
                            name,
                            namespace: ns,
                            vip,
                            selector,
                            ports,
                        },
                    );
                    self.save()?;
                }
                _ => {
                    let mut obj = d.clone();
                    if obj["metadata"]["namespace"].is_null() && kind != "Namespace" {
                        obj["metadata"]["namespace"] = json!(ns);
                    }
                    self.write_object(&format!("{}-{ns}-{name}.yaml", kind.to_lowercase()), &obj)?;
                }
            }
        }
        for ns in relabelled {
            let keys: Vec<String> = self
                .state
                .pods
                .values()
                .filter(|p| p.namespace == ns)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            for k in keys {
                self.reconcile_capture(&k).await?;
            }
        }
        self.kube_proxy()?;
        for g in &ingresses {
            self.publish(g)?;
        }
        self.save()
    }

    /// Publishes an ingress Gateway's listener ports on the machine's
    /// loopback (the lab's load balancer): one forwarder process per port,
    /// spreading connections over the Gateway's pods.
    fn publish(&mut self, gateway: &Value) -> Result<(), Error> {
        let ns = gateway["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let name = gateway["metadata"]["name"].as_str().unwrap_or_default();
        let pins: BTreeMap<u16, u16> = gateway["metadata"]["annotations"][LOOPBACK_PORTS]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                Some((k.trim().parse().ok()?, v.trim().parse().ok()?))
            })
            .collect();
        let pods: Vec<PodState> = self
            .state
            .pods
            .values()
            .filter(|p| {
                p.namespace == ns
                    && p.labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(name)
            })
            .cloned()
            .collect();
        let Some(first) = pods.first() else {
            return Ok(());
        };
        // Any node reaches every pod; the forwarder connects from the first
        // pod's node.
        let node_ns = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == first.node)
            .map(|n| n.netns.clone())
            .ok_or_else(|| format!("node {} of {ns}/{name} is gone", first.node))?;
        for port in listener_ports(gateway) {
            let key = format!("{ns}/{name}:{port}");
            if self.state.published.contains_key(&key) {
                continue;
            }
            let listen = format!("127.0.0.1:{}", pins.get(&port).copied().unwrap_or(0));
            let port_file = self.dir.join(format!("published-{ns}-{name}-{port}"));
            let _ = std::fs::remove_file(&port_file);
            let mut cmd = vec![
                binary("lab").display().to_string(),
                "forward".into(),
                "--listen".into(),
                listen,
                "--netns".into(),
                format!("/var/run/netns/{node_ns}"),
                "--port-file".into(),
                port_file.display().to_string(),
            ];
            for p in &pods {
                cmd.push("--to".into());
                cmd.push(format!("{}:{port}", p.ip));
            }
            self.spawn(&format!("forward-{ns}-{name}-{port}.log"), &cmd)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let addr = loop {
                if let Ok(a) = std::fs::read_to_string(&port_file)
                    && !a.trim().is_empty()
                {
                    break a.trim().to_string();
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "publishing {key}: the forwarder did not start (see its log)"
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.state.published.insert(key, addr);
            self.save()?;
        }
        Ok(())
    }

    /// The loopback address an ingress listener port is published on.
    pub fn published(&self, namespace: &str, gateway: &str, port: u16) -> Option<String> {
        self.state
            .published
            .get(&format!("{namespace}/{gateway}:{port}"))
            .cloned()
    }

    /// Removes an object the lab applied (a policy, say).
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<(), Error> {
        let _ = std::fs::remove_file(
            self.dir
                .join("config")
                .join(format!("{}-{namespace}-{name}.yaml", kind.to_lowercase())),
        );
        Ok(())
    }

    /// Tears everything down: processes, then namespaces.
    pub fn down(&mut self) {
        // Only processes that are still the ones the lab started.
        let ours: Vec<u32> = self
            .state
            .pids
            .iter()
            .filter(|(pid, t)| start_time(*pid) == Some(*t))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in ours.iter().rev() {
            // SAFETY: kill(2) on processes this lab started (pid and start time match).
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && ours
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists() && !zombie(*p))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in &ours {
            if !zombie(*pid) {
                // SAFETY: as above; the process did not stop on SIGTERM.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                }
            }
        }
        for ns in self.state.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        self.state.pids.clear();
        self.state.netns.clear();
        claim::release(self.state.id, &self.state.claim);
        // The run's config, CA data, agent state and sockets go too: a later
        // `lab up` in the same directory starts clean.
        for d in ["config", "data"] {
            let _ = std::fs::remove_dir_all(self.dir.join(d));
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".sock")
                    || name.ends_with("-pods.json")
                    || name.ends_with(".token")
                    || name.ends_with("-ztunnel.yaml")
                    || name == "tokens.yaml"
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_file(Self::state_file(&self.dir));
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.state.pods.get(key)
    }

    /// GET `path` on the controller's debug endpoint (loopback in the
    /// control netns), as `labapp get` prints it: the status line, then
    /// the body.
    pub fn controller_debug(&self, path: &str) -> Result<String, Error> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns_name("ctl")])
            .arg(binary("labapp"))
            .args(["get", &format!("http://127.0.0.1:15014{path}")])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Runs a command inside a pod's netns and returns its output.
    pub fn exec(&self, key: &str, cmd: &[&str]) -> Result<std::process::Output, Error> {
        let p = self.pod(key).ok_or_else(|| format!("no pod {key}"))?;
        // `labapp` is the lab's application binary: found without a PATH.
        let first = match cmd.first() {
            Some(&"labapp") => binary("labapp").display().to_string(),
            Some(c) => c.to_string(),
            None => return Err("no command".into()),
        };
        let (ld, ro) = resolver_env(&p.namespace);
        Ok(Command::new("ip")
            .args(["netns", "exec", &p.netns, &first])
            .args(&cmd[1..])
            .env("POD_NAME", &p.name)
            .env("LOCALDOMAIN", ld)
            .env("RES_OPTIONS", ro)
            .output()?)
    }
}

/// The pod's resolver search path, as a kubelet writes it into resolv.conf;
/// given through the resolver's environment so the lab needs no /etc access.
/// Whatever nameserver the host names, port 53 is redirected to the ztunnel.
fn resolver_env(namespace: &str) -> (String, &'static str) {
    (
        format!("{namespace}.svc.cluster.local svc.cluster.local cluster.local"),
        "ndots:5",
    )
}

/// A process's start time (field 22 of /proc/<pid>/stat).
fn start_time(pid: u32) -> Option<u64> {
    crate::procfs::pid_stat(pid)?.get(19)?.parse().ok()
}

/// A zombie, or gone.
fn zombie(pid: u32) -> bool {
    crate::procfs::pid_stat(pid).is_none_or(|f| f.first().map(String::as_str) == Some("Z"))
}

/// Reads every YAML document in a file or folder.
/// Parses a multi-document YAML text; empty documents are skipped.
pub fn parse_docs(text: &str) -> Result<Vec<Value>, Error> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// A lab taken down when dropped (also when a test fails).
pub struct Down(pub Lab);

impl Drop for Down {
    fn drop(&mut self) {
        // Another process (`lab apply`, meshctl) may have added pods since:
        // take them down too.
        if let Ok(l) = Lab::load(&self.0.dir) {
            self.0 = l;
        }
        self.0.down();
    }
}

pub fn read_docs(path: &Path) -> Result<Vec<Value>, Error> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        out.extend(parse_docs(&text).map_err(|e| format!("{}: {e}", f.display()))?);
    }
    Ok(out)
}
