//! Delta ADS over real gRPC (in-process, plaintext): waypoint routes go
//! only to waypoints, and to each only the routes of its own services;
//! an ingress Gateway's resource only to that Gateway's pods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use istiod_lite::ca::auth::BootstrapTokens;
use istiod_lite::config::objects::{Change, Object};
use istiod_lite::model::{Model, ModelConfig};
use istiod_lite::xds::{AdsService, Hub};
use mesh_proto::envoy::config::core::v3::Node;
use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::mesh::waypoint::{Ingress, Protocol, ServiceRoutes};
use mesh_proto::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, INGRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-a, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp-a, namespace: shop}
spec: {clusterIP: 10.96.0.100, ports: [{port: 15008}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-b, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp-b, namespace: shop}
spec: {clusterIP: 10.96.0.101, ports: [{port: 15008}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-a-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-a}}
spec: {nodeName: node-a, serviceAccountName: wp-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-b-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-b}}
spec: {nodeName: node-a, serviceAccountName: wp-b, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.12, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: wp-b}}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

fn web(waypoint: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop, labels: {{istio.io/use-waypoint: {waypoint}}}}}
spec: {{selector: {{app: web}}, clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}, {{name: grpc-x, port: 90}}, {{port: 5432, appProtocol: tcp}}]}}
"#
    )
}

const WEB: &str = "shop/web.shop.svc.cluster.local";
const API: &str = "shop/api.shop.svc.cluster.local";

fn changes(yaml: &str) -> Vec<Change> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| Change::Upsert(Object::parse(v).unwrap().unwrap()))
        .collect()
}

fn token(node: &str) -> String {
    format!("bootstrap-token-for-{node}-0123456789")
}

/// A pod's own token ("namespace/pod"), as an ingress gateway's pod holds.
fn pod_token(pod: &str) -> String {
    format!("pod-token-for-{}-0123456789", pod.replace('/', "-"))
}

const PODS_WITH_TOKENS: [&str; 3] = ["shop/edge-1", "shop/edge-2-1", "shop/web-1"];

async fn serve(yaml: &str) -> (Arc<Hub>, SocketAddr) {
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.apply(changes(yaml));
    hub.set_ready();
    let tokens = BootstrapTokens::new(
        ["node-a", "node-b"]
            .into_iter()
            .map(|n| (n.to_string(), token(n)))
            .chain(PODS_WITH_TOKENS.map(|p| (p.to_string(), pod_token(p)))),
    )
    .unwrap()
    .with_pods(hub.clone());
    let ads = AdsService::new(hub.clone(), Arc::new(tokens)).into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        istiod_lite::ca::with_limits(tonic::transport::Server::builder())
            .add_service(ads)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (hub, addr)
}

/// One proxy's stream: the first request carries its Node.
struct Proxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    /// Names of the waypoint Gateway resources (`gateway:ns/name`) this
    /// proxy holds, kept apart from the services' routes.
    gateways: std::collections::BTreeSet<String>,
}

fn subscribe(type_url: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    }
}

impl Proxy {
    /// Connects as `proxy_id` with `node`'s token and subscribes to `first`.
    async fn connect(addr: SocketAddr, node: &str, proxy_id: &str, first: &str) -> Proxy {
        Proxy::connect_with(addr, &token(node), proxy_id, first)
            .await
            .unwrap()
    }

    /// Connects as `proxy_id` with `pod`'s own token ("namespace/pod").
    async fn as_pod(addr: SocketAddr, pod: &str, proxy_id: &str, first: &str) -> Proxy {
        Proxy::connect_with(addr, &pod_token(pod), proxy_id, first)
            .await
            .unwrap()
    }

    /// Connects as `proxy_id` with `bearer` and subscribes to `first`: Err
    /// when the controller refuses the stream.
    async fn connect_with(
        addr: SocketAddr,
        bearer: &str,
        proxy_id: &str,
        first: &str,
    ) -> Result<Proxy, tonic::Status> {
        Proxy::connect_holding(addr, bearer, proxy_id, first, &[]).await
    }

    /// As `connect_with`, claiming to hold `held` (name, version) already,
    /// as a proxy that reconnects does.
    async fn connect_holding(
        addr: SocketAddr,
        bearer: &str,
        proxy_id: &str,
        first: &str,
        held: &[(&str, &str)],
    ) -> Result<Proxy, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // As a ztunnel's client: responses up to 64 MiB.
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: proxy_id.into(),
                ..Default::default()
            }),
            initial_resource_versions: held
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            ..subscribe(first)
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
        let rx = client.delta_aggregated_resources(req).await?.into_inner();
        Ok(Proxy {
            tx,
            rx,
            gateways: Default::default(),
        })
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5 s")
            .unwrap()
            .expect("stream open")
    }

    /// Nothing arrives within a short while.
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await {
            panic!("expected nothing, got {m:?}");
        }
    }

    /// The next response must be ServiceRoutes: (services' routes sent,
    /// their names removed). The Gateway's own resource goes to `gateways`.
    async fn routes(&mut self) -> (Vec<ServiceRoutes>, Vec<String>) {
        let r = self.next().await;
        assert_eq!(r.type_url, SERVICE_ROUTES_TYPE_URL, "{r:?}");
        let gw = |n: &str| n.starts_with(mesh_proto::WAYPOINT_GATEWAY_PREFIX);
        let mut sent = Vec::new();
        for res in &r.resources {
            if gw(&res.name) {
                self.gateways.insert(res.name.clone());
                continue;
            }
            let any = res.resource.as_ref().expect("body");
            sent.push(ServiceRoutes::decode(any.value.as_slice()).expect("decodes"));
        }
        let mut removed = Vec::new();
        for n in r.removed_resources {
            if gw(&n) {
                self.gateways.remove(&n);
            } else {
                removed.push(n);
            }
        }
        (sent, removed)
    }
}

