//! The agent's stop: the node's probe tables ([`crate::host`]) stay through
//! a restart or a roll of the DaemonSet (the next agent replaces them in
//! one transaction each, and without them the kubelet's probes to captured
//! pods would fail in the gap), and go when the DaemonSet is being deleted
//! ([`crate::uninstalling`]: anything short of that answer keeps them) and
//! no pod on the node is still captured: a captured pod's own rules let the
//! probe source through, and without the node's drops a pod able to forge
//! addresses could pass as a probe.

use mesh_core::netns::Netns;
use tracing::{info, warn};

use crate::host;
use crate::rules::RulesError;
use crate::uninstalling::{self, Check, Decision, Seen};

/// Decides by `check` (against `seen`, the DaemonSet at start), and removes the node's tables from `host` on an
/// uninstall with no pod `captured`. The caller holds off adds and deletes
/// until it returns. What it decided, for the caller's tests.
pub async fn on_stop(
    host: Option<&Netns>,
    check: &Check,
    seen: &Seen,
    captured: usize,
) -> Decision {
    let decision = uninstalling::decide_by(check, seen).await;
    match host {
        Some(h) => {
            act(&decision, captured, &|| host::remove(h));
        }
        None => match &decision {
            Decision::Uninstall(why) => info!("uninstalling: {why}"),
            Decision::Keep(why) => info!("stopping: {why}"),
        },
    }
    decision
}

/// Runs `remove` if `decision` is an uninstall and no pod is `captured`;
/// whether it ran.
fn act(decision: &Decision, captured: usize, remove: &dyn Fn() -> Result<(), RulesError>) -> bool {
    match decision {
        Decision::Keep(why) => {
            info!("leaving the node's probe tables in place: {why}");
            false
        }
        Decision::Uninstall(why) if captured > 0 => {
            warn!(
                captured,
                "uninstalling ({why}), but pods on this node are still captured: leaving the node's probe tables in place (release or restart those pods, then remove the tables)"
            );
            false
        }
        Decision::Uninstall(why) => {
            match remove() {
                Ok(()) => info!("uninstalling: removed the node's probe tables: {why}"),
                Err(e) => {
                    warn!(error = %e, "uninstalling ({why}): removing the node's probe tables failed")
                }
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// An uninstall with a pod still captured keeps the tables (its rules
    /// let the probe source through, which only the node's drops keep to
    /// the node); with none captured they go; a keep never removes.
    #[test]
    fn an_uninstall_keeps_the_tables_while_a_pod_is_captured() {
        let ran = Cell::new(0);
        let remove = || {
            ran.set(ran.get() + 1);
            Ok(())
        };
        let gone = Decision::Uninstall("gone".into());
        assert!(!act(&gone, 1, &remove));
        assert_eq!(ran.get(), 0, "removed while a pod was captured");
        assert!(act(&gone, 0, &remove));
        assert_eq!(ran.get(), 1);
        assert!(!act(&Decision::Keep("roll".into()), 0, &remove));
        assert_eq!(ran.get(), 1);
    }
}
