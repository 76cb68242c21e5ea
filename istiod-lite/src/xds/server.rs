//! The gRPC service `envoy.service.discovery.v3.AggregatedDiscoveryService`
//! with its one method, `DeltaAggregatedResources`, served by hand rather
//! than through the generated server: requests are decoded as usual, but
//! responses go out through [`ResponseBody`], which encodes the model's
//! shared resources as the proxy reads them instead of a whole response at
//! once per connection.

use std::convert::Infallible;
use std::task::{Context, Poll};

use mesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::AdsService;
use super::wire::ResponseBody;

const METHOD: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Largest request accepted (a reconnecting proxy's list of held versions).
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Decodes `DeltaDiscoveryRequest`s.
struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = DeltaDiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        DeltaDiscoveryRequest::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable request: {e}")))
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
    let request = tonic::Request::from_http(
        req.map(|body| Streaming::new_request(RequestDecoder, body, None, Some(MAX_REQUEST))),
    );
    match ads.open(request).await {
        Ok(rx) => {
            let mut res = http::Response::new(Body::new(ResponseBody::new(rx)));
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            res
        }
        Err(status) => status.into_http(),
    }
}
