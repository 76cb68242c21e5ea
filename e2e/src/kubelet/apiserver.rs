//! The API server the lab is the kubelet of: the control plane from
//! `../shared/kube` (started by `lab up --kube`) or a running one given by
//! its kubeconfig; and the way from the lab's nodes and pods to it.
//!
//! The API server listens on the machine's loopback, which no netns of the
//! lab reaches. As a cluster's `kubernetes` Service does, the lab gives it
//! the address `10.96.0.1:443` (the Service's ClusterIP, which the API
//! server's certificate names) inside the lab's own network: on the
//! control netns's loopback, routed from every node, and forwarded from
//! there to the real listener by the kubelet process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;

use super::error::{KubeletError, Result};
use crate::lab::{Lab, sh};

/// The `kubernetes` Service's ClusterIP: where pods find the API server
/// (`KUBERNETES_SERVICE_HOST`).
pub const SERVICE_IP: &str = "10.96.0.1";
/// `KUBERNETES_SERVICE_PORT`.
pub const SERVICE_PORT: u16 = 443;

/// `../shared/kube/control-plane` beside the checkout, or
/// `MESH_CONTROL_PLANE`.
pub fn plane_script() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_CONTROL_PLANE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/kube/control-plane")
}

/// `control-plane up DIR PORT`: etcd and the API server, ready when this
/// returns. The admin kubeconfig's path.
pub fn plane_up(script: &Path, dir: &Path, port: u16) -> Result<PathBuf> {
    let out = Command::new(script)
        .arg("up")
        .arg(dir)
        .arg(port.to_string())
        .output()
        .map_err(|e| KubeletError::io(format!("running {}", script.display()), e))?;
    if !out.status.success() {
        return Err(KubeletError::Setup(format!(
            "{} up {} {port}: {}{}",
            script.display(),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(dir.join("admin.kubeconfig"))
}

/// `control-plane down DIR` (the API server, then etcd).
pub fn plane_down(script: &Path, dir: &Path) {
    match Command::new(script).arg("down").arg(dir).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            "control-plane down {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => tracing::warn!("control-plane down {}: {e}", dir.display()),
    }
}

fn kubeconfig_yaml(kubeconfig: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| KubeletError::io(format!("reading {}", kubeconfig.display()), e))?;
    serde_yaml::from_str(&text)
        .map_err(|e| KubeletError::Setup(format!("{}: {e}", kubeconfig.display())))
}

/// The API server's address, from the kubeconfig's first cluster.
pub fn server_addr(kubeconfig: &Path) -> Result<SocketAddr> {
    let v = kubeconfig_yaml(kubeconfig)?;
    let server = v["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap_or_default();
    let hostport = server
        .strip_prefix("https://")
        .map(|s| s.trim_end_matches('/'))
        .unwrap_or_default();
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:443")
    };
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            KubeletError::Setup(format!(
                "{}: no https server address in {server:?}",
                kubeconfig.display()
            ))
        })
}

/// The cluster CA's PEM (what pods get as `ca.crt` and `kube-root-ca.crt`).
pub fn ca_pem(kubeconfig: &Path) -> Result<String> {
    let v = kubeconfig_yaml(kubeconfig)?;
    let cluster = &v["clusters"][0]["cluster"];
    if let Some(data) = cluster["certificate-authority-data"].as_str() {
        let bytes: k8s_openapi::ByteString = serde_json::from_value(Value::from(data))
            .map_err(|e| KubeletError::Setup(format!("certificate-authority-data: {e}")))?;
        return Ok(String::from_utf8_lossy(&bytes.0).into_owned());
    }
    let file = cluster["certificate-authority"].as_str().ok_or_else(|| {
        KubeletError::Setup(format!(
            "{}: the cluster names no certificate authority",
            kubeconfig.display()
        ))
    })?;
    let file = kubeconfig
        .parent()
        .map_or_else(|| PathBuf::from(file), |d| d.join(file));
    std::fs::read_to_string(&file)
        .map_err(|e| KubeletError::io(format!("reading {}", file.display()), e))
}

/// A client with the kubeconfig's credentials (the lab's kubelet and
/// controllers act as the cluster's admin).
pub async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| KubeletError::Setup(format!("{}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| KubeletError::Setup(format!("{}: {e}", kubeconfig.display())))?;
    Client::try_from(config).map_err(|e| KubeletError::api("building a client", e))
}

/// Gives the API server its in-cluster address inside the lab: on the
/// control netns's loopback, routed from every node (pods reach it through
/// their node).
pub fn route_to_api(lab: &Lab) -> Result<()> {
    let ctl = lab.ns_name("ctl");
    let add =
        |args: &[&str]| sh(args).map_err(|e| KubeletError::lab("routing to the API server", e));
    add(&[
        "ip",
        "-n",
        &ctl,
        "addr",
        "add",
        &format!("{SERVICE_IP}/32"),
        "dev",
        "lo",
    ])?;
    for n in &lab.state.nodes {
        add(&[
            "ip",
            "-n",
            &n.netns,
            "route",
            "add",
            &format!("{SERVICE_IP}/32"),
            "via",
            &lab.control_ip(),
        ])?;
    }
    Ok(())
}

/// Accepts on `10.96.0.1:443` in the control netns and connects each
/// client to the API server's real address (from this process's own
/// netns, the machine's), copying both ways. Runs until the process ends.
pub async fn forward_api(ctl_netns: &Path, upstream: SocketAddr) -> Result<()> {
    let ns = mesh_core::netns::Netns::open(&ctl_netns.display().to_string())
        .map_err(|e| KubeletError::io(format!("opening {}", ctl_netns.display()), e))?;
    let listen: SocketAddr = format!("{SERVICE_IP}:{SERVICE_PORT}")
        .parse()
        .map_err(|e| KubeletError::Setup(format!("{e}")))?;
    let bind = || -> std::io::Result<tokio::net::TcpListener> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.bind(listen)?;
        s.listen(1024)
    };
    let listener = ns
        .run(bind)
        .and_then(|r| r)
        .map_err(|e| KubeletError::io(format!("listening on {listen} in the control netns"), e))?;
    let listener = Arc::new(listener);
    tokio::spawn(async move {
        loop {
            let (mut client, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("API forward: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                match tokio::net::TcpStream::connect(upstream).await {
                    Ok(mut up) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                    Err(e) => tracing::debug!("API forward {peer} -> {upstream}: {e}"),
                }
            });
        }
    });
    Ok(())
}
