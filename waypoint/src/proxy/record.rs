//! What is recorded about each request: Istio's request metrics, the access
//! log line and the trace span, once per request, when its response ends
//! (or when it is abandoned).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use mesh_core::metrics::{PeerLabels, or_unknown};
use mesh_core::state::{ServiceEntry, Workload};
use mesh_proto::mesh::waypoint as pb;
use tracing::info;

use super::rewrite::{modify_path, strip_hop_by_hop};
use super::{Downstream, Waypoint};
use crate::body::{GrpcOutcome, OnEnd, RespBody};
use crate::reqbody::RetryBuffer;
use crate::routes::ServiceConfig;
use crate::telemetry::{Flag, Reporter, RequestLabels, Span, TraceContext};
use crate::upstream::Limits as ConnLimits;

/// Everything logged and counted about one request.
pub(super) struct Recorder {
    wp: Arc<Waypoint>,
    labels: RequestLabels,
    method: String,
    path: String,
    pub(super) authority: String,
    protocol: &'static str,
    src_addr: SocketAddr,
    upstream: Option<SocketAddr>,
    pub(super) route: String,
    pub(super) flag: Flag,
    pub(super) flag_extra: Option<Flag>,
    /// Recorded already (a request is recorded exactly once).
    done: bool,
    pub(super) detail: String,
    pub(super) retries: u32,
    pub(super) request_bytes: u64,
    /// The request's body, for its size and whether it outgrew the retry
    /// buffer.
    pub(super) body: Option<RetryBuffer>,
    /// The route retries or mirrors: a body over the buffer loses that.
    pub(super) keeps_body: bool,
    /// A gRPC call's `grpc-message`, for the access log.
    grpc_message: Option<String>,
    /// When the request's stream last moved (either way).
    pub(super) clock: crate::idle::StreamClock,
    pub(super) trace: TraceContext,
    pub(super) started: Instant,
    wall: SystemTime,
}

