//! Shutdown: a SIGTERM comes both when the mesh is being removed and when
//! the DaemonSet is merely rolled (upgrade, restart, node drain). Only the
//! first may take the plugin out; in every other case new pods must keep
//! being captured, or they would start with no mesh at all.

use tracing::{info, warn};

pub use crate::uninstalling::{Decision, decide};

use super::{InstallConfig, chain, files};

/// Takes the plugin out: first the conflist entry, so no new pod runs the
/// plugin, then its kubeconfig and binary. Failures are logged and the
/// rest still removed: there is no later chance to retry.
pub fn uninstall(cfg: &InstallConfig) {
    let (changed, failed) = chain::remove_everywhere(&cfg.cni_conf_dir);
    for path in changed {
        info!(file = %path.display(), "removed the mesh-cni entry");
    }
    for e in failed {
        warn!("left a CNI config as it was: {e}");
    }
    for path in [cfg.kubeconfig_path(), cfg.binary_path()] {
        match files::remove_if_present(&path) {
            Ok(true) => info!(file = %path.display(), "removed"),
            Ok(false) => {}
            Err(e) => warn!("{e}"),
        }
    }
}
