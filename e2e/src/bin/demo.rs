//! `just demo`: what the mesh can do so far, with real processes.
//!
//! Starts the real `istiod-lite` binary, has a node's certificate manager get
//! workload certificates from it over gRPC/TLS, shows a refusal, and runs a
//! mutual-TLS handshake between two workloads that checks SPIFFE identities.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use ztunnel::ca::{CaClientConfig, IstioCaClient};
use ztunnel::certs::{Backoff, CertificateManager};
use ztunnel::clock::SystemClock;
use ztunnel::identity::Identity;
use ztunnel::tls::{TrustRoots, client_config, peer_identity, server_config};

type Error = Box<dyn std::error::Error>;

/// Kills the controller we started when the demo ends, however it ends.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().ok_or("no parent dir")?.join(name);
    if !path.exists() {
        return Err(format!("{} not built (run `just demo`)", path.display()).into());
    }
    Ok(path)
}

async fn wait_ready(addr: &str, bundle: &Path) -> Result<(), Error> {
    for _ in 0..100 {
        if bundle.exists() && TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("istiod-lite did not come up on {addr}").into())
}

async fn run() -> Result<(), Error> {
    ztunnel::tls::install_default_provider();
    let dir = tempfile::tempdir()?;
    let token = "demo-node-a-bootstrap-token-0001";
    let client_id: Identity = "spiffe://cluster.local/ns/shop/sa/frontend".parse()?;
    let server_id: Identity = "spiffe://cluster.local/ns/shop/sa/orders".parse()?;
    std::fs::write(dir.path().join("tokens.yaml"), format!("node-a: {token}\n"))?;
    // The controller learns where workloads run from ordinary Kubernetes
    // objects: here, two pods on node-a in an ambient namespace.
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("shop.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: frontend-1, namespace: shop}\n\
         spec: {nodeName: node-a, serviceAccountName: frontend, containers: [{name: app, image: frontend}]}\n\
         status: {podIP: 10.0.1.10, phase: Running}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: orders-1, namespace: shop}\n\
         spec: {nodeName: node-a, serviceAccountName: orders, containers: [{name: app, image: orders}]}\n\
         status: {podIP: 10.0.1.11, phase: Running}\n",
    )?;
    let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");

    println!("== 1. Start istiod-lite (CA, config model, xDS) on {addr}");
    let _controller = Controller(
        Command::new(sibling_binary("istiod-lite")?)
            .args(["--data-dir", &dir.path().display().to_string()])
            .args(["--grpc-addr", &addr])
            .args([
                "--node-tokens",
                &dir.path().join("tokens.yaml").display().to_string(),
            ])
            .args(["--config-dir", &config.display().to_string()])
            .args(["--debug-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    let bundle = dir.path().join("root-cert.pem");
    wait_ready(&addr, &bundle).await?;
    let root_pem = std::fs::read_to_string(&bundle)?;
    println!("   root CA created and published at {}", bundle.display());

    println!("\n== 2. node-a's certificate manager asks for its workloads' certificates");
    let ca = IstioCaClient::new(CaClientConfig {
        address: format!("https://{addr}"),
        ca_root_pem: root_pem,
        server_name: "istiod.istio-system.svc".into(),
        token: Some(token.into()),
        validity: Duration::ZERO,
        request_timeout: Duration::from_secs(5),
    })?;
    let mgr = CertificateManager::new(
        Arc::new(ca),
        Arc::new(SystemClock),
        TrustRoots::empty(),
        Backoff::default(),
    );
    let client_cert = mgr.fetch(&client_id).await?;
    let server_cert = mgr.fetch(&server_id).await?;
    for s in mgr.status() {
        println!(
            "   {:<45} {:?}  serial {}  valid {} .. {}",
            s.identity.to_string(),
            s.state,
            s.serial.unwrap_or_default(),
            s.not_before.unwrap_or_default(),
            s.not_after.unwrap_or_default()
        );
    }

    println!("\n== 3. An identity with no workload on node-a is refused, with the reason");
    let stranger: Identity = "spiffe://cluster.local/ns/payments/sa/ledger".parse()?;
    match mgr.fetch(&stranger).await {
        Ok(_) => return Err("the CA issued a certificate it should have refused".into()),
        Err(e) => println!("   {e}"),
    }

    println!("\n== 4. Mutual TLS 1.3 between the two workloads, identities checked both ways");
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&server_cert, mgr.roots().clone())?));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer = peer_identity(tls.get_ref().1);
        let mut buf = vec![0u8; 64];
        let n = tls.read(&mut buf).await?;
        tls.write_all(&buf[..n]).await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(peer)
    });
    let connector = TlsConnector::from(Arc::new(client_config(
        &client_cert,
        mgr.roots().clone(),
        vec![server_id.clone()],
    )?));
    let mut tls = connector
        .connect(
            server_addr.ip().into(),
            TcpStream::connect(server_addr).await?,
        )
        .await?;
    let seen_server = peer_identity(tls.get_ref().1);
    tls.write_all(b"hello over mTLS").await?;
    let mut echo = Vec::new();
    tls.read_to_end(&mut echo).await?;
    let seen_client = server.await??;
    println!(
        "   client saw server identity: {}",
        seen_server.map(|i| i.to_string()).unwrap_or_default()
    );
    println!(
        "   server saw client identity: {}",
        seen_client.map(|i| i.to_string()).unwrap_or_default()
    );
    println!("   echoed: {:?}", String::from_utf8_lossy(&echo));

    println!("\n== 5. A client expecting a different identity refuses the same server");
    let wrong = TlsConnector::from(Arc::new(client_config(
        &client_cert,
        mgr.roots().clone(),
        vec![stranger],
    )?));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr2 = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&server_cert, mgr.roots().clone())?));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    match wrong
        .connect(addr2.ip().into(), TcpStream::connect(addr2).await?)
        .await
    {
        Ok(_) => return Err("handshake with the wrong identity succeeded".into()),
        Err(e) => println!("   {}", ztunnel::tls::handshake_failure(&e)),
    }

    println!(
        "\nNext: the network-namespace lab (pods, ztunnels, HBONE on the wire) lands with issue #5."
    );
    println!("Tests: just test");
    Ok(())
}
