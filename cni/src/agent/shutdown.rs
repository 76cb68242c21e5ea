//! The agent's stop: the node's probe tables ([`crate::host`]) stay through
//! a restart or a roll of the DaemonSet (the next agent replaces them in
//! one transaction each, and without them the kubelet's probes to captured
//! pods would fail in the gap), and go when the DaemonSet is being deleted
//! ([`crate::uninstalling`]: anything short of that answer keeps them).

use mesh_core::netns::Netns;
use tracing::{info, warn};

use crate::host;
use crate::uninstalling::{self, Check, Decision};

/// Decides by `check`, and removes the node's tables from `host` on an
/// uninstall. What it did, for the caller's tests.
pub async fn on_stop(host: Option<&Netns>, check: &Check) -> Decision {
    let decision = uninstalling::decide_by(check).await;
    match (&decision, host) {
        (Decision::Uninstall(why), Some(h)) => match host::remove(h) {
            Ok(()) => info!("uninstalling: removed the node's probe tables: {why}"),
            Err(e) => {
                warn!(error = %e, "uninstalling ({why}): removing the node's probe tables failed")
            }
        },
        (Decision::Uninstall(why), None) => info!("uninstalling: {why}"),
        (Decision::Keep(why), _) => info!("leaving the node's probe tables in place: {why}"),
    }
    decision
}
