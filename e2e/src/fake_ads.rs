//! A control plane of a test's own: a Delta ADS server
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) over TLS, serving whatever resources the test
//! gives it, byte for byte. It stands for a foreign or newer control plane,
//! so a test can send a real ztunnel what our own controller never would (a
//! policy it cannot read) and see what the ztunnel answers.
//!
//! Per type it holds one set of resources; [`FakeAds::push`] replaces a set
//! and every connected proxy is sent the difference (changed resources, and
//! the names that are gone). A new subscription is always answered, with
//! what the proxy does not hold by the versions it states. Every ACK and
//! NACK is recorded ([`Reply`]), as is every subscription ([`Subscription`]).
//! Each push (and each [`FakeAds::disconnect`]) starts a new generation; a
//! reply says the generation of the response it answers, so a test can wait
//! for the proxy's answer to its own push.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use istiod_lite::ca::{CertificateAuthority, ServingCert, serve};
use mesh_core::state::LocalConfig;
use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use mesh_proto::istio::security::Authorization;
use mesh_proto::istio::workload::{Address, address};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::SERVER_NAME;

/// Why the server cannot start, or a reply did not come.
#[derive(Debug)]
pub enum FakeAdsError {
    ServingCert(String),
    Tls(String),
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The state file the address resources are made from.
    State(String),
    NoReply {
        what: String,
        limit: Duration,
        replies: Vec<Reply>,
    },
}

impl fmt::Display for FakeAdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeAdsError::ServingCert(e) => write!(f, "serving certificate for {SERVER_NAME}: {e}"),
            FakeAdsError::Tls(e) => write!(f, "TLS config: {e}"),
            FakeAdsError::Bind { addr, source } => write!(f, "bind {addr}: {source}"),
            FakeAdsError::State(e) => write!(f, "state file: {e}"),
            FakeAdsError::NoReply {
                what,
                limit,
                replies,
            } => write!(f, "no {what} within {limit:?}; replies so far: {replies:?}"),
        }
    }
}

impl std::error::Error for FakeAdsError {}

/// A proxy's answer to one response: an ACK, or a NACK with its error.
#[derive(Debug, Clone)]
pub struct Reply {
    pub type_url: String,
    pub nonce: String,
    /// The generation current when the answered response was sent.
    pub generation: u64,
    /// `error_detail.message` of a NACK; None for an ACK.
    pub error: Option<String>,
}

/// One subscription request (the first request of a type on a stream).
#[derive(Debug, Clone)]
pub struct Subscription {
    /// `Node.id` from the stream's first request.
    pub proxy_id: String,
    /// The `authorization` header the stream was opened with.
    pub token: Option<String>,
    pub type_url: String,
    /// What the proxy says it already holds: name -> version.
    pub initial_versions: BTreeMap<String, String>,
    pub generation: u64,
}

#[derive(Default)]
struct Book {
    generation: u64,
    /// type -> name -> resource.
    sets: BTreeMap<String, BTreeMap<String, Resource>>,
    /// nonce -> generation it was sent in.
    sent: HashMap<String, u64>,
    replies: Vec<Reply>,
    subscriptions: Vec<Subscription>,
}

