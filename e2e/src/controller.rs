//! A real istiod-lite process reading a folder, and ztunnel-side xDS
//! clients (the production `mesh_core::xds` code) connected to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::ca::{CaClientConfig, IstioCaClient};
use mesh_core::state::ProxyState;
use mesh_core::xds::{StateSink, XdsClient, XdsConfig};
use tokio_util::sync::CancellationToken;

use crate::ca::token_for;
use crate::mesh::{binary, http_get};

pub struct Controller {
    child: Option<Child>,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub grpc: SocketAddr,
    pub debug: SocketAddr,
    pub log: PathBuf,
    tokens: PathBuf,
}

fn free_port(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    l.local_addr().expect("addr")
}

impl Controller {
    /// Starts istiod-lite on `dir/config`, with tokens for `nodes`.
    pub async fn start(dir: &Path, nodes: &[&str]) -> Controller {
        let config_dir = dir.join("config");
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&config_dir).expect("config dir");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let tokens = dir.join("tokens.yaml");
        let text: String = nodes
            .iter()
            .map(|n| format!("{n}: {}\n", token_for(n)))
            .collect();
        std::fs::write(&tokens, text).expect("tokens");
        let mut c = Controller {
            child: None,
            config_dir,
            data_dir,
            grpc: free_port("127.0.0.1"),
            debug: free_port("127.0.0.1"),
            log: dir.join("istiod-lite.log"),
            tokens,
        };
        c.spawn().await;
        c
    }

    /// Starts (or restarts) the process on the same addresses and data.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(binary("istiod-lite"))
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--node-tokens")
            .arg(&self.tokens)
            .args([
                "--grpc-addr",
                &self.grpc.to_string(),
                "--debug-addr",
                &self.debug.to_string(),
            ])
            .args(["--poll-ms", "100"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn istiod-lite");
        self.child = Some(child);
        for _ in 0..200 {
            if http_get(self.debug, "/debug/model").await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "istiod-lite did not start:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("root-cert.pem")).expect("root bundle")
    }

    pub async fn debug_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = http_get(self.debug, path).await.expect("debug endpoint");
        serde_json::from_str(&body).expect("json")
    }

    /// Writes a config file; the controller sees it on its next poll.
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.config_dir.join(name)).expect("rename");
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.config_dir.join(name));
    }

    /// A ztunnel-side xDS client for `node`, running until dropped.
    pub fn xds_client(&self, node: &str) -> XdsSession {
        let state = ProxyState::default();
        let client = XdsClient::new(
            XdsConfig {
                address: format!("https://{}", self.grpc),
                ca_root_pem: self.root_pem(),
                server_name: "istiod.istio-system.svc".into(),
                token: Some(token_for(node).into()),
                proxy_id: format!("ztunnel~{node}"),
                user_agent: "ztunnel".into(),
            },
            Arc::new(StateSink {
                state: state.clone(),
                trust_domain: "cluster.local".into(),
            }),
        );
        let stop = CancellationToken::new();
        tokio::spawn(client.clone().run(stop.clone()));
        XdsSession {
            client,
            state,
            stop,
        }
    }

    pub fn ca_client(&self, node: &str) -> IstioCaClient {
        IstioCaClient::new(CaClientConfig {
            address: format!("https://{}", self.grpc),
            ca_root_pem: self.root_pem(),
            server_name: "istiod.istio-system.svc".into(),
            token: Some(token_for(node).into()),
            validity: Duration::ZERO,
            request_timeout: Duration::from_secs(5),
        })
        .expect("CA client")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct XdsSession {
    pub client: Arc<XdsClient>,
    pub state: ProxyState,
    stop: CancellationToken,
}

impl Drop for XdsSession {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A namespace enrolled in ambient.
pub fn ambient_namespace(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
    )
}

/// A running pod with an IP on a node.
pub fn pod(ns: &str, name: &str, sa: &str, ip: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}