fn keys(routes: &[ServiceRoutes]) -> Vec<String> {
    routes
        .iter()
        .map(|r| format!("{}/{}", r.namespace, r.hostname))
        .collect()
}

#[tokio::test]
async fn only_a_waypoint_gets_routes_and_only_for_its_own_services() {
    let (hub, addr) = serve(&format!("{MESH}---\n{}", web("wp-a"))).await;

    // A ztunnel that asks for routes is refused: the next response on its
    // stream answers its next subscription, not that one.
    let mut ztunnel =
        Proxy::connect(addr, "node-a", "ztunnel~node-a", SERVICE_ROUTES_TYPE_URL).await;
    ztunnel.send(subscribe(ADDRESS_TYPE_URL)).await;
    assert_eq!(ztunnel.next().await.type_url, ADDRESS_TYPE_URL);

    // So is a waypoint's pod claimed from another node, and a pod that is
    // no waypoint.
    let mut elsewhere = Proxy::connect(
        addr,
        "node-b",
        "waypoint~shop~wp-a-1",
        SERVICE_ROUTES_TYPE_URL,
    )
    .await;
    elsewhere.send(subscribe(AUTHORIZATION_TYPE_URL)).await;
    assert_eq!(elsewhere.next().await.type_url, AUTHORIZATION_TYPE_URL);
    let mut impostor = Proxy::connect(
        addr,
        "node-a",
        "waypoint~shop~web-1",
        SERVICE_ROUTES_TYPE_URL,
    )
    .await;
    impostor.send(subscribe(AUTHORIZATION_TYPE_URL)).await;
    assert_eq!(impostor.next().await.type_url, AUTHORIZATION_TYPE_URL);
    // A refused proxy that reconnects claiming routes (a waypoint whose
    // Gateway went away while it was disconnected) is told to drop them,
    // so it never serves on with stale policies.
    let mut stale = Proxy::connect_holding(
        addr,
        &token("node-a"),
        "waypoint~shop~web-1",
        SERVICE_ROUTES_TYPE_URL,
        &[(WEB, "old")],
    )
    .await
    .unwrap();
    let (sent, removed) = stale.routes().await;
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(removed, vec![WEB]);

    // Each waypoint gets exactly the services that use it.
    let mut a = Proxy::connect(
        addr,
        "node-a",
        "waypoint~shop~wp-a-1",
        SERVICE_ROUTES_TYPE_URL,
    )
    .await;
    let (sent, _) = a.routes().await;
    assert_eq!(keys(&sent), vec![WEB]);
    // And its own Gateway's resource, no other Gateway's.
    assert_eq!(
        a.gateways.iter().collect::<Vec<_>>(),
        vec!["gateway:shop/wp-a"]
    );
    let web_routes = &sent[0];
    let ports: Vec<(u32, i32)> = web_routes
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        vec![
            (80, Protocol::Http1 as i32),
            (90, Protocol::Http2 as i32),
            (5432, Protocol::Tcp as i32)
        ]
    );
    assert_eq!(
        web_routes
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        vec!["shop/web-get-only"]
    );
    let mut b = Proxy::connect(
        addr,
        "node-a",
        "waypoint~shop~wp-b-1",
        SERVICE_ROUTES_TYPE_URL,
    )
    .await;
    let (sent, _) = b.routes().await;
    assert_eq!(keys(&sent), vec![API]);

    // web moves to wp-b: its routes are the same, yet it leaves wp-a and
    // joins wp-b.
    hub.apply(changes(&web("wp-b")));
    let (sent, removed) = a.routes().await;
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(removed, vec![WEB]);
    let (sent, removed) = b.routes().await;
    assert_eq!(keys(&sent), vec![WEB]);
    assert!(removed.is_empty(), "{removed:?}");

    // The refused got nothing of it (ztunnels do get the Address change).
    assert_eq!(ztunnel.next().await.type_url, ADDRESS_TYPE_URL);
    ztunnel.quiet().await;
    elsewhere.quiet().await;
    impostor.quiet().await;
}

#[tokio::test]
async fn a_waypoint_refused_before_its_pod_is_known_is_served_once_it_is() {
    let (hub, addr) = serve(&format!("{MESH}---\n{}", web("wp-a"))).await;
    let mut early = Proxy::connect(
        addr,
        "node-b",
        "waypoint~shop~wp-a-2",
        SERVICE_ROUTES_TYPE_URL,
    )
    .await;
    early.quiet().await;
    hub.apply(changes(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: wp-a-2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-a}}
spec: {nodeName: node-b, serviceAccountName: wp-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.20, phase: Running}
"#,
    ));
    let (sent, _) = early.routes().await;
    assert_eq!(keys(&sent), vec![WEB]);

    // Its Gateway stops being a waypoint: its routes are withdrawn.
    hub.apply(changes(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-a, namespace: shop}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
"#,
    ));
    let (sent, removed) = early.routes().await;
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(removed, vec![WEB]);
    assert!(early.gateways.is_empty(), "{:?}", early.gateways);
}

const INGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: mesh-ingress
  listeners:
  - {name: https, port: 443, protocol: HTTPS, hostname: shop.example.com, tls: {certificateRefs: [{name: shop-cert}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge-2, namespace: shop}
spec: {gatewayClassName: mesh-ingress, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: edge-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: edge}}
spec: {nodeName: node-a, serviceAccountName: edge, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.30, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: edge-2-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: edge-2}}
spec: {nodeName: node-a, serviceAccountName: edge-2, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.31, phase: Running}
"#;

fn tls_secret(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-cert, namespace: shop}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&cert.cert.pem()),
        indent(&cert.signing_key.serialize_pem())
    )
}

impl Proxy {
    /// The next response must be Ingress: (resources sent, names removed).
    async fn ingresses(&mut self) -> (Vec<Ingress>, Vec<String>) {
        let r = self.next().await;
        assert_eq!(r.type_url, INGRESS_TYPE_URL, "{r:?}");
        let sent = r
            .resources
            .iter()
            .map(|r| {
                let any = r.resource.as_ref().expect("body");
                Ingress::decode(any.value.as_slice()).expect("decodes")
            })
            .collect();
        (sent, r.removed_resources)
    }
}

#[tokio::test]
async fn an_ingress_pod_gets_only_its_own_gateway_with_its_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let (hub, addr) = serve(&format!("{MESH}---\n{INGRESS}---\n{}", tls_secret(&cert))).await;

    // Refused: a ztunnel, a waypoint. The next response each sees answers
    // its next subscription.
    let mut refused = vec![
        Proxy::connect(addr, "node-a", "ztunnel~node-a", INGRESS_TYPE_URL).await,
        Proxy::connect(addr, "node-a", "waypoint~shop~wp-a-1", INGRESS_TYPE_URL).await,
    ];
    // A pod of no Gateway opens no stream at all with its own token (the
    // mesh's state is not for every pod to read).
    let err = Proxy::connect_with(
        addr,
        &pod_token("shop/web-1"),
        "ingress~shop~web-1",
        INGRESS_TYPE_URL,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    for p in &mut refused {
        p.send(subscribe(AUTHORIZATION_TYPE_URL)).await;
        assert_eq!(p.next().await.type_url, AUTHORIZATION_TYPE_URL);
    }
    // One gateway pod's token does not open another's stream.
    let err = Proxy::connect_with(
        addr,
        &pod_token("shop/edge-2-1"),
        "ingress~shop~edge-1",
        INGRESS_TYPE_URL,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // The Gateway's pod gets its Gateway, certificate and key included.
    let mut edge =
        Proxy::as_pod(addr, "shop/edge-1", "ingress~shop~edge-1", INGRESS_TYPE_URL).await;
    let (sent, _) = edge.ingresses().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let i = &sent[0];
    assert_eq!((i.namespace.as_str(), i.name.as_str()), ("shop", "edge"));
    let l = &i.listeners[0];
    assert_eq!((l.name.as_str(), l.port), ("https", 443));
    let c = l.certificate.as_ref().expect("certificate");
    assert_eq!(c.source, "shop/shop-cert");
    assert_eq!(c.cert_chain, cert.cert.pem());
    assert_eq!(c.private_key, cert.signing_key.serialize_pem());
    assert_eq!(i.backends[0].service, WEB);

    // A pod of another ingress Gateway gets that one only, even when it
    // names this one.
    let mut other = Proxy::as_pod(
        addr,
        "shop/edge-2-1",
        "ingress~shop~edge-2-1",
        INGRESS_TYPE_URL,
    )
    .await;
    let (sent, _) = other.ingresses().await;
    assert_eq!(
        sent.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        vec!["edge-2"]
    );
    other
        .send(DeltaDiscoveryRequest {
            type_url: INGRESS_TYPE_URL.into(),
            resource_names_subscribe: vec!["shop/edge".into()],
            ..Default::default()
        })
        .await;
    let (sent, _) = other.ingresses().await;
    assert!(sent.is_empty(), "{sent:?}");

    // A new certificate in the Secret is pushed to the pod, and to no one else.
    let renewed = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    hub.apply(changes(&tls_secret(&renewed)));
    let (sent, _) = edge.ingresses().await;
    let c = sent[0].listeners[0]
        .certificate
        .as_ref()
        .expect("certificate");
    assert_eq!(c.cert_chain, renewed.cert.pem());
    other.quiet().await;
    for p in &mut refused {
        p.quiet().await;
    }

    // The Secret goes: the listener is left out, the Gateway is still sent.
    hub.apply(vec![Change::Delete(
        Object::parse(serde_yaml::from_str(&tls_secret(&renewed)).unwrap())
            .unwrap()
            .unwrap()
            .key(),
    )]);
    let (sent, _) = edge.ingresses().await;
    assert!(sent[0].listeners.is_empty(), "{sent:?}");

    // The pod is relabelled to another Gateway: it is not that Gateway's
    // pod (it runs as edge's account, not edge-2's), so it is no Gateway's
    // pod at all any more, and its stream is cut off.
    hub.apply(changes(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: edge-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: edge-2}}
spec: {nodeName: node-a, serviceAccountName: edge, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.30, phase: Running}
"#,
    ));
    let end = end_of(&mut edge).await.expect_err("cut off");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
}

