//! One HTTP request, start to finish: the routes that apply, the path
//! normalized, framing checked, authorization, the route, its redirect,
//! rate limit and faults, the body read, the route's and backend's header
//! and path rewrites, and then forwarding and the response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_core::hbone;
use mesh_proto::mesh::waypoint as pb;

use super::forward::Outgoing;
use super::lifetime::ConnActivity;
use super::record::Recorder;
use super::rewrite::{edit_headers, matched_prefix, rewrite, strip_hop_by_hop};
use super::upgrade::{self, Asked};
use super::{Downstream, IngressScope, Waypoint};
use crate::attach;
use crate::body::RespBody;
use crate::config::Limits;
use crate::extauthz::{self, Subject};
use crate::h1guard::Framing;
use crate::idle::IdleTimer;
use crate::ingress;
use crate::normalize;
use crate::ratelimit::{Verdict, retry_after_secs};
use crate::reqbody::{BodyLimits, RetryBuffer};
use crate::routes::{Backend, PortProtocol, RequestView, Route, ServiceConfig};
use crate::telemetry::{Flag, TraceContext};
use crate::upstream::Proto;

impl Waypoint {
    /// The routes for a request at an ingress: the listener (by SNI for
    /// HTTPS, by Host for HTTP), then its virtual host by Host. None: 404.
    fn ingress_routes(
        &self,
        scope: &IngressScope,
        req: &Request<Incoming>,
    ) -> Option<Arc<ServiceConfig>> {
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
        })?;
        let host = ingress::normalize_host(host);
        let port = self.ingress.port(scope.port)?;
        let listener = if scope.https {
            port.listener_for(scope.sni.as_deref())?
        } else {
            port.listener_for(Some(&host))?
        };
        listener.routes_for(&host).cloned()
    }

    /// One HTTP request, start to finish; counted in flight on its
    /// connection (`activity`) until its response has been sent, or its
    /// upgraded connection closed.
    pub(super) async fn request(
        self: Arc<Self>,
        ds: Arc<Downstream>,
        mut req: Request<Incoming>,
        framing: Framing,
        activity: ConnActivity,
    ) -> Result<Response<RespBody>, Infallible> {
        let in_flight = activity.begin();
        let asked = upgrade::take(&mut req, &self.cfg.upgrades);
        let mut resp = self
            .clone()
            .respond(ds, req, framing, asked, &activity)
            .await;
        resp.body_mut().keep(Box::new(in_flight));
        Ok(resp)
    }

    async fn respond(
        self: Arc<Self>,
        ds: Arc<Downstream>,
        req: Request<Incoming>,
        framing: Framing,
        asked: Asked,
        activity: &ConnActivity,
    ) -> Response<RespBody> {
        let started = Instant::now();
        let wall = SystemTime::now();
        let (svc, no_vhost) = self.service_config(&ds, &req);
        let trace = TraceContext::continue_or_start(
            req.headers()
                .get(hbone::TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        );
        let mut rec = Recorder::new(&self, &ds, &svc, &req, trace, started, wall);
        if no_vhost {
            rec.detail = format!("no listener or virtual host for host {:?}", rec.authority);
            return rec.local(StatusCode::NOT_FOUND, Flag::NR, "no route for this host\n");
        }
        let upgrade = match asked {
            Asked::Plain => None,
            Asked::Relay(u) => Some(u),
            Asked::Refuse(token) => {
                rec.detail = format!("upgrade to {token:?} is not allowed (config: upgrades)");
                return rec.local(StatusCode::FORBIDDEN, Flag::None, "upgrade not allowed\n");
            }
        };
        let (mut parts, body) = req.into_parts();
        let ext_edits = match self.screen(&ds, &svc, &mut parts, framing, &mut rec).await {
            Ok(edits) => edits,
            Err(local) => return local.answer(rec),
        };

        let Some(route) = svc
            .route(&RequestView {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
            })
            .cloned()
        else {
            rec.detail = "no route matches".into();
            return rec.local(StatusCode::NOT_FOUND, Flag::NR, "no route\n");
        };
        rec.route = route.name.clone();

        for f in &route.filters {
            if let pb::filter::Kind::Redirect(r) = f {
                let host = rec.authority.clone();
                return rec.redirect(r, &parts.uri, &host, matched_prefix(&route));
            }
        }
        let prepared = self.prepare(&ds, &svc, &route, parts, body, &mut rec);
        let (mut out, backend, response_edits) = match prepared.await {
            Ok(p) => p,
            Err(local) => return local.answer(rec),
        };
        out.upgrade = upgrade.as_ref().map(|u| u.token.clone());
        if let Some((mirror, per_million)) = &route.mirror
            && upgrade.is_none()
            && chance(*per_million)
        {
            let wp = self.clone();
            let m = out.clone();
            let mirror = mirror.clone();
            let ds2 = ds.clone();
            tokio::spawn(async move { wp.mirror(ds2, mirror, m).await });
        }
        let resp = self.forward(&ds, &route, &backend, out, &mut rec).await;
        let (mut upstream, lease, admitted) = match resp {
            Ok(r) => r,
            Err((status, flag, msg)) => return rec.local(status, flag, msg),
        };
        let clock = rec.clock.clone();
        if let Some(up) = upgrade
            && upgrade::accepted(&upstream)
        {
            // The upstream connection is the relay's now: never pooled.
            let upstream_on = hyper::upgrade::on(&mut upstream);
            let mut resp = rec.upstream(upstream, None);
            for e in &response_edits {
                edit_headers(resp.headers_mut(), e);
            }
            ext_edits.apply(resp.headers_mut());
            let hold = upgrade::Hold {
                _in_flight: activity.begin(),
                _admitted: admitted,
                clock,
                service: backend.service.clone(),
            };
            return self.upgraded(up, upstream_on, resp, hold);
        }
        let idle = IdleTimer::new(clock, self.cfg.limits.stream_idle_timeout);
        let mut resp = rec.upstream(upstream, lease);
        resp.body_mut().hold(admitted);
        resp.body_mut().idle(idle);
        for e in &response_edits {
            edit_headers(resp.headers_mut(), e);
        }
        ext_edits.apply(resp.headers_mut());
        resp
    }

    /// The routes that apply, and whether an ingress has no listener or
    /// virtual host for the request's host (a 404).
    fn service_config(
        &self,
        ds: &Downstream,
        req: &Request<Incoming>,
    ) -> (Arc<ServiceConfig>, bool) {
        // At an ingress the request's host picks the routes; at a waypoint,
        // the service it was sent to (one the controller sent no routes for
        // yet gets the defaults).
        match &ds.ingress {
            Some(scope) => match self.ingress_routes(scope, req) {
                Some(s) => (s, false),
                None => (Arc::new(ServiceConfig::default_for(&ds.service_key)), true),
            },
            None => (
                attach::config(
                    &self.state.snapshot(),
                    &self.routes,
                    &self.cfg,
                    &ds.service_key,
                ),
                false,
            ),
        }
    }

    /// What is checked before a request is routed: its path, its framing
    /// and its authorization. The response edits a provider asked for, or
    /// the answer instead.
    async fn screen(
        &self,
        ds: &Downstream,
        svc: &ServiceConfig,
        parts: &mut Parts,
        framing: Framing,
        rec: &mut Recorder,
    ) -> Result<extauthz::ResponseEdits, Local> {
        // One path for policy, routing and upstream, normalized as Istio
        // does; what Istio refuses is refused here.
        if let Err(e) = normalize::request(parts, self.cfg.path_normalization) {
            rec.detail = e.to_string();
            return Err(Local::new(
                StatusCode::BAD_REQUEST,
                Flag::None,
                "bad request\n",
            ));
        }
        // Hop-by-hop headers (and those `Connection` names) go before
        // anything judges the request: what is judged is what is sent.
        strip_hop_by_hop(&mut parts.headers);

        // Content-Length with Transfer-Encoding is how requests are
        // smuggled past a proxy: refused, and the connection closed, since
        // where this request ends is now in doubt (RFC 9112 6.1).
        if framing == Framing::Conflict {
            rec.detail = "both Content-Length and Transfer-Encoding".into();
            return Err(Local::new(
                StatusCode::BAD_REQUEST,
                Flag::None,
                "conflicting Content-Length and Transfer-Encoding\n",
            )
            .with(header::CONNECTION, HeaderValue::from_static("close")));
        }

        // Authorization first (CUSTOM, DENY, ALLOW): a refused request
        // costs nothing upstream.
        let host = rec.authority.clone();
        let subject = Subject {
            source: ds.src_identity.as_ref(),
            source_addr: ds.peer,
            source_addrs: &ds.src_addrs,
            destination_addr: ds.target,
            waypoint: &self.identity,
            host: &host,
        };
        let authz = self
            .ext_authz
            .authorize_http(&svc.policies, &subject, parts);
        match authz.await {
            extauthz::Verdict::Allowed(edits) => Ok(edits),
            extauthz::Verdict::Denied(d) => {
                rec.detail = d.detail;
                Err(Local {
                    status: d.status,
                    flag: d.flag,
                    body: d.body,
                    headers: d.headers,
                })
            }
        }
    }

    /// From the route to the request as it goes upstream: rate limit and
    /// faults, the body, the route's rewrites, the backend and its edits,
    /// and the protocol to speak. With it, the backend and the response
    /// header edits to make on the way back.
    async fn prepare(
        &self,
        ds: &Downstream,
        svc: &ServiceConfig,
        route: &Route,
        mut parts: Parts,
        body: Incoming,
        rec: &mut Recorder,
    ) -> Result<(Outgoing, Backend, Vec<pb::HeaderEdit>), Local> {
        self.limit_and_fault(ds, route, &parts.headers, rec).await?;
        let clock = rec.clock.clone();
        let Some(body) = request_body(&self.cfg.limits, &parts.headers, body, clock, rec) else {
            return Err(Local::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Flag::None,
                "request body too large\n",
            ));
        };
        rec.body = Some(body.clone());
        rec.keeps_body = route.retry.is_some() || route.mirror.is_some();

        strip_hop_by_hop(&mut parts.headers);
        // `100 Continue` is the downstream connection's business (hyper
        // answers it when the body is first read).
        parts.headers.remove(header::EXPECT);
        let (path, authority, mut response_edits) = rewrite(route, &mut parts, &rec.authority);
        if let Ok(v) = HeaderValue::from_str(&rec.trace.traceparent()) {
            parts.headers.insert(hbone::TRACEPARENT, v);
        }
        if !parts.headers.contains_key("x-request-id") {
            let id = format!("{:032x}", fastrand::u128(..));
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert("x-request-id", v);
            }
        }

        let Some(backend) = route.pick_backend().cloned() else {
            rec.detail = format!("route {} has no usable backend", route.name);
            return Err(Local::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Flag::NR,
                "no backend\n",
            ));
        };
        if let Some(e) = &backend.request_headers {
            edit_headers(&mut parts.headers, e);
        }
        if let Some(e) = &backend.response_headers {
            response_edits.push(e.clone());
        }
        let out = Outgoing {
            method: parts.method.clone(),
            path,
            authority,
            headers: parts.headers,
            body,
            proto: self.upstream_proto(ds, svc, &backend),
            upgrade: None,
        };
        Ok((out, backend, response_edits))
    }

    /// The route's rate limit, then its faults (a delay, an abort).
    async fn limit_and_fault(
        &self,
        ds: &Downstream,
        route: &Route,
        headers: &HeaderMap,
        rec: &mut Recorder,
    ) -> Result<(), Local> {
        if let Some(limit) = &route.rate_limit {
            let key = limit.key_of(ds.principal(), headers);
            if let Verdict::Limited { retry_after } = self.limiter.check(limit, &key).await {
                rec.detail = format!("rate limit of {}", limit.source);
                return Err(Local::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    Flag::RL,
                    "local_rate_limited\n",
                )
                .with(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                ));
            }
        }
        if let Some(fault) = &route.fault {
            if chance(fault.delay_per_million) && fault.delay_ms > 0 {
                rec.flag = Flag::DI;
                tokio::time::sleep(Duration::from_millis(u64::from(fault.delay_ms))).await;
            }
            if chance(fault.abort_per_million) {
                let status = u16::try_from(fault.abort_status)
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(Local::new(status, Flag::FI, "fault filter abort\n"));
            }
        }
        Ok(())
    }

    /// Upstream speaks what the backend's port declares (an HTTP/2 client
    /// may reach an HTTP/1-only app); a sniffed port, what the client spoke.
    fn upstream_proto(&self, ds: &Downstream, svc: &ServiceConfig, backend: &Backend) -> Proto {
        let bport = if backend.port == 0 {
            ds.target.port()
        } else {
            backend.port
        };
        let declared = self
            .routes
            .get(&backend.service)
            .map(|b| b.protocol(bport))
            .unwrap_or_else(|| svc.protocol(ds.target.port()));
        match declared {
            PortProtocol::Http2 => Proto::Http2,
            PortProtocol::Http1 => Proto::Http1,
            PortProtocol::Sniff | PortProtocol::Tcp if ds.protocol == "http2" => Proto::Http2,
            PortProtocol::Sniff | PortProtocol::Tcp => Proto::Http1,
        }
    }
}

