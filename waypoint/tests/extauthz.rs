//! CUSTOM policies against a real external authorization server (the
//! gRPC Check API served by tonic on a local port): what the provider is
//! sent, how its answers are applied, and what happens when it cannot be
//! asked.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderMap, StatusCode};
use mesh_core::identity::Identity;
use mesh_proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, QueryParameter, address, socket_address,
};
use mesh_proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use mesh_proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use mesh_proto::envoy::r#type::v3::HttpStatus;
use mesh_proto::google::rpc::Status;
use mesh_proto::mesh::waypoint as pb;
use prometheus_client::metrics::family::Family;
use tokio_stream::StreamExt;
use waypoint::authz::Policy;
use waypoint::extauthz::{CheckLabels, ExtAuthz, ExtAuthzMetrics, Subject, Verdict};
use waypoint::telemetry::Flag;

#[derive(Clone, Copy)]
enum Mode {
    /// OK with edits: sets x-user, removes authorization, adds a response
    /// header, sets and removes query parameters, and x-env: test.
    Allow,
    /// PERMISSION_DENIED with a 401, a header and a body.
    Deny,
    /// PERMISSION_DENIED and nothing else.
    DenyBare,
    /// Answers after 2 s.
    Slow,
}

struct Server {
    mode: Mode,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<CheckRequest>>>,
}

fn hvo(key: &str, value: &str, append: Option<bool>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Server {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut s) = self.seen.lock() {
            s.push(request.into_inner());
        }
        let denied = |d: Option<DeniedHttpResponse>| CheckResponse {
            status: Some(Status {
                code: 7,
                ..Default::default()
            }),
            http_response: d.map(check_response::HttpResponse::DeniedResponse),
        };
        let resp = match self.mode {
            Mode::Allow => CheckResponse {
                status: Some(Status::default()),
                http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![
                        hvo("x-user", "alice", None),
                        hvo("x-env", "test", Some(true)),
                    ],
                    headers_to_remove: vec!["authorization".into()],
                    response_headers_to_add: vec![hvo("x-checked", "yes", None)],
                    query_parameters_to_set: vec![QueryParameter {
                        key: "checked".into(),
                        value: "1".into(),
                    }],
                    query_parameters_to_remove: vec!["token".into()],
                })),
            },
            Mode::Deny => denied(Some(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                headers: vec![hvo("x-denied-by", "test-server", None)],
                body: "not you\n".into(),
            })),
            Mode::DenyBare => denied(None),
            Mode::Slow => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                CheckResponse::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

struct Running {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<CheckRequest>>>,
}

async fn serve(mode: Mode) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("address");
    let calls = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = Server {
        mode,
        calls: calls.clone(),
        seen: seen.clone(),
    };
    let counted = connections.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
        counted.fetch_add(1, Ordering::SeqCst);
        s
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(server))
            .serve_with_incoming(incoming),
    );
    Running {
        addr,
        calls,
        connections,
        seen,
    }
}

fn provider(
    addr: &str,
    timeout_ms: u32,
    fail_open: bool,
    status_on_error: u32,
) -> pb::ExtAuthzProvider {
    pb::ExtAuthzProvider {
        name: "authz".into(),
        address: addr.into(),
        timeout_ms,
        fail_open,
        status_on_error,
    }
}

fn admin_rule() -> Vec<pb::PolicyRule> {
    vec![pb::PolicyRule {
        to: vec![pb::PolicyOperation {
            paths: vec!["/admin*".into()],
            ..Default::default()
        }],
        ..Default::default()
    }]
}

fn custom(p: pb::ExtAuthzProvider) -> Policy {
    Policy::compile(&pb::Policy {
        name: "shop/ext".into(),
        action: pb::PolicyAction::Custom as i32,
        rules: admin_rule(),
        provider: Some(p),
        dry_run: false,
    })
    .expect("compiles")
}

fn plain(name: &str, action: pb::PolicyAction, rule: pb::PolicyRule) -> Policy {
    Policy::compile(&pb::Policy {
        name: name.into(),
        action: action as i32,
        rules: vec![rule],
        provider: None,
        dry_run: false,
    })
    .expect("compiles")
}

fn parts(uri: &str) -> Parts {
    http::Request::builder()
        .method("GET")
        .uri(uri)
        .header("authorization", "Bearer s3cret")
        .header("x-ext-authz", "allow")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

struct Ids {
    client: Identity,
    waypoint: Identity,
}

fn ids() -> Ids {
    Ids {
        client: Identity::from_str("spiffe://cluster.local/ns/shop/sa/client").expect("id"),
        waypoint: Identity::from_str("spiffe://cluster.local/ns/shop/sa/waypoint").expect("id"),
    }
}

fn subject(ids: &Ids) -> Subject<'_> {
    Subject {
        source: Some(&ids.client),
        source_addr: "10.1.0.5:40000".parse().expect("addr"),
        source_addrs: &[],
        destination_addr: "10.96.0.3:80".parse().expect("addr"),
        waypoint: &ids.waypoint,
        host: "reviews.shop.svc.cluster.local",
    }
}

