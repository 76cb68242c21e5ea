//! The mesh's own programs in the lab: istiod-lite in the control netns,
//! and an agent (ztunnel-cni) and a ztunnel on every node.

use std::process::Command;
use std::time::Duration;

use crate::mesh::binary;

#[cfg(doc)]
use super::LabState;
use super::{Error, Lab};

/// istiod-lite's `--mesh-config` file in the lab's directory: written
/// before `start_mesh` (and before a restart of istiod-lite) to set
/// mesh-wide settings.
pub const MESH_CONFIG: &str = "mesh.yaml";

/// Environment variable whose YAML is added to every ztunnel's config by
/// the `lab` CLI and the benchmark (into [`LabState::ztunnel_extra`]).
pub const LAB_ZTUNNEL_EXTRA: &str = "LAB_ZTUNNEL_EXTRA";

/// The DaemonSet the lab's node agents belong to (its object is
/// `config/daemonset-<namespace>-<name>.yaml`: [`Lab::delete`] it, then stop
/// an agent, and that agent is uninstalled).
pub const LAB_DAEMONSET: &str = "ztunnel";
pub const LAB_DAEMONSET_NAMESPACE: &str = "istio-system";

/// [`LAB_ZTUNNEL_EXTRA`]'s value, or nothing.
pub fn ztunnel_extra_from_env() -> String {
    std::env::var(LAB_ZTUNNEL_EXTRA).unwrap_or_default()
}

impl Lab {
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
        // The agents' DaemonSet, as the API server would show it: an agent
        // stopped while it is there is restarting (the node's probe tables
        // stay); one stopped after it was deleted is uninstalled.
        self.write_object(
            &format!("daemonset-{LAB_DAEMONSET_NAMESPACE}-{LAB_DAEMONSET}.yaml"),
            &serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": LAB_DAEMONSET, "namespace": LAB_DAEMONSET_NAMESPACE}}),
        )?;
        for n in self.state.nodes.clone() {
            let zds = self.dir.join(format!("{}-zds.sock", n.name));
            let control = self.dir.join(format!("{}-cni.sock", n.name));
            // A test's PATH for the agent (`env` sets it for the agent
            // alone: `ip netns exec` still finds its own programs).
            let mut cmd: Vec<String> = match &self.state.agent_path {
                Some(p) => vec!["env".into(), format!("PATH={p}")],
                None => Vec::new(),
            };
            cmd.extend([
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
                // Enrollment is watched (the objects the lab applies, its
                // stand-in for the API server), and the node's own
                // connections to captured pods (the kubelet's probes) are
                // SNATed in its netns, where the agent runs.
                "--node".into(),
                n.name.clone(),
                "--objects-dir".into(),
                self.dir.join("config").display().to_string(),
                "--host-netns".into(),
                "/proc/self/ns/net".into(),
                "--daemonset".into(),
                LAB_DAEMONSET.into(),
                "--daemonset-namespace".into(),
                LAB_DAEMONSET_NAMESPACE.into(),
            ]);
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
}
