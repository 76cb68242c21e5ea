//! Runs a real istiod-lite CA (gRPC over TLS on loopback) inside the test
//! process, with a clock the test controls.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use istiod_lite::ca::auth::{BootstrapTokens, NodeAuthorizer, StaticNodeIdentities};
use istiod_lite::ca::{CaService, CaSource, CertificateAuthority, ServingCert, serve};
use mesh_core::ca::{CaClientConfig, IstioCaClient};
use mesh_core::clock::Clock;
use mesh_core::identity::Identity;
use tokio::sync::oneshot;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Counts node checks: one per CSR that got that far.
pub struct Counting<A> {
    pub inner: A,
    pub calls: AtomicUsize,
}

impl<A: NodeAuthorizer> NodeAuthorizer for Counting<A> {
    fn workload_on_node(&self, node: &str, identity: &Identity) -> bool {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.workload_on_node(node, identity)
    }
}

/// A CA serving on loopback. Dropping it stops the server.
pub struct TestCa {
    pub addr: SocketAddr,
    pub ca: Arc<CertificateAuthority>,
    pub authz: Arc<Counting<StaticNodeIdentities>>,
    pub tokens: Vec<(String, String)>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

/// `node-a` runs `default/app` and `default/web`; `node-b` runs `other/db`.
pub fn default_placement() -> Vec<(String, Vec<Identity>)> {
    let id = |ns: &str, sa: &str| Identity::new(TRUST_DOMAIN, ns, sa).expect("valid identity");
    vec![
        (
            "node-a".into(),
            vec![id("default", "app"), id("default", "web")],
        ),
        ("node-b".into(), vec![id("other", "db")]),
    ]
}

pub fn token_for(node: &str) -> String {
    format!("bootstrap-token-for-{node}-0123456789")
}

impl TestCa {
    /// Starts a CA with a self-signed root kept in `dir`.
    pub async fn start(dir: &Path, clock: Arc<dyn Clock>) -> TestCa {
        Self::start_with(
            CaSource::SelfSigned {
                dir: dir.join("ca"),
            },
            clock,
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
    }

    pub async fn start_with(source: CaSource, clock: Arc<dyn Clock>, bind: SocketAddr) -> TestCa {
        Self::start_placed(source, clock, bind, default_placement()).await
    }

    /// A CA whose node check allows `placement` (node -> identities).
    pub async fn start_placed(
        source: CaSource,
        clock: Arc<dyn Clock>,
        bind: SocketAddr,
        placement: Vec<(String, Vec<Identity>)>,
    ) -> TestCa {
        mesh_core::tls::install_default_provider();
        let ca = Arc::new(
            CertificateAuthority::load(&source, TRUST_DOMAIN, None, clock).expect("CA loads"),
        );
        Self::serve(ca, bind, placement).await
    }

    pub async fn serve(
        ca: Arc<CertificateAuthority>,
        bind: SocketAddr,
        placement: Vec<(String, Vec<Identity>)>,
    ) -> TestCa {
        let nodes: Vec<String> = placement.iter().map(|(n, _)| n.clone()).collect();
        let tokens: Vec<(String, String)> =
            nodes.iter().map(|n| (n.clone(), token_for(n))).collect();
        let authn = Arc::new(BootstrapTokens::new(tokens.clone()).expect("tokens"));
        let authz = Arc::new(Counting {
            inner: StaticNodeIdentities::new(placement),
            calls: AtomicUsize::new(0),
        });
        let serving =
            ServingCert::issue(&ca, &[SERVER_NAME.to_string()], &[]).expect("serving cert");
        let listener = bind_retrying(bind).await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let router = serve(&serving)
            .expect("tls config")
            .add_service(CaService::new(ca.clone(), authn, authz.clone()).into_server());
        let done = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestCa {
            addr,
            ca,
            authz,
            tokens,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            // Open HTTP/2 connections are closed by aborting the server task.
            d.abort();
            let _ = d.await;
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A ztunnel-side client for `node`.
    pub fn client(&self, node: &str) -> IstioCaClient {
        IstioCaClient::new(self.client_config(Some(token_for(node)))).expect("client")
    }

    pub fn client_config(&self, token: Option<String>) -> CaClientConfig {
        CaClientConfig {
            address: self.url(),
            ca_root_pem: self.ca.root_bundle_pem().to_string(),
            server_name: SERVER_NAME.to_string(),
            token: token.map(Into::into),
            validity: Duration::ZERO,
            request_timeout: Duration::from_secs(5),
        }
    }

    pub fn node_checks(&self) -> usize {
        self.authz.calls.load(Ordering::SeqCst)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d.abort();
        }
    }
}

// Re-binding the port a stopped CA used can briefly fail; retry a little.
async fn bind_retrying(addr: SocketAddr) -> tokio::net::TcpListener {
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot bind {addr}: {last:?}");
}

/// Why a certificate from a lab's own CA could not be had or written.
#[derive(Debug, thiserror::Error)]
pub enum LabCertError {
    #[error("the lab's CA: {0}")]
    Ca(#[from] istiod_lite::ca::CaLoadError),
    #[error("certificate for {identity}: {source}")]
    Issue {
        identity: Identity,
        #[source]
        source: mesh_core::ca::CaError,
    },
    #[error("no certificate for {0}")]
    NoCertificate(Identity),
    #[error("the key for {0} is of an unknown kind")]
    KeyKind(Identity),
    #[error("{}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Certificates for `identities` signed by a lab's own CA (the root it keeps
/// under `<lab>/data/ca`), for peers the lab's controller does not serve
/// (Envoy in the benchmarks): a CA on loopback for the moment it takes.
pub async fn from_lab_ca(
    lab_dir: &Path,
    identities: &[Identity],
) -> Result<Vec<mesh_core::tls::WorkloadCertificate>, LabCertError> {
    let ca = CertificateAuthority::load(
        &CaSource::SelfSigned {
            dir: lab_dir.join("data/ca"),
        },
        TRUST_DOMAIN,
        None,
        Arc::new(mesh_core::clock::SystemClock),
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let issuer = TestCa::serve(
        Arc::new(ca),
        addr,
        vec![("lab".to_string(), identities.to_vec())],
    )
    .await;
    let client = issuer.client("lab");
    let mut out = Vec::new();
    for id in identities {
        use mesh_core::ca::CaClient;
        match client.fetch_certificate(id).await {
            Ok(c) => out.push(c),
            Err(source) => {
                issuer.stop().await;
                return Err(LabCertError::Issue {
                    identity: id.clone(),
                    source,
                });
            }
        }
    }
    issuer.stop().await;
    Ok(out)
}

/// PEM files for one identity signed by a lab's own CA, for a client made
/// by hand inside the lab (`labapp hbone --cert --key --root`).
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The leaf, then any intermediates.
    pub chain: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub root: std::path::PathBuf,
}

/// Writes `<name>-chain.pem`, `<name>-key.pem` and `<name>-root.pem` under
/// the lab's dir: a certificate for `identity` from the lab's CA (see
/// [`from_lab_ca`]).
pub async fn write_lab_cert(
    lab_dir: &Path,
    identity: &Identity,
    name: &str,
) -> Result<CertFiles, LabCertError> {
    let certs = from_lab_ca(lab_dir, std::slice::from_ref(identity)).await?;
    let cert = certs
        .first()
        .ok_or_else(|| LabCertError::NoCertificate(identity.clone()))?;
    let pems = |tag: &str, ders: &[rustls_pki_types::CertificateDer<'_>]| -> String {
        ders.iter()
            .map(|d| pem::encode(&pem::Pem::new(tag, d.to_vec())))
            .collect()
    };
    let key = cert.key();
    let tag = match &key {
        rustls_pki_types::PrivateKeyDer::Pkcs8(_) => "PRIVATE KEY",
        rustls_pki_types::PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        rustls_pki_types::PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        _ => return Err(LabCertError::KeyKind(identity.clone())),
    };
    let files = CertFiles {
        chain: lab_dir.join(format!("{name}-chain.pem")),
        key: lab_dir.join(format!("{name}-key.pem")),
        root: lab_dir.join(format!("{name}-root.pem")),
    };
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|source| LabCertError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&files.chain, pems("CERTIFICATE", cert.chain()))?;
    write(
        &files.key,
        pem::encode(&pem::Pem::new(tag, key.secret_der().to_vec())),
    )?;
    write(&files.root, pems("CERTIFICATE", cert.roots()))?;
    Ok(files)
}
