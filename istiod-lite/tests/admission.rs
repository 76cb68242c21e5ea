//! A stream is admitted on its headers, before any of its body is read:
//! its caller's quota counts it while it has sent nothing, a workload's
//! request over 4 MiB is refused on its frame header, a stream that names
//! no proxy in time is closed, and requests being buffered across streams
//! share one budget. These speak raw HTTP/2 (gRPC framing by hand), so a
//! stream can send a header and stall, or send nothing at all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use istiod_lite::ca::auth::BootstrapTokens;
use istiod_lite::config::objects::{Change, Object};
use istiod_lite::model::{Model, ModelConfig};
use istiod_lite::xds::{AdsService, Hub};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.12, phase: Running}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-a, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-a-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-a}}
spec: {nodeName: node-a, serviceAccountName: wp-a, containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.10, phase: Running}
"#;

const METHOD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

fn node_token(node: &str) -> String {
    format!("bootstrap-token-for-{node}-0123456789")
}

/// The own token of a waypoint Gateway's pod (only those are admitted).
const POD_TOKEN: &str = "pod-token-for-shop-wp-a-1-0123456789";

fn changes(yaml: &str) -> Vec<Change> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| Change::Upsert(Object::parse(v).unwrap().unwrap()))
        .collect()
}

async fn serve(configure: impl FnOnce(AdsService) -> AdsService) -> SocketAddr {
    serve_hub(configure).await.1
}

async fn serve_hub(configure: impl FnOnce(AdsService) -> AdsService) -> (Arc<Hub>, SocketAddr) {
    serve_pods(0, configure).await
}

/// Pod `crowd-<i>` (of `crowd` plain pods on node-a, no Gateway's) and its
/// own token.
fn crowd_token(i: usize) -> String {
    format!("pod-token-for-shop-crowd-{i}-0123456789")
}

/// Serves [`MESH`] and `crowd` more plain pods, each with its own token.
async fn serve_pods(
    crowd: usize,
    configure: impl FnOnce(AdsService) -> AdsService,
) -> (Arc<Hub>, SocketAddr) {
    let hub = Hub::new(Model::new(ModelConfig::default()));
    hub.apply(changes(MESH));
    let pods: String = (0..crowd)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: crowd-{i}, namespace: shop}}\n\
                 spec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\n\
                 status: {{podIP: 10.1.{}.{}, phase: Running}}\n---\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    if crowd > 0 {
        hub.apply(changes(&pods));
    }
    hub.set_ready();
    let tokens = BootstrapTokens::new(
        ["node-a", "node-b"]
            .into_iter()
            .map(|n| (n.to_string(), node_token(n)))
            .chain([("shop/wp-a-1".to_string(), POD_TOKEN.to_string())])
            .chain((0..crowd).map(|i| (format!("shop/crowd-{i}"), crowd_token(i)))),
    )
    .unwrap()
    .with_pods(hub.clone());
    let ads = configure(AdsService::new(hub.clone(), Arc::new(tokens))).into_server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        istiod_lite::ca::with_limits(tonic::transport::Server::builder())
            .add_service(ads)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (hub, addr)
}

type Sender = hyper::client::conn::http2::SendRequest<StreamBody<ReceiverStream<Chunk>>>;
type Chunk = Result<Frame<Bytes>, Infallible>;

