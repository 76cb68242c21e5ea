//! CUSTOM authorization: Envoy's external authorization gRPC API
//! (`envoy.service.auth.v3.Authorization/Check`), asked in Istio's order.
//!
//! For each request, the CUSTOM policies whose rules match are found first
//! and their providers asked, one Check each (a provider named by several
//! matching policies is asked once). An OK answer lets the request go on,
//! with the request and response edits it asks for; a denial is answered
//! with the status (403 unless it says otherwise), headers and body the
//! provider sent (flag UAEX). A provider that cannot be asked (unreachable,
//! no answer within its timeout, a gRPC error, an answer that cannot be
//! applied) denies with its `status_on_error` (403), unless it is
//! `fail_open`. Then DENY and ALLOW policies decide as before.
//!
//! Opaque TCP is checked the same way, with no HTTP attributes; anything but
//! an allow closes the connection.
//!
//! One plaintext HTTP/2 (h2c) channel per provider address, made on first
//! use and shared by every request; it reconnects by itself.

mod edits;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, Version};
use mesh_core::identity::Identity;
use mesh_proto::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use mesh_proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context, authorization_client::AuthorizationClient, check_response,
};
use mesh_proto::mesh::waypoint as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info};

use crate::authz::{self, Policy, RequestAttrs};
use crate::telemetry::Flag;

/// Istio's default check timeout, for a provider that gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long connecting to a provider may take, whatever its check timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub provider: String,
    /// "allowed", "denied", "error_denied" (the provider could not be
    /// asked, the request was refused) or "error_allowed" (fail open).
    pub result: &'static str,
}

pub struct ExtAuthzMetrics {
    pub checks: Family<CheckLabels, Counter>,
}

impl ExtAuthzMetrics {
    pub fn register(registry: &mut Registry) -> ExtAuthzMetrics {
        let m = ExtAuthzMetrics {
            checks: Family::default(),
        };
        registry.register(
            "waypoint_ext_authz_checks",
            "External authorization checks (CUSTOM policies), by provider and result",
            m.checks.clone(),
        );
        m
    }
}

/// Who is asking, over which connection.
pub struct Subject<'a> {
    /// The HBONE peer's identity; None outside the mesh.
    pub source: Option<&'a Identity>,
    pub source_addr: SocketAddr,
    /// Every address of the source's workload, when the peer's identity
    /// owns the workload its address belongs to.
    pub source_addrs: &'a [IpAddr],
    /// The service address the peer connected to.
    pub destination_addr: SocketAddr,
    /// The waypoint's own identity: the destination principal.
    pub waypoint: &'a Identity,
    /// The request's authority (HTTP only).
    pub host: &'a str,
}

/// The response to send instead of forwarding the request.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub flag: Flag,
    /// For the access log.
    pub detail: String,
}

/// Headers a provider asked to add to the response the client gets.
#[derive(Debug, Default)]
pub struct ResponseEdits(Vec<edits::HeaderOp>);

impl ResponseEdits {
    pub fn apply(&self, h: &mut HeaderMap) {
        edits::apply(&self.0, h);
    }
}

#[derive(Debug)]
pub enum Verdict {
    Allowed(ResponseEdits),
    Denied(Denial),
}

/// A refusal by the mesh's own rules (not a provider's).
fn rbac_denial(detail: String, body: &'static [u8]) -> Denial {
    Denial {
        status: StatusCode::FORBIDDEN,
        headers: HeaderMap::new(),
        body: Bytes::from_static(body),
        flag: Flag::RBAC,
        detail,
    }
}

/// What a provider answered.
enum Answer {
    Allowed(Option<OkHttpResponse>),
    /// The answer's gRPC status code, and what to send.
    Denied(i32, Option<DeniedHttpResponse>),
    Failed(ProviderError),
}

/// Why a provider's answer could not be had, or not be applied: the
/// request is refused (or let through, where failOpen allows).
#[derive(Debug, thiserror::Error)]
enum ProviderError {
    #[error("address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("gRPC {code:?}: {message}")]
    Grpc { code: tonic::Code, message: String },
    #[error("its answer cannot be applied: {0}")]
    Unusable(#[from] edits::EditError),
}

pub struct ExtAuthz {
    channels: Mutex<HashMap<String, Channel>>,
    metrics: ExtAuthzMetrics,
}

fn timeout_of(p: &pb::ExtAuthzProvider) -> Duration {
    match p.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    }
}

/// The providers to ask, in policy order, each once, with the first
/// policy that named it.
fn providers(
    policies: &[Policy],
    r: &RequestAttrs<'_>,
) -> Vec<(String, Arc<pb::ExtAuthzProvider>)> {
    let mut out: Vec<(String, Arc<pb::ExtAuthzProvider>)> = Vec::new();
    for p in authz::custom_matches(policies, r) {
        if let Some(pr) = &p.provider
            && !out.iter().any(|(_, o)| o == pr)
        {
            out.push((p.name.clone(), pr.clone()));
        }
    }
    out
}

