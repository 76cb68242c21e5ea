//! The fake API server and the recorded ztunnel admin the meshctl tests
//! talk to.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use std::path::Path;

pub const DUMP: &str = include_str!("../data/config_dump.json");

/// What the fake API server was asked to change.
#[derive(Default)]
pub struct Seen {
    pub patches: Vec<(String, String, Value)>,
    pub forwards: Vec<String>,
}

pub fn pod(name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "istio-system", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
           "status": {"podIP": ip, "phase": "Running"}})
}

pub fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})
}

pub fn reply(status: u16, body: Value) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A plain HTTP server of the recorded ztunnel admin answers.
pub async fn recorded_admin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<Incoming>| async move {
                    let body = match req.uri().path() {
                        "/config_dump" => {
                            let mut d: Value = serde_json::from_str(DUMP).unwrap();
                            d["version"] = env!("CARGO_PKG_VERSION").into();
                            d.to_string()
                        }
                        // The controller's, a release behind.
                        "/version" => {
                            json!({"component": "istiod-lite", "version": "0.0.9"}).to_string()
                        }
                        _ => String::new(),
                    };
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Bridges one port-forward WebSocket to `backend`, as the kubelet does.
pub async fn forward(
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    port: u16,
    backend: SocketAddr,
) {
    let (mut tx, mut rx) = ws.split();
    let p = port.to_le_bytes();
    // The first frame on each channel names the port.
    let _ = tx.send(Message::binary(vec![0, p[0], p[1]])).await;
    let _ = tx.send(Message::binary(vec![1, p[0], p[1]])).await;
    let Ok(tcp) = tokio::net::TcpStream::connect(backend).await else {
        return;
    };
    let (mut r, mut w) = tcp.into_split();
    let up = async {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Binary(b) = m
                && b.first() == Some(&0)
                && w.write_all(&b[1..]).await.is_err()
            {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut frame = vec![0u8];
                    frame.extend_from_slice(&buf[..n]);
                    if tx.send(Message::binary(frame)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.close().await;
    };
    tokio::select! { _ = up => {}, _ = down => {} }
}

pub async fn fake_api(seen: Arc<Mutex<Seen>>, backend: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: hyper::Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().unwrap_or("").to_string();
                        if path.ends_with("/portforward") {
                            seen.lock()
                                .unwrap()
                                .forwards
                                .push(format!("{path}?{query}"));
                            let port: u16 = query
                                .split('&')
                                .find_map(|kv| kv.strip_prefix("ports="))
                                .and_then(|p| p.parse().ok())
                                .unwrap_or(0);
                            let key = req
                                .headers()
                                .get("sec-websocket-key")
                                .map(|k| k.as_bytes().to_vec())
                                .unwrap_or_default();
                            let accept =
                                tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
                            let upgrade = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(io) = upgrade.await {
                                    let ws = WebSocketStream::from_raw_socket(
                                        TokioIo::new(io),
                                        Role::Server,
                                        None,
                                    )
                                    .await;
                                    forward(ws, port, backend).await;
                                }
                            });
                            let mut r = hyper::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            let h = r.headers_mut();
                            h.insert("upgrade", "websocket".parse().unwrap());
                            h.insert("connection", "Upgrade".parse().unwrap());
                            h.insert("sec-websocket-accept", accept.parse().unwrap());
                            h.insert(
                                "sec-websocket-protocol",
                                "v4.channel.k8s.io".parse().unwrap(),
                            );
                            return Ok::<_, Infallible>(r);
                        }
                        let method = req.method().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let r = match (method.as_str(), path.as_str()) {
                            (
                                "GET",
                                "/api/v1/namespaces/istio-system/pods"
                                | "/api/v1/namespaces/mesh-2/pods",
                            ) if query.contains("app%3Dztunnel") => {
                                let mut p = pod(
                                    "ztunnel-x7k2p",
                                    "node-1",
                                    "10.0.1.5",
                                    json!({"app": "ztunnel"}),
                                );
                                p["metadata"]["namespace"] =
                                    path.split('/').nth(4).unwrap_or_default().into();
                                reply(200, list(vec![p]))
                            }
                            ("GET", "/api/v1/namespaces/istio-system/pods")
                                if query.contains("app%3Distiod-lite") =>
                            {
                                reply(
                                    200,
                                    list(vec![pod(
                                        "istiod-lite-0",
                                        "node-1",
                                        "10.0.1.6",
                                        json!({"app": "istiod-lite"}),
                                    )]),
                                )
                            }
                            ("GET", p) if p.ends_with("/pods") => reply(200, list(vec![])),
                            ("GET", "/api/v1/pods") => reply(200, list(vec![])),
                            ("GET", "/api/v1/namespaces/shop") => reply(
                                200,
                                json!({
                                "apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": "shop", "labels": {"istio.io/use-waypoint": "waypoint"}}}),
                            ),
                            ("DELETE", p) if p.ends_with("/gateways/waypoint") => {
                                seen.lock().unwrap().patches.push((
                                    method.clone(),
                                    path.clone(),
                                    Value::Null,
                                ));
                                reply(
                                    200,
                                    json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                                )
                            }
                            ("PATCH", _) => {
                                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                seen.lock().unwrap().patches.push((
                                    method.clone(),
                                    format!("{path}?{query}"),
                                    v.clone(),
                                ));
                                let mut obj = v.clone();
                                if obj.get("apiVersion").is_none() {
                                    obj = json!({"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": path.rsplit('/').next().unwrap()}});
                                }
                                reply(200, obj)
                            }
                            _ => reply(
                                404,
                                json!({"kind": "Status", "code": 404, "message": format!("no {path}")}),
                            ),
                        };
                        Ok(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

pub fn meshctl(kubeconfig: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env("KUBECONFIG", kubeconfig)
        .args(["--kube"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A kubeconfig with context `x` (current) on `api`, and more contexts
/// (name, server, namespace).
pub fn kubeconfig(
    dir: &Path,
    api: SocketAddr,
    more: &[(&str, &str, Option<&str>)],
) -> std::path::PathBuf {
    let mut clusters = format!("[{{name: c, cluster: {{server: \"http://{api}\"}}}}");
    let mut contexts = "[{name: x, context: {cluster: c, user: u}}".to_string();
    for (name, server, ns) in more {
        clusters.push_str(&format!(
            ", {{name: c-{name}, cluster: {{server: \"{server}\"}}}}"
        ));
        contexts.push_str(&format!(
            ", {{name: {name}, context: {{cluster: c-{name}, user: u{}}}}}",
            ns.map(|n| format!(", namespace: {n}")).unwrap_or_default()
        ));
    }
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: {clusters}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: {contexts}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    path
}

/// Runs meshctl with only the environment given: no MESHCTL_* defaults,
/// KUBECONFIG only when given, and HOME an empty folder (so no
/// ~/.kube/config is found by accident).
pub fn meshctl_env(
    kubeconfig_env: Option<&Path>,
    home: &Path,
    args: &[&str],
) -> (i32, String, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
    c.env_remove("MESHCTL_ADDR")
        .env_remove("MESHCTL_CONTROLLER")
        .env_remove("MESHCTL_LAB")
        .env_remove("MESHCTL_ISTIO_NAMESPACE")
        .env_remove("KUBECONFIG")
        .env("HOME", home);
    if let Some(k) = kubeconfig_env {
        c.env("KUBECONFIG", k);
    }
    let out = c.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
