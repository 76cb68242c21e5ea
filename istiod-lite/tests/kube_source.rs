//! The Kubernetes source without a cluster: `kube` watchers against an HTTP
//! server that answers as the API server does (lists, then watch event
//! streams, including a 410 Gone that forces a relist). The model they build
//! must equal the one the folder source builds from the same objects.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use istiod_lite::config::folder::FolderSource;
use istiod_lite::config::kube::{WatchOptions, feed, watch_all, watch_all_with};
use istiod_lite::config::sources::State;
use istiod_lite::model::{Model, ModelConfig};
use istiod_lite::xds::Hub;
use serde_json::{Value, json};

fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn ns(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n")
}

fn pod(name: &str, ip: Option<&str>, node: &str) -> String {
    let status = match ip {
        Some(ip) => format!("{{podIP: {ip}, phase: Running}}"),
        None => "{phase: Pending}".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{app: web}}}}\nspec: {{nodeName: {node}, serviceAccountName: web, containers: [{{name: c, image: x}}]}}\nstatus: {status}\n"
    )
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n";
const POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules: [{from: [{source: {namespaces: [shop]}}]}]\n";

/// What the fake API server answers, per collection path.
#[derive(Default)]
struct Script {
    /// Successive list responses (the last repeats).
    lists: Vec<Vec<Value>>,
    /// Successive watch streams: the events of each (a stream then stays open).
    watches: Vec<Vec<Value>>,
    /// Answer every request with this status instead (404: the kind is not
    /// served, as for a CRD that is not installed; 403: RBAC refuses).
    fail: Option<u16>,
    /// Never answer (a silent network: no reset, no error); an open watch
    /// stays open and says nothing.
    hang: bool,
}

type Scripts = Arc<Mutex<HashMap<String, (Script, usize, usize)>>>;

fn list_body(path: &str, items: &[Value], rv: usize) -> Value {
    let kind = match path.rsplit('/').next().unwrap_or("") {
        "namespaces" => "NamespaceList",
        "pods" => "PodList",
        "services" => "ServiceList",
        "endpointslices" => "EndpointSliceList",
        "authorizationpolicies" => "AuthorizationPolicyList",
        "peerauthentications" => "PeerAuthenticationList",
        "destinationrules" => "DestinationRuleList",
        "trafficpolicies" => "TrafficPolicyList",
        "gateways" => "GatewayList",
        "httproutes" => "HTTPRouteList",
        "grpcroutes" => "GRPCRouteList",
        "referencegrants" => "ReferenceGrantList",
        _ => "List",
    };
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

/// What the API server answers for a resource it does not serve (a plain
/// text 404, as for a CRD that is not installed) or refuses (a 403 Status).
fn refusal(code: u16) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let (ctype, body) = if code == 404 {
        (
            "text/plain; charset=utf-8",
            "404 page not found\n".to_string(),
        )
    } else {
        (
            "application/json",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "forbidden: User \"system:serviceaccount:istio-system:istiod-lite\" cannot list resource",
                   "reason": "Forbidden", "code": code})
            .to_string(),
        )
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    resp.headers_mut()
        .insert("content-type", ctype.parse().unwrap());
    resp
}

async fn serve_api(scripts: Scripts) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let scripts = scripts.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let scripts = scripts.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let watch = req.uri().query().unwrap_or("").contains("watch=true");
                        let hang = scripts
                            .lock()
                            .unwrap()
                            .get(&path)
                            .is_some_and(|(s, _, _)| s.hang);
                        if hang {
                            return futures::future::pending().await;
                        }
                        let mut s = scripts.lock().unwrap();
                        let (script, lists, watches) = s.entry(path.clone()).or_default();
                        if let Some(code) = script.fail {
                            if !watch {
                                *lists += 1;
                            }
                            return Ok::<_, Infallible>(refusal(code));
                        }
                        let body: BoxBody<Bytes, Infallible> = if !watch {
                            let i = (*lists).min(script.lists.len().saturating_sub(1));
                            *lists += 1;
                            let items = script.lists.get(i).cloned().unwrap_or_default();
                            let text = list_body(&path, &items, 10 * (*lists)).to_string();
                            http_body_util::Full::new(Bytes::from(text)).boxed()
                        } else {
                            let events = script.watches.get(*watches).cloned().unwrap_or_default();
                            *watches += 1;
                            let frames = events
                                .into_iter()
                                .map(|e| Ok(Frame::data(Bytes::from(format!("{e}\n")))));
                            // Open until the resource stops being served
                            // (as the API server ends watches of a deleted CRD).
                            let (watched, p) = (scripts.clone(), path.clone());
                            let open = futures::stream::unfold((), move |()| {
                                let (watched, p) = (watched.clone(), p.clone());
                                async move {
                                    loop {
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                        let s = watched.lock().unwrap();
                                        if s.get(&p).is_some_and(|(s, _, _)| s.fail.is_some()) {
                                            return None::<(Result<Frame<Bytes>, Infallible>, ())>;
                                        }
                                    }
                                }
                            });
                            let stream = futures::stream::iter(frames).chain(open);
                            BodyExt::boxed(StreamBody::new(stream))
                        };
                        let mut resp = hyper::Response::new(body);
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

