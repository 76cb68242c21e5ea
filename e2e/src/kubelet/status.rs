//! A pod's status as the kubelet reports it.

use serde_json::{Value, json};

/// Now, as Kubernetes writes times (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// One container's part of the status.
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub running_since: Option<String>,
    pub ready: bool,
    pub restarts: i32,
    pub waiting: Option<String>,
}

/// The status to write: Pending while something is missing (with why),
/// Running with the pod's addresses once its containers started.
pub fn pod_status(
    ip: &str,
    host_ip: &str,
    start_time: &str,
    waiting: Option<&str>,
    containers: &[ContainerView],
) -> Value {
    let ready = waiting.is_none() && !containers.is_empty() && containers.iter().all(|c| c.ready);
    let flag = |b: bool| if b { "True" } else { "False" };
    let statuses: Vec<Value> = containers
        .iter()
        .map(|c| {
            let state = match (&c.running_since, &c.waiting) {
                (Some(t), _) => json!({"running": {"startedAt": t}}),
                (None, Some(w)) => json!({"waiting": {"reason": "ContainerCreating", "message": w}}),
                (None, None) => json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            };
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": c.ready,
                   "started": c.running_since.is_some(), "restartCount": c.restarts, "state": state})
        })
        .collect();
    let mut status = json!({
        "phase": if waiting.is_none() { "Running" } else { "Pending" },
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "conditions": [
            {"type": "PodReadyToStartContainers", "status": flag(waiting.is_none())},
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": flag(ready)},
            {"type": "ContainersReady", "status": flag(ready)},
            {"type": "PodScheduled", "status": "True"},
        ],
        "containerStatuses": statuses,
    });
    if waiting.is_none() {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    } else if let Some(w) = waiting {
        status["conditions"][2]["message"] = json!(w);
    }
    status
}