fn peer(addr: SocketAddr, id: Option<&Identity>) -> attribute_context::Peer {
    attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                protocol: 0,
                address: addr.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                    addr.port(),
                ))),
            })),
        }),
        principal: id.map(|i| i.as_str().to_string()).unwrap_or_default(),
    }
}

fn http_attributes(parts: &Parts, host: &str) -> attribute_context::HttpRequest {
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let mut headers: std::collections::BTreeMap<String, String> = Default::default();
    for (name, value) in &parts.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|s| {
                s.push(',');
                s.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    for (k, v) in [
        (":authority", host),
        (":method", parts.method.as_str()),
        (":path", path.as_str()),
        (":scheme", "http"),
    ] {
        headers.insert(k.to_string(), v.to_string());
    }
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    attribute_context::HttpRequest {
        id: header("x-request-id"),
        method: parts.method.to_string(),
        headers,
        path,
        host: host.to_string(),
        scheme: "http".into(),
        size: header("content-length").parse::<i64>().unwrap_or(-1),
        protocol: match parts.version {
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        }
        .into(),
    }
}

fn check_request(s: &Subject<'_>, http: Option<attribute_context::HttpRequest>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(s.source_addr, s.source)),
            destination: Some(peer(s.destination_addr, Some(s.waypoint))),
            request: Some(attribute_context::Request { http }),
        }),
    }
}

fn classify(r: CheckResponse) -> Answer {
    let code = r.status.as_ref().map_or(0, |s| s.code);
    match (code, r.http_response) {
        (0, Some(check_response::HttpResponse::OkResponse(ok))) => Answer::Allowed(Some(ok)),
        (0, _) => Answer::Allowed(None),
        (c, Some(check_response::HttpResponse::DeniedResponse(d))) => Answer::Denied(c, Some(d)),
        (c, _) => Answer::Denied(c, None),
    }
}

/// The provider's denial as a response: its status when it is one (else
/// 403), its headers (left out, all of them, when one is invalid), its body.
fn denial(policy: &str, provider: &str, code: i32, d: Option<DeniedHttpResponse>) -> Denial {
    let d = d.unwrap_or_default();
    let status = d
        .status
        .and_then(|s| u16::try_from(s.code).ok())
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    let mut headers = HeaderMap::new();
    match edits::header_ops(&d.headers) {
        Ok(ops) => edits::apply(&ops, &mut headers),
        Err(e) => info!(%provider, error = %e, "ext_authz: the denial's headers are left out"),
    }
    Denial {
        status,
        headers,
        body: Bytes::from(d.body),
        flag: Flag::UAEX,
        detail: format!("CUSTOM policy {policy}: provider {provider} denied (gRPC status {code})"),
    }
}

/// Applies what an OK answer asks of the request; the response edits are
/// returned. Checked first: on an error nothing has changed.
fn allow(
    parts: &mut Parts,
    ok: Option<OkHttpResponse>,
) -> Result<Vec<edits::HeaderOp>, edits::EditError> {
    let Some(ok) = ok else {
        return Ok(Vec::new());
    };
    let set = edits::header_ops(&ok.headers)?;
    let remove = edits::removals(&ok.headers_to_remove)?;
    let response = edits::header_ops(&ok.response_headers_to_add)?;
    let uri = edits::edit_query(
        &parts.uri,
        &ok.query_parameters_to_set,
        &ok.query_parameters_to_remove,
    )?;
    for n in &remove {
        parts.headers.remove(n);
    }
    edits::apply(&set, &mut parts.headers);
    parts.uri = uri;
    Ok(response)
}

fn attrs<'a>(s: &'a Subject<'_>, parts: &'a Parts) -> RequestAttrs<'a> {
    RequestAttrs {
        http: true,
        principal: s.source.map(|i| i.principal()),
        namespace: s.source.map(|i| i.namespace()),
        source_ip: s.source_addr.ip(),
        source_addrs: s.source_addrs,
        host: s.host,
        port: s.destination_addr.port(),
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    }
}

