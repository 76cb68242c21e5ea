//! Where meshctl reads from: a ztunnel's admin endpoint by address, every
//! proxy of a lab (inside their network namespaces), or a saved
//! `/config_dump`; and the controller's debug endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_core::lab_file::{LabFileError, LabState};
use serde_json::Value;

/// Why something could not be read. Each says what was tried and what to
/// check.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot reach {what} at {addr}: {reason}\n  check: is it running, and is {addr} its address? ({hint})"
    )]
    Unreachable {
        what: String,
        addr: SocketAddr,
        reason: String,
        hint: String,
    },
    #[error("{what} at {addr} answered {status} to GET {path}")]
    Status {
        what: String,
        addr: SocketAddr,
        path: String,
        status: u16,
    },
    #[error("{what}: the answer to GET {path} is not JSON: {reason}")]
    NotJson {
        what: String,
        path: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("lab at {dir}: {reason}")]
    Lab { dir: String, reason: String },
    #[error("{0}")]
    Other(String),
}

/// How an endpoint's address is reached.
#[derive(Clone)]
pub enum Via {
    /// From here.
    Direct,
    /// From inside this network namespace (a lab's node or pod).
    Netns(PathBuf),
    /// Through the Kubernetes API server's pod port-forward.
    PortForward {
        client: kube::Client,
        namespace: String,
        pod: String,
    },
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Direct => write!(f, "direct"),
            Via::Netns(p) => write!(f, "netns {}", p.display()),
            Via::PortForward { namespace, pod, .. } => write!(f, "port-forward {namespace}/{pod}"),
        }
    }
}

/// A byte stream to an endpoint.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An HTTP endpoint of a proxy or the controller.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// What it is, for messages: "ztunnel on node-1 (admin)".
    pub what: String,
    /// Its address (for a port-forward, the pod's address and port).
    pub addr: SocketAddr,
    pub via: Via,
}

impl Endpoint {
    pub fn new(what: impl Into<String>, addr: SocketAddr, netns: Option<PathBuf>) -> Self {
        Endpoint {
            what: what.into(),
            addr,
            via: netns.map(Via::Netns).unwrap_or(Via::Direct),
        }
    }