async fn connection(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// One raw stream: what it sends, and its response once there is one.
struct Raw {
    body: mpsc::Sender<Chunk>,
    response: tokio::task::JoinHandle<Result<http::Response<Incoming>, hyper::Error>>,
}

fn open(send: &mut Sender, bearer: &str) -> Raw {
    let (tx, rx) = mpsc::channel(4);
    let req = http::Request::post(format!("http://controller{METHOD}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {bearer}"))
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let response = tokio::spawn(send.send_request(req));
    Raw { body: tx, response }
}

/// A gRPC frame header announcing a message of `len` bytes.
fn frame_header(len: u32) -> Bytes {
    let mut h = vec![0u8];
    h.extend(len.to_be_bytes());
    Bytes::from(h)
}

impl Raw {
    async fn send(&self, b: Bytes) {
        self.body.send(Ok(Frame::data(b))).await.unwrap();
    }

    /// The stream's gRPC status, if it ends within `wait`: from its
    /// headers (a refusal) or its trailers.
    async fn status_within(self, wait: Duration) -> Option<tonic::Code> {
        let body = self.body;
        let status = tokio::time::timeout(wait, async move {
            let res = self.response.await.unwrap().unwrap();
            if let Some(s) = res.headers().get("grpc-status") {
                return code(s);
            }
            let mut incoming = res.into_body();
            while let Some(f) = incoming.frame().await {
                if let Some(s) = f.unwrap().trailers_ref().and_then(|t| t.get("grpc-status")) {
                    return code(s);
                }
            }
            tonic::Code::Ok
        })
        .await
        .ok();
        drop(body);
        status
    }

    /// Whether its response has come.
    fn answered(&self) -> bool {
        self.response.is_finished()
    }
}

fn code(v: &http::HeaderValue) -> tonic::Code {
    tonic::Code::from_bytes(v.as_bytes())
}

/// A pod's token holds at most two streams: a third is refused although
/// the first two have sent nothing yet (they are counted as they are
/// admitted, not once their first request is read).
#[tokio::test]
async fn a_pods_stream_past_its_quota_is_refused_before_it_sends_anything() {
    use istiod_lite::xds::MAX_STREAMS_PER_POD;
    let addr = serve(|a| a).await;
    let mut conn = connection(addr).await;
    let pending: Vec<Raw> = (0..MAX_STREAMS_PER_POD)
        .map(|_| open(&mut conn, POD_TOKEN))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = open(&mut conn, POD_TOKEN)
        .status_within(Duration::from_secs(3))
        .await;
    assert_eq!(refused, Some(tonic::Code::ResourceExhausted));
    assert!(pending.iter().all(|p| !p.answered()));
    // Its node's token is not held up by it.
    let node = open(&mut conn, &node_token("node-a"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !node.answered(),
        "the node's stream waits for its first request"
    );
}

/// A workload's request may be 4 MiB at most, its first too: a 5 MiB one
/// is refused on its frame header, before its bytes are waited for.
#[tokio::test]
async fn a_pods_first_request_over_4_mib_is_refused_on_its_header() {
    let addr = serve(|a| a).await;
    let mut conn = connection(addr).await;
    let raw = open(&mut conn, POD_TOKEN);
    raw.send(frame_header(5 << 20)).await;
    raw.send(Bytes::from(vec![0u8; 1024])).await;
    let status = raw.status_within(Duration::from_secs(3)).await;
    assert_eq!(status, Some(tonic::Code::OutOfRange));
}

/// A stream that never sends its first request does not hold its slot
/// for good: it is closed after the deadline.
#[tokio::test]
async fn a_stream_that_sends_nothing_is_closed_after_the_deadline() {
    let addr = serve(|a| a.with_first_request_deadline(Duration::from_secs(1))).await;
    let mut conn = connection(addr).await;
    let raw = open(&mut conn, &node_token("node-a"));
    let status = raw.status_within(Duration::from_secs(5)).await;
    assert_eq!(status, Some(tonic::Code::DeadlineExceeded));
}

/// Large requests being buffered across all streams share one budget:
/// past it a large request is refused on its header (RESOURCE_EXHAUSTED),
/// not buffered; a small one is never refused by it, so one node filling
/// it does not lock another out.
#[tokio::test]
async fn requests_past_the_shared_buffer_budget_are_refused() {
    let addr = serve(|a| a.with_buffer_budget(6 << 20)).await;
    let mut conn = connection(addr).await;
    // node-a announces 5 MiB and stalls.
    let stalled = open(&mut conn, &node_token("node-a"));
    stalled.send(frame_header(5 << 20)).await;
    stalled.send(Bytes::from(vec![0u8; 1024])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // node-b's 5 MiB does not fit beside it.
    let refused = open(&mut conn, &node_token("node-b"));
    refused.send(frame_header(5 << 20)).await;
    let status = refused.status_within(Duration::from_secs(3)).await;
    assert_eq!(status, Some(tonic::Code::ResourceExhausted));
    // Its small first request does.
    first_answer(addr, &node_token("node-b"), small_first("node-b"))
        .await
        .expect("a small request is not refused by the shared budget");
    assert!(!stalled.answered());
}

/// A proxy that stops reading is cut off once a push has waited the stall
/// deadline for room in its queue (RESOURCE_EXHAUSTED), and what was
/// queued for it is dropped: it does not pin responses for good.
#[tokio::test]
async fn a_proxy_that_stops_reading_is_cut_off() {
    use mesh_proto::envoy::config::core::v3::Node;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let (hub, addr) = serve_hub(|a| a.with_push_stall(Duration::from_secs(1))).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~node-a".into(),
            ..Default::default()
        }),
        type_url: mesh_proto::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", node_token("node-a")).parse().unwrap(),
    );
    // Never read.
    let mut stalled = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hub.connected(), 1);
    // Pushes (40 pods changed in each) until its HTTP/2 window and its
    // queue are full, then more.
    for i in 0..2000 {
        let yaml: String = (0..40)
            .map(|j| {
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: bulk-{j}, namespace: shop}}\n\
                     spec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\n\
                     status: {{podIP: 10.{}.{}.{j}, phase: Running}}\n---\n",
                    10 + i / 250,
                    i % 250
                )
            })
            .collect();
        hub.apply(changes(&yaml));
        if hub.connected() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..100 {
        if hub.connected() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hub.connected(),
        0,
        "a proxy that stopped reading is still served"
    );
    // Reading again, it gets what was in flight and then the reason.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Code::Ok,
                Err(s) => return s.code(),
            }
        }
    })
    .await
    .expect("the stream ends");
    assert_eq!(end, tonic::Code::ResourceExhausted);
    drop(tx);
}