/// A Gateway's pod whose Gateway goes is cut off (PERMISSION_DENIED), not
/// left subscribed: may_open is checked again whenever Gateways or their
/// pods change.
#[tokio::test]
async fn a_pod_that_loses_its_gateway_is_cut_off() {
    let (hub, addr) = serve(&format!("{MESH}---\n{INGRESS}")).await;
    let mut edge =
        Proxy::as_pod(addr, "shop/edge-1", "ingress~shop~edge-1", INGRESS_TYPE_URL).await;
    edge.ingresses().await;
    hub.apply(vec![Change::Delete(
        istiod_lite::config::objects::ObjectKey {
            kind: istiod_lite::config::objects::Kind::Gateway,
            namespace: "shop".into(),
            name: "edge".into(),
        },
    )]);
    let end = end_of(&mut edge).await.expect_err("cut off");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    eventually_connected(&hub, 0).await;
}

/// A pod labelled as a Gateway's but not running as the service account
/// the controller gives that Gateway's pods is no Gateway's pod: anyone who
/// may create a pod beside a waypoint could label one.
#[tokio::test]
async fn a_labelled_pod_of_another_account_is_refused() {
    let (_hub, addr) = serve(&format!(
        "{MESH}---\n{}",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, gateway.networking.k8s.io/gateway-name: wp-a}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.12, phase: Running}
"#
    ))
    .await;
    let refused = open_status(addr, &pod_token("shop/web-1"), "waypoint~shop~web-1", &[])
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("service account"), "{refused:?}");
}

/// A ztunnel's node token may not open an ingress gateway's stream, even for
/// a gateway pod on its own node: the Ingress resource carries private keys,
/// and only the gateway pod's own credential gets them.
#[tokio::test]
async fn a_node_token_never_gets_an_ingress_gateways_keys() {
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example.com".into()]).unwrap();
    let (_hub, addr) = serve(&format!("{MESH}---\n{INGRESS}---\n{}", tls_secret(&cert))).await;
    for first in [INGRESS_TYPE_URL, ADDRESS_TYPE_URL] {
        match Proxy::connect_with(addr, &token("node-a"), "ingress~shop~edge-1", first).await {
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
                assert!(s.message().contains("own"), "{s}");
            }
            Ok(mut p) => {
                let r = p.next().await;
                panic!(
                    "a node token opened the ingress pod's stream and got {} resource(s) of {}",
                    r.resources.len(),
                    r.type_url
                );
            }
        }
    }
    // The pod's own token gets them.
    let mut edge =
        Proxy::as_pod(addr, "shop/edge-1", "ingress~shop~edge-1", INGRESS_TYPE_URL).await;
    let (sent, _) = edge.ingresses().await;
    let c = sent[0].listeners[0]
        .certificate
        .as_ref()
        .expect("certificate");
    assert_eq!(c.private_key, cert.signing_key.serialize_pem());
}

/// A pod of `shop` on node-a at `ip`.
fn pod_at(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}

const POD_X: &str = "Kubernetes//Pod/shop/x";

/// The version of `name` in a response, if it is sent.
fn version_in(r: &DeltaDiscoveryResponse, name: &str) -> Option<String> {
    r.resources
        .iter()
        .find(|x| x.name == name)
        .map(|x| x.version.clone())
}

/// Reads Address responses until one carries `name`; its version.
async fn next_version_of(p: &mut Proxy, name: &str) -> String {
    loop {
        let r = p.next().await;
        if let Some(v) = version_in(&r, name) {
            return v;
        }
    }
}

/// The stream's end: its gRPC status (Ok(()) for a clean end).
async fn end_of(p: &mut Proxy) -> Result<(), tonic::Status> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), p.rx.message())
            .await
            .expect("the stream ends within 10 s")
        {
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            Err(s) => return Err(s),
        }
    }
}

#[tokio::test]
async fn an_oversized_request_ends_only_its_own_stream() {
    let (hub, addr) = serve(MESH).await;
    let mut good = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    good.next().await;
    let mut big = Proxy::connect(addr, "node-b", "ztunnel~node-b", ADDRESS_TYPE_URL).await;
    big.next().await;
    // One name of just over 64 MiB: over what a request may be.
    big.send(DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        resource_names_subscribe: vec!["x".repeat(64 << 20)],
        ..Default::default()
    })
    .await;
    // Its stream ends with a status naming our limit (the undecodable
    // request is not buffered, nor waited on).
    let end = end_of(&mut big).await.expect_err("an error status");
    assert_eq!(end.code(), tonic::Code::OutOfRange, "{end:?}");
    assert!(
        end.message().contains(&(64usize << 20).to_string()),
        "{end:?}"
    );
    // The other proxy is still served.
    hub.apply(changes(&pod_at("x", "10.0.0.50")));
    next_version_of(&mut good, POD_X).await;
    eventually_connected(&hub, 1).await;
}

