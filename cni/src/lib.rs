//! The CNI plugin, chained after the cluster's network plugin: on ADD for a
//! pod that is in the mesh, it hands the pod to the node agent and returns
//! only once the ztunnel has its listeners up inside the pod, so no
//! container starts uncaptured. On DEL it releases the pod.
//!
//! Protocol (CNI 1.0): the command and pod come in environment variables
//! (`CNI_COMMAND`, `CNI_NETNS`, `CNI_ARGS` with `K8S_POD_NAMESPACE`,
//! `K8S_POD_NAME`, `K8S_POD_UID`), the network config on stdin (ours is a
//! chained entry with `prevResult`); the result, or an error object the
//! kubelet shows, goes to stdout.
//!
//! The same binary, run as `mesh-cni install`, is the DaemonSet container
//! that puts the plugin on the node: see [`install`].

pub mod agent;
pub mod enroll;
pub mod fence;
pub mod find;
pub mod host;
pub mod install;
pub mod migrate;
pub mod orig_src;
pub mod rules;
pub mod uninstalling;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

pub use enroll::DATAPLANE_MODE;
pub const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Our entry of the conflist.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// The node agent's control socket.
    #[serde(default = "default_agent")]
    pub agent_socket: PathBuf,
    /// Credentials to read pods and namespaces (written by the installer).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces never captured (the mesh's own, kube-system).
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// How long to wait for the agent (and so the ztunnel) per pod.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

pub(crate) fn default_agent() -> PathBuf {
    PathBuf::from("/var/run/ztunnel/cni-control.sock")
}

pub(crate) fn default_excluded() -> Vec<String> {
    vec!["kube-system".into(), "istio-system".into()]
}

pub(crate) fn default_timeout() -> u64 {
    30
}

/// A failure, as CNI reports it: code, message, details.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Agent(String),
}

impl CniError {
    /// CNI's error codes: 4 invalid config, 7 invalid environment
    /// variables; 100+ are the plugin's own.
    pub fn code(&self) -> u32 {
        match self {
            CniError::Config(_) => 7,
            CniError::Api(_) => 101,
            CniError::Agent(_) => 102,
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code(), "msg": self.to_string(), "details": ""})
    }
}

/// What the runtime told us about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// Parses `CNI_ARGS` ("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;...").
pub fn pod_args(cni_args: &str) -> Result<PodArgs, CniError> {
    let kv: BTreeMap<&str, &str> = cni_args
        .split(';')
        .filter_map(|p| p.split_once('='))
        .collect();
    let get = |k: &str| kv.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());
    Ok(PodArgs {
        namespace: get("K8S_POD_NAMESPACE")
            .ok_or_else(|| CniError::Config("CNI_ARGS has no K8S_POD_NAMESPACE".into()))?,
        name: get("K8S_POD_NAME")
            .ok_or_else(|| CniError::Config("CNI_ARGS has no K8S_POD_NAME".into()))?,
        uid: get("K8S_POD_UID"),
    })
}

/// What the plugin needs to know of a pod from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
}

impl PodFacts {
    /// In the mesh: the one decision the agent's watch takes too
    /// ([`enroll::enrolled`]).
    pub fn enrolled(&self) -> bool {
        enroll::enrolled(self.host_network, &self.labels, &self.namespace_labels)
    }
}