fn ext_authz() -> (
    ExtAuthz,
    Family<CheckLabels, prometheus_client::metrics::counter::Counter>,
) {
    let m = ExtAuthzMetrics {
        checks: Family::default(),
    };
    let checks = m.checks.clone();
    (ExtAuthz::new(m), checks)
}

fn count(
    f: &Family<CheckLabels, prometheus_client::metrics::counter::Counter>,
    result: &'static str,
) -> u64 {
    f.get_or_create(&CheckLabels {
        provider: "authz".into(),
        result,
    })
    .get()
}

#[tokio::test]
async fn an_ok_answer_edits_the_request_and_response_and_the_provider_sees_the_request() {
    let s = serve(Mode::Allow).await;
    let (ext, checks) = ext_authz();
    let ids = ids();
    let policies = [custom(provider(&s.addr.to_string(), 5_000, false, 0))];
    let mut p = parts("/admin/users?token=t&x=1");
    let v = ext.authorize_http(&policies, &subject(&ids), &mut p).await;
    let Verdict::Allowed(edits) = v else {
        panic!("not allowed: {v:?}");
    };
    assert_eq!(p.headers["x-user"], "alice");
    assert!(!p.headers.contains_key("authorization"));
    assert_eq!(p.uri.to_string(), "/admin/users?x=1&checked=1");
    let mut resp = HeaderMap::new();
    edits.apply(&mut resp);
    assert_eq!(resp["x-checked"], "yes");
    assert_eq!(count(&checks, "allowed"), 1);

    let seen = s.seen.lock().expect("lock")[0].clone();
    let a = seen.attributes.expect("attributes");
    let src = a.source.expect("source");
    assert_eq!(src.principal, "spiffe://cluster.local/ns/shop/sa/client");
    let Some(address::Address::SocketAddress(sa)) = src.address.and_then(|x| x.address) else {
        panic!("no source address");
    };
    assert_eq!(sa.address, "10.1.0.5");
    assert_eq!(
        sa.port_specifier,
        Some(socket_address::PortSpecifier::PortValue(40000))
    );
    assert_eq!(
        a.destination.expect("destination").principal,
        "spiffe://cluster.local/ns/shop/sa/waypoint"
    );
    let h = a.request.and_then(|r| r.http).expect("http");
    assert_eq!(
        (h.method.as_str(), h.path.as_str(), h.host.as_str()),
        (
            "GET",
            "/admin/users?token=t&x=1",
            "reviews.shop.svc.cluster.local"
        )
    );
    assert_eq!(
        (h.scheme.as_str(), h.protocol.as_str(), h.size),
        ("http", "HTTP/1.1", -1)
    );
    assert_eq!(h.headers["x-ext-authz"], "allow");
    assert_eq!(h.headers[":path"], "/admin/users?token=t&x=1");
    // The request id is made before the check, and kept for the backend.
    assert_eq!(h.id.len(), 32);
    assert_eq!(p.headers["x-request-id"], h.id.as_str());
}

#[tokio::test]
async fn a_denial_is_answered_as_the_provider_says() {
    let s = serve(Mode::Deny).await;
    let (ext, checks) = ext_authz();
    let ids = ids();
    let policies = [custom(provider(&s.addr.to_string(), 5_000, true, 0))];
    let mut p = parts("/admin");
    let Verdict::Denied(d) = ext.authorize_http(&policies, &subject(&ids), &mut p).await else {
        panic!("allowed");
    };
    // failOpen is about failures, not denials.
    assert_eq!(d.status, StatusCode::UNAUTHORIZED);
    assert_eq!(d.headers["x-denied-by"], "test-server");
    assert_eq!(&d.body[..], b"not you\n");
    assert_eq!(d.flag, Flag::UAEX);
    assert_eq!(count(&checks, "denied"), 1);

    let bare = serve(Mode::DenyBare).await;
    let policies = [custom(provider(&bare.addr.to_string(), 5_000, false, 0))];
    let Verdict::Denied(d) = ext.authorize_http(&policies, &subject(&ids), &mut p).await else {
        panic!("allowed");
    };
    assert_eq!(d.status, StatusCode::FORBIDDEN);
    assert!(d.body.is_empty());
}

