//! `labapp hbone`: one HBONE tunnel made by hand, as any holder of a mesh
//! certificate can make it (mutual TLS to port 15008, then an HTTP/2
//! CONNECT with an `:authority` of its choosing), without a ztunnel. Prints
//! `CONNECT <status>`; when the tunnel opens, sends the request through it
//! and prints the first line of the answer ("closed" when none came).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::H2Config;
use mesh_core::hbone::{self, ConnectHeaders, OpenError};
use mesh_core::identity::Identity;
use mesh_core::tls::{TrustRoots, WorkloadCertificate, client_config};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, clap::Args)]
pub struct HboneArgs {
    /// The HBONE listener to connect to: a waypoint's or a pod's ip:15008.
    #[arg(long)]
    via: SocketAddr,
    /// The CONNECT target (`:authority`), ip:port.
    #[arg(long)]
    authority: SocketAddr,
    /// PEM: this client's certificate chain, leaf first.
    #[arg(long)]
    cert: PathBuf,
    /// PEM: the chain's private key.
    #[arg(long)]
    key: PathBuf,
    /// PEM: the mesh root(s) the server's chain must lead to.
    #[arg(long)]
    root: PathBuf,
    /// The identity the server must prove, spiffe://<td>/ns/<ns>/sa/<sa>.
    #[arg(long)]
    server_identity: String,
    /// Bytes sent through the tunnel; "\r\n" and "\n" escapes become bytes.
    #[arg(long)]
    request: String,
    /// For each step: connecting, the handshakes, the CONNECT, the answer.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Send `forwarded: for="<this>"` (a claim about the original client).
    #[arg(long)]
    forwarded_for: Option<SocketAddr>,
    /// Send this `baggage`.
    #[arg(long)]
    baggage: Option<String>,
    /// Print the whole answer (until the server closes), not its first line.
    #[arg(long)]
    whole_answer: bool,
}

type Error = Box<dyn std::error::Error>;

fn read(path: &PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

pub async fn run(a: &HboneArgs) -> Result<(), Error> {
    let cert = WorkloadCertificate::from_pem(&read(&a.key)?, &[read(&a.cert)?, read(&a.root)?])?;
    let roots = TrustRoots::new(cert.roots().to_vec())?;
    let server: Identity = a
        .server_identity
        .parse()
        .map_err(|e| format!("--server-identity: {e}"))?;
    let tls = client_config(&cert, roots, vec![server])?;
    let timeout = Duration::from_millis(a.timeout_ms);
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(a.via))
        .await
        .map_err(|_| format!("connecting to {} timed out", a.via))??;
    let tls = tokio::time::timeout(
        timeout,
        TlsConnector::from(Arc::new(tls)).connect(ServerName::IpAddress(a.via.ip().into()), tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out")??;
    let (sender, _runner, driver) =
        hbone::client_handshake(tls, &H2Config::default(), |_| {}).await?;
    tokio::spawn(driver);
    let headers = ConnectHeaders {
        forwarded_for: a.forwarded_for,
        baggage: a.baggage.clone(),
        ..Default::default()
    };
    let mut tunnel = match hbone::open(&sender, a.authority, &headers, timeout).await {
        Ok(t) => t,
        Err(OpenError::Status(s)) => {
            println!("CONNECT {}", s.as_u16());
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!("CONNECT 200");
    let request = a.request.replace("\\r", "\r").replace("\\n", "\n");
    tunnel.write_all(request.as_bytes()).await?;
    if a.whole_answer {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(timeout, tunnel.read_to_end(&mut all)).await;
        println!("{}", String::from_utf8_lossy(&all));
        return Ok(());
    }
    let answer = tokio::time::timeout(timeout, first_line(&mut tunnel))
        .await
        .unwrap_or(None);
    println!("{}", answer.as_deref().unwrap_or("closed"));
    Ok(())
}

/// The first line read, or None when the stream ended (or failed) first.
async fn first_line(r: &mut (impl AsyncRead + Unpin)) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}
