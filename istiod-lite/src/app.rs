//! Wiring: folder source -> model hub -> (CA, Delta ADS) on one gRPC/TLS
//! port, plus the debug endpoint (and, when asked for, a health listener
//! for probes: see [`crate::debug`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::clock::SystemClock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::ca::auth::Authenticator;
use crate::ca::tokens_file::TokensFile;
use crate::ca::{CaService, CaSource, CertificateAuthority, ServingCert, serve};
use crate::cluster::lease::{Elector, LeaseConfig};
use crate::cluster::tokenreview::{ReviewConfig, TokenReviewer};
use crate::cluster::writer::{Writer, WriterConfig};
use crate::config::folder::{ConfigIssue, FolderSource};
use crate::debug::{DebugAccess, debug_handler, health_handler};
use crate::model::{Model, ModelConfig};
use crate::xds::{AdsService, Hub};

/// Where Kubernetes objects come from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A folder of YAML, polled for changes.
    Folder(PathBuf),
    /// The Kubernetes API (in-cluster config or KUBECONFIG), with cluster
    /// mode's CA Secret, TokenReview, Lease and writes.
    Kube(Box<ClusterOptions>),
}

/// Cluster mode's settings.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Where the CA Secret and the Lease live (the controller's own).
    pub namespace: String,
    /// This replica, as the Lease's holder.
    pub pod_name: String,
    pub ca_secret: String,
    pub lease_name: String,
    pub token_audience: String,
    /// namespace/name of the ztunnel's service account.
    pub ztunnel_account: (String, String),
    pub waypoint_image: String,
    /// The CA/xDS address waypoints are given, and its certificate's name.
    pub ca_address: String,
    pub ca_server_name: String,
    /// The mesh's `pathNormalization` (NONE, BASE, MERGE_SLASHES,
    /// DECODE_AND_MERGE_SLASHES), given to every waypoint.
    pub path_normalization: String,
    /// `LOG_FORMAT` given to the waypoints and ingresses.
    pub proxy_log_format: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub source: ConfigSource,
    pub data_dir: PathBuf,
    pub model: ModelConfig,
    pub grpc_addr: SocketAddr,
    /// The debug endpoint: loopback unless `debug_token_file` is given.
    pub debug_addr: SocketAddr,
    /// The bearer token callers off loopback must present for `/debug/*`.
    pub debug_token_file: Option<PathBuf>,
    /// A listener for probes: `/ready` and `/healthz` only.
    pub health_addr: Option<SocketAddr>,
    pub cacerts: Option<PathBuf>,
    pub extra_roots: Option<PathBuf>,
    /// Bootstrap tokens per node (folder mode; cluster mode uses TokenReview).
    pub node_tokens: Option<PathBuf>,
    pub serving_dns: Vec<String>,
    pub serving_ips: Vec<IpAddr>,
    /// How often the folder is checked for changes.
    pub poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}: {1}")]
    Start(&'static str, String),
}

