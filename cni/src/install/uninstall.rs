//! Shutdown: a SIGTERM comes both when the mesh is being removed and when
//! the DaemonSet is merely rolled (upgrade, restart, node drain). Only the
//! first may take the plugin out; in every other case new pods must keep
//! being captured, or they would start with no mesh at all.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use tracing::{info, warn};

use super::{InstallConfig, chain, files};

/// What shutdown should do, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Uninstall(String),
    Keep(String),
}

/// Asks the API server whether our DaemonSet is gone or being deleted.
/// Anything short of that answer, including no answer, keeps the plugin.
pub async fn decide(
    api: Option<&kube::Client>,
    namespace: &str,
    daemonset: &str,
    timeout: Duration,
) -> Decision {
    let Some(client) = api else {
        return Decision::Keep(
            "no API client, so an uninstall cannot be told from a restart".into(),
        );
    };
    let dss: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), namespace);
    let what = format!("DaemonSet {namespace}/{daemonset}");
    match tokio::time::timeout(timeout, dss.get_opt(daemonset)).await {
        Err(_) => Decision::Keep(format!(
            "the API server did not answer about {what} within {timeout:?}"
        )),
        // Our token or role is gone: only an uninstall deletes them (an
        // upgrade leaves both), and a plugin left behind with a dead token
        // would fail every new pod on the node.
        Ok(Err(kube::Error::Api(s))) if s.code == 401 || s.code == 403 => {
            Decision::Uninstall(format!(
                "the API server refused to say ({} {}): the mesh's credentials are gone",
                s.code, s.reason
            ))
        }
        Ok(Err(e)) => Decision::Keep(format!("reading {what} failed: {e}")),
        Ok(Ok(None)) => Decision::Uninstall(format!("{what} is gone")),
        Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_some() => {
            Decision::Uninstall(format!("{what} is being deleted"))
        }
        Ok(Ok(Some(_))) => Decision::Keep(format!(
            "{what} still exists (a rolling upgrade or a restart)"
        )),
    }
}

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
