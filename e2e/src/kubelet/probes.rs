//! Readiness probes: HTTP GET to the pod's address from its node, as the
//! kubelet probes. A status from 200 to 399 is ready.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One probe; false on any failure or after a second.
pub async fn http_ready(node_netns: &str, ip: &str, port: u16, path: &str) -> bool {
    let Ok(addr) = format!("{ip}:{port}").parse::<SocketAddr>() else {
        return false;
    };
    let Ok(ns) = mesh_core::netns::Netns::open(&format!("/var/run/netns/{node_netns}")) else {
        return false;
    };
    let Ok(Ok(sock)) = ns.run(tokio::net::TcpSocket::new_v4) else {
        return false;
    };
    let attempt = async {
        let mut s = sock.connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/lab\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}