    fn hint(&self) -> String {
        match &self.via {
            Via::Netns(n) => format!(
                "reached from network namespace {}; as root, `ip netns exec {} ss -ltn` lists its listeners",
                n.display(),
                n.file_name().and_then(|f| f.to_str()).unwrap_or("?")
            ),
            Via::PortForward { namespace, pod, .. } => format!(
                "through the API server's port-forward to pod {namespace}/{pod}; check `kubectl -n {namespace} get pod {pod}` and that you may create pods/portforward"
            ),
            Via::Direct => "admin listens on 127.0.0.1:15000 by default: use its node's address or a port-forward".into(),
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, SourceError> {
        let unreachable = |reason: String| SourceError::Unreachable {
            what: self.what.clone(),
            addr: self.addr,
            reason,
            hint: self.hint(),
        };
        let socket = match &self.via {
            Via::PortForward {
                client,
                namespace,
                pod,
            } => {
                let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                    kube::Api::namespaced(client.clone(), namespace);
                let port = self.addr.port();
                let mut pf =
                    tokio::time::timeout(Duration::from_secs(10), pods.portforward(pod, &[port]))
                        .await
                        .map_err(|_| unreachable("port-forward: no answer within 10s".into()))?
                        .map_err(|e| unreachable(format!("port-forward: {e}")))?;
                let stream = pf
                    .take_stream(port)
                    .ok_or_else(|| unreachable("port-forward gave no stream".into()))?;
                // The forwarder's task runs as long as the stream is used.
                tokio::spawn(async move {
                    let _ = pf.join().await;
                });
                return Ok(Box::new(stream));
            }
            // The socket is made inside the namespace; it stays there.
            Via::Netns(path) => {
                let ns = mesh_core::netns::Netns::open(&path.display().to_string())
                    .map_err(|e| unreachable(format!("opening {}: {e}", path.display())))?;
                let addr = self.addr;
                ns.run(move || {
                    if addr.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()
                    } else {
                        tokio::net::TcpSocket::new_v6()
                    }
                })
                .map_err(|e| unreachable(format!("entering the namespace: {e}")))?
                .map_err(|e| unreachable(e.to_string()))?
            }
            Via::Direct => if self.addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(|e| unreachable(e.to_string()))?,
        };
        let tcp = tokio::time::timeout(Duration::from_secs(3), socket.connect(self.addr))
            .await
            .map_err(|_| unreachable("no answer within 3s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Box::new(tcp))
    }

    /// GETs `path`; the body when the answer is 2xx.
    pub async fn get(&self, path: &str) -> Result<String, SourceError> {
        let (status, body) = self.get_any(path).await?;
        if !(200..300).contains(&status) {
            return Err(SourceError::Status {
                what: self.what.clone(),
                addr: self.addr,
                path: path.into(),
                status,
            });
        }
        Ok(body)
    }

    /// GETs `path`; the status and body, whatever the status.
    pub async fn get_any(&self, path: &str) -> Result<(u16, String), SourceError> {
        let tcp = self.connect().await?;
        let failed = |reason: String| SourceError::Unreachable {
            what: self.what.clone(),
            addr: self.addr,
            reason,
            hint: self.hint(),
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| SourceError::Other(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = send.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await
        .map_err(|_| failed(format!("GET {path}: no answer within 10s")))?
        .map_err(|e| failed(format!("GET {path}: {e}")))?;
        Ok((resp.0, String::from_utf8_lossy(&resp.1).into_owned()))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, SourceError> {
        let body = self.get(path).await?;
        serde_json::from_str(&body).map_err(|e| SourceError::NotJson {
            what: self.what.clone(),
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

/// One ztunnel: its node and endpoints.
#[derive(Debug, Clone)]
pub struct Ztunnel {
    pub node: String,
    pub admin: Endpoint,
    pub metrics: Option<Endpoint>,
    pub readiness: Option<Endpoint>,
}

/// One waypoint replica.
#[derive(Debug, Clone)]
pub struct Waypoint {
    /// "namespace/pod".
    pub name: String,
    pub admin: Endpoint,
    pub metrics: Option<Endpoint>,
    pub readiness: Option<Endpoint>,
}

/// Everything meshctl can read.
#[derive(Default)]
pub struct Mesh {
    pub ztunnels: Vec<Ztunnel>,
    pub waypoints: Vec<Waypoint>,
    pub controller: Option<Endpoint>,
    /// A saved `/config_dump` read instead of a live one.
    pub file: Option<Value>,
    /// The lab's directory, when the mesh is a lab.
    pub lab: Option<PathBuf>,
    /// The API server, when the mesh is a Kubernetes cluster.
    pub kube: Option<kube::Client>,
}

/// Pods of waypoints carry their Gateway's name in this label.
pub const WAYPOINT_POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// istiod-lite's debug port on Kubernetes.
pub const CONTROLLER_DEBUG_PORT: u16 = 15014;

/// A ztunnel's `/config_dump`, with the node it came from.
#[derive(Debug, Clone)]
pub struct Dump {
    pub node: String,
    pub value: Value,
}

impl Mesh {
    /// A single ztunnel by its admin address (and optionally its metrics and
    /// readiness addresses and the controller's debug address).
    pub fn by_address(
        admin: SocketAddr,
        metrics: Option<SocketAddr>,
        controller: Option<SocketAddr>,
    ) -> Mesh {
        let readiness = metrics.map(|m| SocketAddr::new(m.ip(), mesh_core::config::READINESS_PORT));
        Mesh {
            ztunnels: vec![Ztunnel {
                node: String::new(),
                admin: Endpoint::new("ztunnel admin", admin, None),
                metrics: metrics.map(|m| Endpoint::new("ztunnel metrics", m, None)),
                readiness: readiness.map(|r| Endpoint::new("ztunnel readiness", r, None)),
            }],
            controller: controller.map(|c| Endpoint::new("istiod-lite debug", c, None)),
            ..Default::default()
        }
    }

    /// A saved `/config_dump`.
    pub fn from_file(path: &Path) -> Result<Mesh, SourceError> {
        let bad = |reason: String| SourceError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value: Value = serde_json::from_str(&text)
            .or_else(|_| serde_yaml::from_str(&text))
            .map_err(|e| bad(format!("not a JSON (or YAML) config dump: {e}")))?;
        if !value.is_object() {
            return Err(bad("a config dump is a JSON object".into()));
        }
        Ok(Mesh {
            file: Some(value),
            ..Default::default()
        })
    }

    /// Every proxy of the lab in `dir` (its `lab.json`), reached inside the
    /// nodes' and pods' network namespaces.
    pub fn from_lab(dir: &Path) -> Result<Mesh, SourceError> {
        let bad = |reason: String| SourceError::Lab {
            dir: dir.display().to_string(),
            reason,
        };
        let lab = LabState::read(dir).map_err(|e| match e {
            LabFileError::Read(_) => bad(format!("{e} (is a lab up? `lab up ...`)")),
            LabFileError::Parse(_) => bad(e.to_string()),
        })?;
        let netns = |name: &str| Some(PathBuf::from(format!("/var/run/netns/{name}")));
        let ip = |v: &str| -> Result<std::net::IpAddr, SourceError> {
            v.parse()
                .map_err(|_| bad(format!("{v:?} is not an address")))
        };
        let mut mesh = Mesh {
            lab: Some(dir.to_path_buf()),
            ..Default::default()
        };
        for n in &lab.nodes {
            let name = n.name.clone();
            let ns = n.netns.as_str();
            let node_ip = ip(&n.ip)?;
            let at = |port| SocketAddr::new(node_ip, port);
            mesh.ztunnels.push(Ztunnel {
                admin: Endpoint::new(
                    format!("ztunnel on {name} (admin)"),
                    SocketAddr::from(([127, 0, 0, 1], mesh_core::config::ADMIN_PORT)),
                    netns(ns),
                ),
                metrics: Some(Endpoint::new(
                    format!("ztunnel on {name} (metrics)"),
                    at(mesh_core::config::METRICS_PORT),
                    netns(ns),
                )),
                readiness: Some(Endpoint::new(
                    format!("ztunnel on {name} (readiness)"),
                    at(mesh_core::config::READINESS_PORT),
                    netns(ns),
                )),
                node: name,
            });
        }
        for (key, p) in &lab.pods {
            if p.image != "waypoint" {
                continue;
            }
            let ns = p.netns.as_str();
            let pod_ip = ip(&p.ip)?;
            mesh.waypoints.push(Waypoint {
                name: key.clone(),
                admin: Endpoint::new(
                    format!("waypoint {key} (admin)"),
                    SocketAddr::from(([127, 0, 0, 1], mesh_core::config::ADMIN_PORT)),
                    netns(ns),
                ),
                metrics: Some(Endpoint::new(
                    format!("waypoint {key} (metrics)"),
                    SocketAddr::new(pod_ip, mesh_core::config::METRICS_PORT),
                    netns(ns),
                )),
                readiness: Some(Endpoint::new(
                    format!("waypoint {key} (readiness)"),
                    SocketAddr::new(pod_ip, mesh_core::config::READINESS_PORT),
                    netns(ns),
                )),
            });
        }
        // The controller: its --debug-addr, in its namespace.
        if let Some(ctl) = lab.procs.get("istiod-lite")
            && let Some(addr) = ctl
                .cmd
                .windows(2)
                .find(|w| w[0] == "--debug-addr")
                .and_then(|w| w[1].parse().ok())
        {
            mesh.controller = Some(Endpoint::new(
                "istiod-lite (debug)",
                addr,
                netns(&ctl.netns),
            ));
        }
        if mesh.ztunnels.is_empty() {
            return Err(bad("lab.json lists no nodes".into()));
        }
        Ok(mesh)
    }

    /// Kubernetes: the ztunnel DaemonSet's pods (label `app=ztunnel`) and
    /// istiod-lite's (`app=istiod-lite`) in `namespace`, and every
    /// waypoint's pods, each reached through the API server's port-forward.
    pub async fn from_kube(client: kube::Client, namespace: &str) -> Result<Mesh, SourceError> {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, ListParams};
        let failed = |what: &str, e: kube::Error| {
            SourceError::Other(format!(
                "listing {what} through the API server: {e}\n  check: `kubectl get pods` works with the same kubeconfig, and you may list pods"
            ))
        };
        let list = |api: Api<Pod>, sel: &'static str| async move {
            api.list(&ListParams::default().labels(sel)).await
        };
        let ns_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let ztunnels = list(ns_api.clone(), "app=ztunnel")
            .await
            .map_err(|e| failed("ztunnel pods", e))?;
        let controllers = list(ns_api, "app=istiod-lite")
            .await
            .map_err(|e| failed("istiod-lite pods", e))?;
        let waypoints = list(Api::all(client.clone()), WAYPOINT_POD_LABEL)
            .await
            .map_err(|e| failed("waypoint pods", e))?;
        let pf = |pod: &Pod, port: u16, what: String| -> Option<Endpoint> {
            let name = pod.metadata.name.clone()?;
            let ns = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.to_string());
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            Some(Endpoint {
                what,
                addr: SocketAddr::new(ip, port),
                via: Via::PortForward {
                    client: client.clone(),
                    namespace: ns,
                    pod: name,
                },
            })
        };
        let mut mesh = Mesh::default();
        for p in crate::kube_pods::serving(&ztunnels.items) {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let Some(admin) = pf(
                p,
                mesh_core::config::ADMIN_PORT,
                format!("ztunnel on {node} (admin)"),
            ) else {
                continue;
            };
            mesh.ztunnels.push(Ztunnel {
                metrics: pf(
                    p,
                    mesh_core::config::METRICS_PORT,
                    format!("ztunnel on {node} (metrics)"),
                ),
                readiness: pf(
                    p,
                    mesh_core::config::READINESS_PORT,
                    format!("ztunnel on {node} (readiness)"),
                ),
                admin,
                node,
            });
        }
        for p in crate::kube_pods::serving(&waypoints.items) {
            let key = format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default()
            );
            let Some(admin) = pf(
                p,
                mesh_core::config::ADMIN_PORT,
                format!("waypoint {key} (admin)"),
            ) else {
                continue;
            };
            mesh.waypoints.push(Waypoint {
                metrics: pf(
                    p,
                    mesh_core::config::METRICS_PORT,
                    format!("waypoint {key} (metrics)"),
                ),
                readiness: pf(
                    p,
                    mesh_core::config::READINESS_PORT,
                    format!("waypoint {key} (readiness)"),
                ),
                admin,
                name: key,
            });
        }
        mesh.controller = crate::kube_pods::controller(&controllers.items)
            .and_then(|p| pf(p, CONTROLLER_DEBUG_PORT, "istiod-lite (debug)".into()));
        if mesh.ztunnels.is_empty() {
            return Err(SourceError::Other(format!(
                "no ztunnel pods (label app=ztunnel) in namespace {namespace}: is the mesh installed there? (--kube-namespace)"
            )));
        }
        mesh.kube = Some(client);
        Ok(mesh)
    }

    /// The ztunnels to ask, narrowed to `node` when given.
    pub fn ztunnels(&self, node: Option<&str>) -> Result<Vec<&Ztunnel>, SourceError> {
        let all: Vec<&Ztunnel> = self
            .ztunnels
            .iter()
            .filter(|z| node.is_none_or(|n| z.node == n || z.node.is_empty()))
            .collect();
        if all.is_empty() {
            let known: Vec<&str> = self.ztunnels.iter().map(|z| z.node.as_str()).collect();
            return Err(SourceError::Other(format!(
                "no ztunnel on node {:?}; known nodes: {}",
                node.unwrap_or(""),
                known.join(", ")
            )));
        }
        Ok(all)
    }

    /// Config dumps: the saved one, or one per ztunnel (narrowed to `node`).
    pub async fn dumps(&self, node: Option<&str>) -> Result<Vec<Dump>, SourceError> {
        if let Some(v) = &self.file {
            return Ok(vec![Dump {
                node: v["node"].as_str().unwrap_or_default().to_string(),
                value: v.clone(),
            }]);
        }
        let mut out = Vec::new();
        for z in self.ztunnels(node)? {
            let value = z.admin.get_json("/config_dump").await?;
            let node = value["node"].as_str().unwrap_or(&z.node).to_string();
            out.push(Dump { node, value });
        }
        Ok(out)
    }

    /// Like [`Mesh::dumps`], but a ztunnel that does not answer is named
    /// rather than failing the whole read (every ztunnel holds the same
    /// mesh-wide state, so one dump is enough to reason from). Fails only
    /// when none answers.
    pub async fn reachable_dumps(&self) -> Result<(Vec<Dump>, Vec<String>), SourceError> {
        if self.file.is_some() {
            return Ok((self.dumps(None).await?, Vec::new()));
        }
        let (mut out, mut failed, mut last) = (Vec::new(), Vec::new(), None);
        for z in self.ztunnels(None)? {
            match z.admin.get_json("/config_dump").await {
                Ok(value) => {
                    let node = value["node"].as_str().unwrap_or(&z.node).to_string();
                    out.push(Dump { node, value });
                }
                Err(e) => {
                    failed.push(format!("{}: {e}", z.node));
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok((out, failed)),
        }
    }

    pub fn controller(&self) -> Result<&Endpoint, SourceError> {
        self.controller.as_ref().ok_or_else(|| {
            SourceError::Other(
                "this needs the controller's debug endpoint: pass --controller ADDR (istiod-lite --debug-addr), or use --lab"
                    .into(),
            )
        })
    }
}
