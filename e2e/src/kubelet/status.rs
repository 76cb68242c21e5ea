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

/// `[{ip}]` and, the lab being dual-stack, its IPv6 twin (in the canonical
/// form the API server asks for): `podIPs` and `hostIPs` as a dual-stack
/// cluster's kubelet writes them.
fn both_families(ip: &str) -> Value {
    let mut ips = vec![json!({"ip": ip})];
    if let Some(v6) = crate::lab::ipv6_twin(ip).and_then(|t| t.parse::<std::net::Ipv6Addr>().ok()) {
        ips.push(json!({"ip": v6.to_string()}));
    }
    Value::Array(ips)
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
        "hostIP": host_ip, "hostIPs": both_families(host_ip),
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
        status["podIPs"] = both_families(ip);
    } else if let Some(w) = waiting {
        status["conditions"][2]["message"] = json!(w);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab is dual-stack in kube mode as in folder mode: a running
    /// pod's podIPs and its node's hostIPs carry the IPv6 twin after the
    /// IPv4 address (the one podIP and hostIP name).
    #[test]
    fn a_running_pod_reports_both_families() {
        let s = pod_status("10.220.1.5", "10.220.0.1", "t", None, &[]);
        assert_eq!(s["podIP"], "10.220.1.5");
        assert_eq!(
            s["podIPs"],
            json!([{"ip": "10.220.1.5"}, {"ip": "fd00:10:220:1::5"}])
        );
        assert_eq!(
            s["hostIPs"],
            json!([{"ip": "10.220.0.1"}, {"ip": "fd00:10:220::1"}])
        );
        // Pending: no pod address yet.
        let p = pod_status("10.220.1.5", "10.220.0.1", "t", Some("no image"), &[]);
        assert!(p.get("podIPs").is_none());
    }
}
