//! Which of the mesh's pods `meshctl --kube` talks to.

use k8s_openapi::api::core::v1::Pod;

/// The pods still serving: not being deleted. (During a rollout or a
/// failover the pod that goes is still listed for its grace period, and
/// what it served is gone or going.)
pub fn serving(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The istiod-lite replica to read the controller's debug endpoint from:
/// a Ready one that is not being deleted, else any that is not.
pub fn controller(pods: &[Pod]) -> Option<&Pod> {
    let serving = serving(pods);
    serving
        .iter()
        .find(|p| ready(p))
        .or_else(|| serving.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, deleting: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "deletionTimestamp": if deleting { Some("2026-12-07T09:00:00Z") } else { None }},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .expect("a pod")
    }

    fn name(p: Option<&Pod>) -> Option<&str> {
        p.and_then(|p| p.metadata.name.as_deref())
    }

    #[test]
    fn a_replica_being_deleted_or_not_ready_is_not_the_controller() {
        // After a failover: the old leader is going, its replacement starts.
        let pods = [
            pod("old", true, true),
            pod("starting", false, false),
            pod("other", true, false),
        ];
        assert_eq!(name(controller(&pods)), Some("other"));
        // None ready yet: any that is not going.
        let pods = [pod("old", true, true), pod("starting", false, false)];
        assert_eq!(name(controller(&pods)), Some("starting"));
        assert_eq!(controller(&[pod("old", true, true)]).map(|_| ()), None);
    }

    #[test]
    fn pods_being_deleted_are_left_out() {
        let pods = [pod("going", true, true), pod("new", true, false)];
        let names: Vec<&str> = serving(&pods)
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        assert_eq!(names, ["new"]);
    }
}
