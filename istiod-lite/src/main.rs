//! istiod-lite: serves the mesh CA over gRPC/TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use istiod_lite::ca::auth::{BootstrapTokens, StaticNodeIdentities};
use istiod_lite::ca::{CaService, CaSource, CertificateAuthority, ServingCert, serve};
use tracing::{error, info};
use ztunnel::clock::SystemClock;

#[derive(Debug, Parser)]
#[command(version, about = "The mesh controller: CA and (soon) config push")]
struct Args {
    /// Where the CA keeps its root and the published root bundle.
    #[arg(long, env = "ISTIOD_DATA_DIR", default_value = "/var/lib/istiod-lite")]
    data_dir: PathBuf,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// gRPC (CA) listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Use an operator's CA (Istio cacerts layout) instead of a self-signed root.
    #[arg(long)]
    cacerts: Option<PathBuf>,
    /// Further roots to publish and trust (root rotation).
    #[arg(long)]
    extra_roots: Option<PathBuf>,
    /// YAML map of node name -> bootstrap token.
    #[arg(long)]
    node_tokens: PathBuf,
    /// YAML map of node name -> SPIFFE identities of the workloads on it.
    /// Interim: the config model replaces this.
    #[arg(long)]
    node_identities: PathBuf,
    /// Extra DNS names for the serving certificate.
    #[arg(long = "serving-dns")]
    serving_dns: Vec<String>,
    /// IPs for the serving certificate.
    #[arg(long = "serving-ip")]
    serving_ips: Vec<IpAddr>,
}

#[tokio::main]
async fn main() {
    ztunnel::init_logging();
    ztunnel::tls::install_default_provider();
    if let Err(e) = run(Args::parse()).await {
        error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let source = match &args.cacerts {
        Some(dir) => CaSource::Plugged { dir: dir.clone() },
        None => CaSource::SelfSigned {
            dir: args.data_dir.join("ca"),
        },
    };
    let ca = Arc::new(CertificateAuthority::load(
        &source,
        &args.trust_domain,
        args.extra_roots.as_deref(),
        Arc::new(SystemClock),
    )?);
    let bundle = args.data_dir.join("root-cert.pem");
    std::fs::write(&bundle, ca.root_bundle_pem())?;
    info!(path = %bundle.display(), "published the root bundle");

    let mut dns = vec![
        "istiod-lite.istio-system.svc".to_string(),
        "istiod.istio-system.svc".to_string(),
        "localhost".to_string(),
    ];
    dns.extend(args.serving_dns.iter().cloned());
    let serving = ServingCert::issue(&ca, &dns, &args.serving_ips)?;
    let authn = Arc::new(BootstrapTokens::load(&args.node_tokens)?);
    let authz = Arc::new(StaticNodeIdentities::load(&args.node_identities)?);
    let listener = tokio::net::TcpListener::bind(args.grpc_addr).await?;
    info!(addr = %listener.local_addr()?, "serving the CA");
    serve(&serving)?
        .add_service(CaService::new(ca, authn, authz).into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