/// A running controller.
pub struct Running {
    pub hub: Arc<Hub>,
    pub grpc_addr: SocketAddr,
    pub debug_addr: SocketAddr,
    pub health_addr: Option<SocketAddr>,
    pub ca: Arc<CertificateAuthority>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    /// Cluster mode's writer and elector, awaited on stop so the Lease is
    /// released (the next leader need not wait for it to expire).
    cluster: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.cluster {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

pub async fn start(o: Options) -> Result<Running, AppError> {
    mesh_core::tls::install_default_provider();
    // Before anything else: an exposed debug port without a token is a
    // configuration error, not something to find out later.
    let debug_access = DebugAccess::new(o.debug_addr, o.debug_token_file.as_deref())
        .map_err(|e| AppError::Start("debug endpoint", e.to_string()))?;
    let kube_config = match &o.source {
        ConfigSource::Kube(_) => Some(
            kube::Config::infer()
                .await
                .map_err(|e| AppError::Start("Kubernetes client", e.to_string()))?,
        ),
        ConfigSource::Folder(_) => None,
    };
    let client = match &kube_config {
        Some(c) => Some(
            kube::Client::try_from(c.clone())
                .map_err(|e| AppError::Start("Kubernetes client", e.to_string()))?,
        ),
        None => None,
    };
    let ca = load_ca(&o, client.as_ref()).await?;

    // Every Gateway's pods in a cluster are made by the Deployment the
    // controller creates for it; a folder's are written by hand.
    let model = ModelConfig {
        gateway_pods_owned: matches!(o.source, ConfigSource::Kube(_)),
        ..o.model.clone()
    };
    let hub = Hub::new(Model::new(model));
    let issues: Arc<Mutex<Vec<ConfigIssue>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let cluster = start_source(
        &o,
        &hub,
        &issues,
        &stop,
        &ca,
        client.clone(),
        kube_config.clone(),
    )?;

    let dns = serving_names(&o);
    let serving = ServingCert::issue(&ca, &dns, &o.serving_ips)
        .map_err(|e| AppError::Start("serving certificate", e.to_string()))?;
    let authn = authenticator(&o, client.as_ref(), &hub)?;
    let listener = TcpListener::bind(o.grpc_addr)
        .await
        .map_err(|e| AppError::Start("gRPC listener", e.to_string()))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| AppError::Start("gRPC listener", e.to_string()))?;
    let ads = AdsService::new(hub.clone(), authn.clone());
    tokio::spawn(crate::metrics::log_left_out_every(
        vec![ads.refusals(), crate::metrics::log_limit().clone()],
        stop.clone(),
    ));
    let router = serve(&serving)
        .map_err(|e| AppError::Start("TLS", e.to_string()))?
        .add_service(CaService::new(ca.clone(), authn.clone(), hub.clone()).into_server())
        .add_service(ads.into_server());
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await
            {
                tracing::error!(error = %e, "gRPC server failed");
            }
        })
    };

    let debug_addr = serve_http(
        o.debug_addr,
        "debug listener",
        &stop,
        debug_handler(hub.clone(), issues, debug_access),
    )
    .await?;
    let health_addr = match o.health_addr {
        Some(addr) => {
            Some(serve_http(addr, "health listener", &stop, health_handler(hub.clone())).await?)
        }
        None => None,
    };
    info!(%grpc_addr, %debug_addr, ?health_addr, "istiod-lite started");
    Ok(Running {
        hub,
        grpc_addr,
        debug_addr,
        health_addr,
        ca,
        stop,
        server,
        cluster,
    })
}

/// The CA: the plugged-in root, the cluster's CA Secret, or a self-signed
/// root in the data directory. Outside a cluster its root bundle is
/// published in the data directory.
async fn load_ca(
    o: &Options,
    client: Option<&kube::Client>,
) -> Result<Arc<CertificateAuthority>, AppError> {
    let source = match (&o.cacerts, &o.source, client) {
        (Some(dir), _, _) => CaSource::Plugged { dir: dir.clone() },
        (None, ConfigSource::Kube(c), Some(client)) => {
            let api = kube::Api::namespaced(client.clone(), &c.namespace);
            let root = crate::cluster::ca_secret::load_or_create(
                &api,
                &c.ca_secret,
                &o.model.trust_domain,
            )
            .await
            .map_err(|e| AppError::Start("CA", e.to_string()))?;
            CaSource::Root {
                cert_pem: root.cert,
                key_pem: root.key,
            }
        }
        _ => CaSource::SelfSigned {
            dir: o.data_dir.join("ca"),
        },
    };
    let ca = Arc::new(
        CertificateAuthority::load(
            &source,
            &o.model.trust_domain,
            o.extra_roots.as_deref(),
            Arc::new(SystemClock),
        )
        .map_err(|e| AppError::Start("CA", e.to_string()))?,
    );
    if client.is_none() {
        // In a cluster the root is published in ConfigMaps instead.
        let bundle = o.data_dir.join("root-cert.pem");
        std::fs::write(&bundle, ca.root_bundle_pem())
            .map_err(|e| AppError::Start("root bundle", e.to_string()))?;
        info!(path = %bundle.display(), "published the root bundle");
    }

    Ok(ca)
}

