//! The mesh CA over real gRPC with TLS on loopback.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use e2e::ca::{SERVER_NAME, TRUST_DOMAIN, TestCa, token_for};
use istiod_lite::ca::issue::Issuer;
use istiod_lite::ca::{CaSource, CertificateAuthority};
use mesh_core::ca::{CaClient, impersonate};
use mesh_core::clock::SystemClock;
use mesh_core::identity::Identity;
use mesh_core::tls::{TrustRoots, parse_pem_certs, verify_workload_chain};
use mesh_proto::istio::ca::IstioCertificateRequest;
use mesh_proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, ns, sa).unwrap()
}

async fn raw_client(ca: &TestCa) -> IstioCertificateServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.ca.root_bundle_pem()))
        .domain_name(SERVER_NAME);
    let ch = Endpoint::from_shared(ca.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    IstioCertificateServiceClient::new(ch).max_decoding_message_size(1 << 20)
}

fn csr_with_sans(sans: &[&str]) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.contains("://") {
                SanType::URI(s.to_string().try_into().unwrap())
            } else {
                SanType::DnsName(s.to_string().try_into().unwrap())
            }
        })
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(
    csr: String,
    node: Option<&str>,
    impersonated: Option<&Identity>,
    secs: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: secs,
        metadata: impersonated.map(impersonate),
    });
    if let Some(n) = node {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token_for(n)).parse().unwrap(),
        );
    }
    req
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../istiod-lite/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

// Flip one byte inside the signature so the CSR still parses but no longer verifies.
fn tamper_signature(pem_text: &str) -> String {
    let mut p = pem::parse(pem_text).unwrap();
    let mut der = p.contents().to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    p = pem::Pem::new(p.tag(), der);
    pem::encode(&p)
}

#[tokio::test]
async fn issues_a_24h_certificate_whose_chain_verifies_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::start(dir.path(), Arc::new(SystemClock)).await;
    let want = id("default", "app");

    let cert = ca.client("node-a").fetch_certificate(&want).await.unwrap();
    assert_eq!(cert.identity(), &want);
    let life = cert.not_after().duration_since(cert.not_before()).unwrap();
    // 24 h plus the one-minute back-dating.
    assert_eq!(life, Duration::from_secs(24 * 3600 + 60));
    let roots = TrustRoots::new(parse_pem_certs(ca.ca.root_bundle_pem(), "root").unwrap()).unwrap();
    let ids = verify_workload_chain(&roots, cert.chain(), SystemTime::now()).unwrap();
    assert_eq!(ids, vec![want.clone()]);

    // On the wire: leaf first, root last.
    let resp = raw_client(&ca)
        .await
        .create_certificate(request(
            csr_with_sans(&[&want.to_string()]),
            Some("node-a"),
            Some(&want),
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 2);
    assert_eq!(resp.cert_chain[1], ca.ca.root_bundle_pem());
    let leaf = parse_pem_certs(&resp.cert_chain[0], "leaf").unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
    assert!(!x.is_ca());
    assert!(x.subject().as_raw().len() <= 2, "subject should be empty");
}

