//! Real TLS 1.3 handshakes over loopback between mesh configs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use istiod_lite::ca::issue::Issuer;
use mesh_core::identity::Identity;
use mesh_core::tls::{
    ServerIdentityVerifier, TrustRoots, WorkloadCertificate, client_config, handshake_failure,
    peer_identity, server_config,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86400);

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).unwrap()
}

struct Pki {
    root: Issuer,
}

impl Pki {
    fn new() -> Self {
        mesh_core::tls::install_default_provider();
        Pki {
            root: Issuer::new_root("cluster.local", SystemTime::now(), 365 * DAY).unwrap(),
        }
    }
    fn roots(&self) -> TrustRoots {
        TrustRoots::new(vec![self.root.cert_der().clone()]).unwrap()
    }
    fn cert(&self, identity: &Identity) -> WorkloadCertificate {
        let now = SystemTime::now();
        self.cert_between(identity, now - Duration::from_secs(60), now + DAY)
    }
    fn cert_between(
        &self,
        identity: &Identity,
        nb: SystemTime,
        na: SystemTime,
    ) -> WorkloadCertificate {
        self.root
            .issue_workload(identity, nb, na, &[], vec![self.root.cert_der().clone()])
            .unwrap()
    }
}

struct Outcome {
    client: Result<Option<Identity>, String>,
    server: Result<Option<Identity>, String>,
}

/// One handshake: the server presents `server_cert` and trusts `server_roots`;
/// the client presents `client_cert`, trusts `client_roots` and expects `expected`.
async fn handshake(
    server_cert: &WorkloadCertificate,
    server_roots: TrustRoots,
    client_cert: &WorkloadCertificate,
    client_roots: TrustRoots,
    expected: Vec<Identity>,
) -> Outcome {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(server_cert, server_roots).unwrap()));
    let connector = TlsConnector::from(Arc::new(
        client_config(client_cert, client_roots, expected).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let (_, conn) = tls.get_ref();
                assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
                assert_eq!(
                    conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
                let peer = peer_identity(conn);
                // One byte so the client knows the server accepted it.
                tls.write_all(b"k").await.unwrap();
                tls.shutdown().await.unwrap();
                Ok(peer)
            }
            Err(e) => Err(handshake_failure(&e)),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    // No SNI in HBONE: the name is never checked, only the SPIFFE identity.
    let name = ServerName::IpAddress(addr.ip().into());
    let client = match connector.connect(name, tcp).await {
        Ok(mut tls) => {
            // In TLS 1.3 the server's verdict on our certificate arrives after
            // the client's handshake completes: read the server's byte.
            let mut b = [0u8; 1];
            match tls.read_exact(&mut b).await {
                Ok(_) => Ok(peer_identity(tls.get_ref().1)),
                Err(e) => Err(handshake_failure(&e)),
            }
        }
        Err(e) => Err(handshake_failure(&e)),
    };
    Outcome {
        client,
        server: server.await.unwrap(),
    }
}

#[tokio::test]
async fn mutual_handshake_yields_both_identities() {
    let pki = Pki::new();
    let (web, app) = (
        id("cluster.local", "default", "web"),
        id("cluster.local", "default", "app"),
    );
    let o = handshake(
        &pki.cert(&web),
        pki.roots(),
        &pki.cert(&app),
        pki.roots(),
        vec![web.clone()],
    )
    .await;
    assert_eq!(o.client.unwrap(), Some(web));
    assert_eq!(o.server.unwrap(), Some(app));
}

#[tokio::test]
async fn server_with_the_wrong_identity_is_refused() {
    let pki = Pki::new();
    let (web, app, db) = (
        id("cluster.local", "default", "web"),
        id("cluster.local", "default", "app"),
        id("cluster.local", "default", "db"),
    );
    let o = handshake(
        &pki.cert(&web),
        pki.roots(),
        &pki.cert(&app),
        pki.roots(),
        vec![db],
    )
    .await;
    let e = o.client.unwrap_err();
    assert!(
        e.contains("peer identity") && e.contains("sa/web") && e.contains("sa/db"),
        "{e}"
    );
    assert!(o.server.is_err());
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let pki = Pki::new();
    let web = id("cluster.local", "default", "web");
    let evil = id("evil.example", "default", "app");
    let o = handshake(
        &pki.cert(&web),
        pki.roots(),
        &pki.cert(&evil),
        pki.roots(),
        vec![web.clone()],
    )
    .await;
    let e = o.server.unwrap_err();
    assert!(
        e.contains("outside trust domain") && e.contains("evil.example"),
        "{e}"
    );
    assert!(o.client.is_err());
}

#[tokio::test]
async fn client_from_an_untrusted_root_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let (web, app) = (
        id("cluster.local", "default", "web"),
        id("cluster.local", "default", "app"),
    );
    let o = handshake(
        &pki.cert(&web),
        pki.roots(),
        &other.cert(&app),
        pki.roots(),
        vec![web.clone()],
    )
    .await;
    // Both roots share a subject name, so webpki tries the wrong one and
    // reports the signature; with distinct names it is UnknownIssuer.
    let e = o.server.unwrap_err();
    assert!(
        e.contains("UnknownIssuer") || e.contains("BadSignature"),
        "{e}"
    );
    // The client learns it through the alert.
    let e = o.client.unwrap_err();
    assert!(e.contains("alert"), "{e}");
}

