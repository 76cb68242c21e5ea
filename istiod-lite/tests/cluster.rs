//! Cluster mode without a cluster: the CA Secret, the Lease, TokenReview and
//! the leader's writes against an HTTP server that answers as the API server
//! does (objects with resourceVersions; 404 NotFound, 409 AlreadyExists and
//! 409 Conflict as Status objects; server-side apply; label selectors), with
//! faults injected where a test needs the API server to refuse.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use istiod_lite::cluster::ca_secret::load_or_create;
use istiod_lite::cluster::lease::{Elector, LeaseConfig};
use istiod_lite::cluster::tokenreview::{ReviewConfig, TokenReviewer};
use istiod_lite::cluster::writer::{Writer, WriterConfig};
use istiod_lite::config::objects::{Change, Object};
use istiod_lite::model::{Model, ModelConfig};
use istiod_lite::xds::Hub;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which listener (replica) it came through.
    via: &'static str,
    method: String,
    path: String,
    query: String,
    content_type: String,
    status: u16,
}

/// A refusal to inject: requests matching `method` and `path_contains` (and,
/// when set, whose body contains `body_contains`) get `status`, `times`
/// times (None: always). Status 0: no answer at all.
#[derive(Debug, Clone)]
struct Fault {
    method: &'static str,
    path_contains: String,
    body_contains: Option<String>,
    status: u16,
    times: Option<usize>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    rv: u64,
    log: Vec<Seen>,
    faults: Vec<Fault>,
    /// token (or the payload segment of [`sa_jwt`]'s) -> TokenReview status
    reviews: BTreeMap<String, Value>,
    /// TokenReviews asked for.
    review_calls: usize,
}

