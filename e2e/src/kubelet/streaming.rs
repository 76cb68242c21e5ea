//! The kubelet's streaming port, what the API server's `pods/portforward`
//! reaches (so `kubectl port-forward` and `meshctl --kube` work): HTTPS on
//! the machine's loopback (a certificate of its own; the API server is not
//! told a kubelet CA, so it does not verify it), `/portForward/<ns>/<pod>`
//! upgraded to a WebSocket with the `v4.channel.k8s.io` protocol, and each
//! requested port connected to the pod's loopback inside its netns, as a
//! container runtime's port forwarding does. Each port has two channels
//! (data `2i`, error `2i+1`), each opened with the port number (two bytes,
//! little-endian); every message starts with its channel. `kubectl logs`
//! comes here too ([`super::logs`]). It answers anyone on loopback: it is a
//! test cluster's.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use super::error::{KubeletError, Result};
use crate::lab::Lab;

const PROTOCOL: &str = "v4.channel.k8s.io";

/// Starts the server; its port (for the Nodes' `kubeletEndpoint`).
pub async fn serve(lab_dir: PathBuf) -> Result<u16> {
    let setup = |e: String| KubeletError::Setup(format!("the kubelet's streaming port: {e}"));
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .map_err(|e| setup(e.to_string()))?;
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| setup(e.to_string()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| KubeletError::io("binding the kubelet's streaming port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| KubeletError::io("its address", e))?
        .port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, dir) = (acceptor.clone(), lab_dir.clone());
            tokio::spawn(async move {
                if let Err(e) = session(acceptor, tcp, dir).await {
                    tracing::warn!("port-forward: {e}");
                }
            });
        }
    });
    Ok(port)
}

/// `/portForward/<ns>/<pod>?port=..` (or `ports=`): the pod and its ports.
fn target(uri: &str) -> Option<(String, Vec<u16>)> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut parts = path.trim_start_matches('/').split('/');
    if parts.next()? != "portForward" {
        return None;
    }
    let (ns, pod) = (parts.next()?, parts.next()?);
    let ports: Vec<u16> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "port" || *k == "ports")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    Some((format!("{ns}/{pod}"), ports))
}

async fn session(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    dir: PathBuf,
) -> std::result::Result<(), String> {
    let mut tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    // The request head tells a log request from a port-forward upgrade.
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        let n = tls
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("closed before a request".into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    if path.starts_with("/containerLogs/") {
        return super::logs::answer(tls, &dir, &path)
            .await
            .map_err(|e| format!("logs: {e}"));
    }
    let tls = super::logs::Rewind::new(head, tls);
    let seen: Arc<Mutex<String>> = Arc::default();
    let s = seen.clone();
    // The error type is tungstenite's, for its handshake callback.
    #[allow(clippy::result_large_err)]
    let callback =
        move |req: &Request, mut resp: Response| -> std::result::Result<Response, ErrorResponse> {
            if let Ok(mut g) = s.lock() {
                *g = req.uri().to_string();
            }
            let offered = req
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if offered.split(',').any(|p| p.trim() == PROTOCOL)
                && let Ok(v) = PROTOCOL.parse()
            {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
            Ok(resp)
        };
    let ws = tokio_tungstenite::accept_hdr_async(tls, callback)
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    let uri = seen.lock().map(|g| g.clone()).unwrap_or_default();
    let (key, ports) = target(&uri).ok_or_else(|| format!("not a port-forward: {uri}"))?;
    let pod = Lab::load(&dir)
        .ok()
        .and_then(|l| l.state.pods.get(&key).cloned())
        .ok_or_else(|| format!("no pod {key} runs here"))?;
    let &[port] = ports.as_slice() else {
        return Err(format!(
            "{uri}: one port per connection, as meshctl and kubectl ask"
        ));
    };
    let ns = mesh_core::netns::Netns::open(&format!("/var/run/netns/{}", pod.netns))
        .map_err(|e| e.to_string())?;
    let sock = ns
        .run(tokio::net::TcpSocket::new_v4)
        .and_then(|r| r)
        .map_err(|e| e.to_string())?;
    let (mut sink, mut stream) = ws.split();
    let hello = |ch: u8| Message::Binary(vec![ch, (port & 0xff) as u8, (port >> 8) as u8].into());
    sink.send(hello(0)).await.map_err(|e| e.to_string())?;
    sink.send(hello(1)).await.map_err(|e| e.to_string())?;
    let upstream = match sock
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
    {
        Ok(u) => u,
        Err(e) => {
            let msg = format!("connecting to {key} port {port}: {e}");
            let mut out = vec![1u8];
            out.extend(msg.as_bytes());
            let _ = sink.send(Message::Binary(out.into())).await;
            return Err(msg);
        }
    };
    let (mut rd, mut wr) = upstream.into_split();
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut buf[1..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf[0] = 0;
            if sink
                .send(Message::Binary(buf[..=n].to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    };
    let up = async move {
        while let Some(Ok(m)) = stream.next().await {
            let data = match m {
                Message::Binary(b) if b.len() > 1 && b[0] == 0 => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if wr.write_all(&data[1..]).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(down, up);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_comes_from_the_kubelet_path() {
        assert_eq!(
            target("/portForward/istio-system/istiod-lite-1?ports=15014"),
            Some(("istio-system/istiod-lite-1".into(), vec![15014]))
        );
        assert_eq!(
            target("/portForward/a/b?port=1&port=2").map(|t| t.1),
            Some(vec![1, 2])
        );
        assert_eq!(target("/exec/a/b"), None);
    }
}