impl ExtAuthz {
    pub fn new(metrics: ExtAuthzMetrics) -> ExtAuthz {
        ExtAuthz {
            channels: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn count(&self, provider: &str, result: &'static str) {
        self.metrics
            .checks
            .get_or_create(&CheckLabels {
                provider: provider.to_string(),
                result,
            })
            .inc();
    }

    /// The channel to a provider's address, made (lazily) on first use.
    fn channel(&self, address: &str, timeout: Duration) -> Result<Channel, ProviderError> {
        let mut m = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(address) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| ProviderError::Address {
                address: address.to_string(),
                reason: e.to_string(),
            })?
            // The check's own timeout can be long (Istio's default is
            // 600 s); an unreachable provider is known sooner.
            .connect_timeout(timeout.min(CONNECT_TIMEOUT))
            .tcp_nodelay(true)
            .connect_lazy();
        m.insert(address.to_string(), c.clone());
        Ok(c)
    }

    async fn ask(&self, p: &pb::ExtAuthzProvider, req: CheckRequest) -> Answer {
        let timeout = timeout_of(p);
        let channel = match self.channel(&p.address, timeout) {
            Ok(c) => c,
            Err(e) => return Answer::Failed(e),
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let mut client = AuthorizationClient::new(channel);
        match tokio::time::timeout(timeout, client.check(request)).await {
            Err(_) => Answer::Failed(ProviderError::Timeout(timeout)),
            Ok(Err(status)) => Answer::Failed(ProviderError::Grpc {
                code: status.code(),
                message: status.message().to_string(),
            }),
            Ok(Ok(resp)) => classify(resp.into_inner()),
        }
    }

    /// A provider that could not be asked: None when it fails open.
    fn failed(
        &self,
        policy: &str,
        p: &pb::ExtAuthzProvider,
        error: &ProviderError,
    ) -> Option<Denial> {
        if p.fail_open {
            self.count(&p.name, "error_allowed");
            info!(%policy, provider = %p.name, %error, "ext_authz: provider failed; allowed (failOpen)");
            return None;
        }
        self.count(&p.name, "error_denied");
        info!(%policy, provider = %p.name, %error, "ext_authz: provider failed; denied");
        let status = u16::try_from(p.status_on_error)
            .ok()
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::FORBIDDEN);
        Some(Denial {
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            flag: Flag::UAEX,
            detail: format!(
                "CUSTOM policy {policy}: provider {} failed: {error}",
                p.name
            ),
        })
    }

    /// Asks the providers of the CUSTOM policies the request matches, then
    /// judges it by DENY and ALLOW policies. The request may be edited
    /// (headers, query) as the providers ask.
    pub async fn authorize_http(
        &self,
        policies: &[Policy],
        s: &Subject<'_>,
        parts: &mut Parts,
    ) -> Verdict {
        // A peer refused whatever the policies say is refused before any
        // provider hears of it.
        if let Some(detail) = authz::refused_before_policy(s.source_addr.ip()) {
            return Verdict::Denied(rbac_denial(detail, b"RBAC: access denied\n"));
        }
        let asked = providers(policies, &attrs(s, parts));
        if !asked.is_empty() && !parts.headers.contains_key("x-request-id") {
            // The provider and the backend see the same request id.
            let id = format!("{:032x}", fastrand::u128(..));
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
        }
        let mut response = Vec::new();
        for (policy, p) in asked {
            let req = check_request(s, Some(http_attributes(parts, s.host)));
            let error = match self.ask(&p, req).await {
                Answer::Allowed(ok) => match allow(parts, ok) {
                    Ok(r) => {
                        self.count(&p.name, "allowed");
                        debug!(%policy, provider = %p.name, "ext_authz: allowed");
                        response.extend(r);
                        continue;
                    }
                    // The provider was reached and answered: an answer
                    // that cannot be applied is refused whatever failOpen
                    // says (failOpen covers only "could not ask").
                    Err(e) => {
                        let mut closed = (*p).clone();
                        closed.fail_open = false;
                        let why = ProviderError::Unusable(e);
                        if let Some(d) = self.failed(&policy, &closed, &why) {
                            return Verdict::Denied(d);
                        }
                        continue;
                    }
                },
                Answer::Denied(code, d) => {
                    self.count(&p.name, "denied");
                    info!(%policy, provider = %p.name, code, "ext_authz: denied");
                    return Verdict::Denied(denial(&policy, &p.name, code, d));
                }
                Answer::Failed(e) => e,
            };
            if let Some(d) = self.failed(&policy, &p, &error) {
                return Verdict::Denied(d);
            }
        }
        let decision = authz::evaluate_checked(policies, &attrs(s, parts));
        if !decision.is_allowed() {
            return Verdict::Denied(rbac_denial(decision.to_string(), b"RBAC: access denied\n"));
        }
        Verdict::Allowed(ResponseEdits(response))
    }

    /// The same for an opaque TCP connection: Ok to let it through, else
    /// the refusal (its `detail` says why).
    pub async fn authorize_tcp(&self, policies: &[Policy], s: &Subject<'_>) -> Result<(), Denial> {
        let headers = HeaderMap::new();
        let a = RequestAttrs {
            http: false,
            principal: s.source.map(|i| i.principal()),
            namespace: s.source.map(|i| i.namespace()),
            source_ip: s.source_addr.ip(),
            source_addrs: s.source_addrs,
            host: "",
            port: s.destination_addr.port(),
            method: "",
            path: "",
            headers: &headers,
        };
        if let Some(detail) = authz::refused_before_policy(a.source_ip) {
            return Err(rbac_denial(detail, b""));
        }
        for (policy, p) in providers(policies, &a) {
            let error = match self.ask(&p, check_request(s, None)).await {
                Answer::Allowed(_) => {
                    self.count(&p.name, "allowed");
                    continue;
                }
                Answer::Denied(code, d) => {
                    self.count(&p.name, "denied");
                    return Err(denial(&policy, &p.name, code, d));
                }
                Answer::Failed(e) => e,
            };
            if let Some(d) = self.failed(&policy, &p, &error) {
                return Err(d);
            }
        }
        let decision = authz::evaluate_checked(policies, &a);
        match decision.is_allowed() {
            true => Ok(()),
            false => Err(rbac_denial(decision.to_string(), b"")),
        }
    }
}