#[tokio::test]
async fn each_refusal_names_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::start(dir.path(), Arc::new(SystemClock)).await;
    let mut client = raw_client(&ca).await;
    let app = id("default", "app");
    let app_s = app.to_string();
    let good = csr_with_sans(&[&app_s]);

    let cases: Vec<(&str, tonic::Request<IstioCertificateRequest>, Code, &str)> = vec![
        (
            "garbage PEM",
            request("not a pem".into(), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "malformed PEM",
        ),
        (
            "truncated PEM",
            request(good[..good.len() / 2].to_string(), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "malformed PEM",
        ),
        (
            "bad signature",
            request(tamper_signature(&good), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "signature does not verify",
        ),
        (
            "no SAN",
            request(csr_with_sans(&["app.default.svc"]), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "no URI SAN",
        ),
        (
            "two SANs",
            request(
                csr_with_sans(&[&app_s, "spiffe://cluster.local/ns/default/sa/web"]),
                Some("node-a"),
                None,
                0,
            ),
            Code::InvalidArgument,
            "2 URI SANs",
        ),
        (
            "not SPIFFE",
            request(
                csr_with_sans(&["https://example.com/x"]),
                Some("node-a"),
                None,
                0,
            ),
            Code::InvalidArgument,
            "not a workload identity",
        ),
        (
            "foreign trust domain",
            request(
                csr_with_sans(&["spiffe://evil.example/ns/default/sa/app"]),
                Some("node-a"),
                None,
                0,
            ),
            Code::InvalidArgument,
            "outside this mesh's trust domain",
        ),
        (
            "not on node",
            request(
                csr_with_sans(&["spiffe://cluster.local/ns/other/sa/db"]),
                Some("node-a"),
                None,
                0,
            ),
            Code::PermissionDenied,
            "no workload with identity spiffe://cluster.local/ns/other/sa/db runs on node \"node-a\"",
        ),
        (
            "impersonation mismatch",
            request(good.clone(), Some("node-a"), Some(&id("default", "web")), 0),
            Code::InvalidArgument,
            "does not match the CSR's SAN",
        ),
        (
            "weak RSA key",
            request(fixture("csr-rsa1024.pem"), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "weak key: RSA key of 1024 bits",
        ),
        (
            "Ed25519 key",
            request(fixture("csr-ed25519.pem"), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "unsupported key",
        ),
        (
            "P-521 key",
            request(fixture("csr-p521.pem"), Some("node-a"), None, 0),
            Code::InvalidArgument,
            "unsupported key: EC curve",
        ),
        (
            "negative duration",
            request(good.clone(), Some("node-a"), None, -5),
            Code::InvalidArgument,
            "validity_duration -5s is out of range",
        ),
        (
            "duration over 90 days",
            request(good.clone(), Some("node-a"), None, 91 * 24 * 3600),
            Code::InvalidArgument,
            "out of range",
        ),
        (
            "no token",
            request(good.clone(), None, None, 0),
            Code::Unauthenticated,
            "no authorization header",
        ),
    ];
    for (what, req, code, text) in cases {
        let err = client.create_certificate(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(text),
            "{what}: {:?} should contain {text:?}",
            err.message()
        );
    }

    let mut bad_token = request(good.clone(), None, None, 0);
    bad_token.metadata_mut().insert(
        "authorization",
        "Bearer not-a-real-token-at-all".parse().unwrap(),
    );
    let err = client.create_certificate(bad_token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("unknown bootstrap token"), "{err:?}");

    // Keys Istio's proxies use are accepted.
    for f in ["csr-rsa2048.pem", "csr-p384.pem"] {
        client
            .create_certificate(request(fixture(f), Some("node-a"), Some(&app), 0))
            .await
            .unwrap_or_else(|e| panic!("{f}: {e:?}"));
    }
    // A request below the minimum lifetime is raised to one hour.
    let resp = client
        .create_certificate(request(good, Some("node-a"), None, 60))
        .await
        .unwrap()
        .into_inner();
    let leaf = parse_pem_certs(&resp.cert_chain[0], "leaf").unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
    let v = x.validity();
    assert_eq!(
        v.not_after.timestamp() - v.not_before.timestamp(),
        3600 + 60
    );
}

#[tokio::test]
async fn keeps_serving_good_requests_during_and_after_a_burst_of_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::start(dir.path(), Arc::new(SystemClock)).await;
    let client = raw_client(&ca).await;
    let app = id("default", "app");
    let good = csr_with_sans(&[&app.to_string()]);
    let huge = "A".repeat(512 * 1024);

    let mut tasks = Vec::new();
    for i in 0..300usize {
        let mut c = client.clone();
        let csr = match i % 3 {
            0 => format!("garbage {i}"),
            1 => tamper_signature(&good),
            _ => huge.clone(),
        };
        tasks.push(tokio::spawn(async move {
            c.create_certificate(request(csr, Some("node-a"), None, 0))
                .await
                .is_err()
        }));
    }
    let mut goods = Vec::new();
    for _ in 0..20 {
        let c = ca.client("node-a");
        let app = app.clone();
        goods.push(tokio::spawn(async move {
            c.fetch_certificate(&app).await.map(|_| ())
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a bad request was accepted");
    }
    for g in goods {
        g.await.unwrap().expect("good request during the burst");
    }
    ca.client("node-a")
        .fetch_certificate(&app)
        .await
        .expect("good request after the burst");
}

#[tokio::test]
async fn root_is_created_once_with_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = CaSource::SelfSigned {
        dir: dir.path().join("ca"),
    };
    let first =
        CertificateAuthority::load(&source, TRUST_DOMAIN, None, Arc::new(SystemClock)).unwrap();
    let key = dir.path().join("ca/root-key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let root = parse_pem_certs(first.root_bundle_pem(), "root").unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&root[0]).unwrap();
    let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp())
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
    assert!(x.is_ca());

    let again =
        CertificateAuthority::load(&source, TRUST_DOMAIN, None, Arc::new(SystemClock)).unwrap();
    assert_eq!(first.root_bundle_pem(), again.root_bundle_pem());

    // Half of the pair present: refuse rather than overwrite.
    std::fs::remove_file(&key).unwrap();
    let err =
        CertificateAuthority::load(&source, TRUST_DOMAIN, None, Arc::new(SystemClock)).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
}

#[tokio::test]
async fn an_operator_intermediate_signs_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let root =
        Issuer::new_root("corp.example", now, Duration::from_secs(20 * 365 * 86400)).unwrap();
    let inter = root
        .new_intermediate(TRUST_DOMAIN, now, Duration::from_secs(5 * 365 * 86400))
        .unwrap();
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    std::fs::write(cacerts.join("ca-cert.pem"), inter.cert_pem()).unwrap();
    std::fs::write(cacerts.join("ca-key.pem"), inter.key_pem()).unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), root.cert_pem()).unwrap();
    std::fs::write(
        cacerts.join("cert-chain.pem"),
        format!("{}{}", inter.cert_pem(), root.cert_pem()),
    )
    .unwrap();

    let ca = TestCa::start_with(
        CaSource::Plugged {
            dir: cacerts.clone(),
        },
        Arc::new(SystemClock),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let app = id("default", "app");
    let cert = ca.client("node-a").fetch_certificate(&app).await.unwrap();
    assert_eq!(cert.chain().len(), 2, "leaf and the intermediate");
    assert_eq!(cert.chain()[1], *inter.cert_der());
    assert_eq!(cert.roots(), &[root.cert_der().clone()]);
    let roots = TrustRoots::new(vec![root.cert_der().clone()]).unwrap();
    verify_workload_chain(&roots, cert.chain(), SystemTime::now()).unwrap();

    // A key that does not belong to the certificate is refused at start-up.
    let stranger = Issuer::new_root(TRUST_DOMAIN, now, Duration::from_secs(86400)).unwrap();
    std::fs::write(cacerts.join("ca-key.pem"), stranger.key_pem()).unwrap();
    let err = CertificateAuthority::load(
        &CaSource::Plugged {
            dir: cacerts.clone(),
        },
        TRUST_DOMAIN,
        None,
        Arc::new(SystemClock),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("ca-key.pem") && err.to_string().contains("does not match"),
        "{err}"
    );

    // A chain that does not lead to the published root fails the self-test.
    std::fs::write(cacerts.join("ca-key.pem"), inter.key_pem()).unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), stranger.cert_pem()).unwrap();
    let err = CertificateAuthority::load(
        &CaSource::Plugged { dir: cacerts },
        TRUST_DOMAIN,
        None,
        Arc::new(SystemClock),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
}