/// Starts the config source feeding `hub`: the folder, re-read every
/// `poll`, or the Kubernetes watchers with the cluster's writers (whose
/// tasks are returned).
fn start_source(
    o: &Options,
    hub: &Arc<Hub>,
    issues: &Arc<Mutex<Vec<ConfigIssue>>>,
    stop: &CancellationToken,
    ca: &Arc<CertificateAuthority>,
    client: Option<kube::Client>,
    kube_config: Option<kube::Config>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AppError> {
    let mut cluster = Vec::new();
    match &o.source {
        ConfigSource::Folder(dir) => {
            // Load the whole folder before serving, so the first push is complete.
            let mut folder = FolderSource::new(dir);
            hub.apply(folder.scan());
            hub.set_ready();
            *issues.lock().unwrap_or_else(|p| p.into_inner()) = folder.issues();
            let (hub, issues, stop, poll) = (hub.clone(), issues.clone(), stop.clone(), o.poll);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(poll) => {}
                    }
                    let changes = folder.scan();
                    if !changes.is_empty() {
                        hub.apply(changes);
                        *issues.lock().unwrap_or_else(|p| p.into_inner()) = folder.issues();
                    }
                }
            });
        }
        ConfigSource::Kube(c) => {
            let (Some(client), Some(config)) = (client, kube_config) else {
                return Err(AppError::Start("Kubernetes client", "none".into()));
            };
            let watchers = crate::config::kube::watch_all(config, hub.sources().clone())
                .map_err(|e| AppError::Start("Kubernetes client", e.to_string()))?;
            tokio::spawn(crate::config::kube::feed(hub.clone(), watchers, o.poll));
            cluster = start_cluster_writes(client, c, o, ca, hub, stop);
        }
    }

    Ok(cluster)
}

/// The names the controller's serving certificate carries.
fn serving_names(o: &Options) -> Vec<String> {
    let mut dns = vec![
        "istiod-lite.istio-system.svc".to_string(),
        "istiod.istio-system.svc".to_string(),
        "localhost".to_string(),
    ];
    if let ConfigSource::Kube(c) = &o.source {
        dns.push(format!("istiod-lite.{}.svc", c.namespace));
        dns.push(c.ca_server_name.clone());
    }
    dns.dedup();
    dns.extend(o.serving_dns.iter().cloned());
    dns
}

/// Who may ask for certificates and config: the API server's TokenReview
/// in a cluster, the node tokens file outside one.
fn authenticator(
    o: &Options,
    client: Option<&kube::Client>,
    hub: &Arc<Hub>,
) -> Result<Arc<dyn Authenticator>, AppError> {
    let authn: Arc<dyn Authenticator> = match (&o.source, client, &o.node_tokens) {
        (ConfigSource::Kube(c), Some(client), _) => Arc::new(TokenReviewer::new(
            client.clone(),
            ReviewConfig {
                audience: c.token_audience.clone(),
                ztunnel_account: c.ztunnel_account.clone(),
                trust_domain: o.model.trust_domain.clone(),
            },
            hub.clone(),
        )),
        (_, _, Some(path)) => Arc::new(
            TokensFile::load(path, hub.clone())
                .map_err(|e| AppError::Start("node tokens", e.to_string()))?,
        ),
        _ => {
            return Err(AppError::Start(
                "node tokens",
                "--node-tokens is required outside a cluster".into(),
            ));
        }
    };
    Ok(authn)
}

/// Binds `addr` and serves `handler` on it until `stop`; the bound address.
async fn serve_http<F>(
    addr: SocketAddr,
    what: &'static str,
    stop: &CancellationToken,
    handler: F,
) -> Result<SocketAddr, AppError>
where
    F: Fn(
            &http::Request<hyper::body::Incoming>,
        ) -> http::Response<http_body_util::Full<bytes::Bytes>>
        + Send
        + Sync
        + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Start(what, format!("{addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AppError::Start(what, e.to_string()))?;
    tokio::spawn(mesh_core::admin::serve(listener, stop.clone(), handler));
    Ok(bound)
}

/// The Lease elector and the leader's writer.
fn start_cluster_writes(
    client: kube::Client,
    c: &ClusterOptions,
    o: &Options,
    ca: &CertificateAuthority,
    hub: &Arc<Hub>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let elector = Elector::new(
        kube::Api::namespaced(client.clone(), &c.namespace),
        LeaseConfig::new(&c.lease_name, &c.pod_name),
    );
    let leader = elector.subscribe();
    let elector = tokio::spawn(elector.run(stop.clone()));
    let writer = Writer::new(
        client,
        WriterConfig {
            waypoint_image: c.waypoint_image.clone(),
            ca_address: c.ca_address.clone(),
            ca_server_name: c.ca_server_name.clone(),
            trust_domain: o.model.trust_domain.clone(),
            token_audience: c.token_audience.clone(),
            path_normalization: c.path_normalization.clone(),
            proxy_log_format: c.proxy_log_format.clone(),
            resync: Duration::from_secs(60),
            min_interval: Duration::from_secs(1),
        },
        ca.root_bundle_pem().to_string(),
    );
    // The writer first: it stops writing before the Lease is released.
    vec![
        tokio::spawn(writer.run(hub.clone(), leader, stop.clone())),
        elector,
    ]
}
