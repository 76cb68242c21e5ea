//! The node's CNI config, as a container runtime reads it: the lab's own
//! network (`10-lab.conflist`, plugin type `lab-bridge`: the veth and
//! address the lab makes itself) comes first, and every plugin chained after
//! it (`mesh-cni`, put there by the DaemonSet's `install-cni`) is run as a
//! runtime runs it: its binary from the node's `/opt/cni/bin`, the command
//! and pod in `CNI_*` variables, its conflist entry with `prevResult` on
//! stdin, in the node's netns with the node's `/etc/cni/net.d` and
//! `/var/run/ztunnel` mounted where it expects them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::error::{KubeletError, Result};
use super::runtime::{Mount, script};

/// The node's directories a plugin sees at their usual paths.
pub const NODE_MOUNTS: &[&str] = &["/etc/cni/net.d", "/opt/cni/bin", "/var/run/ztunnel"];

/// The lab's own plugin type in the conflist.
pub const LAB_PLUGIN: &str = "lab-bridge";
const CONFLIST: &str = "10-lab.conflist";

/// Writes the node's primary network config (where install-cni chains).
pub fn write_primary(node_root: &Path) -> Result<()> {
    let conf = node_root.join("etc/cni/net.d");
    for d in [
        conf.clone(),
        node_root.join("opt/cni/bin"),
        node_root.join("var/run/ztunnel"),
    ] {
        std::fs::create_dir_all(&d)
            .map_err(|e| KubeletError::io(format!("creating {}", d.display()), e))?;
    }
    let list = json!({"cniVersion": "1.0.0", "name": "lab", "plugins": [{"type": LAB_PLUGIN}]});
    let path = conf.join(CONFLIST);
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap_or_default())
        .map_err(|e| KubeletError::io(format!("writing {}", path.display()), e))
}

/// The first conflist of the node (as runtimes pick: by file name).
fn conflist(node_root: &Path) -> Option<Value> {
    let dir = node_root.join("etc/cni/net.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    files.sort();
    let text = std::fs::read_to_string(files.first()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// One pod, as the runtime tells a plugin about it.
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub netns: String,
    pub ip: String,
    pub gateway: String,
}

/// Runs the plugins chained after the lab's (ADD or DEL). An error is the
/// plugin's message, as the kubelet would show it in the pod's events.
pub async fn run_chain(
    node_netns: &str,
    node_root: &Path,
    pod: &CniPod,
    command: &str,
) -> std::result::Result<(), String> {
    let Some(list) = conflist(node_root) else {
        return Ok(());
    };
    let version = list["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    let netns = format!("/var/run/netns/{}", pod.netns);
    let mut prev = json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"address": format!("{}/24", pod.ip), "gateway": pod.gateway, "interface": 0}],
    });
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    for p in plugins.iter().filter(|p| p["type"] != LAB_PLUGIN) {
        let kind = p["type"].as_str().unwrap_or_default();
        let mut conf = p.clone();
        conf["cniVersion"] = json!(version);
        conf["name"] = list["name"].clone();
        if command == "ADD" {
            conf["prevResult"] = prev.clone();
        }
        let out = plugin(node_netns, node_root, kind, command, pod, &netns, &conf).await?;
        if command == "ADD" && !out.trim().is_empty() {
            prev =
                serde_json::from_str(&out).map_err(|e| format!("{kind}: result {out:?}: {e}"))?;
        }
    }
    Ok(())
}

async fn plugin(
    node_netns: &str,
    node_root: &Path,
    kind: &str,
    command: &str,
    pod: &CniPod,
    netns: &str,
    conf: &Value,
) -> std::result::Result<String, String> {
    let mounts: Vec<Mount> = NODE_MOUNTS
        .iter()
        .map(|d| Mount {
            source: node_root.join(d.trim_start_matches('/')),
            target: d.to_string(),
        })
        .collect();
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.uid, pod.uid
    );
    let mut child = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node_netns,
            "sh",
            "-c",
            &script(&mounts),
            "sh",
        ])
        .arg(format!("/opt/cni/bin/{kind}"))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running CNI plugin {kind}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf.to_string().as_bytes()).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .map_err(|_| format!("CNI plugin {kind} {command}: no answer in 40 s"))?
        .map_err(|e| format!("CNI plugin {kind}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let msg = serde_json::from_str::<Value>(&stdout)
        .ok()
        .and_then(|v| v["msg"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    Err(format!("CNI plugin {kind} {command}: {msg}"))
}