/// A ztunnel that reconnects states every name and version it holds in its
/// first request: at 50 000 pods and 10 000 services that is some 5 MB,
/// and it must be served (else it keeps stale policy for good).
#[tokio::test]
async fn a_reconnecting_proxy_stating_over_4_mib_of_held_names_is_resynced() {
    let (_hub, addr) = serve(MESH).await;
    let held: Vec<(String, String)> = (0..60_000)
        .map(|i| {
            (
                format!(
                    "Kubernetes//Pod/shop/a-pod-name-long-as-they-are-in-a-real-cluster-{i:08}"
                ),
                format!("{i:016x}"),
            )
        })
        .collect();
    let size: usize = held.iter().map(|(n, v)| n.len() + v.len() + 6).sum();
    assert!(size > 4 << 20, "{size} bytes");
    let held_refs: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut p = Proxy::connect_holding(
        addr,
        &token("node-a"),
        "ztunnel~node-a",
        ADDRESS_TYPE_URL,
        &held_refs,
    )
    .await
    .expect("the stream opens");
    let r = p.next().await;
    // Everything it holds that is gone is removed; what exists is sent.
    let removed: std::collections::BTreeSet<&str> =
        r.removed_resources.iter().map(String::as_str).collect();
    assert_eq!(removed.len(), held.len());
    assert!(held.iter().all(|(n, _)| removed.contains(n.as_str())));
    assert!(version_in(&r, "Kubernetes//Pod/shop/web-1").is_some());
}

/// The names a proxy says it holds are bounded by twice the most the
/// type ever had (at least 100 000): more is refused before decoding.
#[tokio::test]
async fn stating_too_many_held_names_ends_the_stream() {
    let (hub, addr) = serve(MESH).await;
    let held: Vec<(String, String)> = (0..100_001)
        .map(|i| (format!("ns/n-{i}"), "0000000000000001".to_string()))
        .collect();
    let held_refs: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let end = match Proxy::connect_holding(
        addr,
        &token("node-a"),
        "ztunnel~node-a",
        ADDRESS_TYPE_URL,
        &held_refs,
    )
    .await
    {
        Ok(mut p) => end_of(&mut p).await,
        Err(s) => Err(s),
    };
    let end = end.expect_err("an error status");
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
    eventually_connected(&hub, 0).await;
}

/// Names held but not subscribed to are not kept for the stream's life.
#[tokio::test]
async fn held_names_not_subscribed_to_are_not_kept() {
    let (hub, addr) = serve(MESH).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~node-a".into(),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["Kubernetes//Pod/shop/web-1".into()],
        initial_resource_versions: (0..1000)
            .map(|i| (format!("ns/held-{i}"), "0000000000000001".to_string()))
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("node-a")).parse().unwrap(),
    );
    let mut rx = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await
        .unwrap()
        .into_inner();
    let r = rx.message().await.unwrap().expect("an answer");
    assert_eq!(r.resources.len(), 1);
    let c = hub.connections();
    assert_eq!(
        c["connections"][0]["types"][ADDRESS_TYPE_URL]["resources"], 1,
        "{c}"
    );
    drop(tx);
}

/// Waits until `n` streams are open.
async fn eventually_connected(hub: &Hub, n: usize) {
    for _ in 0..100 {
        if hub.connected() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.connected(), n, "open streams");
}