/// A request abandoned before any answer (the client went away while its
/// body, a fault delay or the upstream was awaited) is still counted: code
/// 0, flag DC, as Envoy reports it.
impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            self.flag_extra = Some(Flag::DC);
            self.finish(0, 0, false);
        }
    }
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        wp: &Arc<Waypoint>,
        ds: &Downstream,
        svc: &ServiceConfig,
        req: &Request<Incoming>,
        trace: TraceContext,
        started: Instant,
        wall: SystemTime,
    ) -> Recorder {
        let src = ds.src_workload.as_deref();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let svc_name = svc.hostname.split('.').next().unwrap_or("");
        let mut peers = PeerLabels::unknown();
        peers.set_source(
            src,
            ds.src_identity.as_ref().map_or("", |i| i.namespace()),
            ds.src_identity.as_ref(),
        );
        peers.destination_service = or_unknown(&svc.hostname);
        peers.destination_service_namespace = or_unknown(&svc.namespace);
        peers.destination_service_name = or_unknown(svc_name);
        Recorder {
            wp: wp.clone(),
            labels: RequestLabels {
                reporter: if ds.ingress.is_some() {
                    Reporter::source
                } else {
                    Reporter::waypoint
                },
                peers,
                request_protocol: if ds.protocol == "http2"
                    && req
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|c| c.starts_with("application/grpc"))
                {
                    "grpc".into()
                } else {
                    "http".into()
                },
                response_code: 0,
                grpc_response_status: String::new(),
                response_flags: Flag::None,
                // A client outside the mesh reached an ingress listener.
                connection_security_policy: if ds.src_identity.is_some() {
                    "mutual_tls".into()
                } else {
                    "unknown".into()
                },
            },
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            authority,
            protocol: if ds.protocol == "http2" {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            src_addr: ds.peer,
            upstream: None,
            route: "-".into(),
            flag: Flag::None,
            flag_extra: None,
            done: false,
            detail: String::new(),
            retries: 0,
            request_bytes: 0,
            body: None,
            keeps_body: false,
            grpc_message: None,
            clock: crate::idle::StreamClock::default(),
            trace,
            started,
            wall,
        }
    }

    pub(super) fn set_destination_service(&mut self, s: &ServiceEntry) {
        let peers = &mut self.labels.peers;
        peers.destination_service = or_unknown(&s.service.hostname);
        peers.destination_service_namespace = or_unknown(&s.service.namespace);
        peers.destination_service_name = or_unknown(&s.service.name);
    }

    pub(super) fn set_destination_workload(&mut self, w: &Workload, addr: SocketAddr) {
        self.labels
            .peers
            .set_destination(Some(w), Some(&w.identity));
        self.upstream = Some(addr);
    }

    /// The closure that records the request once its response body ends.
    fn finisher(self, status: StatusCode) -> OnEnd {
        self.finisher_grpc(status, None)
    }

    /// As [`finisher`], with the `grpc-status` of a trailers-only answer
    /// (in the headers); trailers, when they come, say it instead.
    fn finisher_grpc(self, status: StatusCode, in_headers: Option<GrpcOutcome>) -> OnEnd {
        Box::new(move |bytes, complete, in_trailers| {
            let mut r = self;
            if r.labels.request_protocol == "grpc"
                && let Some(g) = in_trailers.or(in_headers)
            {
                r.labels.grpc_response_status = g.status;
                r.grpc_message = g.message;
            }
            r.finish(status.as_u16(), bytes, complete)
        })
    }

    /// Records the request: once, with the code sent (0 when none was).
    fn finish(&mut self, code: u16, resp_bytes: u64, complete: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut flag = self.flag_extra.unwrap_or(self.flag);
        if !complete && flag == Flag::None {
            flag = Flag::DC;
        }
        self.labels.response_code = code;
        self.labels.response_flags = flag;
        self.note_body();
        let duration = self.started.elapsed();
        self.wp
            .http_metrics
            .record(&self.labels, duration, self.request_bytes, resp_bytes);
        info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            authority = %self.authority,
            protocol = self.protocol,
            response_code = code,
            response_flags = flag.as_str(),
            route = %self.route,
            retries = self.retries,
            grpc_status = %if self.labels.grpc_response_status.is_empty() { "-" } else { self.labels.grpc_response_status.as_str() },
            grpc_message = self.grpc_message.as_deref().map(super::grpc::percent_decode).as_deref().unwrap_or("-"),
            src.addr = %self.src_addr,
            src.identity = %self.labels.peers.source_principal,
            dst.service = %self.labels.peers.destination_service,
            dst.workload = %self.labels.peers.destination_workload,
            upstream = %self.upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            bytes_received = self.request_bytes,
            bytes_sent = resp_bytes,
            duration_ms = duration.as_millis() as u64,
            trace_id = %self.trace.trace_id_hex(),
            detail = if self.detail.is_empty() { "-" } else { self.detail.as_str() },
            "request complete"
        );
        self.wp.exporter.export(Span {
            ctx: self.trace.clone(),
            name: format!("{} {}", self.labels.peers.destination_service, self.method),
            start: self.wall,
            end: SystemTime::now(),
            attributes: vec![
                ("http.request.method", self.method.clone()),
                ("url.path", self.path.clone()),
                ("http.response.status_code", code.to_string()),
                ("istio.response_flags", flag.as_str().to_string()),
                ("server.address", self.authority.clone()),
            ],
            error: code == 0 || code >= 500,
        });
    }

    /// The body's size, and a route's retries or mirror given up because
    /// the body outgrew the retry buffer (said in the log, counted).
    fn note_body(&mut self) {
        let Some(b) = &self.body else { return };
        self.request_bytes = self.request_bytes.max(b.received());
        if self.keeps_body && b.overflowed() {
            const WHY: &str = "not retryable: body over the retry buffer";
            self.detail = if self.detail.is_empty() {
                WHY.to_string()
            } else {
                format!("{}; {WHY}", self.detail)
            };
            self.wp
                .http_metrics
                .proxy
                .overflowed(&self.labels.peers.destination_service);
        }
    }

    /// A response the waypoint makes itself.
    pub(super) fn local(
        mut self,
        status: StatusCode,
        flag: Flag,
        body: impl Into<Bytes>,
    ) -> Response<RespBody> {
        if flag != Flag::None {
            self.flag = flag;
        }
        if self.labels.request_protocol == "grpc" {
            return self.local_grpc(status, body.into());
        }
        let mut r = Response::new(RespBody::local(body, Some(self.finisher(status))));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }

    /// A gRPC client's answer from the waypoint itself, as gRPC says an
    /// HTTP status maps to a gRPC one (and as Envoy answers): 200 with
    /// `grpc-status` and `grpc-message` and no body (trailers-only).
    fn local_grpc(self, status: StatusCode, body: Bytes) -> Response<RespBody> {
        let code = match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            408 | 504 => 4,
            413 => 8,
            429 | 502 | 503 => 14,
            _ => 2,
        };
        let message = String::from_utf8_lossy(&body).trim().to_string();
        let g = GrpcOutcome {
            status: code.to_string(),
            message: Some(message.clone()),
        };
        let mut r = Response::new(RespBody::local(
            Bytes::new(),
            Some(self.finisher_grpc(StatusCode::OK, Some(g))),
        ));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(&super::grpc::percent_encode(&message)) {
            h.insert("grpc-message", v);
        }
        r
    }

    pub(super) fn redirect(
        self,
        r: &pb::Redirect,
        uri: &Uri,
        host: &str,
        prefix: Option<&str>,
    ) -> Response<RespBody> {
        let (req_host, req_port) = match host.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse::<u16>().ok()),
            _ => (host, None),
        };
        let scheme = if r.scheme.is_empty() {
            "http"
        } else {
            r.scheme.as_str()
        };
        let hostname = if r.hostname.is_empty() {
            req_host
        } else {
            r.hostname.as_str()
        };
        let port = if r.port > 0 {
            u16::try_from(r.port).ok()
        } else if r.scheme.is_empty() {
            req_port
        } else {
            None
        };
        let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let path = match &r.path {
            Some(m) => modify_path(uri.path(), m, prefix),
            None => uri.path().to_string(),
        };
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let location = match port {
            Some(p) => format!("{scheme}://{hostname}:{p}{path}{query}"),
            None => format!("{scheme}://{hostname}{path}{query}"),
        };
        let status = u16::try_from(r.status_code)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_redirection())
            .unwrap_or(StatusCode::FOUND);
        let mut resp = Response::new(RespBody::local(Bytes::new(), Some(self.finisher(status))));
        *resp.status_mut() = status;
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }

    pub(super) fn upstream(
        self,
        resp: Response<Incoming>,
        lease: Option<(crate::upstream::Lease, ConnLimits)>,
    ) -> Response<RespBody> {
        let status = resp.status();
        let (mut parts, body) = resp.into_parts();
        // A connection the backend is closing must not go back to the pool
        // (it may not look closed yet when the body ends).
        let closing = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let lease = lease.filter(|_| !closing);
        strip_hop_by_hop(&mut parts.headers);
        let grpc = GrpcOutcome::from_headers(&parts.headers);
        let body = RespBody::upstream(body, lease, self.finisher_grpc(status, grpc));
        Response::from_parts(parts, body)
    }
}