#[tokio::test]
async fn expired_certificates_are_refused_both_ways() {
    let pki = Pki::new();
    let (web, app) = (
        id("cluster.local", "default", "web"),
        id("cluster.local", "default", "app"),
    );
    let now = SystemTime::now();
    let expired_app = pki.cert_between(&app, now - 2 * DAY, now - DAY);
    let o = handshake(
        &pki.cert(&web),
        pki.roots(),
        &expired_app,
        pki.roots(),
        vec![web.clone()],
    )
    .await;
    assert!(o.server.unwrap_err().contains("expired"));

    let expired_web = pki.cert_between(&web, now - 2 * DAY, now - DAY);
    let o = handshake(
        &expired_web,
        pki.roots(),
        &pki.cert(&app),
        pki.roots(),
        vec![web],
    )
    .await;
    assert!(o.client.unwrap_err().contains("expired"));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let web = id("cluster.local", "default", "web");
    let acceptor = TlsAcceptor::from(Arc::new(
        server_config(&pki.cert(&web), pki.roots()).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor
            .accept(tcp)
            .await
            .map(|_| ())
            .map_err(|e| handshake_failure(&e))
    });
    let verifier = ServerIdentityVerifier::new(pki.roots(), vec![web]);
    let cfg = rustls::ClientConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let _ = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await;
    let e = server.await.unwrap().unwrap_err();
    assert!(
        e.contains("NoCertificatesPresented") || e.contains("no certificates"),
        "{e}"
    );
}

#[tokio::test]
async fn root_rotation_trusts_old_and_new_while_both_are_published() {
    let old = Pki::new();
    let new = Pki::new();
    let (web, app) = (
        id("cluster.local", "default", "web"),
        id("cluster.local", "default", "app"),
    );
    let server_roots = old.roots();
    let web_cert = old.cert(&web);
    let app_new = new.cert(&app);
    let both: Vec<CertificateDer<'static>> =
        vec![old.root.cert_der().clone(), new.root.cert_der().clone()];

    // Before the new root is published, its certificates are refused.
    let o = handshake(
        &web_cert,
        server_roots.clone(),
        &app_new,
        both_roots(&both),
        vec![web.clone()],
    )
    .await;
    assert!(o.server.is_err());

    // Published alongside the old one: both are trusted, live, no new config.
    assert!(server_roots.set(both.clone()).unwrap());
    let o = handshake(
        &web_cert,
        server_roots.clone(),
        &app_new,
        both_roots(&both),
        vec![web.clone()],
    )
    .await;
    assert_eq!(o.server.unwrap(), Some(app.clone()));
    let o = handshake(
        &web_cert,
        server_roots.clone(),
        &old.cert(&app),
        both_roots(&both),
        vec![web.clone()],
    )
    .await;
    assert_eq!(o.server.unwrap(), Some(app.clone()));

    // The old root withdrawn: certificates it signed are refused.
    server_roots.set(vec![new.root.cert_der().clone()]).unwrap();
    let o = handshake(
        &new.cert(&web),
        server_roots,
        &old.cert(&app),
        both_roots(&both),
        vec![web],
    )
    .await;
    let e = o.server.unwrap_err();
    assert!(
        e.contains("UnknownIssuer") || e.contains("BadSignature"),
        "{e}"
    );
}

fn both_roots(certs: &[CertificateDer<'static>]) -> TrustRoots {
    TrustRoots::new(certs.to_vec()).unwrap()
}
