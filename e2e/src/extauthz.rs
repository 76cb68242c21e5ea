//! The lab's external authorization server: Envoy's ext_authz gRPC Check
//! API (`labapp ext-authz`), for CUSTOM AuthorizationPolicies. A request
//! carrying `x-ext-authz: allow` is allowed, with edits a test can see: the
//! request gets `x-ext-authz-check-result: allowed` and loses
//! `x-ext-authz`; the response gets `x-ext-authz-server: <pod>`. Anything
//! else is denied with what only this server sends: 401,
//! `x-ext-authz-check-result: denied` and a body naming the pod.

use std::net::SocketAddr;

use mesh_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use mesh_proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use mesh_proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response,
};
use mesh_proto::envoy::r#type::v3::HttpStatus;
use mesh_proto::google::rpc::Status;

/// The request header that decides.
pub const DECIDING_HEADER: &str = "x-ext-authz";
/// gRPC PERMISSION_DENIED.
const PERMISSION_DENIED: i32 = 7;

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: Some(false),
        ..Default::default()
    }
}

pub struct Server {
    /// This pod's name, put in answers.
    pub pod: String,
}

impl Server {
    /// The answer to one check.
    pub fn decide(&self, req: &CheckRequest) -> CheckResponse {
        let http = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let allow = http
            .and_then(|h| h.headers.get(DECIDING_HEADER))
            .is_some_and(|v| v == "allow");
        if allow {
            return CheckResponse {
                status: Some(Status::default()),
                http_response: Some(check_response::HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![header("x-ext-authz-check-result", "allowed")],
                    headers_to_remove: vec![DECIDING_HEADER.into()],
                    response_headers_to_add: vec![header("x-ext-authz-server", &self.pod)],
                    ..Default::default()
                })),
            };
        }
        let path = http.map_or("", |h| h.path.as_str());
        CheckResponse {
            status: Some(Status {
                code: PERMISSION_DENIED,
                message: "denied by the lab's ext-authz".into(),
                details: Vec::new(),
            }),
            http_response: Some(check_response::HttpResponse::DeniedResponse(
                DeniedHttpResponse {
                    status: Some(HttpStatus { code: 401 }),
                    headers: vec![header("x-ext-authz-check-result", "denied")],
                    body: format!("denied by ext-authz {} for {path:?}\n", self.pod),
                },
            )),
        }
    }
}

#[tonic::async_trait]
impl Authorization for Server {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let resp = self.decide(request.get_ref());
        let allowed = resp.status.as_ref().is_some_and(|s| s.code == 0);
        println!("check: allowed={allowed}");
        Ok(tonic::Response::new(resp))
    }
}

/// Serves the Check API (plaintext HTTP/2) on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, pod: String) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Server { pod }))
        .serve(addr)
        .await
}
