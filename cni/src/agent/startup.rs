//! The agent's start: its sockets' directory and files, the lock on its
//! state file (one agent per node), the pods of the state file re-opened,
//! and the refusal of the node's own netns as a pod's.

use std::collections::BTreeMap;
use std::path::Path;

use mesh_core::netns::Netns;
use tracing::warn;

use crate::agent::{AgentConfig, AgentError, Pod, PodSpec, install_rules};
use crate::rules::Capture;
use crate::{find, migrate};
use tokio::net::UnixStream;

pub(super) fn bind_fresh(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// The agent's run directory (the ZDS socket's; on the node a hostPath the
/// ztunnel pods share): created when missing and made 0700, so only root
/// (the agent, the ztunnels, the CNI plugin) reaches the sockets in it. A
/// shared sticky directory (/tmp) is left alone with a warning; the
/// sockets themselves are 0600 wherever they are.
pub(super) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o1000 != 0 {
        warn!(dir = %dir.display(), "the agent's sockets are in a shared directory: give it a directory of its own");
    } else if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes a socket file reachable by its owner (root) only.
pub(super) fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Opens a pod's netns: never the node's own.
pub(super) fn open_pod_netns(cfg: &AgentConfig, path: &str) -> Result<Netns, AgentError> {
    let netns = Netns::open(path).map_err(|source| AgentError::Netns {
        path: path.to_string(),
        source,
    })?;
    refuse_node_netns(cfg, path, &netns)?;
    Ok(netns)
}

/// Refuses the node's netns (the configured one, the init process's, the
/// agent's own): whoever asks for it (a compromised ztunnel or plugin, a
/// tampered state file) would have the agent redirect the node's traffic.
pub(super) fn refuse_node_netns(
    cfg: &AgentConfig,
    path: &str,
    netns: &Netns,
) -> Result<(), AgentError> {
    let node = cfg
        .host_netns
        .iter()
        .map(String::as_str)
        .chain(["/proc/1/ns/net", "/proc/self/ns/net"]);
    for n in node {
        if Netns::open(n).is_ok_and(|h| h.id() == netns.id()) {
            warn!(netns = path, node = n, "refused: the node's own netns");
            return Err(AgentError::NodeNetns(path.to_string()));
        }
    }
    Ok(())
}

/// Pods from before a restart: their netns re-opened and rules re-applied.
pub(super) fn load_state(cfg: &AgentConfig) -> BTreeMap<String, Pod> {
    let mut pods = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&cfg.state_file) {
        let specs: Vec<PodSpec> = serde_json::from_str(&text).unwrap_or_default();
        for mut spec in specs {
            match open_pod_netns(cfg, &spec.netns) {
                Ok(netns) => {
                    // A state file from before addresses were recorded.
                    if spec.ips.is_empty() {
                        spec.ips = find::addresses(&netns).unwrap_or_default();
                    }
                    let c = Capture {
                        dns: cfg.dns,
                        bypass_inbound: spec.bypass_inbound,
                    };
                    let no_orig_src = install_rules(&netns, &spec, c).unwrap_or_else(|e| {
                        warn!(uid = %spec.uid, error = %e, "re-applying rules failed");
                        Some(e.to_string())
                    });
                    // Pods captured by an agent from before the setting.
                    if let Err(e) = migrate::enable(&netns) {
                        warn!(uid = %spec.uid, error = %e, "cannot turn on tcp_migrate_req in the pod");
                    }
                    let pod = Pod {
                        spec,
                        netns,
                        no_orig_src,
                    };
                    pods.insert(pod.spec.uid.clone(), pod);
                }
                Err(e) => {
                    warn!(uid = %spec.uid, netns = %spec.netns, error = %e, "pod from the state file is gone")
                }
            }
        }
    }
    pods
}

/// Waits while another agent answers on the control socket: never two
/// agents on a node (the first roll from the agent inside the ztunnel pod,
/// whose sockets have the same paths; a second agent started by hand).
pub(super) async fn wait_for_other_agent(control: &Path) {
    let mut said = false;
    while UnixStream::connect(control).await.is_ok() {
        if !said {
            warn!(control = %control.display(), "another node agent answers on the control socket; waiting until it is gone");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Takes the state file's lock (`<state file>.lock`, an exclusive
/// `flock`), held for the agent's life: an agent that another one locks
/// out (one whose control socket it could not reach: another mount, a hung
/// process) waits here, and never binds the sockets or writes the state.
pub(super) async fn lock_state(state_file: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = state_file.with_extension("lock");
    // The directory private first, then the file, root's alone and never
    // through a link planted at its path.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut said = false;
    loop {
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if !said {
            warn!(lock = %path.display(), "another node agent holds the state file; waiting until it is gone");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
