//! The lab's load balancer: what publishes an ingress Gateway's listener
//! ports on the machine's loopback (`lab forward`, run by the lab).

use std::path::Path;
use std::time::Duration;

use super::Error;

/// The lab's load balancer for one published port: accepts on `listen`
/// (the machine's loopback) and connects each client to the next of
/// `targets` with a socket made in `netns` (a node, which reaches every
/// pod), then copies both ways. Writes the bound address to `port_file`.
pub async fn forward(
    listen: &str,
    netns: &Path,
    targets: &[std::net::SocketAddr],
    port_file: &Path,
) -> Result<(), Error> {
    let ns = std::sync::Arc::new(
        mesh_core::netns::Netns::open(&netns.display().to_string())
            .map_err(|e| format!("netns {}: {e}", netns.display()))?,
    );
    if targets.is_empty() {
        return Err("no targets".into());
    }
    let l = tokio::net::TcpListener::bind(listen).await?;
    std::fs::write(port_file, l.local_addr()?.to_string())?;
    let mut next = 0usize;
    loop {
        let (mut client, peer) = l.accept().await?;
        let to = targets[next % targets.len()];
        next = next.wrapping_add(1);
        let ns = ns.clone();
        tokio::spawn(async move {
            // The socket is made inside the node's netns; connecting and
            // copying need no further switching.
            let sock = match ns.run(tokio::net::TcpSocket::new_v4) {
                Ok(Ok(s)) => s,
                Ok(Err(e)) | Err(e) => return eprintln!("{peer}: socket: {e}"),
            };
            let mut up = match tokio::time::timeout(Duration::from_secs(5), sock.connect(to)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return eprintln!("{peer} -> {to}: {e}"),
                Err(_) => return eprintln!("{peer} -> {to}: connect timed out"),
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
        });
    }
}