use futures::StreamExt;

fn item(yaml: &str) -> Value {
    yaml_docs(yaml).remove(0)
}

/// A watch event, as the API server sends it: every object carries the
/// resourceVersion it was written at.
fn event(kind: &str, yaml: &str, rv: u32) -> Value {
    let mut o = item(yaml);
    o["metadata"]["resourceVersion"] = json!(rv.to_string());
    json!({"type": kind, "object": o})
}

#[tokio::test]
async fn the_kube_source_builds_the_same_model_as_the_folder_source() {
    mesh_core::tls::install_default_provider();
    let mut scripts: HashMap<String, (Script, usize, usize)> = HashMap::new();
    let mut set = |path: &str, lists: Vec<Vec<Value>>, watches: Vec<Vec<Value>>| {
        scripts.insert(
            path.to_string(),
            (
                Script {
                    lists,
                    watches,
                    fail: None,
                    hang: false,
                },
                0,
                0,
            ),
        );
    };
    set(
        "/api/v1/namespaces",
        vec![vec![item(&ns("shop", true)), item(&ns("plain", false))]],
        vec![],
    );
    set("/api/v1/services", vec![vec![item(SVC)]], vec![]);
    set(
        "/apis/security.istio.io/v1/authorizationpolicies",
        vec![],
        vec![vec![event("ADDED", POLICY, 11)]],
    );
    // Pods: the first list is stale; the watch answers 410 Gone, forcing a
    // relist that shows the current state; then events continue.
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version: 10 (42)", "reason": "Expired", "code": 410}});
    set(
        "/api/v1/pods",
        vec![
            vec![
                item(&pod("web-1", None, "node-a")),
                item(&pod("db-1", Some("10.0.1.9"), "node-b")),
            ],
            vec![
                item(&pod("web-1", Some("10.0.1.5"), "node-a")),
                item(&pod("db-1", Some("10.0.1.9"), "node-b")),
                item(&pod("web-2", Some("10.0.1.6"), "node-b")),
            ],
        ],
        vec![
            vec![gone],
            vec![
                event("ADDED", &pod("late-1", Some("10.0.1.7"), "node-a"), 43),
                event("DELETED", &pod("db-1", Some("10.0.1.9"), "node-b"), 44),
            ],
        ],
    );
    let addr = serve_api(Arc::new(Mutex::new(scripts))).await;

    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let hub = Hub::new(Model::new(ModelConfig::default()));
    tokio::spawn(feed(
        hub.clone(),
        watch_all(config, hub.sources().clone()).unwrap(),
        Duration::from_millis(50),
    ));

    // The same objects, as a user would write them in a folder.
    let dir = tempfile::tempdir().unwrap();
    let all = [
        ns("shop", true),
        ns("plain", false),
        SVC.to_string(),
        POLICY.to_string(),
        pod("web-1", Some("10.0.1.5"), "node-a"),
        pod("web-2", Some("10.0.1.6"), "node-b"),
        pod("late-1", Some("10.0.1.7"), "node-a"),
    ]
    .join("---\n");
    std::fs::write(dir.path().join("all.yaml"), all).unwrap();
    let mut folder = FolderSource::new(dir.path());
    let mut expected = Model::new(ModelConfig::default());
    expected.apply(folder.scan());
    assert!(folder.issues().is_empty(), "{:?}", folder.issues());
    let want = expected.dump();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if !hub.is_ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hub never became ready"
            );
            continue;
        }
        let got = hub.model().dump();
        if got == want {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the kube-fed model never matched the folder model\nkube:   {}\nfolder: {}",
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(&want).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And it is what we meant: the stale pod state was replaced by the relist.
    let workloads = want["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 3, "{want}");
}

const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";
const HTTPROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const PEER_AUTHS: &str = "/apis/security.istio.io/v1/peerauthentications";
const WAYPOINT: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n";

fn failing(code: u16) -> (Script, usize, usize) {
    (
        Script {
            fail: Some(code),
            ..Script::default()
        },
        0,
        0,
    )
}

async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kinds whose CRDs are not installed (the API server answers 404) do not
/// hold the mesh back: the rest is listed and served, and a kind is picked
/// up once its CRD appears.
#[tokio::test]
async fn a_kind_that_is_not_served_is_reported_and_the_rest_is_served() {
    mesh_core::tls::install_default_provider();
    let mut scripts: HashMap<String, (Script, usize, usize)> = HashMap::new();
    scripts.insert(
        "/api/v1/namespaces".into(),
        (
            Script {
                lists: vec![vec![item(&ns("shop", true))]],
                ..Script::default()
            },
            0,
            0,
        ),
    );
    scripts.insert(
        "/api/v1/pods".into(),
        (
            Script {
                lists: vec![vec![item(&pod("web-1", Some("10.0.1.5"), "node-a"))]],
                ..Script::default()
            },
            0,
            0,
        ),
    );
    for path in [GATEWAYS, HTTPROUTES, PEER_AUTHS] {
        scripts.insert(path.into(), failing(404));
    }
    let scripts = Arc::new(Mutex::new(scripts));
    let addr = serve_api(scripts.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let hub = Hub::new(Model::new(ModelConfig::default()));
    tokio::spawn(feed(
        hub.clone(),
        watch_all(config, hub.sources().clone()).unwrap(),
        Duration::from_millis(20),
    ));

    eventually(
        "ready without Gateway, HTTPRoute, PeerAuthentication",
        10,
        || hub.is_ready(),
    )
    .await;
    let workloads = hub.model().dump()["workloads"].as_array().unwrap().len();
    assert_eq!(workloads, 1);
    let sources = hub.sources().snapshot();
    for kind in ["Gateway", "HTTPRoute", "PeerAuthentication"] {
        assert_eq!(sources[kind].state, State::Missing, "{kind}: {sources:?}");
        assert!(sources[kind].fix.is_some(), "{kind}");
    }
    assert_eq!(sources["Pod"].state, State::Listed);
    let not_listed = hub.sources().not_listed();
    assert_eq!(not_listed.len(), 3, "{not_listed:?}");

    // The Gateway CRD is installed: the kind is picked up, with its objects.
    {
        let mut s = scripts.lock().unwrap();
        s.insert(
            GATEWAYS.into(),
            (
                Script {
                    lists: vec![vec![item(WAYPOINT)]],
                    ..Script::default()
                },
                0,
                0,
            ),
        );
    }
    eventually("the Gateway kind picked up when it appears", 10, || {
        hub.sources().get("Gateway").map(|k| k.state) == Some(State::Listed)
    })
    .await;
    eventually("the waypoint Gateway in the model", 5, || {
        hub.model().cluster_view().waypoints.len() == 1
    })
    .await;

    // And removed again (the API server deletes a CRD's objects with it):
    // the kind's objects go, the rest stays served.
    scripts
        .lock()
        .unwrap()
        .insert(GATEWAYS.into(), failing(404));
    // The open watch ends as the API server drops the resource.
    eventually("the Gateway kind reported missing again", 20, || {
        hub.sources().get("Gateway").map(|k| k.state) == Some(State::Missing)
    })
    .await;
    eventually("the waypoint Gateway gone from the model", 5, || {
        hub.model().cluster_view().waypoints.is_empty()
    })
    .await;
    assert!(hub.is_ready());
}

/// A policy kind that RBAC refuses is never served as "no policies": the
/// mesh waits for it (fail closed), and says why. Another kind refused is
/// served without.
#[tokio::test]
async fn a_policy_kind_that_cannot_be_read_holds_the_mesh_back() {
    mesh_core::tls::install_default_provider();
    let mut scripts: HashMap<String, (Script, usize, usize)> = HashMap::new();
    scripts.insert(
        "/apis/security.istio.io/v1/authorizationpolicies".into(),
        failing(403),
    );
    scripts.insert("/api/v1/secrets".into(), failing(403));
    let scripts = Arc::new(Mutex::new(scripts));
    let addr = serve_api(scripts.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let hub = Hub::new(Model::new(ModelConfig::default()));
    tokio::spawn(feed(
        hub.clone(),
        watch_all(config, hub.sources().clone()).unwrap(),
        Duration::from_millis(20),
    ));
    eventually("both kinds refused", 10, || {
        let s = hub.sources().snapshot();
        s["AuthorizationPolicy"].state == State::Forbidden && s["Secret"].state == State::Forbidden
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!hub.is_ready(), "served without its policies");
    let waiting = hub.sources().unsettled();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0].starts_with("AuthorizationPolicy: forbidden"),
        "{waiting:?}"
    );
}

/// An API server that fails (503) is reported, and asked with a growing
/// backoff, not in a tight loop; once it answers again the kind is listed
/// within the longest wait (2 s).
#[tokio::test]
async fn a_failing_api_server_is_retried_with_backoff_and_reported() {
    mesh_core::tls::install_default_provider();
    let mut scripts: HashMap<String, (Script, usize, usize)> = HashMap::new();
    scripts.insert("/api/v1/pods".into(), failing(503));
    let scripts = Arc::new(Mutex::new(scripts));
    let addr = serve_api(scripts.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let hub = Hub::new(Model::new(ModelConfig::default()));
    tokio::spawn(feed(
        hub.clone(),
        watch_all(config, hub.sources().clone()).unwrap(),
        Duration::from_millis(20),
    ));
    eventually("Pod reported failing", 5, || {
        hub.sources().get("Pod").map(|k| k.state) == Some(State::Failing)
    })
    .await;
    assert!(!hub.is_ready());
    let asked = |s: &Scripts| s.lock().unwrap()["/api/v1/pods"].1;
    let before = asked(&scripts);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = asked(&scripts) - before;
    // 0.2 + 0.4 + 0.8 + 1.6 + 2 + 2 ...: about 4 requests in 4 s.
    assert!(during <= 6, "{during} lists in 4 s");
    // Back: listed within the longest wait.
    scripts.lock().unwrap().insert(
        "/api/v1/pods".into(),
        (
            Script {
                lists: vec![vec![item(&pod("web-1", Some("10.0.1.5"), "node-a"))]],
                ..Script::default()
            },
            0,
            0,
        ),
    );
    let back = tokio::time::Instant::now();
    eventually("ready once the API server answers", 5, || hub.is_ready()).await;
    assert!(
        back.elapsed() < Duration::from_millis(2500),
        "{:?}",
        back.elapsed()
    );
}

const REFGRANTS: &str = "/apis/gateway.networking.k8s.io/v1/referencegrants";
const GRANT_KEY: &str = "shop/web.shop.svc.cluster.local";
const GRANT_OBJECTS: [(&str, &str); 5] = [
    (
        "/api/v1/namespaces",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team, labels: {istio.io/dataplane-mode: ambient}}\n",
    ),
    (
        "/api/v1/services",
        "apiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: shop}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 15008}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: team}\nspec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}\n",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio-waypoint}\nspec: {controllerName: mesh.dev/istiod-lite}\n",
    ),
    (GATEWAYS, WAYPOINT),
    (
        HTTPROUTES,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules: [{backendRefs: [{name: api, namespace: team, port: 80}]}]\n",
    ),
];
const KUBE_GRANT: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: from-shop, namespace: team}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]\n  to: [{group: \"\", kind: Service}]\n";

fn listing(yaml: &str) -> (Script, usize, usize) {
    (
        Script {
            lists: vec![yaml_docs(yaml)],
            ..Script::default()
        },
        0,
        0,
    )
}

/// The backends of web's waypoint routes, as pushed (not those marked
/// invalid: refused, their share answered 500).
fn web_backends(hub: &Hub) -> Vec<String> {
    use mesh_proto::mesh::waypoint::ServiceRoutes;
    use prost::Message;
    let model = hub.model();
    let Some(r) = model
        .resources(mesh_proto::SERVICE_ROUTES_TYPE_URL)
        .and_then(|m| m.get(GRANT_KEY))
    else {
        return Vec::new();
    };
    let routes = ServiceRoutes::decode(r.value()).expect("decodes");
    routes
        .routes
        .iter()
        .flat_map(|r| r.backends.iter().filter(|b| !b.invalid))
        .map(|b| b.service.clone())
        .collect()
}

/// The cross-namespace backend of web's route, as pushed.
const API_BACKEND: &str = "team/api.team.svc.cluster.local";

/// How many backends of web's waypoint routes are marked invalid
/// (refused: no service, their share answered 500).
fn web_refused(hub: &Hub) -> usize {
    use mesh_proto::mesh::waypoint::ServiceRoutes;
    use prost::Message;
    let model = hub.model();
    let Some(r) = model
        .resources(mesh_proto::SERVICE_ROUTES_TYPE_URL)
        .and_then(|m| m.get(GRANT_KEY))
    else {
        return 0;
    };
    let routes = ServiceRoutes::decode(r.value()).expect("decodes");
    routes
        .routes
        .iter()
        .flat_map(|r| r.backends.iter().filter(|b| b.invalid))
        .count()
}

/// A route in `shop` whose backend in `team` a grant there permits, read
/// from the (fake) API server; the grant watch then answers `code` from
/// now on. Returns the hub and the time the grant went.
async fn grant_then_watch_answers(code: u16, grace: Duration) -> (Arc<Hub>, tokio::time::Instant) {
    grant_then(failing(code), grace).await
}

/// [`grant_then_watch_answers`], the grant watch then following `script`.
async fn grant_then(
    script: (Script, usize, usize),
    grace: Duration,
) -> (Arc<Hub>, tokio::time::Instant) {
    mesh_core::tls::install_default_provider();
    let mut scripts: HashMap<String, (Script, usize, usize)> = HashMap::new();
    for (path, yaml) in GRANT_OBJECTS {
        scripts.insert(path.into(), listing(yaml));
    }
    scripts.insert(REFGRANTS.into(), listing(KUBE_GRANT));
    let scripts = Arc::new(Mutex::new(scripts));
    let addr = serve_api(scripts.clone()).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let hub = Hub::new(Model::new(ModelConfig::default()));
    let options = WatchOptions {
        widening_grace: grace,
    };
    tokio::spawn(feed(
        hub.clone(),
        watch_all_with(config, hub.sources().clone(), options).unwrap(),
        Duration::from_millis(20),
    ));
    eventually("the granted backend in web's routes", 10, || {
        web_backends(&hub) == [API_BACKEND]
    })
    .await;
    // From now on the grant watch follows `script`.
    scripts.lock().unwrap().insert(REFGRANTS.into(), script);
    (hub, tokio::time::Instant::now())
}

/// RBAC no longer lets the controller read grants: a grant revoked
/// meanwhile must not stay in force, so every known grant is dropped at
/// once, and the kind is reported.
#[tokio::test]
async fn a_forbidden_reference_grant_watch_drops_every_known_grant() {
    let (hub, _) = grant_then_watch_answers(403, Duration::from_secs(60)).await;
    eventually("the grant dropped once grants are forbidden", 10, || {
        web_backends(&hub).is_empty() && web_refused(&hub) == 1
    })
    .await;
    let s = hub.sources().get("ReferenceGrant").expect("registered");
    assert_eq!(s.state, State::Forbidden);
    assert!(
        s.detail
            .as_deref()
            .is_some_and(|d| d.contains("grants dropped")),
        "{s:?}"
    );
}

/// The CRD is gone (404): no grant exists.
#[tokio::test]
async fn a_reference_grant_kind_no_longer_served_drops_every_known_grant() {
    let (hub, _) = grant_then_watch_answers(404, Duration::from_secs(60)).await;
    eventually("the grant dropped once grants are not served", 20, || {
        web_backends(&hub).is_empty() && web_refused(&hub) == 1
    })
    .await;
    assert_eq!(
        hub.sources().get("ReferenceGrant").map(|s| s.state),
        Some(State::Missing)
    );
}

/// A grant watch that keeps failing: the grants stay for the grace, then
/// go (a revocation the controller cannot see must not last).
#[tokio::test]
async fn a_failing_reference_grant_watch_drops_every_known_grant_after_the_grace() {
    let grace = Duration::from_secs(3);
    let (hub, since) = grant_then_watch_answers(503, grace).await;
    eventually("grants reported failing", 10, || {
        hub.sources().get("ReferenceGrant").map(|s| s.state) == Some(State::Failing)
    })
    .await;
    assert!(
        !web_backends(&hub).is_empty() || since.elapsed() >= grace,
        "dropped before the grace"
    );
    eventually("the grant dropped after the grace", 10, || {
        web_backends(&hub).is_empty() && web_refused(&hub) == 1
    })
    .await;
    assert!(since.elapsed() >= grace, "{:?}", since.elapsed());
    let s = hub.sources().get("ReferenceGrant").expect("registered");
    assert!(
        s.detail
            .as_deref()
            .is_some_and(|d| d.contains("grants dropped")),
        "{s:?}"
    );
}

/// The network to the API server goes silent (no reset, no error): the
/// open grant watch says nothing and every new request hangs. A grant
/// revoked meanwhile must not last minutes: the grants are dropped within
/// the read timeout (shorter than the grace) plus the grace.
#[tokio::test]
async fn a_silent_reference_grant_watch_drops_every_known_grant_within_the_grace() {
    let grace = Duration::from_secs(3);
    let hang = Script {
        hang: true,
        ..Script::default()
    };
    let (hub, since) = grant_then((hang, 0, 0), grace).await;
    eventually("the grant dropped on a silent network", 12, || {
        web_backends(&hub).is_empty() && web_refused(&hub) == 1
    })
    .await;
    assert!(since.elapsed() >= grace, "{:?}", since.elapsed());
}