#[tokio::test]
async fn a_provider_that_cannot_be_asked_denies_unless_it_fails_open() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        l.local_addr().expect("address").to_string()
    };
    let (ext, checks) = ext_authz();
    let ids = ids();
    let mut p = parts("/admin");
    for (status_on_error, want) in [
        (0, StatusCode::FORBIDDEN),
        (503, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let policies = [custom(provider(&closed, 5_000, false, status_on_error))];
        match ext.authorize_http(&policies, &subject(&ids), &mut p).await {
            Verdict::Denied(d) => {
                assert_eq!(d.status, want);
                assert_eq!(d.flag, Flag::UAEX);
                assert!(d.detail.contains("failed"), "{}", d.detail);
            }
            v => panic!("not denied: {v:?}"),
        }
    }
    assert_eq!(count(&checks, "error_denied"), 2);
    let open = [custom(provider(&closed, 5_000, true, 0))];
    assert!(matches!(
        ext.authorize_http(&open, &subject(&ids), &mut p).await,
        Verdict::Allowed(_)
    ));
    assert_eq!(count(&checks, "error_allowed"), 1);

    // No answer within the timeout is a failure too.
    let slow = serve(Mode::Slow).await;
    let policies = [custom(provider(&slow.addr.to_string(), 200, false, 0))];
    let started = Instant::now();
    assert!(matches!(
        ext.authorize_http(&policies, &subject(&ids), &mut p).await,
        Verdict::Denied(_)
    ));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn custom_comes_first_then_deny_then_allow_over_one_channel() {
    let s = serve(Mode::Allow).await;
    let (ext, _) = ext_authz();
    let ids = ids();
    // The provider adds x-env: test; a DENY policy refuses that header.
    let deny_test = plain(
        "shop/no-test",
        pb::PolicyAction::Deny,
        pb::PolicyRule {
            when: vec![pb::PolicyCondition {
                key: "request.headers[x-env]".into(),
                values: vec!["test".into()],
                not_values: vec![],
            }],
            ..Default::default()
        },
    );
    let policies = [
        custom(provider(&s.addr.to_string(), 5_000, false, 0)),
        deny_test,
        plain(
            "shop/all",
            pb::PolicyAction::Allow,
            pb::PolicyRule::default(),
        ),
    ];
    for _ in 0..3 {
        let mut p = parts("/admin");
        match ext.authorize_http(&policies, &subject(&ids), &mut p).await {
            Verdict::Denied(d) => {
                assert_eq!(d.flag, Flag::RBAC);
                assert_eq!(d.detail, "denied: DENY policy shop/no-test");
            }
            v => panic!("not denied: {v:?}"),
        }
    }
    assert_eq!(s.calls.load(Ordering::SeqCst), 3);
    // A request the CUSTOM rules do not match: the provider is not asked.
    let mut p = parts("/orders");
    assert!(matches!(
        ext.authorize_http(&policies, &subject(&ids), &mut p).await,
        Verdict::Allowed(_)
    ));
    assert_eq!(s.calls.load(Ordering::SeqCst), 3);
    assert!(!p.headers.contains_key("x-user"));
    // Every check went over one connection.
    assert_eq!(s.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn opaque_tcp_is_checked_without_http_attributes() {
    let allow = serve(Mode::Allow).await;
    let deny = serve(Mode::Deny).await;
    let (ext, _) = ext_authz();
    let ids = ids();
    let policies = [custom(provider(&allow.addr.to_string(), 5_000, false, 0))];
    assert!(ext.authorize_tcp(&policies, &subject(&ids)).await.is_ok());
    let seen = allow.seen.lock().expect("lock")[0].clone();
    let req = seen.attributes.and_then(|a| a.request).expect("request");
    assert!(req.http.is_none());
    let policies = [custom(provider(&deny.addr.to_string(), 5_000, false, 0))];
    let err = ext
        .authorize_tcp(&policies, &subject(&ids))
        .await
        .expect_err("denied")
        .detail;
    assert!(err.contains("denied"), "{err}");
}

/// A peer whose address names no workload (link-local, unspecified,
/// multicast) is refused before any CUSTOM provider is asked: the
/// provider never sees a request that must be refused anyway. Failed
/// first: the provider was asked (one call), then the request refused.
#[tokio::test]
async fn an_unattributable_peer_is_refused_before_any_provider_is_asked() {
    let s = serve(Mode::Allow).await;
    let (ext, checks) = ext_authz();
    let ids = ids();
    let policies = [custom(provider(&s.addr.to_string(), 5_000, false, 0))];
    for addr in ["[fe80::1]:40000", "169.254.1.1:40000", "0.0.0.0:40000"] {
        let mut sub = subject(&ids);
        sub.source_addr = addr.parse().expect("addr");
        let mut p = parts("/admin/users");
        let v = ext.authorize_http(&policies, &sub, &mut p).await;
        let Verdict::Denied(d) = v else {
            panic!("{addr}: not refused: {v:?}");
        };
        assert!(d.detail.contains("not a routable address"), "{}", d.detail);
        let err = ext
            .authorize_tcp(&policies, &sub)
            .await
            .expect_err("refused");
        assert!(
            err.detail.contains("not a routable address"),
            "{}",
            err.detail
        );
        assert_eq!(s.calls.load(Ordering::SeqCst), 0, "{addr}: provider asked");
    }
    assert_eq!(count(&checks, "allowed"), 0);
    // An attributable peer still reaches the provider.
    let mut p = parts("/admin/users");
    let v = ext.authorize_http(&policies, &subject(&ids), &mut p).await;
    assert!(matches!(v, Verdict::Allowed(_)), "{v:?}");
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
}
