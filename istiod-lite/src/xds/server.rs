//! The gRPC service `envoy.service.discovery.v3.AggregatedDiscoveryService`
//! with its one method, `DeltaAggregatedResources`, served by hand rather
//! than through the generated server: requests are decoded as usual, but
//! responses go out through [`ResponseBody`], which encodes the model's
//! shared resources as the proxy reads them instead of a whole response at
//! once per connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::AdsService;
use super::budget::{Counted, Framing, Held, Unread};
use super::reader::{Charge, Charged, Incoming};
use super::request::{self, LARGE_TYPES, Limits, MAX_FIRST_REQUEST, MAX_REQUEST};
use super::wire::ResponseBody;

const METHOD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Decodes `DeltaDiscoveryRequest`s within the stream's [`Limits`]: no
/// gRPC message over the caller's limit ([`MAX_FIRST_REQUEST`] for a
/// node's token, else [`MAX_REQUEST`]) is buffered at all, nor one the
/// shared budget cannot take ([`Counted`]); each is then held to the
/// stream's current size limit and entry bound before it is decoded
/// ([`request::decode`]), and its bytes given back to the budget.
/// A decoded request keeps its bytes taken until its connection task
/// takes it ([`Charged`]); a refused one gives them back at once.
struct RequestDecoder {
    limits: Limits,
    unread: Arc<Unread>,
}

impl Decoder for RequestDecoder {
    type Item = Charged;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.unread.decoded(buf.remaining());
        let charge = Charge::new(self.limits.clone(), buf.remaining());
        let req = request::decode(buf, &self.limits)?;
        Ok(Some(Charged { req, charge }))
    }
}

/// The service as the gRPC router takes it.
#[derive(Clone)]
pub struct AdsServer {
    ads: AdsService,
}

impl AdsServer {
    pub(super) fn new(ads: AdsService) -> AdsServer {
        AdsServer { ads }
    }
}

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl Service<http::Request<Body>> for AdsServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let ads = self.ads.clone();
        Box::pin(async move { Ok(serve(ads, req).await) })
    }
}

async fn serve(ads: AdsService, req: http::Request<Body>) -> http::Response<Body> {
    if req.uri().path() != METHOD {
        return Status::unimplemented(format!("no method {}", req.uri().path())).into_http();
    }
    // No compression is offered, so none may be used.
    if let Some(enc) = req.headers().get("grpc-encoding")
        && enc.as_bytes() != b"identity"
    {
        return Status::unimplemented(format!("grpc-encoding {enc:?} is not supported"))
            .into_http();
    }
    // Admitted on its headers, before a byte of its body is read.
    let (parts, body) = req.into_parts();
    let head = tonic::Request::from_http(http::Request::from_parts(parts, ()));
    let remote = head.remote_addr();
    let peer = remote.map(|a| a.to_string());
    let (caller, guard) = match ads.admit(head.metadata(), remote.map(|a| a.ip())).await {
        Ok(admitted) => admitted,
        Err(status) => return status.into_http(),
    };
    // Only a node's proxy states all it holds, in its first request of
    // each type; no other caller's request is ever buffered past 4 MiB.
    // Each caller's requests in flight are bounded across its streams by
    // its share, taken on each message's header.
    let node = caller.only.is_none();
    // Workload tokens' streams draw from their own pool of the budget: the
    // rest of it is nodes' alone.
    let held = Held::new(if node {
        ads.budget.clone()
    } else {
        ads.workloads.clone()
    });
    let share = Held::new(guard.share());
    let limits = Limits::new(ads.hub.names_bound.clone())
        .with_held(held.clone())
        .with_share(share.clone());
    let framing = if node {
        limits.node_caller();
        Framing {
            max: MAX_FIRST_REQUEST,
            ordinary: MAX_REQUEST,
            large: LARGE_TYPES.len(),
        }
    } else {
        Framing {
            max: MAX_REQUEST,
            ordinary: MAX_REQUEST,
            large: 0,
        }
    };
    let body = Counted::new(body, held, share, framing).with_entries(ads.hub.names_bound.clone());
    let unread = body.unread();
    let stream = Streaming::new_request(
        RequestDecoder {
            limits,
            unread: unread.clone(),
        },
        body,
        None,
        Some(framing.max),
    );
    // Read by a task of its own, so each message's deadline runs in wall
    // time however long the connection's task is busy.
    let (incoming, cut) = Incoming::spawn(stream, unread);
    match ads.open(caller, guard, (incoming, cut), peer).await {
        Ok((rx, end)) => {
            let mut res = http::Response::new(Body::new(ResponseBody::new(rx, end)));
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            res
        }
        Err(status) => status.into_http(),
    }
}
