//! istiod-lite: the mesh controller (CA, config model, Delta ADS).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use istiod_lite::app::{ConfigSource, Options, start};
use istiod_lite::model::ModelConfig;
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The mesh controller: CA, config model and Delta ADS push"
)]
struct Args {
    /// Folder of Kubernetes YAML to watch.
    #[arg(long, env = "ISTIOD_CONFIG_DIR", required_unless_present = "kube")]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API instead (in-cluster config or KUBECONFIG).
    #[arg(long, conflicts_with = "config_dir")]
    kube: bool,
    /// Where the CA keeps its root and the published root bundle.
    #[arg(long, env = "ISTIOD_DATA_DIR", default_value = "/var/lib/istiod-lite")]
    data_dir: PathBuf,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// gRPC (CA and xDS) listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Debug HTTP endpoint (model, connections, config issues).
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_addr: SocketAddr,
    /// Use an operator's CA (Istio cacerts layout) instead of a self-signed root.
    #[arg(long)]
    cacerts: Option<PathBuf>,
    /// Further roots to publish and trust (root rotation).
    #[arg(long)]
    extra_roots: Option<PathBuf>,
    /// YAML map of node name -> bootstrap token.
    #[arg(long)]
    node_tokens: PathBuf,
    /// Extra DNS names for the serving certificate.
    #[arg(long = "serving-dns")]
    serving_dns: Vec<String>,
    /// IPs for the serving certificate.
    #[arg(long = "serving-ip")]
    serving_ips: Vec<IpAddr>,
    /// How often the config folder is checked for changes (and how long
    /// Kubernetes events are batched into one push), in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

#[tokio::main]
async fn main() {
    ztunnel::init_logging();
    let a = Args::parse();
    let source = match a.config_dir {
        Some(dir) => ConfigSource::Folder(dir),
        None => ConfigSource::Kube,
    };
    let opts = Options {
        source,
        data_dir: a.data_dir,
        model: ModelConfig {
            trust_domain: a.trust_domain,
            domain_suffix: a.domain_suffix,
            root_namespace: a.root_namespace,
            ..ModelConfig::default()
        },
        grpc_addr: a.grpc_addr,
        debug_addr: a.debug_addr,
        cacerts: a.cacerts,
        extra_roots: a.extra_roots,
        node_tokens: a.node_tokens,
        serving_dns: a.serving_dns,
        serving_ips: a.serving_ips,
        poll: Duration::from_millis(a.poll_ms),
    };
    let running = match start(opts).await {
        Ok(r) => r,
        Err(e) => {
            error!("{e}");
            std::process::exit(1);
        }
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            error!("SIGTERM handler: {e}");
            std::process::exit(1);
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
    running.stop().await;
}