/// An answer the waypoint gives itself instead of forwarding the request
/// (why, for the access log, is set on the recorder).
struct Local {
    status: StatusCode,
    flag: Flag,
    body: Bytes,
    /// Set on the answer after its own (a provider's may replace them).
    headers: HeaderMap,
}

impl Local {
    fn new(status: StatusCode, flag: Flag, body: &'static str) -> Local {
        Local {
            status,
            flag,
            body: Bytes::from(body),
            headers: HeaderMap::new(),
        }
    }

    fn with(mut self, name: HeaderName, value: HeaderValue) -> Local {
        self.headers.insert(name, value);
        self
    }

    /// The response, recorded as the request's answer.
    fn answer(self, rec: Recorder) -> Response<RespBody> {
        let mut r = rec.local(self.status, self.flag, self.body);
        r.headers_mut().extend(self.headers);
        r
    }
}

/// The request body as it will stream upstream, kept for retries while it
/// fits the retry buffer; None (413 before anything is read) for a
/// declared length over the user's limit.
fn request_body(
    limits: &Limits,
    headers: &HeaderMap,
    body: Incoming,
    clock: crate::idle::StreamClock,
    rec: &mut Recorder,
) -> Option<RetryBuffer> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(max) = limits.max_body_bytes
        && declared.is_some_and(|n| n > max)
    {
        rec.detail = format!("content-length over {max} bytes");
        return None;
    }
    let source = body.map_err(|e| Box::new(e) as crate::reqbody::BoxError);
    Some(RetryBuffer::new(
        source.boxed_unsync(),
        declared,
        BodyLimits {
            retry_buffer_bytes: limits.retry_buffer_bytes,
            max_body_bytes: limits.max_body_bytes,
            idle: limits.stream_idle_timeout,
        },
        clock,
    ))
}

fn chance(per_million: u32) -> bool {
    per_million > 0 && fastrand::u32(0..1_000_000) < per_million
}