type Shared = Arc<Mutex<State>>;

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME[/status]]` or the same under
/// `/apis/GROUP/VERSION`: (prefix, namespace, plural, name, status).
fn parse(path: &str) -> (String, Option<String>, String, Option<String>, bool) {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, rest) = if segs.first() == Some(&"api") {
        (format!("/{}/{}", segs[0], segs[1]), &segs[2..])
    } else {
        (format!("/{}/{}/{}", segs[0], segs[1], segs[2]), &segs[3..])
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    (
        prefix,
        ns,
        rest[0].to_string(),
        rest.get(1).map(|s| s.to_string()),
        rest.get(2) == Some(&"status"),
    )
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn selects(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k] == json!(v),
            None => !labels[term].is_null(),
        })
}

fn handle(st: &mut State, method: &str, path: &str, query: &str, body: &Value) -> (u16, Value) {
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        st.review_calls += 1;
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        let status = st
            .reviews
            .get(token)
            .or_else(|| token.split('.').nth(1).and_then(|k| st.reviews.get(k)))
            .cloned()
            .unwrap_or(json!({"authenticated": false, "error": "invalid bearer token"}));
        let mut out = body.clone();
        out["status"] = status;
        return (201, out);
    }
    let (prefix, ns, plural, name, status) = parse(path);
    let coll = match &ns {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    };
    st.rv += 1;
    let rv = st.rv.to_string();
    match (method, name) {
        ("GET", None) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|s| {
                    s.replace("%3D", "=")
                        .replace("%2C", ",")
                        .replace("%2F", "/")
                })
                .unwrap_or_default();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| {
                    let (p, kns, kplural, _, _) = parse(k);
                    p == prefix && kplural == plural && (ns.is_none() || kns == ns)
                })
                .map(|(_, v)| v.clone())
                .filter(|v| selects(&selector, &v["metadata"]["labels"]))
                .collect();
            (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        ("GET", Some(name)) => match st.objects.get(&format!("{coll}/{name}")) {
            Some(o) => (200, o.clone()),
            None => (
                404,
                status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
            ),
        },
        ("POST", None) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = format!("{coll}/{name}");
            if st.objects.contains_key(&key) {
                return (
                    409,
                    status_body(
                        409,
                        "AlreadyExists",
                        &format!("{plural} \"{name}\" already exists"),
                    ),
                );
            }
            let mut o = body.clone();
            o["metadata"]["resourceVersion"] = json!(rv);
            o["metadata"]["uid"] = json!(format!("uid-{name}-{rv}"));
            if let Some(ns) = &ns {
                o["metadata"]["namespace"] = json!(ns);
            }
            st.objects.insert(key, o.clone());
            (201, o)
        }
        ("PUT", Some(name)) => {
            let key = format!("{coll}/{name}");
            let Some(cur) = st.objects.get(&key) else {
                return (
                    404,
                    status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
                );
            };
            if body["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                return (
                    409,
                    status_body(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    ),
                );
            }
            let mut o = body.clone();
            o["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(key, o.clone());
            (200, o)
        }
        ("PATCH", Some(name)) => {
            let key = format!("{coll}/{name}");
            let existing = st.objects.get(&key).cloned();
            if status && existing.is_none() {
                return (
                    404,
                    status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
                );
            }
            let mut o =
                existing.unwrap_or(json!({"metadata": {"uid": format!("uid-{name}-{rv}")}}));
            let mut patch = body.clone();
            if status {
                patch = json!({"status": body["status"]});
            } else if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                // Lists in metadata are replaced whole by this fake.
                let _ = m;
            }
            merge(&mut o, &patch);
            o["metadata"]["resourceVersion"] = json!(rv);
            st.objects.insert(key, o.clone());
            (200, o)
        }
        ("DELETE", Some(name)) => match st.objects.remove(&format!("{coll}/{name}")) {
            Some(_) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
            None => (
                404,
                status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
            ),
        },
        _ => (
            405,
            status_body(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}

/// Serves the shared state on a new port, tagging requests with `via`.
/// A watch request gets a stream that stays open with no events (these
/// tests change objects through the model, not through watches).
async fn serve_addr(state: Shared, via: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state, via, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

type Body = BoxBody<Bytes, Infallible>;

async fn answer(
    state: &Shared,
    via: &'static str,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let json_response = |status: u16, v: Value| {
        let mut resp = hyper::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        resp
    };
    if query.contains("watch=true") || query.contains("watch=1") {
        let stream = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
        let mut resp = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return resp;
    }
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes)
        .or_else(|_| serde_yaml::from_slice(&bytes))
        .unwrap_or(Value::Null);
    let stalled = {
        let st = state.lock().unwrap();
        st.faults
            .iter()
            .any(|f| f.status == 0 && f.method == method && path.contains(&f.path_contains))
    };
    if stalled {
        // A stalled API server: the request is never answered.
        futures::future::pending::<()>().await;
    }
    let mut st = state.lock().unwrap();
    let text = body.to_string();
    let fault = st.faults.iter_mut().find(|f| {
        f.method == method
            && path.contains(&f.path_contains)
            && f.body_contains
                .as_ref()
                .is_none_or(|b| text.contains(b.as_str()))
            && f.times != Some(0)
    });
    let (status, out) = match fault {
        Some(f) => {
            if let Some(n) = f.times.as_mut() {
                *n -= 1;
            }
            let reason = match f.status {
                404 => "NotFound",
                409 => "Conflict",
                _ => "InternalError",
            };
            (
                f.status,
                status_body(f.status, reason, "injected by the test"),
            )
        }
        None => handle(&mut st, &method, &path, &query, &body),
    };
    st.log.push(Seen {
        via,
        method,
        path,
        query,
        content_type,
        status,
    });
    json_response(status, out)
}

async fn serve(state: Shared, via: &'static str) -> kube::Client {
    let addr = serve_addr(state, via).await;
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn writes(st: &State, via: &str) -> Vec<Seen> {
    st.log
        .iter()
        .filter(|s| s.via == via && s.method != "GET" && !s.path.contains("/leases"))
        .cloned()
        .collect()
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

fn upsert(v: Value) -> Change {
    Change::Upsert(Object::parse(v).unwrap().unwrap())
}

const SHOP_NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop, uid: gw-uid-1, generation: 2}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n";
const L7_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: shop, generation: 1}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n";

fn writer_config() -> WriterConfig {
    WriterConfig {
        waypoint_image: "ghcr.io/mesh-dev/waypoint:test".into(),
        ca_address: "https://istiod-lite.istio-system.svc:15012".into(),
        ca_server_name: "istiod-lite.istio-system.svc".into(),
        trust_domain: "cluster.local".into(),
        token_audience: "istio-ca".into(),
        path_normalization: "MERGE_SLASHES".into(),
        proxy_log_format: Some("json".into()),
        resync: Duration::from_secs(3600),
        min_interval: Duration::from_millis(20),
    }
}

#[tokio::test]
async fn replicas_racing_to_create_the_ca_secret_agree_on_one_root() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    // Both replicas see no Secret, both create: one gets 409 AlreadyExists.
    state.lock().unwrap().faults.push(Fault {
        method: "GET",
        path_contains: "/secrets/istio-ca-secret".into(),
        body_contains: None,
        status: 404,
        times: Some(2),
    });
    let a = serve(state.clone(), "a").await;
    let b = serve(state.clone(), "b").await;
    let api_a = kube::Api::namespaced(a, "istio-system");
    let api_b = kube::Api::namespaced(b, "istio-system");
    let (ra, rb) = tokio::join!(
        load_or_create(&api_a, "istio-ca-secret", "cluster.local"),
        load_or_create(&api_b, "istio-ca-secret", "cluster.local"),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra, rb, "both replicas must sign with the same root");
    {
        let st = state.lock().unwrap();
        let creates: Vec<u16> = st
            .log
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.status)
            .collect();
        assert_eq!(
            creates.iter().filter(|c| **c == 201).count(),
            1,
            "{creates:?}"
        );
        assert!(creates.contains(&409), "{creates:?}");
        let stored = &st.objects["/api/v1/namespaces/istio-system/secrets/istio-ca-secret"];
        assert_eq!(stored["type"], "istio.io/ca-root");
    }

    // A restart reads the same root back.
    let again = load_or_create(&api_a, "istio-ca-secret", "cluster.local")
        .await
        .unwrap();
    assert_eq!(again, ra);
}

#[tokio::test]
async fn a_damaged_ca_secret_is_reported_and_never_overwritten() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    state.lock().unwrap().objects.insert(
        "/api/v1/namespaces/istio-system/secrets/istio-ca-secret".into(),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "istio-ca-secret", "namespace": "istio-system", "resourceVersion": "1"},
               "data": {"ca-cert.pem": base64(cert)}}),
    );
    let client = serve(state.clone(), "a").await;
    let api = kube::Api::namespaced(client, "istio-system");
    let err = load_or_create(&api, "istio-ca-secret", "cluster.local")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
    assert!(err.to_string().contains("istio-ca-secret"), "{err}");
    let st = state.lock().unwrap();
    assert!(st.log.iter().all(|s| s.method == "GET"), "{:?}", st.log);
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn quick_lease(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_millis(1200),
        renew_every: Duration::from_millis(200),
        renew_deadline: Duration::from_millis(800),
        retry_every: Duration::from_millis(100),
        ..LeaseConfig::new("istiod-lite", identity)
    }
}

#[tokio::test]
async fn a_lease_conflict_leaves_the_loser_a_follower() {
    let state = Shared::default();
    let a = serve(state.clone(), "a").await;
    let b = serve(state.clone(), "b").await;
    let mut ea = Elector::new(kube::Api::namespaced(a, "istio-system"), quick_lease("a"));
    let mut eb = Elector::new(kube::Api::namespaced(b, "istio-system"), quick_lease("b"));
    assert!(
        ea.try_acquire_or_renew().await.unwrap(),
        "the first replica creates the Lease"
    );
    assert!(
        !eb.try_acquire_or_renew().await.unwrap(),
        "the Lease is held"
    );
    // A renewal that races another writer gets 409 Conflict: not the leader.
    state.lock().unwrap().faults.push(Fault {
        method: "PUT",
        path_contains: "/leases/istiod-lite".into(),
        body_contains: None,
        status: 409,
        times: Some(1),
    });
    assert!(!ea.try_acquire_or_renew().await.unwrap());
    assert!(
        ea.try_acquire_or_renew().await.unwrap(),
        "the next round renews"
    );
    let st = state.lock().unwrap();
    let lease =
        &st.objects["/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istiod-lite"];
    assert_eq!(lease["spec"]["holderIdentity"], "a");
}

/// An API server that stops answering must not keep a leader leading: it
/// steps down by its renew deadline, before anyone else may take over.
#[tokio::test]
async fn a_leader_whose_api_server_stalls_steps_down_in_time() {
    let state = Shared::default();
    let client = serve(state.clone(), "a").await;
    let elector = Elector::new(
        kube::Api::namespaced(client, "istio-system"),
        quick_lease("a"),
    );
    let leader = elector.subscribe();
    let stop = CancellationToken::new();
    tokio::spawn(elector.run(stop.clone()));
    wait_for("leadership", || *leader.borrow()).await;
    state.lock().unwrap().faults.push(Fault {
        method: "GET",
        path_contains: "/leases/istiod-lite".into(),
        body_contains: None,
        status: 0,
        times: None,
    });
    wait_for("the stalled leader to step down", || !*leader.borrow()).await;
    stop.cancel();
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Two replicas, each with its own model fed the same objects, electing
/// through one Lease: only the leader writes; when it loses the Lease it
/// stops writing and the other replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_replica_that_loses_the_lease_stops() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let stop = CancellationToken::new();
    let mut replicas = Vec::new();
    for via in ["a", "b"] {
        let client = serve(state.clone(), via).await;
        let hub = Hub::new(Model::new(ModelConfig::default()));
        hub.apply(vec![upsert(yaml(SHOP_NS))]);
        hub.set_ready();
        let elector = Elector::new(
            kube::Api::namespaced(client.clone(), "istio-system"),
            quick_lease(via),
        );
        let leader = elector.subscribe();
        tokio::spawn(elector.run(stop.clone()));
        let writer = Writer::new(client, writer_config(), "ROOT PEM".into());
        tokio::spawn(writer.run(hub.clone(), leader.clone(), stop.clone()));
        replicas.push((via, hub, leader));
    }
    let leader_of = |r: &Vec<(&'static str, Arc<Hub>, tokio::sync::watch::Receiver<bool>)>| {
        r.iter()
            .filter(|(_, _, l)| *l.borrow())
            .map(|(v, _, _)| *v)
            .collect::<Vec<_>>()
    };
    wait_for("a leader", || leader_of(&replicas).len() == 1).await;
    let first = leader_of(&replicas)[0];
    let other = if first == "a" { "b" } else { "a" };
    wait_for("the leader's root ConfigMaps", || {
        let st = state.lock().unwrap();
        st.objects
            .contains_key("/api/v1/namespaces/shop/configmaps/istio-ca-root-cert")
            && st
                .objects
                .contains_key("/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert")
    })
    .await;
    {
        let st = state.lock().unwrap();
        assert!(!writes(&st, first).is_empty());
        assert!(
            writes(&st, other).is_empty(),
            "a follower wrote: {:?}",
            writes(&st, other)
        );
        let cm = &st.objects["/api/v1/namespaces/shop/configmaps/istio-ca-root-cert"];
        assert_eq!(cm["data"]["root-cert.pem"], "ROOT PEM");
    }

    // The leader's renewals now fail with 409 (another writer got there):
    // it steps down at once, and the other replica takes over once the
    // Lease has not changed for its duration.
    state.lock().unwrap().faults.push(Fault {
        method: "PUT",
        path_contains: "/leases/istiod-lite".into(),
        body_contains: Some(format!("\"holderIdentity\":\"{first}\"")),
        status: 409,
        times: None,
    });
    let idx = |r: &Vec<(&'static str, Arc<Hub>, tokio::sync::watch::Receiver<bool>)>, v: &str| {
        r.iter().position(|(x, _, _)| *x == v).unwrap()
    };
    let (fi, oi) = (idx(&replicas, first), idx(&replicas, other));
    wait_for("the old leader to step down", || !*replicas[fi].2.borrow()).await;
    let writes_before = writes(&state.lock().unwrap(), first).len();
    wait_for("the other replica to take over", || {
        *replicas[oi].2.borrow()
    })
    .await;

    // A namespace joins the mesh: only the new leader writes its ConfigMap.
    let late = "apiVersion: v1\nkind: Namespace\nmetadata: {name: late, labels: {istio.io/dataplane-mode: ambient}}\n";
    for (_, hub, _) in &replicas {
        hub.apply(vec![upsert(yaml(late))]);
    }
    wait_for("the new leader's write", || {
        state
            .lock()
            .unwrap()
            .objects
            .contains_key("/api/v1/namespaces/late/configmaps/istio-ca-root-cert")
    })
    .await;
    let st = state.lock().unwrap();
    assert_eq!(
        writes(&st, first).len(),
        writes_before,
        "the replica that lost the Lease kept writing"
    );
    assert!(
        writes(&st, other)
            .iter()
            .any(|s| s.path.contains("/namespaces/late/"))
    );
    drop(st);
    stop.cancel();
}

#[tokio::test]
async fn tokens_are_reviewed_for_the_ca_audience_and_bound_to_the_pods_node() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let review = |sa: &str, pod: &str, uid: &str, node: Option<&str>| {
        let mut extra = json!({
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": [uid],
        });
        if let Some(n) = node {
            extra["authentication.kubernetes.io/node-name"] = json!([n]);
        }
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": format!("system:serviceaccount:{sa}"), "extra": extra}})
    };
    {
        let mut st = state.lock().unwrap();
        st.reviews.insert(
            "zt".into(),
            review("istio-system:ztunnel", "ztunnel-x", "u-zt", None),
        );
        st.reviews.insert(
            "wp".into(),
            review("shop:wp", "wp-0", "u-wp", Some("node-2")),
        );
        st.reviews.insert(
            "liar".into(),
            review("shop:wp", "wp-0", "u-wp", Some("node-9")),
        );
        st.reviews
            .insert("stale".into(), review("shop:wp", "wp-0", "u-old", None));
        st.reviews.insert(
            "unbound".into(),
            json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:shop:wp"}}),
        );
        st.reviews.insert(
            "human".into(),
            json!({"authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "alice@example.com"}}),
        );
        st.reviews.insert(
            "other-aud".into(),
            json!({"authenticated": true, "audiences": ["vault"],
            "user": {"username": "system:serviceaccount:shop:wp"}}),
        );
        // No audiences: valid for the API server only (a pod's API token).
        st.reviews.insert(
            "api-token".into(),
            json!({"authenticated": true, "audiences": [], "user": {
                "username": "system:serviceaccount:shop:wp",
                "extra": {"authentication.kubernetes.io/pod-name": ["wp-0"],
                          "authentication.kubernetes.io/pod-uid": ["u-wp"]}}}),
        );
    }
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    let pod = |ns: &str, name: &str, uid: &str, sa: &str, node: &str| {
        yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: 10.0.0.{}}}\n",
            name.len()
        ))
    };
    hub.apply(vec![
        upsert(pod(
            "istio-system",
            "ztunnel-x",
            "u-zt",
            "ztunnel",
            "node-1",
        )),
        upsert(pod("shop", "wp-0", "u-wp", "wp", "node-2")),
    ]);
    let reviewer = TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        hub,
    );
    use istiod_lite::ca::auth::Authenticator;
    let auth = |token: &str| {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "authorization",
            format!("Bearer {}", sa_jwt(token)).parse().unwrap(),
        );
        md
    };
    let zt = reviewer.authenticate(&auth("zt")).await.unwrap();
    assert_eq!((zt.node.as_str(), zt.only.is_none()), ("node-1", true));
    let wp = reviewer.authenticate(&auth("wp")).await.unwrap();
    assert_eq!(wp.node, "node-2");
    assert_eq!(
        wp.only.unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/wp"
    );
    for (token, says) in [
        ("liar", "names node \"node-9\""),
        ("stale", "is not known"),
        ("unbound", "not bound to a pod"),
        ("human", "not a service account"),
        ("other-aud", "not for audience \"istio-ca\""),
        ("api-token", "not for audience \"istio-ca\""),
        ("nobody", "invalid bearer token"),
    ] {
        let err = reviewer
            .authenticate(&auth(token))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{token}: {err}");
    }
    let err = reviewer
        .authenticate(&tonic::metadata::MetadataMap::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no authorization header"), "{err}");
    // A second call within the cache window costs no review, for a good
    // token that names its expiry or a refused one.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let real = jwt(now + 3600);
    let zt_review = state.lock().unwrap().reviews["zt"].clone();
    state
        .lock()
        .unwrap()
        .reviews
        .insert(real.clone(), zt_review);
    reviewer.authenticate(&auth(&real)).await.unwrap();
    let before = state.lock().unwrap().log.len();
    reviewer.authenticate(&auth(&real)).await.unwrap();
    reviewer.authenticate(&auth("nobody")).await.unwrap_err();
    assert_eq!(state.lock().unwrap().log.len(), before);
    // A token that names no expiry is reviewed every time.
    reviewer.authenticate(&auth("zt")).await.unwrap();
    assert_eq!(state.lock().unwrap().log.len(), before + 1);
}

/// A token shaped as the API server issues them (a JWT), expiring at `exp`.
/// A token shaped as a service-account token (a JWT), standing for the
/// review the fake API server keeps under `name` (base64url characters).
fn sa_jwt(name: &str) -> String {
    if name.contains('.') {
        return name.to_string(); // a JWT already
    }
    let header = base64(r#"{"alg":"RS256"}"#)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_");
    format!("{header}.{name}.c2ln")
}

fn jwt(exp: u64) -> String {
    let url = |s: &str| {
        base64(s)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    format!(
        "{}.{}.c2lnbmF0dXJl",
        url(r#"{"alg":"RS256","kid":"k"}"#),
        url(&format!(
            r#"{{"aud":["istio-ca"],"exp":{exp},"sub":"system:serviceaccount:istio-system:ztunnel"}}"#
        ))
    )
}

/// A stranger's tokens cost the API server little: however many bogus
/// ones are refused, a ztunnel's good review stays remembered (refusals are
/// kept apart, in a cache of their own), and a token not even shaped as a
/// JWT is refused without a review.
#[tokio::test]
async fn bogus_tokens_never_evict_good_reviews_and_malformed_ones_cost_none() {
    use istiod_lite::ca::auth::Authenticator;
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    // A projected token names its expiry (else no review is remembered).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let zt = jwt(now + 3600);
    state.lock().unwrap().reviews.insert(
        zt.clone(),
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-x"],
                      "authentication.kubernetes.io/pod-uid": ["u-zt"],
                      "authentication.kubernetes.io/node-name": ["node-1"]}}}),
    );
    let client = serve(state.clone(), "a").await;
    let reviewer = TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        Hub::new(Model::new(ModelConfig::default())),
    );
    let auth = |token: &str| {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        md
    };
    reviewer.authenticate(&auth(&zt)).await.expect("zt");
    for i in 0..10_001 {
        let bogus = sa_jwt(&format!("bogus{i}"));
        assert!(reviewer.authenticate(&auth(&bogus)).await.is_err());
    }
    // The API server no longer vouches for it: only the remembered review does.
    state.lock().unwrap().reviews.remove(&zt);
    reviewer
        .authenticate(&auth(&zt))
        .await
        .expect("the good review is still remembered");
    let before = state.lock().unwrap().review_calls;
    for bad in ["opaque-token-0123456789", "a.b", "a.b.c.d", "!!.x.y"] {
        assert!(reviewer.authenticate(&auth(bad)).await.is_err(), "{bad}");
    }
    assert_eq!(
        state.lock().unwrap().review_calls,
        before,
        "reviews asked for"
    );
}

/// A reviewed token is remembered, but never past its own expiry: once it
/// has expired it is reviewed again (and the API server refuses it).
#[tokio::test]
async fn a_reviewed_token_is_not_remembered_past_its_expiry() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jwt(now + 2);
    let good = json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
        "username": "system:serviceaccount:istio-system:ztunnel",
        "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-x"],
                  "authentication.kubernetes.io/pod-uid": ["u-zt"],
                  "authentication.kubernetes.io/node-name": ["node-1"]}}});
    state.lock().unwrap().reviews.insert(token.clone(), good);
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    let reviewer = TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        hub,
    );
    use istiod_lite::ca::auth::Authenticator;
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reviewer.authenticate(&md).await.unwrap();
    // The API server stops accepting it once it expires.
    state.lock().unwrap().reviews.remove(&token);
    reviewer.authenticate(&md).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let err = reviewer.authenticate(&md).await.unwrap_err().to_string();
    assert!(err.contains("invalid bearer token"), "{err}");
}

/// What the watch would deliver back to the model after our writes.
fn reflect(state: &Shared, hub: &Hub, paths: &[&str]) {
    let st = state.lock().unwrap();
    let changes = paths
        .iter()
        .filter_map(|p| st.objects.get(*p).cloned())
        .map(upsert)
        .collect();
    drop(st);
    hub.apply(changes);
}

const GW_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp";
const POLICY_PATH: &str =
    "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/get-only";

#[tokio::test]
async fn waypoint_gateways_get_owned_deployments_status_and_cleanup() {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    {
        let mut st = state.lock().unwrap();
        st.objects.insert(GW_PATH.into(), yaml(GATEWAY));
        st.objects.insert(POLICY_PATH.into(), yaml(L7_POLICY));
    }
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.apply(vec![
        upsert(yaml(SHOP_NS)),
        upsert(yaml(GATEWAY)),
        upsert(yaml(L7_POLICY)),
    ]);
    let mut writer = Writer::new(client, writer_config(), "ROOT PEM".into());

    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    {
        let st = state.lock().unwrap();
        for (kind, name) in [
            ("serviceaccounts", "wp"),
            ("configmaps", "wp-waypoint"),
            ("services", "wp"),
        ] {
            let o = &st.objects[&format!("/api/v1/namespaces/shop/{kind}/{name}")];
            assert_eq!(
                o["metadata"]["ownerReferences"][0]["uid"], "gw-uid-1",
                "{kind}"
            );
            assert_eq!(o["metadata"]["ownerReferences"][0]["controller"], true);
        }
        let d = &st.objects["/apis/apps/v1/namespaces/shop/deployments/wp"];
        assert_eq!(d["metadata"]["ownerReferences"][0]["kind"], "Gateway");
        let pod = &d["spec"]["template"];
        assert_eq!(
            pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "wp"
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "wp");
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            "ghcr.io/mesh-dev/waypoint:test"
        );
        // Prometheus' annotation-based discovery finds its metrics.
        assert_eq!(
            pod["metadata"]["annotations"],
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/metrics"}),
            "{pod}"
        );
        // The controller's LOG_FORMAT.
        assert_eq!(
            pod["spec"]["containers"][0]["env"][1],
            json!({"name": "LOG_FORMAT", "value": "json"})
        );
        let cfg =
            st.objects["/api/v1/namespaces/shop/configmaps/wp-waypoint"]["data"]["config.yaml"]
                .as_str()
                .unwrap()
                .to_string();
        // The config the waypoint binary will read, as it reads it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &cfg).unwrap();
        let loaded = waypoint::config::Config::load_for_pod(&path, Some("wp-5d8f-x2")).unwrap();
        assert_eq!(
            (loaded.namespace.as_str(), loaded.gateway.as_str()),
            ("shop", "wp")
        );
        assert_eq!(
            (loaded.pod_name.as_str(), loaded.service_account.as_str()),
            ("wp-5d8f-x2", "wp")
        );
        assert_eq!(
            loaded.ca.token_file.as_deref(),
            Some(std::path::Path::new("/var/run/secrets/tokens/istio-token"))
        );
        // The mesh's path normalization reaches every waypoint.
        assert_eq!(
            loaded.path_normalization,
            waypoint::normalize::PathNormalization::MergeSlashes
        );
        assert!(
            waypoint::config::Config::load(&path).is_err(),
            "pod_name must come from somewhere"
        );
        let svc = &st.objects["/api/v1/namespaces/shop/services/wp"];
        assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
        // Server-side apply, as our field manager.
        let apply = st
            .log
            .iter()
            .find(|s| s.method == "PATCH" && s.path.ends_with("/deployments/wp"))
            .unwrap();
        assert_eq!(apply.status, 200);
        assert_eq!(apply.content_type, "application/apply-patch+yaml");
        assert!(
            apply.query.contains("fieldManager=istiod-lite") && apply.query.contains("force=true"),
            "{}",
            apply.query
        );
        // No cluster IP yet: accepted, not yet programmed.
        let conds = &st.objects[GW_PATH]["status"]["conditions"];
        let programmed = conds
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap();
        assert_eq!(
            (programmed["status"].as_str(), programmed["reason"].as_str()),
            (Some("False"), Some("Pending"))
        );
        assert_eq!(programmed["observedGeneration"], 2);
        // The L7 rule of an ALLOW policy is a warning the ztunnel cannot honour.
        let pc = &st.objects[POLICY_PATH]["status"]["conditions"][0];
        assert_eq!(pc["type"], "ZtunnelAccepted");
        assert_eq!(pc["reason"], "UnsupportedValue");
        assert!(
            pc["message"].as_str().unwrap().contains("L7 fields"),
            "{pc}"
        );
    }

    // The Service gets its cluster IP (as the API server would assign);
    // the watch brings the written status back; the Gateway is programmed.
    {
        let mut st = state.lock().unwrap();
        let svc = st
            .objects
            .get_mut("/api/v1/namespaces/shop/services/wp")
            .unwrap();
        svc["spec"]["clusterIP"] = json!("10.96.7.7");
    }
    reflect(
        &state,
        &hub,
        &["/api/v1/namespaces/shop/services/wp", GW_PATH, POLICY_PATH],
    );
    // The first status write meets a 409 (someone else wrote the status in
    // between): reported, and the next round succeeds.
    state.lock().unwrap().faults.push(Fault {
        method: "PATCH",
        path_contains: "/gateways/wp/status".into(),
        body_contains: None,
        status: 409,
        times: Some(1),
    });
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].contains("Gateway shop/wp"), "{:?}", r.errors);
    assert_eq!(r.applied, 0, "nothing changed, nothing re-applied");
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.statuses, 1);
    {
        let st = state.lock().unwrap();
        let status = &st.objects[GW_PATH]["status"];
        assert_eq!(status["addresses"][0]["value"], "10.96.7.7");
        let programmed = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap();
        assert_eq!(programmed["status"], "True");
    }
    // Once the watch shows what we wrote, a reconcile writes nothing.
    reflect(&state, &hub, &[GW_PATH, POLICY_PATH]);
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert_eq!((r.applied, r.statuses, r.deleted), (0, 0, 0), "{r:?}");

    // A Gateway whose name is taken by someone else's Deployment: left
    // alone, and the Gateway's status says why.
    let taken = GATEWAY
        .replace("name: wp,", "name: api,")
        .replace("gw-uid-1", "gw-uid-2");
    {
        let mut st = state.lock().unwrap();
        st.objects.insert(
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/api".into(),
            yaml(&taken),
        );
        st.objects.insert(
            "/api/v1/namespaces/shop/serviceaccounts/api".into(),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "api", "namespace": "shop", "resourceVersion": "1"}}),
        );
    }
    hub.apply(vec![upsert(yaml(&taken))]);
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("ServiceAccount shop/api already exists")),
        "{:?}",
        r.errors
    );
    {
        let st = state.lock().unwrap();
        assert!(
            st.objects["/api/v1/namespaces/shop/serviceaccounts/api"]["metadata"]["labels"]
                .is_null()
        );
        assert!(
            !st.objects
                .contains_key("/apis/apps/v1/namespaces/shop/deployments/api")
        );
        let conds = &st.objects["/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/api"]
            ["status"]["conditions"];
        let p = conds
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap();
        assert_eq!(p["reason"], "Invalid");
        assert!(
            p["message"]
                .as_str()
                .unwrap()
                .contains("not created by istiod-lite"),
            "{p}"
        );
    }

    // The Gateway is deleted: what was made for it goes too; someone
    // else's ServiceAccount stays.
    hub.apply(vec![
        Change::Delete(Object::parse(yaml(GATEWAY)).unwrap().unwrap().key()),
        Change::Delete(Object::parse(yaml(&taken)).unwrap().unwrap().key()),
    ]);
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.deleted, 4, "{r:?}");
    let st = state.lock().unwrap();
    for path in [
        "/apis/apps/v1/namespaces/shop/deployments/wp",
        "/api/v1/namespaces/shop/services/wp",
        "/api/v1/namespaces/shop/configmaps/wp-waypoint",
        "/api/v1/namespaces/shop/serviceaccounts/wp",
    ] {
        assert!(!st.objects.contains_key(path), "{path} was not removed");
    }
    assert!(
        st.objects
            .contains_key("/api/v1/namespaces/shop/serviceaccounts/api")
    );
    assert!(
        st.objects
            .contains_key("/api/v1/namespaces/shop/configmaps/istio-ca-root-cert")
    );
}

const INGRESS_GW_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/edge";

fn ingress_gateway() -> String {
    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop, uid: gw-uid-9, generation: 3}\nspec:\n  gatewayClassName: mesh-ingress\n  listeners:\n  - {name: good, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: good-cert}]}}\n  - {name: bad, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: missing-cert}]}}\n  - {name: plain-http-listener, port: 80, protocol: HTTP}\n".into()
}

fn listener<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {status}"))
}

fn cond<'a>(conds: &'a Value, t: &str) -> &'a Value {
    conds
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == t)
        .unwrap_or_else(|| panic!("no {t} in {conds}"))
}

#[tokio::test]
async fn ingress_gateways_get_a_load_balancer_and_listener_status() {
    mesh_core::tls::install_default_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "good-cert", "namespace": "shop"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    });
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{name: edge}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n";
    let state = Shared::default();
    state
        .lock()
        .unwrap()
        .objects
        .insert(INGRESS_GW_PATH.into(), yaml(&ingress_gateway()));
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.apply(vec![
        upsert(yaml(SHOP_NS)),
        upsert(yaml(&ingress_gateway())),
        upsert(secret),
        upsert(yaml(route)),
    ]);
    let mut writer = Writer::new(client, writer_config(), "ROOT PEM".into());
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    {
        let st = state.lock().unwrap();
        for (kind, name) in [
            ("serviceaccounts", "edge"),
            ("configmaps", "edge-waypoint"),
            ("services", "edge"),
        ] {
            let o = &st.objects[&format!("/api/v1/namespaces/shop/{kind}/{name}")];
            assert_eq!(
                o["metadata"]["ownerReferences"][0]["uid"], "gw-uid-9",
                "{kind}"
            );
        }
        let cfg =
            st.objects["/api/v1/namespaces/shop/configmaps/edge-waypoint"]["data"]["config.yaml"]
                .as_str()
                .unwrap();
        assert!(cfg.contains("\nrole: ingress\n"), "{cfg}");
        assert!(cfg.contains("gateway: edge\n"), "{cfg}");
        let pod = &st.objects["/apis/apps/v1/namespaces/shop/deployments/edge"]["spec"]["template"];
        assert_eq!(
            pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
            "edge"
        );
        assert_eq!(pod["spec"]["serviceAccountName"], "edge");
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            "ghcr.io/mesh-dev/waypoint:test"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/scrape"], "true",
            "{pod}"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            "15020"
        );
        assert_eq!(
            pod["spec"]["securityContext"]["sysctls"],
            json!([{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}])
        );
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        let svc = &st.objects["/api/v1/namespaces/shop/services/edge"]["spec"];
        assert_eq!(svc["type"], "LoadBalancer");
        // One port per listener port; a name too long for a port gets port-<n>.
        assert_eq!(
            svc["ports"],
            json!([
                {"name": "good", "port": 443, "targetPort": 443, "protocol": "TCP"},
                {"name": "bad", "port": 8443, "targetPort": 8443, "protocol": "TCP"},
                {"name": "port-80", "port": 80, "targetPort": 80, "protocol": "TCP"},
            ])
        );
        // No address yet: accepted (with a listener not served), pending.
        let status = &st.objects[INGRESS_GW_PATH]["status"];
        let accepted = cond(&status["conditions"], "Accepted");
        assert_eq!(
            (accepted["status"].as_str(), accepted["reason"].as_str()),
            (Some("True"), Some("ListenersNotValid"))
        );
        assert_eq!(
            cond(&status["conditions"], "Programmed")["reason"],
            "Pending"
        );
        let bad = listener(status, "bad");
        let refs = cond(&bad["conditions"], "ResolvedRefs");
        assert_eq!(
            (refs["status"].as_str(), refs["reason"].as_str()),
            (Some("False"), Some("InvalidCertificateRef"))
        );
        assert!(
            refs["message"]
                .as_str()
                .unwrap()
                .contains("Secret shop/missing-cert not found"),
            "{refs}"
        );
        assert_eq!(cond(&bad["conditions"], "Programmed")["status"], "False");
        let good = listener(status, "good");
        let programmed = cond(&good["conditions"], "Programmed");
        assert_eq!(
            (programmed["status"].as_str(), programmed["reason"].as_str()),
            (Some("True"), Some("Programmed"))
        );
        assert_eq!(programmed["observedGeneration"], 3);
        assert!(programmed["lastTransitionTime"].is_string());
        assert_eq!(cond(&good["conditions"], "ResolvedRefs")["status"], "True");
        assert_eq!(cond(&good["conditions"], "Accepted")["status"], "True");
        assert_eq!(good["attachedRoutes"], 1);
        assert_eq!(
            good["supportedKinds"],
            json!([
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}
            ])
        );
    }

    // The load balancer gets an address: the Gateway reports it, programmed.
    {
        let mut st = state.lock().unwrap();
        let svc = st
            .objects
            .get_mut("/api/v1/namespaces/shop/services/edge")
            .unwrap();
        svc["spec"]["clusterIP"] = json!("10.96.8.8");
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
    }
    reflect(
        &state,
        &hub,
        &["/api/v1/namespaces/shop/services/edge", INGRESS_GW_PATH],
    );
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.statuses, 1, "{r:?}");
    let since = {
        let st = state.lock().unwrap();
        let status = &st.objects[INGRESS_GW_PATH]["status"];
        assert_eq!(
            status["addresses"],
            json!([{"type": "IPAddress", "value": "203.0.113.7"}])
        );
        assert_eq!(cond(&status["conditions"], "Programmed")["status"], "True");
        cond(&listener(status, "good")["conditions"], "Programmed")["lastTransitionTime"].clone()
    };
    // Once the watch shows what we wrote, nothing is written again.
    reflect(&state, &hub, &[INGRESS_GW_PATH]);
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert_eq!((r.applied, r.statuses, r.deleted), (0, 0, 0), "{r:?}");

    // The missing Secret appears: the bad listener is programmed; the
    // good one's transition time is kept.
    let fixed = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "missing-cert", "namespace": "shop"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    });
    hub.apply(vec![upsert(fixed)]);
    let view = hub.model().cluster_view();
    let r = writer.reconcile(&view).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let st = state.lock().unwrap();
    let status = &st.objects[INGRESS_GW_PATH]["status"];
    assert_eq!(
        cond(&listener(status, "bad")["conditions"], "Programmed")["status"],
        "True"
    );
    assert_eq!(
        cond(&status["conditions"], "Accepted")["reason"],
        "Accepted"
    );
    assert_eq!(
        cond(&listener(status, "good")["conditions"], "Programmed")["lastTransitionTime"],
        since
    );
}

/// Kills the controller when the test ends, passing or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_status(addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The controller binary in cluster mode against the fake API server, up
/// and ready with its CA Secret, Lease and root ConfigMaps; its log goes to
/// `dir/istiod-lite.log`.
struct Binary {
    _child: Child,
    grpc: u16,
    root: String,
    log: std::path::PathBuf,
}

async fn start_binary(state: &Shared, dir: &std::path::Path) -> Binary {
    let api = serve_addr(state.clone(), "a").await;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let log = dir.join("istiod-lite.log");
    let (grpc, debug) = (free_port(), free_port());
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
            .args([
                "--kube",
                &format!("--grpc-addr=127.0.0.1:{grpc}"),
                &format!("--debug-addr=127.0.0.1:{debug}"),
                "--poll-ms=20",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", "istiod-a")
            .env("POD_NAMESPACE", "istio-system")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let debug_addr = format!("127.0.0.1:{debug}");
    for i in 0..200 {
        if http_status(&debug_addr, "/ready").await == Some(200) {
            break;
        }
        assert!(
            i < 199,
            "the controller never became ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root_cm = "/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert";
    wait_for("the root ConfigMaps", || {
        let st = state.lock().unwrap();
        st.objects.contains_key(root_cm)
            && st
                .objects
                .contains_key("/api/v1/namespaces/shop/configmaps/istio-ca-root-cert")
    })
    .await;
    let st = state.lock().unwrap();
    assert!(
        st.objects
            .contains_key("/api/v1/namespaces/istio-system/secrets/istio-ca-secret")
    );
    let root = st.objects[root_cm]["data"]["root-cert.pem"]
        .as_str()
        .unwrap()
        .to_string();
    Binary {
        _child: child,
        grpc,
        root,
        log,
    }
}

/// The binary in cluster mode, wired end to end: it lists the cluster,
/// creates its CA Secret, takes the Lease, publishes the root, and signs a
/// certificate for a ztunnel that presents a service-account token, for a
/// workload on that ztunnel's node only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_binary_runs_in_cluster_mode() {
    use mesh_core::ca::{CaClient, CaClientConfig, IstioCaClient};
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let pod = |ns: &str, name: &str, sa: &str, node: &str, ip: &str| {
        yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: u-{name}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
        ))
    };
    {
        let mut st = state.lock().unwrap();
        st.objects
            .insert("/api/v1/namespaces/shop".into(), yaml(SHOP_NS));
        st.objects.insert(
            "/api/v1/namespaces/istio-system".into(),
            yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n"),
        );
        for (ns, name, sa, node, ip) in [
            ("istio-system", "ztunnel-x", "ztunnel", "node-1", "10.0.0.2"),
            ("shop", "web-1", "web", "node-1", "10.0.0.5"),
            ("shop", "db-1", "db", "node-2", "10.0.0.6"),
        ] {
            st.objects.insert(
                format!("/api/v1/namespaces/{ns}/pods/{name}"),
                pod(ns, name, sa, node, ip),
            );
        }
        // wp-0 is the waypoint Gateway wp's pod, as its Deployment makes
        // one (controlled by ReplicaSet wp-<pod-template-hash>, running as
        // the Gateway's account); fake-0 is merely labelled as one.
        st.objects.insert(
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/wp".into(),
            yaml("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop, uid: gw-uid-wp, generation: 1}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n"),
        );
        for (name, owner, ip) in [
            (
                "wp-0",
                ", ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: wp-7f9c, uid: u-rs, controller: true}]",
                "10.0.0.7",
            ),
            ("fake-0", "", "10.0.0.8"),
        ] {
            st.objects.insert(
                format!("/api/v1/namespaces/shop/pods/{name}"),
                yaml(&format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}, labels: {{gateway.networking.k8s.io/gateway-name: wp, pod-template-hash: 7f9c}}{owner}}}\nspec: {{nodeName: node-1, serviceAccountName: wp, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
                )),
            );
        }
        st.reviews.insert(
            "fake".into(),
            json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
                "username": "system:serviceaccount:shop:wp",
                "extra": {"authentication.kubernetes.io/pod-name": ["fake-0"],
                          "authentication.kubernetes.io/pod-uid": ["u-fake-0"]}}}),
        );
        st.reviews.insert(
            "wp".into(),
            json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
                "username": "system:serviceaccount:shop:wp",
                "extra": {"authentication.kubernetes.io/pod-name": ["wp-0"],
                          "authentication.kubernetes.io/pod-uid": ["u-wp-0"]}}}),
        );
        st.reviews.insert(
            "zt".into(),
            json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
                "username": "system:serviceaccount:istio-system:ztunnel",
                "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-x"],
                          "authentication.kubernetes.io/pod-uid": ["u-ztunnel-x"]}}}),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let running = start_binary(&state, dir.path()).await;
    let (grpc, root) = (running.grpc, running.root.clone());
    let lease = state.lock().unwrap().objects
        ["/apis/coordination.k8s.io/v1/namespaces/istio-system/leases/istiod-lite"]
        .clone();
    assert_eq!(lease["spec"]["holderIdentity"], "istiod-a");
    let client = |token: &str| {
        IstioCaClient::new(CaClientConfig {
            address: format!("https://127.0.0.1:{grpc}"),
            ca_root_pem: root.clone(),
            server_name: "istiod-lite.istio-system.svc".into(),
            token: Some(sa_jwt(token).into()),
            validity: Duration::ZERO,
            request_timeout: Duration::from_secs(5),
        })
        .unwrap()
    };
    let web: mesh_core::identity::Identity =
        "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let db: mesh_core::identity::Identity = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
    let cert = client("zt").fetch_certificate(&web).await.unwrap();
    assert_eq!(cert.identity(), &web);
    let err = client("zt").fetch_certificate(&db).await.unwrap_err();
    assert!(err.to_string().contains("node-1"), "{err}");
    let err = client("nobody").fetch_certificate(&web).await.unwrap_err();
    assert!(err.to_string().contains("invalid bearer token"), "{err}");
    // A waypoint's own token gets its own identity, and no other.
    let wp: mesh_core::identity::Identity = "spiffe://cluster.local/ns/shop/sa/wp".parse().unwrap();
    let cert = client("wp").fetch_certificate(&wp).await.unwrap();
    assert_eq!(cert.identity(), &wp);
    let err = client("wp").fetch_certificate(&web).await.unwrap_err();
    assert!(err.to_string().contains("cannot ask for identity"), "{err}");
    // ... and may subscribe to config only as its own pod, and only when
    // that pod is one its Gateway's Deployment made (wp-0 is; fake-0, only
    // labelled as a Gateway's pod, is refused).
    for (token, proxy_id, refusal) in [
        ("wp", "ztunnel~node-1", Some("own waypoint pod")),
        ("wp", "waypoint~shop~db-1", Some("own waypoint pod")),
        ("wp", "waypoint~shop~wp-0", None),
        ("fake", "waypoint~shop~fake-0", Some("Deployment made")),
        // The same rule for an ingress gateway's pod.
        ("wp", "ingress~shop~db-1", Some("own waypoint pod")),
        ("wp", "ingress~shop~wp-0", Some("only as a Gateway's pod")),
        ("zt", "ztunnel~node-1", None),
    ] {
        let got = subscribe(grpc, &root, token, proxy_id).await;
        match (refusal, got) {
            (None, Ok(())) => {}
            (Some(why), Err(s)) => {
                assert_eq!(
                    s.code(),
                    tonic::Code::PermissionDenied,
                    "{token} as {proxy_id}: {s}"
                );
                assert!(s.message().contains(why), "{s}");
            }
            (_, got) => panic!("{token} as {proxy_id}: {got:?}"),
        }
    }
}

/// Opens a Delta ADS stream as `proxy_id` with `token`: Ok once the
/// controller accepts the stream.
async fn subscribe(
    grpc: u16,
    root: &str,
    token: &str,
    proxy_id: &str,
) -> Result<(), tonic::Status> {
    use mesh_proto::envoy::config::core::v3::Node;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name("istiod-lite.istio-system.svc");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: proxy_id.to_string(),
            ..Default::default()
        }),
        type_url: mesh_proto::ADDRESS_TYPE_URL.to_string(),
        ..Default::default()
    };
    // The stream stays open after the first request, as a proxy's does.
    let requests = futures::stream::iter([first]).chain(futures::stream::pending());
    let mut req = tonic::Request::new(requests);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", sa_jwt(token)).parse().unwrap(),
    );
    AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await
        .map(|_| ())
}

/// An ingress gateway's keys go to its pod's own service-account token,
/// never to a ztunnel's node token (which may ask for any identity on its
/// node, but not for a Gateway's private keys), nor to a token of another
/// service account. The refusal is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_ingress_pods_own_token_gets_its_gateways_keys() {
    mesh_core::tls::install_default_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let state = Shared::default();
    // A Gateway's pod as its Deployment makes one: controlled by the
    // ReplicaSet <gateway>-<pod-template-hash>.
    let pod = |ns: &str, name: &str, sa: &str, labels: &str| {
        let owner = if labels.contains("pod-template-hash") {
            format!(
                ", ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {sa}-5d8f, uid: u-rs, controller: true}}]"
            )
        } else {
            String::new()
        };
        yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: u-{name}, labels: {{{labels}}}{owner}}}\nspec: {{nodeName: node-1, serviceAccountName: {sa}, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: 10.0.0.{}}}\n",
            name.len()
        ))
    };
    let review = |sa: &str, pod: &str| {
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": format!("system:serviceaccount:{sa}"),
            "extra": {"authentication.kubernetes.io/pod-name": [pod],
                      "authentication.kubernetes.io/pod-uid": [format!("u-{pod}")]}}})
    };
    {
        let mut st = state.lock().unwrap();
        st.objects
            .insert("/api/v1/namespaces/shop".into(), yaml(SHOP_NS));
        st.objects.insert(
            "/api/v1/namespaces/istio-system".into(),
            yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n"),
        );
        for (ns, name, sa, labels) in [
            ("istio-system", "ztunnel-x", "ztunnel", ""),
            (
                "shop",
                "edge-0",
                "edge",
                "gateway.networking.k8s.io/gateway-name: edge, pod-template-hash: 5d8f",
            ),
            ("shop", "web-1", "web", ""),
        ] {
            st.objects.insert(
                format!("/api/v1/namespaces/{ns}/pods/{name}"),
                pod(ns, name, sa, labels),
            );
        }
        st.objects
            .insert(INGRESS_GW_PATH.into(), yaml(&ingress_gateway()));
        st.objects.insert(
            "/api/v1/namespaces/shop/secrets/good-cert".into(),
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "good-cert", "namespace": "shop"},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
            }),
        );
        st.reviews
            .insert("zt".into(), review("istio-system:ztunnel", "ztunnel-x"));
        st.reviews
            .insert("edge".into(), review("shop:edge", "edge-0"));
        st.reviews.insert("web".into(), review("shop:web", "web-1"));
        // Bound to the gateway's pod but of another service account: the
        // API server would never say so; the controller checks anyway.
        st.reviews
            .insert("mismatch".into(), review("shop:web", "edge-0"));
    }
    let dir = tempfile::tempdir().unwrap();
    let running = start_binary(&state, dir.path()).await;
    let (grpc, root) = (running.grpc, running.root.clone());
    let me = "ingress~shop~edge-0";

    // The ztunnel on the gateway's node: refused, and logged.
    let err = ingress_keys(grpc, &root, "zt", me).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("own"), "{err}");
    eventually_logged(&running.log, "refused").await;
    // Another workload's token: refused (its own pod only).
    let err = ingress_keys(grpc, &root, "web", me).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A token of another service account: no keys.
    let got = ingress_keys(grpc, &root, "mismatch", me).await;
    assert!(matches!(&got, Ok(k) if k.is_empty()), "{got:?}");
    // The gateway's own token: its Gateway, key included.
    let keys = ingress_keys(grpc, &root, "edge", me).await.unwrap();
    assert_eq!(keys, vec![cert.signing_key.serialize_pem()]);
}

async fn eventually_logged(log: &std::path::Path, what: &str) {
    for _ in 0..100 {
        if std::fs::read_to_string(log)
            .is_ok_and(|l| l.lines().any(|l| l.contains(what) && l.contains("WARN")))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "no WARN line with {what:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Subscribes to the Ingress type as `proxy_id` with `token`, then to
/// Address (whose answer ends the wait): the private keys of the Ingress
/// resources received before it. Err when the stream is refused.
async fn ingress_keys(
    grpc: u16,
    root: &str,
    token: &str,
    proxy_id: &str,
) -> Result<Vec<String>, tonic::Status> {
    use mesh_proto::envoy::config::core::v3::Node;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use prost::Message;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name("istiod-lite.istio-system.svc");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let sub = |t: &str| DeltaDiscoveryRequest {
        type_url: t.to_string(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: proxy_id.to_string(),
            ..Default::default()
        }),
        ..sub(mesh_proto::INGRESS_TYPE_URL)
    };
    let requests = futures::stream::iter([first, sub(mesh_proto::ADDRESS_TYPE_URL)])
        .chain(futures::stream::pending());
    let mut req = tonic::Request::new(requests);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", sa_jwt(token)).parse().unwrap(),
    );
    let mut rx = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    let mut keys = Vec::new();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), rx.message())
            .await
            .expect("a response within 5 s")?
            .expect("stream open");
        if r.type_url == mesh_proto::ADDRESS_TYPE_URL {
            return Ok(keys);
        }
        for res in r.resources {
            let any = res.resource.expect("body");
            let i = mesh_proto::mesh::waypoint::Ingress::decode(any.value.as_slice()).unwrap();
            keys.extend(
                i.listeners
                    .iter()
                    .filter_map(|l| l.certificate.as_ref())
                    .map(|c| c.private_key.clone()),
            );
        }
    }
}

/// A new pod may authenticate before the informer has seen it: its token
/// is refused (the pod is unknown) but that refusal is not remembered, so
/// once the pod is known its next call is answered.
#[tokio::test]
async fn an_unknown_pods_refusal_is_not_remembered() {
    use istiod_lite::ca::auth::Authenticator;
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let url = |s: &str| {
        base64(s)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    let token = format!(
        "{}.{}.c2ln",
        url(r#"{"alg":"RS256"}"#),
        url(&format!(r#"{{"aud":["istio-ca"],"exp":{}}}"#, now + 3600))
    );
    // No node-name in the review: the pod's node comes from the model.
    state.lock().unwrap().reviews.insert(
        token.clone(),
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": "system:serviceaccount:shop:wp",
            "extra": {"authentication.kubernetes.io/pod-name": ["wp-1"],
                      "authentication.kubernetes.io/pod-uid": ["u-wp-1"]}}}),
    );
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    let reviewer = TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        hub.clone(),
    );
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let err = reviewer.authenticate(&md).await.unwrap_err();
    assert!(err.to_string().contains("wp-1"), "{err}");
    hub.apply(vec![upsert(yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: wp-1, namespace: shop, uid: u-wp-1}\nspec: {nodeName: node-1, serviceAccountName: wp, containers: [{name: c, image: x}]}\nstatus: {phase: Running, podIP: 10.0.0.9}\n",
    ))]);
    let caller = reviewer
        .authenticate(&md)
        .await
        .expect("answered once the pod is known");
    assert_eq!(caller.node, "node-1");
}

/// Acceptances are kept least recently used first out: when the cache is
/// full a new acceptance is still remembered (the one unused longest goes),
/// and one pod's many tokens keep at most a few entries.
#[tokio::test]
async fn acceptances_are_kept_least_recently_used_first_out_and_few_per_pod() {
    use istiod_lite::ca::auth::Authenticator;
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let url = |s: &str| {
        base64(s)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    let token = |n: usize| {
        format!(
            "{}.{}.c2ln",
            url(r#"{"alg":"RS256"}"#),
            url(&format!(
                r#"{{"aud":["istio-ca"],"exp":{},"n":{n}}}"#,
                now + 3600
            ))
        )
    };
    let review = |pod: &str| {
        json!({"authenticated": true, "audiences": ["istio-ca"], "user": {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {"authentication.kubernetes.io/pod-name": [pod],
                      "authentication.kubernetes.io/pod-uid": [format!("u-{pod}")],
                      "authentication.kubernetes.io/node-name": ["node-1"]}}})
    };
    let full = 10_000;
    {
        let mut st = state.lock().unwrap();
        for n in 0..=full {
            st.reviews.insert(token(n), review(&format!("zt-{n}")));
        }
        // One pod's five tokens.
        for n in full + 1..=full + 5 {
            st.reviews.insert(token(n), review("zt-many"));
        }
    }
    let client = serve(state.clone(), "a").await;
    let reviewer = TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        Hub::new(Model::new(ModelConfig::default())),
    );
    let auth = |t: String| {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        md
    };
    let calls = || state.lock().unwrap().review_calls;
    // One pod's fifth token pushes its first out, not another pod's.
    for n in full + 1..=full + 5 {
        reviewer.authenticate(&auth(token(n))).await.expect("many");
    }
    let before = calls();
    reviewer.authenticate(&auth(token(full + 5))).await.unwrap();
    assert_eq!(calls(), before, "its latest token is remembered");
    reviewer.authenticate(&auth(token(full + 1))).await.unwrap();
    assert_eq!(calls(), before + 1, "its first token is reviewed again");
    // Fill the cache with other pods' acceptances; token 0 stays in use.
    for n in 0..full {
        reviewer.authenticate(&auth(token(n))).await.expect("zt");
        reviewer.authenticate(&auth(token(0))).await.expect("zt-0");
    }
    let before = calls();
    reviewer.authenticate(&auth(token(full))).await.unwrap();
    reviewer.authenticate(&auth(token(full))).await.unwrap();
    reviewer.authenticate(&auth(token(0))).await.unwrap();
    assert_eq!(
        calls(),
        before + 1,
        "a new acceptance is remembered when full, and the one in use is kept"
    );
}

/// While every review slot is held by a stalled API server (or a flood of
/// strangers' tokens), another caller is not queued for good: after a
/// short wait it is told UNAVAILABLE (and its proxy backs off).
#[tokio::test]
async fn a_caller_waits_briefly_for_a_review_slot_then_is_told_unavailable() {
    use istiod_lite::ca::auth::{AuthError, Authenticator};
    use istiod_lite::cluster::tokenreview::REVIEWS_AT_ONCE;
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    state.lock().unwrap().faults.push(Fault {
        method: "POST",
        path_contains: "tokenreviews".into(),
        body_contains: None,
        status: 0,
        times: None,
    });
    let client = serve(state.clone(), "a").await;
    let reviewer = Arc::new(TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        Hub::new(Model::new(ModelConfig::default())),
    ));
    let auth = |t: String| {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        md
    };
    for i in 0..REVIEWS_AT_ONCE {
        let r = reviewer.clone();
        let md = auth(sa_jwt(&format!("flood{i}")));
        tokio::spawn(async move { r.authenticate(&md).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        reviewer.authenticate(&auth(sa_jwt("legit"))),
    )
    .await
    .expect("answered within a few seconds");
    assert!(matches!(answer, Err(AuthError::Busy)), "{answer:?}");
    assert_eq!(AuthError::Busy.status("x").code(), tonic::Code::Unavailable);
}

/// A JWT whose payload (unverified) names pod `ns/name` with `uid`, as a
/// projected service-account token's `kubernetes.io` claim does.
fn pod_jwt(ns: &str, name: &str, uid: &str) -> String {
    let url = |s: &str| {
        base64(s)
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    format!(
        "{}.{}.c2lnbmF0dXJl",
        url(r#"{"alg":"RS256","kid":"k"}"#),
        url(&format!(
            r#"{{"aud":["istio-ca"],"kubernetes.io":{{"namespace":"{ns}","pod":{{"name":"{name}","uid":"{uid}"}}}}}}"#
        ))
    )
}

/// A reviewer against an API server that never answers a TokenReview,
/// whose model knows pod istio-system/ztunnel-x (uid u-zt).
async fn stalled_reviewer() -> Arc<TokenReviewer> {
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    state.lock().unwrap().faults.push(Fault {
        method: "POST",
        path_contains: "tokenreviews".into(),
        body_contains: None,
        status: 0,
        times: None,
    });
    let client = serve(state.clone(), "a").await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.apply(vec![upsert(yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-x, namespace: istio-system, uid: u-zt}\n\
         spec: {nodeName: node-1, serviceAccountName: ztunnel, containers: [{name: c, image: x}]}\n\
         status: {phase: Running, podIP: 10.0.0.9}\n",
    ))]);
    // Another node's ztunnel, and a plain pod (neither a node agent's nor a
    // Gateway's).
    hub.apply(vec![upsert(yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-y, namespace: istio-system, uid: u-zy}\n\
         spec: {nodeName: node-2, serviceAccountName: ztunnel, containers: [{name: c, image: x}]}\n\
         status: {phase: Running, podIP: 10.0.0.8}\n",
    ))]);
    hub.apply(vec![upsert(yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, uid: u-web}\n\
         spec: {nodeName: node-1, serviceAccountName: web, containers: [{name: c, image: x}]}\n\
         status: {phase: Running, podIP: 10.0.0.7}\n",
    ))]);
    Arc::new(TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        hub,
    ))
}

fn bearer_md(t: &str) -> tonic::metadata::MetadataMap {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", format!("Bearer {t}").parse().unwrap());
    md
}

/// Strangers' tokens filling every general review slot (here against an
/// API server that stalls) do not keep out a token whose unverified claims
/// name a ztunnel's pod the model knows: a share of the slots is kept for
/// node agents' and Gateways' pods, so
/// its review is sent (and waits on the API server) instead of being
/// refused UNAVAILABLE.
#[tokio::test]
async fn a_known_pods_token_gets_a_review_slot_while_strangers_hold_the_rest() {
    use istiod_lite::ca::auth::{AuthError, Authenticator};
    use istiod_lite::cluster::tokenreview::REVIEWS_AT_ONCE;
    let reviewer = stalled_reviewer().await;
    for i in 0..REVIEWS_AT_ONCE {
        let r = reviewer.clone();
        let md = bearer_md(&pod_jwt("shop", &format!("stranger-{i}"), "u-x"));
        tokio::spawn(async move { r.authenticate(&md).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A stranger more is refused after its brief wait.
    let stranger = tokio::time::timeout(
        Duration::from_secs(5),
        reviewer.authenticate(&bearer_md(&pod_jwt("shop", "stranger-x", "u-x"))),
    )
    .await
    .expect("answered within a few seconds");
    assert!(matches!(stranger, Err(AuthError::Busy)), "{stranger:?}");
    // The known pod's token is reviewed: it waits on the API server.
    let known = tokio::time::timeout(
        Duration::from_secs(3),
        reviewer.authenticate_from(
            &bearer_md(&pod_jwt("istio-system", "ztunnel-x", "u-zt")),
            Some("10.0.0.9".parse().unwrap()),
        ),
    )
    .await;
    assert!(known.is_err(), "not sent for review: {known:?}");
}

/// One address flooding reviews (against an API server that stalls) has
/// at most a few waiting or in flight: past them it is refused UNAVAILABLE
/// at once, and the review slots stay free for other addresses.
#[tokio::test]
async fn one_address_has_only_a_few_reviews_in_flight() {
    use istiod_lite::ca::auth::{AuthError, Authenticator};
    use istiod_lite::cluster::tokenreview::REVIEWS_AT_ONCE;
    let reviewer = stalled_reviewer().await;
    let flooder: std::net::IpAddr = "10.9.9.9".parse().unwrap();
    for i in 0..REVIEWS_AT_ONCE {
        let r = reviewer.clone();
        let md = bearer_md(&pod_jwt("shop", &format!("stranger-{i}"), "u-x"));
        tokio::spawn(async move { r.authenticate_from(&md, Some(flooder)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let more = tokio::time::timeout(
        Duration::from_millis(500),
        reviewer.authenticate_from(
            &bearer_md(&pod_jwt("shop", "stranger-x", "u-x")),
            Some(flooder),
        ),
    )
    .await
    .expect("refused at once");
    assert!(matches!(more, Err(AuthError::Busy)), "{more:?}");
    // Another address's token (a stranger's too) is sent for review.
    let other = tokio::time::timeout(
        Duration::from_secs(3),
        reviewer.authenticate_from(
            &bearer_md(&pod_jwt("shop", "other", "u-y")),
            Some("10.8.8.8".parse().unwrap()),
        ),
    )
    .await;
    assert!(other.is_err(), "not sent for review: {other:?}");
}

/// `pod_jwt` with a signature of its own: a new token (digest) naming the
/// same pod, as a pod that knows the uid can forge.
fn forged(ns: &str, name: &str, uid: &str, i: usize) -> String {
    format!("{}A{i}", pod_jwt(ns, name, uid))
}

/// Fills the unreserved review slots of a stalled reviewer with strangers.
async fn fill_unreserved(reviewer: &Arc<TokenReviewer>) {
    use istiod_lite::ca::auth::Authenticator;
    use istiod_lite::cluster::tokenreview::{RESERVED_FOR_KNOWN, REVIEWS_AT_ONCE};
    for i in 0..REVIEWS_AT_ONCE - RESERVED_FOR_KNOWN {
        let r = reviewer.clone();
        let md = bearer_md(&pod_jwt("shop", &format!("stranger-{i}"), "u-x"));
        tokio::spawn(async move { r.authenticate(&md).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Whether a token is sent for review (so waits on the stalled API
/// server) rather than refused within a few seconds.
async fn sent_for_review(reviewer: &Arc<TokenReviewer>, token: &str, from: &str) -> bool {
    use istiod_lite::ca::auth::Authenticator;
    let from: std::net::IpAddr = from.parse().unwrap();
    tokio::time::timeout(
        Duration::from_secs(3),
        reviewer.authenticate_from(&bearer_md(token), Some(from)),
    )
    .await
    .is_err()
}

/// The reserved slots are for node agents' and Gateways' pods only: a
/// plain pod the model knows, forging tokens that name itself (each a new
/// digest), takes none of them, so a ztunnel's token still gets one.
#[tokio::test]
async fn a_plain_pods_forged_tokens_take_no_reserved_slot() {
    use istiod_lite::ca::auth::Authenticator;
    use istiod_lite::cluster::tokenreview::RESERVED_FOR_KNOWN;
    let reviewer = stalled_reviewer().await;
    fill_unreserved(&reviewer).await;
    for i in 0..RESERVED_FOR_KNOWN {
        let r = reviewer.clone();
        let md = bearer_md(&forged("shop", "web-1", "u-web", i));
        tokio::spawn(async move { r.authenticate(&md).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sent_for_review(
            &reviewer,
            &pod_jwt("istio-system", "ztunnel-x", "u-zt"),
            "10.0.0.9"
        )
        .await,
        "the ztunnel's token found no slot"
    );
}

/// One review per claimed pod at a time: forged tokens naming one
/// ztunnel's pod, even sent from its own address, hold one reserved slot,
/// so another ztunnel's token gets one of the rest.
#[tokio::test]
async fn forged_tokens_naming_one_pod_hold_one_reserved_slot() {
    use istiod_lite::ca::auth::Authenticator;
    use istiod_lite::cluster::tokenreview::RESERVED_FOR_KNOWN;
    let reviewer = stalled_reviewer().await;
    fill_unreserved(&reviewer).await;
    for i in 0..RESERVED_FOR_KNOWN {
        let r = reviewer.clone();
        let md = bearer_md(&forged("istio-system", "ztunnel-x", "u-zt", i));
        let from: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        tokio::spawn(async move { r.authenticate_from(&md, Some(from)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sent_for_review(
            &reviewer,
            &pod_jwt("istio-system", "ztunnel-y", "u-zy"),
            "10.0.0.8"
        )
        .await,
        "the other ztunnel's token found no slot"
    );
}

/// Forged tokens naming a ztunnel's pod, sent from addresses that are not
/// the pod's, neither take reserved slots nor queue ahead of the pod's own
/// token: the real ztunnel's token, from its own address, is still sent
/// for review (not told UNAVAILABLE after waiting behind them).
#[tokio::test]
async fn forged_tokens_from_other_addresses_do_not_queue_ahead_of_the_pods_own() {
    use istiod_lite::ca::auth::Authenticator;
    let reviewer = stalled_reviewer().await;
    fill_unreserved(&reviewer).await;
    for i in 0..12 {
        let r = reviewer.clone();
        let md = bearer_md(&forged("istio-system", "ztunnel-x", "u-zt", i));
        let from: std::net::IpAddr = format!("10.7.0.{i}").parse().unwrap();
        tokio::spawn(async move { r.authenticate_from(&md, Some(from)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sent_for_review(
            &reviewer,
            &pod_jwt("istio-system", "ztunnel-x", "u-zt"),
            "10.0.0.9"
        )
        .await,
        "the ztunnel's own token was refused"
    );
}

/// A token naming a ztunnel's pod whose one reserved turn is taken (here
/// by a forged token from the pod's own address) does not wait behind it:
/// it takes a free unreserved slot at once.
#[tokio::test]
async fn a_claimed_pods_second_token_takes_a_free_unreserved_slot() {
    use istiod_lite::ca::auth::Authenticator;
    let reviewer = stalled_reviewer().await;
    let from: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    let r = reviewer.clone();
    let md = bearer_md(&forged("istio-system", "ztunnel-x", "u-zt", 0));
    tokio::spawn(async move { r.authenticate_from(&md, Some(from)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sent_for_review(
            &reviewer,
            &pod_jwt("istio-system", "ztunnel-x", "u-zt"),
            "10.0.0.9"
        )
        .await,
        "the second token waited behind the first and was refused"
    );
}

/// A ztunnel asks for a certificate per local identity at once, all with
/// its one token: with nothing remembered (a token without `exp` is never
/// cached), a burst of 8 from its one address all succeed, on one review.
#[tokio::test]
async fn a_ztunnels_burst_with_one_token_is_reviewed_once_and_all_succeed() {
    use istiod_lite::ca::auth::Authenticator;
    mesh_core::tls::install_default_provider();
    let state = Shared::default();
    state.lock().unwrap().reviews.insert(
        "zt".into(),
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": "system:serviceaccount:istio-system:ztunnel",
                        "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-x"],
                                  "authentication.kubernetes.io/pod-uid": ["u-zt"],
                                  "authentication.kubernetes.io/node-name": ["node-1"]}}}),
    );
    let client = serve(state.clone(), "a").await;
    let reviewer = Arc::new(TokenReviewer::new(
        client,
        ReviewConfig {
            audience: "istio-ca".into(),
            ztunnel_account: ("istio-system".into(), "ztunnel".into()),
            trust_domain: "cluster.local".into(),
        },
        Hub::new(Model::new(ModelConfig::default())),
    ));
    let peer: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let r = reviewer.clone();
            tokio::spawn(async move {
                r.authenticate_from(&bearer_md(&sa_jwt("zt")), Some(peer))
                    .await
            })
        })
        .collect();
    for b in burst {
        let caller = b.await.unwrap().expect("each of the burst succeeds");
        assert_eq!(caller.node, "node-1");
    }
    assert_eq!(
        state.lock().unwrap().review_calls,
        1,
        "one review for the burst"
    );
}

/// The xDS server passes each caller's address to the authenticator: one
/// address opening streams with strangers' tokens has at most a few
/// reviews in flight, and its next stream is refused UNAVAILABLE at once
/// (passed no address, it would wait for a free slot instead).
#[tokio::test]
async fn xds_passes_the_callers_address_to_the_review_bound() {
    use istiod_lite::cluster::tokenreview::REVIEWS_PER_PEER;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let reviewer = stalled_reviewer().await;
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.set_ready();
    let ads = istiod_lite::xds::AdsService::new(hub, reviewer).into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        istiod_lite::ca::with_limits(tonic::transport::Server::builder())
            .add_service(ads)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let open = |i: usize| {
        let channel = channel.clone();
        async move {
            let (_tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(1);
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let token = pod_jwt("shop", &format!("stranger-{i}"), "u-x");
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            AggregatedDiscoveryServiceClient::new(channel)
                .delta_aggregated_resources(req)
                .await
                .map(|_| ())
        }
    };
    for i in 0..REVIEWS_PER_PEER {
        tokio::spawn(open(i));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = tokio::time::timeout(Duration::from_millis(700), open(99))
        .await
        .expect("refused at once");
    assert_eq!(next.err().map(|s| s.code()), Some(tonic::Code::Unavailable));
}
