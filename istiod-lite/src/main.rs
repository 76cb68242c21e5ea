//! istiod-lite: the mesh controller (CA, config model, Delta ADS).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use istiod_lite::app::{ClusterOptions, ConfigSource, Options, start};
use istiod_lite::config::mesh::MeshConfig;
use istiod_lite::model::ModelConfig;
use tracing::{error, info, warn};

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
    /// This cluster's name (Istio's CLUSTER_ID): in every workload's uid
    /// and cluster, so proxies report it as `source_cluster` /
    /// `destination_cluster` and in baggage.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Where mesh-wide policies live (Istio's `rootNamespace`). The
    /// controller's namespace (--namespace) when unset.
    #[arg(long)]
    root_namespace: Option<String>,
    /// Mesh-wide settings in Istio's MeshConfig YAML (what Istio keeps
    /// under the `mesh` key of its `istio` ConfigMap). Only
    /// `extensionProviders` is used: the external authorization servers
    /// CUSTOM AuthorizationPolicies name. Read once at start.
    #[arg(long, env = "MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    /// gRPC (CA and xDS) listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Debug HTTP endpoint (model, connections, config issues). Loopback
    /// unless --debug-token-file is given.
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_addr: SocketAddr,
    /// File holding a bearer token (at least 16 characters) that callers
    /// from anywhere but loopback must present for /debug/*. Required to
    /// bind --debug-addr off loopback.
    #[arg(long)]
    debug_token_file: Option<PathBuf>,
    /// A listener serving only /ready and /healthz, for probes from the
    /// node (e.g. 0.0.0.0:15021). None by default: both are on the debug
    /// endpoint too.
    #[arg(long)]
    health_addr: Option<SocketAddr>,
    /// Use an operator's CA (Istio cacerts layout) instead of a self-signed root.
    #[arg(long)]
    cacerts: Option<PathBuf>,
    /// Further roots to publish and trust (root rotation).
    #[arg(long)]
    extra_roots: Option<PathBuf>,
    /// YAML map of node name -> bootstrap token (required with
    /// --config-dir; in a cluster, callers present service-account tokens).
    #[arg(long, required_unless_present = "kube")]
    node_tokens: Option<PathBuf>,
    /// The controller's namespace (CA Secret, Lease; the default root
    /// namespace and where the ztunnels' service account is).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// Cluster mode: this replica's name, as the Lease holder (must differ
    /// between replicas; the host name when unset).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Cluster mode: the Secret holding the self-signed root.
    #[arg(long, default_value = "istio-ca-secret")]
    ca_secret: String,
    /// Cluster mode: the Lease that elects the replica that writes.
    #[arg(long, default_value = "istiod-lite")]
    lease_name: String,
    /// Cluster mode: the audience callers' tokens must be for.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// Cluster mode: namespace/name of the ztunnel's service account (its
    /// callers may ask for any identity on their node). `ztunnel` in the
    /// controller's namespace when unset.
    #[arg(long)]
    ztunnel_service_account: Option<String>,
    /// Cluster mode: the image of waypoint Deployments.
    #[arg(
        long,
        env = "WAYPOINT_IMAGE",
        default_value = "ghcr.io/mesh-dev/waypoint:0.1.0"
    )]
    waypoint_image: String,
    /// Cluster mode: the address waypoints reach the CA and xDS at
    /// (`https://istiod-lite.<namespace>.svc:15012` when unset).
    #[arg(long)]
    ca_address: Option<String>,
    /// Cluster mode: Istio's mesh-wide `pathNormalization`, written into
    /// every waypoint's and ingress's config: how request paths are
    /// normalized before policy and routing (docs/waypoint.md).
    #[arg(
        long,
        default_value = "BASE",
        value_parser = ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]
    )]
    path_normalization: String,
    /// Extra DNS names for the serving certificate.
    #[arg(long = "serving-dns")]
    serving_dns: Vec<String>,
    /// IPs for the serving certificate.
    #[arg(long = "serving-ip")]
    serving_ips: Vec<IpAddr>,
    /// How often the config folder is checked for changes (and, with
    /// `--kube`, the batching window: at most one apply per window; a
    /// pod or endpoint change after a quiet window is pushed at once), in
    /// milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
}

#[tokio::main]
async fn main() {
    mesh_core::init_logging();
    let a = Args::parse();
    // Nothing names the install's namespace but the install itself.
    let root_namespace = a.root_namespace.unwrap_or_else(|| a.namespace.clone());
    let ztunnel_account = a
        .ztunnel_service_account
        .unwrap_or_else(|| format!("{}/ztunnel", a.namespace));
    let ca_address = a
        .ca_address
        .unwrap_or_else(|| format!("https://istiod-lite.{}.svc:15012", a.namespace));
    let source = match a.config_dir {
        Some(dir) => ConfigSource::Folder(dir),
        None => {
            let Some((ns, sa)) = ztunnel_account.split_once('/') else {
                error!("--ztunnel-service-account {ztunnel_account:?} is not namespace/name");
                std::process::exit(2);
            };
            let server_name = ca_address
                .trim_start_matches("https://")
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            let Some(pod_name) = a
                .pod_name
                .or_else(|| std::env::var("HOSTNAME").ok())
                .filter(|n| !n.is_empty())
            else {
                error!("--kube needs this replica's name: set POD_NAME (or --pod-name)");
                std::process::exit(2);
            };
            ConfigSource::Kube(Box::new(ClusterOptions {
                namespace: a.namespace,
                pod_name,
                ca_secret: a.ca_secret,
                lease_name: a.lease_name,
                token_audience: a.token_audience,
                ztunnel_account: (ns.to_string(), sa.to_string()),
                waypoint_image: a.waypoint_image,
                ca_address: ca_address.clone(),
                ca_server_name: server_name,
                path_normalization: a.path_normalization,
                // The proxies it deploys log as it does.
                proxy_log_format: std::env::var("LOG_FORMAT")
                    .ok()
                    .filter(|f| !f.trim().is_empty()),
            }))
        }
    };
    let mesh = match &a.mesh_config {
        None => MeshConfig::default(),
        Some(path) => match MeshConfig::load(path) {
            Ok(m) => {
                for field in &m.unused {
                    warn!(%field, "mesh config field not used by istiod-lite");
                }
                info!(
                    providers = m.extension_providers.len(),
                    "mesh config loaded"
                );
                m
            }
            Err(e) => {
                error!("--mesh-config: {e}");
                std::process::exit(2);
            }
        },
    };
    let opts = Options {
        source,
        data_dir: a.data_dir,
        model: ModelConfig {
            trust_domain: a.trust_domain,
            domain_suffix: a.domain_suffix,
            root_namespace,
            mesh,
            cluster_id: a.cluster_id,
            // Set from the source when the controller starts.
            gateway_pods_owned: false,
        },
        grpc_addr: a.grpc_addr,
        debug_addr: a.debug_addr,
        debug_token_file: a.debug_token_file,
        health_addr: a.health_addr,
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