struct Shared {
    book: Mutex<Book>,
    /// The generation of the latest push.
    pushed: watch::Sender<u64>,
    /// Bumped to make every open stream end.
    kick: watch::Sender<u64>,
    nonces: AtomicU64,
    stopped: CancellationToken,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The server, on loopback. Dropping it stops it.
pub struct FakeAds {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl FakeAds {
    /// Serves on a free loopback port with a certificate from `ca` for
    /// [`SERVER_NAME`], the name the ztunnel expects of its CA and xDS.
    pub async fn start(ca: &CertificateAuthority) -> Result<FakeAds, FakeAdsError> {
        mesh_core::tls::install_default_provider();
        let serving = ServingCert::issue(ca, &[SERVER_NAME.to_string()], &[])
            .map_err(|e| FakeAdsError::ServingCert(e.to_string()))?;
        let bind: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| FakeAdsError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| FakeAdsError::Bind { addr: bind, source })?;
        let shared = Arc::new(Shared {
            book: Mutex::new(Book::default()),
            pushed: watch::Sender::new(0),
            kick: watch::Sender::new(0),
            nonces: AtomicU64::new(1),
            stopped: CancellationToken::new(),
        });
        let service = Ads {
            shared: shared.clone(),
        };
        let router = serve(&serving)
            .map_err(|e| FakeAdsError::Tls(e.to_string()))?
            .add_service(AggregatedDiscoveryServiceServer::new(service));
        let stopped = shared.stopped.clone();
        let done = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, stopped.cancelled_owned())
                .await;
        });
        Ok(FakeAds {
            addr,
            shared,
            done: Some(done),
        })
    }

    /// The address for a ztunnel's `state: {xds_address: ...}`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Replaces the set of `type_url` resources; connected proxies are sent
    /// the difference. Returns the push's generation.
    pub fn push(&self, type_url: &str, resources: Vec<Resource>) -> u64 {
        let generation = {
            let mut book = self.shared.book();
            book.generation += 1;
            let set = resources.into_iter().map(|r| (r.name.clone(), r)).collect();
            book.sets.insert(type_url.to_string(), set);
            book.generation
        };
        self.shared.pushed.send_replace(generation);
        generation
    }

    /// Ends every open stream (the proxies reconnect). Returns the new
    /// generation: responses on the new streams are sent in it.
    pub fn disconnect(&self) -> u64 {
        let generation = {
            let mut book = self.shared.book();
            book.generation += 1;
            book.generation
        };
        self.shared.kick.send_modify(|k| *k += 1);
        generation
    }

    pub fn replies(&self) -> Vec<Reply> {
        self.shared.book().replies.clone()
    }

    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.shared.book().subscriptions.clone()
    }

    /// Waits (at most 10 s) for the first reply to a `type_url` response
    /// sent in `generation` or later.
    pub async fn reply(&self, type_url: &str, generation: u64) -> Result<Reply, FakeAdsError> {
        let limit = Duration::from_secs(10);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let found = self
                .replies()
                .into_iter()
                .find(|r| r.type_url == type_url && r.generation >= generation);
            if let Some(r) = found {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FakeAdsError::NoReply {
                    what: format!("reply to a {type_url} response of generation {generation}"),
                    limit,
                    replies: self.replies(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(mut self) {
        self.shared.stopped.cancel();
        if let Some(d) = self.done.take() {
            d.abort();
            let _ = d.await;
        }
    }
}

impl Drop for FakeAds {
    fn drop(&mut self) {
        self.shared.stopped.cancel();
        if let Some(d) = self.done.take() {
            d.abort();
        }
    }
}

/// A resource named `name` holding `value` as `type_url`; its version is
/// derived from the bytes, so new bytes under the same name are a change.
pub fn resource(name: &str, type_url: &str, value: Vec<u8>) -> Resource {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    Resource {
        name: name.to_string(),
        version: format!("{:016x}", h.finish()),
        resource: Some(prost_types::Any {
            type_url: type_url.to_string(),
            value,
        }),
        ..Default::default()
    }
}

/// An `istio.security.Authorization` resource, named `namespace/name`.
pub fn policy(p: &Authorization) -> Resource {
    resource(
        &format!("{}/{}", p.namespace, p.name),
        AUTHORIZATION_TYPE_URL,
        p.encode_to_vec(),
    )
}

/// The workloads and services of a local state file (as
/// [`crate::mesh::state_yaml`] writes it) as `istio.workload.Address`
/// resources: workloads named by uid, services by `namespace/hostname`.
/// Through the ztunnel's own file-to-proto conversion, so a test on xDS
/// sees the same state as one on the file.
pub fn addresses(state_yaml: &str) -> Result<Vec<Resource>, FakeAdsError> {
    let cfg: LocalConfig =
        serde_yaml::from_str(state_yaml).map_err(|e| FakeAdsError::State(e.to_string()))?;
    let mut out = Vec::new();
    for w in &cfg.workloads {
        let proto = w
            .to_proto()
            .map_err(|e| FakeAdsError::State(format!("workload {}: {e}", w.uid)))?;
        let name = proto.uid.clone();
        let a = Address {
            r#type: Some(address::Type::Workload(proto)),
        };
        out.push(resource(&name, ADDRESS_TYPE_URL, a.encode_to_vec()));
    }
    for s in &cfg.services {
        let proto = s.to_proto();
        let name = format!("{}/{}", proto.namespace, proto.hostname);
        let a = Address {
            r#type: Some(address::Type::Service(proto)),
        };
        out.push(resource(&name, ADDRESS_TYPE_URL, a.encode_to_vec()));
    }
    Ok(out)
}

struct Ads {
    shared: Arc<Shared>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (tx, rx) = mpsc::channel(16);
        let conn = Conn {
            shared: self.shared.clone(),
            tx,
            token,
            proxy_id: String::new(),
            held: BTreeMap::new(),
        };
        tokio::spawn(conn.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's stream.
struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    token: Option<String>,
    proxy_id: String,
    /// type -> what the proxy holds by our account: name -> version.
    held: BTreeMap<String, BTreeMap<String, String>>,
}

/// The stream is gone.
struct Closed;

impl Conn {
    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        let mut pushed = self.shared.pushed.subscribe();
        pushed.borrow_and_update();
        let mut kick = self.shared.kick.subscribe();
        kick.borrow_and_update();
        let stopped = self.shared.stopped.clone();
        loop {
            let alive = tokio::select! {
                _ = stopped.cancelled() => false,
                _ = kick.changed() => false,
                r = pushed.changed() => match r {
                    Ok(()) => self.send_changes().await.is_ok(),
                    Err(_) => false,
                },
                m = requests.message() => match m {
                    Ok(Some(req)) => self.on_request(req).await.is_ok(),
                    Ok(None) | Err(_) => false,
                },
            };
            if !alive {
                return;
            }
        }
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
        if let Some(node) = &req.node {
            self.proxy_id = node.id.clone();
        }
        if !req.response_nonce.is_empty() {
            let mut book = self.shared.book();
            let generation = book.sent.get(&req.response_nonce).copied().unwrap_or(0);
            book.replies.push(Reply {
                type_url: req.type_url.clone(),
                nonce: req.response_nonce.clone(),
                generation,
                error: req.error_detail.as_ref().map(|s| s.message.clone()),
            });
            return Ok(());
        }
        if self.held.contains_key(&req.type_url) {
            // A later subscription change; everything is wildcard here.
            return Ok(());
        }
        let initial: BTreeMap<String, String> = req.initial_resource_versions.into_iter().collect();
        {
            let mut book = self.shared.book();
            let generation = book.generation;
            book.subscriptions.push(Subscription {
                proxy_id: self.proxy_id.clone(),
                token: self.token.clone(),
                type_url: req.type_url.clone(),
                initial_versions: initial.clone(),
                generation,
            });
        }
        self.held.insert(req.type_url.clone(), initial);
        // A subscription is always answered, so the proxy knows it is synced.
        self.send_diff(&req.type_url, true).await
    }

    async fn send_changes(&mut self) -> Result<(), Closed> {
        let types: Vec<String> = self.held.keys().cloned().collect();
        for t in types {
            self.send_diff(&t, false).await?;
        }
        Ok(())
    }

    /// Sends what the proxy lacks of `type_url`'s set and removes what the
    /// set no longer has; nothing when both are empty, unless `always`.
    async fn send_diff(&mut self, type_url: &str, always: bool) -> Result<(), Closed> {
        let response = {
            let mut book = self.shared.book();
            let empty = BTreeMap::new();
            let set = book.sets.get(type_url).unwrap_or(&empty);
            let held = self.held.entry(type_url.to_string()).or_default();
            let resources: Vec<Resource> = set
                .values()
                .filter(|r| held.get(&r.name) != Some(&r.version))
                .cloned()
                .collect();
            let removed: Vec<String> = held
                .keys()
                .filter(|n| !set.contains_key(*n))
                .cloned()
                .collect();
            if resources.is_empty() && removed.is_empty() && !always {
                return Ok(());
            }
            for r in &resources {
                held.insert(r.name.clone(), r.version.clone());
            }
            for n in &removed {
                held.remove(n);
            }
            let nonce = self
                .shared
                .nonces
                .fetch_add(1, Ordering::Relaxed)
                .to_string();
            let generation = book.generation;
            book.sent.insert(nonce.clone(), generation);
            DeltaDiscoveryResponse {
                system_version_info: generation.to_string(),
                resources,
                type_url: type_url.to_string(),
                nonce,
                removed_resources: removed,
                ..Default::default()
            }
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }
}