/// The pod's addresses in the previous plugin's result (`ips[].address`,
/// CIDR notation).
pub fn result_ips(prev: Option<&Value>) -> Vec<std::net::IpAddr> {
    prev.and_then(|p| p["ips"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Reads the pod and its namespace from the API server.
pub async fn pod_facts(conf: &NetConf, pod: &PodArgs) -> Result<PodFacts, CniError> {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let config = match &conf.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| CniError::Config(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| CniError::Config(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| CniError::Config(format!("no API server credentials: {e}")))?,
    };
    let client =
        kube::Client::try_from(config).map_err(|e| CniError::Api(format!("API client: {e}")))?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &pod.namespace);
    let p = pods.get(&pod.name).await.map_err(|e| {
        CniError::Api(format!(
            "reading pod {}/{} from the API server: {e}",
            pod.namespace, pod.name
        ))
    })?;
    let ns = kube::Api::<Namespace>::all(client)
        .get(&pod.namespace)
        .await
        .map_err(|e| {
            CniError::Api(format!(
                "reading namespace {} from the API server: {e}",
                pod.namespace
            ))
        })?;
    let spec = p.spec.unwrap_or_default();
    Ok(PodFacts {
        uid: pod.uid.clone().or(p.metadata.uid).unwrap_or_default(),
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        host_network: spec.host_network.unwrap_or(false),
        labels: p.metadata.labels.unwrap_or_default(),
        annotations: p.metadata.annotations.unwrap_or_default(),
        namespace_labels: ns.metadata.labels.unwrap_or_default(),
    })
}

async fn agent_call(conf: &NetConf, req: &agent::Request) -> Result<Value, CniError> {
    let wait = Duration::from_secs(conf.timeout_secs.max(1));
    tokio::time::timeout(wait, agent::call(&conf.agent_socket, req))
        .await
        .map_err(|_| {
            CniError::Agent(format!(
                "the node agent at {} did not answer within {}s (is the ztunnel on this node ready?)",
                conf.agent_socket.display(),
                conf.timeout_secs
            ))
        })?
        .map_err(|e| CniError::Agent(format!("mesh capture failed: {e}")))
}

/// The environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub netns: String,
    pub args: String,
}

/// Runs one CNI command; what goes to stdout on success.
pub async fn run(env: &Env, stdin: &str) -> Result<String, (CniError, String)> {
    if env.command == "VERSION" {
        return Ok(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string());
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        (
            CniError::Config(format!("network config on stdin: {e}")),
            "1.0.0".to_string(),
        )
    })?;
    let v = conf.cni_version.clone();
    let fail = |e: CniError| (e, v.clone());
    // A chained plugin passes the previous result on unchanged.
    let passthrough = || {
        conf.prev_result
            .clone()
            .unwrap_or_else(|| json!({"cniVersion": v}))
            .to_string()
    };
    match env.command.as_str() {
        "ADD" => {
            if conf.prev_result.is_none() {
                return Err(fail(CniError::Config(
                    "mesh-cni must be chained after the network plugin (no prevResult)".into(),
                )));
            }
            let pod = pod_args(&env.args).map_err(fail)?;
            if conf.exclude_namespaces.contains(&pod.namespace) {
                return Ok(passthrough());
            }
            let facts = tokio::time::timeout(
                Duration::from_secs(conf.timeout_secs.max(1)),
                pod_facts(&conf, &pod),
            )
            .await
            .map_err(|_| {
                fail(CniError::Api(format!(
                    "the API server did not answer within {}s about pod {}/{}",
                    conf.timeout_secs, pod.namespace, pod.name
                )))
            })?
            .map_err(fail)?;
            if !facts.enrolled() {
                return Ok(passthrough());
            }
            if env.netns.is_empty() {
                return Err(fail(CniError::Config("CNI_NETNS is empty".into())));
            }
            let bypass_inbound = enroll::bypass_inbound(&facts.labels, &facts.annotations);
            let spec = agent::PodSpec {
                ips: result_ips(conf.prev_result.as_ref()),
                bypass_inbound,
                uid: facts.uid,
                name: pod.name,
                namespace: pod.namespace,
                service_account: facts.service_account,
                netns: env.netns.clone(),
            };
            agent_call(&conf, &agent::Request::Add(spec))
                .await
                .map_err(fail)?;
            Ok(passthrough())
        }
        "DEL" => {
            // DEL must succeed whatever state the pod is in: a pod that was
            // never captured, or an agent that is gone, is not an error
            // that should keep the pod from being deleted.
            if let Ok(pod) = pod_args(&env.args) {
                let uid = pod.uid.unwrap_or_default();
                if !uid.is_empty() {
                    let _ = agent_call(&conf, &agent::Request::Del { uid }).await;
                }
            }
            Ok(String::new())
        }
        "CHECK" | "STATUS" | "GC" => Ok(String::new()),
        other => Err(fail(CniError::Config(format!(
            "CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_name_the_pod() {
        let a = pod_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client-0;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u-1").unwrap();
        assert_eq!(
            a,
            PodArgs {
                namespace: "shop".into(),
                name: "client-0".into(),
                uid: Some("u-1".into())
            }
        );
        assert!(pod_args("K8S_POD_NAME=x").is_err());
    }

    #[test]
    fn enrollment_follows_labels_and_never_host_network() {
        let mut f = PodFacts {
            uid: "u".into(),
            service_account: "sa".into(),
            host_network: false,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            namespace_labels: BTreeMap::from([(DATAPLANE_MODE.into(), "ambient".into())]),
        };
        assert!(f.enrolled());
        f.labels.insert(DATAPLANE_MODE.into(), "none".into());
        assert!(!f.enrolled());
        f.labels.clear();
        f.host_network = true;
        assert!(!f.enrolled());
    }

    #[test]
    fn the_previous_result_gives_the_pods_addresses() {
        let prev = json!({"ips": [{"address": "10.1.1.5/24"}, {"address": "fd00::5/64"}]});
        assert_eq!(
            result_ips(Some(&prev)),
            vec![
                "10.1.1.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn version_and_a_missing_prev_result() {
        let env = Env {
            command: "VERSION".into(),
            ..Default::default()
        };
        assert!(run(&env, "").await.unwrap().contains("supportedVersions"));
        let env = Env {
            command: "ADD".into(),
            netns: "/var/run/netns/x".into(),
            args: "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b".into(),
        };
        let (e, v) = run(
            &env,
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"mesh-cni"}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(v, "1.0.0");
        assert!(e.to_string().contains("chained"));
    }
}