#[tokio::test]
async fn a_proxy_that_stops_reading_holds_up_no_other() {
    let (hub, addr) = serve(MESH).await;
    let mut good = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    good.next().await;
    // Subscribes, then never reads another response.
    let stalled = Proxy::connect(addr, "node-b", "ztunnel~node-b", ADDRESS_TYPE_URL).await;
    // Changes (each a response) until the stalled stream's HTTP/2 window
    // and queue are full and it falls behind, then more: the one that
    // reads gets each at once.
    let responses = |hub: &Hub, i: usize| {
        hub.connections()["connections"][i]["types"][ADDRESS_TYPE_URL]["responses_sent"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut last = String::new();
    let mut behind_since = None;
    for i in 0..4000 {
        let mut yaml = pod_at("x", &format!("10.0.{}.{}", 1 + i / 250, 1 + i % 250));
        for j in 0..40 {
            yaml.push_str("---\n");
            yaml.push_str(&pod_at(
                &format!("bulk-{j}"),
                &format!("10.{}.{}.{j}", 10 + i / 250, i % 250),
            ));
        }
        hub.apply(changes(&yaml));
        last = next_version_of(&mut good, POD_X).await;
        if behind_since.is_none() && responses(&hub, 1) + 50 < responses(&hub, 0) {
            behind_since = Some(i);
        }
        if behind_since.is_some_and(|b| i > b + 300) {
            break;
        }
    }
    assert!(
        behind_since.is_some(),
        "the stalled stream never fell behind"
    );
    // The last change reached the proxy that reads, and the model's
    // version is the one it holds.
    let held = hub.model().resources(ADDRESS_TYPE_URL).and_then(|m| {
        m.get(POD_X)
            .map(|r| istiod_lite::model::version_text(r.version))
    });
    assert_eq!(held.as_deref(), Some(last.as_str()));
    assert_eq!(hub.connected(), 2);
    drop(stalled);
    eventually_connected(&hub, 1).await;
}

#[tokio::test]
async fn a_nack_is_recorded_and_not_answered_with_a_resend() {
    let (hub, addr) = serve(MESH).await;
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    let first = p.next().await;
    p.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(mesh_proto::google::rpc::Status {
            code: 3,
            message: "refused for the test".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    // No resend of what was refused (a proxy that refuses it again would
    // make that a hot loop).
    p.quiet().await;
    let c = hub.connections();
    let t = &c["connections"][0]["types"][ADDRESS_TYPE_URL];
    assert_eq!(t["nacks"], 1, "{c}");
    assert_eq!(t["last_nack"]["nonce"], first.nonce.as_str());
    assert_eq!(t["last_nack"]["error"], "refused for the test");
    // The next change is still sent.
    hub.apply(changes(&pod_at("x", "10.0.0.51")));
    next_version_of(&mut p, POD_X).await;
}

/// (ACK nonces are only recorded for the debug page: what is sent never
/// depends on them, so there is no ACK half to test here.)
#[tokio::test]
async fn stated_versions_stale_unknown_or_of_removed_names_never_make_a_proxy_miss_a_change() {
    let (hub, addr) = serve(MESH).await;
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    p.next().await;
    hub.apply(changes(&pod_at("x", "10.0.0.60")));
    let v1 = next_version_of(&mut p, POD_X).await;
    hub.apply(changes(&pod_at("x", "10.0.0.61")));
    let v2 = next_version_of(&mut p, POD_X).await;
    assert_ne!(v1, v2);
    hub.apply(changes(&pod_at("x", "10.0.0.62")));
    let v3 = next_version_of(&mut p, POD_X).await;
    assert!(v3 != v1 && v3 != v2);
    // A proxy that reconnects stating a version we never sent, or an old
    // one, is sent the current one; a name that is gone is removed.
    let mut again = Proxy::connect_holding(
        addr,
        &token("node-a"),
        "ztunnel~node-a",
        ADDRESS_TYPE_URL,
        &[
            (POD_X, &v1),
            ("Kubernetes//Pod/shop/web-1", "not-a-version"),
            ("Kubernetes//Pod/shop/never-was", &v3),
        ],
    )
    .await
    .unwrap();
    let r = again.next().await;
    assert_eq!(version_in(&r, POD_X).as_deref(), Some(v3.as_str()));
    assert!(version_in(&r, "Kubernetes//Pod/shop/web-1").is_some());
    assert_eq!(
        r.removed_resources,
        vec!["Kubernetes//Pod/shop/never-was".to_string()]
    );
}

#[tokio::test]
async fn subscribing_to_ever_more_names_ends_the_stream_not_the_memory() {
    let (hub, addr) = serve(MESH).await;
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    p.next().await;
    // Names of nothing, 50 000 a request (each request well under 4 MiB):
    // without a bound each connection could make the controller keep any
    // number of them.
    let mut ended = false;
    let mut status = None;
    for round in 0..6 {
        let req = DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            resource_names_subscribe: (0..50_000).map(|i| format!("ns/n-{round}-{i}")).collect(),
            ..Default::default()
        };
        if p.tx.send(req).await.is_err() {
            ended = true;
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), p.rx.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without an error status"),
            Ok(Err(s)) => {
                status = Some(s);
                ended = true;
                break;
            }
            Err(_) => panic!("no answer within 5 s"),
        }
    }
    assert!(ended, "the stream is still open after 300 000 names");
    let end = match status {
        Some(s) => s,
        None => end_of(&mut p).await.expect_err("an error status"),
    };
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
    eventually_connected(&hub, 0).await;
}

/// A removal every connection has been sent is forgotten, even when a
/// connection also subscribes to a type that never changes.
#[tokio::test]
async fn a_type_that_never_changes_does_not_pin_removals() {
    use istiod_lite::config::objects::{Kind, ObjectKey};
    let (hub, addr) = serve(MESH).await;
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    p.next().await;
    p.send(subscribe(AUTHORIZATION_TYPE_URL)).await;
    assert_eq!(p.next().await.type_url, AUTHORIZATION_TYPE_URL);
    hub.apply(changes(&pod_at("x", "10.0.0.70")));
    next_version_of(&mut p, POD_X).await;
    hub.apply(vec![Change::Delete(ObjectKey {
        kind: Kind::Pod,
        namespace: "shop".into(),
        name: "x".into(),
    })]);
    loop {
        let r = p.next().await;
        if r.removed_resources.iter().any(|n| n == POD_X) {
            break;
        }
    }
    // The next change prunes what every connection has been sent.
    hub.apply(changes(&pod_at("y", "10.0.0.71")));
    next_version_of(&mut p, "Kubernetes//Pod/shop/y").await;
    let kept = hub.model().removed_since(ADDRESS_TYPE_URL, 0).count();
    assert_eq!(kept, 0, "removals kept though every proxy has them");
}

/// One connection carries at most a few streams at once: a client may not
/// open ever more over one connection.
#[tokio::test]
async fn a_connection_carries_a_bounded_number_of_streams() {
    use istiod_lite::ca::MAX_STREAMS_PER_CONNECTION;
    let (hub, addr) = serve(MESH).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let open = |channel: tonic::transport::Channel| async move {
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~node-a".into(),
                ..Default::default()
            }),
            ..subscribe(ADDRESS_TYPE_URL)
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token("node-a")).parse().unwrap(),
        );
        let mut rx = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(req)
            .await?
            .into_inner();
        rx.message().await?;
        Ok::<_, tonic::Status>((tx, rx))
    };
    let mut streams = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CONNECTION {
        streams.push(open(channel.clone()).await.expect("opens"));
    }
    // One more waits for a slot.
    let extra = tokio::spawn(open(channel.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!extra.is_finished(), "a stream past the limit was opened");
    assert_eq!(hub.connected(), MAX_STREAMS_PER_CONNECTION as usize);
    // It opens once another closes.
    drop(streams.pop());
    let opened = tokio::time::timeout(Duration::from_secs(5), extra).await;
    assert!(matches!(opened, Ok(Ok(Ok(_)))), "{opened:?}");
}

const DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [evil]}}]}]
"#;

/// The model's Authorization resources: name and version.
fn policies(hub: &Hub) -> std::collections::BTreeMap<String, String> {
    hub.model()
        .resources(AUTHORIZATION_TYPE_URL)
        .map(|m| {
            m.values()
                .map(|r| {
                    (
                        r.name.to_string(),
                        istiod_lite::model::version_text(r.version),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A DENY deleted and added again while a proxy's connection lags (it
/// missed broadcasts and is re-diffed in full) is held by the proxy in the
/// end: never left removed.
#[tokio::test]
async fn a_deny_deleted_and_re_added_while_a_connection_lags_is_held_in_the_end() {
    use istiod_lite::config::objects::{Kind, ObjectKey};
    let (hub, addr) = serve(&format!("{MESH}---\n{DENY}")).await;
    let with_deny = policies(&hub);
    let deny = with_deny
        .keys()
        .find(|n| n.contains("deny-evil"))
        .expect("the DENY is served")
        .clone();
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    p.next().await;
    p.send(subscribe(AUTHORIZATION_TYPE_URL)).await;
    let mut held: std::collections::BTreeMap<String, String> = Default::default();
    let r = p.next().await;
    assert_eq!(r.type_url, AUTHORIZATION_TYPE_URL);
    held.extend(
        r.resources
            .iter()
            .map(|x| (x.name.clone(), x.version.clone())),
    );
    assert!(held.contains_key(&deny));
    // The proxy stops reading; bulk changes until its connection lags far
    // beyond the broadcast queue, with the DENY deleted and re-added.
    let sent = |hub: &Hub| {
        hub.connections()["connections"][0]["types"][ADDRESS_TYPE_URL]["responses_sent"]
            .as_u64()
            .unwrap_or(0)
    };
    let bulk = |i: usize| {
        let mut yaml = String::new();
        for j in 0..40 {
            yaml.push_str(&pod_at(
                &format!("bulk-{j}"),
                &format!("10.{}.{}.{j}", 10 + i / 250, i % 250),
            ));
            yaml.push_str("---\n");
        }
        changes(&yaml)
    };
    let mut i = 0;
    let mut behind_at = None;
    while behind_at.is_none_or(|b| i < b + 700) {
        hub.apply(bulk(i));
        if behind_at.is_none() && sent(&hub) + 50 < i as u64 {
            behind_at = Some(i);
        }
        if behind_at.is_some_and(|b| i == b + 300) {
            hub.apply(vec![Change::Delete(ObjectKey {
                kind: Kind::AuthorizationPolicy,
                namespace: "shop".into(),
                name: "deny-evil".into(),
            })]);
            assert!(!policies(&hub).contains_key(&deny));
        }
        if behind_at.is_some_and(|b| i == b + 400) {
            // Back, changed (a new version).
            hub.apply(changes(&DENY.replace("[evil]", "[evil, worse]")));
        }
        i += 1;
        assert!(i < 5000, "the connection never fell behind");
    }
    let now = policies(&hub);
    assert!(now.contains_key(&deny) && now[&deny] != with_deny[&deny]);
    // Reading again (until it is sent nothing for a second), the proxy ends
    // up holding exactly the model's policies.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(1), p.rx.message()).await {
        assert!(
            tokio::time::Instant::now() < until,
            "still sending after 60 s"
        );
        let r = r.unwrap().expect("stream open");
        if r.type_url != AUTHORIZATION_TYPE_URL {
            continue;
        }
        held.extend(
            r.resources
                .iter()
                .map(|x| (x.name.clone(), x.version.clone())),
        );
        for n in &r.removed_resources {
            held.remove(n);
        }
    }
    assert_eq!(held, now);
}

/// One caller (a node's credential) may hold only so many streams open at
/// once, however many connections it opens.
#[tokio::test]
async fn a_caller_holds_a_bounded_number_of_streams() {
    use istiod_lite::xds::MAX_STREAMS_PER_NODE;
    let (hub, addr) = serve(MESH).await;
    let mut open = Vec::new();
    for i in 0..MAX_STREAMS_PER_NODE {
        let mut p = Proxy::connect(
            addr,
            "node-a",
            &format!("ztunnel~node-a-{i}"),
            ADDRESS_TYPE_URL,
        )
        .await;
        p.next().await;
        open.push(p);
    }
    let refused =
        match Proxy::connect_with(addr, &token("node-a"), "ztunnel~node-a-x", ADDRESS_TYPE_URL)
            .await
        {
            Ok(mut p) => end_of(&mut p).await,
            Err(s) => Err(s),
        };
    let refused = refused.expect_err("refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // Another node is not held up by it.
    let mut other = Proxy::connect(addr, "node-b", "ztunnel~node-b", ADDRESS_TYPE_URL).await;
    other.next().await;
    assert_eq!(hub.connected(), MAX_STREAMS_PER_NODE + 1);
}

/// Opens `proxy_id`'s stream with `bearer` and reads its first answer:
/// the status it is refused with, if it is.
async fn open_status(
    addr: SocketAddr,
    bearer: &str,
    proxy_id: &str,
    held: &[(&str, &str)],
) -> Result<Proxy, tonic::Status> {
    let mut p = Proxy::connect_holding(addr, bearer, proxy_id, ADDRESS_TYPE_URL, held).await?;
    match tokio::time::timeout(Duration::from_secs(10), p.rx.message())
        .await
        .expect("an answer within 10 s")
    {
        Ok(Some(_)) => Ok(p),
        Ok(None) => Err(tonic::Status::ok("ended")),
        Err(s) => Err(s),
    }
}

/// Pods' own tokens never use up the stream quota of their node's
/// ztunnel: a pod that is no waypoint is refused outright, a Gateway's pod
/// holds a couple of streams at most, and the node's ztunnel still opens.
#[tokio::test]
async fn pod_tokens_do_not_lock_their_nodes_ztunnel_out() {
    use istiod_lite::xds::{MAX_STREAMS_PER_NODE, MAX_STREAMS_PER_POD};
    let (hub, addr) = serve(&format!("{MESH}---\n{INGRESS}")).await;
    // web-1 is no waypoint's pod: its token opens nothing as one.
    let mut parked = Vec::new();
    for _ in 0..MAX_STREAMS_PER_NODE {
        match open_status(addr, &pod_token("shop/web-1"), "waypoint~shop~web-1", &[]).await {
            Ok(p) => parked.push(p),
            Err(s) => assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}"),
        }
    }
    // A Gateway's pod holds at most a couple.
    let mut refused = None;
    for _ in 0..MAX_STREAMS_PER_NODE {
        match open_status(addr, &pod_token("shop/edge-1"), "ingress~shop~edge-1", &[]).await {
            Ok(p) => parked.push(p),
            Err(s) => refused = Some(s),
        }
    }
    let refused = refused.expect("a pod's streams are bounded");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert_eq!(parked.len(), MAX_STREAMS_PER_POD, "the pod's quota is full");
    // The node's quota is whole beside it: all of its streams open.
    let mut node = Vec::new();
    for i in 0..MAX_STREAMS_PER_NODE {
        let mut z = Proxy::connect(
            addr,
            "node-a",
            &format!("ztunnel~node-a-{i}"),
            ADDRESS_TYPE_URL,
        )
        .await;
        z.next().await;
        node.push(z);
    }
    assert_eq!(hub.connected(), MAX_STREAMS_PER_POD + MAX_STREAMS_PER_NODE);
}

/// A registered stream's later requests of a type are small: one of
/// 5 MiB ends it.
#[tokio::test]
async fn a_later_request_over_4_mib_ends_the_stream() {
    let (_hub, addr) = serve(MESH).await;
    let mut p = Proxy::connect(addr, "node-a", "ztunnel~node-a", ADDRESS_TYPE_URL).await;
    p.next().await;
    p.send(DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["x".repeat(5 << 20)],
        ..Default::default()
    })
    .await;
    let end = end_of(&mut p).await.expect_err("an error status");
    assert_eq!(end.code(), tonic::Code::OutOfRange, "{end:?}");
}

/// After mass deletions a reconnecting proxy may state more held names
/// than twice what is live: it is served, and told to drop every one that
/// is gone (never refused, keeping them).
#[tokio::test]
async fn a_proxy_holding_more_than_is_live_after_mass_deletions_is_resynced() {
    let (hub, addr) = serve(MESH).await;
    let n = 51_000;
    let pod = |i: usize| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: m-{i}, namespace: shop}}\nspec: {{nodeName: node-b, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.{}.{}.{}, phase: Running}}\n",
            10 + i / 62_500,
            (i / 250) % 250,
            i % 250 + 1
        )
    };
    let all: String = (0..n).map(|i| format!("---\n{}", pod(i))).collect();
    hub.apply(changes(&all));
    hub.apply(
        (0..n)
            .map(|i| {
                Change::Delete(istiod_lite::config::objects::ObjectKey {
                    kind: istiod_lite::config::objects::Kind::Pod,
                    namespace: "shop".into(),
                    name: format!("m-{i}"),
                })
            })
            .collect(),
    );
    // What it held before: every pod, and more: over 2 x 51 000.
    let held: Vec<(String, String)> = (0..2 * n + 5)
        .map(|i| (format!("Kubernetes//Pod/shop/m-{i}"), format!("{i:016x}")))
        .collect();
    let held_refs: Vec<(&str, &str)> = held.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let mut p = Proxy::connect_holding(
        addr,
        &token("node-a"),
        "ztunnel~node-a",
        ADDRESS_TYPE_URL,
        &held_refs,
    )
    .await
    .expect("opens");
    let r = p.next().await;
    assert_eq!(r.removed_resources.len(), held.len());
    assert!(version_in(&r, "Kubernetes//Pod/shop/web-1").is_some());
    let c = hub.connections();
    let live = hub
        .model()
        .resources(ADDRESS_TYPE_URL)
        .map_or(0, |m| m.len());
    assert_eq!(
        c["connections"][0]["types"][ADDRESS_TYPE_URL]["resources"],
        serde_json::json!(live),
        "{c}"
    );
}