/// Opens a stream with `bearer` whose first request is `first`, and reads
/// its first answer: the status it ends with, if it is refused.
async fn first_answer(
    addr: SocketAddr,
    bearer: &str,
    first: mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest,
) -> Result<(), tonic::Status> {
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .delta_aggregated_resources(req)
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an answer")?;
    // Kept open: its share of the node's budget is held while it is.
    tokio::spawn(async move {
        let _keep = (tx, stream);
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    Ok(())
}

/// A large first request (over 4 MiB) is allowed only of the types a
/// ztunnel holds, and one node's streams share one budget of them: a
/// compromised ztunnel cannot make each of its 64 streams hold 64 MiB.
#[tokio::test]
async fn a_nodes_large_first_requests_share_one_budget() {
    use istiod_lite::xds::request::MAX_LARGE_PER_NODE;
    use mesh_proto::envoy::config::core::v3::Node;
    use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let addr = serve(|a| a).await;
    let large = |type_url: &str, size: usize| DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~node-a".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        response_nonce: "n".repeat(size),
        ..Default::default()
    };
    // A waypoint's routes are few: 5 MiB of them is refused.
    let routes = first_answer(
        addr,
        &node_token("node-a"),
        large(mesh_proto::SERVICE_ROUTES_TYPE_URL, 5 << 20),
    )
    .await;
    assert_eq!(
        routes.map_err(|s| s.code()),
        Err(tonic::Code::OutOfRange),
        "a 5 MiB first request of routes"
    );
    // Addresses may be large (up to what the model justifies: some 12 MiB
    // while it is empty), up to the node's budget across its streams.
    let size = 12 << 20;
    let fit = MAX_LARGE_PER_NODE / size;
    for i in 0..fit {
        first_answer(
            addr,
            &node_token("node-a"),
            large(mesh_proto::ADDRESS_TYPE_URL, size),
        )
        .await
        .unwrap_or_else(|s| panic!("large first request {i}: {s:?}"));
    }
    let refused = first_answer(
        addr,
        &node_token("node-a"),
        large(mesh_proto::ADDRESS_TYPE_URL, size),
    )
    .await;
    assert_eq!(
        refused.map_err(|s| s.code()),
        Err(tonic::Code::ResourceExhausted)
    );
    // Another node's budget is its own.
    first_answer(
        addr,
        &node_token("node-b"),
        large(mesh_proto::ADDRESS_TYPE_URL, size),
    )
    .await
    .expect("another node's large first request");
}

/// A small first request of addresses from `node`'s ztunnel.
fn small_first(node: &str) -> mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest {
    mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest {
        node: Some(mesh_proto::envoy::config::core::v3::Node {
            id: format!("ztunnel~{node}"),
            ..Default::default()
        }),
        type_url: mesh_proto::ADDRESS_TYPE_URL.into(),
        ..Default::default()
    }
}

/// One node's token announcing 12 MiB (as much as an empty model lets a
/// first request be) on twelve streams and stalling takes at most its own
/// share (128 MiB): its streams past it end RESOURCE_EXHAUSTED (the
/// shared budget alone would have taken all 512 MiB), and another node's
/// request over 64 KiB is still answered.
#[tokio::test]
async fn a_node_announcing_12_mib_on_its_streams_does_not_lock_out_others() {
    use istiod_lite::xds::request::MAX_LARGE_PER_NODE;
    let addr = serve(|a| a).await;
    let mut conn = connection(addr).await;
    let mut streams = Vec::new();
    for _ in 0..12 {
        let raw = open(&mut conn, &node_token("node-a"));
        raw.send(frame_header(12 << 20)).await;
        raw.send(Bytes::from(vec![0u8; 1024])).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        streams.push(raw);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A refused stream is answered at once; one within the share waits.
    let (ended, held): (Vec<Raw>, Vec<Raw>) = streams.into_iter().partition(Raw::answered);
    let fit = MAX_LARGE_PER_NODE / (12 << 20);
    assert_eq!(
        (held.len(), ended.len()),
        (fit, 12 - fit),
        "past its share, refused"
    );
    for raw in ended {
        let status = raw.status_within(Duration::from_secs(3)).await;
        assert_eq!(status, Some(tonic::Code::ResourceExhausted));
    }
    // While node-a holds its share, node-b's request over 64 KiB fits.
    let mut big = small_first("node-b");
    big.response_nonce = "n".repeat(1 << 20);
    first_answer(addr, &node_token("node-b"), big)
        .await
        .expect("another node's 1 MiB first request is answered");
    drop(held);
}

/// A pod's token announcing 4 MiB on each of its streams cannot refuse
/// another caller's request: its share is 4 MiB in all, and small
/// requests are never refused by the shared budget.
#[tokio::test]
async fn a_pod_announcing_4_mib_on_its_streams_cannot_refuse_others() {
    let addr = serve(|a| a.with_buffer_budget(8 << 20)).await;
    let mut conn = connection(addr).await;
    let one = open(&mut conn, POD_TOKEN);
    one.send(frame_header(4 << 20)).await;
    one.send(Bytes::from(vec![0u8; 1024])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two = open(&mut conn, POD_TOKEN);
    two.send(frame_header(4 << 20)).await;
    two.send(Bytes::from(vec![0u8; 1024])).await;
    // The pod's second 4 MiB is past its own share: its stream ends.
    assert_eq!(
        two.status_within(Duration::from_secs(3)).await,
        Some(tonic::Code::ResourceExhausted)
    );
    first_answer(addr, &node_token("node-b"), small_first("node-b"))
        .await
        .expect("a node's small first request is answered");
    assert!(!one.answered());
}

/// Every message, not only the first, must arrive within its deadline
/// once its header has: a stalled body ends its stream DEADLINE_EXCEEDED
/// and what it held of the shared budget is given back.
#[tokio::test]
async fn a_stalled_body_is_cut_after_its_deadline_and_its_bytes_returned() {
    use prost::Message;
    let addr = serve(|a| a.with_buffer_budget(2 << 20)).await;
    let mut conn = connection(addr).await;
    let raw = open(&mut conn, &node_token("node-a"));
    let first = small_first("node-a").encode_to_vec();
    raw.send(frame_header(first.len() as u32)).await;
    raw.send(Bytes::from(first)).await;
    // Its next message announces 1.5 MiB and stalls.
    raw.send(frame_header(3 << 19)).await;
    raw.send(Bytes::from(vec![0u8; 1024])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = raw.status_within(Duration::from_secs(20)).await;
    assert_eq!(status, Some(tonic::Code::DeadlineExceeded));
    // Its 1.5 MiB is given back: another node's 1.5 MiB fits again.
    let mut big = small_first("node-b");
    big.response_nonce = "n".repeat(3 << 19);
    first_answer(addr, &node_token("node-b"), big)
        .await
        .expect("the budget was given back");
}

/// 128 pods' own tokens (no Gateway's pods) announcing 4 MiB each and
/// stalling fill nothing: a workload token is refused on its headers
/// unless its pod is a Gateway's, so a node's 1 MiB first request is
/// answered.
#[tokio::test]
async fn pods_announcing_4_mib_and_stalling_do_not_refuse_a_nodes_first_request() {
    let (_hub, addr) = serve_pods(128, |a| a).await;
    let mut stalled = Vec::new();
    for chunk in 0..8 {
        let mut conn = connection(addr).await;
        for i in chunk * 16..(chunk + 1) * 16 {
            let raw = open(&mut conn, &crowd_token(i));
            let _ = raw.body.send(Ok(Frame::data(frame_header(4 << 20)))).await;
            let _ = raw
                .body
                .send(Ok(Frame::data(Bytes::from(vec![0u8; 1024]))))
                .await;
            stalled.push(raw);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut big = small_first("node-a");
    big.response_nonce = "n".repeat(1 << 20);
    first_answer(addr, &node_token("node-a"), big)
        .await
        .expect("a node's 1 MiB first request is answered");
    let one = stalled.pop().expect("a pod's stream");
    assert_eq!(
        one.status_within(Duration::from_secs(3)).await,
        Some(tonic::Code::PermissionDenied),
        "a plain pod's token is refused on its headers"
    );
}

/// A connection whose proxy reads its responses slowly (a small HTTP/2
/// window, nothing read), so the controller is held up pushing to it.
async fn slow_reader(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Changes to 40 pods on node-a, `rounds` times, each pushed on its own:
/// enough to fill a slow reader's queue, so the controller waits on it.
async fn churn(hub: &Hub, rounds: usize) {
    for i in 0..rounds {
        let yaml: String = (0..40)
            .map(|j| {
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: slow-{j}, namespace: shop}}\n\
                     spec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\n\
                     status: {{podIP: 10.{}.{}.{j}, phase: Running}}\n---\n",
                    20 + i / 250,
                    i % 250
                )
            })
            .collect();
        hub.apply(changes(&yaml));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A message's deadline runs in wall time from its header, whatever the
/// controller is doing meanwhile: a node that reads its responses slowly
/// (so the controller is held up pushing to it, for as long as it likes)
/// and holds a 2 MiB request's header with its body unsent loses the
/// stream once the deadline (10 s + 1 s per MiB) has passed, and the
/// budget it took is given back.
#[tokio::test]
async fn a_slow_reader_holding_a_header_gives_its_bytes_back_within_the_deadline() {
    use prost::Message;
    let (hub, addr) = serve_hub(|a| {
        a.with_push_stall(Duration::from_secs(120))
            .with_buffer_budget(3 << 20)
    })
    .await;
    let mut send = slow_reader(addr).await;
    let raw = open(&mut send, &node_token("node-a"));
    let first = small_first("node-a").encode_to_vec();
    raw.send(frame_header(first.len() as u32)).await;
    raw.send(Bytes::from(first)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The header of a 2 MiB request and a little of it; the rest never comes.
    raw.send(frame_header(2 << 20)).await;
    raw.send(Bytes::from(vec![0u8; 1024])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The controller is held up pushing to it (it never reads).
    churn(&hub, 100).await;
    let started = std::time::Instant::now();
    // (Its responses are not read until the end.)
    // Within the deadline (12 s) and a little more, the 2 MiB are back:
    // another node's 2 MiB first request fits the 3 MiB budget.
    let mut big = small_first("node-b");
    big.response_nonce = "n".repeat(2 << 20);
    let mut answered = false;
    while started.elapsed() < Duration::from_secs(16) {
        if first_answer(addr, &node_token("node-b"), big.clone())
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        answered,
        "the slow reader's 2 MiB were not given back in 16 s"
    );
    assert!(
        started.elapsed() > Duration::from_secs(9),
        "not before its deadline"
    );
    assert_eq!(
        raw.status_within(Duration::from_secs(20)).await,
        Some(tonic::Code::DeadlineExceeded),
        "the slow reader's stream ends for its late request"
    );
}

/// The legitimate case of a busy controller: a node's large first push to
/// a proxy that reads it at once, while the proxy's next request (over
/// the small size, so charged to the budget) waits to be taken, is
/// answered and the stream goes on.
#[tokio::test]
async fn a_large_first_push_to_a_fast_proxy_does_not_cut_its_next_request() {
    use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let (hub, addr) = serve_hub(|a| a).await;
    let many: String = (0..4000)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: many-{i}, namespace: shop}}\n\
                 spec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\n\
                 status: {{podIP: 10.2.{}.{}, phase: Running}}\n---\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    hub.apply(changes(&many));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(small_first("node-a")).await.unwrap();
    let mut next = small_first("node-a");
    next.node = None;
    next.type_url = mesh_proto::AUTHORIZATION_TYPE_URL.into();
    next.response_nonce = "n".repeat(2 << 20);
    tx.send(next).await.unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", node_token("node-a")).parse().unwrap(),
    );
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .delta_aggregated_resources(req)
        .await
        .expect("admitted")
        .into_inner();
    let mut types = Vec::new();
    for _ in 0..2 {
        let res = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an answer in time")
            .expect("not cut")
            .expect("a response");
        types.push(res.type_url);
    }
    assert_eq!(
        types,
        vec![
            mesh_proto::ADDRESS_TYPE_URL.to_string(),
            mesh_proto::AUTHORIZATION_TYPE_URL.to_string()
        ]
    );
    assert_eq!(hub.connected(), 1);
    drop(tx);
}

/// Gateway pods' streams draw from one pool of the budget (32 MiB): 8 pods
/// announcing 4 MiB each fill it, and a 9th is refused although the
/// budget has room, which a node's request still finds.
#[tokio::test]
async fn gateway_pods_share_one_pool_of_the_budget() {
    let (hub, addr) = serve_pods(9, |a| a).await;
    let gateway_pods: String = (0..9)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: crowd-{i}, namespace: shop, \
                 labels: {{gateway.networking.k8s.io/gateway-name: wp-a}}}}\n\
                 spec: {{nodeName: node-a, serviceAccountName: wp-a, containers: [{{name: c, image: x}}]}}\n\
                 status: {{podIP: 10.1.0.{i}, phase: Running}}\n---\n"
            )
        })
        .collect();
    hub.apply(changes(&gateway_pods));
    let mut conn = connection(addr).await;
    let mut held = Vec::new();
    for i in 0..8 {
        let raw = open(&mut conn, &crowd_token(i));
        raw.send(frame_header(4 << 20)).await;
        raw.send(Bytes::from(vec![0u8; 1024])).await;
        held.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ninth = open(&mut conn, &crowd_token(8));
    ninth.send(frame_header(4 << 20)).await;
    assert_eq!(
        ninth.status_within(Duration::from_secs(3)).await,
        Some(tonic::Code::ResourceExhausted),
        "the 9th pod's 4 MiB do not fit the pool"
    );
    let mut big = small_first("node-a");
    big.response_nonce = "n".repeat(3 << 20);
    first_answer(addr, &node_token("node-a"), big)
        .await
        .expect("a node's request fits the rest of the budget");
    assert!(
        held.iter().all(|r| !r.answered()),
        "the 8 still hold theirs"
    );
}

/// A request that has arrived whole keeps its bytes taken only until the
/// stream's task takes it: a node that reads its responses slowly (so the
/// task is held up pushing to it) and sends a whole 2 MiB request has its
/// stream ended RESOURCE_EXHAUSTED once the request has waited its
/// allowance (12 s), and the bytes are given back.
#[tokio::test]
async fn a_request_left_waiting_by_a_slow_reader_is_given_back_in_time() {
    use prost::Message;
    let (hub, addr) = serve_hub(|a| {
        a.with_push_stall(Duration::from_secs(120))
            .with_buffer_budget(3 << 20)
    })
    .await;
    let mut send = slow_reader(addr).await;
    let raw = open(&mut send, &node_token("node-a"));
    let first = small_first("node-a").encode_to_vec();
    raw.send(frame_header(first.len() as u32)).await;
    raw.send(Bytes::from(first)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    churn(&hub, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A whole 2 MiB request while the controller is held up.
    let mut next = small_first("node-a");
    next.node = None;
    next.response_nonce = "n".repeat(2 << 20);
    let next = next.encode_to_vec();
    raw.send(frame_header(next.len() as u32)).await;
    for chunk in next.chunks(64 * 1024) {
        raw.send(Bytes::copy_from_slice(chunk)).await;
    }
    let started = std::time::Instant::now();
    let mut big = small_first("node-b");
    big.response_nonce = "n".repeat(2 << 20);
    let mut answered = false;
    while started.elapsed() < Duration::from_secs(17) {
        if first_answer(addr, &node_token("node-b"), big.clone())
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered, "the waiting request's 2 MiB were not given back");
    assert_eq!(
        raw.status_within(Duration::from_secs(20)).await,
        Some(tonic::Code::ResourceExhausted),
        "the slow reader's stream ends for its request left waiting"
    );
}

/// A small request and a large request's header in one write: the reader
/// hands over the small one and, while the controller is held up pushing
/// to this slow reader, waits to hand over the next; the large request's
/// bytes, taken at its header, are still given back within its allowance
/// (the stream ended RESOURCE_EXHAUSTED), not held for as long as the
/// controller is held up.
#[tokio::test]
async fn an_ack_and_a_large_header_in_one_write_give_the_bytes_back_in_time() {
    use prost::Message;
    let (hub, addr) = serve_hub(|a| {
        a.with_push_stall(Duration::from_secs(120))
            .with_buffer_budget(3 << 20)
    })
    .await;
    let mut send = slow_reader(addr).await;
    let raw = open(&mut send, &node_token("node-a"));
    let first = small_first("node-a").encode_to_vec();
    raw.send(frame_header(first.len() as u32)).await;
    raw.send(Bytes::from(first)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    churn(&hub, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An ACK, then the header of a 2 MiB request and a little of it, in
    // one write; the rest never comes.
    let mut ack = small_first("node-a");
    ack.node = None;
    ack.response_nonce = "1".into();
    let ack = ack.encode_to_vec();
    let mut write = frame_header(ack.len() as u32).to_vec();
    write.extend(ack);
    write.extend(frame_header(2 << 20));
    write.extend(vec![0u8; 1024]);
    raw.send(Bytes::from(write)).await;
    let started = std::time::Instant::now();
    let mut big = small_first("node-b");
    big.response_nonce = "n".repeat(2 << 20);
    let mut answered = false;
    while started.elapsed() < Duration::from_secs(17) {
        if first_answer(addr, &node_token("node-b"), big.clone())
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered, "the held header's 2 MiB were not given back");
    assert_eq!(
        raw.status_within(Duration::from_secs(20)).await,
        Some(tonic::Code::ResourceExhausted),
        "the slow reader's stream ends for its request left waiting"
    );
}

/// A node's first request may be only as large as the model justifies
/// (its entry bound times a generous size per entry, at least 4 MiB): with
/// an empty model (bound 100 000 entries, some 12 MiB) one announcing
/// 64 MiB is refused on its header, so it never takes 64 MiB of the
/// node's share while it never sends its body.
#[tokio::test]
async fn a_first_request_announcing_more_than_the_model_justifies_is_refused() {
    let addr = serve(|a| a).await;
    let mut conn = connection(addr).await;
    let raw = open(&mut conn, &node_token("node-a"));
    raw.send(frame_header(64 << 20)).await;
    raw.send(Bytes::from(vec![0u8; 1024])).await;
    assert_eq!(
        raw.status_within(Duration::from_secs(3)).await,
        Some(tonic::Code::OutOfRange),
        "refused on its header"
    );
}
