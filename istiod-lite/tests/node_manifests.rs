//! The node side of the install (manifests/install): the node agent in a
//! DaemonSet of its own, so a ztunnel roll (a surge: two ztunnel pods on a
//! node for a while) never runs two agents; the ztunnel pod without the
//! agent's privileges or API access; the two sharing only the ZDS socket's
//! directory.

use std::path::Path;

use serde_json::Value;

fn install() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(d).unwrap();
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn daemonset_running<'a>(all: &'a [Value], program: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|v| v["kind"] == "DaemonSet")
        .filter(|v| {
            v["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["command"][0] == program)
        })
        .collect()
}

fn host_paths(ds: &Value) -> Vec<(String, String)> {
    let spec = &ds["spec"]["template"]["spec"];
    spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let p = v["hostPath"]["path"].as_str()?;
            Some((v["name"].as_str()?.to_string(), p.to_string()))
        })
        .collect()
}

#[test]
fn the_node_agent_has_its_own_daemonset_and_never_surges() {
    let all = install();
    let agents = daemonset_running(&all, "ztunnel-cni");
    let ztunnels = daemonset_running(&all, "ztunnel");
    assert_eq!((agents.len(), ztunnels.len()), (1, 1));
    let (agent, ztunnel) = (agents[0], ztunnels[0]);
    assert_ne!(
        agent["metadata"]["name"], ztunnel["metadata"]["name"],
        "the node agent rides in the ztunnel's pod: a surge runs two"
    );
    let rolling = &agent["spec"]["updateStrategy"]["rollingUpdate"];
    assert!(
        rolling["maxSurge"].is_null() || rolling["maxSurge"] == 0,
        "{rolling}"
    );
    assert_eq!(rolling["maxUnavailable"], 1, "{rolling}");
    // The ztunnel still surges.
    assert_eq!(
        ztunnel["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"],
        1
    );
    // The agent's pod is privileged on the node (nft and sysctls in pods'
    // netns, /proc/sys writable) and sees the node's processes (its ZDS
    // peers' pids, the newest-ack rule), but has a netns of its own: it
    // enters the node's through the node's /proc (--host-netns).
    let spec = &agent["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true);
    assert!(
        spec["hostNetwork"].is_null() || spec["hostNetwork"] == false,
        "{}",
        spec["hostNetwork"]
    );
    let serve = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["command"][0] == "ztunnel-cni")
        .unwrap();
    assert_eq!(serve["securityContext"]["privileged"], true);
    // Its own identity.
    assert_ne!(
        spec["serviceAccountName"],
        ztunnel["spec"]["template"]["spec"]["serviceAccountName"]
    );
}

#[test]
fn the_ztunnel_pod_keeps_only_what_it_needs() {
    let all = install();
    let ztunnel = daemonset_running(&all, "ztunnel")[0];
    let agent = daemonset_running(&all, "ztunnel-cni")[0];
    let spec = &ztunnel["spec"]["template"]["spec"];
    assert!(spec["hostPID"].is_null() && spec["hostNetwork"].is_null());
    assert_eq!(spec["automountServiceAccountToken"], false);
    let init = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(init.is_empty(), "{init:?}");
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "only the ztunnel");
    let sc = &containers[0]["securityContext"];
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    let mut caps: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    caps.sort();
    // setns into pods' netns; SO_MARK (no raw sockets, no IP_TRANSPARENT).
    assert_eq!(caps, ["NET_ADMIN", "SYS_ADMIN"]);
    // No API access: its volumes carry no service account token of the API
    // server's audience.
    let text = spec["volumes"].to_string();
    assert!(!text.contains("kube-root-ca.crt"), "{text}");
    // The one hostPath: the ZDS socket's own directory, read only (a
    // socket is connected to on a read-only mount), inside the agent's.
    let shared = host_paths(ztunnel);
    assert_eq!(shared.len(), 1, "{shared:?}");
    let (name, zds_dir) = &shared[0];
    let mount = containers[0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name.as_str())
        .unwrap();
    assert_eq!(mount["readOnly"], true, "{mount}");
    let agent_dirs = host_paths(agent);
    assert!(
        agent_dirs
            .iter()
            .any(|(_, p)| zds_dir.starts_with(&format!("{p}/"))),
        "{shared:?} {agent_dirs:?}"
    );
    // Neither the agent's control socket nor its state file is in it: a
    // compromised ztunnel can neither ask the agent to capture nor replace
    // its socket or its pods.
    let serve = agent["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["command"][0] == "ztunnel-cni")
        .unwrap();
    let args: Vec<&str> = serve["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .map(str::to_string)
    };
    let zds = arg("zds-socket").expect("--zds-socket");
    assert!(zds.starts_with(&format!("{zds_dir}/")), "{zds}");
    // The defaults, when not given: /var/run/ztunnel/cni-control.sock.
    let control = arg("control-socket").unwrap_or("/var/run/ztunnel/cni-control.sock".into());
    let state = arg("state-file").expect("--state-file");
    for p in [control, state] {
        assert!(
            !p.starts_with(&format!("{zds_dir}/")),
            "{p} is the ztunnel's"
        );
    }
    let cfg = all
        .iter()
        .find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "ztunnel-config")
        .unwrap();
    let text = cfg["data"].to_string();
    assert!(text.contains(&format!("zds_socket: {zds}")), "{text}");
}

/// Least RBAC: the ztunnel's ServiceAccount is bound to nothing (its CA
/// token is not for the API server); the agent's reads pods and namespaces
/// and its own DaemonSet.
#[test]
fn only_the_node_agent_reads_the_api() {
    let all = install();
    let agent = daemonset_running(&all, "ztunnel-cni")[0];
    let sa = agent["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let bound = |account: &str| -> Vec<String> {
        all.iter()
            .filter(|v| {
                matches!(
                    v["kind"].as_str(),
                    Some("RoleBinding" | "ClusterRoleBinding")
                )
            })
            .filter(|v| {
                v["subjects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == account)
            })
            .map(|v| v["roleRef"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(bound("ztunnel").is_empty(), "{:?}", bound("ztunnel"));
    let roles = bound(sa);
    assert_eq!(roles.len(), 2, "{roles:?}");
    let ds_rule = all
        .iter()
        .filter(|v| {
            v["kind"] == "Role"
                && roles.contains(&v["metadata"]["name"].as_str().unwrap().to_string())
        })
        .flat_map(|v| v["rules"].as_array().unwrap().clone())
        .find(|r| r["resources"][0] == "daemonsets")
        .expect("its own DaemonSet, read by install-cni");
    assert_eq!(ds_rule["resourceNames"][0], agent["metadata"]["name"]);
}
