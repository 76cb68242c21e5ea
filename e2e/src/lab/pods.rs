//! Pods, as kubelet and CNI make them: a netns wired to its node's
//! bridge, a Pod object for the controller, capture by the node's agent,
//! and the process the pod runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::mesh::binary;

use super::process::sh;
use super::{Error, Lab, NodeState, PodState};

/// What the lab runs for a pod spec.
pub(super) struct Spec {
    service_account: String,
    /// The first container's image ("labapp" or "waypoint") and args.
    image: String,
    args: Vec<String>,
    /// `spec.nodeName`: the node it must run on, as a scheduler's binding.
    node: Option<String>,
}

pub(super) fn pod_spec(spec: &Value) -> Spec {
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

impl Lab {
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

    /// Creates a pod: netns, address, Pod object for the controller, its app
    /// process, and capture when its namespace is enrolled. It runs on
    /// `spec.node` when that is set, else the nodes take pods in turn.
    pub(super) async fn add_pod(
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
        self.wire_pod(&node, &ns, &ip, &port)?;

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
        self.write_pod(&pod)?;
        let key = format!("{namespace}/{name}");
        self.state.pods.insert(key.clone(), pod);
        self.save()?;
        // Captured before its app starts, as CNI does before the container
        // runs: no early connection escapes the mesh.
        self.sync_capture(&node.name).await?;
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

    /// Plugs a pod's netns into its node's bridge `cbr0` (veth `eth0` in
    /// the pod, `port` on the node) with address `ip` (and its IPv6 twin)
    /// and the node as its default route; the pod takes no addresses from
    /// router advertisements.
    pub(crate) fn wire_pod(
        &self,
        node: &NodeState,
        ns: &str,
        ip: &str,
        port: &str,
    ) -> Result<(), Error> {
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            port,
            "netns",
            &node.netns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &node.netns,
            "link",
            "set",
            port,
            "master",
            "cbr0",
            "up",
        ])?;
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
        super::network::add_v6(ns, "eth0", ip)?;
        // No addresses from router advertisements: a rogue RA on the bridge
        // must not give the pod an address the mesh does not know.
        for knob in ["accept_ra", "autoconf"] {
            let key = format!("net.ipv6.conf.eth0.{knob}=0");
            sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", &key])?;
        }
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        let gw = format!("{}.{}.1", self.net(), node.index);
        sh(&["ip", "-n", ns, "route", "add", "default", "via", &gw])?;
        let gw6 = super::ipv6_twin(&gw).ok_or_else(|| format!("{gw} is not IPv4"))?;
        sh(&["ip", "-n", ns, "-6", "route", "add", "default", "via", &gw6])?;
        Ok(())
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
                "{mesh}role: {role}\nnamespace: {namespace}\ngateway: {gateway}\npod_name: {pod}\nservice_account: {service_account}\nca:\n  address: https://{cip}:15012\n  root_cert: {root}\n  token_file: {token}\nxds_address: https://{cip}:15012\nmetrics_addr: \"{ip}:15020\"\nreadiness_addr: \"{ip}:15021\"\ndrain_timeout: 3s\nlimits:\n  header_read_timeout: 2s\n{limits}",
                root = self.dir.join("data/root-cert.pem").display(),
                token = token.display(),
                limits = self.state.waypoint_limits,
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

    /// Writes a pod's object, as the API server holds it: what istiod-lite
    /// and the node agent's watch read.
    pub(super) fn write_pod(&self, p: &PodState) -> Result<(), Error> {
        self.write_object(
            &format!("pod-{}-{}.yaml", p.namespace, p.name),
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
                "spec": {"nodeName": p.node, "serviceAccountName": p.service_account,
                         "containers": [{"name": "app", "image": p.image, "args": p.args}]},
                "status": {"phase": "Running", "podIP": p.ip, "podIPs": pod_ips(&p.ip),
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }),
        )
    }

    /// Has `node`'s agent act on the objects now (it also does so on its
    /// own within a second): the agent decides who is enrolled and finds
    /// each pod's netns from the node, as on Kubernetes. Records which pods
    /// it holds then.
    pub(super) async fn sync_capture(&mut self, node: &str) -> Result<(), Error> {
        let control = self.dir.join(format!("{node}-cni.sock"));
        // The ztunnel may still be connecting to its agent: retry briefly.
        let mut last = String::new();
        for _ in 0..100 {
            match mesh_cni::agent::call(&control, &mesh_cni::agent::Request::Sync).await {
                Ok(v) => {
                    let held: Vec<&str> = v["pods"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["uid"].as_str())
                        .collect();
                    for p in self.state.pods.values_mut().filter(|p| p.node == node) {
                        p.captured = held.contains(&p.uid.as_str());
                    }
                    return self.save();
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("enrollment on {node}: {last}").into())
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

/// `status.podIPs` of a lab pod: its IPv4 address, then its IPv6 twin.
fn pod_ips(ip: &str) -> Value {
    let mut ips = vec![json!({"ip": ip})];
    if let Some(v6) = super::ipv6_twin(ip) {
        ips.push(json!({"ip": v6}));
    }
    Value::Array(ips)
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
