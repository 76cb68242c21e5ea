//! Bad input on the HBONE port: each is refused (or timed out) with a logged
//! reason, nothing leaks, and other clients are unaffected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use e2e::ca::TestCa;
use e2e::mesh::{Echo, Pod, Subnet, Ztunnel, ZtunnelSpec, ca_for, eventually, state_yaml};
use http::{Method, Request, StatusCode};
use mesh_core::ca::CaClient;
use mesh_core::tls::{TrustRoots, WorkloadCertificate, client_config};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Target {
    _dir: tempfile::TempDir,
    _ca: TestCa,
    zb: Ztunnel,
    _echo: Echo,
    server: Pod,
    hbone: SocketAddr,
    cert: WorkloadCertificate,
    roots: TrustRoots,
}

async fn target() -> Target {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let server = Pod::new("server", "default", "server", net.ip(2), "node-b");
    let ca = ca_for(dir.path(), &[&client, &server]).await;
    let echo = Echo::start(net.addr(2, 8080)).await;
    let zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new(
            "zb",
            "node-b",
            net.ip(11),
            state_yaml(&[&client, &server], &[], ""),
        )
        .inbound(vec![server.ip])
        .extra("handshake_timeout: 1s\n"),
    )
    .await;
    let cert = ca
        .client("node-a")
        .fetch_certificate(&client.identity())
        .await
        .unwrap();
    let roots = TrustRoots::new(cert.roots().to_vec()).unwrap();
    Target {
        _dir: dir,
        _ca: ca,
        zb,
        _echo: echo,
        hbone: net.addr(2, 15008),
        server,
        cert,
        roots,
    }
}

impl Target {
    async fn tls(&self) -> TlsStream<TcpStream> {
        let cfg =
            client_config(&self.cert, self.roots.clone(), vec![self.server.identity()]).unwrap();
        let tcp = TcpStream::connect(self.hbone).await.unwrap();
        TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(self.hbone.ip().into()), tcp)
            .await
            .unwrap()
    }

    async fn h2(&self) -> h2::client::SendRequest<Bytes> {
        let (client, conn) = h2::client::handshake(self.tls().await).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// A well-formed tunnel to the echo app works: the control case.
    async fn good_stream(&self) {
        let mut h2 = self.h2().await.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("{}:8080", self.server.ip))
            .body(())
            .unwrap();
        let (resp, mut send) = h2.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        send.send_data(Bytes::from_static(b"ping"), true).unwrap();
        let mut body = resp.into_body();
        let got = body.data().await.unwrap().unwrap();
        assert_eq!(&got[..], b"ping");
    }

    /// Sends one request; the status, or None when the stream was reset.
    async fn status_of(&self, req: Request<()>) -> Option<StatusCode> {
        let mut h2 = self.h2().await.ready().await.ok()?;
        let (resp, _send) = h2.send_request(req, false).ok()?;
        resp.await.ok().map(|r| r.status())
    }

    async fn settled_stats(&self) -> (u64, u64) {
        // Let closed connections finish their teardown first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.zb.process().await
    }
}

/// The server closed the connection having sent nothing but, at most, a TLS
/// alert record (content type 0x15).
async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf.is_empty() || (buf[0] == 0x15 && buf.len() <= 64),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

#[tokio::test]
async fn malformed_and_hostile_input_is_refused_without_leaks() {
    let t = target().await;
    t.good_stream().await;
    let (tasks0, fds0) = t.settled_stats().await;

    // Garbage bytes and plain HTTP/1 instead of TLS.
    let mut s = TcpStream::connect(t.hbone).await.unwrap();
    s.write_all(&[0x5a; 512]).await.unwrap();
    assert!(closed_without_data(&mut s).await, "garbage");
    let mut s = TcpStream::connect(t.hbone).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_without_data(&mut s).await, "HTTP/1");

    // A TLS client without a certificate.
    let no_cert = rustls::ClientConfig::builder_with_provider(mesh_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(mesh_core::tls::ServerIdentityVerifier::new(
            t.roots.clone(),
            vec![t.server.identity()],
        )))
        .with_no_client_auth();
    let tcp = TcpStream::connect(t.hbone).await.unwrap();
    let r = TlsConnector::from(Arc::new(no_cert))
        .connect(ServerName::IpAddress(t.hbone.ip().into()), tcp)
        .await;
    if let Ok(mut tls) = r {
        let mut b = [0u8; 1];
        assert!(
            tls.read(&mut b).await.is_err() || b == [0],
            "no-cert client was served"
        );
    }

    // Requests that are not well-formed CONNECTs.
    let ip = t.server.ip;
    let cases: Vec<(&str, Request<()>, StatusCode)> = vec![
        (
            "unparsable authority",
            Request::builder()
                .method(Method::CONNECT)
                .uri("not-an-ip:8080")
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "non-CONNECT method",
            Request::builder()
                .method(Method::GET)
                .uri(format!("https://{ip}:8080/"))
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "proxy's own port",
            Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{ip}:15008"))
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "another workload's address",
            Request::builder()
                .method(Method::CONNECT)
                .uri("127.0.0.1:8080")
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "nothing listening",
            Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{ip}:1"))
                .body(())
                .unwrap(),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(t.status_of(req).await, Some(want), "{what}");
    }
    // No :authority at all: refused at the HTTP/2 layer or with 400.
    let no_authority = Request::builder()
        .method(Method::CONNECT)
        .uri("/")
        .body(())
        .unwrap();
    let st = t.status_of(no_authority).await;
    assert!(
        st.is_none() || st == Some(StatusCode::BAD_REQUEST),
        "missing authority: {st:?}"
    );

    // 10 000 streams opened and abandoned on one connection.
    let h2 = t.h2().await;
    let abuse = async {
        for i in 0..10_000u32 {
            let mut h = h2.clone().ready().await.unwrap();
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{ip}:8080"))
                .body(())
                .unwrap();
            let (resp, send) = h.send_request(req, false).unwrap();
            if i % 2 == 0 {
                // Wait for the answer, then walk away.
                let _ = resp.await;
            }
            drop(send);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), abuse)
        .await
        .expect("abuse finished in time");
    drop(h2);
    // Meanwhile and afterwards, other clients are served.
    t.good_stream().await;

    // A client that stalls mid-handshake is timed out.
    let mut s = TcpStream::connect(t.hbone).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(
        closed_without_data(&mut s).await,
        "stalled handshake was not timed out"
    );

    // The server may log a refusal a moment after the client saw it.
    let reasons = [
        "HBONE handshake refused",
        "HBONE handshake timed out",
        ":authority \"not-an-ip:8080\" is not ip:port",
        "method GET is not CONNECT",
        "target port 15008 is one of the proxy's own ports",
        "is not the connection's destination workload",
        "upstream dial failed (503)",
    ];
    eventually(
        "every refusal is logged with its reason",
        Duration::from_secs(10),
        || async {
            let log = t.zb.log_text();
            reasons.iter().all(|r| log.contains(r))
        },
    )
    .await;

    t.good_stream().await;
    eventually(
        "tasks and descriptors return to their baseline",
        Duration::from_secs(15),
        || async {
            let (tasks, fds) = t.settled_stats().await;
            tasks <= tasks0 + 3 && fds <= fds0 + 3
        },
    )
    .await;
}
